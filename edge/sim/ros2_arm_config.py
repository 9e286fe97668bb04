"""Configuration of ``fleet ros2-sim-robot`` (edge/sim/ros2_arm.py), importable without ROS 2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.config import require

JOINT_NAMES = ("right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6",
               "r_close", "l_close")
"""The Sawyer's joints in MetaWorld's model (qpos/qvel 0..8), as its JointState names them."""
COMMAND_NAMES = ("ee_dx", "ee_dy", "ee_dz", "gripper")
"""The command vector (MetaWorld's action): end-effector xyz delta and gripper effort, each in [-1, 1]."""
COMMAND_TYPES = ("float64_multi_array", "joint_trajectory")
EMBODIMENT = "metaworld-sawyer-ros2"


@dataclass(frozen=True)
class SimArmConfig:
    """A simulated MetaWorld Sawyer as a ROS 2 arm driver (joint states, camera, command topic, reset service)."""

    task: str = "reach the goal"
    """MetaWorld task (instruction or env name) of every episode."""
    seed: int = 0
    """Seed of the variant choice and of the camera background."""
    rate_hz: float = 30.0
    """Simulation and publishing rate."""
    max_episode_steps: int = 300
    """Ticks after which an episode ends unsuccessfully (episode_end false; the arm holds until reset)."""
    joint_state_topic: str = "/joint_states"
    """sensor_msgs/JointState of the 9 Sawyer joints (position, velocity)."""
    command_type: str = "float64_multi_array"
    """float64_multi_array (a forward_command_controller) or joint_trajectory (a joint_trajectory_controller)."""
    command_topic: str = "/arm_controller/commands"
    """Where commands (COMMAND_NAMES, in order) arrive."""
    command_timeout_s: float = 0.25
    """A command older than this is not applied: the arm holds still."""
    reset_service: str = "/arm/reset"
    """std_srvs/Trigger: start a new episode."""
    episode_end_topic: str = "/fleet/episode_end"
    """std_msgs/Bool published when the episode ends: true = success."""
    camera_height: int = 0
    """Camera image height (0 = no camera)."""
    camera_width: int = 0
    """Camera image width."""
    camera_topic: str = "/camera/image_raw"
    """sensor_msgs/Image (rgb8) of the synthetic camera."""
    stamp_lag_s: float = 0.0
    """Stamp sensor messages this much in the past (a lagging driver or clock; for tests)."""
    teleop: bool = False
    """Also act as the teleop station: the scripted expert intervenes on a schedule."""
    intervention_topic: str = "/fleet/intervention"
    """teleop: std_msgs/Bool, true while the operator holds control."""
    teleop_topic: str = "/teleop/commands"
    """teleop: the operator's command (Float64MultiArray, COMMAND_NAMES order)."""
    teleop_period_steps: int = 20
    """teleop: the schedule's period, in ticks."""
    teleop_segment_steps: int = 8
    """teleop: the operator drives the last this-many ticks of each period."""
    stats_path: str = ""
    """Write JSON stats at exit: commands received, and (stamp, receive time) of each trajectory command."""
    node_name: str = "sim_arm"
    """Name of the rclpy node."""

    def __post_init__(self) -> None:
        require(self.rate_hz > 0, f"rate_hz ({self.rate_hz}) must be > 0")
        require(self.max_episode_steps >= 1, f"max_episode_steps ({self.max_episode_steps}) must be >= 1")
        require(self.command_type in COMMAND_TYPES,
                 f"command_type ({self.command_type!r}) must be one of {COMMAND_TYPES}")
        require(self.command_timeout_s > 0, f"command_timeout_s ({self.command_timeout_s}) must be > 0")
        require((self.camera_height > 0) == (self.camera_width > 0) and self.camera_height >= 0,
                 f"camera_height ({self.camera_height}) and camera_width ({self.camera_width}) must both be "
                 "> 0 (camera on) or both 0 (off)")
        require(self.stamp_lag_s >= 0, f"stamp_lag_s ({self.stamp_lag_s}) must be >= 0")
        require(0 < self.teleop_segment_steps < self.teleop_period_steps,
                 f"teleop_segment_steps ({self.teleop_segment_steps}) must be in 1..teleop_period_steps-1 "
                 f"({self.teleop_period_steps - 1})")
        for name in ("joint_state_topic", "command_topic", "reset_service", "episode_end_topic"):
            require(bool(getattr(self, name)), f"{name} must not be empty")

    def edge_backend_section(self) -> dict[str, Any]:
        """The ``backend`` section (``type: ros2``) of an edge config that drives this arm (docs/robots.md)."""
        section: dict[str, Any] = {"type": "ros2",
            "embodiment": EMBODIMENT, "joint_names": list(JOINT_NAMES), "joint_fields": ["position", "velocity"],
            "joint_state_topic": self.joint_state_topic, "action_joint_names": list(COMMAND_NAMES),
            "action_type": self.command_type, "action_topic": self.command_topic,
            "reset_service": self.reset_service, "episode_end_topic": self.episode_end_topic,
            "intervention_topic": self.intervention_topic, "teleop_topic": self.teleop_topic,
            "teleop_type": "float64_multi_array", "slop_s": 0.5 / self.rate_hz,
        }
        if self.camera_height:
            section["cameras"] = {"front": {"topic": self.camera_topic, "height": self.camera_height,
                                            "width": self.camera_width}}
        return section
