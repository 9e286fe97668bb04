"""The edge agent: composition root of one robot.

Built in data-flow order, stopped in reverse:

    robot -> control loop (fixed Hz; policy from the PolicySlot; operator) -> recorder (bounded queue;
          its thread encodes frames) -> spool (disk) -> streamer (gRPC, acks) ...... gateway ......
          updater -> PolicySlot (hot-swap between episodes)

The loop only touches the robot, the PolicySlot and the recorder's queue; encoding,
the disk and the network threads never block it. On start the agent acts with the last good policy on
local disk (checksums verified) if there is one, else waits for the first
version from the cloud.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from edge.admission import Admission
from edge.client import FleetClient
from edge.config import EdgeConfig
from edge.help import HelpBoard, HelpScorer
from edge.hotswap import PolicySlot
from edge.images import ImageEncodingSink
from edge.loop import ControlLoop
from edge.operator import AllocatedOperator, NoOperator
from edge.recorder import Recorder
from edge.robots.base import make_robot
from edge.robots.config import MetaWorldConfig
from edge.safety import ActionGuard
from edge.spool import Spool
from edge.streamer import Backoff, Streamer
from edge.updater import LastGood, Updater
from edge.watchdog import Watchdog, notify
from fleet import PROTOCOL_VERSION, __version__, metrics
from fleet.errors import PolicyRefused
from fleet.policies.base import NullPolicy
from fleet.signing import PinnedKeys
from fleet.types import NO_ASSIGNMENT, EpisodeSummary, RobotInfo
from fleet.weights import Manifest

log = logging.getLogger(__name__)


def _robot_args(cfg: EdgeConfig) -> dict:
    """Constructor arguments of the configured backend."""
    if isinstance(cfg.backend, MetaWorldConfig):
        return {"tasks": cfg.tasks, "seed": cfg.backend.seed, "max_episode_steps": cfg.loop.max_episode_steps,
                "held_out_eval": cfg.backend.held_out_eval, "fresh_variants": cfg.backend.fresh_variants}
    return {"tasks": cfg.tasks, "config": cfg.backend}


def build_fleet_policy(manifest: Manifest, tensors):
    from fleet.policies import FleetPolicy

    return FleetPolicy.from_manifest(manifest.config, tensors, version=manifest.version)


class EdgeAgent:
    def __init__(self, cfg: EdgeConfig):
        from fleet.policies import set_torch_threads

        set_torch_threads(cfg.torch_threads)
        self.cfg = cfg
        self.pinned_keys = (PinnedKeys.from_files(cfg.security.policy_public_key_files)
                            if cfg.security.policy_public_key_files else None)
        if self.pinned_keys is None:
            log.warning("robot %s: policies are not authenticated: any version the gateway serves is run (pin the "
                        "publisher's key with --security.policy_public_key_files; development only)", cfg.robot_id)
        else:
            log.info("robot %s: policy versions must be signed by publisher key %s", cfg.robot_id,
                     " or ".join(self.pinned_keys.key_ids))
        state = Path(cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.robot = make_robot(cfg.backend.type, **_robot_args(cfg))
        self.info = RobotInfo(robot_id=cfg.robot_id, embodiment=self.robot.embodiment, schema=self.robot.schema,
                              tasks=tuple(self.robot.tasks), protocol_version=PROTOCOL_VERSION,
                              software_version=__version__, control_hz=cfg.loop.control_hz)
        self.spool = Spool(state / "spool.db", self.robot.schema, max_bytes=cfg.spool.max_bytes,
                           synchronous=cfg.spool.synchronous, quarantine_max_bytes=cfg.spool.quarantine_max_bytes,
                           chunk_steps=cfg.streamer.max_chunk_steps)
        self.client = FleetClient(cfg.gateway, security=cfg.security)
        sc = cfg.streamer
        self.streamer = Streamer(self.info, self.spool, self.client, window_chunks=sc.window_chunks,
                                 max_chunk_steps=sc.max_chunk_steps, flush_interval_s=sc.flush_interval_s,
                                 max_chunk_bytes=sc.max_chunk_bytes, ack_timeout_s=sc.ack_timeout_s,
                                 chunks_per_message=sc.chunks_per_message,
                                 backoff=Backoff(sc.backoff_base_s, sc.backoff_max_s))
        self.last_good = LastGood(state / "policy", self.pinned_keys)
        self.admission = Admission(cfg.policy_max_bytes, state, cfg.policy_architecture_file)
        self.slot = PolicySlot(self._initial_policy())
        self.updater = Updater(cfg.robot_id, self.client, self.slot, build_fleet_policy, self.last_good,
                               self.robot.schema, probe_task=self.robot.tasks[0],
                               have_version=self.slot.current.version, admission=self.admission,
                               pinned_keys=self.pinned_keys)
        if not cfg.interventions:
            operator = NoOperator()
        elif isinstance(cfg.backend, MetaWorldConfig):  # simulation only: a real robot's edge never imports edge.sim
            from edge.sim.operator import SimulatedOperator

            operator = SimulatedOperator(cfg.operator)
        else:  # the robot's own intervention source: a teleoperator or an intervention topic
            operator = self.robot.make_operator()
        self.help_board = HelpBoard(cfg.help_signal)
        if cfg.interventions and cfg.operator.allocation == "allocated":
            operator = AllocatedOperator(operator, self.help_board, cfg.operator.hold)
        self.recorder = Recorder(ImageEncodingSink(self.spool, self.robot.schema, cfg.image_encoding),
                                 self.spool.skip, cfg.robot_id, max_steps=cfg.recorder_max_steps)
        self.guard = ActionGuard(cfg.safety, tuple(self.robot.schema.action.shape), cfg.loop.control_hz, cfg.robot_id,
                                 dtype=self.robot.schema.action.dtype)
        if not cfg.safety.has_limits and not isinstance(cfg.backend, MetaWorldConfig):
            log.warning("robot %s: no safety limits configured: actions are only checked for NaN/Inf (set "
                        "safety.position_min/max, max_velocity: docs/robots.md)", cfg.robot_id)
        self.robot.action_filter = self.guard.operator_filter
        self.loop = ControlLoop(cfg.robot_id, self.robot, self.slot, operator, self.recorder,
                                cfg.loop,
                                on_episode_end=self._on_episode_end, guard=self.guard,
                                scorer=HelpScorer(cfg.help_signal), board=self.help_board)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._last_counts = (0, 0, 0)
        self.watchdog = Watchdog(self._healthy)
        self._watchdog_steps = -1

    def _healthy(self) -> bool:
        """For the systemd watchdog: the control loop, once started, is alive and still stepping."""
        if not self.loop.running:
            return self.slot.current.version == 0 and not self._stop.is_set()  # still waiting for a policy
        steps = self.loop.stats().steps
        progressed, self._watchdog_steps = steps != self._watchdog_steps, steps
        return progressed

    def _initial_policy(self):
        loaded = self.last_good.load()
        if loaded is None:
            return NullPolicy(self.robot.schema.action.shape, self.robot.schema.action.dtype)
        manifest, tensors = loaded
        try:
            self.admission.check(manifest)
        except PolicyRefused as exc:
            log.warning("robot %s: not starting from the last good policy on disk: %s", self.cfg.robot_id, exc)
            return NullPolicy(self.robot.schema.action.shape, self.robot.schema.action.dtype)
        self.admission.accepted(manifest)  # pins the architecture if nothing is pinned yet
        log.info("robot %s: starting from last good policy v%d on disk", self.cfg.robot_id, manifest.version)
        return build_fleet_policy(manifest, tensors)

    def _on_episode_end(self, summary: EpisodeSummary, task: str) -> None:
        outcome = "success" if summary.success else "failure"
        if summary.evaluation:
            outcome = f"eval_{outcome}"
        metrics.EDGE_EPISODES.labels(robot=self.cfg.robot_id, task=task, outcome=outcome).inc()
        metrics.EDGE_POLICY_VERSION.labels(robot=self.cfg.robot_id).set(self.slot.current.version)

    def _heartbeat_loop(self) -> None:
        last_steps, last_t = 0, time.monotonic()
        dropped_seen = self.spool.dropped_steps
        board = self.help_board
        while True:
            board.wake.wait(board.interval_s(self.cfg.heartbeat_interval_s))  # help wanted / assigned: sooner
            board.wake.clear()
            if self._stop.is_set():
                return
            stats = self.loop.stats()
            now = time.monotonic()
            rate = (stats.steps - last_steps) / max(now - last_t, 1e-6)
            last_steps, last_t = stats.steps, now
            steps, nbytes = self.spool.backlog()
            metrics.EDGE_SPOOL_STEPS.labels(robot=self.cfg.robot_id).set(steps)
            metrics.EDGE_SPOOL_BYTES.labels(robot=self.cfg.robot_id).set(nbytes)
            metrics.EDGE_POLICY_VERSION.labels(robot=self.cfg.robot_id).set(self.slot.current.version)
            dropped = self.spool.dropped_steps
            metrics.EDGE_SPOOL_DROPPED.labels(robot=self.cfg.robot_id).inc(max(dropped - dropped_seen, 0))
            dropped_seen = dropped
            try:
                reply = self.client.heartbeat(self.cfg.robot_id, self.slot.current.version, steps, nbytes, "running",
                                              stats.current_task, rate,
                                              stats.intervention_steps / max(stats.steps, 1), help=board.signal,
                                              thumbnail=board.thumbnail(), operator_id=board.operator_id)
                board.assign(reply.assignment)
            except Exception as exc:  # the cloud may be down; the robot carries on
                log.debug("heartbeat failed: %s", exc)
                board.assign(NO_ASSIGNMENT)  # nobody can hand back through a cloud we cannot reach

    def start(self, stop: threading.Event | None = None) -> None:
        """Connect the robot, start the network threads, get a policy, start the loop.

        ``stop`` (e.g. set by SIGTERM) interrupts the wait for a first policy."""
        stop = stop or self._stop
        self.robot.connect()
        self.recorder.start()
        self.streamer.start()
        self.updater.start()
        self._heartbeat.start()
        notify("READY=1\nSTATUS=connecting; waiting for a policy" if self.slot.current.version == 0
               else "READY=1")
        self.watchdog.start()
        if self.slot.current.version == 0:
            log.info("robot %s: waiting for a first policy from %s", self.cfg.robot_id, self.cfg.gateway)
            deadline = time.monotonic() + self.cfg.first_policy_timeout_s
            # Until the first version is acting: the updater may have taken the pending model back to write a
            # newer version into it just as the first arrived (then swap_if_pending finds nothing to swap).
            while not (self.updater.wait_version(1, timeout_s=0.5) and self.slot.swap_if_pending()):
                if stop.wait(0.01):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no policy from {self.cfg.gateway} within {self.cfg.first_policy_timeout_s}s")
        self.loop.start()
        notify(f"STATUS=control loop running with policy v{self.slot.current.version}")
        log.info("robot %s: control loop running at %.0f Hz with policy v%d", self.cfg.robot_id,
                 self.cfg.loop.control_hz, self.slot.current.version)

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Reverse build order: loop, recorder (bounded drain), then wait (bounded) for acks, network, robot."""
        self._stop.set()
        self.help_board.wake.set()
        notify("STOPPING=1")
        self.watchdog.stop()
        if self.loop.running:
            self.loop.stop()
        self.recorder.stop(drain_timeout_s)
        seq = self.spool.last_seq()
        if seq and self.streamer.connected.is_set():
            self.streamer.wait_acked(seq, drain_timeout_s)
        self.updater.stop()
        self.streamer.stop()
        self.robot.disconnect()
        self.client.close()
        self.spool.close()

    def run(self, stop: threading.Event) -> None:
        """Start, run until ``stop`` is set or ``duration_s`` passed, then stop."""
        try:
            self.start(stop)
            stop.wait(self.cfg.duration_s or None)
        finally:
            self.stop()
