"""The edge's gRPC client: channel with keepalive, deadlines on unary calls, and
pb <-> domain conversion (generated objects stop here)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from fleet.convert import robot_info_to_pb
from fleet.types import RobotInfo
from fleet.v1 import fleet_pb2 as pb
from fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


@dataclass(frozen=True)
class Registration:
    last_acked_seq: int
    latest_policy_version: int
    gateway_id: str


@dataclass(frozen=True)
class PolicyHeaderEvent:
    version: int
    base_version: int
    manifest_json: str
    payload_bytes: int


@dataclass(frozen=True)
class PolicyPieceEvent:
    name: str
    offset: int
    data: bytes
    encoding: str


@dataclass(frozen=True)
class PolicyTrailerEvent:
    sha256: str


class FleetClient:
    """One channel to one gateway target (a load-balanced address for several replicas)."""

    def __init__(self, target: str, rpc_timeout_s: float = 10.0):
        self.target = target
        self.rpc_timeout_s = rpc_timeout_s
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.FleetServiceStub(self._channel)

    def register(self, info: RobotInfo) -> Registration:
        resp = self._stub.Register(robot_info_to_pb(info), timeout=self.rpc_timeout_s, wait_for_ready=False)
        return Registration(resp.last_acked_seq, resp.latest_policy_version, resp.gateway_id)

    def heartbeat(self, robot_id: str, policy_version: int, spool_steps: int, spool_bytes: int, state: str,
                  task: str, steps_per_s: float, intervention_rate: float) -> int:
        resp = self._stub.Heartbeat(pb.HeartbeatRequest(
            robot_id=robot_id, policy_version=policy_version, spool_steps=spool_steps, spool_bytes=spool_bytes,
            state=state, task=task, steps_per_s=steps_per_s, intervention_rate=intervention_rate),
            timeout=self.rpc_timeout_s)
        return resp.latest_policy_version

    def stream_experience(self, requests: Iterator[pb.Chunk]):
        """Open the bidi stream; returns the call (iterate it for acks; ``cancel()`` to end)."""
        return self._stub.StreamExperience(requests)

    def watch_policy(self, robot_id: str, have_version: int):
        """Server stream of policy events; the returned call can be cancelled."""
        return self._stub.WatchPolicy(pb.WatchPolicyRequest(robot_id=robot_id, have_version=have_version))

    @staticmethod
    def policy_event(msg: pb.PolicyUpdate):
        kind = msg.WhichOneof("part")
        if kind == "header":
            h = msg.header
            return PolicyHeaderEvent(h.version, h.base_version, h.manifest_json, h.payload_bytes)
        if kind == "piece":
            p = msg.piece
            return PolicyPieceEvent(p.name, p.offset, p.data, p.encoding or "raw")
        if kind == "trailer":
            return PolicyTrailerEvent(msg.trailer.sha256)
        return None

    def close(self) -> None:
        self._channel.close()
