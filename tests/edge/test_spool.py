"""The on-disk spool: seqs, restart after kill, bounded size with its drop policy, quarantine."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge.spool import Spool
from fleet.errors import ConfigError
from fleet.rows import RowLayout
from fleet.convert import decode_step, encode_step
from fleet.types import EpisodeSummary, FeatureSpec, Schema, Step

SCHEMA = Schema((FeatureSpec("state", "float32", (8,)),), FeatureSpec("action", "float32", (2,)))


def step(i: int, intervention: bool = False) -> Step:
    return Step(seq=0, index=i, observation={"state": np.full(8, i, np.float32)},
                policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=intervention,
                reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0)


def test_seqs_are_consecutive_and_survive_reopen_after_ack(tmp_path):
    spool = Spool(tmp_path / "s.db", SCHEMA)
    seqs = [spool.record("e1", "t", False, step(i), None) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    spool.ack(5)
    assert spool.backlog() == (0, 0) and spool.last_seq() == 0
    spool.close()
    again = Spool(tmp_path / "s.db", SCHEMA)
    assert again.record("e2", "t", False, step(0), None) == 6  # never reused, even with everything acked
    assert again.assigned_seq() == 6


def test_acking_a_chunk_row_frees_its_pages_without_rewriting_them(tmp_path):
    """secure_delete=FAST: deleting an acked 1024-step chunk row writes a few pages to the WAL, not the row's
    bytes again as zeros (what SQLite builds with SQLITE_SECURE_DELETE do by default)."""
    spool = Spool(tmp_path / "s.db", SCHEMA)
    for i in range(1024):
        spool.record("e1", "t", False, step(i), None)
    row_bytes = spool.backlog()[1]
    assert row_bytes > 50_000
    with sqlite3.connect(tmp_path / "s.db") as other:
        assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy: the WAL is empty
    spool.ack(1024)
    assert spool.backlog() == (0, 0)
    assert (tmp_path / "s.db-wal").stat().st_size < row_bytes / 4
    spool.close()


def test_read_after_splits_by_episode_end_and_bytes(tmp_path):
    spool = Spool(tmp_path / "s.db", SCHEMA)
    for i in range(3):
        spool.record("e1", "t", False, step(i), EpisodeSummary(False, 3, 0, 0, False, 1) if i == 2 else None)
    for i in range(4):
        spool.record("e2", "t", True, step(i), None)
    first = spool.read_after(0)
    assert (first.episode_id, first.first_seq, first.last_seq, first.end_blob is not None) == ("e1", 1, 3, True)
    second = spool.read_after(3)
    assert (second.episode_id, second.first_seq, second.last_seq, second.evaluation) == ("e2", 4, 7, True)
    one_blob = len(second.step_blobs[0])
    small = spool.read_after(3, max_bytes=2 * one_blob + 30)
    assert small.last_seq - small.first_seq + 1 == 2
    tiny = spool.read_after(3, max_bytes=1)  # never empty: one step even if it is larger than the bound
    assert tiny.first_seq == tiny.last_seq == 4
    assert [s.seq for s in spool.steps(second)] == [4, 5, 6, 7]


@pytest.mark.parametrize("chunk_steps", [1024, 3])  # 3: most steps sit in chunk rows (folded when recorded)
def test_full_spool_drops_oldest_autonomous_steps_first(tmp_path, chunk_steps):
    probe = Spool(tmp_path / "probe.db", SCHEMA)
    probe.record("e", "t", False, step(25, intervention=True), None)  # the largest row of this test
    row_bytes = probe.backlog()[1]
    spool = Spool(tmp_path / "s.db", SCHEMA, max_bytes=row_bytes * 20, chunk_steps=chunk_steps)
    for i in range(20):
        spool.record("e1", "t", False, step(i, intervention=i % 4 == 0), None)
    assert spool.dropped_steps == 0
    for i in range(10):
        spool.record("e1", "t", False, step(20 + i), None)
    steps, nbytes = spool.backlog()
    assert nbytes <= row_bytes * 20 and spool.dropped_steps == 30 - steps
    kept = []
    seq = 0
    while (batch := spool.read_after(seq, max_steps=100)) is not None:
        kept += spool.steps(batch)
        seq = batch.last_seq
    kept_seqs = {s.seq for s in kept}
    # Every intervention step survived; the autonomous ones dropped are the oldest.
    assert {1, 5, 9, 13, 17} <= kept_seqs
    dropped = set(range(1, 31)) - kept_seqs
    assert dropped and max(dropped) < min(kept_seqs - {1, 5, 9, 13, 17})
    # The drop count is durable.
    spool.close()
    assert Spool(tmp_path / "s.db", SCHEMA).dropped_steps == 30 - steps


@pytest.mark.parametrize("chunk_steps", [1024, 4])
def test_quarantine_moves_rows_aside_and_is_bounded(tmp_path, chunk_steps):
    spool = Spool(tmp_path / "s.db", SCHEMA, quarantine_max_bytes=10_000, chunk_steps=chunk_steps)
    for i in range(6):
        spool.record("e1", "t", False, step(i), None)
    assert spool.quarantine(2, 3, "INVALID_ARGUMENT", "observation 'state' contains NaN") == 2
    assert spool.backlog()[0] == 4 and spool.quarantined_steps == 2
    batch = spool.read_after(0)
    assert (batch.first_seq, batch.last_seq) == (1, 1)  # a run stops at the hole
    assert spool.read_after(1).first_seq == 4
    held = spool.quarantined()
    assert [(q.seq, q.code) for q in held] == [(2, "INVALID_ARGUMENT"), (3, "INVALID_ARGUMENT")]
    assert spool.layout.decode(held[0].blob).index == 1 and "NaN" in held[0].reason
    spool.close()
    reopened = Spool(tmp_path / "s.db", SCHEMA, quarantine_max_bytes=0)
    assert reopened.quarantined_steps == 2 and reopened.backlog()[0] == 4
    reopened.quarantine(4, 4, "NOT_FOUND", "x")
    assert reopened.quarantined() == []  # over its bound: the oldest quarantined rows go
    assert reopened.quarantined_steps == 3


def test_ensure_after_moves_seqs_past_the_cloud(tmp_path):
    spool = Spool(tmp_path / "s.db", SCHEMA)
    spool.ensure_after(100)
    assert spool.record("e1", "t", False, step(0), None) == 101
    spool.ensure_after(50)
    assert spool.record("e1", "t", False, step(1), None) == 102


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous must be NORMAL or FULL, got 'OFF'"):
        Spool(tmp_path / "s.db", synchronous="OFF")
    with pytest.raises(ValueError, match=r"max_bytes \(0\) must be > 0"):
        Spool(tmp_path / "s.db", max_bytes=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("synchronous,chunk_steps", [("NORMAL", 1024), ("FULL", 1024), ("NORMAL", 7)])
def test_every_recorded_step_survives_kill_9(tmp_path, synchronous, chunk_steps):
    """A child records steps and prints each seq once ``record`` returned; SIGKILL; all are on disk, each
    once (with chunk_steps 7 the child is killed while it folds rows into chunk rows)."""
    code = textwrap.dedent(f"""
        import sys, numpy as np
        from edge.spool import Spool
        from fleet.types import Step
        spool = Spool({str(tmp_path / 's.db')!r}, synchronous={synchronous!r}, chunk_steps={chunk_steps})
        i = 0
        while True:
            s = Step(0, i, {{"state": np.zeros(8, np.float32)}}, np.zeros(2, np.float32), np.zeros(2, np.float32),
                     False, 0.0, False, False, 1, 1.0)
            print(spool.record("e", "t", False, s, None), flush=True)
            i += 1
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    printed = []
    for line in child.stdout:
        printed.append(int(line))
        if len(printed) == 300:
            child.kill()
            break
    child.wait(10)
    spool = Spool(tmp_path / "s.db", SCHEMA)
    on_disk = []
    seq = 0
    while (batch := spool.read_after(seq, max_steps=1000)) is not None:
        on_disk += [(s.seq, s.index + 1) for s in spool.steps(batch)]  # the child's step i has seq i + 1
        seq = batch.last_seq
    assert on_disk == [(i, i) for i in range(1, len(on_disk) + 1)]  # none twice, none missing
    on_disk = {seq for seq, _ in on_disk}
    assert printed == list(range(1, 301))
    assert set(printed) <= on_disk  # what record() returned for is durable; more may be
    assert spool.record("e", "t", False, step(0), None) == max(on_disk) + 1


def test_a_backlog_is_folded_into_chunk_rows_and_split_where_one_step_matters(tmp_path):
    spool = Spool(tmp_path / "s.db", SCHEMA, chunk_steps=4)
    for i in range(10):
        spool.record("e1", "t", False, step(i, intervention=i % 3 == 0),
                     EpisodeSummary(False, 10, 4, 4, False, 1) if i == 9 else None)
    spool.record("e2", "t", False, step(0), None)
    whole = spool.read_after(0, max_steps=100)
    assert (whole.first_seq, whole.last_seq, len(whole.parts), whole.end_blob is not None) == (1, 10, 3, True)
    got = spool.steps(whole)
    assert [(s.seq, s.index, s.is_intervention) for s in got] == [(i + 1, i, i % 3 == 0) for i in range(10)]
    assert [(b.first_seq, b.last_seq) for b in (spool.read_after(0, max_steps=3), spool.read_after(3, max_steps=100))] \
        == [(1, 3), (4, 10)]  # a chunk row longer than the streamer asks for is split, never cut short
    spool.ack(5)  # inside a chunk row
    assert spool.backlog()[0] == 6 and spool.read_after(5).first_seq == 6
    assert spool.quarantine(7, 7, "INVALID_ARGUMENT", "NaN") == 1
    assert [(b.first_seq, b.last_seq) for b in (spool.read_after(5), spool.read_after(7))] == [(6, 6), (8, 10)]
    assert spool.layout.decode(spool.quarantined()[0].blob).index == 6
    spool.close()
    again = Spool(tmp_path / "s.db", SCHEMA, chunk_steps=4)
    assert again.backlog()[0] == 5 and again.last_seq() == 11
    assert [s.seq for s in again.steps(again.read_after(7, max_steps=100))] == [8, 9, 10]


def test_a_step_that_does_not_fit_the_schema_is_quarantined_when_recorded(tmp_path):
    spool = Spool(tmp_path / "s.db", SCHEMA)
    spool.record("e1", "t", False, step(0), None)
    bad = step(1)
    bad.observation["state"] = np.zeros(7, np.float32)  # the robot sent 7 values where its schema has 8
    assert spool.record("e1", "t", False, bad, None) == 2
    spool.record("e1", "t", False, step(2), None)
    assert spool.backlog()[0] == 2 and spool.quarantined_steps == 1
    held = spool.quarantined()
    assert [(q.seq, q.code) for q in held] == [(2, "SCHEMA_MISMATCH")] and "7 elements" in held[0].reason
    assert decode_step(held[0].blob).index == 1  # kept as the step's protobuf for inspection
    assert (spool.read_after(0).last_seq, spool.read_after(1).first_seq) == (1, 3)  # the streamer declares the gap
    spool.close()
    assert Spool(tmp_path / "s.db", SCHEMA).record("e1", "t", False, step(3), None) == 4  # seq 2 never reused


def _old_format_spool(path, steps: list[Step]) -> None:
    """A spool as the previous version wrote it: one fleet.v1.Step protobuf per row, no row_format."""
    import sqlite3

    from edge.spool import _SCHEMA_SQL

    db = sqlite3.connect(str(path))
    db.executescript(_SCHEMA_SQL)
    for i, st in enumerate(steps, 1):
        st.seq = i
        blob = encode_step(st, SCHEMA) if st.observation else b"\xff not a step"
        db.execute("INSERT INTO steps (seq, episode_id, task, evaluation, intervention, blob, end_blob, nbytes) "
                   "VALUES (?, 'e1', 't', 0, 0, ?, NULL, ?)", (i, blob, len(blob)))
    db.commit()
    db.close()


def test_an_old_format_spool_is_converted_on_open(tmp_path):
    broken = step(2)
    broken.observation = {}
    _old_format_spool(tmp_path / "s.db", [step(0), step(1), broken, step(3)])
    with pytest.raises(ConfigError, match="old per-step format; open it with the robot's schema"):
        Spool(tmp_path / "s.db")  # no schema: refused with what to do, the rows left as they are
    spool = Spool(tmp_path / "s.db", SCHEMA)
    assert spool.backlog()[0] == 3 and [q.seq for q in spool.quarantined()] == [3]
    got = spool.steps(spool.read_after(0)) + spool.steps(spool.read_after(3))
    assert [(s.seq, s.index) for s in got] == [(1, 0), (2, 1), (4, 3)]
    np.testing.assert_array_equal(got[1].observation["state"], np.full(8, 1, np.float32))
    assert spool.record("e1", "t", False, step(4), None) == 5
    spool.close()
    assert Spool(tmp_path / "s.db", SCHEMA).backlog()[0] == 4  # converted once, durably


def test_a_row_format_2_spool_gets_the_help_score_column_on_open(tmp_path):
    """Rows written before the help score (row format 2: the flags byte right after the index) are converted in
    place, chunk rows included, help score 0; new steps carry theirs."""
    import sqlite3

    spool = Spool(tmp_path / "s.db", SCHEMA, chunk_steps=3)
    for i in range(7):
        spool.record("e1", "t", False, step(i, intervention=i == 4), None)
    spool.close()
    db = sqlite3.connect(str(tmp_path / "s.db"))
    fixed = RowLayout(SCHEMA).fixed
    for seq, blob, n in db.execute("SELECT seq, blob, n FROM steps").fetchall():
        rows = np.frombuffer(blob, np.uint8).reshape(n, fixed)
        old = np.concatenate([rows[:, :-5], rows[:, -1:]], axis=1).tobytes()  # drop the 4 help bytes
        db.execute("UPDATE steps SET blob = ?, nbytes = ? WHERE seq = ?", (old, len(old), seq))
    assert db.execute("SELECT MAX(n) FROM steps").fetchone()[0] == 3  # chunk rows among them
    db.execute("UPDATE meta SET value = 2 WHERE key = 'row_format'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="old row format 2; open it with the robot's schema"):
        Spool(tmp_path / "s.db")
    spool = Spool(tmp_path / "s.db", SCHEMA, chunk_steps=3)
    got = spool.steps(spool.read_after(0, max_steps=100))
    assert [(s.seq, s.index, s.is_intervention, s.help_score) for s in got] == [
        (i + 1, i, i == 4, 0.0) for i in range(7)]
    np.testing.assert_array_equal(got[5].observation["state"], np.full(8, 5, np.float32))
    new = step(7)
    new.help_score = 0.75
    assert spool.record("e1", "t", False, new, None) == 8
    assert spool.steps(spool.read_after(7))[0].help_score == 0.75
    assert spool.quarantined_steps == 0
