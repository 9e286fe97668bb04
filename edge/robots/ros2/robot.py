"""The ROS 2 robot backend and its intervention source, over a message transport.

:class:`Ros2Bridge` holds what the transport's callbacks (ROS executor threads) deliver:
synchronised observations (joint state + cameras, approximate-time matched), the
intervention flag, the latest teleop command, and episode-end requests. :class:`Ros2Robot`
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
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge.operator import NoOperator, Operator
from edge.robots.base import Observation, Robot, register_robot
from edge.robots.ros2 import convert
from edge.robots.ros2.config import Ros2Config, load_config
from edge.robots.ros2.sync import ApproximateTimeSync, Matched
from fleet.errors import ConfigError, InvalidInput
from fleet.types import FeatureSpec, Schema

log = logging.getLogger(__name__)

JOINTS = "joints"
"""Sync input name of the joint state topic (cameras use their own names)."""


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

    def now_ns(self) -> int:
        """The ROS clock, for stamping outgoing messages."""
        ...


@dataclass(frozen=True)
class SyncedObservation:
    """Features of one synchronised set of messages."""

    stamp_ns: int
    features: dict[str, np.ndarray]


def schema_for(config: Ros2Config) -> Schema:
    """State: the configured joint fields of joint_names; one RGB image per camera; action per joint."""
    state = FeatureSpec("state", "float32", (len(config.joint_names) * len(config.joint_fields),))
    cams = tuple(FeatureSpec(name, "uint8", (c.height, c.width, 3), is_image=True)
                 for name, c in config.cameras.items())
    return Schema(observation=(state, *cams), action=FeatureSpec("action", "float32", (len(config.action_names),)))


class Ros2Bridge:
    """Thread-safe meeting point of the ROS callbacks and the control thread."""

    def __init__(self, config: Ros2Config, clock_s=time.monotonic):
        self.config = config
        self._clock_s = clock_s
        self._cond = threading.Condition()
        self._latest: SyncedObservation | None = None
        self._intervening = False
        self._teleop: tuple[float, np.ndarray] | None = None
        self._episode_end: bool | None = None
        self.bad_messages = 0
        """Messages that could not be converted (logged and skipped)."""
        self.sync = ApproximateTimeSync([JOINTS, *config.cameras], int(config.slop_s * 1e9), config.queue_size,
                                        self._on_match)

    # ---- transport callbacks (any thread) -------------------------------------------

    def on_joint_state(self, msg: Any) -> None:
        self._guard(lambda: self.sync.add(JOINTS, convert.stamp_ns(msg), msg), "joint state")

    def on_image(self, camera: str, msg: Any) -> None:
        self._guard(lambda: self.sync.add(camera, convert.stamp_ns(msg), msg), f"camera {camera!r}")

    def on_intervention(self, msg: Any) -> None:
        with self._cond:
            self._intervening = bool(msg.data)

    def on_teleop(self, msg: Any) -> None:
        def store() -> None:
            vector = convert.teleop_vector(msg, self.config.teleop_type, self.config.action_names)
            with self._cond:
                self._teleop = (self._clock_s(), vector)

        self._guard(store, "teleop command")

    def on_episode_end(self, success: bool) -> None:
        """Another node asks to end the episode (topic or service): True = success."""
        with self._cond:
            self._episode_end = bool(success)
        log.info("episode end requested over ROS (success=%s)", bool(success))

    def _guard(self, fn, what: str) -> None:
        try:
            fn()
        except InvalidInput as e:  # never let one bad message kill the ROS executor
            self.bad_messages += 1
            if self.bad_messages <= 10 or self.bad_messages % 1000 == 0:
                log.warning("skipping a bad %s message (%d so far): %s", what, self.bad_messages, e)

    def _on_match(self, matched: Matched) -> None:
        joints = matched.messages[JOINTS][1]
        features = {"state": convert.joint_vector(joints, self.config.joint_names, self.config.joint_fields)}
        for name, cam in self.config.cameras.items():
            msg = matched.messages[name][1]
            pixels = convert.compressed_array(msg, name) if cam.compressed else convert.image_array(msg, name)
            if pixels.shape != (cam.height, cam.width, 3):
                raise InvalidInput(f"camera {name!r} sent {pixels.shape}, configured ({cam.height}, {cam.width}, 3)")
            features[name] = pixels
        with self._cond:
            self._latest = SyncedObservation(matched.stamp_ns, features)
            self._cond.notify_all()

    # ---- control thread ----------------------------------------------------------------

    def wait_observation(self, after_ns: int, timeout_s: float) -> SyncedObservation | None:
        """The newest synchronised observation stamped after ``after_ns`` (None on timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None and self._latest.stamp_ns > after_ns, timeout_s)
            latest = self._latest
            return latest if latest is not None and latest.stamp_ns > after_ns else None

    def clear_episode(self) -> None:
        with self._cond:
            self._episode_end = None

    @property
    def episode_end(self) -> bool | None:
        """None while the episode goes on; True/False once ROS asked to end it with success/failure."""
        with self._cond:
            return self._episode_end

    @property
    def intervening(self) -> bool:
        with self._cond:
            return self._intervening

    def teleop_command(self, max_age_s: float) -> np.ndarray | None:
        """The latest teleop command if it is fresher than ``max_age_s``."""
        with self._cond:
            if self._teleop is None or self._clock_s() - self._teleop[0] > max_age_s:
                return None
            return self._teleop[1].copy()


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

    @property
    def is_intervening(self) -> bool:
        return self._intervening


@register_robot("ros2")
class Ros2Robot(Robot):
    """A robot driven over ROS 2 topics (see Ros2Config)."""

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
        """Start the transport (an rclpy node unless one was given)."""
        if self._transport is None:
            from edge.robots.ros2.node import RclpyTransport  # the only rclpy import

            self._transport = RclpyTransport(self.config)
        self._transport.start(self.bridge)
        log.info("ros2 robot up: state from %s, cameras %s, actions to %s (%s)", self.config.joint_state_topic,
                 {n: c.topic for n, c in self.config.cameras.items()}, self.config.action_topic,
                 self.config.action_type)

    def disconnect(self) -> None:
        if self._transport is not None:
            self._transport.stop()
        self._last = None

    def _publish_event(self, event: dict) -> None:
        self.transport.publish_episode(self.transport.types.new(convert.STRING, data=json.dumps(event)))

    def reset(self, task: str) -> Observation:
        """Announce the episode, call the reset service if any, and wait for a fresh observation."""
        if task not in self.tasks:
            raise ConfigError(f"task {task!r} is not one of this robot's tasks {self.tasks}")
        self.bridge.clear_episode()
        cfg = self.config
        if cfg.reset_service and not self.transport.call_reset(cfg.reset_timeout_s):
            raise RuntimeError(f"reset service {cfg.reset_service!r} failed or did not answer within "
                               f"{cfg.reset_timeout_s}s")
        self._episode += 1
        self._publish_event({"event": "start", "episode": self._episode, "task": task})
        synced = self.bridge.wait_observation(self._last_stamp_ns, cfg.reset_timeout_s)
        if synced is None:
            topics = [cfg.joint_state_topic, *(c.topic for c in cfg.cameras.values())]
            raise TimeoutError(f"no synchronised observation on {topics} within {cfg.reset_timeout_s}s "
                               f"(slop {cfg.slop_s}s)")
        return self._observed(synced)

    def observe(self) -> Observation:
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        return self._last

    def act(self, action: np.ndarray) -> Observation:
        """Publish the action; return the next synchronised observation (the episode ends if none comes)."""
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(a)):
            raise InvalidInput(f"action {a} is not finite")
        cfg, transport = self.config, self.transport
        transport.publish_action(convert.action_msg(cfg.action_type, transport.types, cfg.action_names, a,
                                                    transport.now_ns(), cfg.trajectory_time_from_start_s))
        synced = self.bridge.wait_observation(self._last_stamp_ns, cfg.observation_timeout_s)
        if synced is None:
            log.error("no new synchronised observation within %.2fs: ending the episode", cfg.observation_timeout_s)
            self._last = Observation(features=self._last.features, terminated=True)
            self._publish_event({"event": "end", "episode": self._episode, "success": False,
                                 "reason": "observation timeout"})
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
