"""The trainer's configuration (one typed config per process; see fleet/config.py for the
conventions: a one-line docstring under each field becomes its ``--help``).

``policy`` is LeRobot's own ``PreTrainedConfig`` choice registry (``--policy.type=act|diffusion|smolvla``,
then that policy's LeRobot fields and defaults: ``--policy.dim_model=256``); ``policy_options`` is what
fleet adds. ``algorithm`` is a choice registry too (``--algorithm.type=hg_dagger|recap``, then only that
algorithm's fields: ``--algorithm.n_step=5``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import lerobot.policies  # noqa: F401  (registers LeRobot's policy configs: act, diffusion, smolvla...)
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.act.configuration_act import ACTConfig

from cloud.algorithms import AlgorithmConfig  # noqa: F401  (registers hg_dagger and recap)
from cloud.algorithms.hg_dagger import HGDAggerConfig
from cloud.rate_limiter import RateLimiterConfig
from cloud.sampler import SamplerConfig
from fleet.config import DEFAULT_TASKS, require
from fleet.policies.policy_config import PolicyConfig, PolicyOptions


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer: samples from Redis, trains, publishes versions."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the buffer."""
    blob_url: str = ""
    """Blob store holding the camera frames (the gateway's blob_url); "" = frames inline in Redis."""
    policy_dir: str = "runs/default/policies"
    """Policy store directory (the gateway serves from it)."""
    embodiment: str = ""
    """Train only on robots registered with this embodiment and publish its own policy line (one trainer,
    gateway and policy_dir per embodiment); "" = every robot (they must share one schema)."""
    algorithm: AlgorithmConfig = field(default_factory=HGDAggerConfig)
    """Learning algorithm and its hyper-parameters: --algorithm.type=hg_dagger or recap (docs/algorithms.md)."""
    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Language instructions the shared policy is conditioned on (fixed at the policy's creation)."""
    batch_size: int = 64
    """Samples per optimizer step."""
    online_fraction: float = 0.5
    """Share of each task's samples drawn from online data (rest: offline demos); with the adaptive
    sampler, the share until both kinds have losses."""
    grad_accumulation_steps: int = 1
    """Batches whose gradients are accumulated into one optimizer step."""
    publish_every_steps: int = 100
    """Publish a new policy version every this many optimizer steps."""
    publish_every_s: float = 0.0
    """Also publish when this many seconds passed since the last version (0 = by steps only)."""
    publish_full_every_versions: int = 20
    """Every Nth version is a keyframe edges get without element deltas: bounds their delta chains (0 = never)."""
    publish_average_steps: int = 0
    """Publish a moving average of the weights over about this many recent optimizer steps instead of the
    newest weights: a steadier policy for that much lag (0 = the newest; cloud/weight_average.py)."""
    publish_key_file: str = ""
    """Publisher's Ed25519 private key (`fleet certs publisher-key`, mode 0600): signs every version ("" = unsigned)."""
    refresh_interval_s: float = 1.0
    """How often the sampler pulls newly arrived steps from Redis, seconds."""
    seed_bc_steps: int = 300
    """Behaviour-cloning steps on offline data before the first version is published (0 = none)."""
    min_labeled_steps: int = 32
    """Do not train before the buffer holds this many labeled steps."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run until stopped)."""
    metrics_port: int = 0
    """Port for Prometheus /metrics (0 = off)."""
    torch_threads: int = 1
    """torch.set_num_threads for the trainer."""
    seed: int = 0
    """Seed for the policy's initial weights, the sampler and training's random draws (dropout): a fresh
    trainer on the same data repeats its weights bit for bit (seed + rank under torchrun)."""
    checkpoint_dir: str = ""
    """Where training checkpoints live ("" = '<policy_dir>-checkpoints', one per policy line)."""
    checkpoint_every_steps: int = 500
    """Checkpoint every this many optimizer steps (0 = not by steps)."""
    checkpoint_every_s: float = 300.0
    """Also checkpoint when this many seconds passed since the last checkpoint (0 = not by time)."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep (oldest deleted first)."""
    shutdown_timeout_s: float = 25.0
    """On SIGTERM, checkpoint and exit within this many seconds, else exit 1 (keep it below Kubernetes'
    terminationGracePeriodSeconds, 30 by default)."""
    distributed_strategy: str = "ddp"
    """Under torchrun: ddp (weights replicated) or fsdp (sharded, for VLAs); see cloud/distributed.py."""
    policy: PreTrainedConfig = field(default_factory=ACTConfig)
    """The LeRobot policy to train: --policy.type=act|diffusion|smolvla and that policy's LeRobot fields."""
    policy_options: PolicyOptions = field(default_factory=PolicyOptions)
    """What fleet adds to the LeRobot policy (images for ACT/Diffusion, gradient clipping, SmolVLA backbone)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """SOP's sampler: per-task balance and the adaptive online/offline share."""
    rate_limit: RateLimiterConfig = field(default_factory=RateLimiterConfig)
    """Update-to-data ratio (Reverb SampleToInsertRatio)."""
    fresh: bool = False
    """Set existing checkpoints aside and start from a new policy (version numbers keep rising)."""

    def fleet_policy(self) -> PolicyConfig:
        """The policy to build: resolved from ``policy`` and ``policy_options`` (code may pass a fleet
        ``PolicyConfig`` as ``policy`` directly, as the tests do)."""
        if isinstance(self.policy, PolicyConfig):
            return self.policy
        return PolicyConfig.from_lerobot(self.policy, self.policy_options)

    def __post_init__(self) -> None:
        self.fleet_policy()  # an unsupported type or size is a config error now, not at the first step
        require(self.grad_accumulation_steps >= 1,
                 f"grad_accumulation_steps ({self.grad_accumulation_steps}) must be >= 1")
        require(self.batch_size > 0, f"batch_size ({self.batch_size}) must be > 0")
        require(0.0 <= self.online_fraction <= 1.0, f"online_fraction ({self.online_fraction}) must be in [0, 1]")
        require(self.publish_every_steps > 0, f"publish_every_steps ({self.publish_every_steps}) must be > 0")
        require(self.publish_full_every_versions >= 0,
                 f"publish_full_every_versions ({self.publish_full_every_versions}) must be >= 0")
        require(self.publish_average_steps >= 0,
                 f"publish_average_steps ({self.publish_average_steps}) must be >= 0")
        require(len(self.tasks) > 0, "tasks must not be empty")
        require(self.torch_threads > 0, f"torch_threads ({self.torch_threads}) must be > 0")
        require(self.checkpoint_every_steps >= 0,
                 f"checkpoint_every_steps ({self.checkpoint_every_steps}) must be >= 0")
        require(self.checkpoint_every_s >= 0, f"checkpoint_every_s ({self.checkpoint_every_s}) must be >= 0")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints ({self.keep_checkpoints}) must be >= 1")
        require(self.shutdown_timeout_s > 0, f"shutdown_timeout_s ({self.shutdown_timeout_s}) must be > 0")
        require(self.distributed_strategy in ("ddp", "fsdp"),
                 f"distributed_strategy must be ddp or fsdp, got {self.distributed_strategy!r}")
        require(self.distributed_strategy != "fsdp" or not self.publish_every_s,
                 f"publish_every_s ({self.publish_every_s}) must be 0 with fsdp: every rank gathers the weights "
                 "at the same publishing steps")
        require(self.distributed_strategy != "fsdp" or not self.publish_average_steps,
                 f"publish_average_steps ({self.publish_average_steps}) must be 0 with fsdp: the average of "
                 "sharded weights is not kept")
