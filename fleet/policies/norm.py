"""Mean/std normalization of states and actions; travels with the weights as ``fleet_norm.*`` tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleet.errors import InvalidInput

NORM_PREFIX = "fleet_norm."
NORM_NAMES = ("state_mean", "state_std", "action_mean", "action_std")
MIN_STD = 1e-2


def _as_vector(name: str, value: np.ndarray | Sequence[float]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise InvalidInput(f"NormStats.{name} must be a finite 1-D vector, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class NormStats:
    """Per-dimension mean/std of ``observation.state`` and ``action`` (float32)."""

    state_mean: np.ndarray
    state_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray

    def __post_init__(self) -> None:
        for name in NORM_NAMES:
            object.__setattr__(self, name, _as_vector(name, getattr(self, name)))
        if self.state_mean.shape != self.state_std.shape or self.action_mean.shape != self.action_std.shape:
            raise InvalidInput("NormStats: mean and std shapes differ")

    @classmethod
    def from_data(cls, states: np.ndarray, actions: np.ndarray) -> NormStats:
        """Stats of flat states (N, D) and actions (N, A)."""
        states, actions = np.asarray(states, np.float64), np.asarray(actions, np.float64)
        if states.ndim != 2 or actions.ndim != 2 or len(states) == 0 or len(actions) == 0:
            raise InvalidInput(f"NormStats.from_data wants non-empty (N, D) and (N, A); got "
                               f"{states.shape} and {actions.shape}")
        return cls(states.mean(0), states.std(0), actions.mean(0), actions.std(0))

    @classmethod
    def identity(cls, state_dim: int, action_dim: int) -> NormStats:
        """Mean 0, std 1."""
        return cls(np.zeros(state_dim), np.ones(state_dim), np.zeros(action_dim), np.ones(action_dim))
