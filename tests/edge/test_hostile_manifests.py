"""Manifest lies must not exhaust the robot: a real gRPC server on loopback plays a hostile gateway and
streams crafted transfers to the edge's real Updater (real LeRobot ACT policies, real torch).

* a manifest claiming gigabytes, followed by one 1-byte piece, allocates nothing (memory grows with the
  bytes received; the version is refused by the local memory bound before a piece is kept);
* an ``nbytes`` that disagrees with dtype x shape is a malformed manifest;
* a few-KB transfer whose config claims a 2048-wide, 65536-feedforward model is refused before the model
  is built (the config's model is built on the meta device and compared with the tensors);
* once a version is accepted its architecture is pinned: a version with another shape is refused,
  counted and logged, the gateway is told, and the robot keeps acting with its current policy.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
from pathlib import Path

import psutil
import pytest
from prometheus_client import REGISTRY

from cloud.policy_store import PolicyStore
from edge.admission import ARCHITECTURE_FILE, Admission
from edge.client import FleetClient
from edge.hotswap import PolicySlot
from edge.updater import Assembler, LastGood, Updater
from fleet.errors import IntegrityError, PolicyRefused
from fleet.policies import FleetPolicy, PolicyConfig, build_policy
from fleet.policies.base import NullPolicy
from fleet.types import FeatureSpec, Schema
from fleet.v1 import fleet_pb2 as pb
from tests.conftest import serve_watch_policy
from tests.transfers import encode_transfer, messages

SCHEMA = Schema((FeatureSpec("state", "float32", (6,)),), FeatureSpec("action", "float32", (3,)))
TASKS = ("reach the goal",)
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)
MiB = 1 << 20


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def msg(**part) -> bytes:
    return pb.PolicyUpdate(**part).SerializeToString()


class HostileGateway:
    """WatchPolicy on a real gRPC server: each watch gets every scripted transfer newer than what the edge holds
    and did not refuse, then the stream stays open (as the real gateway's) until the edge cancels it."""

    def __init__(self):
        self.transfers: dict[int, list[bytes]] = {0: []}
        self.requests: list[pb.WatchPolicyRequest] = []
        self.cond = threading.Condition()
        self._closed = threading.Event()
        self.server, self.target = serve_watch_policy(self._watch)

    def _watch(self, request: bytes, context):
        req = pb.WatchPolicyRequest.FromString(request)
        ended = threading.Event()

        def on_end() -> None:
            with self.cond:
                ended.set()
                self.cond.notify_all()

        context.add_callback(on_end)
        sent = max(req.have_version, req.rejected_version)
        with self.cond:
            self.requests.append(req)
            self.cond.notify_all()
        while True:
            with self.cond:
                self.cond.wait_for(lambda: ended.is_set() or self._closed.is_set() or max(self.transfers) > sent)
                if ended.is_set() or self._closed.is_set():
                    return
                version = min(v for v in self.transfers if v > sent)
                messages = self.transfers[version]
            yield from messages
            sent = version

    def publish(self, version: int, messages: list[bytes]) -> None:
        with self.cond:
            self.transfers[version] = messages
            self.cond.notify_all()

    def wait_request(self, predicate, timeout_s: float = 20) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(predicate(r) for r in self.requests), timeout_s)

    def stop(self) -> None:
        with self.cond:
            self._closed.set()
            self.cond.notify_all()
        self.server.stop(0)


@pytest.fixture
def hostile():
    server = HostileGateway()
    yield server
    server.stop()


def published(tmp_path: Path, config: PolicyConfig, version_name: str) -> tuple[PolicyStore, list[bytes]]:
    """A real ACT policy published into a store, and its full transfer as the gateway encodes it."""
    store = PolicyStore(tmp_path / version_name)
    store.publish(build_policy(config, SCHEMA, TASKS, seed=0).tensors(),
                  build_policy(config, SCHEMA, TASKS, seed=0).manifest_config())
    return store, messages(encode_transfer(store, 1))


def relabel(messages: list[bytes], version: int, edit_config=None) -> list[bytes]:
    """The same transfer as version ``version`` (and with its policy config edited): the manifest's checksum
    covers tensors only, so a hostile gateway can change the config freely."""
    out = []
    for raw in messages:
        m = pb.PolicyUpdate.FromString(raw)
        if m.WhichOneof("part") == "header":
            manifest = json.loads(m.header.manifest_json)
            manifest["version"], manifest["parent_version"] = version, 0
            if edit_config is not None:
                edit_config(manifest["config"])
            m.header.version, m.header.manifest_json = version, json.dumps(manifest)
        out.append(m.SerializeToString())
    return out


def build(manifest, tensors) -> FleetPolicy:
    return FleetPolicy.from_manifest(manifest.config, tensors, version=manifest.version)


def updater(target: str, tmp_path: Path, max_bytes: int = 64 * MiB, robot: str = "victim") -> Updater:
    slot = PolicySlot(NullPolicy(SCHEMA.action.shape))
    return Updater(robot, FleetClient(target), slot, build, LastGood(tmp_path / robot / "policy"), SCHEMA,
                   TASKS[0], admission=Admission(max_bytes, tmp_path / robot))


def rejected(robot: str, reason: str) -> float:
    return REGISTRY.get_sample_value("fleet_edge_policy_rejected_total", {"robot": robot, "reason": reason}) or 0.0


def huge_manifest(version: int, nbytes_lie: int | None = None) -> str:
    shape = [1 << 30]  # float32: 4 GiB
    return json.dumps({"version": version, "parent_version": 0, "total_sha256": "0" * 64, "config": {},
                       "tensors": [{"name": "w", "dtype": "float32", "shape": shape, "sha256": "0" * 64,
                                    "nbytes": nbytes_lie if nbytes_lie is not None else 4 * shape[0]}]})


@pytest.mark.timeout(30)
def test_gigabyte_claim_with_a_one_byte_piece_allocates_nothing(hostile, tmp_path: Path) -> None:
    hostile.transfers[1] = [msg(header=pb.PolicyHeader(version=1, manifest_json=huge_manifest(1), payload_bytes=1)),
                            msg(piece=pb.TensorPiece(name="w", offset=0, data=b"x", encoding="raw"))]
    edge = updater(hostile.target, tmp_path)
    before = rss()
    edge.start()
    try:
        assert edge.wait(lambda u: u.refused_version == 1, timeout_s=20)
        assert rss() - before < 200 * MiB  # it was 6 GB (bytearray(nbytes) on the first piece)
        assert edge.have_version == 0 and edge.slot.pending_version is None
        assert rejected("victim", "too_large") == 1
        assert hostile.wait_request(lambda r: r.rejected_version == 1)  # the gateway is told: not sent again
    finally:
        edge.stop()
    # without any admission (a robot with a huge limit) the claim still costs nothing: memory follows the data
    assembler = Assembler(FleetClient.policy_event(pb.PolicyUpdate.FromString(hostile.transfers[1][0])), None)
    before = rss()
    assembler.add(FleetClient.policy_event(pb.PolicyUpdate.FromString(hostile.transfers[1][1])))
    assert rss() - before < 64 * MiB
    with pytest.raises(IntegrityError, match="out of order"):
        assembler.add(FleetClient.policy_event(msg_piece("w", 1 << 29, b"y")))
    with pytest.raises(IntegrityError, match="malformed policy manifest: tensor 'w': nbytes 8 != float32"):
        Assembler(FleetClient.policy_event(pb.PolicyUpdate.FromString(
            msg(header=pb.PolicyHeader(version=2, manifest_json=huge_manifest(2, nbytes_lie=8))))), None)


def msg_piece(name: str, offset: int, data: bytes) -> pb.PolicyUpdate:
    return pb.PolicyUpdate(piece=pb.TensorPiece(name=name, offset=offset, data=data, encoding="raw"))


@pytest.mark.timeout(60)
def test_config_claiming_a_huge_model_is_refused_before_building(hostile, tmp_path: Path) -> None:
    _, small = published(tmp_path, SMALL, "small")

    def enlarge(config: dict) -> None:
        for section in ("policy_config", "lerobot_config"):
            config[section].update(dim_model=2048, dim_feedforward=65536)

    hostile.transfers[1] = relabel(small, 1, enlarge)  # ~100 KB on the wire
    edge = updater(hostile.target, tmp_path)
    before = rss()
    edge.start()
    try:
        assert edge.wait(lambda u: u.refused_version == 1, timeout_s=30)
        assert rss() - before < 300 * MiB  # it was ~5.5 GB: the model was built before its tensors were compared
        assert edge.have_version == 0 and rejected("victim", "unusable") == 1
        assert not (tmp_path / "victim" / ARCHITECTURE_FILE).exists()  # nothing refused is pinned
    finally:
        edge.stop()


@pytest.mark.timeout(60)
def test_pinned_architecture_refuses_another_shape_and_keeps_the_current_policy(hostile, tmp_path: Path,
                                                                                caplog) -> None:
    _, small = published(tmp_path, SMALL, "small")
    _, wider = published(tmp_path, dataclasses.replace(SMALL, dim_model=64, dim_feedforward=128), "wider")
    hostile.transfers[1] = relabel(small, 1)
    edge = updater(hostile.target, tmp_path, robot="pinned")
    edge.start()
    try:
        assert edge.wait_version(1, timeout_s=30)
        assert edge.slot.swap_if_pending() and edge.slot.current.version == 1
        pin = json.loads((tmp_path / "pinned" / ARCHITECTURE_FILE).read_text())
        assert pin["policy_type"] == "act" and len(pin["tensors"]) == len(edge.held.manifest.tensors)
        hostile.publish(2, relabel(wider, 2))  # a valid, well-formed version with another model shape
        assert edge.wait(lambda u: u.refused_version == 2, timeout_s=30)
        assert edge.have_version == 1 and edge.slot.pending_version is None
        assert rejected("pinned", "architecture") == 1
        assert "another architecture than the one pinned" in caplog.text
        assert hostile.wait_request(lambda r: r.rejected_version == 2 and r.have_version == 1)
    finally:
        edge.stop()


def test_local_pin_file_decides_and_the_memory_bound_is_checked(tmp_path: Path) -> None:
    store, _ = published(tmp_path, SMALL, "small")
    manifest = store.manifest(1)
    tight = Admission(manifest.total_bytes - 1, tmp_path / "a")
    with pytest.raises(PolicyRefused, match="more than this robot's policy_max_bytes") as info:
        tight.check(manifest)
    assert info.value.reason == "too_large"
    robot = Admission(64 * MiB, tmp_path / "b")
    robot.check(manifest)  # nothing pinned yet
    robot.accepted(manifest)
    pin_file = tmp_path / "b" / ARCHITECTURE_FILE
    other_shape = json.loads(pin_file.read_text())
    other_shape["tensors"][0][2] = [999]
    local = tmp_path / "local-pin.json"
    local.write_text(json.dumps(other_shape))
    configured = Admission(64 * MiB, tmp_path / "c", pin_file=str(local))
    with pytest.raises(PolicyRefused, match="tensor .*-> \\[") as info:
        configured.check(manifest)
    assert info.value.reason == "architecture"
    configured.accepted(manifest)  # a configured pin is never rewritten
    assert json.loads(local.read_text()) == other_shape
