"""Which LeRobot policy the fleet trains, and the LeRobot config built from it.

Users set LeRobot's own config (``fleet trainer --policy.type=act --policy.dim_model=256``: the
``PreTrainedConfig`` choice registry, LeRobot's fields and defaults) plus the few things fleet adds
(:class:`PolicyOptions`, ``--policy_options.*``). :meth:`PolicyConfig.from_lerobot` resolves both into a
``PolicyConfig``, which travels in every policy manifest (it keeps the LeRobot config it came from);
``lerobot_config`` turns it, with the robot's feature sizes, into the real
``lerobot.policies.*.configuration_*`` object: the user's LeRobot config with its features, device and
the fields fleet's data path needs (listed in ``FLEET_SET``) filled in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature

from fleet.errors import ConfigError

OBS_STATE = "observation.state"
OBS_ENV_STATE = "observation.environment_state"
OBS_IMAGE_PREFIX = "observation.images."
ACTION = "action"
SUPPORTED_POLICY_TYPES = ("act", "diffusion", "smolvla")
LANGUAGE_POLICY_TYPES = ("smolvla",)
"""Types that read the task as text; the others get a one-hot task embedding."""
CONDITIONING = ("none", "advantage")
VALUE_HEADS = ("none", "distributional", "scalar")
PRECISIONS = ("fp32", "bf16")
UNSUPPORTED_HINTS = {
    name: f"LeRobot's {name} needs its patched transformers build and the PaliGemma tokenizer from the "
          "Hugging Face hub; see docs/algorithms.md" for name in ("pi0", "pi05")}
# Diffusion: actions are mean/std normalized (not min/max), so clip denoised samples at +-3 std.
DIFFUSION_CLIP_RANGE = 3.0
INDICATOR_DIMS = 2
"""Extra environment-state inputs of an advantage-conditioned non-language policy: (positive, negative);
(0, 0) is "no indicator" (dropped out)."""


@dataclass(frozen=True)
class PolicyConfig:
    """Which LeRobot policy to train and how big it is."""

    type: str = "act"
    """LeRobot policy type, one of SUPPORTED_POLICY_TYPES (act, diffusion, smolvla)."""
    chunk_size: int = 10
    """Actions predicted per inference (Diffusion: horizon, rounded up to a multiple of 4)."""
    n_action_steps: int = 5
    """Actions of each chunk executed before querying the model again."""
    dim_model: int = 128
    """ACT transformer width; Diffusion U-Net down_dims are (dim_model // 2, dim_model)."""
    n_heads: int = 4
    """ACT attention heads (ignored by Diffusion)."""
    dim_feedforward: int = 512
    """ACT feed-forward width (ignored by Diffusion)."""
    n_encoder_layers: int = 2
    """ACT encoder layers (ignored by Diffusion)."""
    n_decoder_layers: int = 1
    """ACT decoder layers (ignored by Diffusion)."""
    use_vae: bool = False
    """ACT: train the CVAE latent (off: plain L1 behaviour cloning)."""
    use_images: bool = False
    """Feed the schema's camera images to ACT/Diffusion (random-init ResNet-18); SmolVLA always uses them."""
    vlm_path: str = ""
    """SmolVLA: local directory of a SmolVLM backbone (config + processor files; no hub). Empty: a tiny
    random one generated under FLEET_CACHE_DIR (~/.cache/fleet) for tests and CPU demos."""
    load_vlm_weights: bool = False
    """SmolVLA: load the backbone's pretrained weights from vlm_path (False: random init from its config)."""
    vlm_layers: int = 0
    """SmolVLA: keep only the first N language-model layers of the backbone (0 = all)."""
    freeze_backbone: bool = False
    """Freeze the vision backbone (ACT/Diffusion ResNet; SmolVLA: the whole VLM, train the action expert)."""
    conditioning: str = "none"
    """Extra policy input: "none", or "advantage" (RECAP's improvement indicator; set by --algorithm.type recap)."""
    cfg_beta: float = 1.0
    """Advantage-conditioned inference: classifier-free guidance weight (1 = plain "Advantage: positive")."""
    value_head: str = "none"
    """A value function deployed with the policy (fleet/policies/value.py; set by --algorithm.type recap):
    "none", "distributional" or "scalar". The edge reads its predicted failure (``FleetPolicy.failure_risk``)."""
    value_hidden_dim: int = 256
    """Width of the value function's MLP (with value_head)."""
    value_layers: int = 2
    """Hidden layers of the value function's MLP (with value_head)."""
    value_bins: int = 201
    """Bins of the distributional value head."""
    precision: str = "fp32"
    """Training compute: fp32, or bf16 autocast (AMP; meant for CUDA, also runs on CPU)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip_norm: float = 10.0
    """Max global gradient norm (see FleetPolicy.clip_grad_norm_)."""
    device: str = "cpu"
    """Torch device for the model ("cpu", "cuda", "cuda:0", "mps")."""
    lerobot: dict = field(default_factory=dict)
    """The user's LeRobot config (draccus-encoded, without features and device) this was resolved from;
    empty: built from the fields above alone (code and tests)."""

    def __post_init__(self) -> None:
        if self.type not in SUPPORTED_POLICY_TYPES:
            hint = f" ({UNSUPPORTED_HINTS[self.type]})" if self.type in UNSUPPORTED_HINTS else ""
            raise ConfigError(f"policy.type {self.type!r} is not supported{hint}; use one of {SUPPORTED_POLICY_TYPES}")
        for name in ("chunk_size", "n_action_steps", "dim_model", "n_heads", "dim_feedforward",
                     "n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"policy.{name} ({value!r}) must be a positive integer")
        if self.n_action_steps > self.chunk_size:
            raise ConfigError(
                f"policy.n_action_steps ({self.n_action_steps}) must be <= chunk_size ({self.chunk_size})")
        if self.type == "act" and self.dim_model % self.n_heads:
            raise ConfigError(f"policy.dim_model ({self.dim_model}) must be divisible by n_heads ({self.n_heads})")
        if self.type == "diffusion" and self.dim_model % 16:
            raise ConfigError(f"policy.dim_model ({self.dim_model}) must be a multiple of 16 for diffusion")
        if not isinstance(self.vlm_layers, int) or self.vlm_layers < 0:
            raise ConfigError(f"policy.vlm_layers ({self.vlm_layers!r}) must be an integer >= 0")
        if self.conditioning not in CONDITIONING:
            raise ConfigError(f"policy.conditioning ({self.conditioning!r}) must be one of {CONDITIONING}")
        if self.value_head not in VALUE_HEADS:
            raise ConfigError(f"policy.value_head ({self.value_head!r}) must be one of {VALUE_HEADS}")
        for name, least in (("value_hidden_dim", 1), ("value_layers", 1), ("value_bins", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"policy.{name} ({value!r}) must be an integer >= {least}")
        if not (math.isfinite(self.cfg_beta) and self.cfg_beta >= 1.0):
            raise ConfigError(f"policy.cfg_beta ({self.cfg_beta!r}) must be a number >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"policy.precision ({self.precision!r}) must be one of {PRECISIONS}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"policy.lr ({self.lr!r}) must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"policy.weight_decay ({self.weight_decay!r}) must be >= 0")
        if not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm > 0):
            raise ConfigError(f"policy.grad_clip_norm ({self.grad_clip_norm!r}) must be a positive number")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"policy.device ({self.device!r}) is not a torch device: {e}") from None

    @classmethod
    def from_lerobot(cls, lerobot: PreTrainedConfig, options: PolicyOptions | None = None) -> PolicyConfig:
        """The fleet policy of a LeRobot config (``--policy.*``) and fleet's options (``--policy_options.*``)."""
        import draccus

        options = options or PolicyOptions()
        kind = lerobot.type
        if kind not in SUPPORTED_POLICY_TYPES:
            hint = f" ({UNSUPPORTED_HINTS[kind]})" if kind in UNSUPPORTED_HINTS else ""
            raise ConfigError(f"policy.type {kind!r} is not supported{hint}; use one of {SUPPORTED_POLICY_TYPES}")
        own = {k: v for k, v in draccus.encode(lerobot).items() if k not in ("input_features", "output_features",
                                                                              "device", "type")}
        fields: dict[str, Any] = dict(
            type=kind, n_action_steps=lerobot.n_action_steps, lr=lerobot.optimizer_lr,
            weight_decay=lerobot.optimizer_weight_decay, device=lerobot.device or "cpu",
            precision="bf16" if lerobot.use_amp else "fp32", use_images=options.use_images,
            grad_clip_norm=options.grad_clip_norm, freeze_backbone=options.freeze_backbone,
            vlm_path=options.vlm_path, lerobot=own)
        if kind == "act":
            fields.update(chunk_size=lerobot.chunk_size, dim_model=lerobot.dim_model, n_heads=lerobot.n_heads,
                          dim_feedforward=lerobot.dim_feedforward, n_encoder_layers=lerobot.n_encoder_layers,
                          n_decoder_layers=lerobot.n_decoder_layers, use_vae=lerobot.use_vae)
        elif kind == "diffusion":
            fields.update(chunk_size=lerobot.horizon, dim_model=lerobot.down_dims[-1])
        else:  # smolvla
            fields.update(chunk_size=lerobot.chunk_size, load_vlm_weights=lerobot.load_vlm_weights,
                          vlm_layers=max(lerobot.num_vlm_layers, 0), grad_clip_norm=lerobot.optimizer_grad_clip_norm,
                          freeze_backbone=lerobot.freeze_vision_encoder)
        return cls(**fields)

    @property
    def uses_language(self) -> bool:
        """Whether the task reaches the policy as text (else as a one-hot embedding)."""
        return self.type in LANGUAGE_POLICY_TYPES

    @property
    def uses_images(self) -> bool:
        return self.use_images or self.type == "smolvla"


@dataclass(frozen=True)
class PolicyOptions:
    """What fleet adds to the LeRobot policy config (LeRobot's own fields are set as --policy.<field>)."""

    use_images: bool = False
    """Feed the schema's camera images to ACT/Diffusion; SmolVLA always uses them."""
    grad_clip_norm: float = 10.0
    """Max global gradient norm for ACT/Diffusion (SmolVLA uses its own optimizer_grad_clip_norm)."""
    freeze_backbone: bool = False
    """Freeze the ACT/Diffusion vision backbone (SmolVLA: set --policy.freeze_vision_encoder)."""
    vlm_path: str = ""
    """SmolVLA: local directory of a SmolVLM backbone (no hub); "" = a tiny random one under FLEET_CACHE_DIR."""


FLEET_SET = {"diffusion": dict(n_obs_steps=1, clip_sample_range=DIFFUSION_CLIP_RANGE, do_mask_loss_for_padding=True,
                               drop_n_last_frames=0, crop_shape=None)}
"""LeRobot fields fleet's data path sets whatever the user's config says (one observation per sample;
actions normalized by mean/std, so denoised samples are clipped at +-3 std; chunks padded at episode ends;
images at the robot's resolution)."""


def input_features(config: PolicyConfig, state_dim: int, n_tasks: int,
                   image_shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, PolicyFeature]:
    """LeRobot input features: state, images (C, H, W) and, without language, the task/indicator vector."""
    features = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))}
    for name, (h, w, _) in image_shapes.items():  # grayscale is expanded to RGB
        features[OBS_IMAGE_PREFIX + name] = PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w))
    if not config.uses_language:
        extra = INDICATOR_DIMS if config.conditioning == "advantage" else 0
        features[OBS_ENV_STATE] = PolicyFeature(type=FeatureType.ENV, shape=(n_tasks + extra,))
    return features


def lerobot_config(config: PolicyConfig, features: dict[str, PolicyFeature], action_dim: int) -> PreTrainedConfig:
    """The LeRobot config of ``config.type`` for these input features."""
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))}
    common: dict[str, Any] = dict(input_features=features, output_features=outputs, device=config.device,
                                  n_action_steps=config.n_action_steps, optimizer_lr=config.lr,
                                  optimizer_weight_decay=config.weight_decay)
    if config.lerobot:
        return _from_users_config(config, common)
    try:
        if config.type == "act":
            return ACTConfig(**common, chunk_size=config.chunk_size, dim_model=config.dim_model,
                             n_heads=config.n_heads, dim_feedforward=config.dim_feedforward,
                             n_encoder_layers=config.n_encoder_layers, n_decoder_layers=config.n_decoder_layers,
                             use_vae=config.use_vae, pretrained_backbone_weights=None)
        if config.type == "smolvla":
            from fleet.policies.smolvla import smolvla_config

            return smolvla_config(config, common)
        down_dims = (config.dim_model // 2, config.dim_model)
        factor = 2 ** len(down_dims)
        return DiffusionConfig(**common, n_obs_steps=1, horizon=math.ceil(config.chunk_size / factor) * factor,
                               down_dims=down_dims, clip_sample_range=DIFFUSION_CLIP_RANGE,
                               do_mask_loss_for_padding=True, drop_n_last_frames=0, crop_shape=None,
                               pretrained_backbone_weights=None, use_group_norm=True)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"LeRobot rejected policy config {config}: {e}") from e


def _from_users_config(config: PolicyConfig, common: dict[str, Any]) -> PreTrainedConfig:
    """The user's LeRobot config with this robot's features and device and what fleet's data path sets."""
    import draccus

    try:
        base = draccus.decode(PreTrainedConfig, {"type": config.type, **config.lerobot})
        changes: dict[str, Any] = dict(input_features=common["input_features"],
                                       output_features=common["output_features"], device=config.device,
                                       **FLEET_SET.get(config.type, {}))
        if config.type == "smolvla":
            from fleet.policies.smolvla import smolvla_config

            fitted = smolvla_config(config, common)
            changes.update(vlm_model_name=fitted.vlm_model_name, resize_imgs_with_padding=fitted.resize_imgs_with_padding,
                           max_state_dim=max(base.max_state_dim, fitted.max_state_dim),
                           max_action_dim=max(base.max_action_dim, fitted.max_action_dim))
        return replace(base, **changes)
    except (ValueError, NotImplementedError, draccus.utils.ParsingError) as e:
        raise ConfigError(f"LeRobot rejected policy config {config.type} {config.lerobot}: {e}") from e
