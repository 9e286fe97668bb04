"""WatchPolicy: stream every version newer than the one the edge holds.

A mixin of ``FleetServicer`` (one gRPC service, one servicer class) kept in its
own file: policy distribution evolves separately from experience ingest.

The edge says which version it holds; it gets a delta from that version (or a
full transfer when it holds none, asks for one, or its version is unknown).
Transfers are pre-serialized by the PolicyFeed and shared by every robot, so
``add_fleet_service`` registers WatchPolicy with a pass-through serializer.
An edge that asks for the weight side channel (``side_channel``; the gateway runs one with
``weights_listen``) gets the header with a ticket and the trailer on this stream, and the tensors over
``cloud.gateway.weight_channel``. Per robot, the gateway records what it delivered in ``fleet:{r:<id>}:status``
(``policy_delivered_version``, ``policy_delivered_s``; ``policy_refused_version``
when the edge refused one) and exports the lag in versions as a gauge.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from redis.exceptions import RedisError

from cloud.buffer import RobotKeys
from cloud.gateway.interceptors import map_errors
from fleet import metrics
from fleet.errors import FleetError
from fleet.v1 import fleet_pb2 as pb
from fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = "fleet.v1.FleetService"


_count_rejection = metrics.count_gateway_rejection


def _end_if_cancelled() -> None:
    """Raise CancelledError if this handler's task was cancelled (the edge cancelled the call) but the error got
    lost: redis-py's async client can swallow it during a command (the status write after each delivery), and
    the handler would then wait for the next version, holding the robot's WatchPolicy slot until one came."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("the call was cancelled while a Redis command ran")


def _wire(msg: bytes | pb.PolicyUpdate) -> bytes:
    """WatchPolicy's response serializer: transfers arrive serialized already."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class _Handlers:
    """Stands in for a server to collect the generated method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers.update(handlers)


def add_fleet_service(servicer, server) -> None:
    """``add_FleetServiceServicer_to_server``, with WatchPolicy sending pre-serialized bytes as they are."""
    collected = _Handlers()
    pb_grpc.add_FleetServiceServicer_to_server(servicer, collected)
    handlers = dict(collected.handlers)
    handlers["WatchPolicy"] = grpc.unary_stream_rpc_method_handler(
        servicer.WatchPolicy, request_deserializer=pb.WatchPolicyRequest.FromString, response_serializer=_wire)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class PolicyServicerMixin:
    """Needs ``self._feed`` (a PolicyFeed), ``self._redis`` (async), ``self._watch_timeout_s`` and ``self._weights``
    (a WeightChannel or None)."""

    async def _record(self, robot_id: str, fields: dict) -> None:
        if not robot_id:
            return
        try:
            await self._redis.hset(RobotKeys(robot_id).status, mapping=fields)
        except RedisError as exc:  # staleness reporting must not stop delivery
            log.warning("could not record policy status of %s: %s", robot_id, exc)

    async def _delivered(self, robot_id: str, version: int) -> None:
        if robot_id:
            metrics.GATEWAY_POLICY_LAG.labels(robot=robot_id).set(max(self._feed.latest - version, 0))
        await self._record(robot_id, {"policy_delivered_version": version, "policy_delivered_s": time.time()})

    @map_errors(_count_rejection)
    async def WatchPolicy(self, request: pb.WatchPolicyRequest, context):
        robot = request.robot_id
        have, want_full = request.have_version, request.want_full
        floor = max(have, request.rejected_version)  # never resend a version the edge refused
        if request.rejected_version:
            log.warning("robot %s refused policy v%d; it keeps v%d", robot or "?", request.rejected_version, have)
            metrics.GATEWAY_POLICY_REFUSED.labels(robot=robot or "?").inc()
            await self._record(robot, {"policy_refused_version": request.rejected_version})
        await self._delivered(robot, have)
        with metrics.stream_scope("WatchPolicy", metrics.GATEWAY_POLICY_STREAMS, passthrough=(FleetError,)):
            while not context.done():
                _end_if_cancelled()
                latest = await self._feed.wait_newer(floor, self._watch_timeout_s)
                if latest <= floor:
                    continue
                if robot:
                    metrics.GATEWAY_POLICY_LAG.labels(robot=robot).set(latest - have)
                transfer = await self._feed.transfer_for(latest, have, want_full)
                if request.side_channel and self._weights is not None:
                    await transfer.wait_done()  # a ticket covers the whole transfer
                    header = pb.PolicyUpdate.FromString(transfer.parts[0])
                    header.header.ticket = self._weights.issue(robot, transfer)
                    header.header.side_channel_address = self._weights.address
                    yield header.SerializeToString()
                    yield transfer.parts[-1]  # the trailer; the tensors go over the side channel
                    how = "ticket for the side channel"
                else:
                    async for msg in transfer.stream():
                        yield msg
                    metrics.GATEWAY_POLICY_BYTES.labels(kind=transfer.kind).inc(transfer.payload_bytes)
                    how = "sent"
                log.info("%s: policy v%d to %s (%s from v%d: %.1f of %.1f MB)", how, latest, robot or "?",
                         transfer.kind, transfer.base_version, transfer.payload_bytes / 1e6, transfer.full_bytes / 1e6)
                have = floor = latest
                want_full = False
                await self._delivered(robot, have)
