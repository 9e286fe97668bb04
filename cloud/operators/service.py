"""``fleet operators``: M operators shared by the fleet's robots, as one process.

Every ``period_s`` it reads each online robot's last heartbeat from Redis (the help signal the gateway
stores in ``fleet:{r:R}:status``: help_score, help_uncertainty, help_stall, help_risk, help_wanted,
holding, intervening, wanted_for_s, last_seen_s), runs the :class:`~cloud.operators.allocator.Allocator`
on the robots seen within ``stale_after_s``, and writes ``fleet:ops:assignments`` (robot -> operator) and
``fleet:ops:operators``; the gateway answers each robot's heartbeat with its entry, and the edge lets its
teleop act only while it has one. Both hashes expire unless rewritten (``ASSIGNMENTS_TTL_PERIODS``
periods, at least ``ASSIGNMENTS_TTL_MIN_S``): if this process dies, robots lose their operators within
seconds and hold safely instead of following an assignment nobody maintains.

The service is the operator console's backend (``snapshot``, ``thumbnail``, ``take_over``, ``hand_back``;
the HTTP server is ``cloud/operators/console.py``, started with ``console_listen``), and serves the
operator metrics (``fleet_operators_*``, ``fleet_operator_busy_seconds``). A Redis outage is waited out
with capped backoff (``fleet.redis_client.wait_out_outage``), as the trainer does.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from cloud.buffer.layout import OPS_ASSIGNMENTS_KEY
from cloud.buffer.reader import BufferReader, status_number
from cloud.buffer.writer import write_operator_state
from cloud.operators.allocator import Allocator, Assignment, Need
from cloud.operators.config import OperatorsConfig
from fleet import metrics
from fleet.redis_client import REDIS_UNAVAILABLE, connect, wait_out_outage

log = logging.getLogger(__name__)

ASSIGNMENTS_TTL_PERIODS = 20
ASSIGNMENTS_TTL_MIN_S = 5.0


def _num(value, high: float = math.inf) -> float:
    """A status field as a finite float in [0, high] (missing, malformed or not finite: 0)."""
    return status_number(value, 0.0, 0.0, high)


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true")


def need_from_status(robot_id: str, status: dict[str, str], now: float) -> Need:
    """The robot's Need from its status hash (fields the gateway writes; missing ones read as no need).
    ``wanted_for_s`` is aged by the time since the heartbeat, so waits keep growing between heartbeats."""
    wanted, holding = _flag(status.get("help_wanted")), _flag(status.get("holding"))
    waited = _num(status.get("wanted_for_s"))
    if wanted or holding:
        waited += max(now - _num(status.get("last_seen_s"), high=now), 0.0)
    return Need(robot_id=robot_id, score=_num(status.get("help_score"), high=1.0),
                uncertainty=_num(status.get("help_uncertainty"), high=1.0),
                stall=_num(status.get("help_stall"), high=1.0), risk=_num(status.get("help_risk"), high=1.0),
                wanted=wanted, holding=holding, wanted_for_s=waited)


class OperatorsService:
    """The allocator fed from Redis, its assignments written back; the console's backend. Thread-safe: the
    console's take-over/hand-back run on its HTTP threads while :meth:`run` ticks."""

    def __init__(self, cfg: OperatorsConfig, redis=None, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.redis = redis if redis is not None else connect(cfg.redis_url, socket_connect_timeout=5,
                                                             socket_timeout=10)
        self.reader = BufferReader(self.redis)
        self.clock = clock
        self.operator_ids = cfg.operator_ids()
        self.allocator = Allocator(self.operator_ids, cfg.policy, cfg.min_hold_s, cfg.seed)
        self.started_s = clock()
        self.ttl_s = max(ASSIGNMENTS_TTL_MIN_S, ASSIGNMENTS_TTL_PERIODS * cfg.period_s)
        self.console = None
        self._lock = threading.Lock()
        self._statuses: dict[str, dict[str, str]] = {}
        self._needs: dict[str, Need] = {}
        self._fresh: set[str] = set()
        self._now = self.started_s
        self._last_tick: float | None = None
        self._skips = 0
        metrics.init_operators()
        self._busy = {op: metrics.OPERATOR_BUSY.labels(operator=op) for op in self.operator_ids}
        metrics.OPERATORS.set(len(self.operator_ids))
        metrics.OPERATORS_WAIT_ALERT.set(cfg.wait_alert_s)
        metrics.OPERATORS_REDIS_UP.set(1)
        for mode in metrics.OPERATOR_MODES:
            metrics.OPERATORS_ASSIGNMENTS.labels(mode=mode)

    # --- the loop --------------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> dict[str, Assignment]:
        """Read the needs, (re)assign, write the assignments, update the metrics; returns the assignments."""
        statuses = self.reader.robot_needs()
        now = self.clock() if now is None else now
        needs = {rid: need_from_status(rid, st, now) for rid, st in statuses.items()}
        fresh = {rid for rid, st in statuses.items()
                 if now - _num(st.get("last_seen_s"), high=now) <= self.cfg.stale_after_s and st.get("last_seen_s")}
        with self._lock:
            before = self.allocator.assignments
            after = self.allocator.step({rid: needs[rid] for rid in fresh}, now)
            self._statuses, self._needs, self._fresh = statuses, needs, fresh
            self._write(after)
            self._account(before, after, now)
        return after

    def run(self, stop: threading.Event) -> None:
        """Tick every ``period_s`` until ``stop``; the console (if configured) serves meanwhile. On a graceful
        stop the assignments are withdrawn (robots hold rather than follow a stale assignment)."""
        if self.cfg.console_listen:
            self.start_console()
        log.info("operators service: %d operators (%s), policy %s, min hold %.1fs, every %.2fs",
                 len(self.operator_ids), ", ".join(self.operator_ids), self.cfg.policy, self.cfg.min_hold_s,
                 self.cfg.period_s)
        try:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    self.tick()
                except REDIS_UNAVAILABLE as exc:
                    if not self._wait_out_outage(exc, stop):
                        break
                    continue
                except RedisError as exc:  # a malformed key (WRONGTYPE...): skip this tick, counted and logged
                    self._skips += 1
                    log.warning("tick %d skipped: %s: %s", self._skips, type(exc).__name__, exc)
                stop.wait(max(self.cfg.period_s - (time.monotonic() - began), 0.0))
        finally:
            if self.console is not None:
                self.console.stop()
            try:
                write_operator_state(self.redis, {}, {})
            except RedisError as exc:
                log.warning("could not withdraw the assignments on stop (they expire in %.0fs): %s", self.ttl_s, exc)

    def _wait_out_outage(self, exc: BaseException, stop: threading.Event) -> bool:
        metrics.OPERATORS_REDIS_UP.set(0)
        log.warning("Redis is unavailable (%s: %s): assignments stay as they are (expiring in %.0fs) until it is "
                    "back", type(exc).__name__, exc, self.ttl_s)
        back, attempts, waited_s = wait_out_outage(self.redis, stop, OPS_ASSIGNMENTS_KEY)
        if back:
            metrics.OPERATORS_REDIS_UP.set(1)
            log.info("Redis is back after %.1f s (%d attempts)", waited_s, attempts)
            self._last_tick = None  # the outage is not busy time
        return back

    def start_console(self) -> tuple[str, int]:
        """Serve the operator console on ``console_listen``; returns its bound (host, port)."""
        from cloud.operators.console import ConsoleServer, read_token_file  # only a service with a console needs it

        self.console = ConsoleServer(self, self.cfg.console_listen, insecure=self.cfg.console_insecure,
                                     token=read_token_file(self.cfg.console_token_file))
        return self.console.start()

    # --- Redis and metrics -----------------------------------------------------------------------------------

    def _write(self, assignments: dict[str, Assignment]) -> None:
        write_operator_state(
            self.redis,
            {rid: json.dumps({"operator": a.operator, "since_s": a.since_s, "manual": a.manual})
             for rid, a in assignments.items()},
            {op: json.dumps({"kind": self.cfg.kind, "since_s": self.started_s}) for op in self.operator_ids},
            ttl_s=self.ttl_s)

    def _account(self, before: dict[str, Assignment], after: dict[str, Assignment], now: float) -> None:
        if self._last_tick is not None:
            dt = max(now - self._last_tick, 0.0)
            for a in before.values():
                self._busy[a.operator].inc(dt)
        self._last_tick = now
        for rid, a in after.items():
            old = before.get(rid)
            if old is None or old.operator != a.operator:
                self._assigned(rid, a)
        fresh = [self._needs[r] for r in self._fresh]
        queue = [n for n in fresh if n.wants_help and n.robot_id not in after]
        metrics.OPERATORS_ASSIGNED.set(len(after))
        metrics.OPERATORS_UTILISATION.set(len(after) / len(self.operator_ids))
        metrics.OPERATORS_QUEUE.set(len(queue))
        metrics.OPERATORS_WANTING.set(sum(n.wants_help for n in fresh))
        metrics.OPERATORS_HOLDING.set(sum(n.holding for n in fresh))
        metrics.OPERATORS_LONGEST_WAIT.set(max((n.wanted_for_s for n in queue), default=0.0))

    def _assigned(self, robot_id: str, a: Assignment) -> None:
        metrics.OPERATORS_ASSIGNMENTS.labels(mode="manual" if a.manual else "automatic").inc()
        need = self._needs.get(robot_id)
        if need is not None and need.wants_help:
            metrics.OPERATORS_TIME_TO_HELP.observe(need.wanted_for_s)
        log.info("operator %s -> robot %s (%s)", a.operator, robot_id, "take-over" if a.manual else self.cfg.policy)

    # --- the console's backend -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """What the console shows: robots ranked by need (connected first), assignments, each operator's queue."""
        with self._lock:
            assignments = self.allocator.assignments
            fresh_needs = {r: self._needs[r] for r in self._fresh}
            ranked = self.allocator.rank(fresh_needs, self._now)
            ranked += sorted(set(self._needs) - self._fresh)
            queue = self.allocator.queue()
            statuses, needs, fresh, now = self._statuses, self._needs, self._fresh, self._now
        thumbs = self._thumbnails_present(ranked)
        robots = []
        for rid in ranked:
            n, st, a = needs[rid], statuses.get(rid, {}), assignments.get(rid)
            robots.append({"robot_id": rid, "score": n.score, "uncertainty": n.uncertainty, "stall": n.stall,
                           "risk": n.risk, "wanted": n.wanted, "holding": n.holding,
                           "intervening": _flag(st.get("intervening")), "wanted_for_s": n.wanted_for_s,
                           "operator": a.operator if a else "", "manual": bool(a and a.manual),
                           "has_thumbnail": rid in thumbs, "task": st.get("task", ""),
                           "policy_version": int(_num(st.get("policy_version"))), "connected": rid in fresh})
        return {"policy": self.cfg.policy, "now_s": now, "robots": robots,
                "operators": [{"operator_id": op, "robot": next((r for r, a in assignments.items()
                                                                  if a.operator == op), ""),
                               "kind": self.cfg.kind, "queue": q}
                              for op, q in self._queues(assignments, queue).items()]}

    def _queues(self, assignments: dict[str, Assignment], queue: list[str]) -> dict[str, list[str]]:
        """The waiting robots dealt to the operators in the order they become free: free ones first, then those on
        automatic assignments (longest held first); pinned operators take none."""
        held = {a.operator: a for a in assignments.values()}
        order = [op for op in self.operator_ids if op not in held]
        order += sorted((op for op, a in held.items() if not a.manual), key=lambda op: held[op].since_s)
        out = {op: [] for op in self.operator_ids}
        for i, rid in enumerate(queue if order else []):
            out[order[i % len(order)]].append(rid)
        return out

    def _thumbnails_present(self, robot_ids: list[str]) -> set[str]:
        try:
            return set(self.reader.thumbnails_present(robot_ids))
        except RedisError:
            return set()

    def thumbnail(self, robot_id: str) -> bytes | None:
        with self._lock:
            known = robot_id in self._needs
        if not known:
            raise KeyError(f"unknown robot {robot_id!r}")
        return self.reader.thumbnail(robot_id)

    def take_over(self, operator_id: str, robot_id: str) -> None:
        with self._lock:
            now = self.clock()
            self.allocator.take_over(operator_id, robot_id, now)
            assignments = self.allocator.assignments
            self._assigned(robot_id, assignments[robot_id])
            self._write(assignments)

    def hand_back(self, operator_id: str, robot_id: str) -> None:
        with self._lock:
            self.allocator.hand_back(operator_id, robot_id, self.clock())
            log.info("operator %s hands robot %s back", operator_id, robot_id)
            self._write(self.allocator.assignments)
