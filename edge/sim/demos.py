"""Scripted MetaWorld demonstrations: generated in simulation, written into the buffer as offline data
(``fleet seed``, the demo, the benchmarks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np

from cloud.offline import write_episodes
from edge.loop import LoopConfig
from edge.operator import OperatorConfig
from edge.sim.metaworld import SCHEMA, MetaWorldRobot
from edge.sim.operator import SimulatedOperator
from fleet.types import EpisodeSummary, Step

log = logging.getLogger(__name__)


def scripted_demos(tasks: Sequence[str], episodes_per_task: int, max_episode_steps: int = LoopConfig.max_episode_steps, seed: int = 0,
                   noise_std: float = 0.0) -> list[tuple[str, list[Step], EpisodeSummary]]:
    """Run MetaWorld's scripted experts (as fast as possible) and return the episodes."""
    robot = MetaWorldRobot(tasks=tasks, seed=seed, max_episode_steps=max_episode_steps)
    expert = SimulatedOperator(OperatorConfig(seed=seed))
    rng = np.random.default_rng(seed)
    episodes = []
    with robot:
        for task in robot.tasks:
            for _ in range(episodes_per_task):
                obs = robot.reset(task)
                expert.reset(task)
                steps: list[Step] = []
                for t in range(max_episode_steps):
                    action = expert.expert_action(obs)
                    if noise_std:
                        action = np.clip(action + rng.normal(0, noise_std, action.shape), -1, 1).astype(np.float32)
                    nxt = robot.act(action)
                    done = nxt.success or nxt.terminated or t == max_episode_steps - 1
                    steps.append(Step(seq=0, index=t, observation=dict(obs.features), policy_action=action,
                                      action=action, is_intervention=False, reward=nxt.reward, success=nxt.success,
                                      done=done, policy_version=0, timestamp_s=time.time()))
                    obs = nxt
                    if done:
                        break
                summary = EpisodeSummary(success=steps[-1].success, num_steps=len(steps), intervention_steps=0,
                                         interventions=0, evaluation=False, policy_version=0)
                episodes.append((task, steps, summary))
    return episodes


def seed_scripted_demos(redis_url: str, tasks: Sequence[str], episodes_per_task: int, max_episode_steps: int = LoopConfig.max_episode_steps,
                        seed: int = 0, robot_id: str = "demos-metaworld") -> dict:
    """Generate demos and write them to the buffer; returns counts and the demos' success rate.

    The demos run as fast as the simulator goes, but each step is one control tick of the sim robots,
    so they register the edge agent's default control rate (what an export writes as its fps)."""
    episodes = scripted_demos(tasks, episodes_per_task, max_episode_steps, seed)
    instructions = MetaWorldRobot(tasks=tasks).tasks
    written = asyncio.run(write_episodes(redis_url, robot_id, episodes, SCHEMA, instructions,
                                 control_hz=LoopConfig.control_hz))
    success = float(np.mean([s.success for _, _, s in episodes])) if episodes else 0.0
    log.info("seeded %d demo episodes (%d steps, %.0f%% successful)", len(episodes), written, 100 * success)
    return {"episodes": len(episodes), "steps": written, "success_rate": success}
