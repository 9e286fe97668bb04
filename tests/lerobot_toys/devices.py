"""The toy LeRobot robot and teleoperator."""

from __future__ import annotations

from typing import Any

import numpy as np
from lerobot.robots import Robot
from lerobot.teleoperators import Teleoperator, TeleopEvents

from tests.lerobot_toys.config import ToyArmConfig, ToyLeaderConfig

ARMS: dict[str, ToyArm] = {}
"""Connected toy arms by id (the toy operator looks at its arm to judge success)."""


class ToyArm(Robot):
    config_class = ToyArmConfig
    name = "toy_arm"

    def __init__(self, config: ToyArmConfig):
        super().__init__(config)
        self.config = config
        self.positions = np.zeros(config.n_joints)
        self.sent: list[dict[str, float]] = []
        self.reset_pending = False
        """Set by the toy operator on success: the "human" puts the joints back to 0 before the next command."""
        self._connected = False

    @property
    def _joints(self) -> list[str]:
        return [f"j{i}.pos" for i in range(self.config.n_joints)]

    @property
    def observation_features(self) -> dict:
        features: dict[str, Any] = {j: float for j in self._joints}
        if self.config.camera_height:
            features["wrist"] = (self.config.camera_height, self.config.camera_width, 3)
        return features

    @property
    def action_features(self) -> dict:
        return {j: float for j in self._joints}

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = True) -> None:
        self._connected = True
        ARMS[self.id] = self

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def get_observation(self) -> dict[str, Any]:
        assert self._connected
        obs: dict[str, Any] = {j: float(p) for j, p in zip(self._joints, self.positions)}
        if self.config.camera_height:
            level = np.clip(self.positions[:3] * 100 + 100, 0, 255).astype(np.uint8)
            frame = np.zeros((self.config.camera_height, self.config.camera_width, 3), dtype=np.uint8)
            frame[..., : len(level)] = level
            frame[0, 0] = len(self.sent) % 256  # changes every tick
            obs["wrist"] = frame
        return obs

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        assert self._connected
        if self.reset_pending:
            self.positions = np.zeros_like(self.positions)
            self.reset_pending = False
        target = np.array([action[j] for j in self._joints])
        self.positions = self.positions + self.config.gain * (target - self.positions)
        self.sent.append(dict(action))
        return action

    def disconnect(self) -> None:
        self._connected = False
        ARMS.pop(self.id, None)


class ToyLeader(Teleoperator):
    config_class = ToyLeaderConfig
    name = "toy_leader"

    def __init__(self, config: ToyLeaderConfig):
        super().__init__(config)
        self.config = config
        self.ticks = 0
        self._connected = False

    @property
    def action_features(self) -> dict:
        arm = ARMS.get(self.config.arm_id)
        n = arm.config.n_joints if arm else 3
        return {f"j{i}.pos": float for i in range(n)}

    @property
    def feedback_features(self) -> dict:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = True) -> None:
        self._connected = True

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def get_action(self) -> dict[str, Any]:
        self.ticks += 1
        return {name: self.config.goal for name in self.action_features}

    def _in_window(self) -> bool:
        phase = self.ticks % self.config.period
        return self.config.intervene_from <= phase < self.config.intervene_from + self.config.intervene_steps

    def get_teleop_events(self) -> dict[Any, bool]:
        if not self.config.with_events:
            return {}
        arm = ARMS.get(self.config.arm_id)
        at_goal = arm is not None and bool(np.all(np.abs(arm.positions - self.config.goal) < self.config.tolerance))
        events = {TeleopEvents.IS_INTERVENTION: self._in_window(), TeleopEvents.SUCCESS: at_goal,
                  TeleopEvents.TERMINATE_EPISODE: False}
        if at_goal and arm is not None:
            arm.reset_pending = True
        return events

    def send_feedback(self, feedback: dict[str, Any]) -> None:
        pass

    def disconnect(self) -> None:
        self._connected = False
