"""The on-disk spool: every recorded step is durable on the robot before it is sent.

SQLite in WAL mode, one row per step keyed by its per-robot sequence number
(``AUTOINCREMENT``, so a number is never reused, even after rows are deleted or
the process is killed). ``synchronous="NORMAL"`` (default) survives a crash or
kill -9 of the edge process (a committed row is in the OS page cache);
``"FULL"`` also survives power loss at the price of an fsync per step.

Acked rows are deleted, with ``secure_delete=FAST``: SQLite overwrites deleted content only where
that costs no extra I/O, so an acked chunk row's overflow pages are freed, not zeroed (SQLite builds
with ``SQLITE_SECURE_DELETE``, e.g. Debian's, zero every freed page by default: that rewrote each
acked 100 kB row into the WAL, ~0.45 ms per chunk and as much as reading and sending it; acked
steps are in the cloud, and their freed pages are reused by the next steps). The spool is bounded by ``max_bytes``: when a new step
would exceed it, the oldest *non-intervention* steps are dropped first (operator
corrections are the scarcest data), then the oldest of any kind; the control
loop is never blocked (a disk error drops the step, counted, rather than
raising into the loop). Dropped steps are counted, and the gap they leave in
the sequence is declared to the gateway (``gap_declared``) so it is not taken
for lost data.

Steps the gateway refuses as invalid (INVALID_ARGUMENT, or NOT_FOUND again and
again) are *quarantined*: moved to their own table, kept for inspection (up to
``quarantine_max_bytes``, newest kept), counted, and never resent. A step that does
not fit the robot's schema is quarantined when it is recorded (``SCHEMA_MISMATCH``).

Each row is the step's columns as raw bytes in the schema's order (``fleet/rows.py``), so
the streamer builds a chunk's columns with one join per batch, not one parse per step.

Chunk rows: for a schema without cameras (every row the same size), once ``chunk_steps``
consecutive steps of one episode are recorded (or the episode ends), ``record`` folds their rows
into one row (``n`` steps, the rows back to back) in one transaction, unless the streamer has read
any of them already. A backlog then streams as one SQLite read and one delete per chunk, not per
step (reading + deleting per-step rows cost ~2.5 us a step, more than the gateway and Redis
together). Everything that works on single steps (an ack or a resume point inside a chunk row,
dropping, quarantine) first splits the chunk row at that step, so the rules below hold per step
(the tables and the chunk-row operations: ``edge/spool_rows.py``).
A spool written by an older version (one ``fleet.v1.Step`` protobuf per row, no
``meta.row_format``; or rows without the help score, row format 2) is converted in place, in one
transaction, when it is opened with the robot's schema; a row that cannot be converted is
quarantined, never fatal.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge.spool_rows import COLUMNS as _COLUMNS
from edge.spool_rows import SCHEMA_SQL as _SCHEMA_SQL
from edge.spool_rows import Run, expand, fold, split
from fleet.convert import decode_step, encode_step, encode_summary, schema_of_step
from fleet.errors import ConfigError, InvalidInput
from fleet.rows import ROW_FORMAT, RowLayout, RowMismatch
from fleet.types import EpisodeSummary, Schema, Step

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SpoolBatch:
    """Consecutive spooled steps of one episode, ready to become a chunk."""

    episode_id: str
    task: str
    evaluation: bool
    first_seq: int
    last_seq: int
    parts: list[bytes]
    """The rows back to back, one part per spool row (a chunk row holds several same-size rows)."""
    end_blob: bytes | None
    counts: list[int] | None = None
    """Steps in each part (None: one each)."""

    @property
    def n(self) -> int:
        return self.last_seq - self.first_seq + 1

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.parts) + len(self.end_blob or b"")

    @property
    def step_blobs(self) -> list[bytes]:
        """One row per step (tests, tools; the streamer joins ``parts`` directly)."""
        if self.counts is None:
            return list(self.parts)
        return [part[i * (len(part) // k):(i + 1) * (len(part) // k)]
                for part, k in zip(self.parts, self.counts) for i in range(k)]


@dataclass(frozen=True)
class QuarantinedStep:
    seq: int
    episode_id: str
    code: str
    reason: str
    blob: bytes


@dataclass(frozen=True)
class SpoolConfig:
    """The robot's on-disk spool of steps not yet acked by the cloud."""

    max_bytes: int = 256 * 1024 * 1024
    """Spool bound; when full, oldest non-intervention steps are dropped first."""
    synchronous: str = "NORMAL"
    """Durability: NORMAL survives a crash of the edge process (kill -9), FULL also a power loss."""

    quarantine_max_bytes: int = 64 * 1024 * 1024
    """Bound of the quarantine of steps the cloud refused (kept for inspection)."""

    def __post_init__(self) -> None:
        if self.synchronous not in ("NORMAL", "FULL"):
            raise ConfigError(f"spool.synchronous must be NORMAL or FULL, got {self.synchronous!r}")
        if self.max_bytes <= 0:
            raise ConfigError(f"spool.max_bytes ({self.max_bytes}) must be > 0")
        if self.quarantine_max_bytes < 0:
            raise ConfigError(f"spool.quarantine_max_bytes ({self.quarantine_max_bytes}) must be >= 0")


class Spool:
    """Durable FIFO of encoded steps. ``record`` from the control thread; the rest from the streamer."""

    def __init__(self, path: str | Path, schema: Schema | None = None, max_bytes: int = SpoolConfig.max_bytes,
                 synchronous: str = SpoolConfig.synchronous,
                 quarantine_max_bytes: int = SpoolConfig.quarantine_max_bytes,
                 chunk_steps: int = 1024, chunk_bytes: int = 1 << 20):
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes ({max_bytes}) must be > 0")
        if quarantine_max_bytes < 0:
            raise ValueError(f"spool quarantine_max_bytes ({quarantine_max_bytes}) must be >= 0")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._layout = RowLayout(schema) if schema is not None else None
        self.max_bytes = max_bytes
        self.quarantine_max_bytes = quarantine_max_bytes
        self.chunk_steps, self.chunk_bytes = max(1, chunk_steps), chunk_bytes  # fold size: the streamer's chunk
        self._run: Run | None = None  # step rows of one episode recorded in a row, not read yet: to fold
        self._read_hi = 0  # highest seq read_after handed out (rows up to it are never folded)
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on record and ack
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA secure_delete=FAST")  # see the module docstring: deleting acked rows
        self._db.executescript(_SCHEMA_SQL)
        if "n" not in {r[1] for r in self._db.execute("PRAGMA table_info(steps)")}:  # a spool of an older version
            self._db.execute("ALTER TABLE steps ADD COLUMN n INTEGER NOT NULL DEFAULT 1")
        self.dropped_steps = self._meta("dropped_steps")
        self.quarantined_steps = self._meta("quarantined_steps")
        self._upgrade_rows()
        row = self._db.execute("SELECT COALESCE(SUM(n), 0), COALESCE(SUM(nbytes), 0), COALESCE(MAX(seq + n - 1), 0) "
                               "FROM steps").fetchone()
        self._steps, self._bytes, self._max_seq = int(row[0]), int(row[1]), int(row[2])
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='steps'").fetchone()
        self._next_seq = max(int(row[0]) if row else 0, self._max_seq) + 1
        self._disk_errors = 0

    def _upgrade_rows(self) -> None:
        """Rows of an older version -> this row format, in one transaction: one protobuf per step (format 1), or
        rows without the help score (format 2)."""
        version = self._meta("row_format")
        if version == ROW_FORMAT:
            return
        old = self._db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        if old and self._layout is None:
            what = "per-step format" if version < 2 else f"row format {version}"
            raise ConfigError(f"spool {self.path} holds {old} rows in the old {what}; open it with the robot's "
                              "schema (start the edge agent once) to convert them")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            bad = 0
            for seq, blob, end_blob, n in self._db.execute("SELECT seq, blob, end_blob, n FROM steps").fetchall():
                try:
                    row = (self._layout.upgrade_v2(blob, n) if version == 2
                           else self._layout.encode(decode_step(blob)))
                except (InvalidInput, RowMismatch) as exc:  # keep the step for inspection
                    bad += n
                    self._quarantine_locked(seq, seq + n - 1, "SCHEMA_MISMATCH",
                                            f"old spool row cannot be converted: {exc}")
                    continue
                self._db.execute("UPDATE steps SET blob = ?, nbytes = ? WHERE seq = ?",
                                 (row, len(row) + len(end_blob or b""), seq))
            self._set_meta_locked("row_format", ROW_FORMAT)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if old:
            log.warning("spool %s: converted %d rows from row format %d (%d steps quarantined)", self.path,
                        old, max(version, 1), bad)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta_locked(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- control thread -------------------------------------------------------------

    def record(self, episode_id: str, task: str, evaluation: bool, step: Step,
               episode_end: EpisodeSummary | None) -> int:
        """Append a step durably; returns its sequence number (0 if a disk error dropped it) (StepSink)."""
        end_blob = encode_summary(episode_end) if episode_end is not None else None
        if self._layout is None:  # a spool opened without a schema (tools, tests): the first step sets it
            self._layout = RowLayout(schema_of_step(step))
        try:
            blob, misfit = self._layout.encode(step), None
        except RowMismatch as exc:
            blob, misfit = _as_pb(step), str(exc)
        with self._lock:
            step.seq = self._next_seq
            nbytes = len(blob) + (len(end_blob) if end_blob else 0)
            try:
                if misfit is not None:
                    self._record_misfit_locked(step, episode_id, task, evaluation, blob, end_blob, misfit)
                    return step.seq
                if self._bytes + nbytes > self.max_bytes:
                    self._drop_locked(self._bytes + nbytes - self.max_bytes)
                self._db.execute(
                    f"INSERT INTO steps ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (step.seq, episode_id, task, int(evaluation), int(step.is_intervention), blob, end_blob, nbytes))
            except sqlite3.Error as exc:  # disk full or failing: drop this step, keep the robot running
                self._disk_errors += 1
                self.dropped_steps += 1
                if self._disk_errors in (1, 10, 100) or self._disk_errors % 1000 == 0:
                    log.error("spool %s: cannot store step (%s); %d steps lost to disk errors so far",
                              self.path, exc, self._disk_errors)
                step.seq = 0
                return 0
            self._next_seq += 1
            self._max_seq = step.seq
            self._steps += 1
            self._bytes += nbytes
            if self._layout.fixed_rows:
                self._grow_run_locked(episode_id, step.seq, blob, bool(step.is_intervention), end_blob)
            self.changed.notify_all()
            return step.seq

    def _grow_run_locked(self, episode_id: str, seq: int, blob: bytes, intervention: bool,
                         end_blob: bytes | None) -> None:
        run = self._run
        if run is None or run.episode_id != episode_id or run.last_seq + 1 != seq:
            run = self._run = Run(episode_id, seq, seq - 1)
        run.rows.append(blob)
        run.last_seq, run.intervention, run.nbytes = seq, run.intervention or intervention, run.nbytes + len(blob)
        if end_blob is not None or len(run.rows) >= self.chunk_steps or run.nbytes >= self.chunk_bytes:
            self._run = None
            if len(run.rows) > 1 and run.first_seq > self._read_hi:
                try:
                    fold(self._db, run, end_blob)
                except sqlite3.Error as exc:  # the step rows stay as they are: nothing lost, only not folded
                    log.warning("spool %s: cannot fold steps %d..%d into one row (%s)", self.path, run.first_seq,
                                run.last_seq, exc)

    def _record_misfit_locked(self, step: Step, episode_id: str, task: str, evaluation: bool, blob: bytes,
                              end_blob: bytes | None, reason: str) -> None:
        """A step that does not fit the schema: straight to the quarantine (its seq used, its gap declared by
        the streamer), kept as its ``fleet.v1.Step`` bytes for inspection."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(f"INSERT INTO steps ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (step.seq, episode_id, task, int(evaluation), int(step.is_intervention), blob, end_blob,
                              len(blob) + len(end_blob or b"")))
            self._quarantine_locked(step.seq, step.seq, "SCHEMA_MISMATCH", reason)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._next_seq += 1
        if self.quarantined_steps in (1, 10, 100) or self.quarantined_steps % 1000 == 0:
            log.error("spool %s: step seq %d does not fit the robot's schema (%s); quarantined (%d so far)",
                      self.path, step.seq, reason, self.quarantined_steps)

    def _drop_locked(self, need_bytes: int) -> None:
        """Free at least ``need_bytes`` (plus 1% headroom): oldest non-intervention steps first."""
        target = need_bytes + self.max_bytes // 100
        freed = dropped = 0
        self._run = None
        for where in ("intervention = 0", "1 = 1"):
            while freed < target:  # chunk rows holding operator steps are split into steps, as far as needed
                last, split = None, None
                for seq, nbytes, n, inter in self._db.execute(
                        f"SELECT seq, nbytes, n, intervention FROM steps WHERE {where} OR n > 1 ORDER BY seq"):
                    if freed >= target:
                        break
                    if n > 1 and inter and where == "intervention = 0":
                        split = seq
                        break
                    if not inter or where != "intervention = 0":
                        last, freed, dropped = seq, freed + nbytes, dropped + n
                if last is not None:
                    self._db.execute(f"DELETE FROM steps WHERE ({where}) AND seq <= ?", (last,))
                if split is None:
                    break
                expand(self._db, split)
        self._steps -= dropped
        self._bytes -= freed
        self._max_seq = self._db.execute("SELECT COALESCE(MAX(seq + n - 1), 0) FROM steps").fetchone()[0]
        self.dropped_steps += dropped
        self._set_meta_locked("dropped_steps", self.dropped_steps)
        log.warning("spool full (%d bytes max): dropped %d oldest steps (%d dropped in total)", self.max_bytes,
                    dropped, self.dropped_steps)

    # --- streamer thread -------------------------------------------------------------

    def ensure_after(self, seq: int) -> None:
        """Make the next assigned seq greater than ``seq`` (a spool recreated after disk loss)."""
        with self._lock:
            if self._next_seq > seq:
                return
            cur = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='steps'").fetchone()
            if cur is None:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('steps', ?)", (seq,))
            else:
                self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name='steps'", (seq,))
            self._next_seq = seq + 1
            log.warning("spool %s: sequence numbers continue after %d (the cloud has more than this spool)",
                        self.path, seq)

    def skip(self, n: int) -> None:
        """Leave the next ``n`` sequence numbers unused: steps dropped before they reached the spool (the
        recorder's full queue). The streamer declares the gap as it does for the spool's own drops."""
        with self._lock:
            self._next_seq += n
            self._run = None

    def read_after(self, seq: int, max_steps: int = 64, max_bytes: int = 4 * 1024 * 1024) -> SpoolBatch | None:
        """The next consecutive run of one episode's steps with seq > ``seq`` (None if none).

        The batch holds at least one step, and more only while it stays within ``max_steps`` and
        ``max_bytes`` (a chunk row larger than that is split first)."""
        with self._lock:
            split(self._db, seq + 1)
            query = ("SELECT seq, episode_id, task, evaluation, blob, end_blob, nbytes, n FROM steps WHERE seq > ? "
                     "ORDER BY seq LIMIT ?")
            head = query.replace("blob, end_blob", "NULL, NULL")  # the first row's place and size, not its blob
            first = self._db.execute(head, (seq, 1)).fetchone()
            if first is None:
                return None
            if first[7] > 1 and (first[7] > max_steps or first[6] > max_bytes):
                split(self._db, first[0] + max(1, min(max_steps, first[7] * max_bytes // max(1, first[6]))))
                first = self._db.execute(head, (seq, 1)).fetchone()
            parts, counts, end_blob, last, total, steps = [], [], None, first[0] - 1, 0, 0
            for row in self._db.execute(query, (seq, max_steps)):  # lazily: stops at the first row not taken
                if row[1] != first[1] or (parts and row[0] != last + 1) or (parts and total + row[6] > max_bytes) \
                        or (parts and steps + row[7] > max_steps):
                    break
                parts.append(row[4])
                counts.append(row[7])
                last, total, steps = row[0] + row[7] - 1, total + row[6], steps + row[7]
                if row[5] is not None:
                    end_blob = row[5]
                    break
            self._read_hi = max(self._read_hi, last)  # the streamer has these rows now: never fold them
        return SpoolBatch(episode_id=first[1], task=first[2], evaluation=bool(first[3]), first_seq=first[0],
                          last_seq=last, parts=parts, end_blob=end_blob, counts=counts)

    def ack(self, seq: int) -> None:
        """Delete everything up to and including ``seq``: the gateway has it durably."""
        with self._lock:
            split(self._db, seq + 1)
            row = self._db.execute("SELECT COALESCE(SUM(n), 0), COALESCE(SUM(nbytes), 0) FROM steps WHERE seq <= ?",
                                   (seq,)).fetchone()
            if row[0]:
                self._db.execute("DELETE FROM steps WHERE seq <= ?", (seq,))
                self._steps -= int(row[0])
                self._bytes -= int(row[1])
            self.changed.notify_all()

    def quarantine(self, first_seq: int, last_seq: int, code: str, reason: str) -> int:
        """Move steps ``first_seq..last_seq`` out of the send queue into the quarantine; returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._run = None
                split(self._db, first_seq)
                split(self._db, last_seq + 1)
                for (chunk,) in self._db.execute("SELECT seq FROM steps WHERE seq BETWEEN ? AND ? AND n > 1",
                                                 (first_seq, last_seq)).fetchall():
                    expand(self._db, chunk)
                moved, nbytes = self._quarantine_locked(first_seq, last_seq, code, reason)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._steps -= moved
            self._bytes -= nbytes
            self._max_seq = self._db.execute("SELECT COALESCE(MAX(seq + n - 1), 0) FROM steps").fetchone()[0]
            self.changed.notify_all()
        log.error("spool %s: quarantined %d steps (seq %d..%d) refused with %s: %s", self.path, moved, first_seq,
                  last_seq, code, reason)
        return moved

    def _quarantine_locked(self, first_seq: int, last_seq: int, code: str, reason: str) -> tuple[int, int]:
        """Move rows to the quarantine inside the caller's transaction; returns (steps, bytes) moved."""
        row = self._db.execute("SELECT COALESCE(SUM(n), 0), COALESCE(SUM(nbytes), 0) FROM steps "
                               "WHERE seq BETWEEN ? AND ?", (first_seq, last_seq)).fetchone()
        moved, nbytes = int(row[0]), int(row[1])
        self._db.execute(
            f"INSERT OR REPLACE INTO quarantine ({_COLUMNS}, code, reason, quarantined_s) "
            f"SELECT {_COLUMNS}, ?, ?, ? FROM steps WHERE seq BETWEEN ? AND ?",
            (code, reason[:2000], time.time(), first_seq, last_seq))
        self._db.execute("DELETE FROM steps WHERE seq BETWEEN ? AND ?", (first_seq, last_seq))
        self.quarantined_steps += moved
        self._set_meta_locked("quarantined_steps", self.quarantined_steps)
        self._trim_quarantine_locked()
        return moved, nbytes

    def _trim_quarantine_locked(self) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM quarantine").fetchone()[0]
        if total <= self.quarantine_max_bytes:
            return
        cut, freed = None, 0
        for seq, nbytes in self._db.execute("SELECT seq, nbytes FROM quarantine ORDER BY seq"):
            if total - freed <= self.quarantine_max_bytes:
                break
            cut, freed = seq, freed + nbytes
        if cut is not None:
            self._db.execute("DELETE FROM quarantine WHERE seq <= ?", (cut,))

    def quarantined(self) -> list[QuarantinedStep]:
        """The steps kept in quarantine, oldest first (for inspection)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, episode_id, code, reason, blob FROM quarantine ORDER BY seq").fetchall()
        return [QuarantinedStep(int(r[0]), r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def steps(self, batch: SpoolBatch) -> list[Step]:
        """A batch's rows back as Steps with their seqs (tests, tools; never on a hot path)."""
        if self._layout is None:
            raise ConfigError(f"spool {self.path}: open it with the robot's schema to decode its steps")
        return [self._layout.decode(row, seq=batch.first_seq + i) for i, row in enumerate(batch.step_blobs)]

    @property
    def layout(self) -> RowLayout | None:
        """The row format of this spool's steps (None until a schema is known)."""
        return self._layout

    def backlog(self) -> tuple[int, int]:
        """(steps, bytes) not yet acked."""
        return self._steps, self._bytes

    def wait_for_data_after(self, seq: int, timeout_s: float) -> bool:
        """Block until a step with seq > ``seq`` exists (or timeout)."""
        with self._lock:
            return self.changed.wait_for(lambda: self._steps > 0 and self._max_seq > seq, timeout_s)

    def last_seq(self) -> int:
        """Highest sequence number still in the spool (0 if empty)."""
        with self._lock:
            return self._max_seq if self._steps else 0

    def assigned_seq(self) -> int:
        """Highest sequence number ever given to a step by this spool (0 if none)."""
        with self._lock:
            return self._next_seq - 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _as_pb(step: Step) -> bytes:
    """A misfit step as ``fleet.v1.Step`` bytes for the quarantine (empty if even that fails)."""
    try:
        return encode_step(step)
    except Exception:  # whatever the robot put in the step, recording must not raise into the loop
        return b""
