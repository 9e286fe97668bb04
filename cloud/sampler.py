"""Draw training batches from the Redis buffer (SOP's sampler).

The index (:class:`~cloud.buffer_index.BufferIndex`) mirrors what the buffer
holds that the algorithm's :class:`~cloud.buffer_index.DataSpec` trains on.

Sampling (SOP): every task of the trainer's with data gets equal weight; within a
task, a sample is online with probability ``p_on`` and offline otherwise; within
that pool every robot is equally likely, then uniform over its steps. ``p_on`` is fixed, or
adaptive: p_on = exp(a*l_on) / (exp(a*l_on) + exp(l_off)) over the mean
per-sample training losses of the last ``window_steps`` updates on that task's
online and offline samples, clipped to [min, max] (SOP: a > 1, [0.2, 0.8]).

Windows ``[t, t+H)`` come from an :class:`~cloud.episode_cache.EpisodeCache`:
decoded steps kept in RAM (bounded, FIFO), fetched from Redis with pipelined
LRANGEs on first use; Redis stays the source of truth. Camera frames are decoded
once into the cache's frame arena (``frame_cache_bytes``) and gathered like the
low-dim columns; frames that do not fit are decoded when sampled. With CUDA, batch
arrays live in pinned host memory, so ``.to(device, non_blocking=True)`` is a DMA. A background thread
(:class:`Prefetcher`) keeps a few batches ready so the trainer never waits.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from cloud.buffer import SOURCE_OFFLINE, SOURCE_ONLINE
from cloud.buffer_index import BufferIndex, DataSpec, LabeledIndex, Position, Segment
from cloud.episode_cache import BASE, FRAME_BASE, FRAMES_READY, LENGTH, UNDECODABLE, EpisodeCache, UnusableEpisode
from cloud.frames import CorruptFrames, FrameDecoder
from fleet.errors import BlobNotFound, ConfigError
from fleet.worker import Worker

__all__ = ["BufferIndex", "DataSpec", "LabeledIndex", "Position", "Prefetcher", "Sampler", "SamplerConfig",
           "Segment"]

log = logging.getLogger(__name__)

MAX_REDRAWS = 16
"""Batches drawn again in a row, each after quarantining an unusable episode, before LookupError."""


@dataclass(frozen=True)
class SamplerConfig:
    """How batches are mixed from online and offline data."""

    adaptive: bool = True
    """SOP's adaptive online share from recent losses (False: the fixed online_fraction)."""
    alpha: float = 2.0
    """Temperature a > 1 on the online loss in p_on = exp(a*l_on) / (exp(a*l_on) + exp(l_off))."""
    window_steps: int = 200
    """Updates over which the mean online/offline losses are taken (SOP: 200)."""
    min_online_fraction: float = 0.2
    """Lower clip of the adaptive online share (SOP: 0.2)."""
    max_online_fraction: float = 0.8
    """Upper clip of the adaptive online share (SOP: 0.8)."""
    prefetch_depth: int = 4
    """Batches kept ready by the background loader."""
    cache_bytes: int = 1 << 30
    """RAM for cached episodes (FIFO): low-dim columns and encoded frames; Redis stays the source of truth."""
    frame_cache_bytes: int = 4 << 30
    """RAM for cached episodes' decoded camera frames (FIFO; 150,528 B per 224x224 RGB camera and step: 4 GiB
    holds ~28k steps of one camera, ~9.5k of three); frames past it are decoded when sampled (0: always)."""
    pin_memory: bool = True
    """Batch arrays in pinned host memory when CUDA is available (``.to(device, non_blocking=True)`` is a DMA)."""
    decode_workers: int = 2
    """Threads decoding camera frames into each batch (simplejpeg releases the GIL); 0 = the sampling thread."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"sampler.alpha ({self.alpha!r}) must be a positive number (SOP uses a > 1)")
        if self.window_steps < 1:
            raise ConfigError(f"sampler.window_steps ({self.window_steps}) must be >= 1")
        if not 0.0 <= self.min_online_fraction <= self.max_online_fraction <= 1.0:
            raise ConfigError(f"sampler online share clip [{self.min_online_fraction}, {self.max_online_fraction}] "
                              "must satisfy 0 <= min <= max <= 1")
        if self.prefetch_depth < 1:
            raise ConfigError(f"sampler.prefetch_depth ({self.prefetch_depth}) must be >= 1")
        if self.decode_workers < 0:
            raise ConfigError(f"sampler.decode_workers ({self.decode_workers}) must be >= 0")
        if self.cache_bytes < 0:
            raise ConfigError(f"sampler.cache_bytes ({self.cache_bytes}) must be >= 0")
        if self.frame_cache_bytes < 0:
            raise ConfigError(f"sampler.frame_cache_bytes ({self.frame_cache_bytes}) must be >= 0")


class Sampler:
    """Batches of windows: ``obs/<name>`` (B, ...), ``task_index``, ``action`` (B, H, A), ``action_is_pad``
    (B, H), ``is_online``, ``is_intervention`` (step t), ``t``, ``episode_len`` (0: unfinished), ``success``,
    ``task_max_len`` (all (B,)); with lookahead also ``next/<name>`` and ``has_next``."""

    def __init__(self, redis, tasks: tuple[str, ...], horizon: int, batch_size: int, online_fraction: float,
                 seed: int = 0, spec: DataSpec | None = None, config: SamplerConfig | None = None,
                 embodiment: str = "", use_images: bool = True, blobs=None):
        self._redis = redis
        self.tasks = tuple(tasks)
        self.horizon = horizon
        self.batch_size = batch_size
        self.online_fraction = online_fraction
        self.spec = spec or DataSpec()
        self.config = config or SamplerConfig()
        self.index = BufferIndex(self.spec, embodiment=embodiment, known_tasks=self.tasks)
        self.use_images = use_images
        """False for a policy without cameras: frames are never decoded (batches carry no ``obs/<camera>``)."""
        self._shapes = None
        self._schema = None
        self._decoder = FrameDecoder(self.config.decode_workers) if use_images else None
        self.cache = EpisodeCache(redis, self.config.cache_bytes, self._trainer_schema, blobs,
                                  self.config.frame_cache_bytes, self._decoder)
        self.pinned = self.config.pin_memory and _cuda_available()
        """Batch arrays are allocated in pinned host memory (CUDA available and ``pin_memory``)."""
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._losses: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=self.config.window_steps))

    def refresh(self) -> int:
        with self._lock:
            return self.index.refresh(self._redis)

    def state_dict(self) -> dict:
        """The sampling RNG and the loss windows (the index is rebuilt from Redis)."""
        with self._lock:
            return {"rng": self._rng.bit_generator.state,
                    "losses": {f"{source}|{task}": list(v) for (task, source), v in self._losses.items()}}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._rng.bit_generator.state = state["rng"]
            self._losses.clear()
            for key, values in state["losses"].items():
                source, task = key.split("|", 1)
                self._losses[(task, source)].extend(float(v) for v in values)

    # --- SOP's adaptive online share -----------------------------------------------------------------------
    def observe_losses(self, batch: dict[str, np.ndarray], sample_losses: np.ndarray | None) -> None:
        """Record one update's per-sample losses by (task, online/offline)."""
        if sample_losses is None:
            return
        losses = np.asarray(sample_losses, dtype=np.float64)
        with self._lock:
            for ti in np.unique(batch["task_index"]):
                if not 0 <= ti < len(self.tasks):
                    continue
                for online in (True, False):
                    mask = (batch["task_index"] == ti) & (batch["is_online"] == online)
                    if mask.any():
                        key = (self.tasks[ti], SOURCE_ONLINE if online else SOURCE_OFFLINE)
                        self._losses[key].append(float(losses[mask].mean()))

    def online_share(self, task: str) -> float:
        """Probability that a sample of ``task`` is online (when both kinds of data exist)."""
        cfg = self.config
        on, off = self._losses.get((task, SOURCE_ONLINE)), self._losses.get((task, SOURCE_OFFLINE))
        if not cfg.adaptive or not on or not off:
            return self.online_fraction
        l_on, l_off = float(np.mean(on)), float(np.mean(off))
        p = 1.0 / (1.0 + math.exp(l_off - cfg.alpha * l_on))  # = e^(a l_on) / (e^(a l_on) + e^(l_off))
        return min(max(p, cfg.min_online_fraction), cfg.max_online_fraction)

    # --- sampling ------------------------------------------------------------------------------------------
    def _pick(self, n: int, only_source: str | None) -> Picks:
        """``n`` picks drawn as arrays: a uniform task with data; online with probability ``online_share``
        (when the task has both kinds); then ``PoolSet.draw`` (a uniform robot, then uniform over its steps)."""
        pools = self.index.pool_set()
        tasks = [t for t in self.index.tasks() if only_source is None or (t, only_source) in pools.group]
        if not tasks:
            raise LookupError(f"the buffer holds no usable {only_source or ''} steps yet".replace("  ", " "))
        online_group = np.array([pools.group.get((t, SOURCE_ONLINE), -1) for t in tasks])
        offline_group = np.array([pools.group.get((t, SOURCE_OFFLINE), -1) for t in tasks])
        if only_source is not None:
            share = np.full(len(tasks), float(only_source == SOURCE_ONLINE))
        else:
            share = np.array([self.online_share(t) if on >= 0 and off >= 0 else float(on >= 0)
                              for t, on, off in zip(tasks, online_group.tolist(), offline_group.tolist())])
        task = self._rng.integers(len(tasks), size=n)
        online = self._rng.random(n) < share[task]
        seg, t = pools.draw(self._rng, np.where(online, online_group[task], offline_group[task]))
        task_ids = {name: i for i, name in enumerate(self.tasks)}
        task_index = np.array([task_ids.get(name, -1) for name in tasks], np.int64)[task]
        max_len = np.array([self.index.task_max_len.get(name, -1) for name in tasks], np.int64)[task]
        episode_len = pools.episode_len[seg]
        return Picks(pools.number[seg], t, task_index, online, pools.labels_all[seg], episode_len,
                     pools.success[seg], np.where(max_len >= 0, max_len, episode_len))

    def sample(self, only_source: str | None = None) -> dict[str, np.ndarray]:
        """One batch. ``only_source`` restricts to online or offline data (e.g. seed BC on demos).

        An episode whose stored steps cannot be decoded or do not fit the schema is quarantined (counted
        by reason, never sampled again) and the batch drawn again; LookupError if no usable steps remain."""
        reach = max(self.horizon - 1, self.spec.lookahead_steps)
        for _ in range(MAX_REDRAWS):
            with self._lock:
                picks = self._pick(self.batch_size, only_source)
                finished = self.index.finished_lengths(picks.number)
                keys = self.index.episode_keys
            last = picks.t + reach
            last = np.where(finished > 0, np.minimum(last, finished - 1), last)
            try:
                with self.cache.lock:  # arena rows stay put from the fetch to the end of the gather
                    rows, missing = self.cache.locate(picks.number, last)
                    if missing.any():
                        self.cache.fetch([(no, *keys[no], end) for no, end in
                                          zip(picks.number[missing].tolist(), last[missing].tolist())])
                        rows = self.cache.table.rows[picks.number]
                    self._check_fits(picks, rows, keys)
                    batch = self._collate(picks, rows, keys)
                self.cache.trim()
                return batch
            except UnusableEpisode as bad:
                with self._lock:
                    self.index.quarantine(bad.robot_id, bad.episode_id, bad.reason, bad.detail)
                self.cache.forget(bad.robot_id, bad.episode_id)
        raise LookupError(f"{MAX_REDRAWS} batches in a row met an unusable episode")

    def _trainer_schema(self):
        if self._schema is None:
            self._schema = self.index.schema()
        return self._schema

    def _expected(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], tuple[int, ...]]:
        """Low-dim and image feature shapes and the action shape of the trainer's schema."""
        if self._shapes is None:
            schema = self.index.schema()
            if schema is None:
                return {}, {}, ()
            self._shapes = ({f.name: f.shape for f in schema.observation if not f.is_image},
                            {f.name: f.shape for f in schema.observation if f.is_image}, schema.action.shape)
        return self._shapes

    def _check_fits(self, picks: Picks, rows: np.ndarray, keys) -> None:
        """Raise UnusableEpisode for the first pick past what its episode stores (a summary claimed more)."""
        past = np.flatnonzero(picks.t >= rows[:, LENGTH])
        if len(past):
            i = past[0]
            raise UnusableEpisode(*keys[picks.number[i]], "length_mismatch",
                                  f"step {picks.t[i]} was sampled but only {rows[i, LENGTH]} are stored (the "
                                  f"episode's summary claims {picks.episode_len[i]})")

    def _empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised batch array, in pinned host memory when ``self.pinned``."""
        return host_empty(shape, dtype, self.pinned)

    def _take(self, column: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``column[rows]`` gathered into a batch array (pinned when ``self.pinned``)."""
        out = self._empty((*rows.shape, *column.shape[1:]), column.dtype)
        np.take(column, rows, axis=0, out=out, mode="clip")  # rows are in range by construction; "raise" buffers
        return out

    def _frames(self, picks: Picks, rows: np.ndarray, keys, steps: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
        """Each camera's frames of the picks: gathered from the cache's frame arena where decoded there, the
        others decoded into the batch by the GIL-free pool (``cloud.frames``); a frame that cannot be read
        makes its episode unusable."""
        _, images, _ = self._expected()
        arena = self.cache.frames
        hit = rows[:, FRAMES_READY] > steps
        miss = np.flatnonzero(~hit)
        at = rows[:, FRAME_BASE] + steps
        misses = [(keys[no], t) for no, t in zip(picks.number[miss].tolist(), steps[miss].tolist())]
        out = {}
        for name in images:
            frames = self._empty((len(steps), *images[name]), np.uint8)
            if hit.all():
                np.take(arena.frames[name], at, axis=0, out=frames, mode="clip")
            elif hit.any():
                frames[hit] = arena.frames[name][at[hit]]
            if len(miss):
                self._decode_into(frames, miss, misses, name)
            out[f"{prefix}/{name}"] = frames
        return out

    def _decode_into(self, frames: np.ndarray, slots: np.ndarray, misses: list, name: str):
        """Decode the (episode key, step) ``misses`` of camera ``name`` into ``frames[slots]``."""
        episodes = [self.cache.entry(*key) for key, _ in misses]
        steps = [t for _, t in misses]
        try:
            blobs = [ep.encoded_frame(t, name).data for ep, t in zip(episodes, steps)]
        except UNDECODABLE + (BlobNotFound,) as exc:
            bad = next(i for i, (ep, t) in enumerate(zip(episodes, steps)) if not _has_frame(ep, t, name))
            raise UnusableEpisode(*misses[bad][0], "corrupt_image",
                                  f"camera {name!r} frames cannot be read ({exc!r})") from None
        whole = len(slots) == len(frames)
        target = frames if whole else np.empty((len(slots), *frames.shape[1:]), np.uint8)
        try:
            self._decoder.decode_into(blobs, target)
        except CorruptFrames as exc:
            err = exc.errors[0]
            raise UnusableEpisode(*misses[err.index][0], "corrupt_image", f"camera {name!r}: {err.detail}") from None
        if not whole:
            frames[slots] = target

    def _collate(self, picks: Picks, rows: np.ndarray, keys) -> dict[str, np.ndarray]:
        """Gather every window with one fancy index into the cache's arena (flat rows; no per-pick Python)."""
        H, look = self.horizon, self.spec.lookahead_steps
        arena = self.cache.arena
        t_all, base, length = picks.t, rows[:, BASE], rows[:, LENGTH]
        idx = t_all[:, None] + np.arange(H)
        inside = idx < length[:, None]
        flat = base[:, None] + np.minimum(idx, length[:, None] - 1)
        driven = arena.intervention[flat] | picks.labels_all[:, None]  # labels only while the operator drove
        keep = inside & np.logical_and.accumulate(driven, axis=1)
        actions = self._take(arena.action, flat)
        actions[~keep] = 0.0
        now = base + t_all
        batch = {f"obs/{k}": self._take(v, now) for k, v in arena.low.items()}
        small = {}
        if look:
            nxt = base + np.minimum(t_all + look, length - 1)
            batch.update({f"next/{k}": self._take(v, nxt) for k, v in arena.low.items()})
            small["has_next"] = t_all + look < np.where(picks.episode_len > 0, picks.episode_len, length)
        if self.use_images and self._expected()[1]:
            batch.update(self._frames(picks, rows, keys, t_all, "obs"))
            if look:
                batch.update(self._frames(picks, rows, keys, np.minimum(t_all + look, length - 1), "next"))
        small.update(action_is_pad=~keep, t=t_all, episode_len=picks.episode_len, task_index=picks.task_index,
                     task_max_len=picks.task_max_len, is_online=picks.online, is_intervention=arena.intervention[now],
                     success=picks.success)
        if self.pinned:
            small = {k: self._take(v, np.arange(len(v))) for k, v in small.items()}
        batch.update(action=actions, **small)
        return batch


@dataclass(frozen=True)
class Picks:
    """A batch's picks, one array per field (episode number: ``BufferIndex.episode_keys``)."""

    number: np.ndarray
    t: np.ndarray
    task_index: np.ndarray
    online: np.ndarray
    labels_all: np.ndarray
    episode_len: np.ndarray
    success: np.ndarray
    task_max_len: np.ndarray


def _has_frame(ep, t: int, camera: str) -> bool:
    try:
        ep.encoded_frame(t, camera)
        return True
    except UNDECODABLE + (BlobNotFound,):
        return False


def _cuda_available() -> bool:
    import torch  # the trainer's process has it loaded already

    return torch.cuda.is_available()


def host_empty(shape: tuple[int, ...], dtype, pinned: bool) -> np.ndarray:
    """An uninitialised host array; with ``pinned``, a numpy view of a page-locked torch tensor (CUDA only),
    which ``torch.from_numpy(a).to(device, non_blocking=True)`` copies by DMA."""
    if not pinned:
        return np.empty(shape, dtype)
    import torch

    dtype = np.dtype(dtype)
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True).numpy()


class Prefetcher:
    """Keeps ``depth`` batches ready in a background thread."""

    def __init__(self, sampler: Sampler, depth: int = 4, only_source: str | None = None):
        self.sampler = sampler
        self.only_source = only_source
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._worker = Worker("prefetch", self._run)
        self._worker.start()

    def _run(self) -> None:
        waiting = False
        while not self._worker.stopping.is_set():
            try:
                batch = self.sampler.sample(self.only_source)
            except LookupError as exc:  # nothing usable (left): wait for robots, do not end the trainer
                if not waiting:
                    log.warning("no batch to train on (%s): waiting for usable data", exc)
                waiting = True
                self._worker.stopping.wait(1.0)
                continue
            except Exception as exc:  # surfaced to the trainer on get()
                batch = exc
            waiting = False
            while not self._worker.stopping.is_set():
                try:
                    self._q.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def get(self, timeout_s: float = 30.0) -> dict[str, np.ndarray]:
        item = self._q.get(timeout=timeout_s)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._worker.stop()
