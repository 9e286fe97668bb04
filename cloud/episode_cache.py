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
from google.protobuf.message import DecodeError

from fleet.codec import decode_image
from fleet.convert import decode_step
from fleet.errors import InvalidInput
from fleet.types import EncodedImage

log = logging.getLogger(__name__)


class UnusableEpisode(Exception):
    """A stored episode whose steps cannot be used (``reason``: a metric label); the sampler quarantines it."""

    def __init__(self, robot_id: str, episode_id: str, reason: str, detail: str):
        super().__init__(f"robot {robot_id!r} episode {episode_id!r}: {detail}")
        self.robot_id, self.episode_id, self.reason, self.detail = robot_id, episode_id, reason, detail


UNDECODABLE = (DecodeError, ValueError, KeyError, TypeError, IndexError, InvalidInput)
"""What decoding bytes a robot sent may raise (protobuf, tensor bytes that do not fit dtype x shape, ragged shapes)."""


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
        """Append decoded steps; raises one of ``UNDECODABLE`` (and keeps nothing of ``blobs``) if any step
        cannot be decoded or does not stack with the others."""
        steps = [decode_step(b) for b in blobs]
        if not steps:
            return
        actions = np.stack([np.asarray(s.action, dtype=np.float32) for s in steps])
        action = actions if not self.length else np.concatenate([self.action, actions])
        low_dim = {}
        names = set(self.low_dim) if self.length else set(steps[0].observation)
        for name in names:
            part = np.stack([np.asarray(s.observation[name]) for s in steps])
            low_dim[name] = part if not self.length else np.concatenate([self.low_dim[name], part])
        if any(set(s.observation) != names or set(s.images) != set(steps[0].images) for s in steps):
            raise ValueError("steps of one episode carry different observation features")
        self.action, self.low_dim = action, low_dim
        self.intervention = np.concatenate([self.intervention, np.array([s.is_intervention for s in steps], bool)])
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
                    try:
                        entry.extend(blobs)
                    except UNDECODABLE as exc:
                        self._bytes -= before
                        raise UnusableEpisode(*key, "corrupt_step",
                                             f"a stored step cannot be decoded ({exc!r})") from None
                    self._bytes += entry.nbytes - before
                    fresh[key] = entry
                    self._entries[key] = entry
            out = [self._entries.get((rid, eid)) or fresh[(rid, eid)] for rid, eid, _, _ in needs]
            for (rid, eid, _, _), entry in zip(needs, out):
                if entry.length == 0:
                    self._entries.pop((rid, eid), None)
                    raise UnusableEpisode(rid, eid, "missing_episode", "no stored steps (was the buffer flushed?)")
            self._evict()
            return out

    def _fetch_windows(self, needs: list[tuple[str, str, int, int]]) -> list[CachedEpisode]:
        pipe = self._redis.pipeline(transaction=False)
        for rid, eid, first, last in needs:
            pipe.lrange(RobotKeys(rid).episode(eid), first, last)
        out = []
        for (rid, eid, first, _), blobs in zip(needs, pipe.execute()):
            if not blobs:
                raise UnusableEpisode(rid, eid, "missing_episode", "no stored steps (was the buffer flushed?)")
            entry = CachedEpisode(offset=first)
            try:
                entry.extend(blobs)
            except UNDECODABLE as exc:
                raise UnusableEpisode(rid, eid, "corrupt_step", f"a stored step cannot be decoded ({exc!r})") from None
            out.append(entry)
        self.misses += len(needs)
        return out

    def forget(self, robot_id: str, episode_id: str) -> None:
        with self._lock:
            entry = self._entries.pop((robot_id, episode_id), None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def _grow(self, nbytes: int) -> None:
        self._bytes += nbytes  # a frame decoded by the sampling thread, the same thread that fetches

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
