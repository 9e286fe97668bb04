"""The spool's tables, and its chunk rows: ``n`` consecutive steps of one episode stored as one row
(same-size rows back to back), folded when recorded, split back wherever one step matters.

A chunk row has ``seq`` = its first step's seq and ``n`` > 1; every other column is what a step row
has (``intervention``: any of its steps; ``end_blob``: its last step's; ``nbytes``: the sum). Only
schemas without cameras are folded, so a row's steps are ``len(blob) // n`` bytes each and the last
byte of each is its flags (:mod:`fleet.rows`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

COLUMNS = "seq, episode_id, task, evaluation, intervention, blob, end_blob, nbytes"
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    episode_id TEXT NOT NULL,
    task TEXT NOT NULL,
    evaluation INTEGER NOT NULL,
    intervention INTEGER NOT NULL,
    blob BLOB NOT NULL,
    end_blob BLOB,
    nbytes INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    episode_id TEXT NOT NULL,
    task TEXT NOT NULL,
    evaluation INTEGER NOT NULL,
    intervention INTEGER NOT NULL,
    blob BLOB NOT NULL,
    end_blob BLOB,
    nbytes INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class Run:
    """Step rows of one episode recorded one after another, not read by the streamer yet."""

    episode_id: str
    first_seq: int
    last_seq: int
    rows: list[bytes] = field(default_factory=list)
    intervention: bool = False
    nbytes: int = 0


def fold(db: sqlite3.Connection, run: Run, end_blob: bytes | None) -> bool:
    """Replace the run's step rows by one chunk row, in one transaction; False (the rows left as they are)
    if any of them changed meanwhile: acked, dropped or quarantined. sqlite3.Error: nothing changed."""
    db.execute("BEGIN IMMEDIATE")
    try:
        head = db.execute("SELECT task, evaluation FROM steps WHERE seq = ?", (run.first_seq,)).fetchone()
        cur = db.execute("DELETE FROM steps WHERE seq BETWEEN ? AND ? AND n = 1", (run.first_seq, run.last_seq))
        if head is None or cur.rowcount != len(run.rows):
            db.execute("ROLLBACK")
            return False
        db.execute(f"INSERT INTO steps ({COLUMNS}, n) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (run.first_seq, run.episode_id, head[0], head[1], int(run.intervention), b"".join(run.rows),
                    end_blob, run.nbytes + len(end_blob or b""), len(run.rows)))
        db.execute("COMMIT")
        return True
    except BaseException:
        db.execute("ROLLBACK")
        raise


def split(db: sqlite3.Connection, at: int) -> None:
    """Make ``at`` the first seq of a row: split the chunk row that holds steps on both sides of it."""
    # The row's seq and size first: reading its blob (~100 kB for a chunk row) only when it must be split. Every
    # read and every ack asks, and almost always the row before ``at`` ends right before it.
    head = db.execute("SELECT seq, n FROM steps WHERE seq < ? ORDER BY seq DESC LIMIT 1", (at,)).fetchone()
    if head is None or head[0] + head[1] - 1 < at:
        return
    row = db.execute(f"SELECT {COLUMNS}, n FROM steps WHERE seq = ?", (head[0],)).fetchone()
    _rewrite(db, row, [at - row[0], row[0] + row[8] - at])


def expand(db: sqlite3.Connection, seq: int) -> None:
    """Turn the chunk row starting at ``seq`` back into one row per step."""
    row = db.execute(f"SELECT {COLUMNS}, n FROM steps WHERE seq = ?", (seq,)).fetchone()
    if row is not None and row[8] > 1:
        _rewrite(db, row, [1] * row[8])


def _rewrite(db: sqlite3.Connection, row: tuple, sizes: list[int]) -> None:
    """Replace a chunk row by rows of ``sizes`` steps each, in one transaction (the caller's, if it is in
    one). Each new row's intervention column comes from its steps' flags bytes."""
    seq, episode_id, task, evaluation, _, blob, end_blob, _, n = row
    size = len(blob) // n
    outer = db.in_transaction
    if not outer:
        db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM steps WHERE seq = ?", (seq,))
        first = 0
        for k in sizes:
            part = blob[first * size:(first + k) * size]
            flags = part[size - 1::size]  # a row's last byte is its flags (fleet/rows.py), bit 0 intervention
            end = end_blob if first + k == n else None
            db.execute(f"INSERT INTO steps ({COLUMNS}, n) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (seq + first, episode_id, task, evaluation, int(any(f & 1 for f in flags)), part, end,
                        len(part) + len(end or b""), k))
            first += k
        if not outer:
            db.execute("COMMIT")
    except BaseException:
        if not outer:
            db.execute("ROLLBACK")
        raise
