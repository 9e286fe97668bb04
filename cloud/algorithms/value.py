"""RECAP's value function: V(o, task) ~ the normalised return, i.e. minus the steps to success.

Returns are normalised per task into [-1, 0] (pi*0.6 does the same):

    G_t = -(steps from t to the episode's end) - failure_penalty_steps * [episode failed]
    v_t = G_t / (longest episode of the task + failure_penalty_steps)        in [-1, 0]

Two heads:
- ``distributional`` (pi*0.6): ``bins`` logits over evenly spaced values in [-1, 0] (201 in the paper);
  trained with cross-entropy on the target's two-hot projection onto the neighbouring bins; V is the
  expectation under the softmax.
- ``scalar``: one output squashed into [-1, 0] (-sigmoid), trained with squared error.

The input is the policy's normalised ``observation.state`` and the task one-hot (pi*0.6 uses a VLM
on images and language; our value function sees the low-dim state only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fleet.errors import ConfigError

HEADS = ("distributional", "scalar")


class ValueFunction(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int = 256, layers: int = 2, head: str = "distributional",
                 bins: int = 201):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"recap.value_head ({head!r}) must be one of {HEADS}")
        if head == "distributional" and bins < 2:
            raise ConfigError(f"recap.value_bins ({bins}) must be >= 2")
        self.head = head
        out = bins if head == "distributional" else 1
        dims = [input_dim] + [hidden_dim] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(dims[-1], out))
        self.register_buffer("support", torch.linspace(-1.0, 0.0, bins if head == "distributional" else 2))

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
