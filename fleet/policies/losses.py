"""Per-sample training losses of LeRobot policies, shape (B,).

LeRobot's ``forward`` returns the batch mean; the sampler (SOP's adaptive
online/offline ratio) and weighted algorithms (HG-DAgger's intervention weight)
need one loss per sample. Each function below is the policy's own loss with the
batch reduction left out; the batch mean of its output equals LeRobot's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

ACTION = "action"
OBS_IMAGES = "observation.images"


def act_losses(model, batch: Mapping[str, Tensor]) -> Tensor:
    """ACT: L1 over the unpadded chunk (mean over steps x dims) + kl_weight * KL when the VAE is on."""
    batch = dict(batch)
    if model.config.image_features:
        batch[OBS_IMAGES] = [batch[key] for key in model.config.image_features]
    actions_hat, (mu, log_sigma_x2) = model.model(batch)
    l1 = F.l1_loss(batch[ACTION], actions_hat, reduction="none") * ~batch["action_is_pad"].unsqueeze(-1)
    losses = l1.mean(dim=(1, 2))
    if model.config.use_vae:
        kld = (-0.5 * (1 + log_sigma_x2 - mu.pow(2) - log_sigma_x2.exp())).sum(-1)
        losses = losses + kld * model.config.kl_weight
    return losses


def diffusion_losses(model, batch: Mapping[str, Tensor]) -> Tensor:
    """Diffusion: denoising MSE over the unpadded horizon (``DiffusionModel.compute_loss`` per sample)."""
    batch = dict(batch)
    if model.config.image_features:
        batch[OBS_IMAGES] = torch.stack([batch[key] for key in model.config.image_features], dim=-4)
    diffusion = model.diffusion
    global_cond = diffusion._prepare_global_conditioning(batch)
    trajectory = batch[ACTION]
    eps = torch.randn(trajectory.shape, device=trajectory.device)
    timesteps = torch.randint(0, diffusion.noise_scheduler.config.num_train_timesteps, (trajectory.shape[0],),
                              device=trajectory.device).long()
    noisy = diffusion.noise_scheduler.add_noise(trajectory, eps, timesteps)
    pred = diffusion.unet(noisy, timesteps, global_cond=global_cond)
    target = eps if model.config.prediction_type == "epsilon" else trajectory
    loss = F.mse_loss(pred, target, reduction="none") * ~batch["action_is_pad"].unsqueeze(-1)
    return loss.mean(dim=(1, 2))


def smolvla_losses(model, batch: Mapping[str, Tensor]) -> Tensor:
    """SmolVLA: flow-matching MSE, LeRobot's ``reduction="none"`` (padding masked)."""
    batch = dict(batch)
    batch["actions_id_pad"] = batch["action_is_pad"]  # the key LeRobot 0.4.4's SmolVLA reads
    losses, _ = model.forward(batch, reduction="none")
    return losses


SAMPLE_LOSSES: dict[str, Callable[[object, Mapping[str, Tensor]], Tensor]] = {
    "act": act_losses, "diffusion": diffusion_losses, "smolvla": smolvla_losses}
