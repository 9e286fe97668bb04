"""Draw training batches from the Redis buffer.

The sampler mirrors the buffer's append-only per-robot ``labeled`` lists
incrementally (each refresh reads only what is new), samples positions locally
(equal weight per task; within a task a fixed online share once online data
exists), and fetches the step windows ``[t, t+H)`` with one pipelined LRANGE per
sample. A background thread keeps a few batches ready so the trainer never
waits on Redis.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from cloud.buffer import ROBOTS_KEY, SOURCE_OFFLINE, SOURCE_ONLINE, RobotKeys
from fleet.convert import decode_step, schema_from_dict
from fleet.types import Schema

log = logging.getLogger(__name__)


@dataclass
class Position:
    robot_id: str
    episode_id: str
    index: int


@dataclass
class LabeledIndex:
    """Local mirror of every robot's labeled positions, by (task, source)."""

    positions: dict[tuple[str, str], list[Position]] = field(default_factory=lambda: defaultdict(list))
    _seen: dict[str, int] = field(default_factory=dict)
    robots: dict[str, dict] = field(default_factory=dict)

    def refresh(self, redis) -> int:
        """Pull new entries; returns how many were added."""
        for rid, raw in redis.hgetall(ROBOTS_KEY).items():
            rid = rid.decode() if isinstance(rid, bytes) else rid
            self.robots[rid] = json.loads(raw)
        pipe = redis.pipeline(transaction=False)
        order = list(self.robots)
        for rid in order:
            pipe.lrange(RobotKeys(rid).labeled, self._seen.get(rid, 0), -1)
        added = 0
        for rid, entries in zip(order, pipe.execute()):
            source = self.robots[rid].get("source", SOURCE_ONLINE)
            for raw in entries:
                eid, idx, task = raw.decode().split("|", 2)
                self.positions[(task, source)].append(Position(rid, eid, int(idx)))
            self._seen[rid] = self._seen.get(rid, 0) + len(entries)
            added += len(entries)
        return added

    def count(self, source: str | None = None) -> int:
        return sum(len(v) for (t, s), v in self.positions.items() if source is None or s == source)

    def tasks(self) -> list[str]:
        return sorted({t for (t, _), v in self.positions.items() if v})

    def schema(self) -> Schema | None:
        for info in self.robots.values():
            return schema_from_dict(info["schema"])
        return None


class Sampler:
    """Batches of windows: ``obs/<name>`` (B, ...), ``task_index`` (B,), ``action`` (B, H, A),
    ``action_is_pad`` (B, H), ``is_online`` (B,)."""

    def __init__(self, redis, tasks: tuple[str, ...], horizon: int, batch_size: int, online_fraction: float,
                 seed: int = 0):
        self._redis = redis
        self.tasks = tuple(tasks)
        self.horizon = horizon
        self.batch_size = batch_size
        self.online_fraction = online_fraction
        self.index = LabeledIndex()
        self._rng = np.random.default_rng(seed)

    def refresh(self) -> int:
        return self.index.refresh(self._redis)

    def _pick(self, n: int) -> list[tuple[Position, str, str]]:
        tasks = self.index.tasks()
        if not tasks:
            raise LookupError("the buffer holds no labeled steps yet")
        out = []
        for _ in range(n):
            task = tasks[self._rng.integers(len(tasks))]
            online = self.index.positions.get((task, SOURCE_ONLINE)) or []
            offline = self.index.positions.get((task, SOURCE_OFFLINE)) or []
            use_online = bool(online) and (not offline or self._rng.random() < self.online_fraction)
            pool, source = (online, SOURCE_ONLINE) if use_online else (offline, SOURCE_OFFLINE)
            out.append((pool[self._rng.integers(len(pool))], task, source))
        return out

    def sample(self, only_source: str | None = None) -> dict[str, np.ndarray]:
        """One batch. ``only_source`` restricts to online or offline data (e.g. seed BC on demos)."""
        if only_source is not None:
            picks = []
            pools = [(t, self.index.positions[(t, only_source)]) for t in self.index.tasks()
                     if self.index.positions.get((t, only_source))]
            if not pools:
                raise LookupError(f"the buffer holds no {only_source} labeled steps yet")
            for _ in range(self.batch_size):
                task, pool = pools[self._rng.integers(len(pools))]
                picks.append((pool[self._rng.integers(len(pool))], task, only_source))
        else:
            picks = self._pick(self.batch_size)
        pipe = self._redis.pipeline(transaction=False)
        for pos, _, _ in picks:
            pipe.lrange(RobotKeys(pos.robot_id).episode(pos.episode_id), pos.index, pos.index + self.horizon - 1)
        windows = pipe.execute()
        return self._collate(picks, windows)

    def _collate(self, picks, windows) -> dict[str, np.ndarray]:
        B, H = len(picks), self.horizon
        obs: dict[str, list[np.ndarray]] = defaultdict(list)
        actions = None
        pad = np.ones((B, H), dtype=bool)
        task_index = np.full((B,), -1, dtype=np.int64)
        is_online = np.zeros((B,), dtype=bool)
        for b, ((pos, task, source), blobs) in enumerate(zip(picks, windows)):
            steps = [decode_step(x) for x in blobs]
            for name, value in steps[0].observation.items():
                obs[name].append(value)
            if actions is None:
                actions = np.zeros((B, H, steps[0].action.shape[0]), dtype=np.float32)
            for h, step in enumerate(steps):
                # Online windows are labels only while the operator drove; offline demos are all labels.
                if source == SOURCE_OFFLINE or step.is_intervention:
                    actions[b, h] = step.action
                    pad[b, h] = False
                else:
                    break
            task_index[b] = self.tasks.index(task) if task in self.tasks else -1
            is_online[b] = source == SOURCE_ONLINE
        batch = {f"obs/{k}": np.stack(v).astype(np.float32) for k, v in obs.items()}
        batch.update(action=actions, action_is_pad=pad, task_index=task_index, is_online=is_online)
        return batch


class Prefetcher:
    """Keeps ``depth`` batches ready in a background thread."""

    def __init__(self, sampler: Sampler, depth: int = 4, only_source: str | None = None):
        self.sampler = sampler
        self.only_source = only_source
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.sampler.sample(self.only_source)
            except Exception as exc:  # surfaced to the trainer on get()
                batch = exc
            while not self._stop.is_set():
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
        self._stop.set()
        self._thread.join(timeout=5)
