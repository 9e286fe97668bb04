"""Retention and tiering: keep the buffer within byte and age budgets, dropping the least valuable data first.

Every episode is in one tier: ``offline`` (seeded demonstrations), ``intervention`` (online with at least one
operator-driven step) or ``online`` (the rest, evaluation episodes included). When a byte budget is exceeded,
episodes are evicted tier by tier in ``eviction_order`` (default online, then intervention, then offline:
operator corrections and demonstrations are the scarcest data and are kept longest), oldest first within a
tier, down to ``low_watermark`` of the budget so that eviction runs in batches rather than on every write.
Age limits are per tier (0 = keep forever). An episode still being written is never evicted until it has
been silent for ``open_episode_grace_s`` (then it counts as abandoned).

:func:`choose_evictions` is pure (episodes in, evictions out); :class:`Retention` applies them: optionally
archives them (a LeRobotDataset v3 per robot and pass, through ``cloud/export``), deletes each from Redis
with the buffer writer's ``delete_episode`` (atomic; the sampler's index drops it) and then its frame objects
from the blob store (an orphan object is harmless; a missing one is a counted skip when sampling).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Protocol

from cloud.buffer.layout import RETENTION_LEASE_KEY
from fleet import metrics
from fleet.gateway_config import TIERS, RetentionConfig
from fleet.errors import BackendUnavailable

log = logging.getLogger(__name__)

REASONS = ("age", "buffer_bytes", "robot_bytes", "task_bytes", "redis_bytes")


class Episode(Protocol):
    """What retention reads of an episode (``cloud.buffer.reader.EpisodeInfo``)."""

    robot_id: str
    episode_id: str
    task: str
    source: str
    ended: bool
    redis_bytes: int
    blob_bytes: int
    intervention_steps: int
    first_s: float
    updated_s: float


@dataclass(frozen=True)
class Eviction:
    episode: Episode
    tier: str
    reason: str


def tier_of(episode: Episode) -> str:
    if episode.source == "offline":
        return "offline"
    return "intervention" if episode.intervention_steps > 0 else "online"


def total_bytes(episode: Episode) -> int:
    return episode.redis_bytes + episode.blob_bytes


def choose_evictions(episodes: Sequence[Episode], cfg: RetentionConfig, now_s: float,
                     redis_used_bytes: int | None = None) -> list[Eviction]:
    """The episodes to evict now, each with its tier and the budget it is evicted for, in eviction order.

    ``redis_used_bytes`` (Redis's used_memory) replaces the sum of the episodes' Redis bytes for
    ``redis_max_bytes`` when given: it includes what no catalog counts (keys, overhead, fragmentation)."""
    rank = {tier: i for i, tier in enumerate(cfg.eviction_order)}
    tiers = {id(e): tier_of(e) for e in episodes}
    evictable = [e for e in episodes if e.ended or now_s - e.updated_s > cfg.open_episode_grace_s]
    evictable.sort(key=lambda e: (rank[tiers[id(e)]], e.first_s, e.updated_s, e.robot_id, e.episode_id))
    chosen: dict[int, Eviction] = {}

    def evict(e: Episode, reason: str) -> None:
        chosen[id(e)] = Eviction(e, tiers[id(e)], reason)
        for scope in scopes_of(e):
            used[scope] -= total_bytes(e)
        used_redis[0] -= e.redis_bytes

    def scopes_of(e: Episode) -> tuple[tuple[str, str], ...]:
        return ("buffer", ""), ("robot", e.robot_id), ("task", e.task)

    used: dict[tuple[str, str], int] = defaultdict(int)
    for e in episodes:
        for scope in scopes_of(e):
            used[scope] += total_bytes(e)
    used_redis = [sum(e.redis_bytes for e in episodes) if redis_used_bytes is None else redis_used_bytes]

    for e in evictable:
        limit = cfg.max_age_s(tiers[id(e)])
        if limit and now_s - e.updated_s > limit:
            evict(e, "age")

    budgets = [("robot", cfg.robot_max_bytes), ("task", cfg.task_max_bytes), ("buffer", cfg.max_bytes)]
    for kind, budget in budgets:
        if not budget:
            continue
        for scope in sorted(s for s in list(used) if s[0] == kind):
            if used[scope] <= budget:
                continue
            target = cfg.low_watermark * budget
            for e in evictable:
                if used[scope] <= target:
                    break
                if id(e) not in chosen and scope in scopes_of(e):
                    evict(e, f"{kind}_bytes")
    overhead = 0 if redis_used_bytes is None else redis_used_bytes - sum(e.redis_bytes for e in episodes)
    if cfg.redis_max_bytes and used_redis[0] > cfg.redis_max_bytes and overhead < cfg.low_watermark * cfg.redis_max_bytes:
        # (When what no episode accounts for fills the budget alone, evicting episodes cannot help: none go.)
        target = cfg.low_watermark * cfg.redis_max_bytes
        for e in evictable:
            if used_redis[0] <= target:
                break
            if id(e) not in chosen and e.redis_bytes > 0:
                evict(e, "redis_bytes")
    order = {id(e): i for i, e in enumerate(evictable)}
    return sorted(chosen.values(), key=lambda ev: order[id(ev.episode)])


@dataclass
class PassReport:
    """What one retention pass did."""

    episodes: int = 0
    evicted: list[Eviction] = field(default_factory=list)
    archived: int = 0
    freed_redis_bytes: int = 0
    freed_blob_bytes: int = 0
    failed: int = 0


def record_sizes(episodes: Sequence[Episode], cfg: RetentionConfig) -> None:
    """Buffer bytes per tier and the share of the buffer budget in use, as gauges."""
    redis_bytes = dict.fromkeys(TIERS, 0)
    blob_bytes = dict.fromkeys(TIERS, 0)
    for e in episodes:
        redis_bytes[tier_of(e)] += e.redis_bytes
        blob_bytes[tier_of(e)] += e.blob_bytes
    for tier in TIERS:
        metrics.RETENTION_BUFFER_BYTES.labels(kind=tier, mode="redis").set(redis_bytes[tier])
        metrics.RETENTION_BUFFER_BYTES.labels(kind=tier, mode="blob").set(blob_bytes[tier])
    total = sum(redis_bytes.values()) + sum(blob_bytes.values())
    metrics.RETENTION_BUDGET_USED.set(total / cfg.max_bytes if cfg.max_bytes else 0.0)


MAX_UNDELETED_KEYS = 1_000_000
"""Frame-object keys kept for the next pass when the blob store is down (beyond: orphans)."""
DELETE_BATCH = 32
"""Episodes deleted from Redis concurrently (each is one atomic script)."""


def _is_outage(exc: BaseException) -> bool:
    """A Redis or blob-store outage (the pass stops, the next retries), not a bug."""
    return isinstance(exc, (BackendUnavailable, ConnectionError, TimeoutError)) or \
        type(exc).__module__.startswith("redis")


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


class Retention:
    """Applies :func:`choose_evictions` to a live buffer.

    ``reader.episodes()`` lists the catalog; ``writer.delete_episode(robot_id, episode_id)`` (sync or async)
    removes one episode from Redis and returns what it freed (``redis_bytes``, ``blob_keys``); ``blobs``
    (a BlobStore, or None) holds the frame objects; ``archive(episodes)`` (or None) writes episodes somewhere
    durable before they are deleted and raises to keep them; ``redis_used`` returns Redis's used_memory."""

    def __init__(self, reader, writer, blobs, cfg: RetentionConfig,
                 archive: Callable[[list[Episode]], None] | None = None,
                 redis_used: Callable[[], int] | None = None, clock: Callable[[], float] = time.time):
        self.reader, self.writer, self.blobs, self.cfg = reader, writer, blobs, cfg
        self.archive, self.redis_used, self.clock = archive, redis_used, clock
        self._undeleted: list[str] = []
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        for reason in REASONS:
            for tier in TIERS:
                metrics.RETENTION_EVICTIONS.labels(reason=reason, kind=tier)

    async def run_once(self) -> PassReport:
        """One pass: list, choose, archive, delete. A backend outage ends the pass early (retried next pass)."""
        started = time.perf_counter()
        episodes = await asyncio.to_thread(self.reader.episodes)
        used = await asyncio.to_thread(self.redis_used) if self.redis_used and self.cfg.redis_max_bytes else None
        evictions = choose_evictions(episodes, self.cfg, self.clock(), used)
        if used is not None and used > self.cfg.redis_max_bytes and not any(ev.reason == "redis_bytes"
                                                                             for ev in evictions):
            log.warning("Redis uses %d bytes, over retention.redis_max_bytes (%d), but episodes account for only %d: "
                        "evicting them cannot help; raise the budget or look at what else Redis holds", used,
                        self.cfg.redis_max_bytes, sum(e.redis_bytes for e in episodes))
            metrics.RETENTION_FAILURES.labels(reason="redis_overhead").inc()
        report = PassReport(episodes=len(episodes))
        if evictions and self.archive is not None:
            to_archive = [ev.episode for ev in evictions if ev.tier in self.cfg.archive_tiers]
            if to_archive:
                try:
                    await asyncio.to_thread(self.archive, to_archive)
                    report.archived = len(to_archive)
                    metrics.RETENTION_ARCHIVED.inc(len(to_archive))
                except Exception:  # keep the data: nothing is deleted that should have been archived first
                    log.exception("archiving %d episodes failed; evicting none of them this pass", len(to_archive))
                    metrics.RETENTION_FAILURES.labels(reason="archive").inc()
                    evictions = [ev for ev in evictions if ev.tier not in self.cfg.archive_tiers]
                    report.failed += len(to_archive)
        gone: set[tuple[str, str]] = set()
        blob_keys: list[str] = []
        for start in range(0, len(evictions), DELETE_BATCH):
            batch = evictions[start:start + DELETE_BATCH]
            results = await asyncio.gather(
                *(_maybe_await(self.writer.delete_episode(ev.episode.robot_id, ev.episode.episode_id)) for ev in batch),
                return_exceptions=True)
            outage = None
            for ev, freed in zip(batch, results):
                if isinstance(freed, BaseException):
                    if not _is_outage(freed):
                        raise freed
                    outage = freed
                    continue
                e = ev.episode
                report.evicted.append(ev)
                gone.add((e.robot_id, e.episode_id))
                blob_keys += freed.blob_keys
                blob = int(getattr(freed, "blob_bytes", e.blob_bytes))
                report.freed_redis_bytes += int(freed.redis_bytes)
                report.freed_blob_bytes += blob
                metrics.RETENTION_EVICTIONS.labels(reason=ev.reason, kind=ev.tier).inc()
                metrics.RETENTION_EVICTED_BYTES.labels(mode="redis").inc(int(freed.redis_bytes))
                metrics.RETENTION_EVICTED_BYTES.labels(mode="blob").inc(blob)
            if outage is not None:
                log.warning("retention pass stopped after %d evictions: %r", len(report.evicted), outage)
                metrics.RETENTION_FAILURES.labels(reason="backend").inc()
                report.failed += 1
                break
        blob_keys = self._undeleted + blob_keys
        if blob_keys and self.blobs is not None:
            try:  # one batched delete per pass
                await asyncio.to_thread(self.blobs.delete, blob_keys)
                self._undeleted = []
            except BackendUnavailable as exc:
                # Retried next pass; lost (orphans: never read again, only disk) if this process stops first.
                self._undeleted = blob_keys[-MAX_UNDELETED_KEYS:]
                log.warning("retention: %d frame objects of evicted episodes not deleted yet: %s", len(blob_keys), exc)
                metrics.RETENTION_FAILURES.labels(reason="backend").inc()
        record_sizes([e for e in episodes if (e.robot_id, e.episode_id) not in gone], self.cfg)
        metrics.RETENTION_LAST_PASS.set(time.time())
        log.debug("retention pass over %d episodes in %.3f s", len(episodes), time.perf_counter() - started)
        if report.evicted:
            log.info("retention: evicted %d of %d episodes (%d Redis bytes, %d blob bytes; %d archived)",
                     len(report.evicted), report.episodes, report.freed_redis_bytes, report.freed_blob_bytes,
                     report.archived)
        return report

    async def _hold_lease(self) -> bool:
        """Whether this process may run the pass: it holds (or just took) the lease in Redis, so that of several
        gateways with retention on only one evicts (and archives) at a time."""
        redis = self.reader.redis
        ttl_ms = int(self.cfg.interval_s * 3000)

        def take() -> bool:
            if redis.set(RETENTION_LEASE_KEY, self.owner, nx=True, px=ttl_ms):
                return True
            holder = redis.get(RETENTION_LEASE_KEY)
            if holder is not None and holder.decode(errors="replace") == self.owner:
                redis.pexpire(RETENTION_LEASE_KEY, ttl_ms)
                return True
            return False

        return await asyncio.to_thread(take)

    async def run(self, stop: asyncio.Event) -> None:
        """Passes every ``interval_s`` while holding the lease, until ``stop`` is set; outages are waited out."""
        while not stop.is_set():
            try:
                if await self._hold_lease():
                    await self.run_once()
            except Exception as exc:
                if not _is_outage(exc):
                    raise
                log.warning("retention pass failed: %r", exc)
                metrics.RETENTION_FAILURES.labels(reason="backend").inc()
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.interval_s)
            except asyncio.TimeoutError:
                pass


def redis_used_memory(redis) -> int:
    """Redis's ``used_memory`` (summed over the nodes of a Redis Cluster)."""
    info = redis.info("memory")
    if "used_memory" in info:
        return int(info["used_memory"])
    return sum(int(node.get("used_memory", 0)) for node in info.values() if isinstance(node, dict))


class LeRobotArchive:
    """Writes episodes about to be evicted to LeRobotDataset v3 directories under ``root`` (one per robot and
    pass, ``<robot>-<UTC time>-<n>``) with ``cloud.export.lerobot``. A dataset is written under a hidden
    ``.partial`` name and renamed when complete, so a crash never leaves half a dataset under a final name."""

    def __init__(self, redis, root: str | Path, blobs=None):
        self.redis, self.root, self.blobs = redis, Path(root), blobs
        self._n = itertools.count()

    def __call__(self, episodes: list[Episode]) -> list[Path]:
        from cloud.export import ExportFilter
        from cloud.export.lerobot import export_lerobot

        self.root.mkdir(parents=True, exist_ok=True)
        by_robot: dict[str, list[str]] = defaultdict(list)
        for e in episodes:
            by_robot[e.robot_id].append(e.episode_id)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        written = []
        for robot_id, episode_ids in sorted(by_robot.items()):
            name = f"{robot_id}-{stamp}-{os.getpid()}-{next(self._n)}"
            partial = self.root / f".{name}.partial"
            export_lerobot(self.redis, partial, ExportFilter(robots=(robot_id,), episode_ids=tuple(episode_ids),
                                                              include_unfinished=True), blobs=self.blobs)
            os.replace(partial, self.root / name)
            written.append(self.root / name)
        return written


@dataclass
class RunningRetention:
    """Retention passes running as a task of the caller's event loop (the gateway's)."""

    retention: Retention
    task: asyncio.Task
    stop_event: asyncio.Event

    async def stop(self) -> None:
        self.stop_event.set()
        await self.task


def start_retention(redis_url: str, writer, blobs, cfg: RetentionConfig) -> RunningRetention:
    """Start passes in the running event loop over the buffer at ``redis_url``, deleting through ``writer``."""
    from cloud.buffer.reader import BufferReader
    from fleet.redis_client import connect

    redis = connect(redis_url)
    archive = LeRobotArchive(redis, cfg.archive_dir, blobs) if cfg.archive_dir else None
    retention = Retention(BufferReader(redis, blobs), writer, blobs, cfg, archive=archive,
                          redis_used=lambda: redis_used_memory(redis))
    stop = asyncio.Event()
    log.info("retention on: %s", cfg)
    return RunningRetention(retention, asyncio.create_task(retention.run(stop), name="retention"), stop)
