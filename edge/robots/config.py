"""The ``backend`` section of an edge config: a draccus choice registry, as LeRobot's ``RobotConfig``.

``--backend.type=metaworld|lerobot|ros2`` picks the class and only its fields are valid:
``--backend.robot.type=so101_follower --backend.robot.port=/dev/ttyACM0`` (lerobot: LeRobot's own
``RobotConfig``/``TeleoperatorConfig`` registries), ``--backend.joint_names='[j1, j2]'`` (ros2).

A backend's config class lives beside its backend and is imported only when it is asked for
(``get_choice_class``) or when all are listed (``--help``, or draccus building the flags of a command line
that names it: ``fleet.config.named_choices``): the MetaWorld one is here, so that a real robot's edge never
imports the simulator, and LeRobot's device registries (about a second to import) are only imported for
``type=lerobot`` or ``--help``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import draccus

from fleet.config import named_choices

log = logging.getLogger(__name__)

_MODULES = {"lerobot": "edge.robots.lerobot_config", "ros2": "edge.robots.ros2.config"}
"""Backend name -> the module registering its config class (imported on first use)."""


def _load(name: str) -> None:
    module = _MODULES.get(name)
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as e:  # an optional dependency of that backend: the type is then unknown
            log.debug("backend config %s not importable: %s", module, e)


class BackendConfig(draccus.ChoiceRegistry):
    """A robot backend and its own fields: ``--backend.type=<name>`` picks the registered class."""

    @classmethod
    def get_choice_class(cls, name: str) -> Any:
        _load(name)
        return super().get_choice_class(name)

    @classmethod
    def get_known_choices(cls) -> dict[str, Any]:
        named = named_choices()  # while a command line is parsed: only the backends it names
        for name in _MODULES:
            if named is None or name in named:
                _load(name)
        return super().get_known_choices()

    @property
    def type(self) -> str:
        """The registered name (metaworld, lerobot, ros2)."""
        return self.get_choice_name(type(self))


@BackendConfig.register_subclass("metaworld")
@dataclass(frozen=True)
class MetaWorldConfig(BackendConfig):
    """A simulated MetaWorld arm (edge/sim), driven by the simulated operator (``operator``)."""

    seed: int = 0
    """Seed of the simulated robot's initial states."""
    held_out_eval: bool = True
    """Evaluation episodes start from held-out task variants (odd), never from the training ones (even) the
    operator and the seeded demos use: autonomous success measures generalisation, not memory."""
    fresh_variants: bool = False
    """Training episodes start from a freshly sampled initial state each (MetaWorld's task distribution) instead
    of one of the 25 fixed training variants: a fleet of N robots then covers N times as many initial states per
    minute (bench/fleet_scaling.py). Evaluation episodes stay on the fixed held-out variants."""
