"""Fleet-level Prometheus metrics computed from Redis, served by the trainer process.

The trainer is the one singleton of the cloud side (gateways are replicated, so a
gateway-served fleet series would be duplicated per replica), and it reads Redis
already. ``Trainer.run`` registers a :class:`FleetCollector` on the default registry
for its lifetime; every scrape of the trainer's ``/metrics`` then includes:

- per robot (from the heartbeat and the stored-data counters, so robots behind NAT
  that Prometheus cannot scrape are still watched): ``fleet_robot_connected``,
  ``fleet_robot_policy_version``, ``fleet_robot_policy_version_lag``,
  ``fleet_robot_last_seen_timestamp_seconds``, ``fleet_robot_spool_steps``/``_bytes``,
  ``fleet_robot_info``, ``fleet_robot_*_stored_total``;
- per task over ``window_s`` (see ``cloud/status.py``): ``fleet_window_*`` (episodes,
  successes and success ratio by mode, steps, intervention steps = human effort,
  intervention ratio, Return on Human Effort);
- ``fleet_buffer_steps``/``fleet_buffer_bytes`` by task and source, ``fleet_redis_*``
  memory, ``fleet_policy_latest_version``.

Reads are cached for ``min_interval_s`` (several Prometheus replicas scraping do
not multiply the load on Redis), the per-task buffer size for ``buffer_interval_s``
(it reads every robot's episode catalog). When Redis does not answer, a scrape
still succeeds with ``fleet_redis_up 0``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from cloud.buffer import SOURCE_ONLINE
from cloud.buffer.reader import BufferReader
from cloud.status import WINDOW_S, fleet_status

log = logging.getLogger(__name__)

MODES = ("autonomous", "supervised")
"""Episode modes: autonomous = evaluation episodes (no operator); supervised = the operator may intervene."""


def buffer_by_task(redis, robots: list[dict]) -> dict[tuple[str, str], tuple[int, float]]:
    """(task, source) -> (steps, bytes) stored, from every robot's episode catalog.

    Bytes are estimated per robot as its stored bytes times the task's share of its steps
    (a robot's steps share one schema, so they are close in size)."""
    pipe, reader = redis.pipeline(transaction=False), BufferReader(redis)
    for r in robots:
        reader.queue_catalog(pipe, r["robot_id"], values_only=True)
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for r, values in zip(robots, pipe.execute() if robots else []):
        per_task: dict[str, int] = defaultdict(int)
        for raw in values:
            entry = json.loads(raw)
            per_task[entry.get("task", "")] += int(entry.get("len", 0))
        total = sum(per_task.values())
        for task, steps in per_task.items():
            cell = out[(task, r["source"])]
            cell[0] += steps
            cell[1] += r["bytes_stored"] * steps / total if total else 0.0
    return {k: (int(v[0]), v[1]) for k, v in out.items()}


def redis_memory(redis) -> dict[str, tuple[int, int]]:
    """node -> (used_memory, maxmemory) bytes; maxmemory 0 means no limit. One entry per Cluster node."""
    info = redis.info("memory")
    if info and all(isinstance(v, dict) for v in info.values()):  # RedisCluster: {node: info}
        return {str(node): (int(v.get("used_memory", 0)), int(v.get("maxmemory", 0))) for node, v in info.items()}
    kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {})
    node = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return {node: (int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))}


class FleetCollector(Collector):
    """A prometheus_client collector reading the fleet's state from Redis at scrape time."""

    def __init__(self, redis, window_s: float = WINDOW_S, min_interval_s: float = 5.0,
                 buffer_interval_s: float = 30.0):
        if window_s <= 0:
            raise ValueError(f"window_s ({window_s}) must be > 0")
        self.redis = redis
        self.window_s = window_s
        self.min_interval_s = min_interval_s
        self.buffer_interval_s = buffer_interval_s
        self._lock = threading.Lock()
        self._cached: list = []
        self._cached_at = float("-inf")
        self._buffer: dict[tuple[str, str], tuple[int, float]] = {}
        self._buffer_at = float("-inf")
        self._registry: CollectorRegistry | None = None

    def register(self, registry: CollectorRegistry = REGISTRY) -> FleetCollector:
        registry.register(self)
        self._registry = registry
        return self

    def unregister(self) -> None:
        if self._registry is not None:
            self._registry.unregister(self)
            self._registry = None

    def describe(self) -> list:
        return []  # dynamic: do not collect at registration time

    def collect(self) -> Iterator:
        with self._lock:
            now = time.monotonic()
            if now - self._cached_at >= self.min_interval_s:
                self._cached = self._read(now)
                self._cached_at = now
            return iter(self._cached)

    # --- reading -------------------------------------------------------------------

    def _read(self, now_mono: float) -> list:
        t0 = time.perf_counter()
        up = GaugeMetricFamily("fleet_redis_up", "1 if the trainer's fleet collector could read Redis")
        try:
            families = self._families(now_mono)
            up.add_metric([], 1)
        except Exception as exc:  # a scrape must succeed even when Redis is down
            log.warning("fleet metrics: cannot read Redis: %s", exc)
            families = []
            up.add_metric([], 0)
        took = GaugeMetricFamily("fleet_exporter_collect_duration_seconds",
                                 "Time the last read of the fleet's state from Redis took")
        took.add_metric([], time.perf_counter() - t0)
        return [up, took, *families]

    def _families(self, now_mono: float) -> list:
        status = fleet_status(self.redis, self.window_s)
        if now_mono - self._buffer_at >= self.buffer_interval_s:
            self._buffer = buffer_by_task(self.redis, status["robots"])
            self._buffer_at = now_mono
        return [*self._robot_families(status), *self._window_families(status), *self._buffer_families(),
                *self._redis_families()]

    def _robot_families(self, status: dict) -> list:
        latest = GaugeMetricFamily("fleet_policy_latest_version", "Newest published policy version (Redis pointer)")
        latest.add_metric([], status["latest_policy_version"])
        info = GaugeMetricFamily("fleet_robot_info", "1 per registered robot", labels=["robot", "embodiment", "source"])
        g = {name: GaugeMetricFamily(f"fleet_robot_{name}", doc, labels=["robot"]) for name, doc in (
            ("connected", "1 if the robot's last heartbeat is recent"),
            ("last_seen_timestamp_seconds", "Unix time of the robot's last heartbeat"),
            ("policy_version", "Policy version the robot acts with (last heartbeat)"),
            ("policy_version_lag", "Published versions the robot is behind the newest"),
            ("spool_steps", "Steps in the robot's spool not yet acked (last heartbeat)"),
            ("spool_bytes", "Bytes in the robot's spool not yet acked (last heartbeat)"))}
        c = {name: CounterMetricFamily(f"fleet_robot_{name}", doc, labels=["robot", "source"]) for name, doc in (
            ("steps_stored", "Steps durably stored in Redis"),
            ("intervention_steps_stored", "Operator-driven steps stored"),
            ("bytes_stored", "Step payload bytes stored"),
            ("episodes_stored", "Finished episodes stored"),
            ("successes_stored", "Successful episodes stored"),
            ("dropped_steps", "Steps the robot's spool dropped (declared gaps)"))}
        fields = {"steps_stored": "steps_stored", "intervention_steps_stored": "intervention_steps_stored",
                  "bytes_stored": "bytes_stored", "episodes_stored": "episodes", "successes_stored": "successes",
                  "dropped_steps": "dropped_steps"}
        for r in status["robots"]:
            rid, source = r["robot_id"], r["source"]
            info.add_metric([rid, r["embodiment"], source], 1)
            for name, field in fields.items():
                c[name].add_metric([rid, source], r[field])
            if source != SOURCE_ONLINE:
                continue  # offline-data sources send no heartbeats
            g["connected"].add_metric([rid], int(r["connected"]))
            g["last_seen_timestamp_seconds"].add_metric([rid], r["last_seen_s"])
            if r["version_lag"] is not None:
                g["policy_version"].add_metric([rid], r["policy_version"])
                g["policy_version_lag"].add_metric([rid], r["version_lag"])
            g["spool_steps"].add_metric([rid], r["spool_steps"])
            g["spool_bytes"].add_metric([rid], r["spool_bytes"])
        return [latest, info, *g.values(), *c.values()]

    def _window_families(self, status: dict) -> list:
        seconds = GaugeMetricFamily("fleet_window_seconds", "Window of the fleet_window_* series")
        seconds.add_metric([], status["window_s"])
        by_mode = {name: GaugeMetricFamily(f"fleet_window_{name}", doc, labels=["task", "mode"]) for name, doc in (
            ("episodes", "Episodes that ended in the window"),
            ("successes", "Successful episodes in the window"),
            ("success_ratio", "Successes / episodes in the window (autonomous: evaluation episodes)"))}
        by_task = {name: GaugeMetricFamily(f"fleet_window_{name}", doc, labels=["task"]) for name, doc in (
            ("steps", "Steps of supervised episodes that ended in the window"),
            ("intervention_steps", "Human effort: operator-driven steps in the window"),
            ("intervention_ratio", "Intervention steps / steps of supervised episodes in the window"),
            ("return_on_human_effort", "Return on Human Effort: successes / (1 + intervention steps) in the window"))}
        for task, w in status["tasks"].items():
            for mode, episodes, successes, ratio in (
                    ("autonomous", w["eval_episodes"], w["eval_successes"], w["autonomous_success_ratio"]),
                    ("supervised", w["episodes"] - w["eval_episodes"], w["successes"] - w["eval_successes"],
                     w["supervised_success_ratio"])):
                by_mode["episodes"].add_metric([task, mode], episodes)
                by_mode["successes"].add_metric([task, mode], successes)
                if ratio is not None:
                    by_mode["success_ratio"].add_metric([task, mode], ratio)
            by_task["steps"].add_metric([task], w["steps"])
            by_task["intervention_steps"].add_metric([task], w["intervention_steps"])
            if w["intervention_ratio"] is not None:
                by_task["intervention_ratio"].add_metric([task], w["intervention_ratio"])
            by_task["return_on_human_effort"].add_metric([task], w["return_on_human_effort"])
        return [seconds, *by_mode.values(), *by_task.values()]

    def _buffer_families(self) -> list:
        steps = GaugeMetricFamily("fleet_buffer_steps", "Steps stored in the buffer", labels=["task", "source"])
        nbytes = GaugeMetricFamily("fleet_buffer_bytes", "Bytes stored in the buffer (estimated per task)",
                                   labels=["task", "source"])
        for (task, source), (n, b) in sorted(self._buffer.items()):
            steps.add_metric([task, source], n)
            nbytes.add_metric([task, source], b)
        return [steps, nbytes]

    def _redis_families(self) -> list:
        used = GaugeMetricFamily("fleet_redis_used_memory_bytes", "Redis used_memory", labels=["node"])
        limit = GaugeMetricFamily("fleet_redis_maxmemory_bytes", "Redis maxmemory (0 = no limit)", labels=["node"])
        for node, (u, m) in redis_memory(self.redis).items():
            used.add_metric([node], u)
            limit.add_metric([node], m)
        return [used, limit]



_installed: FleetCollector | None = None
_installed_lock = threading.Lock()


def install(redis_url: str, window_s: float = WINDOW_S, registry: CollectorRegistry = REGISTRY) -> FleetCollector:
    """Register a collector for ``redis_url`` on ``registry``, replacing the one installed before (one per process).

    It has its own Redis client with short timeouts, so a hung Redis delays a scrape by seconds, not the
    trainer's 30 s socket timeout."""
    from fleet.redis_client import connect

    global _installed
    collector = FleetCollector(connect(redis_url, socket_timeout=5, socket_connect_timeout=2), window_s)
    with _installed_lock:
        if _installed is not None:
            _installed.unregister()
        _installed = collector.register(registry)
    return collector


def uninstall() -> None:
    """Remove the installed collector, if any."""
    global _installed
    with _installed_lock:
        if _installed is not None:
            _installed.unregister()
            _installed = None
