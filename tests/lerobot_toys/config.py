"""Configs of the toy devices, registered as LeRobot choice types."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.robots import RobotConfig
from lerobot.teleoperators import TeleoperatorConfig


@RobotConfig.register_subclass("toy_arm")
@dataclass
class ToyArmConfig(RobotConfig):
    n_joints: int = 3
    """Joints (each an observation ``j<i>.pos`` and an action of the same name)."""
    camera_height: int = 12
    """Height of the toy camera ``wrist`` (0 = no camera)."""
    camera_width: int = 16
    """Width of the toy camera."""
    gain: float = 0.6
    """Fraction of the way to the commanded position covered per action."""


@TeleoperatorConfig.register_subclass("toy_leader")
@dataclass
class ToyLeaderConfig(TeleoperatorConfig):
    arm_id: str = "arm"
    """id of the toy arm this operator watches (to report success)."""
    period: int = 12
    """The operator's schedule repeats every this many ticks (counted in get_action calls)..."""
    intervene_from: int = 3
    """...it takes over at this tick of the period..."""
    intervene_steps: int = 6
    """...and keeps control for this many ticks."""
    goal: float = 1.0
    """Joint position every joint must reach for success."""
    tolerance: float = 0.05
    """Success when every joint is within this of ``goal``."""
    with_events: bool = True
    """Whether get_teleop_events reports anything (False: a bare leader arm)."""
