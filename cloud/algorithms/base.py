"""The algorithm interface: small enough that each algorithm is one readable file.

An algorithm says what it needs from the buffer (``data``: a :class:`DataSpec`),
how the policy must be built and conditioned at inference on the edge
(``policy_config``), and does one update per batch (``update``). The trainer owns
the batch iterator; the algorithm owns its optimizers and extra state
(``state_dict``/``load_state_dict`` for checkpoints).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import draccus
import numpy as np
import torch

from cloud.sampler import DataSpec
from fleet.errors import ConfigError

if TYPE_CHECKING:
    from cloud.trainer_config import TrainerConfig
    from fleet.policies import FleetPolicy, PolicyConfig


@dataclass
class Update:
    """What one update reports."""

    stats: dict[str, float]
    """Namespaced scalars (``loss/bc``, ``loss/value``, ``grad_norm``...)."""
    sample_losses: np.ndarray | None = None
    """The policy loss of each sample (B,), for the sampler's adaptive online share."""


class OptimizerStep:
    """Backward with gradient accumulation, global-norm clipping and the optimizer step.

    Each call takes one micro-batch loss; every ``accumulation_steps`` calls the
    accumulated gradient (the mean over micro-batches) is clipped and applied."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 accumulation_steps: int = 1, clip_norm: float = 10.0):
        if accumulation_steps < 1:
            raise ConfigError(f"grad_accumulation_steps ({accumulation_steps}) must be >= 1")
        self.params = params
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.clip_norm = clip_norm
        self.micro_steps = 0
        self.optimizer_steps = 0

    def __call__(self, loss: torch.Tensor) -> dict[str, float]:
        (loss / self.accumulation_steps).backward()
        self.micro_steps += 1
        if self.micro_steps % self.accumulation_steps:
            return {}
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return {"grad_norm": float(norm)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "micro_steps": self.micro_steps,
                "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps = int(state["micro_steps"])
        self.optimizer_steps = int(state["optimizer_steps"])


@dataclass(frozen=True)
class AlgorithmConfig(draccus.ChoiceRegistry):
    """An algorithm's own hyper-parameters; ``--algorithm.type=<name>`` picks the registered config class
    (``@AlgorithmConfig.register_subclass(name)``) and only its fields are valid."""

    @property
    def type(self) -> str:
        """The registered name (``hg_dagger``, ``recap``)."""
        return self.get_choice_name(type(self))


class Algorithm(abc.ABC):
    name: str = ""
    data: DataSpec = DataSpec()
    """What the sampler must deliver (instances may narrow it from their config)."""

    @classmethod
    def policy_config(cls, policy: PolicyConfig, cfg: TrainerConfig) -> PolicyConfig:
        """The policy this algorithm trains, and how the edge acts with it (default: as configured)."""
        return policy

    @classmethod
    @abc.abstractmethod
    def from_config(cls, policy: FleetPolicy, cfg: TrainerConfig) -> Algorithm:
        """Build from the trainer's config (its own section plus shared knobs)."""

    @abc.abstractmethod
    def update(self, batch: dict[str, np.ndarray]) -> Update:
        """One update on a sampler batch."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything beyond the policy weights needed to resume (optimizers, value function...)."""

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


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}") from None
