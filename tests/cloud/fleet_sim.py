"""Test helpers: a StepSink that writes through cloud.ingest to Redis, and synthetic episodes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import numpy as np
import redis.asyncio as aioredis

from cloud.buffer import SOURCE_ONLINE
from cloud.ingest import Ingest
from fleet import PROTOCOL_VERSION
from fleet.types import Chunk, EpisodeSummary, RobotInfo, Schema, Step


class IngestSink:
    """A control loop's StepSink that stores each finished episode in the buffer (exactly-once write)."""

    def __init__(self, redis_url: str, robot_id: str, schema: Schema, tasks: Sequence[str],
                 source: str = SOURCE_ONLINE):
        self.redis_url, self.robot_id, self.schema, self.tasks, self.source = redis_url, robot_id, schema, tasks, source
        self.seq = asyncio.run(self._call(lambda ingest: ingest.register(RobotInfo(
            robot_id, "test", schema, tuple(tasks), PROTOCOL_VERSION))))
        self._pending: list[Step] = []

    async def _call(self, fn):
        redis = aioredis.Redis.from_url(self.redis_url)
        try:
            return await fn(Ingest(redis, source=self.source))
        finally:
            await redis.aclose()

    def record(self, episode_id: str, task: str, evaluation: bool, step: Step,
               episode_end: EpisodeSummary | None) -> None:
        self._pending.append(step)
        if episode_end is not None:
            steps, self._pending = self._pending, []
            self.write_episode(task, steps, episode_end, evaluation, episode_id)

    def write_episode(self, task: str, steps: list[Step], summary: EpisodeSummary, evaluation: bool = False,
                      episode_id: str = "") -> str:
        episode_id = episode_id or f"{self.robot_id}-{uuid.uuid4().hex[:8]}"
        for s in steps:
            self.seq += 1
            s.seq = self.seq
        steps[-1].done = True
        chunk = Chunk(self.robot_id, episode_id, task, steps, episode_end=summary, evaluation=evaluation)
        asyncio.run(self._call(lambda ingest: ingest.write(chunk)))
        return episode_id


def synthetic_episode(task_id: int, length: int, interventions: Sequence[bool] = (), success: bool = True,
                      state_dim: int = 4, images: dict | None = None) -> tuple[list[Step], EpisodeSummary]:
    """Steps whose state is (t, task_id, length, 0...) and action (t, task_id); ``interventions`` per step."""
    flags = list(interventions) + [False] * (length - len(interventions))
    steps = []
    for t in range(length):
        state = np.zeros(state_dim, np.float32)
        state[:3] = (t, task_id, length)
        action = np.array([t, task_id], np.float32)
        steps.append(Step(seq=0, index=t, observation={"state": state}, policy_action=action * 0, action=action,
                          is_intervention=flags[t], reward=-1.0, success=success and t == length - 1,
                          done=t == length - 1, policy_version=1, timestamp_s=time.time(),
                          images=dict(images or {})))
    summary = EpisodeSummary(success=success, num_steps=length, intervention_steps=sum(flags),
                             interventions=int(any(flags)), evaluation=False, policy_version=1)
    return steps, summary
