"""What the edge control loop needs from a policy, whatever its type."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ActingPolicy(Protocol):
    """A policy the control loop can act with.

    ``version`` is the policy store version it was built from (0 = none/untrained).
    ``select_action`` takes one observation (feature name -> array, as in the
    robot's schema) and the episode's task (language instruction) and returns the
    action vector; it may keep an internal action queue (action chunking), which
    ``reset`` clears at episode start and whenever an operator hands control back.
    """

    version: int

    def reset(self) -> None: ...

    def select_action(self, observation: dict[str, np.ndarray], task: str) -> np.ndarray: ...


class NullPolicy:
    """Version 0: what an edge holds before its first policy arrives. Outputs zeros."""

    version = 0

    def __init__(self, action_shape: tuple[int, ...], dtype: str = "float32"):
        self._zeros = np.zeros(action_shape, dtype=dtype)

    def reset(self) -> None:
        pass

    def select_action(self, observation: dict[str, np.ndarray], task: str) -> np.ndarray:
        return self._zeros.copy()
