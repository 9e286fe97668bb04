"""LeRobot policies (ACT, Diffusion) behind the fleet's :class:`ActingPolicy`.

The robot schema's non-image observation features are flattened and concatenated,
in schema order, into ``observation.state``. The task (language instruction) is a
one-hot task embedding over ``FleetPolicy.tasks`` given as
``observation.environment_state``. LeRobot 0.4 keeps normalization outside the
policy, so mean/std normalization lives here and travels with the weights as
``fleet_norm.*`` tensors. Weights move as safetensors; no pickle anywhere.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import draccus
import numpy as np
import torch
from draccus.utils import DraccusException
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.act.configuration_act import ACTConfig
from lerobot.policies.act.modeling_act import ACTPolicy
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.pretrained import PreTrainedPolicy
from safetensors.torch import load_file, save_file

from fleet.errors import ConfigError, InvalidInput
from fleet.types import FeatureSpec, Schema

logger = logging.getLogger(__name__)

OBS_STATE = "observation.state"
OBS_ENV_STATE = "observation.environment_state"
ACTION = "action"
NORM_PREFIX = "fleet_norm."
NORM_NAMES = ("state_mean", "state_std", "action_mean", "action_std")
MIN_STD = 1e-2
SUPPORTED_POLICY_TYPES = ("act", "diffusion")
_POLICY_CLASSES: dict[str, type[PreTrainedPolicy]] = {"act": ACTPolicy, "diffusion": DiffusionPolicy}
# Diffusion: actions are mean/std normalized (not min/max), so clip denoised samples at +-3 std.
_DIFFUSION_CLIP_RANGE = 3.0


@dataclass(frozen=True)
class PolicyConfig:
    """Which LeRobot policy to train and how big it is."""

    type: str = "act"
    """LeRobot policy type, one of SUPPORTED_POLICY_TYPES."""
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
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip_norm: float = 10.0
    """Max global gradient norm (see FleetPolicy.clip_grad_norm_)."""
    device: str = "cpu"
    """Torch device for the model ("cpu", "cuda", "cuda:0", "mps")."""

    def __post_init__(self) -> None:
        if self.type not in SUPPORTED_POLICY_TYPES:
            raise ConfigError(f"policy.type {self.type!r} is not supported; use one of {SUPPORTED_POLICY_TYPES}")
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


def _as_vector(name: str, value: np.ndarray | Sequence[float]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise InvalidInput(f"NormStats.{name} must be a finite 1-D vector, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class NormStats:
    """Per-dimension mean/std of ``observation.state`` and ``action`` (float32)."""

    state_mean: np.ndarray
    state_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray

    def __post_init__(self) -> None:
        for name in NORM_NAMES:
            object.__setattr__(self, name, _as_vector(name, getattr(self, name)))
        if self.state_mean.shape != self.state_std.shape or self.action_mean.shape != self.action_std.shape:
            raise InvalidInput("NormStats: mean and std shapes differ")

    @classmethod
    def from_data(cls, states: np.ndarray, actions: np.ndarray) -> NormStats:
        """Stats of flat states (N, D) and actions (N, A)."""
        states, actions = np.asarray(states, np.float64), np.asarray(actions, np.float64)
        if states.ndim != 2 or actions.ndim != 2 or len(states) == 0 or len(actions) == 0:
            raise InvalidInput(f"NormStats.from_data wants non-empty (N, D) and (N, A); got "
                               f"{states.shape} and {actions.shape}")
        return cls(states.mean(0), states.std(0), actions.mean(0), actions.std(0))

    @classmethod
    def identity(cls, state_dim: int, action_dim: int) -> NormStats:
        """Mean 0, std 1."""
        return cls(np.zeros(state_dim), np.ones(state_dim), np.zeros(action_dim), np.ones(action_dim))


def _state_features(schema: Schema, tasks: Sequence[str]) -> tuple[FeatureSpec, ...]:
    """Non-image observation features; checks what every policy type needs."""
    features = tuple(spec for spec in schema.observation if not spec.is_image)
    if not features or sum(math.prod(s.shape) for s in features) == 0:
        raise ConfigError("schema has no non-image observation features to build observation.state from")
    if len(schema.action.shape) != 1 or schema.action.shape[0] == 0:
        raise ConfigError(f"action feature {schema.action.name!r} must be a non-empty vector, "
                          f"got shape {schema.action.shape}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks ({list(tasks)!r}) must be a non-empty list of distinct instructions")
    return features


def _lerobot_config(config: PolicyConfig, state_dim: int, n_tasks: int, action_dim: int) -> PreTrainedConfig:
    inputs = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(state_dim,)),
              OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(n_tasks,))}
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))}
    common: dict[str, Any] = dict(input_features=inputs, output_features=outputs, device=config.device,
                                  n_action_steps=config.n_action_steps, optimizer_lr=config.lr,
                                  optimizer_weight_decay=config.weight_decay)
    try:
        if config.type == "act":
            return ACTConfig(**common, chunk_size=config.chunk_size, dim_model=config.dim_model,
                             n_heads=config.n_heads, dim_feedforward=config.dim_feedforward,
                             n_encoder_layers=config.n_encoder_layers, n_decoder_layers=config.n_decoder_layers,
                             use_vae=config.use_vae, pretrained_backbone_weights=None)
        down_dims = (config.dim_model // 2, config.dim_model)
        factor = 2 ** len(down_dims)
        return DiffusionConfig(**common, n_obs_steps=1, horizon=math.ceil(config.chunk_size / factor) * factor,
                               down_dims=down_dims, clip_sample_range=_DIFFUSION_CLIP_RANGE,
                               do_mask_loss_for_padding=True, drop_n_last_frames=0)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"LeRobot rejected policy config {config}: {e}") from e


def _new_model(lerobot_config: PreTrainedConfig, seed: int) -> PreTrainedPolicy:
    """Seeded init that leaves the global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _POLICY_CLASSES[lerobot_config.type](lerobot_config)


def _decode_lerobot_config(encoded: Mapping[str, Any]) -> PreTrainedConfig:
    """Decode with draccus and check that it encodes back to the same dict (device aside)."""
    try:
        decoded = draccus.decode(PreTrainedConfig, dict(encoded))
    except (DraccusException, ValueError, TypeError) as e:
        raise ConfigError(f"manifest lerobot_config does not decode: {e}") from e
    again = draccus.encode(decoded)
    if {k: v for k, v in again.items() if k != "device"} != {k: v for k, v in encoded.items() if k != "device"}:
        raise ConfigError(f"manifest lerobot_config of type {encoded.get('type')!r} does not round-trip "
                          "through this LeRobot version")
    return decoded


def _schema_to_dict(schema: Schema) -> dict[str, Any]:
    def spec(s: FeatureSpec) -> dict[str, Any]:
        return {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "is_image": s.is_image}

    return {"observation": [spec(s) for s in schema.observation], "action": spec(schema.action)}


def _schema_from_dict(d: Mapping[str, Any]) -> Schema:
    def spec(s: Mapping[str, Any]) -> FeatureSpec:
        return FeatureSpec(s["name"], s["dtype"], tuple(s["shape"]), bool(s["is_image"]))

    return Schema(tuple(spec(s) for s in d["observation"]), spec(d["action"]))


class FleetPolicy:
    """A LeRobot policy plus what it needs to act for a robot: schema, tasks, normalization.

    Build with :func:`build_policy` or :meth:`from_manifest`. ``model`` is the real
    ``lerobot.policies.*`` policy (an ``nn.Module``) that the trainer optimizes.
    """

    def __init__(self, config: PolicyConfig, model: PreTrainedPolicy, schema: Schema, tasks: Sequence[str],
                 stats: NormStats, version: int = 0) -> None:
        self.config = config
        self.schema = schema
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.state_features = _state_features(schema, self.tasks)
        self.action_feature = schema.action
        self.state_dim = sum(math.prod(s.shape) for s in self.state_features)
        self.action_dim = schema.action.shape[0]
        lr_cfg = model.config
        expected = {OBS_STATE: (self.state_dim,), OBS_ENV_STATE: (len(self.tasks),)}
        got = {k: tuple(f.shape) for k, f in lr_cfg.input_features.items()}
        if got != expected or tuple(lr_cfg.output_features[ACTION].shape) != (self.action_dim,):
            raise ConfigError(f"LeRobot features {got} do not match schema/tasks {expected}")
        if lr_cfg.type != config.type:
            raise ConfigError(f"LeRobot config type {lr_cfg.type!r} != policy.type {config.type!r}")
        if (stats.state_mean.shape, stats.action_mean.shape) != ((self.state_dim,), (self.action_dim,)):
            raise InvalidInput(f"NormStats dims {stats.state_mean.shape}/{stats.action_mean.shape} do not "
                               f"match state {self.state_dim} / action {self.action_dim}")
        self.device = torch.device(lr_cfg.device)
        self.model = model.to(self.device)
        self.horizon: int = lr_cfg.horizon if config.type == "diffusion" else lr_cfg.chunk_size
        self.version = version
        self._norm = {name: torch.from_numpy(getattr(stats, name).copy()).to(self.device) for name in NORM_NAMES}
        for name in ("state_std", "action_std"):
            self._norm[name].clamp_(min=MIN_STD)
        self._task_index = {task: i for i, task in enumerate(self.tasks)}
        self._warned_tasks: set[str] = set()
        self._lock = threading.RLock()

    # ----- batches -----------------------------------------------------------------
    def _flat_state(self, get: Callable[[str], Any], lead: tuple[int, ...]) -> np.ndarray:
        parts = []
        for spec in self.state_features:
            try:
                array = np.asarray(get(spec.name))
            except KeyError:
                raise InvalidInput(f"observation feature {spec.name!r} is missing") from None
            if array.shape != lead + spec.shape:
                raise InvalidInput(f"observation {spec.name!r} has shape {array.shape}, want {lead + spec.shape}")
            parts.append(array.reshape(lead + (-1,)).astype(np.float32))
        return np.concatenate(parts, axis=-1)

    def _one_hot(self, task_index: np.ndarray) -> torch.Tensor:
        index = np.asarray(task_index, dtype=np.int64)
        if index.ndim != 1 or np.any(index < -1) or np.any(index >= len(self.tasks)):
            raise InvalidInput(f"task_index must be (B,) in [-1, {len(self.tasks)}), got {index!r}")
        one_hot = np.zeros((len(index), len(self.tasks)), dtype=np.float32)
        known = index >= 0
        one_hot[np.nonzero(known)[0], index[known]] = 1.0
        return torch.from_numpy(one_hot).to(self.device)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def train_batch_to_torch(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Sampler batch (``obs/<name>``, ``task_index``, ``action``, ``action_is_pad``) -> LeRobot batch."""
        action = np.asarray(batch["action"], dtype=np.float32)
        is_pad = np.asarray(batch["action_is_pad"], dtype=bool)
        n, h = action.shape[:2] if action.ndim == 3 else (0, 0)
        if action.shape != (n, self.config.chunk_size, self.action_dim) or is_pad.shape != (n, h):
            raise InvalidInput(f"action {action.shape} / action_is_pad {is_pad.shape} do not match "
                               f"(B, {self.config.chunk_size}, {self.action_dim}) / (B, {self.config.chunk_size})")
        if self.horizon > h:  # diffusion horizon rounded up: repeat the last action, marked as padding
            action = np.concatenate([action, np.repeat(action[:, -1:], self.horizon - h, axis=1)], axis=1)
            is_pad = np.concatenate([is_pad, np.ones((n, self.horizon - h), dtype=bool)], axis=1)
        state = self._to_device(self._flat_state(lambda name: batch[f"obs/{name}"], (n,)))
        state = (state - self._norm["state_mean"]) / self._norm["state_std"]
        task = self._one_hot(batch["task_index"])
        if task.shape[0] != n:
            raise InvalidInput(f"task_index has {task.shape[0]} rows, action has {n}")
        if self.config.type == "diffusion":  # (B, n_obs_steps=1, D)
            state, task = state.unsqueeze(1), task.unsqueeze(1)
        action_t = (self._to_device(action) - self._norm["action_mean"]) / self._norm["action_std"]
        return {OBS_STATE: state, OBS_ENV_STATE: task, ACTION: action_t, "action_is_pad": self._to_device(is_pad)}

    # ----- training -----------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """LeRobot ``forward`` in train mode; returns the loss and ``loss/*`` metrics."""
        self.model.train()
        loss, info = self.model.forward(dict(batch))
        metrics = {"loss/bc": float(loss.detach())}
        metrics.update({f"loss/{k}": float(v) for k, v in (info or {}).items()})
        return loss, metrics

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def clip_grad_norm_(self) -> float:
        """Clip gradients to ``config.grad_clip_norm``; returns the norm before clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip_norm))

    # ----- acting -------------------------------------------------------------------
    def _task_one_hot(self, task: str) -> torch.Tensor:
        index = self._task_index.get(task, -1)
        if index < 0 and task not in self._warned_tasks:
            self._warned_tasks.add(task)
            logger.warning("unknown task %r (policy knows %d tasks); using an all-zeros task embedding",
                           task, len(self.tasks))
        return self._one_hot(np.array([index]))

    def select_action(self, observation: Mapping[str, np.ndarray], task: str) -> np.ndarray:
        """Next action (A,) float32 from LeRobot's action queue; refills it with a new chunk when empty."""
        with self._lock, torch.no_grad():
            state = self._to_device(self._flat_state(observation.__getitem__, ())[None])
            state = (state - self._norm["state_mean"]) / self._norm["state_std"]
            batch = {OBS_STATE: state, OBS_ENV_STATE: self._task_one_hot(task)}
            was_training = self.model.training
            try:
                action = self.model.select_action(batch)
            finally:
                self.model.train(was_training)
            action = action * self._norm["action_std"] + self._norm["action_mean"]
            return action[0].to("cpu", torch.float32).numpy()

    def reset(self) -> None:
        """Clear LeRobot's queues (episode start, or control handed back by an operator)."""
        with self._lock:
            self.model.reset()

    # ----- serialization ------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """CPU copies of the LeRobot state_dict plus ``fleet_norm.*`` stats."""
        with self._lock:
            out = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
            out.update({NORM_PREFIX + k: v.detach().to("cpu", copy=True) for k, v in self._norm.items()})
        return out

    def trainable_names(self) -> set[str]:
        """Names in :meth:`tensors` that the optimizer updates."""
        return {name for name, p in self.model.named_parameters() if p.requires_grad}

    def manifest_config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_manifest` rebuilds this policy."""
        return {"lerobot_config": draccus.encode(self.model.config), "policy_config": asdict(self.config),
                "tasks": list(self.tasks), "schema": _schema_to_dict(self.schema)}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy weights and stats in place (strict names and shapes); clears the action queue."""
        own = self.model.state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items()}
        expected.update({NORM_PREFIX + k: tuple(v.shape) for k, v in self._norm.items()})
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:5]
            raise InvalidInput(f"tensors do not match this policy (first differences: {diff})")
        with self._lock, torch.no_grad():
            self.model.load_state_dict({k: tensors[k] for k in own}, strict=True)
            for name, value in self._norm.items():
                value.copy_(tensors[NORM_PREFIX + name])
            for name in ("state_std", "action_std"):
                self._norm[name].clamp_(min=MIN_STD)
            self.version = version
            self.model.reset()

    def copy_weights_from(self, other: FleetPolicy) -> None:
        """Hot update in place from a policy with the same architecture, schema and tasks."""
        mine, theirs = self.manifest_config(), other.manifest_config()
        for part in (mine, theirs):
            part["lerobot_config"].pop("device", None)
            part["policy_config"].pop("device", None)
        if mine != theirs:
            raise ConfigError("copy_weights_from: the other policy has another config, schema or task list")
        self.load_tensors(other.tensors(), other.version)

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], version: int,
                      device: str | None = None) -> FleetPolicy:
        """Rebuild the exact policy from :meth:`manifest_config` and :meth:`tensors` (optionally on ``device``)."""
        try:
            policy_config = PolicyConfig(**config["policy_config"])
            lerobot_dict = dict(config["lerobot_config"])
            tasks = tuple(str(t) for t in config["tasks"])
            schema = _schema_from_dict(config["schema"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed policy manifest config: {e!r}") from e
        if device is not None:
            policy_config = replace(policy_config, device=device)
            lerobot_dict["device"] = device
        lerobot_config = _decode_lerobot_config(lerobot_dict)
        if lerobot_config.type != policy_config.type:
            raise ConfigError(f"lerobot_config type {lerobot_config.type!r} != policy.type {policy_config.type!r}")
        try:
            stats = NormStats(*(tensors[NORM_PREFIX + n].cpu().numpy() for n in NORM_NAMES))
        except KeyError as e:
            raise InvalidInput(f"policy tensors lack normalization stats {e}") from None
        model = _new_model(lerobot_config, seed=0)  # weights are overwritten below
        policy = cls(policy_config, model, schema, tasks, stats, version)
        policy.load_tensors(tensors, version)
        return policy

    def save_safetensors(self, path: str | Path) -> None:
        """Write :meth:`tensors` to a safetensors file."""
        save_file(self.tensors(), str(path))

    @classmethod
    def load_safetensors(cls, path: str | Path, config: Mapping[str, Any], version: int,
                         device: str | None = None) -> FleetPolicy:
        """:meth:`from_manifest` with tensors read from a safetensors file."""
        return cls.from_manifest(config, load_file(str(path)), version, device)


def build_policy(config: PolicyConfig, schema: Schema, tasks: Sequence[str], stats: NormStats | None = None,
                 seed: int = 0) -> FleetPolicy:
    """A freshly initialized policy (seeded, without touching the global RNG); version 0."""
    features = _state_features(schema, tasks)
    state_dim, action_dim = sum(math.prod(s.shape) for s in features), schema.action.shape[0]
    lerobot_config = _lerobot_config(config, state_dim, len(tasks), action_dim)
    model = _new_model(lerobot_config, seed)
    if stats is None:
        stats = NormStats.identity(state_dim, action_dim)
    return FleetPolicy(config, model, schema, tasks, stats)


def set_torch_threads(n: int) -> None:
    """Limit torch's intra-op CPU threads (1 on small edge boxes and in tests)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"torch threads ({n!r}) must be a positive integer")
    torch.set_num_threads(n)
