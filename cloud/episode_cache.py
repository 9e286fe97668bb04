"""Episodes in RAM as columns, fetched from the buffer on first use (the sampler's read path).

An episode in the buffer is an append-only list of chunk elements (``cloud/buffer/layout.py``), so
a cached prefix never goes stale: an entry is topped up with one LRANGE from the first chunk it
lacks when a window reaches past it. Each entry keeps one preallocated array per feature (grown by
doubling), so windows are gathered with numpy indexing, never per step. Entries are evicted oldest
first once ``max_bytes`` is exceeded (RLinf keeps such a RAM FIFO cache in front of its disk
buffer; SOP loads images only when sampled).

Camera frames are decoded once, when an episode enters the cache or is topped up, by the sampler's
GIL-free decode pool into a :class:`~cloud.frames.FrameArena`: one uint8 ``[rows, H, W, C]``
array per camera, bounded by ``frame_bytes`` (the sampler's ``frame_cache_bytes``), so a batch's
frames are one fancy index like the low-dim columns. When the frames do not fit, the oldest
entries' frames are dropped first (FIFO); an entry without arena rows keeps its encoded frames (in
the element, or fetched from the blob store per chunk and camera) and the sampler decodes the
sampled ones into each batch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from cloud.buffer.reader import BufferReader
from cloud.frames import CorruptFrames, FrameArena, FrameDecoder
from fleet.columns import Element, decode_element
from fleet.errors import BlobNotFound, InvalidInput
from fleet.types import EncodedImage, Schema

log = logging.getLogger(__name__)


class UnusableEpisode(Exception):
    """A stored episode whose steps cannot be used (``reason``: a metric label); the sampler quarantines it."""

    def __init__(self, robot_id: str, episode_id: str, reason: str, detail: str):
        super().__init__(f"robot {robot_id!r} episode {episode_id!r}: {detail}")
        self.robot_id, self.episode_id, self.reason, self.detail = robot_id, episode_id, reason, detail


UNDECODABLE = (ValueError, KeyError, TypeError, IndexError, InvalidInput)
"""What decoding bytes a robot sent may raise (lengths that do not fit the schema, bad frames)."""


class Arena:
    """The low-dim columns of every cached episode in one set of preallocated arrays (grown by doubling), so
    a batch of windows from many episodes is one fancy index (``flat`` rows), not a loop over episodes.
    An episode owns a reserved run of rows; one that outgrows it moves to the end; freed rows are reclaimed
    by compaction."""

    def __init__(self, schema: Schema, rows: int = 4096):
        self.action = np.zeros((rows, *schema.action.shape), np.float32)
        self.intervention = np.zeros((rows,), bool)
        self.low = {f.name: np.zeros((rows, *f.shape), np.float32) for f in schema.observation if not f.is_image}
        self.used = 0
        self.garbage = 0
        self.row_bytes = self.action[0].nbytes + 1 + sum(v[0].nbytes for v in self.low.values())

    def _arrays(self) -> list[np.ndarray]:
        return [self.action, self.intervention, *self.low.values()]

    def _resize(self, rows: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, *a.shape[1:]), a.dtype)
            out[:self.used] = a[:self.used]
            return out

        self.action, self.intervention = grown(self.action), grown(self.intervention)
        self.low = {k: grown(v) for k, v in self.low.items()}

    def alloc(self, rows: int) -> int:
        if self.used + rows > len(self.action):
            self._resize(max(2 * len(self.action), self.used + rows))
        base, self.used = self.used, self.used + rows
        return base

    def move(self, src: int, dst: int, rows: int) -> None:
        for a in self._arrays():
            a[dst:dst + rows] = a[src:src + rows]

    def compact(self, entries) -> None:
        """Pack the live entries' rows to the front (bases change: call with no batch being gathered)."""
        pos = 0
        for entry in sorted(entries, key=lambda e: e.base):
            if entry.base != pos:
                self.move(entry.base, pos, entry.length)
            entry.base, entry.reserved = pos, entry.length
            pos += entry.length
        self.used, self.garbage = pos, 0


BASE, LENGTH, FRAME_BASE, FRAMES_READY = range(4)


class EpisodeTable:
    """Where each cached episode's rows are, one int64 row per episode number (the caller's numbering): arena
    base, steps cached (0: not cached), frame arena base (-1: none), frames decoded. The entries read and
    write their fields here, so a batch's picks are located with one fancy index."""

    def __init__(self, rows: int = 1024):
        self.rows = np.zeros((rows, 4), np.int64)
        self.rows[:, FRAME_BASE] = -1

    def slot(self, number: int) -> int:
        if number >= len(self.rows):
            grown = np.zeros((max(2 * len(self.rows), number + 1), 4), np.int64)
            grown[:, FRAME_BASE] = -1
            grown[:len(self.rows)] = self.rows
            self.rows = grown
        return number

    def clear(self, number: int) -> None:
        self.rows[number] = (0, 0, -1, 0)


def _column(k: int, doc: str) -> property:
    def get(self) -> int:
        return int(self._table.rows[self._slot, k])

    def set(self, value: int) -> None:
        self._table.rows[self._slot, k] = value

    return property(get, set, doc=doc)


class CachedEpisode:
    """The decoded prefix of one stored episode, column by column."""

    base = _column(BASE, "Arena row of step 0.")
    length = _column(LENGTH, "Steps decoded.")
    frame_base = _column(FRAME_BASE, "FrameArena row of step 0's frames (-1: none in the arena; the sampler "
                                     "decodes sampled frames).")
    frames_ready = _column(FRAMES_READY, "Steps ``[0, frames_ready)`` have their decoded frames in the arena.")

    def __init__(self, robot_id: str, episode_id: str, schema: Schema, arena: Arena,
                 reader: BufferReader | None = None, on_grow: Callable[[int], None] | None = None,
                 table: EpisodeTable | None = None, number: int = 0) -> None:
        self.robot_id, self.episode_id, self.schema = robot_id, episode_id, schema
        self.arena = arena
        self._table = table or EpisodeTable(1)
        self._slot = self._table.slot(number)
        self.number = number
        self._reader = reader
        self._on_grow = on_grow
        """Told the bytes of frames fetched from the blob store (the cache's total)."""
        self.offset = 0
        """Episode index of the first decoded step (always 0: entries hold a prefix)."""
        self.length = 0
        self.chunks = 0
        self.base = 0
        self.reserved = 0
        """Arena rows this episode owns (>= length)."""
        self.cameras = [f.name for f in schema.observation if f.is_image]
        self._elements: list[Element] = []
        self._starts: list[int] = []
        self.nbytes = 0
        self.frame_base = -1
        self.frame_rows = 0
        """FrameArena rows this episode owns (>= frames_ready)."""
        self.frames_ready = 0
        self.frames_left = False
        """The frames left the arena for lack of room (FIFO): the sampler decodes sampled ones."""

    @property
    def action(self) -> np.ndarray:
        return self.arena.action[self.base:self.base + self.length]

    @property
    def intervention(self) -> np.ndarray:
        return self.arena.intervention[self.base:self.base + self.length]

    @property
    def low_dim(self) -> dict[str, np.ndarray]:
        return {name: v[self.base:self.base + self.length] for name, v in self.arena.low.items()}

    def extend(self, raws: list[bytes]) -> None:
        """Append chunk elements; raises one of ``UNDECODABLE`` (and keeps nothing of ``raws``) if one cannot
        be decoded against the schema or does not continue the episode."""
        what = f"robot {self.robot_id!r} episode {self.episode_id!r}"
        elements = [decode_element(raw, self.schema, f"{what} chunk {self.chunks + i}") for i, raw in enumerate(raws)]
        expect = self.length
        for element in elements:
            if element.first_index != expect:
                raise ValueError(f"{what}: a chunk starts at step {element.first_index}, expected {expect}")
            expect += element.columns.n
        arena = self.arena
        if expect > self.reserved:  # outgrown: move to a larger run at the arena's end
            reserved = max(expect, 2 * self.reserved, 64)
            base = arena.alloc(reserved)
            arena.move(self.base, base, self.length)
            arena.garbage += self.reserved
            self.nbytes += (reserved - self.reserved) * arena.row_bytes
            self.base, self.reserved = base, reserved
        row = self.base + self.length
        for element in elements:
            cols = element.columns
            end = row + cols.n
            arena.action[row:end] = cols.action
            arena.intervention[row:end] = cols.intervention
            for name, values in arena.low.items():
                values[row:end] = cols.observation[name]
            row = end
            self._starts.append(element.first_index)
            element.columns.observation, element.columns.action = {}, element.columns.action[:0]  # kept in the arena
            self._elements.append(element)
            self.nbytes += element.nbytes
        self.length = expect
        self.chunks += len(elements)

    @property
    def end(self) -> int:
        """Episode index one past the last decoded step."""
        return self.offset + self.length

    def encoded_frames(self, camera: str, first: int, end: int) -> list[bytes]:
        """The encoded frames of steps ``[first, end)`` of ``camera`` (BlobNotFound, InvalidInput)."""
        out: list[bytes] = []
        k = int(np.searchsorted(self._starts, first, side="right")) - 1
        while first < end:
            element = self._elements[k]
            stop = min(end, element.first_index + element.columns.n)
            frames = self._frames_of(element, camera)
            out.extend(frames[first - element.first_index:stop - element.first_index])
            first, k = stop, k + 1
        return out

    def _frames_of(self, element: Element, camera: str) -> list[bytes]:
        cols = element.columns
        if camera not in cols.frames:
            if self._reader is None:
                raise InvalidInput("frames in the blob store but no reader for it")
            cols.frames[camera] = self._reader.frames(self.robot_id, self.episode_id, element, camera)
            grown = sum(len(f) for f in cols.frames[camera])
            self.nbytes += grown
            if self._on_grow is not None:
                self._on_grow(grown)
        return cols.frames[camera]

    def encoded_frame(self, t: int, camera: str) -> EncodedImage:
        k = int(np.searchsorted(self._starts, t, side="right")) - 1
        element = self._elements[k]
        spec = self.schema.observation_spec(camera)
        return EncodedImage(element.columns.encodings.get(camera, "jpeg"), spec.shape[0], spec.shape[1],
                            spec.shape[2], self._frames_of(element, camera)[t - element.first_index])


class EpisodeCache:
    """``fetch`` returns decoded episodes covering the requested step indices (as far as they exist)."""

    def __init__(self, redis, max_bytes: int, schema: Callable[[], Schema | None], blobs=None,
                 frame_bytes: int = 0, decoder: FrameDecoder | None = None):
        self._reader = BufferReader(redis, blobs)
        self._schema = schema
        self.arena: Arena | None = None
        self.frames: FrameArena | None = None
        """Decoded camera frames (None: no decoder, or no cameras in the schema)."""
        self.max_bytes = max_bytes
        self.frame_bytes = frame_bytes if max_bytes else 0  # nothing kept between calls: decode what is sampled
        self._decoder = decoder
        self._entries: OrderedDict[tuple[str, str], CachedEpisode] = OrderedDict()
        self._bytes = 0
        self.table = EpisodeTable()
        """Where each cached episode's rows are, by the caller's episode number."""
        self.lock = threading.RLock()
        """Held by the sampler from ``fetch`` to the end of its gather (arena rows do not move meanwhile)."""
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def locate(self, numbers: np.ndarray, lasts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each episode number's ``EpisodeTable`` row ([n, 4]: arena base, steps cached, frame base, frames
        decoded) and whether step ``lasts`` is past what is cached (``fetch`` those; the others count as hits)."""
        rows = self.table.rows[numbers]
        missing = rows[:, LENGTH] <= lasts
        self.hits += len(missing) - int(missing.sum())
        return rows, missing

    def fetch(self, needs: list[tuple[int, str, str, int]]) -> None:
        """Cache (number, robot_id, episode_id, last step index needed) of each episode: its cached prefix
        topped up from Redis as far as it exists (``max_bytes`` 0: nothing is kept between calls)."""
        schema = self._schema()
        with self.lock:
            if self.arena is None:
                self.arena = Arena(schema)
                if self._decoder is not None and any(f.is_image for f in schema.observation):
                    self.frames = FrameArena(schema, self.frame_bytes)
            wanted: dict[tuple[str, str], tuple[int, int]] = {}
            for number, rid, eid, last in needs:
                key = (rid, eid)
                entry = self._entries.get(key)
                if entry is None or entry.length <= last:
                    wanted[key] = (number, max(wanted.get(key, (0, -1))[1], last))
            self.misses += len(wanted)
            if not wanted:
                return
            pipe = self._reader.redis.pipeline(transaction=False)
            for rid, eid in wanted:
                entry = self._entries.get((rid, eid))
                self._reader.queue_elements(pipe, rid, eid, entry.chunks if entry else 0)
            for (key, (number, _)), raws in zip(wanted.items(), pipe.execute()):
                entry = self._entries.pop(key, None) or CachedEpisode(*key, schema, self.arena, self._reader,
                                                                         self._grow, self.table, number)
                try:
                    before = entry.nbytes
                    entry.extend(raws)
                except UNDECODABLE as exc:
                    self._drop(entry)  # (extend kept nothing of raws)
                    raise UnusableEpisode(*key, "corrupt_step",
                                          f"a stored chunk cannot be decoded ({exc})") from None
                self._bytes += entry.nbytes - before
                if entry.length == 0:
                    self.table.clear(entry.number)
                    raise UnusableEpisode(*key, "missing_episode", "no stored steps (evicted, or the buffer "
                                                                   "was flushed)")
                self._entries[key] = entry
                self._decode_frames(entry)

    def entry(self, robot_id: str, episode_id: str) -> CachedEpisode:
        """A cached episode (after ``fetch``, under ``lock``)."""
        return self._entries[(robot_id, episode_id)]

    def forget(self, robot_id: str, episode_id: str) -> None:
        with self.lock:
            entry = self._entries.pop((robot_id, episode_id), None)
            if entry is not None:
                self._drop(entry)

    def _grow(self, nbytes: int) -> None:
        self._bytes += nbytes  # frames fetched under the lock (a fetch, or a gather's decode-on-sample)

    def _drop(self, entry: CachedEpisode) -> None:
        self._bytes -= entry.nbytes
        self.arena.garbage += entry.reserved
        self._drop_frames(entry)
        self.table.clear(entry.number)

    def _drop_frames(self, entry: CachedEpisode) -> None:
        if entry.frame_base >= 0:
            self.frames.garbage += entry.frame_rows
        entry.frame_base, entry.frame_rows, entry.frames_ready, entry.frames_left = -1, 0, 0, True

    def _frame_rows(self, entry: CachedEpisode, rows: int) -> int | None:
        """``rows`` arena rows for ``entry``'s frames: after compaction, then dropping the oldest entries'
        frames (FIFO) if need be; None if they cannot fit at all."""
        frames = self.frames
        if rows > frames.max_rows:
            return None
        base = frames.alloc(rows)
        older = (e for e in self._entries.values() if e is not entry and e.frame_base >= 0)
        while base is None:
            if frames.garbage:
                frames.compact(self._entries.values())
            else:
                victim = next(older, None)
                if victim is None:
                    return None
                self._drop_frames(victim)
            base = frames.alloc(rows)
        return base

    def _decode_frames(self, entry: CachedEpisode) -> None:
        """Decode the entry's new frames into the frame arena (its frames leave the arena if they do not
        fit: the sampler then decodes sampled ones); UnusableEpisode if a frame cannot be read."""
        frames = self.frames
        if frames is None or entry.frames_ready == entry.length:
            return
        if entry.frames_left:
            return  # its frames left the arena for lack of room: decoded when sampled from now on
        if entry.frame_base < 0:  # a new entry: exactly its steps
            rows, base = entry.length, self._frame_rows(entry, entry.length)
        else:  # topped up past its run: a larger one (its decoded frames move along)
            rows = max(entry.length, 2 * entry.frame_rows)
            base = self._frame_rows(entry, rows) if entry.length > entry.frame_rows else entry.frame_base
        if base is None:
            self._drop_frames(entry)
            return
        if base != entry.frame_base:
            if entry.frame_base >= 0:
                for a in frames.frames.values():
                    a[base:base + entry.frames_ready] = a[entry.frame_base:entry.frame_base + entry.frames_ready]
                frames.garbage += entry.frame_rows
            entry.frame_base, entry.frame_rows = base, rows
        first, end = entry.frames_ready, entry.length
        rows = slice(entry.frame_base + first, entry.frame_base + end)
        for camera, arena in frames.frames.items():
            try:
                self._decoder.decode_into(entry.encoded_frames(camera, first, end), arena[rows])
            except CorruptFrames as exc:
                bad = exc.errors[0]
                detail = f"camera {camera!r} step {first + bad.index}: {bad.detail}"
            except UNDECODABLE + (BlobNotFound,) as exc:
                detail = f"camera {camera!r} frames cannot be read ({exc!r})"
            else:
                continue
            self._entries.pop((entry.robot_id, entry.episode_id), None)
            self._drop(entry)
            raise UnusableEpisode(entry.robot_id, entry.episode_id, "corrupt_image", detail)
        entry.frames_ready = end

    def trim(self) -> None:
        """Evict the oldest entries beyond ``max_bytes`` and reclaim arena rows (call after a batch's gather)."""
        with self.lock:
            while self._bytes > self.max_bytes and self._entries:
                _, entry = self._entries.popitem(last=False)
                self._drop(entry)
            arena = self.arena
            if arena is not None and arena.garbage > max(arena.used // 2, 1 << 16):
                arena.compact(self._entries.values())
            frames = self.frames
            if frames is not None and frames.garbage > frames.used // 2:
                frames.compact(self._entries.values())
