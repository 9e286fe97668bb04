"""Where the ROS callbacks meet the control thread: synchronised observations, the intervention flag,
the latest teleop command and episode-end requests, behind one condition variable."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet import ros2_convert as convert
from edge.robots.ros2.config import Ros2Config
from edge.robots.ros2.sync import ApproximateTimeSync, Matched
from fleet.errors import InvalidInput

log = logging.getLogger(__name__)

JOINTS = "joints"
"""Sync input name of the joint state topic (cameras use their own names)."""


@dataclass(frozen=True)
class SyncedObservation:
    """Features of one synchronised set of messages."""

    stamp_ns: int
    """The newest header stamp of the set."""
    features: dict[str, np.ndarray]
    oldest_ns: int = 0
    """The oldest header stamp of the set (what max_sensor_age_s is checked against)."""


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
        self.received: dict[str, int] = dict.fromkeys([JOINTS, *config.cameras], 0)
        """Sensor messages received per sync input (joints, then each camera), good or bad."""
        self.sync = ApproximateTimeSync([JOINTS, *config.cameras], int(config.slop_s * 1e9), config.queue_size,
                                        self._on_match)

    # ---- transport callbacks (any thread) -------------------------------------------

    def on_joint_state(self, msg: Any) -> None:
        self._count(JOINTS)
        self._guard(lambda: self.sync.add(JOINTS, convert.stamp_ns(msg), msg), "joint state")

    def on_image(self, camera: str, msg: Any) -> None:
        self._count(camera)
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

    def _count(self, name: str) -> None:
        with self._cond:
            self.received[name] += 1
            self._cond.notify_all()

    def silent_inputs(self) -> list[str]:
        """Sync inputs (joints, camera names) that have delivered nothing yet."""
        with self._cond:
            return [name for name, n in self.received.items() if n == 0]

    def wait_any(self, timeout_s: float) -> None:
        """Sleep until a sensor message or an observation arrives (or the timeout passes)."""
        with self._cond:
            self._cond.wait(timeout_s)

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
            oldest = min(stamp for stamp, _msg in matched.messages.values())
            self._latest = SyncedObservation(matched.stamp_ns, features, oldest)
            self._cond.notify_all()

    # ---- control thread ----------------------------------------------------------------

    def wait_observation(self, after_ns: int, timeout_s: float) -> SyncedObservation | None:
        """The newest synchronised observation stamped after ``after_ns`` (None on timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None and self._latest.stamp_ns > after_ns, timeout_s)
            latest = self._latest
            return latest if latest is not None and latest.stamp_ns > after_ns else None

    def latest_stamp_ns(self) -> int:
        """Stamp of the newest synchronised observation so far (-1: none)."""
        with self._cond:
            return -1 if self._latest is None else self._latest.stamp_ns

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
