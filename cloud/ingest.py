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
import io
import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis.exceptions as redis_errors

from cloud.buffer import (
    ROBOTS_KEY,
    SOURCE_ONLINE,
    WRITE_CHUNK_LUA,
    ChunkWrite,
    RobotKeys,
    WriteResult,
    interpret,
)
from fleet import PROTOCOL_VERSION, metrics
from fleet.convert import schema_from_dict, schema_to_dict
from fleet.errors import (
    BackendUnavailable,
    IncompatiblePeer,
    InvalidInput,
    Overloaded,
    SchemaMismatch,
    UnknownRobot,
)
from fleet.names import check_episode_id, check_id, check_task, shown
from fleet.types import Chunk, EncodedImage, EpisodeSummary, RobotInfo, Schema, Step

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
            check_image(img, f"{where} image {spec.name!r}")
            continue
        _check_array(step.observation[spec.name], spec.dtype, spec.shape, spec.allow_nonfinite,
                     f"{where} observation {spec.name!r}")
    act = schema.action
    _check_array(step.action, act.dtype, act.shape, act.allow_nonfinite, f"{where} action")
    _check_array(step.policy_action, act.dtype, act.shape, True, f"{where} policy_action")
    if not np.isfinite(step.reward):
        raise InvalidInput(f"{where}: reward is {step.reward}")


_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_JPEG_END = b"\xff\xd9"


MAX_IMAGE_PIXELS = 3840 * 2160
"""Largest camera frame a robot may register (4K): a registered size is what every frame must decode to."""
MAX_PNG_CHUNKS = 4096
"""A PNG made of more chunks is refused before anything walks them (1.1M empty chunks cost seconds)."""


def _png_prescan(data: bytes, what: str) -> None:
    """Count the chunks (refuse more than MAX_PNG_CHUNKS) and check that the image data starts as a
    zlib stream: cheap (no pixels decoded), and it catches a PNG whose IDAT is not zlib at all."""
    pos, chunks, idat = 8, 0, b""
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidInput(f"{what}: the png has more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IDAT" and not idat:
            idat = data[pos + 8:pos + 8 + min(length, 4096)]
        if kind == b"IEND":
            break
        pos += 12 + length
    if idat:
        try:
            zlib.decompressobj().decompress(idat, 64)
        except zlib.error as exc:
            raise InvalidInput(f"{what}: the png's image data is not a zlib stream ({exc})") from None


def check_image(img: EncodedImage, what: str) -> None:
    """The bytes are one complete PNG/JPEG of the declared format, size and channels.

    Checked from the structure, without decoding pixels (a decode costs ~100x more): the header first,
    before anything else (a few kilobytes of PNG can claim gigapixels); then completeness: every PNG chunk
    through IEND present with a good CRC, a JPEG ending with its end-of-image marker. Truncated bytes
    fail either way; flipped bits inside JPEG entropy data would not fail a decode either."""
    from PIL import Image, UnidentifiedImageError

    if img.encoding not in _FORMATS:
        raise InvalidInput(f"{what}: encoding {img.encoding!r} is not 'png' or 'jpeg'")
    if img.encoding == "png" and img.data.startswith(b"\x89PNG"):
        _png_prescan(img.data, what)
    try:
        with Image.open(io.BytesIO(img.data)) as opened:
            fmt, (width, height), channels = opened.format, opened.size, len(opened.getbands())
            if fmt == "PNG":
                opened.verify()  # walks the chunks, checking each CRC
    except UnidentifiedImageError:
        raise InvalidInput(f"{what}: the {len(img.data)} bytes are not a {img.encoding} image") from None
    except Exception as exc:  # Pillow raises several unrelated types (DecompressionBombError among them)
        raise InvalidInput(f"{what}: cannot read the {img.encoding} bytes ({len(img.data)} bytes): {exc}") from None
    if fmt != _FORMATS[img.encoding]:
        raise InvalidInput(f"{what}: declared {img.encoding} but the bytes are {(fmt or 'unknown').lower()}")
    if (width, height) != (img.width, img.height):
        raise InvalidInput(f"{what}: the bytes hold a {width}x{height} image, declared {img.width}x{img.height}")
    if channels != img.channels:
        raise InvalidInput(f"{what}: the bytes hold {channels} channels, declared {img.channels}")
    if fmt == "JPEG" and not img.data.endswith(_JPEG_END):
        raise InvalidInput(f"{what}: the jpeg is truncated ({len(img.data)} bytes, no end-of-image marker)")


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

    def __init__(self, redis, source: str = SOURCE_ONLINE, retry_after_s: float = 1.0,
                 redis_full_retry_after_s: float = 10.0):
        self._redis = redis
        self._source = source
        self._retry_after_s = retry_after_s
        self._redis_full_retry_after_s = redis_full_retry_after_s
        self._script = redis.register_script(WRITE_CHUNK_LUA)
        self._robots: dict[str, RobotInfo] = {}

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
                                   f"this gateway speaks {PROTOCOL_VERSION!r}")
        check_registration(info, MAX_TASKS_PER_ROBOT if self._source == SOURCE_ONLINE else MAX_OFFLINE_TASKS)
        record = {"robot_id": info.robot_id, "embodiment": info.embodiment, "schema": schema_to_dict(info.schema),
                  "tasks": list(info.tasks), "protocol_version": info.protocol_version,
                  "software_version": info.software_version, "control_hz": info.control_hz,
                  "registered_s": time.time(),
                  "source": self._source}
        with self.redis_errors(f"register robot {info.robot_id!r}"):
            await self._check_schema_change(info.robot_id, record["schema"])
            await self._redis.hset(ROBOTS_KEY, info.robot_id, json.dumps(record))
            await self._redis.set(RobotKeys(info.robot_id).registered, f"{record['registered_s']:.3f}")
            self._robots[info.robot_id] = info
            return await self.last_acked_seq(info.robot_id)

    async def _check_schema_change(self, robot_id: str, schema: dict) -> None:
        """Refuse a registration whose schema differs from the stored one, unless an operator allowed it
        (the allowance is used up by the change). The trainer cannot mix two schemas of one robot."""
        raw = await self._redis.hget(ROBOTS_KEY, robot_id)
        try:
            before = json.loads(raw)["schema"] if raw else None
        except (ValueError, KeyError, TypeError):
            before = None  # an unreadable registration is replaced
        if before is None or before == schema:
            return
        if await self._redis.getdel(RobotKeys(robot_id).allow_schema_change) is not None:
            log.warning("robot %s registered with a new schema (allowed by an operator)", robot_id)
            return
        raise IncompatiblePeer(f"robot {robot_id!r} registered before with another observation/action schema; "
                               f"an operator allows the change with `fleet robots allow-schema-change {robot_id}` "
                               "(the trainer skips records that do not fit its schema)")

    async def last_acked_seq(self, robot_id: str) -> int:
        with self.redis_errors(f"robot {robot_id!r}"):
            value = await self._redis.get(RobotKeys(robot_id).seq)
        return int(value or 0)

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
            raw = await self._redis.hget(ROBOTS_KEY, robot_id)
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

    async def validate(self, chunk: Chunk) -> RobotInfo:
        """Raise InvalidInput (with ``step_seq`` when one step is to blame) or UnknownRobot.

        A chunk refused against a cached registration is checked again against the one in Redis: the robot
        may have registered again (new schema or tasks) through another replica."""
        info = await self.robot(chunk.robot_id)
        try:
            check_chunk(chunk, info)
        except InvalidInput:
            fresh = await self._load_robot(chunk.robot_id)
            if fresh == info:
                raise
            check_chunk(chunk, fresh)
            info = fresh
        return info

    async def write(self, chunk: Chunk, raw_steps: list[bytes]) -> WriteResult:
        """Validate then atomically append; returns once Redis has replied (ack-safe)."""
        await self.validate(chunk)
        return await self.store(ChunkHead.of(chunk), raw_steps)

    async def store(self, head: ChunkHead, raw_steps: list[bytes]) -> WriteResult:
        """Atomically append a chunk already validated (``write``, or the gateway's fast check)."""
        offline = self._source != SOURCE_ONLINE
        write = ChunkWrite(
            robot_id=head.robot_id, episode_id=head.episode_id, task=head.task, first_seq=head.first_seq,
            step_blobs=raw_steps, interventions=list(head.interventions),
            labels=[offline or x for x in head.interventions], gap_declared=head.gap_declared,
            evaluation=head.evaluation, episode_end=head.episode_end, policy_version=head.policy_version,
            source=self._source)
        keys, args = write.keys_and_args(time.time())
        with self.redis_errors(f"robot {head.robot_id!r} chunk at seq {write.first_seq}"):
            result = await self._script(keys=keys, args=args)
        return interpret(result, write)


@dataclass(frozen=True)
class ChunkHead:
    """What the atomic write needs of a chunk besides its steps' bytes."""

    robot_id: str
    episode_id: str
    task: str
    first_seq: int
    interventions: tuple[bool, ...]
    gap_declared: bool
    evaluation: bool
    episode_end: EpisodeSummary | None
    policy_version: int

    @classmethod
    def of(cls, chunk: Chunk) -> ChunkHead:
        return cls(chunk.robot_id, chunk.episode_id, chunk.task, chunk.steps[0].seq,
                   tuple(s.is_intervention for s in chunk.steps), chunk.gap_declared, chunk.evaluation,
                   chunk.episode_end, chunk.steps[-1].policy_version)


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


def check_chunk(chunk: Chunk, info: RobotInfo) -> None:
    """Raise InvalidInput if ``chunk`` does not fit ``info`` (names, tasks, schema, seqs, finite values)."""
    if len(chunk.steps) > MAX_STEPS_PER_CHUNK:
        raise InvalidInput(f"chunk has {len(chunk.steps)} steps; at most {MAX_STEPS_PER_CHUNK} per chunk")
    check_episode_id(chunk.episode_id, f"robot {chunk.robot_id!r} episode_id")
    if chunk.task not in info.tasks:
        raise InvalidInput(f"task {shown(chunk.task)} is not among the tasks robot "
                           f"{chunk.robot_id!r} registered")
    first = chunk.steps[0].seq
    if first < 1:
        raise InvalidInput("step sequence numbers start at 1")
    for i, step in enumerate(chunk.steps):
        if step.seq != first + i:
            raise InvalidInput(f"chunk steps must have contiguous seqs: step {i} has seq {step.seq}, "
                               f"expected {first + i}")
        try:
            validate_step(step, info.schema, f"robot {chunk.robot_id!r} step seq={step.seq}")
            if step.done and i != len(chunk.steps) - 1:
                raise InvalidInput(f"step seq={step.seq} is done but is not the chunk's last step")
        except InvalidInput as exc:
            exc.step_seq = step.seq
            raise
    if chunk.episode_end is not None and not chunk.steps[-1].done:
        raise InvalidInput("chunk has an episode_end but its last step is not done")
