"""The weight side channel end to end on loopback: a real gateway with ``weights_listen``, real edge updaters,
real sockets. Tickets that are bad, reused, expired or someone else's are refused without harming the
gateway; a corrupt or truncated side channel (a TCP proxy in the middle) is refused and retried; without a
side channel, or when it cannot be reached, the weights come over gRPC."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import grpc
import pytest

from cloud.gateway.server import protected_mode_refusal
from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from edge.assembler import Assembler
from edge.client import FleetClient, PolicyHeaderEvent
from edge.weight_channel import SideChannelUnavailable, receive
from fleet.errors import ConfigError
from fleet.gateway_config import GatewayConfig, GatewaySecurity
from fleet.v1 import fleet_pb2 as pb
from tests.cloud.test_policy_distribution import act_with_frozen_encoder, assert_holds, make_updater, update
from tests.conftest import GatewayThread, serve_watch_policy
from tests.waiting import wait_until

MAGIC = b"FLW1"


@pytest.fixture
def side_gateway(redis_proc, tmp_path):
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies"), weights_listen="127.0.0.1:0"))
    yield gw
    gw.stop()


def header_with_ticket(target: str, robot: str) -> PolicyHeaderEvent:
    """The header (with its ticket) of a fresh WatchPolicy stream. The gateway frees a cancelled stream's slot
    when its handler notices the cancel, so a stream opened right after may be refused RESOURCE_EXHAUSTED
    (2 per robot): that is retried until the slot is free."""
    return wait_until(lambda: _header_or_none(target, robot), 30, f"a WatchPolicy slot for {robot!r}")


def _header_or_none(target: str, robot: str) -> PolicyHeaderEvent | None:
    client = FleetClient(target)
    call = client.watch_policy(robot, 0, side_channel=True)
    try:
        header = next(iter(call))
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        raise
    finally:
        call.cancel()
        client.close()
    assert isinstance(header, PolicyHeaderEvent) and len(header.ticket) == 32
    return header


def present(port: int, ticket: bytes, robot: str) -> bytes:
    """Everything the side channel answers to ``ticket`` (b"" = closed at once: refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(MAGIC + ticket + struct.pack("<H", len(robot)) + robot.encode())
        out = bytearray()
        while chunk := sock.recv(1 << 20):
            out += chunk
    return bytes(out)


def test_side_channel_delivers_exactly_the_published_weights(side_gateway, redis_client, tmp_path: Path) -> None:
    store = PolicyStore(side_gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1, full_every_versions=0)
    channel = side_gateway.gw.weights
    policy = act_with_frozen_encoder()
    edge = make_updater("edge", side_gateway.target, tmp_path)
    edge.start()
    try:
        for step in (1, 2, 3):  # a full transfer (a model is built), then deltas into the standby model
            update(policy, seed=step)
            version = publisher.publish(policy, step).version
            assert edge.wait_version(version, timeout_s=30)
            assert_holds(edge, store, version)
            assert edge.last_transfer.base_version == (0 if step == 1 else version - 1)
        assert channel.served == 3 and not channel.refused and edge.rejected == 0
        late = make_updater("late", side_gateway.target, tmp_path)  # full transfer straight into memory
        late.start()
        try:
            assert late.wait_version(version, timeout_s=30)
            assert_holds(late, store, version)
        finally:
            late.stop()
        assert channel.served == 4
    finally:
        edge.stop()


def test_bad_reused_expired_and_foreign_tickets_are_refused_and_counted(side_gateway, redis_client) -> None:
    store = PolicyStore(side_gateway.cfg.policy_dir, redis_client)
    Publisher(store, every_steps=1).publish(act_with_frozen_encoder(), 1)
    channel = side_gateway.gw.weights
    header = header_with_ticket(side_gateway.target, "r1")
    assert present(channel.port, bytes(32), "r1") == b""  # a guessed ticket
    assert present(channel.port, header.ticket, "r2") == b""  # another robot's: used up by the attempt
    assert present(channel.port, header.ticket, "r1") == b""  # reused
    with socket.create_connection(("127.0.0.1", channel.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:  # closed with our bytes unread
            pass
    # Each header below for a robot of its own: this test is about tickets, not about how soon the gateway
    # frees a cancelled WatchPolicy stream's slot (2 per robot; the next test is about that).
    channel.ticket_s = -1.0
    expired = header_with_ticket(side_gateway.target, "r3")
    assert present(channel.port, expired.ticket, "r3") == b""
    assert channel.refused == {"unknown_ticket": 2, "wrong_robot": 1, "bad_hello": 1, "expired": 1}
    channel.ticket_s = 30.0
    good = header_with_ticket(side_gateway.target, "r4")  # the gateway still serves
    assembler = Assembler(good, None)
    assert receive(("127.0.0.1", channel.port), good.ticket, "r4", assembler) == store.manifest(1).total_bytes
    assert channel.served == 1
    with pytest.raises(SideChannelUnavailable, match="closed the weight side channel before sending"):
        receive(("127.0.0.1", channel.port), good.ticket, "r4", Assembler(good, None))


def test_a_cancelled_watch_frees_its_slot_at_once(side_gateway, redis_client) -> None:
    """An edge that cancels its WatchPolicy right after the header (it has the ticket) frees the stream slot at
    once, every time. The gateway writes the delivery to Redis as the edge cancels, and redis-py's async client
    could swallow the cancellation there: the handler then waited for the next version (15 s here, forever
    without publishes) holding one of the robot's 2 slots; about 1 cancel in 10-30 did that on this machine."""
    from prometheus_client import REGISTRY

    Publisher(PolicyStore(side_gateway.cfg.policy_dir, redis_client), every_steps=1).publish(
        act_with_frozen_encoder(), 1)
    open_streams = lambda: REGISTRY.get_sample_value("fleet_gateway_policy_streams") or 0.0  # noqa: E731
    before = open_streams()
    for i in range(40):
        client = FleetClient(side_gateway.target)
        call = client.watch_policy("r1", 0, side_channel=True)
        assert isinstance(next(iter(call)), PolicyHeaderEvent)
        call.cancel()
        client.close()
        wait_until(lambda: open_streams() <= before, 5, f"the gateway to end cancelled stream {i}", poll_s=0.005)


def test_every_dtype_and_an_empty_tensor_arrive_in_memory_or_through_the_piece_buffer(side_gateway, redis_client
                                                                                      ) -> None:
    import torch

    store = PolicyStore(side_gateway.cfg.policy_dir, redis_client, piece_bytes=4096)
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 65, generator=gen).bfloat16(), "b": torch.randn(7, generator=gen),
               "steps": torch.tensor([7], dtype=torch.int64), "mask": torch.rand(50, generator=gen) > 0.5,
               "empty": torch.zeros(0)}
    store.publish(tensors, {"kind": "test"})
    expected = store.payload(1)
    for into_memory in (False, True):
        client = FleetClient(side_gateway.target)
        call = client.watch_policy("r1", 0, side_channel=True)
        events = iter(call)
        header = next(events)
        assembler = Assembler(header, None)
        memory = {name: memoryview(bytearray(len(data))) for name, data in expected.items()}
        if into_memory:  # a standby model's weights
            assembler.write_into(memory, {})
        port = client.side_channel_address(header.side_channel_address)
        assert receive(port, header.ticket, "r1", assembler) == sum(map(len, expected.values()))
        held, _ = assembler.finish(next(events))
        call.cancel()
        client.close()
        for name, data in expected.items():
            assert bytes(held.payload[name]) == bytes(data), name
            assert bytes(memory[name]) == (bytes(data) if into_memory else bytes(len(data))), name


class SideChannelMitm:
    """In the middle of both channels: a WatchPolicy relay that points headers' side-channel address at a TCP
    proxy, which forwards to the gateway's side channel and, while armed, flips a byte of (or cuts off) the next
    transfer past its first ``skip`` bytes. ``address``: what the relay advertises instead (a closed port
    makes the side channel unreachable)."""

    def __init__(self, upstream: str, side_port: int, mode: str, skip: int = 256):
        self.mode, self.skip, self.side_port = mode, skip, side_port
        self.armed, self.tampered = threading.Event(), threading.Event()
        self.connections = self.watches = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()
        self._channel = grpc.insecure_channel(upstream)
        self._watch = self._channel.unary_stream("/fleet.v1.FleetService/WatchPolicy")
        self.server, self.target = serve_watch_policy(self._relay)

    def _relay(self, request: bytes, context):
        self.watches += 1
        call = self._watch(request)
        context.add_callback(call.cancel)
        try:
            for raw in call:
                msg = pb.PolicyUpdate.FromString(raw)
                if msg.WhichOneof("part") == "header" and msg.header.ticket:
                    msg.header.side_channel_address = self.address
                    raw = msg.SerializeToString()
                yield raw
        except grpc.RpcError:
            return

    def _accept(self) -> None:
        while True:
            try:
                edge, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._pipe, args=(edge,), daemon=True).start()

    def _pipe(self, edge: socket.socket) -> None:
        tamper = self.armed.is_set()
        self.armed.clear()
        with edge, socket.create_connection(("127.0.0.1", self.side_port)) as gw:
            edge.settimeout(10)
            hello = edge.recv(1024)  # MAGIC + ticket + robot id: one small write
            gw.sendall(hello)
            seen = 0
            while chunk := gw.recv(1 << 16):
                if tamper and seen + len(chunk) > self.skip:
                    self.tampered.set()
                    if self.mode == "truncate":
                        edge.sendall(chunk[:self.skip - seen])
                        return
                    chunk = bytearray(chunk)
                    chunk[self.skip - seen] ^= 0x5A
                    tamper = False
                edge.sendall(chunk)
                seen += len(chunk)

    def stop(self) -> None:
        self.server.stop(0)
        self._channel.close()
        self._listener.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_corrupt_or_truncated_side_channel_is_refused_then_retried(side_gateway, redis_client, tmp_path: Path,
                                                                   mode: str) -> None:
    store = PolicyStore(side_gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1)
    policy = act_with_frozen_encoder()
    mitm = SideChannelMitm(side_gateway.target, side_gateway.gw.weights.port, mode)
    edge = make_updater("edge", mitm.target, tmp_path)
    edge.start()
    try:
        update(policy, seed=1)
        assert edge.wait_version(publisher.publish(policy, 1).version, timeout_s=30)
        assert edge.slot.swap_if_pending() and edge.slot.current.version == 1
        mitm.armed.set()
        update(policy, seed=2)
        v2 = publisher.publish(policy, 2).version
        assert edge.wait(lambda u: u.rejected >= 1, timeout_s=30)
        assert mitm.tampered.is_set()
        assert edge.slot.current.version == 1 and edge.slot.pending_version in (None, v2)
        assert edge.wait_version(v2, timeout_s=30)  # retried as a full transfer, over the side channel again
        assert edge.last_transfer.base_version == 0 and edge.rejected == 1
        assert mitm.connections == 3
        assert_holds(edge, store, v2)
    finally:
        edge.stop()
        mitm.stop()


def test_weights_over_grpc_without_a_side_channel_or_when_it_is_unreachable(redis_proc, side_gateway, redis_client,
                                                                          tmp_path: Path) -> None:
    store = PolicyStore(side_gateway.cfg.policy_dir, redis_client)
    publisher, policy = Publisher(store, every_steps=1), act_with_frozen_encoder()
    version = publisher.publish(policy, 1).version
    without = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                          policy_dir=side_gateway.cfg.policy_dir))  # the same store, no side channel
    assert without.gw.weights is None
    plain = make_updater("plain", without.target, tmp_path)  # asks for the side channel; the gateway has none
    mitm = SideChannelMitm(side_gateway.target, side_gateway.gw.weights.port, "corrupt")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    mitm.address = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connection refused
    cut_off = make_updater("cut-off", mitm.target, tmp_path)
    edges = (plain, cut_off)
    try:
        for edge in edges:
            edge.start()
        for edge in edges:
            assert edge.wait_version(version, timeout_s=30)
            assert edge.rejected == 0 and edge.slot.pending_version == version  # not swapped in: the next
            # version is written over that model, the held one
        assert side_gateway.gw.weights.served == 0 and mitm.connections == 0
        cut_off._side_channel_off_until = 0.0  # try the side channel again (on a new watch): unreachable with
        cut_off._call.cancel()  # a version held
        assert wait_until(lambda: mitm.watches >= 3, 30, "the cut-off edge to watch again")
        update(policy, seed=2)
        v2 = publisher.publish(policy, 2).version
        for edge in edges:
            assert edge.wait_version(v2, timeout_s=30)
            assert edge.last_transfer.base_version == version and edge.rejected == 0  # a delta, over gRPC
            assert_holds(edge, store, v2)
        assert side_gateway.gw.weights.served == 0
    finally:
        for edge in edges:
            edge.stop()
        mitm.stop()
        closed.close()
        without.stop()


def test_side_channel_config_never_downgrades_tls() -> None:
    with pytest.raises(ConfigError, match="serves plaintext TCP and this gateway uses TLS"):
        GatewayConfig(weights_listen="127.0.0.1:0", security=GatewaySecurity(tls_cert_file="c", tls_key_file="k"))
    assert "refusing to serve policy weights in plaintext" in protected_mode_refusal(
        GatewayConfig(weights_listen="0.0.0.0:0"))
    assert protected_mode_refusal(GatewayConfig(weights_listen="0.0.0.0:0", insecure=True)) is None
    assert protected_mode_refusal(GatewayConfig(weights_listen="127.0.0.1:0")) is None
