"""Post-hoc evaluation of published policy versions on held-out initial states.

Every evaluated version runs the same fixed set of episodes: a held-out
MetaWorld robot (odd task variants, never seen in training; each task's 25
dealt like a shuffled deck, so every one counts the same) with a fixed seed,
round robin over the tasks, no operator, as fast as the CPU allows (not real
time). It uses the edge's own :class:`~edge.loop.ControlLoop`, so evaluation acts
exactly as the robots do. Evaluation runs after a fleet run has ended, so it
never takes CPU from the robots or the learner while they are timed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSpec:
    """Which episodes every version is evaluated on."""

    tasks: tuple[str, ...]
    """MetaWorld tasks (env names or instructions)."""
    episodes_per_task: int
    """Held-out episodes per task."""
    max_episode_steps: int
    """Episode length limit, steps."""
    seed: int = 12345
    """Seed of the held-out robot's variant choice (the same for every version)."""
    device: str = "cpu"
    """Torch device the evaluated policy runs on."""
    deal_variants: bool = True
    """Each task's held-out variants are dealt like a shuffled deck (every one once before any repeats), so each
    weighs the same; False: drawn with replacement (studies before 2026-12-07: 30 draws from 25 variants left
    ~7 out and counted others two or three times)."""


class _DiscardSink:
    """A StepSink that keeps nothing (evaluation episodes are not training data)."""

    def record(self, episode_id, task, evaluation, step, episode_end) -> None:
        """Drop the step."""


def evaluate_version(policy_dir: str, version: int, spec: EvalSpec) -> dict[str, float]:
    """Success rate per task (instruction -> rate) of ``version`` in the store at ``policy_dir``."""
    from cloud.policy_store import PolicyStore
    from edge.hotswap import PolicySlot
    from edge.loop import ControlLoop, LoopConfig
    from edge.operator import NoOperator
    from edge.sim.metaworld import MetaWorldRobot
    from fleet.policies import FleetPolicy, set_torch_threads

    set_torch_threads(1)
    store = PolicyStore(policy_dir)
    manifest = store.manifest(version)
    policy = FleetPolicy.from_manifest(manifest.config, store.tensors(version), version=version, device=spec.device)
    robot = MetaWorldRobot(tasks=spec.tasks, seed=spec.seed, max_episode_steps=spec.max_episode_steps,
                           held_out=True, deal_variants=spec.deal_variants)
    successes: dict[str, list[bool]] = {task: [] for task in robot.tasks}
    with robot:
        loop = ControlLoop(f"eval-v{version}", robot, PolicySlot(policy), NoOperator(), _DiscardSink(),
                           LoopConfig(max_episode_steps=spec.max_episode_steps, eval_every=1, realtime=False))
        for _ in range(spec.episodes_per_task * len(robot.tasks)):
            summary = loop.run_episode()
            successes[loop.stats().current_task].append(bool(summary.success))
    return {task: sum(s) / len(s) for task, s in successes.items()}


def evaluate_versions(policy_dir: Path, versions: Sequence[int], spec: EvalSpec,
                      workers: int = 1) -> dict[int, dict[str, float]]:
    """``evaluate_version`` for each version, in ``workers`` processes (1 = in this process)."""
    versions = sorted(set(versions))
    if workers <= 1 or len(versions) <= 1:
        return {v: evaluate_version(str(policy_dir), v, spec) for v in versions}
    with ProcessPoolExecutor(max_workers=min(workers, len(versions)), mp_context=get_context("spawn")) as pool:
        futures = {v: pool.submit(evaluate_version, str(policy_dir), v, spec) for v in versions}
        return {v: f.result() for v, f in futures.items()}
