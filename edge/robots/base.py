"""The one seam per hardware kind.

A backend subclasses :class:`Robot` in its own module and registers itself under
a ``type`` name with :func:`register_robot`; :func:`make_robot` builds one by
that name (LeRobot's ``robots/robot.py`` and ``RobotConfig.register_subclass``).
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from fleet.errors import ConfigError
from fleet.types import Schema

log = logging.getLogger(__name__)


@dataclass
class Observation:
    """What the robot reports after a reset or an action."""

    features: dict[str, np.ndarray]
    """Feature name (as in the robot's schema) -> array. Fresh arrays: the recorder encodes them later on its own
    thread, so a backend must not write into an array once it returned it."""
    reward: float = 0.0
    """Reward of the transition that led here (0 after a reset)."""
    success: bool = False
    """The task is accomplished in this state."""
    terminated: bool = False
    """The backend says the episode cannot go on; call ``reset`` next."""


class Robot(abc.ABC):
    """A robot (real or simulated) the control loop drives.

    Subclasses set ``embodiment``, ``schema`` and ``tasks`` (the language
    instructions it can do) before ``connect`` is called.
    """

    embodiment: str
    schema: Schema
    tasks: tuple[str, ...]
    action_filter: Callable[[np.ndarray], np.ndarray] | None = None
    stop_action: str = "last"
    """How the robot holds still (an allocated robot waiting for an operator): "last" repeats the last action sent
    (position-commanded arms stay where they are); "zero" sends zeros (delta- or velocity-commanded robots)."""
    """Set by the agent (the safety guard): a backend that sends actions on its own (e.g. teleoperation during
    its reset) passes each through it."""

    @abc.abstractmethod
    def connect(self) -> None:
        """Acquire the hardware/simulator; may take a while."""

    @abc.abstractmethod
    def disconnect(self) -> None:
        """Release the hardware/simulator; safe to call twice."""

    @abc.abstractmethod
    def reset(self, task: str) -> Observation:
        """Start an episode of ``task`` (one of ``tasks``) and return its first observation."""

    def set_evaluation(self, evaluation: bool) -> None:
        """The next ``reset`` starts an evaluation episode (or not). A simulator may then draw its initial
        state from held-out variants; a real robot ignores it (the default)."""

    @abc.abstractmethod
    def observe(self) -> Observation:
        """Return the current observation without acting."""

    @abc.abstractmethod
    def act(self, action: np.ndarray) -> Observation:
        """Apply one action (shape/dtype as ``schema.action``) and return the new observation."""

    def __enter__(self) -> Robot:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()


ROBOTS: dict[str, type[Robot]] = {}
"""Registered backends: ``type`` name -> class."""

# Backends that ship with the package, imported on first use so that a backend's
# optional dependency is only needed when that backend is asked for. A new backend
# module adds its line here.
_BUILTIN_MODULES: dict[str, str] = {
    "metaworld": "edge.sim.metaworld",
    "lerobot": "edge.robots.lerobot",
    "ros2": "edge.robots.ros2.robot",
}

R = TypeVar("R", bound=type[Robot])


def register_robot(type_name: str) -> Callable[[R], R]:
    """Class decorator registering a :class:`Robot` backend under ``type_name``."""

    def decorate(cls: R) -> R:
        existing = ROBOTS.get(type_name)
        if existing is not None and existing is not cls:
            raise ConfigError(f"robot type {type_name!r} is already registered by {existing.__qualname__}")
        ROBOTS[type_name] = cls
        return cls

    return decorate


def make_robot(type_name: str, **kwargs: Any) -> Robot:
    """Build the robot backend registered as ``type_name`` with its constructor arguments."""
    if type_name not in ROBOTS and type_name in _BUILTIN_MODULES:
        try:
            importlib.import_module(_BUILTIN_MODULES[type_name])
        except ImportError as e:
            raise ConfigError(f"robot type {type_name!r} is unavailable: {e}") from e
    cls = ROBOTS.get(type_name)
    if cls is None:
        known = sorted(set(ROBOTS) | set(_BUILTIN_MODULES))
        raise ConfigError(f"unknown robot type {type_name!r}; known types: {', '.join(known)}")
    return cls(**kwargs)
