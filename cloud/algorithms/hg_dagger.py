"""HG-DAgger (Kelly et al., ICRA 2019), as SOP runs it on a fleet.

The novice (the fleet's policy) acts; the human takes full control when the
robot leaves the safe set and hands back later. Only the segments the human
drove are labelled: their executed actions are the targets. Those labels are
aggregated with offline demonstrations and, optionally, the robot's own
successful autonomous episodes (filtered behaviour cloning), and the policy is
retrained by supervised learning on the aggregate.

The online/offline mix is the sampler's (SOP and RLinf sample interventions at
about 50%; SOP adapts the share to the losses); on top, operator-labelled
samples can weigh more in the loss:

    l_i      = the policy's own loss on sample i (ACT: L1 over the labelled chunk steps)
    w_i      = intervention_weight if step t of sample i was operator-driven else 1
    loss/bc  = sum_i w_i * l_i / sum_i w_i
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cloud.algorithms.base import Algorithm, AlgorithmConfig, OptimizerStep, Update, register_algorithm
from cloud.sampler import DataSpec
from fleet.errors import ConfigError


@AlgorithmConfig.register_subclass("hg_dagger")
@dataclass(frozen=True)
class HGDAggerConfig(AlgorithmConfig):
    """HG-DAgger: which data is aggregated and how operator labels weigh."""

    intervention_weight: float = 1.0
    """Loss weight of operator-labelled samples relative to the others (the sampler sets their share)."""
    use_successes: bool = False
    """Also clone every step of the robots' own successful autonomous episodes."""
    use_offline: bool = True
    """Keep the offline demonstrations in the aggregate."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.intervention_weight) and self.intervention_weight > 0):
            raise ConfigError(f"hg_dagger.intervention_weight ({self.intervention_weight!r}) must be > 0")


@register_algorithm("hg_dagger")
class HGDAgger(Algorithm):
    def __init__(self, policy, config: HGDAggerConfig | None = None, accumulation_steps: int = 1):
        self.policy = policy
        self.config = config or HGDAggerConfig()
        self.data = DataSpec(interventions=True, successes=self.config.use_successes, offline=self.config.use_offline)
        self.step = OptimizerStep(policy.trainable_parameters(), policy.make_optimizer(), accumulation_steps,
                                  policy.config.grad_clip_norm)

    @classmethod
    def from_config(cls, policy, cfg) -> HGDAgger:
        return cls(policy, cfg.algorithm, cfg.grad_accumulation_steps)

    def update(self, batch: dict[str, np.ndarray]) -> Update:
        policy = self.policy
        torch_batch = policy.train_batch_to_torch(batch)
        with policy.autocast():
            losses = policy.sample_losses(torch_batch)
        operator = torch.from_numpy(np.asarray(batch["is_intervention"], dtype=bool)).to(losses.device)
        weights = torch.where(operator, self.config.intervention_weight, 1.0)
        loss = (weights * losses).sum() / weights.sum()
        stats = {"loss/bc": float(loss.detach()), **self.step(loss)}
        stats["batch/online_fraction"] = float(np.mean(batch["is_online"]))
        stats["batch/intervention_fraction"] = float(operator.float().mean())
        return Update(stats, losses.detach().float().cpu().numpy())

    def state_dict(self) -> dict:
        return {"step": self.step.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step.load_state_dict(state["step"])
