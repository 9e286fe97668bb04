"""Thin gRPC servicer: convert -> delegate to ingest / policy feed -> convert back."""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from cloud.buffer import RobotKeys
from cloud.gateway.interceptors import map_errors
from cloud.gateway.policy_feed import PolicyFeed
from cloud.gateway.policy_servicer import PolicyServicerMixin
from cloud.ingest import Ingest
from fleet import metrics
from fleet.convert import chunk_from_pb, robot_info_from_pb
from fleet.errors import InvalidInput
from fleet.v1 import fleet_pb2 as pb
from fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _count_rejection(code: grpc.StatusCode) -> None:
    metrics.GATEWAY_REJECTED.labels(code=code.name).inc()


class FleetServicer(PolicyServicerMixin, pb_grpc.FleetServiceServicer):
    def __init__(self, ingest: Ingest, feed: PolicyFeed, redis, watch_timeout_s: float = 15.0):
        self._ingest = ingest
        self._feed = feed
        self._redis = redis
        self._watch_timeout_s = watch_timeout_s
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"

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
        metrics.GATEWAY_STREAMS.inc()
        try:
            async for msg in request_iterator:
                chunk = chunk_from_pb(msg)
                if robot_id is None:
                    robot_id = chunk.robot_id
                elif chunk.robot_id != robot_id:
                    raise InvalidInput(f"one stream carries one robot: got {chunk.robot_id!r} after {robot_id!r}")
                raw = [s.SerializeToString() for s in msg.steps]
                result = await self._ingest.write(chunk, raw)
                metrics.GATEWAY_STEPS.labels(robot=robot_id, task=chunk.task).inc(result.stored_steps)
                metrics.GATEWAY_BYTES.labels(robot=robot_id).inc(sum(len(b) for b in raw))
                yield pb.Ack(acked_seq=result.acked_seq, duplicate_steps=result.duplicate_steps)
        finally:
            metrics.GATEWAY_STREAMS.dec()

    @map_errors(_count_rejection)
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        await self._ingest.robot(request.robot_id)
        now = time.time()
        await self._redis.hset(RobotKeys(request.robot_id).status, mapping={
            "last_seen_s": now, "policy_version": request.policy_version, "spool_steps": request.spool_steps,
            "spool_bytes": request.spool_bytes, "state": request.state, "task": request.task,
            "steps_per_s": request.steps_per_s, "intervention_rate": request.intervention_rate,
            "gateway_id": self.gateway_id})
        return pb.HeartbeatResponse(latest_policy_version=self._feed.latest, server_time_s=now)
