"""The operator's LeRobot teleoperator(s) as the intervention source of a LeRobot robot.

:class:`TeleopLink` reads the devices once per tick: the teleop's action (in the robot's
action order), the intervention state by the configured trigger, and episode events
(latched until the next episode). :class:`TeleopOperator` is the control loop's Operator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.operator import Operator
from edge.robots.base import Observation
from fleet.errors import ConfigError

if TYPE_CHECKING:
    from edge.robots.lerobot import FeatureMap

log = logging.getLogger(__name__)


_EVENT_NAMES = ("is_intervention", "success", "failure", "terminate_episode", "rerecord_episode")


def _events(raw: Mapping[Any, Any]) -> dict[str, bool]:
    """``get_teleop_events()`` (keys: TeleopEvents members or their string values) -> plain flags."""
    out = dict.fromkeys(_EVENT_NAMES, False)
    for key, value in raw.items():
        name = getattr(key, "value", key)
        if name in out:
            out[name] = bool(value)
    return out


class TeleopLink:
    """The operator's devices as seen by one robot: latest action, intervention state, episode events.

    ``poll_events`` may be called several times per tick (by the operator and by the robot):
    episode events latch until ``clear``, so a one-shot key press is never lost.
    """

    def __init__(self, teleop: Any | None, events_device: Any | None, trigger: str, features: FeatureMap,
                 motion_threshold: float, release_steps: int):
        self.teleop = teleop
        self.events_device = events_device
        self.features = features
        self.motion_threshold = motion_threshold
        self.release_steps = release_steps
        if trigger == "auto":
            trigger = "events" if events_device is not None else ("motion" if teleop is not None else "never")
        if trigger == "events" and events_device is None:
            raise ConfigError("intervention='events' but neither the teleop nor an events device has "
                              "get_teleop_events(); use 'motion' or add an 'events' device")
        self.trigger = trigger
        self._event_intervening = False
        self._motion_intervening = False
        self._still_steps = 0
        self._last_action: np.ndarray | None = None
        self.success = False
        self.ended = False
        """An event ended the episode (success, failure, terminate or rerecord)."""

    def clear(self) -> None:
        """Start of an episode: forget latched events and motion history."""
        self.success = self.ended = False
        self._motion_intervening = False
        self._still_steps = 0
        self._last_action = None

    def poll_events(self) -> None:
        """Read the events device (if any) and latch episode events."""
        if self.events_device is None:
            return
        ev = _events(self.events_device.get_teleop_events())
        self._event_intervening = ev["is_intervention"]
        if ev["success"]:
            self.success = self.ended = True
        if ev["failure"] or ev["terminate_episode"] or ev["rerecord_episode"]:
            self.ended = True

    def read_action(self) -> np.ndarray | None:
        """The teleop's current action vector (None without a teleop); feeds the motion trigger."""
        if self.teleop is None:
            return None
        action = self.features.action_vector(self.teleop.get_action(), f"teleoperator {self.teleop}")
        if self._last_action is not None:
            moved = float(np.max(np.abs(action - self._last_action))) > self.motion_threshold
            self._still_steps = 0 if moved else self._still_steps + 1
            if moved:
                self._motion_intervening = True
            elif self._still_steps >= self.release_steps:
                self._motion_intervening = False
        self._last_action = action
        return action

    @property
    def intervening(self) -> bool:
        """Whether the operator holds control now, by the configured trigger."""
        if self.trigger == "always":
            return True
        if self.trigger == "events":
            return self._event_intervening
        if self.trigger == "motion":
            return self._motion_intervening
        return False


class TeleopOperator(Operator):
    """HG-DAgger's human through a LeRobot teleoperator: its action replaces the policy's while it holds control."""

    def __init__(self, link: TeleopLink):
        self.link = link
        self.interventions = 0
        """Take-overs in the current episode."""
        self._intervening = False

    def reset(self, task: str) -> None:
        """New episode: counters to zero (the robot clears the link's events on reset)."""
        self.interventions = 0
        self._intervening = False

    def decide(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """Poll the devices; the teleop's action while intervening, else None."""
        self.link.poll_events()
        action = self.link.read_action()
        intervening = self.link.intervening and action is not None
        if intervening and not self._intervening:
            self.interventions += 1
            log.debug("operator takes over (%s trigger)", self.link.trigger)
        self._intervening = intervening
        return action if intervening else None

    def command(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """The teleop's action whatever the trigger (a console take-over); None without a teleop."""
        self.link.poll_events()
        action = self.link.read_action()
        self._intervening = action is not None
        return action

    @property
    def is_intervening(self) -> bool:
        """Whether the operator held control at the last ``decide``."""
        return self._intervening
