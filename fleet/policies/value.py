"""RECAP's value function: V(o, task) ~ the normalised return, i.e. minus the steps to success.

It lives with the policy (``FleetPolicy.value``, built from ``PolicyConfig.value_*``) so that its weights
ride in the published state dict as ``fleet_value.*`` tensors (full, delta and in-place transfers alike)
and the edge can predict failure; RECAP (cloud/algorithms/recap.py) trains this very module with its own
optimizer.

Returns are normalised per task into [-1, 0] (pi*0.6 does the same):

    G_t = -(steps from t to the episode's end) - C * [episode failed]
    v_t = G_t / (L_max + C)        in [-1, 0]

L_max the task's longest episode, C ``failure_penalty_steps`` (0: C = L_max). Two heads:
- ``distributional`` (pi*0.6): ``bins`` logits over evenly spaced values in [-1, 0] (201 in the paper);
  trained with cross-entropy on the target's two-hot projection onto the neighbouring bins; V is the
  expectation under the softmax.
- ``scalar``: one output squashed into [-1, 0] (-sigmoid), trained with squared error.

The input is the policy's normalised ``observation.state`` and the task one-hot (pi*0.6 uses a VLM
on images and language; our value function sees the low-dim state only).

**Failure risk** (what the edge's help signal reads). A successful episode's steps to go are at most L_max,
so its v lies in [-L_max/(L_max + C), 0]; a failed one's lies in [-1, -C/(L_max + C)]. Below the
threshold tau = -L_max/(L_max + C) only failed episodes can be: with C >= L_max (the default C = L_max
gives tau = -1/2 whatever L_max) every failed step is below it and every successful one at or above it, so
P(v < tau) is the probability that the episode fails; with C < L_max a failed episode's last steps overlap
successful ones and P(v < tau) is a lower bound. tau is per task (L_max is the data's, not a setting), so
the trainer keeps it in the ``failure_threshold`` buffer, which travels with the weights.
- distributional head: risk = the softmax mass on bins strictly below tau (to the bins' resolution).
- scalar head: only the mean V is known. Values below tau are >= -1 and the others >= tau, so
  V >= -p + tau (1 - p) for p = P(v < tau): p >= (tau - V) / (1 + tau). Risk is that least failure
  probability consistent with V, clamped to [0, 1]: 0 for V >= tau, 1 at V = -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fleet.errors import ConfigError

HEADS = ("distributional", "scalar")
PREFIX = "fleet_value."
"""Name prefix of the value function's tensors in a policy's state dict."""


def failure_threshold(longest: float, penalty_steps: float) -> float:
    """tau = -L_max / (L_max + C): below it only failed episodes' normalised returns lie (C = 0: C = L_max)."""
    penalty = penalty_steps or longest
    return -longest / (longest + penalty) if longest > 0 else -0.5


class ValueFunction(nn.Module):
    def __init__(self, state_dim: int, n_tasks: int, hidden_dim: int = 256, layers: int = 2,
                 head: str = "distributional", bins: int = 201):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"value head ({head!r}) must be one of {HEADS}")
        if head == "distributional" and bins < 2:
            raise ConfigError(f"value bins ({bins}) must be >= 2")
        if state_dim < 1 or n_tasks < 1 or hidden_dim < 1 or layers < 1:
            raise ConfigError(f"value function sizes (state {state_dim}, tasks {n_tasks}, hidden {hidden_dim}, "
                              f"layers {layers}) must be >= 1")
        self.head = head
        self.n_tasks = n_tasks
        out = bins if head == "distributional" else 1
        dims = [state_dim + n_tasks] + [hidden_dim] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(dims[-1], out))
        self.register_buffer("support", torch.linspace(-1.0, 0.0, bins if head == "distributional" else 2))
        # Per task, tau = -L_max / (L_max + C) (module docstring); the trainer sets it, the edge reads it.
        self.register_buffer("failure_threshold", torch.full((n_tasks,), -0.5))

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """Expected normalised return, (B,) in [-1, 0]."""
        out = self.net(x)
        if self.head == "scalar":
            return -torch.sigmoid(out[:, 0])
        return (out.softmax(-1) * self.support).sum(-1)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,) against normalised returns ``target`` in [-1, 0]."""
        out = self.net(x)
        target = target.clamp(-1.0, 0.0)
        if self.head == "scalar":
            return (-torch.sigmoid(out[:, 0]) - target).pow(2)
        return -(two_hot(target, self.support) * out.log_softmax(-1)).sum(-1)

    def failure_risk(self, x: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """Predicted probability that the episode fails, (B,) in [0, 1] (module docstring); an unknown task
        (-1) uses the lowest threshold of all tasks (mass below it is failure whatever the task)."""
        tau = torch.where(task_index >= 0, self.failure_threshold[task_index.clamp(min=0)],
                          self.failure_threshold.min())
        out = self.net(x)
        if self.head == "scalar":
            v = -torch.sigmoid(out[:, 0])
            return ((tau - v) / (1.0 + tau).clamp(min=1e-6)).clamp(0.0, 1.0)
        below = (self.support[None, :] < tau[:, None]).to(out.dtype)
        return (out.softmax(-1) * below).sum(-1).clamp(0.0, 1.0)


def two_hot(target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Distribute each target between its two neighbouring support points (expectation preserved)."""
    n = support.numel()
    pos = (target - support[0]) / (support[-1] - support[0]) * (n - 1)
    lo = pos.floor().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w_hi = pos - lo
    probs = torch.zeros(target.shape[0], n, device=target.device, dtype=target.dtype)
    probs.scatter_add_(1, lo.long()[:, None], (1 - w_hi)[:, None])
    probs.scatter_add_(1, hi.long()[:, None], w_hi[:, None])
    return probs


def value_input(state: torch.Tensor, task_index: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """[normalised state, task one-hot] (unknown task -1: zeros)."""
    one_hot = F.one_hot(task_index.clamp(min=0), n_tasks).float() * (task_index >= 0).float()[:, None]
    return torch.cat([state.float(), one_hot], dim=1)
