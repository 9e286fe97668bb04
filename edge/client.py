"""The edge's gRPC client: channel with keepalive, deadlines on unary calls, and
pb <-> domain conversion (generated objects stop here)."""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from fleet.gateway_config import ClientSecurity
from fleet.convert import assignment_from_pb, help_to_pb, robot_info_to_pb
from fleet.errors import ConfigError
from fleet.netaddr import split_host_port
from fleet.secret_files import read_private
from fleet.tokens import read_token_file
from fleet.types import HelpSignal, OperatorAssignment, RobotInfo
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
    # Reconnect attempts to a gateway that is down: 0.2 s doubling to 1 s (gRPC adds +-20 % jitter), so a
    # restarted gateway is found within ~1 s; a refused connect costs the robot and the network next to nothing.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Policy downloads: let the gateway run 16 MiB ahead instead of auto-tuning from 64 KiB (~1.4x the
    # throughput and ~1/3 less CPU per GB for a Python client, bench/weight_sync.py).
    ("grpc.http2.initial_window_size", 16 * 1024 * 1024),
    ("grpc.http2.bdp_probe", 0),
]


RECONNECT_JITTER_S = 0.25
"""Spread of the reconnects when a gateway comes back (a fleet should not arrive in one instant)."""


def trailing_metadata(exc: grpc.RpcError) -> dict[str, str]:
    """The string trailing metadata of a failed call ({} for a locally generated error)."""
    try:
        return {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # a locally generated error may carry none
        return {}


def gateway_gone(error: BaseException | None) -> bool:
    """UNAVAILABLE without a retry-after hint: no gateway answered (down or restarting). A gateway that is up but
    cannot serve (its Redis is down) says UNAVAILABLE with ``fleet-retry-after-s``, which the backoff honours."""
    return (isinstance(error, grpc.RpcError) and hasattr(error, "code") and error.code() == grpc.StatusCode.UNAVAILABLE
            and "fleet-retry-after-s" not in trailing_metadata(error))


@dataclass(frozen=True)
class HeartbeatReply:
    latest_policy_version: int
    assignment: OperatorAssignment
    """The operator the cloud assigns to this robot now (``operator_id`` "" = none)."""


@dataclass(frozen=True)
class Registration:
    last_acked_seq: int
    latest_policy_version: int
    gateway_id: str
    max_chunks_per_message: int = 1
    """Chunks the gateway reads from one message (``ColumnChunk.more``); 1 for a gateway that predates it."""


@dataclass(frozen=True)
class PolicyHeaderEvent:
    version: int
    base_version: int
    manifest_json: str
    payload_bytes: int
    ticket: bytes = b""
    """Set when the tensors come over the weight side channel (``edge.weight_channel``), not as pieces."""
    side_channel_address: str = ""


@dataclass(frozen=True)
class PolicyPieceEvent:
    name: str
    offset: int
    data: bytes | memoryview
    encoding: str


@dataclass(frozen=True)
class PolicyTrailerEvent:
    sha256: str


def _channel(target: str, security: ClientSecurity) -> grpc.Channel:
    """TLS (mutual TLS with cert_file) when ``ca_file`` is set, else plaintext."""
    if not security.ca_file:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(security.ca_file).read_bytes(),
        private_key=read_private(security.key_file, "key_file") if security.key_file else None,
        certificate_chain=Path(security.cert_file).read_bytes() if security.cert_file else None)
    options = list(CHANNEL_OPTIONS)
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    return grpc.secure_channel(target, creds, options=options)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def policy_event_from_wire(raw: bytes):
    """A serialized PolicyUpdate as an event; a piece's data is a view into ``raw`` (no copy of ~1 MiB).

    Pieces are read field by field (repeated fields merge, as protobuf does); headers and trailers go
    through the generated class."""
    buf = memoryview(raw)
    piece = {"name": "", "offset": 0, "data": b"", "encoding": ""}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        if key != 0x12:  # not PolicyUpdate.piece (field 2, length-delimited): header or trailer
            return FleetClient.policy_event(pb.PolicyUpdate.FromString(raw))
        length, pos = _varint(buf, pos)
        end = pos + length
        while pos < end:
            key, pos = _varint(buf, pos)
            if key == 0x10:  # offset (field 2, varint)
                piece["offset"], pos = _varint(buf, pos)
                continue
            if key & 7 != 2 or key >> 3 not in (1, 3, 4):
                raise ValueError(f"unexpected field key {key} in a TensorPiece")
            size, pos = _varint(buf, pos)
            value = buf[pos:pos + size]
            field = {1: "name", 3: "data", 4: "encoding"}[key >> 3]
            piece[field] = value if field == "data" else str(value, "utf-8")
            pos += size
    return PolicyPieceEvent(piece["name"], piece["offset"], piece["data"], piece["encoding"] or "raw")


def _wire(request: pb.ColumnChunk | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


class FleetClient:
    """One channel to one gateway target (a load-balanced address for several replicas)."""

    def __init__(self, target: str, rpc_timeout_s: float = 10.0, security: ClientSecurity | None = None):
        self.target = target
        self.rpc_timeout_s = rpc_timeout_s
        security = security or ClientSecurity()
        self._channel = _channel(target, security)
        self._unsubscribed_mono = -1.0  # when wait_connected last stopped watching the channel
        self._stub = pb_grpc.FleetServiceStub(self._channel)
        self.side_channel = not security.ca_file
        """Whether to ask for the weight side channel: plaintext TCP, so only when this channel is plaintext
        too (with TLS the weights stay on it)."""
        self._watch_events = self._channel.unary_stream(  # policy events straight from the received bytes
            "/fleet.v1.FleetService/WatchPolicy", request_serializer=pb.WatchPolicyRequest.SerializeToString,
            response_deserializer=policy_event_from_wire)
        self._stream_columns = self._channel.stream_stream(  # chunks as the streamer wrote their wire bytes
            "/fleet.v1.FleetService/StreamColumns", request_serializer=_wire, response_deserializer=pb.Ack.FromString)
        self._token_file = security.token_file
        self._token_stamp: tuple[int, int] | None = None
        self._token_metadata: tuple = ()
        self._metadata  # read (and check) the token file now: a bad one fails at start, not on the first call

    @property
    def _metadata(self) -> tuple:
        """The call metadata: the token file is re-read when it changes (`fleet certs token` refreshes it)."""
        if not self._token_file:
            return ()
        try:
            st = os.stat(self._token_file)
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._token_stamp:
                self._token_metadata = (("authorization", f"Bearer {read_token_file(self._token_file)}"),)
                self._token_stamp = stamp
        except (OSError, ValueError, ConfigError) as exc:
            if self._token_stamp is None:
                raise  # at start: a missing or unreadable token file is a configuration error
            log.warning("cannot re-read the token file %s (%s); keeping the token read before", self._token_file, exc)
        return self._token_metadata

    def register(self, info: RobotInfo) -> Registration:
        resp = self._stub.Register(robot_info_to_pb(info), timeout=self.rpc_timeout_s, wait_for_ready=False,
                                   metadata=self._metadata)
        return Registration(resp.last_acked_seq, resp.latest_policy_version, resp.gateway_id,
                            max(1, resp.max_chunks_per_message))

    def heartbeat(self, robot_id: str, policy_version: int, spool_steps: int, spool_bytes: int, state: str,
                  task: str, steps_per_s: float, intervention_rate: float, help: HelpSignal | None = None,
                  thumbnail: bytes = b"", operator_id: str = "") -> HeartbeatReply:
        """Report the robot's state (and its need for help, a JPEG thumbnail, the operator it acts on); the
        reply carries the newest policy version and the operator assigned to it."""
        resp = self._stub.Heartbeat(pb.HeartbeatRequest(
            robot_id=robot_id, policy_version=policy_version, spool_steps=spool_steps, spool_bytes=spool_bytes,
            state=state, task=task, steps_per_s=steps_per_s, intervention_rate=intervention_rate,
            help=help_to_pb(help) if help is not None else None, thumbnail=thumbnail, operator_id=operator_id),
            timeout=self.rpc_timeout_s, metadata=self._metadata)
        return HeartbeatReply(resp.latest_policy_version, assignment_from_pb(resp.assignment))

    def stream_experience(self, requests: Iterator[pb.ColumnChunk | bytes]):
        """Open the bidi stream of columnar chunks (protocol 2): messages, or a ColumnChunk's protobuf bytes
        (``fleet.convert.message_wire``), sent as they are; returns the call (iterate it for acks; ``cancel()``
        to end)."""
        return self._stream_columns(requests, metadata=self._metadata)

    def watch_policy(self, robot_id: str, have_version: int, want_full: bool = False, rejected_version: int = 0,
                     side_channel: bool = False):
        """Server stream of policy events (PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent); the
        returned call can be cancelled. ``side_channel``: ask for tickets to the weight side channel (only
        honoured on a plaintext channel, see ``self.side_channel``)."""
        return self._watch_events(pb.WatchPolicyRequest(robot_id=robot_id, have_version=have_version,
                                                        want_full=want_full, rejected_version=rejected_version,
                                                        side_channel=side_channel and self.side_channel),
                                  metadata=self._metadata)

    def side_channel_address(self, advertised: str) -> tuple[str, int]:
        """Where to connect for a header's side channel: its host, or this channel's (":port")."""
        host, port = split_host_port(advertised)
        return host or split_host_port(self.target)[0], port

    @staticmethod
    def policy_event(msg: pb.PolicyUpdate):
        kind = msg.WhichOneof("part")
        if kind == "header":
            h = msg.header
            return PolicyHeaderEvent(h.version, h.base_version, h.manifest_json, h.payload_bytes, h.ticket,
                                     h.side_channel_address)
        if kind == "piece":
            p = msg.piece
            return PolicyPieceEvent(p.name, p.offset, p.data, p.encoding or "raw")
        if kind == "trailer":
            return PolicyTrailerEvent(msg.trailer.sha256)
        return None

    def wait_connected(self, timeout_s: float, stop: threading.Event) -> bool | None:
        """Wait until the channel is connected (it keeps retrying meanwhile), ``timeout_s`` passes or ``stop`` is set.

        True: it connected while we waited; None: it already was connected when asked (a server is there, so
        an UNAVAILABLE came from that server and the caller's backoff applies); False: timeout or stop."""
        states: queue.SimpleQueue = queue.SimpleQueue()
        watch = states.put
        self._channel.subscribe(watch, try_to_connect=True)  # the first callback is the current state
        try:
            deadline = time.monotonic() + timeout_s
            first = True
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                try:
                    state = states.get(timeout=min(left, 0.1))
                except queue.Empty:
                    continue
                if state is grpc.ChannelConnectivity.READY:
                    return None if first else True
                first = False
            return False
        finally:
            self._channel.unsubscribe(watch)
            self._unsubscribed_mono = time.monotonic()

    def wait_retry(self, delay_s: float, stop: threading.Event, error: BaseException | None = None) -> bool:
        """Wait before retrying after ``error``; True when ``stop`` was set. When the gateway went away
        (``gateway_gone(error)``), go as soon as the channel connects again, plus 0-``RECONNECT_JITTER_S`` so a
        fleet does not arrive at once, instead of sleeping ``delay_s`` out."""
        if gateway_gone(error):
            t0 = time.monotonic()
            if self.wait_connected(delay_s, stop):
                return stop.wait(random.uniform(0.0, RECONNECT_JITTER_S))
            delay_s -= time.monotonic() - t0
        return stop.wait(max(0.0, delay_s))

    def close(self) -> None:
        # gRPC's connectivity poller notices an unsubscribe only after its 0.2 s watch; closing the channel inside
        # that window makes the poller thread raise "Cannot monitor channel state: Channel closed!".
        time.sleep(max(0.0, self._unsubscribed_mono + 0.25 - time.monotonic()))
        self._channel.close()
