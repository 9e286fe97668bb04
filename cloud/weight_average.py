"""An exponential moving average of the trainable weights: what the trainer publishes when asked to.

Online imitation with a high learning rate moves the weights a long way between versions: a version a few
seconds newer can be 0.1 better or worse on held-out episodes, and robots act with whichever arrived last.
Publishing the average of the recent weights (Polyak averaging, as diffusion policies and most image
generators do) gives robots a steadier policy for a lag of about ``steps`` optimizer steps.

The trainer keeps training its own weights; only what it publishes changes. The average starts from the
weights online training starts with (so the seed-BC version is untouched) and warms up like TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``: the decay is ``min(1 - 1/steps, (1 + n) / (10 + n))``
after ``n`` updates, so the first versions follow the newest weights closely. It is kept in float32 next to
the weights (one more copy of the trainable parameters in memory) and goes into every checkpoint.
"""

from __future__ import annotations

import torch


class WeightAverage:
    """The moving average of ``policy``'s trainable floating-point tensors over about ``steps`` updates."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"steps ({steps}) must be >= 1")
        self.decay = 1.0 - 1.0 / steps
        self.updates = 0
        self.average: dict[str, torch.Tensor] = {}
        self._live: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return bool(self.average)

    def _track(self, policy) -> dict[str, torch.Tensor]:
        """The live tensors averaged: trainable, floating point (they share the policy's memory)."""
        tensors, trainable = policy.state_tensors(), policy.trainable_names()
        live = {name: t for name, t in tensors.items() if name in trainable and t.is_floating_point()}
        self._live = list(live.values())
        return live

    def start(self, policy) -> None:
        """Average from ``policy``'s weights as they are now (no update counted yet)."""
        self.average = {name: t.detach().to(torch.float32, copy=True) for name, t in self._track(policy).items()}
        self.updates = 0

    def update(self) -> None:
        """Fold in the weights after one more optimizer step."""
        weight = 1.0 - min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        live = [t.to(torch.float32) for t in self._live]
        torch._foreach_lerp_(list(self.average.values()), live, weight)
        self.updates += 1

    def published(self, policy) -> dict[str, torch.Tensor]:
        """``policy``'s tensors (what a version holds) with the averaged ones in place of the newest."""
        tensors = policy.state_tensors()  # a new dict (its tensors are the policy's own)
        for name, value in self.average.items():
            tensors[name] = value.to(tensors[name].dtype)
        return tensors

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": dict(self.average)}

    def load_state_dict(self, state: dict, policy) -> None:
        """Restore a checkpoint's average for ``policy`` (a checkpoint without one starts it afresh)."""
        live = self._track(policy)
        average = state.get("average") or {}
        if set(average) != set(live):
            self.start(policy)
            return
        self.average = {name: average[name].to(live[name].device, torch.float32) for name in live}
        self.updates = int(state["updates"])
