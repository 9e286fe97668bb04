"""LeRobot policies (ACT, Diffusion, SmolVLA) behind the fleet's :class:`ActingPolicy`.

The robot schema's non-image observation features are flattened and concatenated,
in schema order, into ``observation.state``; camera images (when the policy uses
them) become ``observation.images.<name>`` (C, H, W) floats in [0, 1]. The task
reaches language policies (SmolVLA) as text, and the others as a one-hot task
embedding in ``observation.environment_state``. An advantage-conditioned policy
(RECAP) also gets the improvement indicator: the text "Advantage: positive" /
"Advantage: negative" after the task, or two extra environment-state inputs;
no indicator (dropped out) is plain text / zeros. LeRobot 0.4 keeps
normalization outside the policy, so mean/std normalization lives here and
travels with the weights as ``fleet_norm.*`` tensors. A policy trained by RECAP
also carries its value function (``PolicyConfig.value_head``; fleet/policies/value.py)
as ``fleet_value.*`` tensors, so the edge predicts failure each tick
(``failure_risk``). Weights move as safetensors; no pickle anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import draccus
import numpy as np
import torch
from draccus.utils import DraccusException
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy

from fleet.convert import schema_from_dict, schema_to_dict
from fleet.errors import ConfigError, InvalidInput
from fleet.policies.losses import SAMPLE_LOSSES
from fleet.policies.norm import MIN_STD, NORM_NAMES, NORM_PREFIX, NormStats
from fleet.policies.policy_config import (
    ACTION,
    OBS_ENV_STATE,
    OBS_IMAGE_PREFIX,
    OBS_STATE,
    SUPPORTED_POLICY_TYPES,
    PolicyConfig,
    input_features,
    lerobot_config,
)
from fleet.policies.value import PREFIX as VALUE_PREFIX
from fleet.policies.value import ValueFunction, value_input
from fleet.types import FeatureSpec, Schema

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_POLICY_TYPES", "FleetPolicy", "NormStats", "PolicyConfig", "build_policy",
           "set_torch_threads", "INDICATOR_NONE", "INDICATOR_NEGATIVE", "INDICATOR_POSITIVE"]

INDICATOR_NONE, INDICATOR_NEGATIVE, INDICATOR_POSITIVE = -1, 0, 1
"""Values of a batch's ``indicator`` (B,): dropped out, "Advantage: negative", "Advantage: positive"."""
_INDICATOR_TEXT = {INDICATOR_NEGATIVE: "Advantage: negative", INDICATOR_POSITIVE: "Advantage: positive"}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Config fields that depend on the machine, not the policy: not compared when a manifest is decoded.
_LOCAL_FIELDS = ("device", "vlm_model_name", "load_vlm_weights")


def _policy_class(policy_type: str) -> type[PreTrainedPolicy]:
    if policy_type == "act":
        from lerobot.policies.act.modeling_act import ACTPolicy
        return ACTPolicy
    if policy_type == "diffusion":
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
        return DiffusionPolicy
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    return SmolVLAPolicy


def _features(schema: Schema, tasks: Sequence[str], config: PolicyConfig
              ) -> tuple[tuple[FeatureSpec, ...], tuple[FeatureSpec, ...]]:
    """(state features, image features used by the policy); checks what every policy type needs."""
    states = tuple(spec for spec in schema.observation if not spec.is_image)
    images = tuple(spec for spec in schema.observation if spec.is_image) if config.uses_images else ()
    if not states or sum(math.prod(s.shape) for s in states) == 0:
        raise ConfigError("schema has no non-image observation features to build observation.state from")
    for spec in images:
        if len(spec.shape) != 3 or spec.shape[2] not in (1, 3) or spec.dtype != "uint8":
            raise ConfigError(f"image feature {spec.name!r} must be uint8 (H, W, 1|3), got {spec.dtype} {spec.shape}")
    if len(schema.action.shape) != 1 or schema.action.shape[0] == 0:
        raise ConfigError(f"action feature {schema.action.name!r} must be a non-empty vector, "
                          f"got shape {schema.action.shape}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks ({list(tasks)!r}) must be a non-empty list of distinct instructions")
    return states, images


def _new_model(config: PreTrainedConfig, seed: int) -> PreTrainedPolicy:
    """Seeded init that leaves the global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _policy_class(config.type)(config)


def _new_value(config: PolicyConfig, state_dim: int, n_tasks: int, seed: int = 0) -> ValueFunction | None:
    """The value function ``config`` deploys with the policy (None without ``value_head``); seeded, leaving
    the global torch RNG as it was."""
    if config.value_head == "none":
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ValueFunction(state_dim, n_tasks, config.value_hidden_dim, config.value_layers, config.value_head,
                             config.value_bins)


def _check_layout(config: PreTrainedConfig, policy_config: PolicyConfig, state_dim: int, n_tasks: int,
                  tensors: Mapping[str, torch.Tensor]) -> None:
    """Build the model (and value function) on the meta device (shapes only, no memory) and raise InvalidInput
    unless its tensor names and shapes are those of ``tensors`` (normalization stats aside)."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        meta = _policy_class(config.type)(config)
        value = _new_value(policy_config, state_dim, n_tasks)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if value is not None:
        expected.update({VALUE_PREFIX + k: tuple(v.shape) for k, v in value.state_dict().items()})
    got = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith(NORM_PREFIX)}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:5]
        raise InvalidInput(f"policy config describes another model than its tensors (first differences: {diff})")


def _decode_lerobot_config(encoded: Mapping[str, Any]) -> PreTrainedConfig:
    """Decode with draccus and check that it encodes back to the same dict (machine-local fields aside)."""
    try:
        decoded = draccus.decode(PreTrainedConfig, dict(encoded))
    except (DraccusException, ValueError, TypeError) as e:
        raise ConfigError(f"manifest lerobot_config does not decode: {e}") from e
    again = draccus.encode(decoded)
    if ({k: v for k, v in again.items() if k not in _LOCAL_FIELDS}
            != {k: v for k, v in encoded.items() if k not in _LOCAL_FIELDS}):
        raise ConfigError(f"manifest lerobot_config of type {encoded.get('type')!r} does not round-trip "
                          "through this LeRobot version")
    return decoded


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adamw(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with ``fused=True`` when every parameter is a plain CPU or CUDA float tensor (one
    kernel over all parameters instead of about ten ops per tensor: on CPU, where torch's default is a loop
    over tensors, about half the optimizer's time for a small ACT); sharded (FSDP) parameters keep the default."""
    fused = bool(params) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                 and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


class FleetPolicy:
    """A LeRobot policy plus what it needs to act for a robot: schema, tasks, normalization.

    Build with :func:`build_policy` or :meth:`from_manifest`. ``model`` is the real
    ``lerobot.policies.*`` policy (an ``nn.Module``) that the trainer optimizes.
    """

    def __init__(self, config: PolicyConfig, model: PreTrainedPolicy, schema: Schema, tasks: Sequence[str],
                 stats: NormStats, version: int = 0, seed: int = 0) -> None:
        self.config = config
        self.schema = schema
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.state_features, self.image_features = _features(schema, self.tasks, config)
        self.action_feature = schema.action
        self.state_dim = sum(math.prod(s.shape) for s in self.state_features)
        self.action_dim = schema.action.shape[0]
        lr_cfg = model.config
        images = {s.name: s.shape for s in self.image_features}
        expected = {k: tuple(f.shape) for k, f in
                    input_features(config, self.state_dim, len(self.tasks), images).items()}
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
        self.value = _new_value(config, self.state_dim, len(self.tasks), seed)
        """RECAP's value function deployed with the policy (``config.value_head``), else None. Not part of
        ``model``: the policy's optimizer and DDP/FSDP never see it; RECAP trains it with its own optimizer."""
        if self.value is not None:
            self.value.to(self.device)
        self.horizon: int = lr_cfg.horizon if config.type == "diffusion" else lr_cfg.chunk_size
        self.version = version
        self._norm = {name: torch.from_numpy(getattr(stats, name).copy()).to(self.device) for name in NORM_NAMES}
        for name in ("state_std", "action_std"):
            self._norm[name].clamp_(min=MIN_STD)
        self._image_mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(3, 1, 1)
        self._image_std = torch.tensor(_IMAGENET_STD, device=self.device).view(3, 1, 1)
        self._task_index = {task: i for i, task in enumerate(self.tasks)}
        self._warned_tasks: set[str] = set()
        self._lock = threading.RLock()
        if config.freeze_backbone:
            self._freeze_backbone()
        self.action_disagreement = 0.0
        """RMS difference (in action standard deviations) between the newest action chunk and what the chunk
        before it predicted for the same ticks; 0 when they do not overlap (edge/help.py reads it)."""
        self.failure_risk = 0.0
        """Predicted probability (0..1) that the episode fails, from the value function at the last
        ``select_action`` (fleet/policies/value.py); 0 without one (edge/help.py reads it)."""
        self._ticks = 0  # select_action calls since reset
        self._last_chunk: tuple[int, np.ndarray] | None = None  # (tick it was predicted at, [T, A] normalized)
        self._watch_chunks()

    def _watch_chunks(self) -> None:
        """Route the chunks LeRobot's select_action predicts through :meth:`_on_chunk` (an instance attribute
        in front of the model's own method; the state dict and training are untouched)."""
        name = "_get_action_chunk" if hasattr(self.model, "_get_action_chunk") else "predict_action_chunk"
        predict = getattr(self.model, name, None)
        if predict is None:
            return

        def predicted(*args, **kwargs):
            chunk = predict(*args, **kwargs)
            self._on_chunk(chunk)
            return chunk

        setattr(self.model, name, predicted)

    def _on_chunk(self, chunk: torch.Tensor) -> None:
        """Compare a freshly predicted chunk with the previous one over the ticks both cover."""
        if chunk.ndim != 3:
            return
        guided = self.config.conditioning == "advantage" and self.config.cfg_beta != 1.0 and chunk.shape[0] > 1
        rows = chunk[1] + self.config.cfg_beta * (chunk[0] - chunk[1]) if guided else chunk[0]
        new = rows.detach().to("cpu", torch.float32).numpy()
        tick = self._ticks
        if self._last_chunk is not None:
            then, old = self._last_chunk
            offset = tick - then
            overlap = min(len(old) - offset, len(new))
            self.action_disagreement = (float(np.sqrt(np.mean((old[offset:offset + overlap] - new[:overlap]) ** 2)))
                                        if 0 <= offset and overlap > 0 else 0.0)
        self._last_chunk = (tick, new)

    def _freeze_backbone(self) -> None:
        """ACT/Diffusion: the ResNet image encoder (SmolVLA freezes its VLM through its own config)."""
        backbone = {"act": lambda m: getattr(m.model, "backbone", None),
                    "diffusion": lambda m: getattr(m.diffusion, "rgb_encoder", None)}.get(self.config.type)
        module = backbone(self.model) if backbone else None
        for p in module.parameters() if module is not None else ():
            p.requires_grad_(False)

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

    def normalized_state(self, get: Callable[[str], Any], lead: tuple[int, ...]) -> torch.Tensor:
        """Flat, mean/std-normalized ``observation.state`` on the policy's device."""
        state = self._to_device(self._flat_state(get, lead))
        return (state - self._norm["state_mean"]) / self._norm["state_std"]

    def _images(self, get: Callable[[str], Any], lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        out = {}
        for spec in self.image_features:
            try:
                array = np.asarray(get(spec.name))
            except KeyError:
                raise InvalidInput(f"camera image {spec.name!r} is missing") from None
            if array.shape != lead + spec.shape or array.dtype != np.uint8:
                raise InvalidInput(f"image {spec.name!r} is {array.dtype} {array.shape}, want uint8 {lead + spec.shape}")
            image = self._to_device(array).movedim(-1, -3).float() / 255.0
            if image.shape[-3] == 1:  # grayscale: every encoder here takes RGB
                image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
            if self.config.type != "smolvla":  # ResNet encoders expect ImageNet-normalized input
                image = (image - self._image_mean) / self._image_std
            out[OBS_IMAGE_PREFIX + spec.name] = image
        return out

    def _one_hot(self, task_index: np.ndarray) -> torch.Tensor:
        index = np.asarray(task_index, dtype=np.int64)
        if index.ndim != 1 or np.any(index < -1) or np.any(index >= len(self.tasks)):
            raise InvalidInput(f"task_index must be (B,) in [-1, {len(self.tasks)}), got {index!r}")
        one_hot = np.zeros((len(index), len(self.tasks)), dtype=np.float32)
        known = index >= 0
        one_hot[np.nonzero(known)[0], index[known]] = 1.0
        return torch.from_numpy(one_hot).to(self.device)

    def _indicator(self, indicator: np.ndarray | None, n: int) -> np.ndarray:
        if indicator is None:
            return np.full((n,), INDICATOR_NONE, dtype=np.int64)
        indicator = np.asarray(indicator, dtype=np.int64)
        if indicator.shape != (n,) or not np.isin(indicator, (-1, 0, 1)).all():
            raise InvalidInput(f"indicator must be (B={n},) with values in -1/0/1, got {indicator!r}")
        return indicator

    def _task_inputs(self, task_index: np.ndarray, indicator: np.ndarray | None) -> dict[str, torch.Tensor]:
        """One-hot task (+ indicator inputs), or SmolVLA language tokens with the indicator as text."""
        task = self._one_hot(task_index)
        n = task.shape[0]
        conditioned = self.config.conditioning == "advantage"
        indicator = self._indicator(indicator if conditioned else None, n)
        if self.config.uses_language:
            from fleet.policies.smolvla import tokenizer_of

            prompts = []
            for i, ind in zip(np.asarray(task_index), indicator):
                text = self.tasks[i] if i >= 0 else ""
                prompts.append(f"{text}\n{_INDICATOR_TEXT[ind]}\n" if ind >= 0 else f"{text}\n")
            tokens = tokenizer_of(self.model)(prompts, padding="longest", padding_side="right", truncation=True,
                                              max_length=self.model.config.tokenizer_max_length, return_tensors="pt")
            return {"observation.language.tokens": tokens["input_ids"].to(self.device),
                    "observation.language.attention_mask": tokens["attention_mask"].to(self.device, torch.bool)}
        if conditioned:
            extra = np.stack([indicator == INDICATOR_POSITIVE, indicator == INDICATOR_NEGATIVE], axis=1)
            task = torch.cat([task, torch.from_numpy(extra.astype(np.float32)).to(self.device)], dim=1)
        return {OBS_ENV_STATE: task}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A batch array on the policy's device; from the sampler's pinned host memory (CUDA) the copy is an
        asynchronous DMA, ordered before the kernels that read it on the same stream (pageable: a plain copy)."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def train_batch_to_torch(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Sampler batch (``obs/<name>``, ``task_index``, ``action``, ``action_is_pad``, optional ``indicator``)
        -> LeRobot batch."""
        action = np.asarray(batch["action"], dtype=np.float32)
        is_pad = np.asarray(batch["action_is_pad"], dtype=bool)
        n, h = action.shape[:2] if action.ndim == 3 else (0, 0)
        if action.shape != (n, self.config.chunk_size, self.action_dim) or is_pad.shape != (n, h):
            raise InvalidInput(f"action {action.shape} / action_is_pad {is_pad.shape} do not match "
                               f"(B, {self.config.chunk_size}, {self.action_dim}) / (B, {self.config.chunk_size})")
        if self.horizon > h:  # diffusion horizon rounded up: repeat the last action, marked as padding
            action = np.concatenate([action, np.repeat(action[:, -1:], self.horizon - h, axis=1)], axis=1)
            is_pad = np.concatenate([is_pad, np.ones((n, self.horizon - h), dtype=bool)], axis=1)
        get = lambda name: batch[f"obs/{name}"]  # noqa: E731
        task_index = np.asarray(batch["task_index"])
        if task_index.shape != (n,):
            raise InvalidInput(f"task_index has shape {task_index.shape}, action has {n} rows")
        out = {OBS_STATE: self.normalized_state(get, (n,)), **self._images(get, (n,)),
               **self._task_inputs(task_index, batch.get("indicator"))}
        if self.config.type == "diffusion":  # (B, n_obs_steps=1, ...)
            out = {k: v.unsqueeze(1) for k, v in out.items()}
        out[ACTION] = (self._to_device(action) - self._norm["action_mean"]) / self._norm["action_std"]
        out["action_is_pad"] = self._to_device(is_pad)
        return out

    # ----- training -----------------------------------------------------------------
    def sample_losses(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The policy's training loss per sample, (B,), in train mode (see fleet/policies/losses.py)."""
        self.model.train()
        return SAMPLE_LOSSES[self.config.type](self.model, batch).float()

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast around forward passes when ``precision`` is bf16 (AMP; no grad scaler needed)."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.config.precision == "bf16"):
            yield

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (torch's fused kernel where it applies: see ``adamw``)."""
        return adamw(self.trainable_parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def clip_grad_norm_(self) -> float:
        """Clip gradients to ``config.grad_clip_norm``; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.grad_clip_norm))

    # ----- acting -------------------------------------------------------------------
    def _task_id(self, task: str) -> int:
        index = self._task_index.get(task, -1)
        if index < 0 and task not in self._warned_tasks:
            self._warned_tasks.add(task)
            logger.warning("unknown task %r (policy knows %d tasks); using an empty task input", task, len(self.tasks))
        return index

    def select_action(self, observation: Mapping[str, np.ndarray], task: str) -> np.ndarray:
        """Next action (A,) float32 from LeRobot's action queue; refills it with a new chunk when empty.

        An advantage-conditioned policy acts with "Advantage: positive"; with ``cfg_beta`` > 1 it runs the
        conditioned and the unconditioned rows together and returns u + beta * (c - u) (classifier-free
        guidance on the action chunk)."""
        with self._lock, torch.no_grad():
            self._ticks += 1
            guided = self.config.conditioning == "advantage" and self.config.cfg_beta != 1.0
            indicator = [INDICATOR_POSITIVE, INDICATOR_NONE] if guided else [INDICATOR_POSITIVE]
            n = len(indicator)
            single = {name: np.repeat(np.asarray(v)[None], n, axis=0) for name, v in observation.items()}
            task_id = self._task_id(task)
            batch = {OBS_STATE: self.normalized_state(single.__getitem__, (n,)),
                     **self._images(single.__getitem__, (n,)),
                     **self._task_inputs(np.full((n,), task_id), np.array(indicator))}
            if self.value is not None:  # one small MLP forward on what the policy already has
                self.failure_risk = self._failure_risk(batch[OBS_STATE][:1], task_id)
            was_training = self.model.training
            try:
                action = self.model.select_action(batch)
            finally:
                self.model.train(was_training)
            if guided:
                action = action[1:] + self.config.cfg_beta * (action[:1] - action[1:])
            action = action * self._norm["action_std"] + self._norm["action_mean"]
            return action[0].to("cpu", torch.float32).numpy()

    def _failure_risk(self, state: torch.Tensor, task_id: int) -> float:
        task = torch.tensor([task_id], device=self.device)
        risk = float(self.value.failure_risk(value_input(state, task, len(self.tasks)), task)[0])
        return risk if math.isfinite(risk) else 0.0

    def value_input(self, get: Callable[[str], Any], lead: tuple[int, ...], task_index: np.ndarray) -> torch.Tensor:
        """The value function's input for a batch of observations: [normalised state, task one-hot]."""
        task = torch.from_numpy(np.asarray(task_index, dtype=np.int64)).to(self.device)
        return value_input(self.normalized_state(get, lead), task, len(self.tasks))

    def reset(self) -> None:
        """Clear LeRobot's queues (episode start, or control handed back by an operator)."""
        with self._lock:
            self.model.reset()
            self._ticks, self._last_chunk, self.action_disagreement, self.failure_risk = 0, None, 0.0, 0.0

    def add_value_function(self, head: str, hidden_dim: int, layers: int, bins: int, seed: int = 0) -> ValueFunction:
        """Deploy a new value function with this policy (RECAP given a policy built without one): it joins the
        config (``value_*``) and the state dict."""
        with self._lock:
            config = replace(self.config, value_head=head, value_hidden_dim=hidden_dim, value_layers=layers,
                             value_bins=bins)
            self.value = _new_value(config, self.state_dim, len(self.tasks), seed).to(self.device)
            self.config = config
        return self.value

    # ----- serialization ------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The LeRobot state_dict plus ``fleet_norm.*`` stats (and ``fleet_value.*``), as they are (on the
        policy's device, no copy): what a snapshot copies once (``cloud.snapshot``)."""
        with self._lock:
            out = {k: v.detach() for k, v in self._state_dict().items()}
            out.update({NORM_PREFIX + k: v.detach() for k, v in self._norm.items()})
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """CPU copies of the LeRobot state_dict plus ``fleet_norm.*`` stats (and ``fleet_value.*``)."""
        with self._lock:
            out = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._state_dict().items()}
            out.update({NORM_PREFIX + k: v.detach().to("cpu", copy=True) for k, v in self._norm.items()})
        return out

    def _state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict plus the value function's (``fleet_value.*``), sharing their memory."""
        out = self.model.state_dict()
        if self.value is not None:
            out.update({VALUE_PREFIX + k: v for k, v in self.value.state_dict().items()})
        return out

    def trainable_names(self) -> set[str]:
        """Names in :meth:`tensors` that an optimizer updates (the policy's, and RECAP's value function's)."""
        names = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if self.value is not None:
            names |= {VALUE_PREFIX + name for name, _ in self.value.named_parameters()}
        return names

    def manifest_config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_manifest` rebuilds this policy."""
        return {"lerobot_config": draccus.encode(self.model.config), "policy_config": asdict(self.config),
                "tasks": list(self.tasks), "schema": schema_to_dict(self.schema)}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], version: int, partial: bool = False) -> None:
        """Copy weights and stats in place (strict names and shapes; ``partial``: only those given, the rest
        written already, e.g. through :meth:`weight_views`); clears the action queue."""
        own = self._state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items()}
        expected.update({NORM_PREFIX + k: tuple(v.shape) for k, v in self._norm.items()})
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if (not got.items() <= expected.items()) if partial else got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:5]
            raise InvalidInput(f"tensors do not match this policy (first differences: {diff})")
        with self._lock, torch.no_grad():
            if partial:
                for name, value in tensors.items():
                    if name in own:
                        own[name].copy_(value)
            else:
                self.model.load_state_dict({k: v for k, v in tensors.items() if k in own
                                            and not k.startswith(VALUE_PREFIX)}, strict=True)
                if self.value is not None:
                    self.value.load_state_dict({k.removeprefix(VALUE_PREFIX): v for k, v in tensors.items()
                                                if k.startswith(VALUE_PREFIX)}, strict=True)
            for name, value in self._norm.items():
                if NORM_PREFIX + name in tensors:
                    value.copy_(tensors[NORM_PREFIX + name])
            for name in ("state_std", "action_std"):
                self._norm[name].clamp_(min=MIN_STD)
            self.version = version
            self.model.reset()
            self._ticks, self._last_chunk, self.action_disagreement, self.failure_risk = 0, None, 0.0, 0.0

    def weight_views(self) -> dict[str, memoryview]:
        """Writable raw bytes of the model's weights, by name, sharing their memory (CPU, contiguous, not
        aliased; {} on another device): a new version is written into a standby model through these, with
        no copy of the model built. Normalization stats are not here (they are clamped when loaded)."""
        from fleet.weights import tensor_view

        out, seen = {}, set()
        for name, t in self._state_dict().items():
            if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
                continue
            if t.data_ptr() in seen:  # tied weights: one name writes them
                continue
            seen.add(t.data_ptr())
            out[name] = tensor_view(t)
        return out

    def same_architecture(self, config: Mapping[str, Any]) -> bool:
        """Whether :meth:`from_manifest` with this manifest ``config`` would build this very model."""
        mine, theirs = self.manifest_config(), {k: dict(v) if isinstance(v, Mapping) else v
                                                 for k, v in config.items()}
        for part in (mine, theirs):
            if not isinstance(part.get("lerobot_config"), dict) or not isinstance(part.get("policy_config"), dict):
                return False
            for key in _LOCAL_FIELDS:
                part["lerobot_config"].pop(key, None)
            part["policy_config"].pop("device", None)
        return mine == theirs

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], version: int,
                      device: str | None = None) -> FleetPolicy:
        """Rebuild the exact policy from :meth:`manifest_config` and :meth:`tensors` (optionally on ``device``)."""
        try:
            policy_config = PolicyConfig(**config["policy_config"])
            lerobot_dict = dict(config["lerobot_config"])
            tasks = tuple(str(t) for t in config["tasks"])
            schema = schema_from_dict(config["schema"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed policy manifest config: {e!r}") from e
        if device is not None:
            policy_config = replace(policy_config, device=device)
            lerobot_dict["device"] = device
        if policy_config.type == "smolvla":  # this machine's backbone directory; weights come from tensors
            from fleet.policies.smolvla import resolve_vlm_path

            lerobot_dict.update(vlm_model_name=str(resolve_vlm_path(policy_config.vlm_path)), load_vlm_weights=False)
        lerobot = _decode_lerobot_config(lerobot_dict)
        if lerobot.type != policy_config.type:
            raise ConfigError(f"lerobot_config type {lerobot.type!r} != policy.type {policy_config.type!r}")
        try:
            stats = NormStats(*(tensors[NORM_PREFIX + n].cpu().numpy() for n in NORM_NAMES))
        except KeyError as e:
            raise InvalidInput(f"policy tensors lack normalization stats {e}") from None
        # before allocating: a config may claim a model far larger than its tensors
        states, _ = _features(schema, tasks, policy_config)
        _check_layout(lerobot, policy_config, sum(math.prod(s.shape) for s in states), len(tasks), tensors)
        model = _new_model(lerobot, seed=0)  # weights are overwritten below
        policy = cls(policy_config, model, schema, tasks, stats, version)
        policy.load_tensors(tensors, version)
        return policy


def build_policy(config: PolicyConfig, schema: Schema, tasks: Sequence[str], stats: NormStats | None = None,
                 seed: int = 0) -> FleetPolicy:
    """A freshly initialized policy (seeded, without touching the global RNG); version 0."""
    states, images = _features(schema, tasks, config)
    state_dim, action_dim = sum(math.prod(s.shape) for s in states), schema.action.shape[0]
    features = input_features(config, state_dim, len(tasks), {s.name: s.shape for s in images})
    model = _new_model(lerobot_config(config, features, action_dim), seed)
    if stats is None:
        stats = NormStats.identity(state_dim, action_dim)
    return FleetPolicy(config, model, schema, tasks, stats, seed=seed)


def set_torch_threads(n: int) -> None:
    """Limit torch's intra-op CPU threads (1 on small edge boxes and in tests)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"torch threads ({n!r}) must be a positive integer")
    torch.set_num_threads(n)
