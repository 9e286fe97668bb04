"""Validate experience chunks against their robot's registered schema and write
them to the buffer exactly once. Callable and testable without gRPC.

Redis failures become fleet errors the gateway maps to precise statuses: Redis
at ``maxmemory`` (noeviction) -> Overloaded (RESOURCE_EXHAUSTED + retry hint);
Redis unreachable or loading -> BackendUnavailable (UNAVAILABLE + retry hint).
Either way nothing was acked, and the script is atomic (Redis checks maxmemory
before the script's first write, so a refused chunk left no partial write), so
the edge simply resends later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator

import redis.exceptions as redis_errors

from cloud.buffer import SOURCE_ONLINE, BufferWriter, ChunkToWrite, WriteResult
from cloud.validator import MAX_IMAGE_PIXELS, check_columns
from fleet import PROTOCOL_VERSION, metrics
from fleet.columns import MAX_STEPS_PER_CHUNK, ColumnChunk, from_chunk, schema_hash
from fleet.convert import schema_from_dict, schema_to_dict
from fleet.errors import (BackendUnavailable, FleetError, IncompatiblePeer, InvalidInput, Overloaded, SchemaMismatch,
                          UnknownRobot)
from fleet.names import check_id, check_task
from fleet.types import Chunk, RobotInfo

log = logging.getLogger(__name__)

__all__ = ["MAX_STEPS_PER_CHUNK", "Ingest", "check_registration"]


class Ingest:
    """Registration and chunk writes over an asyncio Redis client (redis.asyncio.Redis)."""

    def __init__(self, redis, source: str = SOURCE_ONLINE, retry_after_s: float = 1.0,
                 redis_full_retry_after_s: float = 10.0, blobs=None, codec: str = "zstd"):
        self._redis = redis
        self._source = source
        self._retry_after_s = retry_after_s
        self._redis_full_retry_after_s = redis_full_retry_after_s
        self.writer = BufferWriter(redis, blobs, codec)
        self._robots: dict[str, RobotInfo] = {}
        self._hashes: dict[str, tuple[RobotInfo, bytes]] = {}

    @contextlib.contextmanager
    def redis_errors(self, what: str) -> Iterator[None]:
        """Redis failures -> Overloaded (maxmemory) or BackendUnavailable (down, loading, timeout)."""
        try:
            yield
        except redis_errors.OutOfMemoryError as exc:
            metrics.GATEWAY_BACKPRESSURE.labels(reason="redis_full", outcome="refused").inc()
            raise Overloaded(f"{what}: Redis is full (maxmemory with noeviction: {exc}); nothing was stored, "
                             f"retry later", retry_after_s=self._redis_full_retry_after_s) from None
        except redis_errors.ReadOnlyError as exc:
            raise BackendUnavailable(f"{what}: Redis is read-only ({exc}); nothing was stored, retry later",
                                     retry_after_s=self._retry_after_s) from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            # The command may have run before the reply was lost: the outcome is unknown, not "nothing stored".
            # Resending is safe: the sequence numbers store it at most once.
            raise BackendUnavailable(f"{what}: Redis unavailable ({type(exc).__name__}: {exc}); the outcome is "
                                     f"unknown, resend (sequence numbers keep it exactly once)",
                                     retry_after_s=self._retry_after_s) from None

    async def register(self, info: RobotInfo) -> int:
        """Store the robot's registration; returns its last durable sequence number."""
        if info.protocol_version != PROTOCOL_VERSION:
            raise IncompatiblePeer(f"robot {info.robot_id!r} speaks protocol {info.protocol_version!r}; "
                                   f"this gateway speaks {PROTOCOL_VERSION!r} (columnar chunks): upgrade the "
                                   f"robot's fleet software to one that speaks {PROTOCOL_VERSION!r}")
        check_registration(info, MAX_TASKS_PER_ROBOT if self._source == SOURCE_ONLINE else MAX_OFFLINE_TASKS)
        record = {"robot_id": info.robot_id, "embodiment": info.embodiment, "schema": schema_to_dict(info.schema),
                  "tasks": list(info.tasks), "protocol_version": info.protocol_version,
                  "software_version": info.software_version, "control_hz": info.control_hz,
                  "registered_s": time.time(),
                  "source": self._source}
        with self.redis_errors(f"register robot {info.robot_id!r}"):
            await self._check_schema_change(info.robot_id, record["schema"])
            await self.writer.register(info.robot_id, json.dumps(record), record["registered_s"])
            self._robots[info.robot_id] = info
            return await self.last_acked_seq(info.robot_id)

    async def _check_schema_change(self, robot_id: str, schema: dict) -> None:
        """Refuse a registration whose schema differs from the stored one, unless an operator allowed it
        (the allowance is used up by the change). The trainer cannot mix two schemas of one robot."""
        raw = await self.writer.registration(robot_id)
        try:
            before = json.loads(raw)["schema"] if raw else None
        except (ValueError, KeyError, TypeError):
            before = None  # an unreadable registration is replaced
        if before is None or before == schema:
            return
        if await self.writer.take_schema_change_allowance(robot_id):
            log.warning("robot %s registered with a new schema (allowed by an operator)", robot_id)
            return
        raise IncompatiblePeer(f"robot {robot_id!r} registered before with another observation/action schema; "
                               f"an operator allows the change with `fleet robots allow-schema-change {robot_id}` "
                               "(the trainer skips records that do not fit its schema)")

    async def last_acked_seq(self, robot_id: str) -> int:
        with self.redis_errors(f"robot {robot_id!r}"):
            return await self.writer.last_seq(robot_id)

    def cached(self, robot_id: str) -> RobotInfo | None:
        """The registration this gateway already holds (no Redis call), if any."""
        return self._robots.get(robot_id)

    async def robot(self, robot_id: str) -> RobotInfo:
        """The registration of a robot (cached; any replica can serve any robot)."""
        info = self._robots.get(robot_id)
        if info is not None:
            return info
        return await self._load_robot(robot_id)

    async def _load_robot(self, robot_id: str) -> RobotInfo:
        with self.redis_errors(f"robot {robot_id!r}"):
            raw = await self.writer.registration(robot_id)
        if raw is None:
            self._robots.pop(robot_id, None)
            raise UnknownRobot(f"robot {robot_id!r} has not registered; call Register first")
        data = json.loads(raw)
        info = RobotInfo(robot_id=robot_id, embodiment=data["embodiment"], schema=schema_from_dict(data["schema"]),
                         tasks=tuple(data["tasks"]), protocol_version=data["protocol_version"],
                         software_version=data.get("software_version", ""),
                         control_hz=float(data.get("control_hz") or 0.0))
        self._robots[robot_id] = info
        return info

    def schema_hash(self, info: RobotInfo) -> bytes:
        cached = self._hashes.get(info.robot_id)
        if cached is None or cached[0] is not info:
            cached = self._hashes[info.robot_id] = (info, schema_hash(info.schema))
        return cached[1]

    async def registration_for(self, robot_id: str, digest: bytes) -> RobotInfo:
        """The registration whose schema ``digest`` names: the cached one, else the one in Redis (the robot
        may have registered again through another replica); FAILED_PRECONDITION if neither."""
        info = await self.robot(robot_id)
        if self.schema_hash(info) == digest:
            return info
        info = await self._load_robot(robot_id)
        if self.schema_hash(info) != digest:
            raise IncompatiblePeer(f"robot {robot_id!r}: the chunk names schema {digest.hex()[:16] or 'none'}, "
                                   f"but the robot registered schema {self.schema_hash(info).hex()[:16]}; "
                                   "register again with the schema it records")
        return info

    async def validate(self, cc: ColumnChunk, info: RobotInfo) -> None:
        """Raise InvalidInput (with ``step_seq`` when one step is to blame). A chunk refused against a cached
        registration is checked again against the one in Redis (new tasks through another replica)."""
        try:
            check_columns(cc, info)
        except InvalidInput:
            fresh = await self._load_robot(cc.robot_id)
            if fresh == info:
                raise
            check_columns(cc, fresh)

    async def write(self, chunk: Chunk) -> WriteResult:
        """Validate then store a per-step chunk (offline import, tools): as columns, exactly once."""
        info = await self.robot(chunk.robot_id)
        if len(chunk.steps) > MAX_STEPS_PER_CHUNK:
            raise InvalidInput(f"chunk has {len(chunk.steps)} steps; at most {MAX_STEPS_PER_CHUNK} per chunk")
        try:
            cc = from_chunk(chunk, info.schema)
        except (KeyError, ValueError) as exc:
            raise SchemaMismatch(f"robot {chunk.robot_id!r}: the steps do not fit the registered schema ({exc!r})")
        await self.validate(cc, info)
        return await self.store(cc, info)

    async def store_many(self, chunks: list[tuple[ColumnChunk, RobotInfo]]
                         ) -> tuple[list[WriteResult], FleetError | None]:
        """Store validated consecutive chunks of one robot (one message's) in one Redis round trip when all goes
        well; returns the results of the chunks stored or acked, in order, and the error that stopped the rest
        (None: all stored). Everything returned is durable (ack-safe)."""
        if len(chunks) == 1:
            try:
                return [await self.store(*chunks[0])], None
            except FleetError as exc:
                return [], exc
        robot_id, first = chunks[0][0].robot_id, chunks[0][0].columns.first_seq
        todo = [ChunkToWrite(cc.episode_id, cc.task, cc.columns, info.schema, self._labels(cc), cc.gap_declared,
                             cc.evaluation, cc.episode_end) for cc, info in chunks]
        results: list[WriteResult] = []
        try:
            with self.redis_errors(f"robot {robot_id!r} chunks from seq {first}"):
                results, error = await self.writer.write_many(robot_id, todo, source=self._source, now_s=time.time())
                if error is not None:
                    raise error
        except FleetError as exc:
            return results, exc
        return results, None

    def _labels(self, cc: ColumnChunk):
        cols = cc.columns
        return cols.intervention if self._source == SOURCE_ONLINE else cols.done | True

    async def store(self, cc: ColumnChunk, info: RobotInfo) -> WriteResult:
        """Store a validated chunk; returns once its frames and its Redis write are durable (ack-safe)."""
        cols = cc.columns
        labels = self._labels(cc)
        with self.redis_errors(f"robot {cc.robot_id!r} chunk at seq {cols.first_seq}"):
            return await self.writer.write(
                cc.robot_id, cc.episode_id, cc.task, cols, info.schema, source=self._source, labels=labels,
                gap_declared=cc.gap_declared, evaluation=cc.evaluation, episode_end=cc.episode_end,
                now_s=time.time())


MAX_TASKS_PER_ROBOT = 64
"""Tasks one robot may register (bounds the registry every trainer refresh reads, and metric labels)."""
MAX_OFFLINE_TASKS = 100_000
"""Tasks of one offline dataset import (a LeRobot dataset may have thousands)."""
MAX_CONTROL_HZ = 100_000.0
"""Highest control rate a robot may register (ticks per second); 0 means unknown."""


def check_registration(info: RobotInfo, max_tasks: int = MAX_TASKS_PER_ROBOT) -> None:
    """Raise InvalidInput naming the first field of ``info`` that breaks the name rules (fleet/names.py)."""
    check_id(info.robot_id, "robot_id")
    check_id(info.embodiment, f"robot {info.robot_id!r} embodiment", allow_empty=True)
    check_task(info.software_version, f"robot {info.robot_id!r} software_version", allow_empty=True)
    if not (math.isfinite(info.control_hz) and 0.0 <= info.control_hz <= MAX_CONTROL_HZ):
        raise InvalidInput(f"robot {info.robot_id!r} control_hz ({info.control_hz}) must be a number of ticks per "
                           f"second in [0, {MAX_CONTROL_HZ:g}] (0 = unknown)")
    for spec in (*info.schema.observation, info.schema.action):
        check_id(spec.name, f"robot {info.robot_id!r} schema feature name")
        if spec.is_image and (len(spec.shape) != 3 or spec.shape[2] not in (1, 3, 4) or spec.dtype != "uint8"
                              or spec.shape[0] * spec.shape[1] > MAX_IMAGE_PIXELS):
            raise InvalidInput(f"robot {info.robot_id!r} camera {spec.name!r}: {spec.dtype} {list(spec.shape)} is "
                               f"not a uint8 (height, width, 1|3|4) frame of at most {MAX_IMAGE_PIXELS} pixels")
    if not info.tasks:
        raise InvalidInput(f"robot {info.robot_id!r} registered no tasks")
    if len(info.tasks) > max_tasks:
        raise InvalidInput(f"robot {info.robot_id!r} registered {len(info.tasks)} tasks; at most {max_tasks}")
    for i, task in enumerate(info.tasks):
        check_task(task, f"robot {info.robot_id!r} tasks[{i}]")
