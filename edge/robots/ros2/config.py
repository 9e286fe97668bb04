"""What the ROS 2 backend subscribes to and publishes: the edge config's ``backend`` with ``type: ros2``
(nested camera lists are easiest in a config file: ``--config_path``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from edge.robots.config import BackendConfig
from fleet.errors import ConfigError

ACTION_TYPES = ("joint_state", "float64_multi_array", "joint_trajectory")
"""How actions are published: sensor_msgs/JointState (position), std_msgs/Float64MultiArray,
trajectory_msgs/JointTrajectory (one point)."""
TELEOP_TYPES = ("joint_state", "float64_multi_array")
"""Message type of the teleop command topic."""
JOINT_FIELDS = ("position", "velocity", "effort")


@dataclass(frozen=True)
class CameraTopic:
    """One camera: a sensor_msgs/Image or sensor_msgs/CompressedImage topic."""

    topic: str
    """Topic name, e.g. /camera/color/image_raw (or .../compressed)."""
    height: int
    """Image height in pixels (fixed: it is part of the robot's schema)."""
    width: int
    """Image width in pixels."""
    compressed: bool = False
    """True: sensor_msgs/CompressedImage (JPEG/PNG); False: sensor_msgs/Image (rgb8, bgr8, mono8, ...)."""

    def __post_init__(self) -> None:
        if not self.topic:
            raise ConfigError("camera topic must not be empty")
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"camera {self.topic!r}: height ({self.height}) and width ({self.width}) must be >= 1")


@BackendConfig.register_subclass("ros2")
@dataclass(frozen=True)
class Ros2Config(BackendConfig):
    """Topics, message types and timing of one ROS 2 robot."""

    joint_names: tuple[str, ...]
    """Joints of the observed state, in the order of the state vector."""
    joint_state_topic: str = "/joint_states"
    """sensor_msgs/JointState with the robot's measured joints."""
    joint_fields: tuple[str, ...] = ("position",)
    """JointState fields concatenated into the state (position, velocity, effort)."""
    cameras: dict[str, CameraTopic] = field(default_factory=dict)
    """Camera name (the image feature's name) -> topic."""
    action_joint_names: tuple[str, ...] = ()
    """Joints commanded by the action vector, in order (empty: joint_names)."""
    action_topic: str = "/fleet/joint_command"
    """Where actions are published."""
    action_type: str = "joint_state"
    """joint_state, float64_multi_array or joint_trajectory."""
    trajectory_time_from_start_s: float = 0.1
    """joint_trajectory: time_from_start of the single point."""
    intervention_topic: str = "/fleet/intervention"
    """std_msgs/Bool: true while the operator holds control ("" = no interventions)."""
    teleop_topic: str = "/fleet/teleop_command"
    """The operator's commands, executed while intervening ("" = none)."""
    teleop_type: str = "joint_state"
    """joint_state (matched by joint name) or float64_multi_array (in action order)."""
    episode_topic: str = "/fleet/episode"
    """std_msgs/String JSON events this node publishes: {"event": "start", "task": ...} and "end"."""
    episode_end_topic: str = "/fleet/episode_end"
    """std_msgs/Bool other nodes publish to end the episode: true = success, false = failure."""
    end_episode_service: str = "/fleet/end_episode"
    """std_srvs/SetBool service ending the episode (data: success) ("" = none)."""
    reset_service: str = ""
    """std_srvs/Trigger called at each episode start (e.g. move home) and waited for ("" = none)."""
    reset_timeout_s: float = 30.0
    """How long to wait for the reset service and a first observation of an episode."""
    slop_s: float = 0.05
    """Approximate-time sync: most apart the stamps of one observation's messages may be."""
    queue_size: int = 10
    """Approximate-time sync: messages kept per topic while waiting for a match."""
    observation_timeout_s: float = 1.0
    """After an action, wait this long for a newer synchronised observation before ending the episode."""
    max_sensor_age_s: float = 0.5
    """Observations whose oldest message is older than this (by header stamp vs. this node's clock) are
    not acted on: the episode ends and the robot holds, sending nothing, until fresh data comes (0 = off)."""
    startup_timeout_s: float = 10.0
    """connect(): how long the joint state and camera topics (and the reset service) may take to appear."""
    teleop_timeout_s: float = 0.5
    """Teleop commands older than this are not executed."""
    node_name: str = "fleet_edge"
    """Name of the rclpy node."""
    embodiment: str = "ros2-robot"
    """What kind of robot this is (robots of one embodiment share a schema and a policy), e.g. "ur5e-2f85"."""

    def __post_init__(self) -> None:
        if not self.joint_names or len(set(self.joint_names)) != len(self.joint_names):
            raise ConfigError(f"backend.joint_names ({self.joint_names!r}) must be non-empty and distinct")
        if not self.joint_fields or set(self.joint_fields) - set(JOINT_FIELDS):
            raise ConfigError(f"backend.joint_fields ({self.joint_fields!r}) must be a subset of {JOINT_FIELDS}")
        if self.action_type not in ACTION_TYPES:
            raise ConfigError(f"backend.action_type ({self.action_type!r}) must be one of {ACTION_TYPES}")
        if self.teleop_type not in TELEOP_TYPES:
            raise ConfigError(f"backend.teleop_type ({self.teleop_type!r}) must be one of {TELEOP_TYPES}")
        if "state" in self.cameras:
            raise ConfigError("backend.cameras: 'state' is the name of the joint state feature")
        for name, value in ("slop_s", self.slop_s), ("observation_timeout_s", self.observation_timeout_s), \
                ("teleop_timeout_s", self.teleop_timeout_s), ("reset_timeout_s", self.reset_timeout_s), \
                ("startup_timeout_s", self.startup_timeout_s):
            if not value > 0:
                raise ConfigError(f"backend.{name} ({value}) must be > 0")
        if not self.max_sensor_age_s >= 0:
            raise ConfigError(f"backend.max_sensor_age_s ({self.max_sensor_age_s}) must be >= 0")
        if self.queue_size < 1:
            raise ConfigError(f"backend.queue_size ({self.queue_size}) must be >= 1")
        if self.trajectory_time_from_start_s < 0:
            raise ConfigError(f"backend.trajectory_time_from_start_s ({self.trajectory_time_from_start_s}) must be >= 0")
        if not self.action_topic or not self.joint_state_topic:
            raise ConfigError("backend.action_topic and backend.joint_state_topic must not be empty")

    @property
    def action_names(self) -> tuple[str, ...]:
        """Joints commanded by the action vector."""
        return self.action_joint_names or self.joint_names


def load_config(section: Mapping[str, Any] | Ros2Config) -> Ros2Config:
    """The ``backend`` section with ``type: ros2`` (a mapping as in a config file) -> Ros2Config, with clear errors."""
    if isinstance(section, Ros2Config):
        return section
    if not isinstance(section, Mapping):
        raise ConfigError(f"the ros2 config section must be an object, got {section!r}")
    known = {f.name for f in fields(Ros2Config)}
    section = {k: v for k, v in section.items() if k != "type"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"ros2 config: unknown field(s) {unknown}; known: {sorted(known)}")
    if "joint_names" not in section:
        raise ConfigError("ros2 config needs joint_names (the joints of the state vector, in order)")
    values = dict(section)
    for key in ("joint_names", "joint_fields", "action_joint_names"):
        if key in values:
            values[key] = tuple(values[key])
    cameras = values.get("cameras", {})
    if not isinstance(cameras, Mapping):
        raise ConfigError(f"backend.cameras must map names to topics, got {cameras!r}")
    try:
        values["cameras"] = {name: c if isinstance(c, CameraTopic) else CameraTopic(**c)
                             for name, c in cameras.items()}
        return Ros2Config(**values)
    except TypeError as e:
        raise ConfigError(f"ros2 config: {e}") from None
