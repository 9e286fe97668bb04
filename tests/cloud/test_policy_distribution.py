"""Policy distribution end to end with real parts: a LeRobot policy with a frozen part published into the
store (Redis pointer), the grpc.aio gateway encoding transfers once, edge updaters assembling, applying
deltas, verifying and offering to the hot-swap slot. A gRPC proxy corrupts or truncates a transfer in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from edge.client import FleetClient
from edge.hotswap import PolicySlot
from edge.updater import LastGood, Updater
from fleet import delta
from fleet.policies import FleetPolicy, PolicyConfig, build_policy
from fleet.policies.base import NullPolicy
from fleet.types import FeatureSpec, Schema
from fleet.v1 import fleet_pb2 as pb
from tests.conftest import serve_watch_policy
from tests.transfers import encode_transfer, messages
from tests.waiting import wait_until

SCHEMA = Schema((FeatureSpec("state", "float32", (6,)),), FeatureSpec("action", "float32", (3,)))
TASKS = ("reach the goal",)
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


def act_with_frozen_encoder() -> FleetPolicy:
    """A real LeRobot ACT policy whose transformer encoder is frozen (not trainable)."""
    policy = build_policy(SMALL, SCHEMA, TASKS, seed=0)
    for p in policy.model.model.encoder.parameters():
        p.requires_grad_(False)
    return policy


def update(policy: FleetPolicy, seed: int, changed_fraction: float = 0.3) -> None:
    """An optimizer-like step: small moves of some trainable weights (frozen ones never change)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            mask = torch.rand(p.shape, generator=gen) < changed_fraction
            p.add_(mask * torch.randn(p.shape, generator=gen) * 1e-3)


def build(manifest, tensors) -> FleetPolicy:
    return FleetPolicy.from_manifest(manifest.config, tensors, version=manifest.version)


def make_updater(robot_id: str, target: str, tmp_path: Path, have_version: int = 0, store: PolicyStore | None = None,
                 initial=None) -> Updater:
    last_good = LastGood(tmp_path / robot_id / "policy")
    if have_version:  # this edge already has that version on disk (e.g. it ran it before a restart)
        last_good.save(store.manifest(have_version), store.tensors(have_version))
    slot = PolicySlot(initial or NullPolicy(SCHEMA.action.shape))
    return Updater(robot_id, FleetClient(target), slot, build, last_good, SCHEMA, TASKS[0],
                   have_version=have_version)


def assert_holds(updater: Updater, store: PolicyStore, version: int) -> None:
    """Bit-identical to the store: the raw bytes the edge holds and the weights of the policy it offered."""
    assert updater.have_version == version and updater.held.manifest.version == version
    expected = store.payload(version)
    assert set(updater.held.payload) == set(expected)
    for name, data in expected.items():
        assert bytes(updater.held.payload[name]) == bytes(data), name
    policy = updater.slot.current if updater.slot.current.version == version else None
    if policy is None:
        assert updater.slot.swap_if_pending() and updater.slot.current.version == version
        policy = updater.slot.current
    for name, t in store.tensors(version).items():
        assert torch.equal(policy.tensors()[name], t), name


def pieces(transfer) -> list[pb.TensorPiece]:
    return [m.piece for m in map(pb.PolicyUpdate.FromString, messages(transfer)) if m.WhichOneof("part") == "piece"]


def test_deltas_carry_only_changed_trainable_tensors_and_keyframes_go_raw(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "store")
    publisher = Publisher(store, every_steps=1, full_every_versions=3)
    policy = act_with_frozen_encoder()
    frozen = {n for n in policy.tensors() if n not in policy.trainable_names()}
    assert any(".encoder." in n for n in frozen)
    for step in range(1, 5):
        update(policy, seed=step)
        publisher.publish(policy, step)
    manifests = [store.manifest(v) for v in store.versions()]
    assert [m.keyframe_version for m in manifests] == [1, 1, 1, 4]
    assert [m.parent_version for m in manifests] == [0, 1, 2, 3]
    assert {t.name for t in manifests[-1].tensors if not t.trainable} == frozen

    full = encode_transfer(store, 3)
    assert full.kind == "full" and full.payload_bytes == full.full_bytes
    assert {p.encoding for p in pieces(full)} == {delta.RAW}
    delta_2_3 = encode_transfer(store, 3, base_version=2)
    sent = {p.name for p in pieces(delta_2_3)}
    assert sent and not sent & frozen
    assert {p.encoding for p in pieces(delta_2_3)} <= {delta.DIFF, delta.SPARSE}
    assert delta_2_3.payload_bytes < 0.5 * sum(t.nbytes for t in manifests[2].tensors if t.trainable)
    to_keyframe = encode_transfer(store, 4, base_version=3)  # v4 starts a new keyframe: raw, frozen still skipped
    assert {p.encoding for p in pieces(to_keyframe)} == {delta.RAW} and not {p.name for p in pieces(to_keyframe)} & frozen
    assert all(len(p.data) <= 1 << 20 for p in pieces(full))
    assert encode_transfer(store, 4, base_version=99).kind == "full"  # unknown base: full


def test_a_transfer_streams_while_it_is_encoded_with_one_wake_up_pending_at_most() -> None:
    """Readers stream every part, in order, while an encoder thread appends them (here faster than the loop
    takes them, then slower); the encoder never has more than one wake-up queued on the loop."""
    from cloud.gateway.policy_feed import Transfer

    async def main() -> tuple[list[bytes], list[bytes], int]:
        loop = asyncio.get_running_loop()
        transfer, wakes = Transfer(2, 0), 0
        wake_readers = transfer.wake_readers

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            wake_readers()

        transfer.wake_readers = counted
        release = threading.Event()

        def parts():
            for i in range(500):
                if i == 400:
                    release.wait(30)  # the readers have caught up and wait for more
                elif i > 400:
                    time.sleep(0.001)
                yield b"%d" % i

        async def read() -> list[bytes]:
            got = []
            async for message in transfer.stream():
                got.append(message)
                if len(got) == 400:
                    loop.call_later(0.05, release.set)
            return got

        encoder = asyncio.ensure_future(asyncio.to_thread(transfer.fill, parts(), loop))
        first, second = await asyncio.wait_for(asyncio.gather(read(), read()), 60)
        await encoder
        return first, second, wakes

    first, second, wakes = asyncio.run(main())
    assert first == second == [b"%d" % i for i in range(500)]
    assert 2 <= wakes < 250  # the first 400 parts came at once: a few wake-ups, not one per part


def test_publish_cadence_by_steps_and_by_seconds(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "store")
    policy = act_with_frozen_encoder()
    by_steps = Publisher(store, every_steps=3)
    assert not by_steps.due(2) and by_steps.due(3)
    by_time = Publisher(store, every_steps=0, every_s=1e-9)
    assert by_time.due(1)
    by_time.publish(policy, step=1)
    assert not by_time.due(1)  # time is up, but nothing trained since: no identical version
    assert by_time.due(2) and policy.version == store.latest_version() == 1
    with pytest.raises(ValueError, match=r"full_every_versions \(-1\) must be >= 0"):
        Publisher(store, every_steps=1, full_every_versions=-1)


@pytest.mark.timeout(90)
def test_round_trip_through_deltas_and_through_full_transfer(gateway, redis_client, tmp_path: Path) -> None:
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1, full_every_versions=0)
    policy = act_with_frozen_encoder()
    follower = make_updater("follower", gateway.target, tmp_path)
    follower.start()
    try:
        for step in range(1, 5):
            update(policy, seed=step)
            version = publisher.publish(policy, step).version
            assert follower.wait_version(version, timeout_s=30)
            assert follower.last_transfer.base_version == (0 if step == 1 else version - 1)
        assert follower.last_transfer.payload_bytes < 0.5 * follower.last_transfer.full_bytes
        late = make_updater("late", gateway.target, tmp_path)
        late.start()
        try:
            assert late.wait_version(version, timeout_s=30)
            assert late.last_transfer.base_version == 0 and late.last_transfer.payload_bytes == store.manifest(
                version).total_bytes
            assert_holds(late, store, version)
        finally:
            late.stop()
        assert_holds(follower, store, version)
        status = redis_client.hgetall("fleet:{r:follower}:status")
        assert int(status[b"policy_delivered_version"]) == version
        assert REGISTRY.get_sample_value("fleet_gateway_policy_lag_versions", {"robot": "follower"}) == 0
        assert follower.rejected == 0
    finally:
        follower.stop()


class TamperingProxy:
    """A gRPC proxy for WatchPolicy that, while armed, corrupts (or cuts off) the next transfer's first piece."""

    def __init__(self, upstream: str, mode: str):
        self.mode = mode
        self.armed = threading.Event()
        self.tampered = threading.Event()
        self._channel = grpc.insecure_channel(upstream)
        self._watch = self._channel.unary_stream("/fleet.v1.FleetService/WatchPolicy")  # raw bytes both ways
        self.server, self.target = serve_watch_policy(self._relay)

    def _relay(self, request: bytes, context):
        call = self._watch(request)
        context.add_callback(call.cancel)
        try:
            yield from self._tamper(call)
        except grpc.RpcError:  # the edge or the gateway went away: end this relay quietly
            return

    def _tamper(self, call):
        for raw in call:
            msg = pb.PolicyUpdate.FromString(raw)
            if self.armed.is_set() and msg.WhichOneof("part") == "piece":
                self.armed.clear()
                self.tampered.set()
                if self.mode == "truncate":
                    return  # the stream ends cleanly in the middle of the transfer
                data = bytearray(msg.piece.data)
                data[len(data) // 2] ^= 0x5A
                msg.piece.data = bytes(data)
                raw = msg.SerializeToString()
            yield raw

    def stop(self) -> None:
        self.server.stop(0)
        self._channel.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_tampered_transfer_is_rejected_old_policy_kept_and_retried(gateway, redis_client, tmp_path: Path,
                                                                   mode: str) -> None:
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1)
    policy = act_with_frozen_encoder()
    proxy = TamperingProxy(gateway.target, mode)
    edge = make_updater("edge", proxy.target, tmp_path)
    edge.start()
    try:
        update(policy, seed=1)
        assert edge.wait_version(publisher.publish(policy, 1).version, timeout_s=30)
        assert edge.slot.swap_if_pending() and edge.slot.current.version == 1
        proxy.armed.set()
        update(policy, seed=2)
        v2 = publisher.publish(policy, 2).version
        assert edge.wait(lambda u: u.rejected >= 1, timeout_s=30)
        assert proxy.tampered.is_set()
        # the broken delta never reached the slot: v1 keeps acting, nothing pending
        assert edge.slot.current.version == 1 and edge.slot.pending_version in (None, v2)
        assert edge.wait_version(v2, timeout_s=30)  # retried, as a full transfer
        assert edge.last_transfer.base_version == 0
        assert edge.rejected == 1
        assert_holds(edge, store, v2)
        assert LastGood(tmp_path / "edge" / "policy").version() == v2
    finally:
        edge.stop()
        proxy.stop()


@pytest.mark.timeout(90)
def test_edges_at_different_versions_get_their_own_transfer_concurrently(gateway, redis_client,
                                                                          tmp_path: Path) -> None:
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1, full_every_versions=0)
    policy = act_with_frozen_encoder()
    for step in range(1, 4):
        update(policy, seed=step)
        publisher.publish(policy, step)
    bases = {"r0": 0, "r1": 1, "r2": 2, "r1b": 1}
    edges = {rid: make_updater(rid, gateway.target, tmp_path, have, store) for rid, have in bases.items()}
    update(policy, seed=4)
    latest = publisher.publish(policy, 4).version
    feed = gateway.gw.feed
    for edge in edges.values():
        edge.start()
    manifest = store.manifest(latest)
    deltas_from = {manifest.parent_version, manifest.keyframe_version} - {0}
    assert deltas_from == {1, 3}, deltas_from  # v4's keyframe is v1 (no full version since), its parent v3
    try:
        for rid, edge in edges.items():
            assert edge.wait_version(latest, timeout_s=60), rid
            # a delta from the keyframe (v1); v2 is neither parent nor keyframe: full weights
            assert edge.last_transfer.base_version == (bases[rid] if bases[rid] in deltas_from else 0), rid
            assert_holds(edge, store, latest)
        received = {rid: e.last_transfer.payload_bytes for rid, e in edges.items()}
        assert received["r0"] == received["r2"] == manifest.total_bytes
        assert received["r1"] == received["r1b"] < received["r0"]
        # each transfer encoded once: full (r0 and r2), v1->v4 (r1 and r1b), and v3->v4 built ahead
        assert {key for key in feed.encodings if key[1] == latest} == {(0, 4), (1, 4), (3, 4)}
        assert set(feed.encodings.values()) == {1}
    finally:
        for edge in edges.values():
            edge.stop()


@pytest.mark.timeout(90)
def test_unusable_version_is_refused_reported_and_skipped(gateway, redis_client, tmp_path: Path) -> None:
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1)
    policy = act_with_frozen_encoder()
    edge = make_updater("edge", gateway.target, tmp_path)
    edge.start()
    try:
        assert edge.wait_version(publisher.publish(policy, 1).version, timeout_s=30)
        assert edge.slot.swap_if_pending()
        with torch.no_grad():
            policy.model.model.action_head.bias.fill_(float("nan"))
        bad = publisher.publish(policy, 2).version
        assert edge.wait(lambda u: u.refused_version == bad, timeout_s=30)
        assert edge.have_version == 1 and edge.slot.current.version == 1 and edge.slot.pending_version is None
        with torch.no_grad():
            policy.model.model.action_head.bias.zero_()
        good = publisher.publish(policy, 3).version
        assert edge.wait_version(good, timeout_s=30)
        assert edge.last_transfer.base_version == 1  # the delta is against what the edge holds, not the refused one
        assert_holds(edge, store, good)
        status = redis_client.hgetall("fleet:{r:edge}:status")
        assert int(status[b"policy_refused_version"]) == bad
        assert int(status[b"policy_delivered_version"]) == good
        # the control loop rolls the new one back (e.g. NaN actions on real inputs): refused, disk reverted
        edge.slot.rollback("NaN actions")
        assert edge.wait(lambda u: u.refused_version == good, timeout_s=30)
        assert LastGood(tmp_path / "edge" / "policy").version() == 1
    finally:
        edge.stop()


@pytest.mark.timeout(120)
def test_smolvla_publish_stream_verify_swap(gateway, redis_client, tmp_path: Path) -> None:
    """SmolVLA (LeRobot) on a tiny local SmolVLM2 config (random weights, no hub) with its VLM frozen."""
    schema = Schema((FeatureSpec("state", "float32", (4,)), FeatureSpec("top", "uint8", (32, 32, 3), True)),
                    FeatureSpec("action", "float32", (4,)))
    vla = build_policy(PolicyConfig(type="smolvla", chunk_size=4, n_action_steps=4, freeze_backbone=True),
                       schema, TASKS, seed=0)
    frozen = {n for n in vla.tensors() if n not in vla.trainable_names()}
    assert any("vlm" in n for n in frozen)
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1)
    slot = PolicySlot(NullPolicy(schema.action.shape))
    edge = Updater("vla", FleetClient(gateway.target), slot, build, LastGood(tmp_path / "vla"), schema, TASKS[0])
    edge.start()
    try:
        v1 = publisher.publish(vla, 1).version
        assert edge.wait_version(v1, timeout_s=60)
        assert slot.swap_if_pending() and slot.current.version == v1
        obs = {"state": np.zeros(4, np.float32), "top": np.zeros((32, 32, 3), np.uint8)}
        assert np.isfinite(slot.current.select_action(obs, TASKS[0])).all()
        update(vla, seed=5, changed_fraction=0.05)
        v2 = publisher.publish(vla, 2).version
        assert edge.wait_version(v2, timeout_s=60)
        stats = edge.last_transfer
        frozen_bytes = sum(t.nbytes for t in store.manifest(v2).tensors if not t.trainable)
        assert stats.base_version == v1 and stats.payload_bytes < 0.2 * (stats.full_bytes - frozen_bytes)
        for name, t in store.tensors(v2).items():
            assert bytes(edge.held.payload[name]) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert slot.swap_if_pending() and slot.current.version == v2
    finally:
        edge.stop()


@pytest.mark.timeout(90)
def test_deltas_only_from_the_parent_or_keyframe_however_many_bases_edges_ask_for(gateway, redis_client):
    """Edges holding 5 different old versions of v6: the gateway encodes the parent's delta and one full
    transfer, not one delta per base (each cached delta costs CPU and RAM)."""
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1)
    policy = act_with_frozen_encoder()
    for step in range(1, 7):
        update(policy, seed=step)
        publisher.publish(policy, step)
    feed = gateway.gw.feed
    wait_until(lambda: feed.latest == 6, 30, "the gateway to hear of v6")  # pub/sub: it may lag the publish
    client = FleetClient(gateway.target, rpc_timeout_s=10.0)
    try:
        manifest = store.manifest(6)
        bases = {manifest.parent_version, manifest.keyframe_version}
        assert 5 in bases and len(bases - {0}) <= 2
        for have in (1, 2, 3, 4, 5):
            events = client.watch_policy(f"edge-{have}", have)
            header = next(events)
            assert header.version == 6
            assert header.base_version == (have if have in bases else 0), (have, header.base_version)
            events.cancel()
        assert {base for base, version in feed.encodings if version == 6} <= bases | {0}
        assert len([key for key in feed.encodings if key[1] == 6]) <= 3  # not one per base asked for
    finally:
        client.close()
