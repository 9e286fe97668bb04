"""The ROS 2 robot backend and its intervention source, over a message transport.

:class:`~edge.robots.ros2.bridge.Ros2Bridge` (bridge.py) holds what the transport's callbacks
(ROS executor threads) deliver: synchronised observations (joint state + cameras,
approximate-time matched), the intervention flag, the latest teleop command, and episode-end
requests. :class:`Ros2Robot`
(the control thread) publishes actions through the transport and waits for the next
synchronised observation. The transport on a robot is ``node.RclpyTransport``; tests use
one that hands messages over in-process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from edge.operator import NoOperator, Operator
from edge.robots.base import Observation, Robot, register_robot
from fleet import ros2_convert as convert
from edge.robots.ros2.bridge import JOINTS, Ros2Bridge, SyncedObservation
from edge.robots.ros2.config import Ros2Config, load_config
from fleet import metrics
from fleet.errors import ConfigError, InvalidInput
from fleet.types import FeatureSpec, Schema

log = logging.getLogger(__name__)

__all__ = ["JOINTS", "Disconnected", "Ros2Bridge", "Ros2Operator", "Ros2Robot", "SyncedObservation", "Transport",
           "schema_for"]


class Transport(Protocol):
    """How the robot meets ROS: subscriptions feed a bridge; actions and events are published."""

    types: convert.MessageTypes

    def start(self, bridge: Ros2Bridge) -> None:
        """Subscribe (callbacks call the bridge), advertise, and start delivering messages."""
        ...

    def stop(self) -> None:
        """Stop delivering and release everything (safe to call twice)."""
        ...

    def publish_action(self, msg: Any) -> None:
        """Publish one action message on the action topic."""
        ...

    def publish_episode(self, msg: Any) -> None:
        """Publish one std_msgs/String episode event."""
        ...

    def call_reset(self, timeout_s: float) -> bool:
        """Call the reset service; True if it answered success within the timeout."""
        ...

    def topic_types(self) -> dict[str, list[str]]:
        """The ROS graph: topic -> message types its publishers and subscribers use (this node's included)."""
        ...

    def wait_reset_service(self, timeout_s: float) -> bool:
        """Whether the reset service is available within the timeout (True when none is configured)."""
        ...

    def now_ns(self) -> int:
        """The ROS clock, for stamping outgoing messages."""
        ...

def schema_for(config: Ros2Config) -> Schema:
    """State: the configured joint fields of joint_names; one RGB image per camera; action per joint."""
    state = FeatureSpec("state", "float32", (len(config.joint_names) * len(config.joint_fields),))
    cams = tuple(FeatureSpec(name, "uint8", (c.height, c.width, 3), is_image=True)
                 for name, c in config.cameras.items())
    return Schema(observation=(state, *cams), action=FeatureSpec("action", "float32", (len(config.action_names),)))

class Ros2Operator(Operator):
    """The operator holds control while the intervention topic says true; its teleop commands are executed."""

    def __init__(self, bridge: Ros2Bridge):
        self.bridge = bridge
        self._intervening = False
        self._warned = False

    def reset(self, task: str) -> None:
        self._intervening = False
        self._warned = False

    def decide(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        command = None
        if self.bridge.intervening:
            command = self.bridge.teleop_command(self.bridge.config.teleop_timeout_s)
            if command is None and not self._warned:
                self._warned = True
                log.warning("intervention is on but no teleop command on %s within %.2f s: the policy keeps "
                            "control", self.bridge.config.teleop_topic, self.bridge.config.teleop_timeout_s)
        self._intervening = command is not None
        return command

    def command(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """The teleop topic's command whatever the intervention topic says (a console take-over); None if no
        fresh one arrived within ``teleop_timeout_s``."""
        command = self.bridge.teleop_command(self.bridge.config.teleop_timeout_s)
        self._intervening = command is not None
        return command

    @property
    def is_intervening(self) -> bool:
        return self._intervening


HOLD_REPORT_S = 5.0
"""While holding, how often the robot logs that it still is."""


class Disconnected(RuntimeError):
    """The robot was disconnected while it waited (holding) for sensor data."""


@register_robot("ros2")
class Ros2Robot(Robot):
    """A robot driven over ROS 2 topics (see Ros2Config).

    It never acts on stale data: an observation whose oldest message is older than
    ``max_sensor_age_s``, or none within ``observation_timeout_s`` (the driver died, a camera
    stopped), ends the episode, and the next ``reset`` holds (publishes nothing) until fresh
    data comes back and the reset service answers again, then goes on.
    """

    def __init__(self, tasks: Sequence[str], config: Mapping[str, Any] | Ros2Config,
                 transport: Transport | None = None):
        if isinstance(tasks, str) or len(tasks) == 0:
            raise ConfigError(f"tasks ({tasks!r}) must be a non-empty sequence of instructions")
        self.config = load_config(config)
        self.tasks = tuple(dict.fromkeys(tasks))
        self.schema = schema_for(self.config)
        self.embodiment = self.config.embodiment
        self.bridge = Ros2Bridge(self.config)
        self._transport = transport
        self._last: Observation | None = None
        self._last_stamp_ns = -1
        self._episode = 0
        self._closing = threading.Event()
        self.holds = 0
        """Times the robot stopped commanding (stale or missing sensor data, reset service gone)."""
        self.last_action_stamp_ns = 0
        """Header stamp (this node's clock) of the last action published."""
        self.last_observation_stamp_ns = 0
        """Newest header stamp of the observation the last action was chosen from."""
        self._holds_metric = metrics.EDGE_ROS2_HOLDS.labels(node=self.config.node_name)
        self._holding_metric = metrics.EDGE_ROS2_HOLDING.labels(node=self.config.node_name)

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise RuntimeError("robot is not connected: call connect() or use it as a context manager")
        return self._transport

    def make_operator(self) -> Operator:
        """Interventions from the intervention + teleop topics (NoOperator if either is off)."""
        if self.config.intervention_topic and self.config.teleop_topic:
            return Ros2Operator(self.bridge)
        return NoOperator()

    def connect(self) -> None:
        """Start the transport (an rclpy node unless one was given) and check what the robot offers.

        Raises ConfigError naming the topic when a configured topic carries another message type,
        or when the joint state or a camera topic sends nothing (or the reset service does not
        appear) within ``startup_timeout_s``."""
        if self._transport is None:
            from edge.robots.ros2.node import RclpyTransport  # the only rclpy import

            self._transport = RclpyTransport(self.config)
        self._closing.clear()
        self._transport.start(self.bridge)
        try:
            self._check_startup()
        except BaseException:
            self._transport.stop()
            raise
        log.info("ros2 robot up: state from %s, cameras %s, actions to %s (%s)", self.config.joint_state_topic,
                 {n: c.topic for n, c in self.config.cameras.items()}, self.config.action_topic,
                 self.config.action_type)

    def _expected_types(self) -> dict[str, str]:
        """Configured topic -> the message type this robot uses on it."""
        cfg = self.config
        expected = {cfg.joint_state_topic: convert.JOINT_STATE,
                    cfg.action_topic: convert.ACTION_MSGTYPES[cfg.action_type],
                    cfg.intervention_topic: convert.BOOL,
                    cfg.teleop_topic: convert.TELEOP_MSGTYPES[cfg.teleop_type],
                    cfg.episode_end_topic: convert.BOOL, cfg.episode_topic: convert.STRING}
        for cam in cfg.cameras.values():
            expected[cam.topic] = convert.COMPRESSED_IMAGE if cam.compressed else convert.IMAGE
        expected.pop("", None)
        return expected

    def _check_startup(self) -> None:
        cfg, transport = self.config, self.transport
        topics = {JOINTS: cfg.joint_state_topic, **{name: c.topic for name, c in cfg.cameras.items()}}
        expected = self._expected_types()
        deadline = time.monotonic() + cfg.startup_timeout_s
        while True:
            graph = transport.topic_types()
            for topic, want in expected.items():
                foreign = sorted(set(graph.get(topic, ())) - {want})
                if foreign:
                    raise ConfigError(f"ros2: topic {topic} carries {', '.join(foreign)}; this robot is configured "
                                      f"to use {want} there (a wrong topic, or the wrong *_type in the config)")
            silent = [topics[name] for name in self.bridge.silent_inputs()]
            if not silent:
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"ros2: no message on {', '.join(silent)} within startup_timeout_s "
                                  f"({cfg.startup_timeout_s}s): is the driver running, on this ROS_DOMAIN_ID, and "
                                  f"publishing there? (topics seen: {sorted(graph) or 'none'})")
            self.bridge.wait_any(0.05)
        if cfg.reset_service and not transport.wait_reset_service(max(deadline - time.monotonic(), 0.1)):
            raise ConfigError(f"ros2: reset service {cfg.reset_service} (std_srvs/Trigger) did not appear within "
                              f"startup_timeout_s ({cfg.startup_timeout_s}s)")

    def disconnect(self) -> None:
        self._closing.set()
        if self._transport is not None:
            self._transport.stop()
        self._last = None

    def _publish_event(self, event: dict) -> None:
        self.transport.publish_episode(self.transport.types.new(convert.STRING, data=json.dumps(event)))

    # ---- holding ---------------------------------------------------------------------

    def _stale_by_s(self, synced: SyncedObservation) -> float:
        """How much older than max_sensor_age_s the observation is (<= 0: fresh enough)."""
        if not self.config.max_sensor_age_s:
            return 0.0
        return (self.transport.now_ns() - synced.oldest_ns) / 1e9 - self.config.max_sensor_age_s

    def _fresh_observation(self, why: str, after_ns: int) -> SyncedObservation:
        """A fresh observation stamped after ``after_ns``; holds (sends nothing, reports it) until there is one."""
        held_since = reported = None
        while True:
            if self._closing.is_set():
                raise Disconnected("the robot was disconnected while holding for fresh sensor data")
            synced = self.bridge.wait_observation(after_ns, min(self.config.reset_timeout_s, 0.5))
            late_s = None if synced is None else self._stale_by_s(synced)
            if synced is not None:
                after_ns = synced.stamp_ns  # if it is stale, wait for a newer one
            if late_s is not None and late_s <= 0:
                if held_since is not None:
                    log.warning("fresh sensor data again after holding %.1fs: resuming", time.monotonic() - held_since)
                    self._holding_metric.set(0)
                return synced
            now = time.monotonic()
            if held_since is None:
                max_age = self.config.max_sensor_age_s
                self._hold(why if synced is None else f"the newest observation is {late_s + max_age:.2f}s old "
                           f"(max_sensor_age_s {max_age}s)")
                held_since = reported = now
            elif now - reported > HOLD_REPORT_S:
                reported = now
                log.warning("still holding after %.0fs (sensor data on %s: %s)", now - held_since,
                            self.config.joint_state_topic, "stale" if synced is not None else "none")

    def _hold(self, reason: str) -> None:
        self.holds += 1
        self._holds_metric.inc()
        self._holding_metric.set(1)
        log.warning("holding, sending no commands: %s", reason)

    # ---- episodes ----------------------------------------------------------------------

    def reset(self, task: str) -> Observation:
        """Announce the episode and call the reset service (each once sensor data is fresh), then wait for
        a fresh observation. Holds (sending nothing) while sensor data is stale or missing or the reset
        service does not answer; raises Disconnected if ``disconnect`` is called meanwhile."""
        if task not in self.tasks:
            raise ConfigError(f"task {task!r} is not one of this robot's tasks {self.tasks}")
        self.bridge.clear_episode()
        cfg = self.config
        why = f"no synchronised observation on {self._sensor_topics()} (slop {cfg.slop_s}s)"
        while True:
            self._fresh_observation(why, -1)  # the sensors are alive (the latest observation is fresh)
            if not cfg.reset_service or self.transport.call_reset(cfg.reset_timeout_s):
                break
            self._hold(f"reset service {cfg.reset_service!r} failed or did not answer within {cfg.reset_timeout_s}s")
        self._holding_metric.set(0)
        floor = self.bridge.latest_stamp_ns() if cfg.reset_service else -1  # the first observation after it
        self._episode += 1
        self._publish_event({"event": "start", "episode": self._episode, "task": task})
        return self._observed(self._fresh_observation(why, floor))

    def _sensor_topics(self) -> list[str]:
        return [self.config.joint_state_topic, *(c.topic for c in self.config.cameras.values())]

    def observe(self) -> Observation:
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        return self._last

    def act(self, action: np.ndarray) -> Observation:
        """Publish the action; return the next synchronised observation. The episode ends if none comes
        within ``observation_timeout_s`` or it is older than ``max_sensor_age_s``."""
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(a)):
            raise InvalidInput(f"action {a} is not finite")
        cfg, transport = self.config, self.transport
        stamp = transport.now_ns()
        transport.publish_action(convert.action_msg(cfg.action_type, transport.types, cfg.action_names, a,
                                                    stamp, cfg.trajectory_time_from_start_s))
        self.last_action_stamp_ns, self.last_observation_stamp_ns = stamp, self._last_stamp_ns
        synced = self.bridge.wait_observation(self._last_stamp_ns, cfg.observation_timeout_s)
        late_s = None if synced is None else self._stale_by_s(synced)
        if synced is None or late_s > 0:
            reason = "observation timeout" if synced is None else "stale sensor data"
            log.error("%s: ending the episode (%s)", reason, f"none within {cfg.observation_timeout_s:.2f}s"
                      if synced is None else f"{late_s + cfg.max_sensor_age_s:.2f}s old")
            self._last = Observation(features=self._last.features, terminated=True)
            self._publish_event({"event": "end", "episode": self._episode, "success": False, "reason": reason})
            return self._last
        obs = self._observed(synced)
        if obs.terminated or obs.success:
            self._publish_event({"event": "end", "episode": self._episode, "success": obs.success})
        return obs

    def _observed(self, synced: SyncedObservation) -> Observation:
        self._last_stamp_ns = synced.stamp_ns
        end = self.bridge.episode_end
        success = bool(end)
        self._last = Observation(features=synced.features, reward=float(success), success=success,
                                 terminated=end is not None)
        return self._last
