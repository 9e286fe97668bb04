"""Any LeRobot robot (SO-100/101, Koch, LeKiwi, ...) with a LeRobot teleoperator as the operator.

Configured the LeRobot way (``lerobot_config.py``): the edge config's ``backend`` with
``type: lerobot`` embeds LeRobot's ``RobotConfig`` and ``TeleoperatorConfig`` choice registries, e.g.::

    --backend.type=lerobot --backend.robot.type=so101_follower --backend.robot.port=/dev/ttyACM0
    --backend.teleop.type=so101_leader --backend.teleop.port=/dev/ttyACM1

Mapping to the fleet schema: the robot's scalar observation features (``"shoulder_pan.pos"``,
...) become one float32 ``state`` vector in ``observation_features`` order; each camera (a
``(H, W, C)`` feature) becomes an image feature of the same name; the action is one float32
vector in ``action_features`` order (``state_names``/``action_names`` keep the names).

Interventions (``lerobot_teleop.TeleopOperator``): the teleoperator's action replaces the policy's while
the operator holds control. Who holds control comes from the ``intervention`` trigger: the
device's ``get_teleop_events()`` (gamepad, keyboard), motion of the device (a leader arm picked
up), always, or never. Success/failure/terminate events end the episode with that outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.operator import NoOperator, Operator
from edge.robots.base import Observation, Robot, register_robot
from edge.robots.lerobot_config import LeRobotBackendConfig
from edge.robots.lerobot_teleop import TeleopLink, TeleopOperator
from fleet.errors import ConfigError, InvalidInput
from fleet.types import FeatureSpec, Schema

log = logging.getLogger(__name__)

STATE = "state"
ACTION = "action"

def load_backend_config(section: Mapping[str, Any] | LeRobotBackendConfig) -> LeRobotBackendConfig:
    """The ``backend`` section with ``type: lerobot`` (a mapping as in a config file, without ``type``)."""
    if isinstance(section, LeRobotBackendConfig):
        return section
    from fleet.config import load

    return load(LeRobotBackendConfig, {k: v for k, v in dict(section).items() if k != "type"}, "backend")


@dataclass(frozen=True)
class FeatureMap:
    """How a LeRobot robot's flat feature dicts map to the fleet schema."""

    schema: Schema
    state_names: tuple[str, ...]
    """LeRobot observation keys concatenated, in order, into ``state``."""
    image_names: tuple[str, ...]
    """LeRobot observation keys that are camera frames (same names in the schema)."""
    array_names: tuple[str, ...]
    """Other array-valued observation keys (kept as their own float32 features)."""
    action_names: tuple[str, ...]
    """LeRobot action keys, in the order of the action vector."""

    def observation(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A LeRobot observation dict -> fleet features (``state`` + images + arrays)."""
        try:
            features = {STATE: np.array([float(raw[k]) for k in self.state_names], dtype=np.float32)}
            for name in self.image_names:
                features[name] = _image(name, raw[name], self.schema.observation_spec(name).shape)
            for name in self.array_names:
                features[name] = np.asarray(raw[name], dtype=np.float32)
        except KeyError as e:
            raise InvalidInput(f"the robot's observation lacks feature {e.args[0]!r}") from None
        return features

    def action_dict(self, action: np.ndarray) -> dict[str, float]:
        """An action vector -> LeRobot's action dict."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (len(self.action_names),):
            raise InvalidInput(f"action shape {a.shape} != ({len(self.action_names)},)")
        if not np.all(np.isfinite(a)):
            raise InvalidInput(f"action {a} is not finite")
        return {name: float(v) for name, v in zip(self.action_names, a)}

    def action_vector(self, action: Mapping[str, Any], source: str) -> np.ndarray:
        """A LeRobot action dict (e.g. a teleoperator's) -> action vector in schema order."""
        missing = [n for n in self.action_names if n not in action]
        if missing:
            raise InvalidInput(f"{source} action lacks {missing} (it has {sorted(action)})")
        return np.array([float(action[n]) for n in self.action_names], dtype=np.float32)


def _image(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    pixels = np.asarray(value)
    if pixels.dtype != np.uint8 or pixels.shape != shape:
        raise InvalidInput(f"camera {name!r} frame is {pixels.dtype} {pixels.shape}, expected uint8 {shape}")
    return pixels


def feature_map(observation_features: Mapping[str, Any], action_features: Mapping[str, Any]) -> FeatureMap:
    """Build the schema from LeRobot's ``observation_features``/``action_features``."""
    state, images, arrays, specs = [], [], [], []
    for key, kind in observation_features.items():
        if isinstance(kind, tuple) and len(kind) == 3:
            images.append(key)
            specs.append(FeatureSpec(key, "uint8", kind, is_image=True))
        elif isinstance(kind, tuple):
            arrays.append(key)
            specs.append(FeatureSpec(key, "float32", kind))
        elif kind in (float, int, bool):
            state.append(key)
        else:
            raise ConfigError(f"observation feature {key!r} has unsupported kind {kind!r}")
    if STATE in images + arrays:
        raise ConfigError(f"the robot has an observation feature named {STATE!r}; it clashes with the state vector")
    bad = {k: v for k, v in action_features.items() if v not in (float, int)}
    if bad or not action_features:
        raise ConfigError(f"actions must be non-empty scalar features; unsupported: {bad}")
    specs.insert(0, FeatureSpec(STATE, "float32", (len(state),)))
    schema = Schema(observation=tuple(specs), action=FeatureSpec(ACTION, "float32", (len(action_features),)))
    return FeatureMap(schema, tuple(state), tuple(images), tuple(arrays), tuple(action_features))


@register_robot("lerobot")
class LeRobotRobot(Robot):
    """A ``lerobot.robots.Robot`` (and its teleoperators) behind the fleet's Robot seam."""

    def __init__(self, tasks: Sequence[str], config: Mapping[str, Any] | LeRobotBackendConfig):
        """``config``: the edge config's ``backend`` (a LeRobotBackendConfig, or its fields as a mapping)."""
        if isinstance(tasks, str) or len(tasks) == 0:
            raise ConfigError(f"tasks ({tasks!r}) must be a non-empty sequence of instructions")
        from lerobot.robots import make_robot_from_config
        from lerobot.teleoperators import make_teleoperator_from_config

        self.config = load_backend_config(config)
        self.tasks = tuple(dict.fromkeys(tasks))
        self.device = make_robot_from_config(self.config.robot)
        self.teleop = make_teleoperator_from_config(self.config.teleop) if self.config.teleop else None
        self.events_device = make_teleoperator_from_config(self.config.events) if self.config.events else None
        self.features = feature_map(self.device.observation_features, self.device.action_features)
        self.schema = self.features.schema
        self.embodiment = f"lerobot-{self.config.robot.type}"
        if self.teleop is not None:
            missing = set(self.features.action_names) - set(self.teleop.action_features)
            if missing:
                raise ConfigError(f"teleop {self.config.teleop.type!r} does not produce the robot's actions "
                                  f"{sorted(missing)}; it produces {sorted(self.teleop.action_features)}")
        events = self.events_device if self.events_device is not None else self.teleop
        self.link = TeleopLink(self.teleop, events if hasattr(events, "get_teleop_events") else None,
                               self.config.intervention, self.features, self.config.motion_threshold,
                               self.config.release_steps)
        self._last: Observation | None = None

    def make_operator(self) -> Operator:
        """The intervention source for this robot's control loop (NoOperator when there is no teleop)."""
        return NoOperator() if self.link.trigger == "never" else TeleopOperator(self.link)

    def _devices(self) -> list[Any]:
        return [d for d in (self.device, self.teleop, self.events_device) if d is not None]

    def connect(self) -> None:
        """Connect the robot, then the teleop and events devices (LeRobot may calibrate them)."""
        for dev in self._devices():
            if not dev.is_connected:
                dev.connect(calibrate=self.config.calibrate)
        log.info("lerobot robot %s connected (%d state values, cameras %s, trigger %s)", self.device,
                 len(self.features.state_names), list(self.features.image_names), self.link.trigger)

    def disconnect(self) -> None:
        """Disconnect every device that is connected (safe to call twice)."""
        for dev in reversed(self._devices()):
            try:
                if dev.is_connected:
                    dev.disconnect()
            except Exception:  # noqa: BLE001 - release the others even if one fails
                log.exception("disconnecting %s failed", dev)
        self._last = None

    def reset(self, task: str) -> Observation:
        """Clear episode events; let the teleop drive for ``reset_time_s``; observe."""
        if task not in self.tasks:
            raise ConfigError(f"task {task!r} is not one of this robot's tasks {self.tasks}")
        if self.config.reset_time_s > 0 and self.teleop is not None:
            self._teleoperate(self.config.reset_time_s)
        self.link.clear()
        self.link.poll_events()  # drop events still queued from the last episode
        self.link.clear()
        return self._observe()

    def _teleoperate(self, duration_s: float) -> None:
        period_s = 1.0 / self.config.reset_hz
        deadline = time.monotonic() + duration_s
        while (now := time.monotonic()) < deadline:
            action = self.link.read_action()
            if action is not None and self.action_filter is not None:
                action = self.action_filter(action)  # the same safety guard as in the episode
            if action is not None:
                self.device.send_action(self.features.action_dict(action))
            time.sleep(max(0.0, min(period_s, deadline - now)))  # pacing a hardware loop

    def observe(self) -> Observation:
        """The observation after the last reset or action."""
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        return self._last

    def act(self, action: np.ndarray) -> Observation:
        """Send the action, read the new observation; operator events may end the episode."""
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        self.device.send_action(self.features.action_dict(action))
        self.link.poll_events()
        return self._observe()

    def _observe(self) -> Observation:
        features = self.features.observation(self.device.get_observation())
        self._last = Observation(features=features, reward=float(self.link.success), success=self.link.success,
                                 terminated=self.link.ended)
        return self._last
