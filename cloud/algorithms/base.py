"""The algorithm interface: small enough that each algorithm is one readable file.

The trainer owns the batch iterator; the algorithm owns its optimizers and state.
"""

from __future__ import annotations

import abc

import numpy as np


class Algorithm(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def update(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a sampler batch; returns namespaced stats (``loss/bc``...)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything beyond the policy weights needed to resume (optimizer, schedules...)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls
    return deco
