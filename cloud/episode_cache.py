"""Decoded episodes in RAM, fetched from Redis on first use (the sampler's read path).

Episodes in the buffer are append-only lists of ``fleet.v1.Step`` bytes, so a
decoded prefix never goes stale: an entry is topped up with one LRANGE from the
first step it lacks when a window reaches past it. Entries are evicted oldest
first once ``max_bytes`` is exceeded (RLinf keeps such a RAM FIFO cache in front
of its disk buffer; SOP loads images only when sampled). Images stay encoded
until a step is used as an observation, then the decoded frame is kept too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from cloud.buffer import RobotKeys
from fleet.codec import decode_image
from fleet.convert import decode_step
from fleet.types import EncodedImage

log = logging.getLogger(__name__)


class CachedEpisode:
    """The decoded prefix of one stored episode."""

    def __init__(self, on_grow=None, offset: int = 0) -> None:
        self._on_grow = on_grow
        self.offset = offset
        """Episode index of the first decoded step (0 for cached entries, which always hold a prefix)."""
        self.length = 0
        self.action = np.zeros((0, 0), dtype=np.float32)
        self.intervention = np.zeros((0,), dtype=bool)
        self.low_dim: dict[str, np.ndarray] = {}
        self.images: list[dict[str, EncodedImage]] = []
        self._decoded: dict[tuple[int, str], np.ndarray] = {}
        self.nbytes = 0

    def extend(self, blobs: list[bytes]) -> None:
        steps = [decode_step(b) for b in blobs]
        if not steps:
            return
        actions = np.stack([np.asarray(s.action, dtype=np.float32) for s in steps])
        self.action = actions if not self.length else np.concatenate([self.action, actions])
        flags = np.array([s.is_intervention for s in steps], dtype=bool)
        self.intervention = np.concatenate([self.intervention, flags])
        for name in steps[0].observation:
            part = np.stack([np.asarray(s.observation[name]) for s in steps])
            self.low_dim[name] = part if not self.length else np.concatenate([self.low_dim[name], part])
        self.images.extend(s.images for s in steps)
        self.length += len(steps)
        self.nbytes += sum(len(b) for b in blobs) + actions.nbytes

    @property
    def end(self) -> int:
        """Episode index one past the last decoded step."""
        return self.offset + self.length

    def observation(self, t: int) -> dict[str, np.ndarray]:
        """Step ``t``'s observation (``t`` relative to ``offset``): low-dim features and decoded camera
        frames (uint8 (H, W, C))."""
        return {**{name: values[t] for name, values in self.low_dim.items()}, **self.images_at(t)}

    def images_at(self, t: int) -> dict[str, np.ndarray]:
        """Step ``t``'s decoded camera frames (kept once decoded)."""
        out = {}
        for name, image in self.images[t].items():
            frame = self._decoded.get((t, name))
            if frame is None:
                frame = decode_image(image, f"step {t} image {name!r}")
                self._decoded[(t, name)] = frame
                self.nbytes += frame.nbytes
                if self._on_grow is not None:
                    self._on_grow(frame.nbytes)
            out[name] = frame
        return out


class EpisodeCache:
    """``fetch`` returns decoded episodes covering the requested step indices (as far as they exist)."""

    def __init__(self, redis, max_bytes: int):
        self._redis = redis
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
        cached prefix, topped up from Redis; with ``max_bytes`` 0, just the window [first, last]."""
        if self.max_bytes == 0:
            return self._fetch_windows(needs)
        with self._lock:
            wanted: dict[tuple[str, str], int] = {}
            for rid, eid, _, last in needs:
                key = (rid, eid)
                entry = self._entries.get(key)
                if entry is None or entry.length <= last:
                    wanted[key] = max(wanted.get(key, -1), last)
            self.misses += len(wanted)
            self.hits += len(needs) - len(wanted)
            if wanted:
                pipe = self._redis.pipeline(transaction=False)
                for rid, eid in wanted:
                    have = self._entries[(rid, eid)].length if (rid, eid) in self._entries else 0
                    pipe.lrange(RobotKeys(rid).episode(eid), have, -1)
                fresh = {}
                for key, blobs in zip(wanted, pipe.execute()):
                    entry = self._entries.pop(key, None) or fresh.get(key) or CachedEpisode(self._grow)
                    before = entry.nbytes
                    entry.extend(blobs)
                    self._bytes += entry.nbytes - before
                    fresh[key] = entry
                    self._entries[key] = entry
            out = [self._entries.get((rid, eid)) or fresh[(rid, eid)] for rid, eid, _, _ in needs]
            for entry in out:
                if entry.length == 0:
                    raise LookupError("a sampled episode has no stored steps (was the buffer flushed?)")
            self._evict()
            return out

    def _fetch_windows(self, needs: list[tuple[str, str, int, int]]) -> list[CachedEpisode]:
        pipe = self._redis.pipeline(transaction=False)
        for rid, eid, first, last in needs:
            pipe.lrange(RobotKeys(rid).episode(eid), first, last)
        out = []
        for (_, _, first, _), blobs in zip(needs, pipe.execute()):
            if not blobs:
                raise LookupError("a sampled episode has no stored steps (was the buffer flushed?)")
            entry = CachedEpisode(offset=first)
            entry.extend(blobs)
            out.append(entry)
        self.misses += len(needs)
        return out

    def _grow(self, nbytes: int) -> None:
        self._bytes += nbytes  # a frame decoded by the sampling thread, the same thread that fetches

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
