"""The fixed-rate control loop: robot <-> policy (or operator) <-> local sink.

It runs on its own thread and never waits on the network: every step goes to a
:class:`StepSink` (the local spool), which must return quickly. Policies are
swapped only between episodes (``PolicySlot.swap_if_pending``).

Each step is handed to the sink one tick late (at the start of the next tick, or
at once when it ends the episode), so that a step interrupted by ``stop`` can
still be recorded as the episode's last one with ``done=True``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge.help import HelpBoard, HelpScorer
from edge.hotswap import PolicySlot
from edge.operator import AllocatedOperator, NoOperator, Operator
from edge.robots.base import Observation, Robot
from edge.safety import ActionGuard, SafetyConfig
from fleet import metrics
from fleet.errors import ConfigError
from fleet.policies.base import ActingPolicy
from fleet.types import EpisodeCounts, EpisodeSummary, Step
from fleet.worker import Worker

log = logging.getLogger(__name__)

TASK_ORDERS = ("round_robin", "random")


@dataclass(frozen=True)
class LoopConfig:
    """How one robot's control loop runs."""

    control_hz: float = 20.0
    """Control rate in ticks per second."""
    max_episode_steps: int = 150
    """Steps after which an episode ends unsuccessfully."""
    eval_every: int = 0
    """Every Nth episode of this robot is an evaluation episode without the operator (0 = never)."""
    task_order: str = "round_robin"
    """How the next episode's task is chosen from the robot's tasks: "round_robin" or "random"."""
    seed: int = 0
    """Seed for the "random" task order."""
    realtime: bool = True
    """Hold ``control_hz``; False runs as fast as possible (tests and benchmarks only)."""
    max_episodes: int = 0
    """Episodes after which the loop thread exits by itself (0 = unlimited)."""
    recent_episodes: int = 100
    """How many recent episode outcomes ``LoopStats.recent`` keeps."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.control_hz) and self.control_hz > 0):
            raise ConfigError(f"control_hz ({self.control_hz}) must be a positive number")
        if self.max_episode_steps < 1:
            raise ConfigError(f"max_episode_steps ({self.max_episode_steps}) must be a positive integer")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every ({self.eval_every}) must be >= 0")
        if self.task_order not in TASK_ORDERS:
            raise ConfigError(f"task_order ({self.task_order!r}) must be one of {TASK_ORDERS}")
        if self.max_episodes < 0:
            raise ConfigError(f"max_episodes ({self.max_episodes}) must be >= 0")
        if self.recent_episodes < 1:
            raise ConfigError(f"recent_episodes ({self.recent_episodes}) must be a positive integer")


class StepSink(Protocol):
    """Where the loop puts each step (the local spool). Must be fast and never block on I/O."""

    def record(
        self,
        episode_id: str,
        task: str,
        evaluation: bool,
        step: Step,
        episode_end: EpisodeSummary | None,
    ) -> None:
        """Take one step; ``episode_end`` is set on the episode's last step; ``step.seq`` is 0."""
        ...


@dataclass
class LoopStats(EpisodeCounts):
    """Counters of one loop; read a consistent copy with ``ControlLoop.stats()``."""

    steps: int = 0
    intervention_steps: int = 0
    interventions: int = 0
    last_tick_jitter_s: float = 0.0
    """How late the last tick started relative to its deadline (0 when not realtime)."""
    max_tick_jitter_s: float = 0.0
    tick_overruns: int = 0
    """Ticks whose work ran past the next tick's deadline (missed deadlines are skipped)."""
    holding_steps: int = 0
    """Steps the robot held still (or fell back to its policy) wanting help with no operator assigned."""
    bad_actions: int = 0
    """Policy actions with NaN/Inf, a wrong shape, or an exception (replaced by the operator's or zeros)."""
    safety_violations: int = 0
    """Actions (policy's or operator's) the safety guard clipped or held."""
    safety_rollbacks: int = 0
    """New policy versions rolled back for violating the safety limits in their first episodes."""
    current_task: str = ""
    current_policy_version: int = 0
    recent: deque[tuple[EpisodeSummary, str]] = field(default_factory=deque)
    """Recent (summary, task) pairs, newest last."""


@dataclass
class _Episode:
    """Per-episode state of the control thread."""

    episode_id: str
    task: str
    evaluation: bool
    operator: Operator
    was_intervening: bool = False
    took_over: bool = False
    interventions: int = 0
    intervention_steps: int = 0
    warned_bad_action: bool = False
    safety_violations: int = 0
    holding: bool = False
    """The last tick held (help wanted, no operator assigned)."""


class ControlLoop:
    """Runs episodes on ``robot`` at ``config.control_hz`` on its own daemon thread.

    The robot must be connected. ``on_episode_end(summary, task)`` is called on the
    control thread after each episode's last step has been recorded. With a help ``scorer`` the loop
    computes the help signal every tick and publishes it on ``board`` (edge/help.py); an
    :class:`AllocatedOperator` with no operator assigned then holds while help is wanted.
    """

    def __init__(
        self,
        robot_id: str,
        robot: Robot,
        slot: PolicySlot,
        operator: Operator,
        sink: StepSink,
        config: LoopConfig,
        on_episode_end: Callable[[EpisodeSummary, str], None] | None = None,
        guard: ActionGuard | None = None,
        scorer: HelpScorer | None = None,
        board: HelpBoard | None = None,
    ):
        if not robot.tasks:
            raise ConfigError(f"robot {robot_id!r} offers no tasks")
        self.robot_id = robot_id
        self.robot = robot
        self.slot = slot
        self.operator = operator
        self.sink = sink
        self.config = config
        self.on_episode_end = on_episode_end
        self._no_operator = NoOperator()
        self.scorer = scorer
        self.board = board
        self._camera = next((f.name for f in robot.schema.observation if f.is_image), None)
        self._rng = np.random.default_rng(config.seed)
        self._period_s = 1.0 / config.control_hz
        self._action_shape = tuple(robot.schema.action.shape)
        self._action_dtype = np.dtype(robot.schema.action.dtype)
        self.guard = guard or ActionGuard(SafetyConfig(), self._action_shape, config.control_hz, robot_id,
                                          dtype=self._action_dtype)
        self._trial_version = 0  # the newly swapped-in version on trial: its own violations may roll it back
        self._trial_episodes = 0
        self._trial_violations = 0
        self._worker = Worker(f"control-{robot_id}", self._run)
        self._cond = threading.Condition()
        self._stats = LoopStats(recent=deque(maxlen=config.recent_episodes))
        self._metrics = metrics.EdgeSeries(robot_id, robot.tasks)
        metrics.EDGE_CONTROL_TARGET.labels(robot=robot_id).set(config.control_hz if config.realtime else 0)
        self._episode_number = 0  # episodes started, for eval_every and round robin
        self.error: BaseException | None = None
        """The exception that ended the loop thread, if any."""

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the control thread (once)."""
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Finish the current step (not the episode) and join; True if the thread ended."""
        return self._worker.stop(timeout_s)

    @property
    def running(self) -> bool:
        """Whether the control thread is alive."""
        return self._worker.running

    def stats(self) -> LoopStats:
        """A consistent copy of the counters."""
        with self._cond:
            snapshot = copy.copy(self._stats)
            snapshot.recent = deque(self._stats.recent, maxlen=self._stats.recent.maxlen)
            return snapshot

    def wait_episodes(self, n: int, timeout_s: float) -> bool:
        """Block until ``n`` episodes have finished in total; False on timeout or if the thread ended first."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._stats.episodes >= n or (self._worker.thread is not None and not self.running),
                timeout_s,
            )
            return self._stats.episodes >= n

    def _run(self) -> None:
        try:
            while not self._worker.stopping.is_set():
                if self.config.max_episodes and self._episode_number >= self.config.max_episodes:
                    break
                self.run_episode()
        except BaseException as e:  # noqa: BLE001 - kept and logged: the thread must not die silently
            self.error = e
            log.exception("control loop %s failed", self.robot_id)
        finally:
            with self._cond:
                self._cond.notify_all()

    # ------------------------------------------------------------------ episodes

    def run_episode(self) -> EpisodeSummary:
        """Run one episode to its end (or until stop) and return its summary."""
        if self.slot.swap_if_pending():
            self._trial_version, self._trial_episodes, self._trial_violations = self.slot.current.version, 0, 0
        self._episode_number += 1
        n = self._episode_number
        evaluation = self.config.eval_every > 0 and n % self.config.eval_every == 0
        ep = _Episode(
            episode_id=f"{self.robot_id}-{uuid.uuid4().hex[:12]}",
            task=self._choose_task(n),
            evaluation=evaluation,
            operator=self._no_operator if evaluation else self.operator,
        )
        self.slot.current.reset()
        ep.operator.reset(ep.task)
        if self.scorer is not None:
            self.scorer.reset()
        self.guard.start_episode()  # before reset: a backend teleoperating during its reset goes through it
        self.robot.set_evaluation(evaluation)
        obs = self.robot.reset(ep.task)
        with self._cond:
            self._stats.current_task = ep.task
            self._stats.current_policy_version = self.slot.current.version
        log.debug("episode %s: task %r evaluation=%s", ep.episode_id, ep.task, evaluation)

        realtime = self.config.realtime
        deadline = time.perf_counter()
        pending: Step | None = None  # previous step, recorded once we know it does not end the episode
        for t in range(self.config.max_episode_steps):
            if realtime:
                remaining = deadline - time.perf_counter()
                if remaining > 0:
                    self._worker.stopping.wait(remaining)  # returns at once on stop
            if pending is not None:
                if self._worker.stopping.is_set():
                    return self._end(ep, pending)
                self._record(ep, pending, None)
            tick_start = time.perf_counter()
            step, obs = self._tick(ep, t, obs)
            self._count_step(ep, tick_start - deadline if realtime else 0.0)
            if step.success or obs.terminated or self._worker.stopping.is_set():
                return self._end(ep, step)
            pending = step
            if realtime:
                deadline = self._next_deadline(deadline)
        assert pending is not None  # max_episode_steps >= 1
        return self._end(ep, pending)

    def _tick(self, ep: _Episode, t: int, obs: Observation) -> tuple[Step, Observation]:
        """One control step: choose (policy, or operator instead), act, build the Step."""
        tick_wall_s = time.time()
        policy = self.slot.current
        version = policy.version
        policy_action = self._policy_action(policy, obs, ep)

        signal = self.scorer.update(obs.features, obs.reward, policy, time.monotonic()) if self.scorer else None

        op_action = ep.operator.decide(obs, policy_action)
        intervening = op_action is not None
        ep.took_over = intervening and not ep.was_intervening
        if ep.was_intervening and not intervening:
            self.slot.current.reset()  # drop an action chunk planned before the take-over
        ep.was_intervening = intervening
        ep.interventions += int(ep.took_over)
        ep.intervention_steps += int(intervening)
        operator = ep.operator if isinstance(ep.operator, AllocatedOperator) else None
        ep.holding = (signal is not None and signal.wanted and not intervening and operator is not None
                      and not operator.acting_for)
        if intervening:
            chosen = np.array(op_action, dtype=self._action_dtype)
        elif ep.holding and operator.hold == "stop":
            chosen = self._hold_action(policy_action)
        else:
            chosen = policy_action
        executed, violations = self.guard.apply(chosen, "operator" if intervening else "policy")
        if violations:  # a hold's stop action is not the policy's: it never counts toward a trial rollback
            self._safety_violation(ep, version, intervening or (ep.holding and operator.hold == "stop"))
        if signal is not None and self.board is not None:
            if ep.holding or intervening:
                signal = dataclasses.replace(signal, holding=ep.holding, intervening=intervening)
            self.board.publish(signal, obs.features.get(self._camera) if self._camera else None,
                               operator.acting_for if operator is not None else "")

        new_obs = self.robot.act(executed)
        step = Step(
            seq=0,
            index=t,
            observation=obs.features,
            policy_action=policy_action,
            action=executed,
            is_intervention=intervening,
            reward=float(new_obs.reward),
            success=bool(new_obs.success),
            done=False,
            policy_version=version,
            timestamp_s=tick_wall_s,
            help_score=signal.score if signal is not None else 0.0,
        )
        return step, new_obs

    def _policy_action(self, policy: ActingPolicy, obs: Observation, ep: _Episode) -> np.ndarray:
        """The policy's action; on NaN/Inf, a wrong shape or an exception: roll back and return zeros."""
        try:
            t0 = time.perf_counter()
            action = np.array(policy.select_action(obs.features, ep.task), dtype=self._action_dtype)
            self._metrics.inference(time.perf_counter() - t0)
            bad = "" if action.shape == self._action_shape and np.all(np.isfinite(action)) else repr(action)
        except Exception as e:  # noqa: BLE001 - a broken policy must not stop the robot's loop
            log.exception("policy v%d failed in select_action", policy.version)
            bad = f"{type(e).__name__}: {e}"
        if not bad:
            return action
        with self._cond:
            self._stats.bad_actions += 1
        self._metrics.bad_action()
        if self.slot.rollback(f"policy v{policy.version} produced a bad action ({bad})"):
            log.warning(
                "policy v%d produced a bad action; rolled back to v%d", policy.version, self.slot.current.version
            )
        elif not ep.warned_bad_action:
            log.warning(
                "policy v%d produced a bad action (%s) and there is nothing to roll back to; "
                "acting with the operator's or a zero action",
                policy.version,
                bad,
            )
        ep.warned_bad_action = True
        return np.zeros(self._action_shape, dtype=self._action_dtype)

    def _hold_action(self, policy_action: np.ndarray) -> np.ndarray:
        """What keeps the robot still (``Robot.stop_action``): zeros, or the last action sent (the policy's
        action when nothing was sent yet this episode: there is no position to hold)."""
        if self.robot.stop_action == "zero":
            return np.zeros(self._action_shape, dtype=self._action_dtype)
        last = self.guard.last_sent
        return policy_action if last is None else last.astype(self._action_dtype).reshape(self._action_shape)

    def _safety_violation(self, ep: _Episode, version: int, intervening: bool) -> None:
        """Count it; a version on trial whose own actions keep violating the limits is rolled back."""
        ep.safety_violations += 1
        with self._cond:
            self._stats.safety_violations += 1
        limit = self.guard.config.rollback_violations
        if intervening or not limit or version != self._trial_version:
            return
        self._trial_violations += 1
        if self._trial_violations < limit:
            return
        self._trial_version = 0
        if self.slot.rollback(f"policy v{version} violated the safety limits {self._trial_violations} times in "
                              f"its first {self._trial_episodes + 1} episode(s)"):
            with self._cond:
                self._stats.safety_rollbacks += 1
            log.warning("policy v%d rolled back to v%d: its actions violated the safety limits %d times",
                        version, self.slot.current.version, limit)

    def _end(self, ep: _Episode, last: Step) -> EpisodeSummary:
        """Record ``last`` as the episode's final step and update the counters."""
        summary = EpisodeSummary(
            success=last.success,
            num_steps=last.index + 1,
            intervention_steps=ep.intervention_steps,
            interventions=ep.interventions,
            evaluation=ep.evaluation,
            policy_version=self.slot.current.version,
        )
        self._record(ep, last, summary)
        if self._trial_version:
            self._trial_episodes += 1
            if self._trial_episodes >= self.guard.config.rollback_episodes:
                self._trial_version = 0  # it passed its trial
        with self._cond:
            s = self._stats
            s.count_episode(summary.success, summary.evaluation)
            s.recent.append((summary, ep.task))
            self._cond.notify_all()
        log.info(
            "episode %s done: task=%r success=%s steps=%d interventions=%d eval=%s policy=v%d safety_violations=%d",
            ep.episode_id, ep.task, summary.success, summary.num_steps, summary.interventions,
            summary.evaluation, summary.policy_version, ep.safety_violations,
        )  # fmt: skip
        if self.on_episode_end is not None:
            self.on_episode_end(summary, ep.task)
        return summary

    def _record(self, ep: _Episode, step: Step, summary: EpisodeSummary | None) -> None:
        step.done = summary is not None
        self.sink.record(ep.episode_id, ep.task, ep.evaluation, step, summary)

    # --------------------------------------------------------------------- parts

    def _choose_task(self, episode_number: int) -> str:
        tasks = self.robot.tasks
        if self.config.task_order == "random":
            return tasks[int(self._rng.integers(len(tasks)))]
        return tasks[(episode_number - 1) % len(tasks)]

    def _count_step(self, ep: _Episode, jitter_s: float) -> None:
        with self._cond:
            s = self._stats
            s.steps += 1
            s.intervention_steps += int(ep.was_intervening)
            s.holding_steps += int(ep.holding)
            s.interventions += int(ep.took_over)
            s.last_tick_jitter_s = jitter_s
            s.max_tick_jitter_s = max(s.max_tick_jitter_s, jitter_s)
        self._metrics.step(ep.task, ep.was_intervening, ep.took_over, jitter_s if self.config.realtime else None)

    def _next_deadline(self, deadline: float) -> float:
        """The next tick's deadline on the fixed grid; skip (and count) deadlines already missed."""
        deadline += self._period_s
        now = time.perf_counter()
        if now > deadline:
            deadline += math.ceil((now - deadline) / self._period_s) * self._period_s
            with self._cond:
                self._stats.tick_overruns += 1
            self._metrics.overrun()
        return deadline
