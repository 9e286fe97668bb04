"""Thin gRPC servicer: convert -> delegate to ingest / policy feed -> convert back.

Experience (protocol 2) arrives as columnar chunks (``StreamColumns``): the registration is
looked up by robot, the chunk's schema hash compared with it, the columns decoded against the
registered schema (byte lengths; no copies), checked by the one validator
(:func:`cloud.validator.check_columns`: whole columns at once) and stored: a message's chunks
in one Redis transaction (:meth:`cloud.ingest.Ingest.store_many`), acked together. Chunks with camera
frames are checked on a small thread pool, off the event loop. Protocol 1's per-step
``StreamExperience`` answers FAILED_PRECONDITION telling the edge to upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor


from cloud.gateway.backpressure import InflightLimiter
from cloud.gateway.interceptors import map_errors, request_bytes
from cloud.gateway.policy_feed import PolicyFeed
from cloud.gateway.policy_servicer import PolicyServicerMixin
from cloud.ingest import Ingest
from cloud.validator import check_columns
from fleet import PROTOCOL_VERSION, metrics
from fleet.columns import ColumnChunk
from cloud.buffer.writer import assignment_from_json
from fleet.convert import assignment_to_pb, check_thumbnail, columns_from_pb, help_from_pb, robot_info_from_pb
from fleet.errors import FleetError, IncompatiblePeer, InvalidInput
from fleet.names import check_id, shown
from fleet.types import NO_ASSIGNMENT, OperatorAssignment, RobotInfo
from fleet.v1 import fleet_pb2 as pb
from fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_MESSAGE = 16
"""Chunks one StreamColumns message may carry (the first and ``more``); Register tells the edge."""


_count_rejection = metrics.count_gateway_rejection


class FleetServicer(PolicyServicerMixin, pb_grpc.FleetServiceServicer):
    def __init__(self, ingest: Ingest, feed: PolicyFeed, redis, watch_timeout_s: float = 15.0,
                 limiter: InflightLimiter | None = None, weights=None):
        self._ingest = ingest
        self._weights = weights
        """The weight side channel (cloud.gateway.weight_channel), or None: weights over gRPC only."""
        self._limiter = limiter or InflightLimiter(256 << 20, 32 << 20, max_streams=2048, wait_s=5.0,
                                                   retry_after_s=1.0)
        self._feed = feed
        self._redis = redis
        self._watch_timeout_s = watch_timeout_s
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
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
                                   gateway_id=self.gateway_id, max_chunks_per_message=MAX_CHUNKS_PER_MESSAGE)

    @map_errors(_count_rejection)
    async def StreamExperience(self, request_iterator, context):
        raise IncompatiblePeer(f"per-step chunks (protocol 1) are no longer accepted; this gateway speaks "
                               f"{PROTOCOL_VERSION!r} (columnar chunks on StreamColumns): upgrade the robot's "
                               "fleet software")
        yield  # an async generator, like every stream handler

    @map_errors(_count_rejection)
    async def StreamColumns(self, request_iterator, context):
        robot_id = None
        with metrics.stream_scope("StreamExperience", metrics.GATEWAY_STREAMS, passthrough=(FleetError,)):
            self._limiter.open_stream()
            try:
                async for msg in request_iterator:
                    nbytes = request_bytes(msg)
                    parts = [msg, *msg.more] if msg.more else [msg]
                    if len(parts) > MAX_CHUNKS_PER_MESSAGE or any(part.more for part in parts[1:]):
                        raise InvalidInput(f"a message carries at most {MAX_CHUNKS_PER_MESSAGE} chunks, none of the "
                                           f"further ones with more of its own (got {len(parts)})")
                    acked, duplicates, failed = None, 0, None
                    # Held from here to the write's reply: bounds memory, and while a chunk waits for room
                    # nothing more is read from this stream (flow control slows the robot down).
                    async with self._limiter.hold(msg.robot_id, nbytes):
                        t0 = time.perf_counter()
                        metrics.GATEWAY_INFLIGHT_BYTES.inc(nbytes)
                        try:
                            accepted = []  # the chunks before the first invalid one, all stored in one round trip
                            try:
                                for part in parts:
                                    if robot_id is not None and part.robot_id != robot_id:
                                        raise InvalidInput(f"one stream carries one robot: got "
                                                           f"{shown(part.robot_id)} after {robot_id!r}")
                                    accepted.append(await self._accept(part))
                                    if robot_id is None:
                                        robot_id = accepted[0][0].robot_id
                                        metrics.GATEWAY_ROBOT_STREAMS.opened(robot_id)
                            except FleetError as exc:
                                if not accepted:
                                    raise
                                failed = exc
                            results, error = await self._ingest.store_many(accepted)
                            if error is not None and not results:
                                raise error
                            failed = error or failed  # ack the chunks stored before it, then fail the stream
                            for (cc, _), result in zip(accepted, results):
                                acked, duplicates = result.acked_seq, duplicates + result.duplicate_steps
                                metrics.GATEWAY_STEPS.labels(robot=robot_id, task=metrics.task_label(cc.task)).inc(
                                    result.stored_steps)
                        finally:
                            metrics.GATEWAY_INFLIGHT_BYTES.dec(nbytes)
                    metrics.GATEWAY_INGEST.observe(time.perf_counter() - t0)
                    metrics.GATEWAY_DUPLICATE_STEPS.labels(robot=robot_id).inc(duplicates)
                    metrics.GATEWAY_BYTES.labels(robot=robot_id, task=metrics.task_label(msg.task)).inc(nbytes)
                    yield pb.Ack(acked_seq=acked, duplicate_steps=duplicates)
                    if failed is not None:
                        raise failed
            finally:
                self._limiter.close_stream()
                if robot_id is not None:
                    metrics.GATEWAY_ROBOT_STREAMS.closed(robot_id)

    async def _accept(self, msg: pb.ColumnChunk) -> tuple[ColumnChunk, RobotInfo]:
        """Decode and validate a chunk against its robot's registration (precise errors)."""
        check_id(msg.robot_id, "chunk robot_id")
        info = await self._ingest.registration_for(msg.robot_id, msg.schema_hash)
        cc = columns_from_pb(msg, info.schema)
        try:
            if cc.columns.frames:
                await asyncio.get_running_loop().run_in_executor(self._image_checks, check_columns, cc, info)
            else:
                check_columns(cc, info)
        except InvalidInput:
            await self._ingest.validate(cc, info)  # against a newer registration, or the precise error again
        return cc, info

    @map_errors(_count_rejection)
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        info = await self._ingest.robot(request.robot_id)
        check_id(request.state, f"robot {info.robot_id!r} heartbeat state", allow_empty=True)
        if request.task and request.task not in info.tasks:
            raise InvalidInput(f"robot {info.robot_id!r} heartbeat task {shown(request.task)} is not among the "
                               "tasks it registered")
        check_id(request.operator_id, f"robot {info.robot_id!r} heartbeat operator_id", allow_empty=True)
        signal = help_from_pb(request.help, f"robot {info.robot_id!r} heartbeat")
        thumbnail = check_thumbnail(request.thumbnail, f"robot {info.robot_id!r} heartbeat")
        now = time.time()
        with self._ingest.redis_errors(f"heartbeat of robot {request.robot_id!r}"):
            raw = await self._ingest.writer.heartbeat(request.robot_id, {
                "last_seen_s": now, "policy_version": request.policy_version, "spool_steps": request.spool_steps,
                "spool_bytes": request.spool_bytes, "state": request.state, "task": request.task,
                "steps_per_s": request.steps_per_s, "intervention_rate": request.intervention_rate,
                "gateway_id": self.gateway_id,
                "help_score": signal.score, "help_uncertainty": signal.uncertainty, "help_stall": signal.stall,
                "help_risk": signal.risk, "help_wanted": int(signal.wanted), "holding": int(signal.holding),
                "intervening": int(signal.intervening), "wanted_for_s": signal.wanted_for_s,
                "operator": request.operator_id}, thumbnail)
        return pb.HeartbeatResponse(latest_policy_version=self._feed.latest, server_time_s=now,
                                    assignment=assignment_to_pb(self._assignment(info.robot_id, raw)))

    @staticmethod
    def _assignment(robot_id: str, raw: bytes | None) -> OperatorAssignment:
        """The robot's entry in fleet:ops:assignments; a malformed one is no operator (counted, logged)."""
        if raw is None:
            return NO_ASSIGNMENT
        try:
            return assignment_from_json(raw)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
            metrics.GATEWAY_BAD_ASSIGNMENTS.inc()
            log.warning("robot %s: malformed operator assignment %s ignored (no operator): %s", robot_id,
                        shown(str(raw)), exc)
            return NO_ASSIGNMENT
