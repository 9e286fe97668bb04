"""The fleet-scaling study's configuration and its two presets (quick, full).

The study runs `fleet trainer` and `fleet sim-fleet`; where it sets the same knobs (control rate,
episode length, trainer batch, publishing, seeding) its defaults are theirs, read from TrainerConfig
and LoopConfig, so a study without overrides runs what a deployment runs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cloud.trainer_config import TrainerConfig
from edge.loop import LoopConfig
from fleet.errors import ConfigError

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
"""The ten MetaWorld MT10 tasks."""


@dataclass(frozen=True)
class StudyConfig:
    """One scaling study: every fleet size x every seed, each run under the same wall-clock budget."""

    fleet_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Fleet sizes (robots) to run."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds; each fleet size runs once per seed (robots' initial states, operator noise, sampler)."""
    budget_s: float = 3600.0
    """Wall-clock budget of every run, seconds, from the moment all robots and the learner are running."""
    budget_by_size: tuple[tuple[int, float], ...] = ()
    """(fleet size, budget s) pairs that replace ``budget_s`` for those sizes: a longer budget for 1 robot, so that
    it too reaches the threshold instead of being censored. The evaluation grid keeps its spacing
    (``budget_s / eval_points``), and ``budget_s`` stays the common budget every size is also compared at."""
    tasks: tuple[str, ...] = MT10
    """MetaWorld tasks of the one shared multi-task policy."""
    control_hz: float = LoopConfig.control_hz
    """Robot control rate (held in real time, like a real robot)."""
    max_episode_steps: int = LoopConfig.max_episode_steps
    """Episode length limit, steps."""
    demos_per_task: int = 3
    """Scripted demonstrations per task: the offline data of the start policy and of every run."""
    demo_seed: int = 0
    """Seed of the demonstrations' initial states (the same offline data for every run)."""
    seed_bc_steps: int = TrainerConfig.seed_bc_steps
    """Behaviour-cloning steps of the start policy (trained once, shared by every run)."""
    batch_size: int = TrainerConfig.batch_size
    """Trainer batch size."""
    publish_every_steps: int = TrainerConfig.publish_every_steps
    """The trainer publishes a version every this many optimizer steps."""
    trainer_torch_threads: int = 1
    """torch threads of the trainer."""
    device: str = "cpu"
    """Trainer's torch device (cuda on a GPU machine)."""
    policy_args: tuple[str, ...] = ()
    """Extra `fleet trainer` options for the policy (e.g. --policy.dim_model 64), used for the start policy."""
    trainer_args: tuple[str, ...] = ()
    """Extra `fleet trainer` options for the runs' learner only (e.g. --algorithm.type hg_dagger
    --algorithm.use_successes true): what the online algorithm does with the fleet's data; the start policy does
    not depend on them (it is reused)."""
    edge_args: tuple[str, ...] = ()
    """Extra `fleet sim-fleet` options for every robot (e.g. --edge.operator.stall_steps 20)."""
    fresh_variants: bool = False
    """Robots start every training episode from a freshly sampled initial state (MetaWorldConfig.fresh_variants)
    instead of one of the 25 fixed training variants, so a bigger fleet also covers more initial states."""
    eval_episodes_per_task: int = 10
    """Held-out evaluation episodes per task for every evaluated version."""
    eval_points: int = 12
    """Points on each run's success curve (the newest version at each is evaluated), besides t = 0."""
    eval_deal_variants: bool = True
    """Held-out variants are dealt like a shuffled deck, each once per 25 episodes of a task (EvalSpec.deal_variants;
    False: drawn with replacement, as every study before 2026-12-07 was evaluated)."""
    eval_seed: int = 12345
    """Seed of the held-out evaluation episodes (the same for every version)."""
    eval_workers: int = 1
    """Processes evaluating versions in parallel (after each run, never during one)."""
    effort_bins: int = 6
    """Time bins of the human-effort and ROHE curves."""
    success_threshold: float = 0.8
    """Success rate whose first crossing times a run (SOP: 80%)."""
    startup_timeout_s: float = 300.0
    """How long a run may take to get its robots and learner running."""
    out_dir: str = "runs/fleet-scaling"
    """Where runs, policies and logs go."""

    def __post_init__(self) -> None:
        if not self.fleet_sizes or any(n < 1 for n in self.fleet_sizes):
            raise ConfigError(f"fleet_sizes ({self.fleet_sizes}) must be non-empty and each >= 1")
        if not self.seeds:
            raise ConfigError("seeds must not be empty")
        if not self.budget_s > 0:
            raise ConfigError(f"budget_s ({self.budget_s}) must be > 0")
        for n, budget in self.budget_by_size:
            if not budget >= self.budget_s:
                raise ConfigError(f"budget_by_size: {n} robots get {budget} s, less than budget_s ({self.budget_s}); "
                                  "every size must run at least the common budget")
        if not self.tasks:
            raise ConfigError("tasks must not be empty")
        for name in ("max_episode_steps", "demos_per_task", "seed_bc_steps", "batch_size", "publish_every_steps",
                     "trainer_torch_threads", "eval_episodes_per_task", "eval_points", "eval_workers",
                     "effort_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if not self.control_hz > 0:
            raise ConfigError(f"control_hz ({self.control_hz}) must be > 0")
        if not 0 < self.success_threshold <= 1:
            raise ConfigError(f"success_threshold ({self.success_threshold}) must be in (0, 1]")

    def budget_for(self, fleet_size: int) -> float:
        """The wall-clock budget of a run with ``fleet_size`` robots."""
        return dict(self.budget_by_size).get(fleet_size, self.budget_s)

    def with_overrides(self, **changes) -> StudyConfig:
        """A copy with the given (non-None) fields replaced."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


ACT_SHAPE = ("--policy.chunk_size", "10", "--policy.n_action_steps", "5", "--policy.use_vae", "false")
"""The demo's action chunking (``edge/sim/demo.py``): 10-step chunks, 5 executed, no VAE. LeRobot's ACT defaults
(100-step chunks executed open loop, a 4-layer VAE encoder over them) cost ~15x the learner time per step on a
CPU and react to the operator's corrections only every 100 ticks."""

SMALL_POLICY = ("--policy.dim_model", "64", "--policy.dim_feedforward", "256", "--policy.n_heads", "4",
                "--policy.n_encoder_layers", "1", "--policy.optimizer_lr", "1e-3", *ACT_SHAPE)
"""A small ACT for a 2-core CPU: the learner and the robots share the two cores."""

STRICT_OPERATOR = ("--edge.operator.divergence_threshold", "0.5", "--edge.operator.stall_steps", "15")
"""An operator who steps in earlier than the default: a weak policy that creeps toward the goal without
diverging much or stalling for long fails without ever producing a label under the default gating."""

QUICK = StudyConfig(
    fleet_sizes=(1, 2, 4), seeds=(0,), budget_s=300.0, tasks=("reach-v3",), fresh_variants=True,
    control_hz=20.0, max_episode_steps=100, demos_per_task=5, seed_bc_steps=3000, batch_size=32,
    publish_every_steps=25, policy_args=SMALL_POLICY, edge_args=STRICT_OPERATOR, eval_episodes_per_task=25,
    eval_points=30, eval_workers=2, effort_bins=5, out_dir="runs/fleet-scaling-quick",
)
"""About 18 minutes on 2 idle CPU cores: reach, 1/2/4 robots, one seed, 300 s per run (``--seeds 0,1,2``: about
55 minutes). A task whose success grows with the number of distinct episodes seen: every training episode starts
from a fresh goal (``fresh_variants``), and the start policy is cloned to convergence (3000 steps) from only 5
demonstrations, so it is weak for lack of data, not of training: more learner time alone cannot fix it, more
robots can. (Cloned from 100 fresh demonstrations the same ACT succeeds on every held-out goal; from 50 or 200
demonstrations on the 25 fixed training variants on only 0.4-0.6 of them: hence fresh variants.)"""

FULL = StudyConfig(
    fleet_sizes=(1, 2, 4, 8), seeds=(0, 1, 2), budget_s=3600.0, tasks=MT10, fresh_variants=True, control_hz=20.0,
    max_episode_steps=150, demos_per_task=5, seed_bc_steps=500, batch_size=256, publish_every_steps=50,
    device="cuda", policy_args=ACT_SHAPE, edge_args=STRICT_OPERATOR, eval_episodes_per_task=20, eval_points=24, eval_workers=8, effort_bins=12,
    out_dir="runs/fleet-scaling-full",
)
"""A GPU machine: MT10, 1/2/4/8 robots, 3 seeds, one hour per run (12 runs: about 13 hours)."""

PRESETS: dict[str, StudyConfig] = {"quick": QUICK, "full": FULL}
