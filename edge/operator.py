"""Intervention sources: who may take control away from the policy.

:class:`Operator` is the seam (a teleoperator, an intervention topic, or the simulated operator of
``edge/sim/operator.py``); :class:`NoOperator` never intervenes. :class:`OperatorConfig` is the gating
rule of the simulated operator, kept here (plain data) so that the edge config can carry it without
importing the simulator.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from edge.robots.base import Observation
from fleet.errors import ConfigError


class Operator(abc.ABC):
    """Decides, each control tick, whether a human (or stand-in) overrides the policy."""

    @abc.abstractmethod
    def reset(self, task: str) -> None:
        """Start of an episode of ``task``: clear per-episode state."""

    @abc.abstractmethod
    def decide(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """None: the policy keeps control. An array: the operator's action, executed instead."""

    @property
    @abc.abstractmethod
    def is_intervening(self) -> bool:
        """Whether the operator holds control right now."""

    def command(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """The operator's action now whatever its gating (a console take-over: the human drives every step);
        None if it has none. By default its gated ``decide``."""
        return self.decide(observation, policy_action)


class NoOperator(Operator):
    """Never intervenes (evaluation episodes, autonomous deployment)."""

    def reset(self, task: str) -> None:
        """Nothing to clear."""

    def decide(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """Always leaves control to the policy."""
        return None

    @property
    def is_intervening(self) -> bool:
        """Always False."""
        return False


ALLOCATIONS = ("own", "allocated")
HOLD_MODES = ("stop", "policy")


@dataclass(frozen=True)
class OperatorConfig:
    """Who may take over this robot (allocation) and when the simulated operator takes over, and for how long."""


    divergence_threshold: float = 0.8
    """L2 distance between the policy's and the expert's (clipped) actions that counts as divergent."""
    divergence_steps: int = 3
    """Consecutive divergent steps that trigger a take-over."""
    patience_steps: int = 0
    """Take over when the robot has driven this many steps since the episode began (or since the operator last
    handed back) without finishing it (0: off). Knowing the task takes about 60 steps, a human takes over a
    robot still at it after 80, however steadily it creeps: a weak policy heading the right way too slowly never
    diverges by ``divergence_threshold``, keeps making reward progress, and would run out of time unlabelled."""
    stall_steps: int = 30
    """Take over after this many steps without reward progress (agreeing steps do not count)."""
    stall_min_improvement: float = 0.05
    """Reward gain over the best so far that counts as progress."""
    agree_threshold: float = 0.1
    """Policy actions this close (L2) to the expert's count as agreeing: the operator would do the
    same, so such steps never count toward a stall (MetaWorld's experts themselves plateau)."""
    segment_steps: int = 25
    """Steps the operator drives per take-over before handing control back."""
    noise_std: float = 0.0
    """Std of Gaussian noise added to the operator's action (humans are imperfect)."""
    seed: int = 0
    """Seed of the noise generator."""
    allocation: str = "own"
    """own: the robot's operator (teleop, intervention topic, simulated) always watches it; allocated: it may act
    only while the cloud assigns an operator to this robot (docs/operators.md)."""
    hold: str = "stop"
    """allocated only, while help is wanted and no operator is assigned: stop (hold still through the safety
    guard) or policy (keep acting)."""

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"operator.allocation ({self.allocation!r}) must be one of {ALLOCATIONS}")
        if self.hold not in HOLD_MODES:
            raise ConfigError(f"operator.hold ({self.hold!r}) must be one of {HOLD_MODES}")
        if not self.divergence_threshold > 0:
            raise ConfigError(f"divergence_threshold ({self.divergence_threshold}) must be > 0")
        if self.divergence_steps < 1:
            raise ConfigError(f"divergence_steps ({self.divergence_steps}) must be >= 1")
        if self.patience_steps < 0:
            raise ConfigError(f"patience_steps ({self.patience_steps}) must be >= 0 (0: off)")
        if self.stall_steps < 1:
            raise ConfigError(f"stall_steps ({self.stall_steps}) must be >= 1")
        if not self.stall_min_improvement >= 0:
            raise ConfigError(f"stall_min_improvement ({self.stall_min_improvement}) must be >= 0")
        if not 0 <= self.agree_threshold < self.divergence_threshold:
            raise ConfigError(
                f"agree_threshold ({self.agree_threshold}) must be in [0, divergence_threshold "
                f"({self.divergence_threshold}))"
            )
        if self.segment_steps < 1:
            raise ConfigError(f"segment_steps ({self.segment_steps}) must be >= 1")
        if not self.noise_std >= 0:
            raise ConfigError(f"noise_std ({self.noise_std}) must be >= 0")


class AllocatedOperator(Operator):
    """The robot's operator (``inner``: teleop, intervention topic, simulated) as one of a few shared humans: it
    acts only while the cloud assigns an operator to this robot (``board.assignment``, from the heartbeat).

    * manual assignment (a console take-over): ``inner.command`` drives every step until hand-back;
    * automatic assignment (the allocator): ``inner.decide``, the operator's own gating;
    * no assignment: None; the control loop holds (``hold``) while help is wanted.

    The assignment is read once per tick (one reference; the heartbeat thread swaps it)."""

    def __init__(self, inner: Operator, board, hold: str = "stop"):
        if hold not in HOLD_MODES:
            raise ConfigError(f"operator.hold ({hold!r}) must be one of {HOLD_MODES}")
        self.inner = inner
        self.board = board
        self.hold = hold
        self.acting_for = ""
        """The operator id of the assignment at the last ``decide`` ("" = none)."""
        self._intervening = False

    def reset(self, task: str) -> None:
        self.inner.reset(task)
        self._intervening = False

    def decide(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        assignment = self.board.assignment
        self.acting_for = assignment.operator_id
        if not assignment.operator_id:
            action = None
        elif assignment.manual:
            action = self.inner.command(observation, policy_action)
        else:
            action = self.inner.decide(observation, policy_action)
        self._intervening = action is not None
        return action

    @property
    def is_intervening(self) -> bool:
        return self._intervening
