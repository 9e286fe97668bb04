"""HG-DAgger (Kelly et al., ICRA 2019), as SOP runs it on a fleet.

The novice (the fleet's policy) acts; the human takes full control when the
robot leaves the safe set and hands back later. Only the segments the human
drove are labelled: their executed actions are the targets. Those labels are
aggregated with offline demonstrations in the buffer and the policy is
retrained by supervised learning on the aggregate. Which steps are labels, and
the online/offline mix (SOP and RLinf sample interventions at about 50%), are
the sampler's business; this file is the loss and the update.

    loss/bc = mean over labelled steps in each action chunk of |pi(o_t)_h - a_{t+h}|   (ACT's L1)
"""

from __future__ import annotations

import numpy as np
import torch

from cloud.algorithms.base import Algorithm, register_algorithm


@register_algorithm("hg_dagger")
class HGDAgger(Algorithm):
    def __init__(self, policy, grad_clip_norm: float | None = None):
        self.policy = policy
        self.optimizer = policy.make_optimizer()
        self.grad_clip_norm = grad_clip_norm if grad_clip_norm is not None else policy.config.grad_clip_norm

    def update(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        torch_batch = self.policy.train_batch_to_torch(batch)
        loss, info = self.policy.compute_loss(torch_batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        stats = {"loss/bc": float(loss.detach()), "grad_norm": float(grad_norm)}
        online = batch.get("is_online")
        if online is not None:
            stats["batch/online_fraction"] = float(np.mean(online))
        stats.update({f"policy/{k}": float(v) for k, v in info.items() if isinstance(v, (int, float))})
        return stats

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
