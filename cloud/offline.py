"""Seed the buffer's offline part: scripted demonstrations in simulation.

Offline data goes through the same validated, exactly-once write as robot
data, under a robot id of its own registered with ``source=offline``; the
sampler treats every offline step as a label.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

import numpy as np
import redis.asyncio as aioredis

from cloud.buffer import SOURCE_OFFLINE
from cloud.ingest import Ingest
from fleet import PROTOCOL_VERSION
from fleet.convert import encode_step
from fleet.types import Chunk, EpisodeSummary, RobotInfo, Step

log = logging.getLogger(__name__)


def scripted_demos(tasks: Sequence[str], episodes_per_task: int, max_episode_steps: int = 150, seed: int = 0,
                   noise_std: float = 0.0) -> list[tuple[str, list[Step], EpisodeSummary]]:
    """Run MetaWorld's scripted experts (as fast as possible) and return the episodes."""
    from edge.operator import OperatorConfig, SimulatedOperator
    from edge.robots.metaworld import MetaWorldRobot

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


async def _write(redis_url: str, robot_id: str, episodes, schema, tasks) -> int:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        ingest = Ingest(redis, source=SOURCE_OFFLINE)
        seq = await ingest.register(RobotInfo(robot_id=robot_id, embodiment="metaworld-sawyer", schema=schema,
                                              tasks=tuple(tasks), protocol_version=PROTOCOL_VERSION))
        written = 0
        for task, steps, summary in episodes:
            episode_id = f"{robot_id}-{uuid.uuid4().hex[:12]}"
            for start in range(0, len(steps), 256):
                part = steps[start:start + 256]
                for s in part:
                    seq += 1
                    s.seq = seq
                chunk = Chunk(robot_id=robot_id, episode_id=episode_id, task=task, steps=part,
                              episode_end=summary if part[-1].done else None)
                result = await ingest.write(chunk, [encode_step(s, schema) for s in part])
                written += result.stored_steps
        return written
    finally:
        await redis.aclose()


def seed_scripted_demos(redis_url: str, tasks: Sequence[str], episodes_per_task: int, max_episode_steps: int = 150,
                        seed: int = 0, robot_id: str = "demos-metaworld") -> dict:
    """Generate demos and write them to the buffer; returns counts and the demos' success rate."""
    from edge.robots.metaworld import SCHEMA, MetaWorldRobot

    episodes = scripted_demos(tasks, episodes_per_task, max_episode_steps, seed)
    instructions = MetaWorldRobot(tasks=tasks).tasks
    written = asyncio.run(_write(redis_url, robot_id, episodes, SCHEMA, instructions))
    success = float(np.mean([s.success for _, _, s in episodes])) if episodes else 0.0
    log.info("seeded %d demo episodes (%d steps, %.0f%% successful)", len(episodes), written, 100 * success)
    return {"episodes": len(episodes), "steps": written, "success_rate": success}
