"""Data-parallel training across processes, GPUs and nodes (torchrun).

    torchrun --nproc-per-node 4 -m fleet.cli trainer --redis_url ... --policy_dir ...

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; without
them (a plain ``fleet trainer``) everything here is a no-op. With them:

* the process group comes up from the environment: NCCL when the policy is on
  CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU;
* the policy's per-sample loss (``policy.sample_losses``, which the algorithms
  call) runs through ``DistributedDataParallel`` (or, with
  ``strategy="fsdp"``, FSDP2 ``fully_shard`` for models whose weights, gradients
  and optimizer state do not fit one GPU, e.g. VLAs): gradients are averaged
  during ``backward``, so every rank takes the same optimizer step;
* each rank samples its own batches (sampler seed + rank): the global batch is
  ``batch_size * world_size``;
* only rank 0 publishes, checkpoints and writes the trainer status; a stop
  (SIGTERM) is decided by rank 0 and broadcast once per step, so no rank is
  left waiting in a collective. With FSDP, publishing gathers the full weights
  (a collective every rank enters at the same step: publishing is by steps
  only) into a CPU-side copy of the policy on rank 0, and trainer checkpoints
  are not written (the optimizer state is sharded): a restart resumes from the
  newest published version with a new optimizer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RankInfo:
        env = env if env is not None else dict(os.environ)
        try:
            info = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                             f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
        if not 0 <= info.rank < info.world_size:
            raise ValueError(f"RANK ({info.rank}) must be in [0, WORLD_SIZE={info.world_size})")
        return info


class _PolicyLoss(torch.nn.Module):
    """The policy's own loss as a module whose parameters are the policy model's (what DDP wraps)."""

    def __init__(self, policy, sample_losses):
        super().__init__()
        self.model = policy.model
        self._sample_losses = sample_losses

    def forward(self, batch):
        return self._sample_losses(batch)


class Distributed:
    """One per trainer process; see the module docstring."""

    def __init__(self, ranks: RankInfo, strategy: str = "ddp", timeout_s: float = 600.0):
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.ranks = ranks
        self.strategy = strategy
        self.timeout_s = timeout_s
        self.wrapper: torch.nn.Module | None = None
        self._device = torch.device("cpu")
        self._shadow = None  # FSDP, rank 0: an unsharded copy of the policy to publish from

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> Distributed:
        return cls(RankInfo.from_env(), strategy)

    @property
    def enabled(self) -> bool:
        return self.ranks.world_size > 1

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    def start(self, device: str) -> None:
        """Join the process group (NCCL for a CUDA ``device``, else gloo); pins this rank's GPU."""
        if not self.enabled or torch_dist.is_initialized():
            return
        self._device = torch.device(device)
        cuda = self._device.type == "cuda"
        if cuda:  # "cuda" now means this rank's GPU for every later .to("cuda")
            torch.cuda.set_device(self.ranks.local_rank)
            self._device = torch.device("cuda", self.ranks.local_rank)
        backend = "nccl" if cuda else "gloo"
        torch_dist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=self.timeout_s))
        log.info("rank %d/%d (local %d): process group up (%s, %s)", self.rank, self.ranks.world_size,
                 self.ranks.local_rank, backend, self.strategy)

    def local_stop(self, stop: threading.Event) -> threading.Event:
        """The event this rank's loop watches: rank 0's own; other ranks stop when rank 0 says so."""
        return stop if self.is_main or not self.enabled else threading.Event()

    def wrap(self, policy) -> None:
        """Route ``policy.sample_losses`` through DDP/FSDP so ``backward`` averages gradients across ranks.

        ``policy.model`` stays the plain module (state_dict keys, acting, publishing unchanged)."""
        if not self.enabled:
            return
        loss_module = _PolicyLoss(policy, policy.sample_losses)
        if self.strategy == "fsdp":  # call before building the optimizer: sharding replaces the parameters
            from torch.distributed.fsdp import fully_shard

            if self.is_main:
                from fleet.policies import FleetPolicy

                self._shadow = FleetPolicy.from_manifest(policy.manifest_config(), policy.tensors(), policy.version,
                                                         device="cpu")  # the full weights never sit on the GPU
            fully_shard(loss_module)
            self.wrapper = loss_module
        else:
            device_ids = [self._device.index] if self._device.type == "cuda" else None
            # LeRobot models hold parameters a given config never uses (e.g. ACT's VAE encoder when use_vae
            # is off): DDP must not wait for their gradients.
            self.wrapper = torch.nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids,
                                                                     find_unused_parameters=True)
        policy.sample_losses = self.wrapper  # an instance attribute shadows the method: one place, on purpose

    def stop_agreed(self, local_stop: bool) -> bool:
        """Rank 0's stop decision, broadcast (a collective every rank calls once per step).

        If rank 0 has already left (its process group is gone), that is a stop too."""
        if not self.enabled:
            return local_stop
        flag = torch.tensor([1 if local_stop else 0], dtype=torch.int32, device=self._collective_device())
        try:
            torch_dist.broadcast(flag, src=0)
        except (RuntimeError, torch_dist.DistBackendError) as exc:
            log.info("rank %d: rank 0 is gone (%s); stopping", self.rank, exc)
            return True
        return bool(flag.item())

    def _collective_device(self) -> torch.device:
        return self._device if self._device.type == "cuda" else torch.device("cpu")

    @contextlib.contextmanager
    def full_policy(self, policy) -> Iterator:
        """The policy with its full weights, to publish: ``policy`` itself without FSDP; with FSDP the
        weights are gathered (every rank must enter at the same step) into rank 0's copy."""
        if self.strategy != "fsdp" or self.wrapper is None:
            yield policy
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self._shadow is None:
            yield None
            return
        self._shadow.model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=True)
        if getattr(policy, "value", None) is not None and self._shadow.value is not None:
            # RECAP's value function is not sharded (it is not in the loss module): rank 0's own weights
            self._shadow.value.load_state_dict(policy.value.state_dict())
        self._shadow.version = policy.version
        yield self._shadow
        policy.version = self._shadow.version

    @property
    def checkpoints_here(self) -> bool:
        """Whether this rank writes trainer checkpoints: rank 0, and not under FSDP (sharded optimizer)."""
        return self.is_main and not (self.enabled and self.strategy == "fsdp")

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
