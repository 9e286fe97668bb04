"""The ``backend`` section with ``type: lerobot``: LeRobot's own robot and teleoperator configs, embedded.

``robot`` is LeRobot's ``RobotConfig`` choice registry and ``teleop``/``events`` its
``TeleoperatorConfig`` one, so each takes its LeRobot ``type`` and that type's fields and defaults
(``--backend.robot.type=so101_follower --backend.robot.port=/dev/ttyACM0``). LeRobot's device packages
(and installed plugins) are imported here, as ``lerobot-record`` does, so that their types exist before
a config is parsed; this module is imported only for ``--backend.type=lerobot`` or ``--help``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from lerobot.robots import RobotConfig
from lerobot.teleoperators import TeleoperatorConfig

from edge.robots.config import BackendConfig
from fleet.errors import ConfigError

log = logging.getLogger(__name__)

TRIGGERS = ("auto", "events", "motion", "always", "never")

# Sub-packages of lerobot.robots / .teleoperators / .cameras whose configs register a ``type``
# on import (what lerobot-record imports); imported with this module.
_DEVICE_MODULES = tuple(
    [f"lerobot.cameras.{m}" for m in ("opencv", "realsense", "reachy2_camera", "zmq")]
    + [f"lerobot.robots.{m}" for m in ("so_follower", "koch_follower", "omx_follower", "lekiwi", "hope_jr",
                                       "bi_so_follower", "reachy2", "openarm_follower", "bi_openarm_follower",
                                       "earthrover_mini_plus", "unitree_g1")]
    + [f"lerobot.teleoperators.{m}" for m in ("so_leader", "koch_leader", "omx_leader", "gamepad", "keyboard",
                                              "homunculus", "bi_so_leader", "reachy2_teleoperator",
                                              "openarm_leader", "bi_openarm_leader", "openarm_mini", "phone")]
)


def _register_builtin_devices() -> None:
    """Import LeRobot's device packages (and installed plugins) so their ``type`` names exist."""
    for name in _DEVICE_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - an optional SDK missing for one device must not stop the others
            log.debug("LeRobot device module %s not importable: %s", name, e)
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()


_register_builtin_devices()


@BackendConfig.register_subclass("lerobot")
@dataclass
class LeRobotBackendConfig(BackendConfig):
    """A LeRobot robot (SO-100/101, Koch, LeKiwi, ...) with a LeRobot teleoperator as the operator."""

    robot: RobotConfig
    """LeRobot ``RobotConfig``: --backend.robot.type=so101_follower|koch_follower|... and that type's fields."""
    teleop: TeleoperatorConfig | None = None
    """LeRobot ``TeleoperatorConfig`` (so101_leader, gamepad, ...): the operator's device; none = no interventions."""
    events: TeleoperatorConfig | None = None
    """Optional second ``TeleoperatorConfig`` whose ``get_teleop_events()`` give intervention/success/failure
    (e.g. keyboard_ee beside a leader arm); default: the teleop itself when it has events."""
    intervention: str = "auto"
    """Who holds control: auto (events if there are any, else motion), events, motion, always, never."""
    motion_threshold: float = 2.0
    """motion: take over when a teleop action value moves more than this between two ticks (its units)."""
    release_steps: int = 20
    """motion: hand control back after this many ticks without such motion."""
    calibrate: bool = True
    """Let LeRobot calibrate devices on connect when they need it (interactive)."""
    reset_time_s: float = 0.0
    """Between episodes, the teleop drives the robot for this long to reset the scene (not recorded)."""
    reset_hz: float = 30.0
    """Rate of that reset teleoperation, ticks per second."""

    def __post_init__(self) -> None:
        if self.intervention not in TRIGGERS:
            raise ConfigError(f"backend.intervention ({self.intervention!r}) must be one of {TRIGGERS}")
        if not self.motion_threshold > 0:
            raise ConfigError(f"backend.motion_threshold ({self.motion_threshold}) must be > 0")
        if self.release_steps < 1:
            raise ConfigError(f"backend.release_steps ({self.release_steps}) must be >= 1")
        if self.reset_time_s < 0 or not self.reset_hz > 0:
            raise ConfigError(f"backend.reset_time_s ({self.reset_time_s}) must be >= 0 and reset_hz "
                              f"({self.reset_hz}) > 0")
        if self.intervention in ("events", "motion", "always") and self.teleop is None:
            raise ConfigError(f"backend.intervention={self.intervention!r} needs a backend.teleop device")


