"""Thin gRPC servicer: convert -> delegate to ingest / policy feed -> convert back.

The hot path: a chunk that :class:`WireCheck` certifies valid straight from the
protobuf (a few attribute reads per tensor, one vectorised NaN/Inf check per
feature) goes to ``Ingest.store`` without building domain steps. Anything it does
not certify takes the full path (``chunk_from_pb`` + ``Ingest.validate``), which
finds the precise error; tests/fleet/test_fuzz_chunk_decoder.py checks that the
fast path never accepts what the full path refuses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from cloud.buffer import RobotKeys
from cloud.gateway.backpressure import InflightLimiter
from cloud.gateway.interceptors import map_errors
from cloud.gateway.policy_feed import PolicyFeed
from cloud.gateway.policy_servicer import PolicyServicerMixin
from cloud.ingest import MAX_STEPS_PER_CHUNK, ChunkHead, Ingest, check_image
from fleet import metrics
from fleet.codec import dtype_to_pb, numpy_dtype
from fleet.convert import chunk_from_pb, image_from_pb, robot_info_from_pb, step_from_pb, summary_from_pb
from fleet.errors import FleetError, InvalidInput
from fleet.names import MAX_EPISODE_ID_CHARS, check_id, is_id, shown
from fleet.types import Chunk, FeatureSpec, RobotInfo
from fleet.v1 import fleet_pb2 as pb
from fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class WireCheck:
    """One registration's schema as valid tensors look on the wire; ``certifies(msg)`` is the fast check."""

    def __init__(self, info: RobotInfo):
        self.info = info
        self.tasks = frozenset(info.tasks)
        self.obs = [self._tensor(f) for f in info.schema.observation if not f.is_image]
        self.images = [(f.name, tuple(f.shape)) for f in info.schema.observation if f.is_image]
        self.action = self._tensor(info.schema.action)

    @staticmethod
    def _tensor(f: FeatureSpec) -> tuple:
        dtype = numpy_dtype(f.dtype)
        finite = dtype if dtype.kind == "f" and not f.allow_nonfinite else None
        return f.name, dtype_to_pb(f.dtype), list(f.shape), math.prod(f.shape) * dtype.itemsize, finite

    @staticmethod
    def _fits(t: pb.Tensor | None, spec: tuple, finite: dict[str, list[bytes]] | None = None) -> bool:
        """dtype, shape and byte length as registered; keeps the bytes to check for NaN/Inf later."""
        if t is None:
            return False
        data = t.data
        if t.dtype != spec[1] or len(data) != spec[3] or t.shape != spec[2]:
            return False
        if finite is not None and spec[4] is not None:
            finite[spec[0]].append(data)
        return True

    def certifies(self, msg: pb.Chunk) -> bool:
        """True only for a chunk the full path would accept as well (False: let it find the error)."""
        steps = msg.steps
        n = len(steps)
        if (not 0 < n <= MAX_STEPS_PER_CHUNK or msg.robot_id != self.info.robot_id
                or not is_id(msg.episode_id, MAX_EPISODE_ID_CHARS) or msg.task not in self.tasks):
            return False
        first = steps[0].seq
        fits, action, n_obs, n_images = self._fits, self.action, len(self.obs), len(self.images)
        finite: dict[str, list[bytes]] = {spec[0]: [] for spec in (*self.obs, action) if spec[4] is not None}
        # The common case inline (one float observation, a float action): this loop runs once per step.
        single = self.obs[0] if n_obs == 1 and self.obs[0][4] is not None and action[4] is not None else None
        obs_out, act_out = (finite[single[0]], finite[action[0]]) if single else (None, None)
        for i, step in enumerate(steps):
            if (step.seq != first + i or first < 1 or (step.done and i != n - 1) or not math.isfinite(step.reward)
                    or not step.HasField("action")):
                return False
            if step.HasField("policy_action"):
                t = step.policy_action
                if t.dtype != action[1] or len(t.data) != action[3] or t.shape != action[2]:
                    return False
            obs = step.observation
            if len(obs) != n_obs or len(step.images) != n_images:
                return False
            if single is not None:
                t, a = obs.get(single[0]), step.action
                if t is None:
                    return False
                data, adata = t.data, a.data
                if (t.dtype != single[1] or len(data) != single[3] or t.shape != single[2] or a.dtype != action[1]
                        or len(adata) != action[3] or a.shape != action[2]):
                    return False
                obs_out.append(data)
                act_out.append(adata)
            else:
                if not fits(step.action, action, finite):
                    return False
                for spec in self.obs:
                    if not fits(obs.get(spec[0]), spec, finite):
                        return False
            for name, shape in self.images:
                img = step.images.get(name)
                if img is None or (img.height, img.width, img.channels) != shape:
                    return False
                try:
                    check_image(image_from_pb(img), name)
                except InvalidInput:
                    return False
        if msg.HasField("episode_end") and not steps[-1].done:
            return False
        for spec in (*self.obs, self.action):
            if spec[4] is not None and not np.isfinite(np.frombuffer(b"".join(finite[spec[0]]), spec[4])).all():
                return False
        return True


def _head(msg: pb.Chunk) -> ChunkHead:
    steps = msg.steps
    return ChunkHead(msg.robot_id, msg.episode_id, msg.task, steps[0].seq, tuple(s.is_intervention for s in steps),
                     msg.gap_declared, msg.evaluation,
                     summary_from_pb(msg.episode_end) if msg.HasField("episode_end") else None,
                     steps[-1].policy_version)


def _decode(msg: pb.Chunk) -> Chunk:
    """chunk_from_pb, naming the first undecodable step (``step_seq``) when one is to blame."""
    try:
        return chunk_from_pb(msg)
    except InvalidInput as exc:
        for step in msg.steps:
            try:
                step_from_pb(step)
            except InvalidInput:
                exc.step_seq = step.seq
                break
        raise


_count_rejection = metrics.count_gateway_rejection


class FleetServicer(PolicyServicerMixin, pb_grpc.FleetServiceServicer):
    def __init__(self, ingest: Ingest, feed: PolicyFeed, redis, watch_timeout_s: float = 15.0,
                 limiter: InflightLimiter | None = None):
        self._ingest = ingest
        self._limiter = limiter or InflightLimiter(256 << 20, 32 << 20, max_streams=2048, wait_s=5.0,
                                                   retry_after_s=1.0)
        self._feed = feed
        self._redis = redis
        self._watch_timeout_s = watch_timeout_s
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        self._checks: dict[str, WireCheck] = {}
        self._image_checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="image-check")
        """Chunks with camera frames are checked here, off the event loop (other robots' RPCs keep going)."""
        metrics.init_gateway()

    @map_errors(_count_rejection)
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        info = robot_info_from_pb(request)
        last = await self._ingest.register(info)
        log.info("robot %s registered (%s, %d tasks), last acked seq %d", info.robot_id, info.embodiment,
                 len(info.tasks), last)
        return pb.RegisterResponse(last_acked_seq=last, latest_policy_version=self._feed.latest,
                                   gateway_id=self.gateway_id)

    @map_errors(_count_rejection)
    async def StreamExperience(self, request_iterator, context):
        robot_id = None
        with metrics.stream_scope("StreamExperience", metrics.GATEWAY_STREAMS, passthrough=(FleetError,)):
            self._limiter.open_stream()
            try:
                async for msg in request_iterator:
                    # Held from here to the write's reply: bounds memory, and while a chunk waits for room
                    # nothing more is read from this stream (flow control slows the robot down).
                    async with self._limiter.hold(msg.robot_id, msg.ByteSize()):
                        t0 = time.perf_counter()
                        head = await self._accept(msg)
                        if robot_id is None:
                            robot_id = head.robot_id
                            metrics.GATEWAY_ROBOT_STREAMS.opened(robot_id)
                        elif head.robot_id != robot_id:
                            raise InvalidInput(f"one stream carries one robot: got {head.robot_id!r} after "
                                               f"{robot_id!r}")
                        raw = [s.SerializeToString() for s in msg.steps]
                        nbytes = sum(len(b) for b in raw)
                        metrics.GATEWAY_INFLIGHT_BYTES.inc(nbytes)
                        try:
                            result = await self._ingest.store(head, raw)
                        finally:
                            metrics.GATEWAY_INFLIGHT_BYTES.dec(nbytes)
                    metrics.GATEWAY_INGEST.observe(time.perf_counter() - t0)
                    task = metrics.task_label(head.task)
                    metrics.GATEWAY_STEPS.labels(robot=robot_id, task=task).inc(result.stored_steps)
                    metrics.GATEWAY_DUPLICATE_STEPS.labels(robot=robot_id).inc(result.duplicate_steps)
                    metrics.GATEWAY_BYTES.labels(robot=robot_id, task=task).inc(nbytes)
                    yield pb.Ack(acked_seq=result.acked_seq, duplicate_steps=result.duplicate_steps)
            finally:
                self._limiter.close_stream()
                if robot_id is not None:
                    metrics.GATEWAY_ROBOT_STREAMS.closed(robot_id)

    async def _accept(self, msg: pb.Chunk) -> ChunkHead:
        """Validate a chunk: certified by the fast check, or else through the full path (precise errors)."""
        info = self._ingest.cached(msg.robot_id)
        if info is not None:
            check = self._checks.get(msg.robot_id)
            if check is None or check.info is not info:
                check = self._checks[msg.robot_id] = WireCheck(info)
            certified = (await asyncio.get_running_loop().run_in_executor(self._image_checks, check.certifies, msg)
                         if check.images else check.certifies(msg))
            if certified:
                return _head(msg)
        chunk = _decode(msg)
        await self._ingest.validate(chunk)
        return ChunkHead.of(chunk)

    @map_errors(_count_rejection)
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        info = await self._ingest.robot(request.robot_id)
        check_id(request.state, f"robot {info.robot_id!r} heartbeat state", allow_empty=True)
        if request.task and request.task not in info.tasks:
            raise InvalidInput(f"robot {info.robot_id!r} heartbeat task {shown(request.task)} is not among the "
                               "tasks it registered")
        now = time.time()
        with self._ingest.redis_errors(f"heartbeat of robot {request.robot_id!r}"):
            await self._redis.hset(RobotKeys(request.robot_id).status, mapping={
                "last_seen_s": now, "policy_version": request.policy_version, "spool_steps": request.spool_steps,
                "spool_bytes": request.spool_bytes, "state": request.state, "task": request.task,
                "steps_per_s": request.steps_per_s, "intervention_rate": request.intervention_rate,
                "gateway_id": self.gateway_id})
        return pb.HeartbeatResponse(latest_policy_version=self._feed.latest, server_time_s=now)
