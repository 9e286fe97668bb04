"""Episodes in RAM as columns, fetched from the buffer on first use (the sampler's read path).

An episode in the buffer is an append-only list of chunk elements (``cloud/buffer/layout.py``), so
a cached prefix never goes stale: an entry is topped up with one LRANGE from the first chunk it
lacks when a window reaches past it. Each entry keeps one preallocated array per feature (grown by
doubling), so windows are gathered with numpy indexing, never per step. Entries are evicted oldest
first once ``max_bytes`` is exceeded (RLinf keeps such a RAM FIFO cache in front of its disk
buffer; SOP loads images only when sampled). Camera frames stay encoded (in the element, or fetched
from the blob store per chunk and camera when first needed) until a step is used; decoded frames
are kept too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from cloud.buffer.reader import BufferReader
from fleet.codec import decode_image
from fleet.columns import Element, decode_element
from fleet import errors
from fleet.errors import InvalidInput
from fleet.types import EncodedImage, Schema

log = logging.getLogger(__name__)

BlobNotFound = getattr(errors, "BlobNotFound", LookupError)  # fleet.errors gains it with cloud/blobstore.py


class UnusableEpisode(Exception):
    """A stored episode whose steps cannot be used (``reason``: a metric label); the sampler quarantines it."""

    def __init__(self, robot_id: str, episode_id: str, reason: str, detail: str):
        super().__init__(f"robot {robot_id!r} episode {episode_id!r}: {detail}")
        self.robot_id, self.episode_id, self.reason, self.detail = robot_id, episode_id, reason, detail


UNDECODABLE = (ValueError, KeyError, TypeError, IndexError, InvalidInput)
"""What decoding bytes a robot sent may raise (lengths that do not fit the schema, bad frames)."""


class _Column:
    """One feature of one episode: a preallocated array, grown by doubling."""

    def __init__(self, dtype, shape: tuple[int, ...]):
        self.data = np.empty((16, *shape), dtype)
        self.length = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.length + len(values)
        if need > len(self.data):
            grown = np.empty((max(need, 2 * len(self.data)), *self.data.shape[1:]), self.data.dtype)
            grown[:self.length] = self.data[:self.length]
            self.data = grown
        self.data[self.length:need] = values
        self.length = need

    @property
    def values(self) -> np.ndarray:
        return self.data[:self.length]


class CachedEpisode:
    """The decoded prefix of one stored episode, column by column."""

    def __init__(self, robot_id: str, episode_id: str, schema: Schema, reader: BufferReader | None = None,
                 on_grow=None) -> None:
        self.robot_id, self.episode_id, self.schema = robot_id, episode_id, schema
        self._reader = reader
        self._on_grow = on_grow
        self.offset = 0
        """Episode index of the first decoded step (always 0: entries hold a prefix)."""
        self.length = 0
        self.chunks = 0
        self._action = _Column(np.float32, schema.action.shape)
        self._intervention = _Column(bool, ())
        self._low = {f.name: _Column(np.float32, f.shape) for f in schema.observation if not f.is_image}
        self.cameras = [f.name for f in schema.observation if f.is_image]
        self._elements: list[Element] = []
        self._starts: list[int] = []
        self._decoded: dict[tuple[int, str], np.ndarray] = {}
        self.nbytes = 0

    @property
    def action(self) -> np.ndarray:
        return self._action.values

    @property
    def intervention(self) -> np.ndarray:
        return self._intervention.values

    @property
    def low_dim(self) -> dict[str, np.ndarray]:
        return {name: col.values for name, col in self._low.items()}

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
        for element in elements:
            cols = element.columns
            self._action.extend(cols.action)
            self._intervention.extend(cols.intervention)
            for name, col in self._low.items():
                col.extend(cols.observation[name])
            self._starts.append(element.first_index)
            self._elements.append(element)
            self.nbytes += element.nbytes + cols.n * 4 * (self._action.data[0].size
                                                           + sum(c.data[0].size for c in self._low.values()))
        self.length = expect
        self.chunks += len(elements)

    @property
    def end(self) -> int:
        """Episode index one past the last decoded step."""
        return self.offset + self.length

    def observation(self, t: int) -> dict[str, np.ndarray]:
        """Step ``t``'s observation: low-dim features and decoded camera frames (uint8 (H, W, C))."""
        return {**{name: col.values[t] for name, col in self._low.items()}, **self.images_at(t)}

    def images_at(self, t: int) -> dict[str, np.ndarray]:
        """Step ``t``'s decoded camera frames (kept once decoded)."""
        out = {}
        for name in self.cameras:
            frame = self._decoded.get((t, name))
            if frame is None:
                frame = self._decode(t, name)
                self._decoded[(t, name)] = frame
                self.nbytes += frame.nbytes
                if self._on_grow is not None:
                    self._on_grow(frame.nbytes)
            out[name] = frame
        return out

    def encoded_frame(self, t: int, camera: str) -> EncodedImage:
        k = int(np.searchsorted(self._starts, t, side="right")) - 1
        element = self._elements[k]
        cols = element.columns
        if camera not in cols.frames:
            if self._reader is None:
                raise InvalidInput("frames in the blob store but no reader for it")
            cols.frames[camera] = self._reader.frames(self.robot_id, self.episode_id, element, camera)
            self.nbytes += sum(len(f) for f in cols.frames[camera])
        spec = self.schema.observation_spec(camera)
        return EncodedImage(cols.encodings.get(camera, "jpeg"), spec.shape[0], spec.shape[1], spec.shape[2],
                            cols.frames[camera][t - element.first_index])

    def _decode(self, t: int, camera: str) -> np.ndarray:
        try:
            return decode_image(self.encoded_frame(t, camera), f"step {t} image {camera!r}")
        except BlobNotFound as exc:
            raise InvalidInput(f"the frames of step {t} camera {camera!r} are missing ({exc})") from None


class EpisodeCache:
    """``fetch`` returns decoded episodes covering the requested step indices (as far as they exist)."""

    def __init__(self, redis, max_bytes: int, schema: Callable[[], Schema | None], blobs=None):
        self._reader = BufferReader(redis, blobs)
        self._schema = schema
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], CachedEpisode] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def fetch(self, needs: list[tuple[str, str, int, int]]) -> list[CachedEpisode]:
        """For each (robot_id, episode_id, first, last step index needed) the episode's decoded steps: the
        cached prefix, topped up from Redis (``max_bytes`` 0: nothing is kept between calls)."""
        schema = self._schema()
        with self._lock:
            wanted: dict[tuple[str, str], int] = {}
            for rid, eid, _, last in needs:
                key = (rid, eid)
                entry = self._entries.get(key)
                if entry is None or entry.length <= last:
                    wanted[key] = max(wanted.get(key, -1), last)
            self.misses += len(wanted)
            self.hits += len(needs) - len(wanted)
            fresh: dict[tuple[str, str], CachedEpisode] = {}
            if wanted:
                pipe = self._reader.redis.pipeline(transaction=False)
                for rid, eid in wanted:
                    entry = self._entries.get((rid, eid))
                    self._reader.queue_elements(pipe, rid, eid, entry.chunks if entry else 0)
                for key, raws in zip(wanted, pipe.execute()):
                    entry = self._entries.pop(key, None) or CachedEpisode(*key, schema, self._reader, self._grow)
                    before = entry.nbytes
                    try:
                        entry.extend(raws)
                    except UNDECODABLE as exc:
                        self._bytes -= before
                        raise UnusableEpisode(*key, "corrupt_step",
                                              f"a stored chunk cannot be decoded ({exc})") from None
                    self._bytes += entry.nbytes - before
                    fresh[key] = entry
                    self._entries[key] = entry
            out = [self._entries.get((rid, eid)) or fresh[(rid, eid)] for rid, eid, _, _ in needs]
            for (rid, eid, _, _), entry in zip(needs, out):
                if entry.length == 0:
                    self._entries.pop((rid, eid), None)
                    raise UnusableEpisode(rid, eid, "missing_episode", "no stored steps (evicted, or the buffer "
                                                                       "was flushed)")
            self._evict()
            return out

    def forget(self, robot_id: str, episode_id: str) -> None:
        with self._lock:
            entry = self._entries.pop((robot_id, episode_id), None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def _grow(self, nbytes: int) -> None:
        self._bytes += nbytes  # a frame decoded by the sampling thread, the same thread that fetches

    def _evict(self) -> None:
        limit = self.max_bytes
        while self._bytes > limit and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
