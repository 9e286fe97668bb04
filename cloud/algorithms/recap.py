"""RECAP (pi*0.6): advantage-conditioned policy learning, run online on the live buffer.

Every finished episode trains (autonomous rollouts, operator corrections, offline demos).
Each update, on one batch of windows starting at step t:

1. value function (fleet/policies/value.py) on normalised returns, reward -1 per step plus a
   failure penalty:  v_t = -(L - t + C * [failed]) / (L_max(task) + C)      loss/value
2. advantage with the current value function, N-step (N = 0: Monte Carlo):
       A_t = r_{t:t+N} + V(o_{t+N}) - V(o_t),  r_{t:t+N} = -min(N, L - t) (- C if the episode ends failed
       within N), all divided by L_max(task) + C; no bootstrap past the episode's end
3. improvement indicator  I_t = 1[A_t > eps_task], eps_task the (1 - positive_fraction) quantile of the
   task's recent advantages (about the top 30% positive); steps the operator drove are forced positive;
   each indicator is dropped (no indicator) with probability indicator_dropout, so the unconditioned
   policy is trained too
4. the policy's own loss with I_t as input ("Advantage: positive/negative" after the task for language
   policies, two extra inputs otherwise)                                                 loss/bc

The edge acts with I = positive (policy.conditioning = "advantage"), optionally with classifier-free
guidance a = u + beta * (c - u) (policy.cfg_beta; SOP: 1.0 for rollouts, 1.5-2.5 for evaluation).
Unlike SOP (a frozen pre-trained value function), the value function keeps learning online here.
It is deployed with the policy (``policy.value``, ``PolicyConfig.value_*``): published with the weights, it
gives the edge its predicted failure for the help signal (edge/help.py). Each update also sets each task's
failure threshold tau = -L_max / (L_max + C), below which only failed episodes' returns lie.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from cloud.algorithms.base import Algorithm, AlgorithmConfig, OptimizerStep, Update, register_algorithm
from cloud.sampler import DataSpec
from fleet.errors import ConfigError
from fleet.policies.lerobot_adapter import INDICATOR_NONE, INDICATOR_POSITIVE, adamw
from fleet.policies.value import HEADS, failure_threshold

log = logging.getLogger(__name__)


@AlgorithmConfig.register_subclass("recap")
@dataclass(frozen=True)
class RecapConfig(AlgorithmConfig):
    """RECAP: value function, advantage indicator and guidance (pi*0.6 values where published)."""

    value_head: str = "distributional"
    """Value head: "distributional" (pi*0.6: bins over [-1, 0], cross-entropy) or "scalar" (squared error)."""
    value_bins: int = 201
    """Bins of the distributional head (pi*0.6: 201)."""
    value_hidden_dim: int = 256
    """Width of the value MLP."""
    value_layers: int = 2
    """Hidden layers of the value MLP."""
    value_lr: float = 3e-4
    """AdamW learning rate of the value function."""
    failure_penalty_steps: float = 0.0
    """Failure penalty C, in steps of reward -1 (0: the task's longest episode)."""
    n_step: int = 10
    """Advantage look-ahead N in steps (0: Monte-Carlo return minus V)."""
    positive_fraction: float = 0.3
    """Share of each task's advantages above its threshold (pi*0.6: about 0.3)."""
    threshold_window: int = 2000
    """Recent advantages per task the threshold is the quantile of."""
    indicator_dropout: float = 0.3
    """Probability of training without the indicator (pi*0.6: about 0.3)."""
    value_warmup_steps: int = 100
    """Updates before the indicator is used (until then only operator steps carry it: positive)."""
    cfg_beta: float = 1.0
    """Classifier-free guidance at the edge (SOP: 1.0 for rollouts, 1.5-2.5 for evaluation)."""

    def __post_init__(self) -> None:
        if self.value_head not in HEADS:
            raise ConfigError(f"recap.value_head ({self.value_head!r}) must be one of {HEADS}")
        if self.value_bins < 2 or self.value_hidden_dim < 1 or self.value_layers < 1:
            raise ConfigError(f"recap value sizes (bins {self.value_bins}, hidden {self.value_hidden_dim}, "
                              f"layers {self.value_layers}) must be >= 2, >= 1, >= 1")
        if not 0 < self.positive_fraction < 1:
            raise ConfigError(f"recap.positive_fraction ({self.positive_fraction}) must be in (0, 1)")
        if not 0 <= self.indicator_dropout < 1:
            raise ConfigError(f"recap.indicator_dropout ({self.indicator_dropout}) must be in [0, 1)")
        if self.n_step < 0 or self.threshold_window < 1 or self.value_warmup_steps < 0:
            raise ConfigError(f"recap.n_step ({self.n_step}), threshold_window ({self.threshold_window}) and "
                              f"value_warmup_steps ({self.value_warmup_steps}) must be >= 0, >= 1, >= 0")
        if not (math.isfinite(self.failure_penalty_steps) and self.failure_penalty_steps >= 0):
            raise ConfigError(f"recap.failure_penalty_steps ({self.failure_penalty_steps!r}) must be >= 0")
        if not (math.isfinite(self.value_lr) and self.value_lr > 0):
            raise ConfigError(f"recap.value_lr ({self.value_lr!r}) must be > 0")
        if not (math.isfinite(self.cfg_beta) and self.cfg_beta >= 1):
            raise ConfigError(f"recap.cfg_beta ({self.cfg_beta!r}) must be >= 1")


def improvement_indicators(advantage: np.ndarray, threshold: np.ndarray, operator: np.ndarray, dropout: float,
                           rng: np.random.Generator) -> np.ndarray:
    """I = 1[A > threshold], operator-driven steps forced to 1, then each dropped (-1) with ``dropout``."""
    indicator = (np.asarray(advantage) > np.asarray(threshold)).astype(np.int64)
    indicator[np.asarray(operator, dtype=bool)] = INDICATOR_POSITIVE
    indicator[rng.random(len(indicator)) < dropout] = INDICATOR_NONE
    return indicator


@register_algorithm("recap")
class Recap(Algorithm):
    def __init__(self, policy, config: RecapConfig | None = None, accumulation_steps: int = 1, seed: int = 0):
        if policy.config.conditioning != "advantage":
            raise ConfigError("recap trains an advantage-conditioned policy; this one has policy.conditioning="
                              f"{policy.config.conditioning!r} (was it published by another algorithm?)")
        self.policy = policy
        self.config = cfg = config or RecapConfig()
        self.data = DataSpec(interventions=False, episodes=True, offline=True, lookahead_steps=cfg.n_step)
        wanted = (cfg.value_head, cfg.value_hidden_dim, cfg.value_layers, cfg.value_bins)
        if policy.value is None:  # a conditioned policy built without one (code, tests, older versions)
            policy.add_value_function(*wanted, seed=seed)
        elif wanted != (policy.config.value_head, policy.config.value_hidden_dim, policy.config.value_layers,
                        policy.config.value_bins):
            log.warning("the policy's value function (%s, hidden %d, layers %d, bins %d) is not the one "
                        "--algorithm.value_* asks for; training the policy's", policy.config.value_head,
                        policy.config.value_hidden_dim, policy.config.value_layers, policy.config.value_bins)
        self.value = policy.value
        """The value function, the policy's own module: it is published with the policy's weights."""
        value_params = list(self.value.parameters())
        self.value_step = OptimizerStep(value_params, adamw(value_params, lr=cfg.value_lr),
                                        accumulation_steps, clip_norm=1.0)
        self.step = OptimizerStep(policy.trainable_parameters(), policy.make_optimizer(), accumulation_steps,
                                  policy.config.grad_clip_norm)
        self._advantages: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=cfg.threshold_window))
        self._rng = np.random.default_rng(seed)
        self.updates = 0
        self.last_indicator: np.ndarray | None = None
        """The indicators of the last update's samples (-1 none, 0 negative, 1 positive), for inspection."""

    @classmethod
    def policy_config(cls, policy, cfg):
        algo = cfg.algorithm
        return replace(policy, conditioning="advantage", cfg_beta=algo.cfg_beta, value_head=algo.value_head,
                       value_hidden_dim=algo.value_hidden_dim, value_layers=algo.value_layers,
                       value_bins=algo.value_bins)

    @classmethod
    def from_config(cls, policy, cfg) -> Recap:
        return cls(policy, cfg.algorithm, cfg.grad_accumulation_steps, cfg.seed)

    def _value_input(self, batch: dict[str, np.ndarray], prefix: str) -> torch.Tensor:
        n = len(batch["task_index"])
        return self.policy.value_input(lambda name: batch[f"{prefix}{name}"], (n,), batch["task_index"])

    def _set_failure_thresholds(self, batch: dict[str, np.ndarray], finished: np.ndarray) -> None:
        """Each task's tau = -L_max / (L_max + C) from this batch's longest episodes (the returns' own scale)."""
        longest = np.maximum(np.asarray(batch["task_max_len"], dtype=np.float64),
                             np.asarray(batch["episode_len"], dtype=np.float64))
        task_index = np.asarray(batch["task_index"])
        tau = self.value.failure_threshold
        for ti in np.unique(task_index[finished & (task_index >= 0)]):
            rows = finished & (task_index == ti)
            tau[int(ti)] = failure_threshold(float(longest[rows].max()), self.config.failure_penalty_steps)

    def returns(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normalised return v_t, normalised N-step reward sum, whether to bootstrap from o_{t+N})."""
        length = np.asarray(batch["episode_len"], dtype=np.float64)
        t = np.asarray(batch["t"], dtype=np.float64)
        longest = np.maximum(np.asarray(batch["task_max_len"], dtype=np.float64), length)
        penalty = self.config.failure_penalty_steps or longest
        failed = ~np.asarray(batch["success"], dtype=bool)
        scale = longest + penalty
        to_go = length - t
        value_target = -(to_go + penalty * failed) / scale
        n = self.config.n_step
        bootstrap = np.asarray(batch.get("has_next", np.zeros(len(t), bool)), dtype=bool) & (n > 0)
        reward_sum = np.where(bootstrap, -np.minimum(n, to_go) / scale, value_target)
        return value_target, reward_sum, bootstrap

    def update(self, batch: dict[str, np.ndarray]) -> Update:
        cfg, policy = self.config, self.policy
        finished = np.asarray(batch["episode_len"]) > 0
        value_target, reward_sum, bootstrap = self.returns(batch)
        x = self._value_input(batch, "obs/")
        device = x.device

        # 1. value function on the returns (finished episodes only)
        mask = torch.from_numpy(finished).to(device)
        v_losses = self.value.loss(x, torch.from_numpy(value_target).float().to(device))
        v_loss = (v_losses * mask).sum() / mask.sum().clamp(min=1)
        value_stats = self.value_step(v_loss)
        self._set_failure_thresholds(batch, finished)

        # 2. advantages with the current value function
        with torch.no_grad():
            v_now = self.value.value(x).cpu().numpy()
            v_next = self.value.value(self._value_input(batch, "next/")).cpu().numpy() if cfg.n_step else 0.0
        advantage = reward_sum + np.where(bootstrap, v_next, 0.0) - v_now

        # 3. indicators: per-task thresholds over recent advantages; operator steps forced positive
        task_index = np.asarray(batch["task_index"])
        for ti, a, ok in zip(task_index, advantage, finished):
            if ok:
                self._advantages[int(ti)].append(float(a))
        eps = {int(ti): np.quantile(self._advantages[int(ti)], 1.0 - cfg.positive_fraction)
               if self._advantages[int(ti)] else np.inf for ti in np.unique(task_index)}
        threshold = np.array([eps[int(ti)] for ti in task_index])
        operator = np.asarray(batch["is_intervention"], dtype=bool)
        indicator = improvement_indicators(advantage, threshold, operator, cfg.indicator_dropout, self._rng)
        if self.updates < cfg.value_warmup_steps:  # the value function is not trustworthy yet
            indicator[~operator] = INDICATOR_NONE
        indicator[~finished & ~operator] = INDICATOR_NONE  # no return, no advantage
        self.last_indicator = indicator

        # 4. the policy, conditioned on the indicator
        torch_batch = policy.train_batch_to_torch({**batch, "indicator": indicator})
        with policy.autocast():
            losses = policy.sample_losses(torch_batch)
        loss = losses.mean()
        policy_stats = self.step(loss)
        self.updates += 1
        stats = {"loss/bc": float(loss.detach()), "loss/value": float(v_loss.detach()),
                 "recap/advantage_mean": float(advantage[finished].mean()) if finished.any() else 0.0,
                 "recap/positive_fraction": float(np.mean(indicator == INDICATOR_POSITIVE)),
                 "recap/value_mean": float(v_now.mean()),
                 "batch/online_fraction": float(np.mean(batch["is_online"]))}
        stats.update(policy_stats)
        stats.update({f"value/{k}": v for k, v in value_stats.items()})
        return Update(stats, losses.detach().float().cpu().numpy())

    def state_dict(self) -> dict:
        return {"step": self.step.state_dict(), "value_step": self.value_step.state_dict(),
                "value": self.value.state_dict(), "updates": self.updates, "rng": self._rng.bit_generator.state,
                "advantages": {str(k): list(v) for k, v in self._advantages.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step.load_state_dict(state["step"])
        self.value_step.load_state_dict(state["value_step"])
        # a checkpoint from before the failure thresholds existed keeps the defaults (C = L_max: -1/2)
        self.value.load_state_dict({**self.value.state_dict(), **state["value"]})
        self.updates = int(state["updates"])
        self._rng.bit_generator.state = state["rng"]
        self._advantages.clear()
        for k, values in state["advantages"].items():
            self._advantages[int(k)].extend(float(v) for v in values)
