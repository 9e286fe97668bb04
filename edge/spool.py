"""The on-disk spool: every recorded step is durable on the robot before it is sent.

SQLite in WAL mode, one row per step keyed by its per-robot sequence number
(``AUTOINCREMENT``, so a number is never reused, even after rows are deleted).
``synchronous=NORMAL`` (default) survives a crash or kill -9 of the edge process;
``FULL`` also survives power loss at the price of an fsync per step.

Acked rows are deleted. The spool is bounded by ``max_bytes``: when a new step
would exceed it, the oldest *non-intervention* steps are dropped first (operator
corrections are the scarcest data), then the oldest of any kind; the control
loop is never blocked. Dropped steps are counted, and the gap they leave in the
sequence is declared to the gateway (``gap_declared``) so it is not mistaken for
lost data.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from fleet.convert import encode_step, encode_summary
from fleet.types import EpisodeSummary, Schema, Step

log = logging.getLogger(__name__)

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    episode_id TEXT NOT NULL,
    task TEXT NOT NULL,
    evaluation INTEGER NOT NULL,
    intervention INTEGER NOT NULL,
    blob BLOB NOT NULL,
    end_blob BLOB,
    nbytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolBatch:
    """Consecutive spooled steps of one episode, ready to become a chunk."""

    episode_id: str
    task: str
    evaluation: bool
    first_seq: int
    last_seq: int
    step_blobs: list[bytes]
    end_blob: bytes | None


class Spool:
    """Durable FIFO of encoded steps. ``record`` from the control thread; the rest from the streamer."""

    def __init__(self, path: str | Path, schema: Schema | None = None, max_bytes: int = 512 * 1024 * 1024,
                 synchronous: str = "NORMAL"):
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes ({max_bytes}) must be > 0")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._schema = schema
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on record and ack
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA_SQL)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM steps").fetchone()
        self._steps, self._bytes = int(row[0]), int(row[1])
        self.dropped_steps = self._meta("dropped_steps")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    # --- control thread -------------------------------------------------------------

    def record(self, episode_id: str, task: str, evaluation: bool, step: Step,
               episode_end: EpisodeSummary | None) -> int:
        """Append a step durably; returns the sequence number it was given (StepSink)."""
        end_blob = encode_summary(episode_end) if episode_end is not None else None
        with self._lock:
            cur = self._db.execute("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name='steps'), 0)")
            step.seq = int(cur.fetchone()[0]) + 1
            blob = encode_step(step, self._schema)
            nbytes = len(blob) + (len(end_blob) if end_blob else 0)
            if self._bytes + nbytes > self.max_bytes:
                self._drop_locked(self._bytes + nbytes - self.max_bytes)
            self._db.execute(
                "INSERT INTO steps (seq, episode_id, task, evaluation, intervention, blob, end_blob, nbytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (step.seq, episode_id, task, int(evaluation), int(step.is_intervention), blob, end_blob, nbytes))
            self._steps += 1
            self._bytes += nbytes
            self.changed.notify_all()
            return step.seq

    def _drop_locked(self, need_bytes: int) -> None:
        """Free at least ``need_bytes`` (plus 10% headroom): non-intervention steps first."""
        target = need_bytes + self.max_bytes // 10
        freed = dropped = 0
        for only_autonomous in (True, False):
            where = "WHERE intervention = 0" if only_autonomous else ""
            rows = self._db.execute(f"SELECT seq, nbytes FROM steps {where} ORDER BY seq").fetchall()
            victims = []
            for seq, nbytes in rows:
                if freed >= target:
                    break
                victims.append((seq,))
                freed += nbytes
            if victims:
                self._db.executemany("DELETE FROM steps WHERE seq = ?", victims)
                dropped += len(victims)
            if freed >= target:
                break
        self._steps -= dropped
        self._bytes -= freed
        self.dropped_steps += dropped
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped_steps', ?)",
                         (self.dropped_steps,))
        log.warning("spool full (%d bytes max): dropped %d steps", self.max_bytes, dropped)

    # --- streamer thread -------------------------------------------------------------

    def ensure_after(self, seq: int) -> None:
        """Make the next assigned seq greater than ``seq`` (a spool recreated after disk loss)."""
        with self._lock:
            cur = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='steps'").fetchone()
            if cur is None:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('steps', ?)", (seq,))
            elif int(cur[0]) < seq:
                self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name='steps'", (seq,))

    def read_after(self, seq: int, max_steps: int = 64, max_bytes: int = 4 * 1024 * 1024) -> SpoolBatch | None:
        """The next consecutive run of one episode's steps with seq > ``seq`` (None if none)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, episode_id, task, evaluation, blob, end_blob, nbytes FROM steps WHERE seq > ? "
                "ORDER BY seq LIMIT ?", (seq, max_steps)).fetchall()
        if not rows:
            return None
        first = rows[0]
        blobs, end_blob, last, total = [], None, first[0], 0
        for row in rows:
            if row[1] != first[1] or (blobs and row[0] != last + 1) or (blobs and total + row[6] > max_bytes):
                break
            blobs.append(row[4])
            last, total = row[0], total + row[6]
            if row[5] is not None:
                end_blob = row[5]
                break
        return SpoolBatch(episode_id=first[1], task=first[2], evaluation=bool(first[3]), first_seq=first[0],
                          last_seq=last, step_blobs=blobs, end_blob=end_blob)

    def ack(self, seq: int) -> None:
        """Delete everything up to and including ``seq``: the gateway has it durably."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM steps WHERE seq <= ?",
                                   (seq,)).fetchone()
            if row[0]:
                self._db.execute("DELETE FROM steps WHERE seq <= ?", (seq,))
                self._steps -= int(row[0])
                self._bytes -= int(row[1])
            self.changed.notify_all()

    def backlog(self) -> tuple[int, int]:
        """(steps, bytes) not yet acked."""
        return self._steps, self._bytes

    def wait_for_data_after(self, seq: int, timeout_s: float) -> bool:
        """Block until a step with seq > ``seq`` exists (or timeout)."""
        with self._lock:
            return self.changed.wait_for(lambda: self._last_seq_locked() > seq, timeout_s)

    def last_seq(self) -> int:
        """Highest sequence number still in the spool (0 if empty)."""
        with self._lock:
            return self._last_seq_locked()

    def _last_seq_locked(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM steps").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
