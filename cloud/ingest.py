"""Validate experience chunks against their robot's registered schema and write
them to the buffer exactly once. Callable and testable without gRPC."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from cloud.buffer import (
    ROBOTS_KEY,
    SOURCE_ONLINE,
    WRITE_CHUNK_LUA,
    ChunkWrite,
    RobotKeys,
    WriteResult,
    interpret,
)
from fleet import PROTOCOL_VERSION
from fleet.codec import decode_image
from fleet.convert import schema_from_dict, schema_to_dict
from fleet.errors import IncompatiblePeer, InvalidInput, SchemaMismatch, UnknownRobot
from fleet.types import Chunk, RobotInfo, Schema, Step

log = logging.getLogger(__name__)

MAX_STEPS_PER_CHUNK = 1024


def validate_step(step: Step, schema: Schema, where: str) -> None:
    """Raise SchemaMismatch/InvalidInput if a step does not fit the schema."""
    expected = {f.name for f in schema.observation if not f.is_image}
    got = set(step.observation)
    if got != expected:
        raise SchemaMismatch(f"{where}: observation features {sorted(got)} != registered {sorted(expected)}")
    expected_img = {f.name for f in schema.observation if f.is_image}
    if set(step.images) != expected_img:
        raise SchemaMismatch(f"{where}: images {sorted(step.images)} != registered {sorted(expected_img)}")
    for spec in schema.observation:
        if spec.is_image:
            img = step.images[spec.name]
            if (img.height, img.width, img.channels) != spec.shape:
                raise SchemaMismatch(f"{where}: image {spec.name!r} is {(img.height, img.width, img.channels)}, "
                                     f"registered {spec.shape}")
            decode_image(img, f"{where} image {spec.name!r}")
            continue
        _check_array(step.observation[spec.name], spec.dtype, spec.shape, spec.allow_nonfinite,
                     f"{where} observation {spec.name!r}")
    act = schema.action
    _check_array(step.action, act.dtype, act.shape, act.allow_nonfinite, f"{where} action")
    _check_array(step.policy_action, act.dtype, act.shape, True, f"{where} policy_action")
    if not np.isfinite(step.reward):
        raise InvalidInput(f"{where}: reward is {step.reward}")


def _check_array(arr: np.ndarray, dtype: str, shape: tuple[int, ...], allow_nonfinite: bool, what: str) -> None:
    name = "bfloat16" if (dtype == "bfloat16" and arr.dtype == np.uint16) else arr.dtype.name
    if name != dtype:
        raise SchemaMismatch(f"{what}: dtype {name} != registered {dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise SchemaMismatch(f"{what}: shape {list(arr.shape)} != registered {list(shape)}")
    if not allow_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(f"{what}: contains NaN or Inf")


class Ingest:
    """Registration and chunk writes over an asyncio Redis client (redis.asyncio.Redis)."""

    def __init__(self, redis, source: str = SOURCE_ONLINE):
        self._redis = redis
        self._source = source
        self._script = redis.register_script(WRITE_CHUNK_LUA)
        self._robots: dict[str, RobotInfo] = {}

    async def register(self, info: RobotInfo) -> int:
        """Store the robot's registration; returns its last durable sequence number."""
        if info.protocol_version != PROTOCOL_VERSION:
            raise IncompatiblePeer(f"robot {info.robot_id!r} speaks protocol {info.protocol_version!r}; "
                                   f"this gateway speaks {PROTOCOL_VERSION!r}")
        if not info.robot_id or "{" in info.robot_id or "}" in info.robot_id or "|" in info.robot_id:
            raise InvalidInput(f"robot_id {info.robot_id!r} must be non-empty and contain no '{{', '}}' or '|'")
        if not info.tasks:
            raise InvalidInput(f"robot {info.robot_id!r} registered no tasks")
        record = {"robot_id": info.robot_id, "embodiment": info.embodiment, "schema": schema_to_dict(info.schema),
                  "tasks": list(info.tasks), "protocol_version": info.protocol_version,
                  "software_version": info.software_version, "registered_s": time.time(),
                  "source": self._source}
        await self._redis.hset(ROBOTS_KEY, info.robot_id, json.dumps(record))
        self._robots[info.robot_id] = info
        return await self.last_acked_seq(info.robot_id)

    async def last_acked_seq(self, robot_id: str) -> int:
        value = await self._redis.get(RobotKeys(robot_id).seq)
        return int(value or 0)

    async def robot(self, robot_id: str) -> RobotInfo:
        """The registration of a robot (cached; any replica can serve any robot)."""
        info = self._robots.get(robot_id)
        if info is not None:
            return info
        raw = await self._redis.hget(ROBOTS_KEY, robot_id)
        if raw is None:
            raise UnknownRobot(f"robot {robot_id!r} has not registered; call Register first")
        data = json.loads(raw)
        info = RobotInfo(robot_id=robot_id, embodiment=data["embodiment"], schema=schema_from_dict(data["schema"]),
                         tasks=tuple(data["tasks"]), protocol_version=data["protocol_version"],
                         software_version=data.get("software_version", ""))
        self._robots[robot_id] = info
        return info

    async def validate(self, chunk: Chunk) -> RobotInfo:
        info = await self.robot(chunk.robot_id)
        if len(chunk.steps) > MAX_STEPS_PER_CHUNK:
            raise InvalidInput(f"chunk has {len(chunk.steps)} steps; at most {MAX_STEPS_PER_CHUNK} per chunk")
        if chunk.task not in info.tasks:
            raise InvalidInput(f"task {chunk.task!r} is not among the tasks robot {chunk.robot_id!r} registered")
        first = chunk.steps[0].seq
        if first < 1:
            raise InvalidInput("step sequence numbers start at 1")
        for i, step in enumerate(chunk.steps):
            if step.seq != first + i:
                raise InvalidInput(f"chunk steps must have contiguous seqs: step {i} has seq {step.seq}, "
                                   f"expected {first + i}")
            validate_step(step, info.schema, f"robot {chunk.robot_id!r} step seq={step.seq}")
            if step.done and i != len(chunk.steps) - 1:
                raise InvalidInput(f"step seq={step.seq} is done but is not the chunk's last step")
        if chunk.episode_end is not None and not chunk.steps[-1].done:
            raise InvalidInput("chunk has an episode_end but its last step is not done")
        return info

    async def write(self, chunk: Chunk, raw_steps: list[bytes]) -> WriteResult:
        """Validate then atomically append; returns once Redis has replied (ack-safe)."""
        await self.validate(chunk)
        offline = self._source != SOURCE_ONLINE
        write = ChunkWrite(
            robot_id=chunk.robot_id, episode_id=chunk.episode_id, task=chunk.task, first_seq=chunk.steps[0].seq,
            step_blobs=raw_steps, interventions=[s.is_intervention for s in chunk.steps],
            labels=[offline or s.is_intervention for s in chunk.steps], gap_declared=chunk.gap_declared,
            evaluation=chunk.evaluation, episode_end=chunk.episode_end,
            policy_version=chunk.steps[-1].policy_version, source=self._source)
        keys, args = write.keys_and_args(time.time())
        result = await self._script(keys=keys, args=args)
        return interpret(result, write)
