"""Signed policies with real parts: Ed25519 publisher keys from `fleet certs`, a store that signs, the grpc.aio
gateway serving what the store holds, real edge updaters that pin the publisher's key. Each attack is a gateway
(or store) serving something the publisher did not sign; the robot refuses it before keeping a byte of its
tensors and keeps acting with the version it has."""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from cloud.policy_store import PolicyStore
from edge.client import FleetClient
from edge.hotswap import PolicySlot
from edge.updater import Assembler, LastGood, Updater
from fleet import signing
from fleet.cli import main
from fleet.errors import ConfigError, PolicyRefused
from fleet.policies import FleetPolicy
from fleet.policies.base import NullPolicy
from fleet.v1 import fleet_pb2 as pb
from tests.cloud.test_policy_distribution import SCHEMA, TASKS, act_with_frozen_encoder, assert_holds, build, update
from tests.conftest import serve_watch_policy
from tests.transfers import encode_transfer, messages


def publisher_key(root: Path) -> signing.ManifestSigner:
    signing.make_publisher_key(root)
    return signing.ManifestSigner.from_file(root / signing.PRIVATE_KEY_FILE)


def pinned(*roots: Path, previous: bool = False) -> signing.PinnedKeys:
    files = [r / signing.PUBLIC_KEY_FILE for r in roots]
    files += [r / signing.PREVIOUS_PUBLIC_KEY_FILE for r in roots] if previous else []
    return signing.PinnedKeys.from_files(files)


def rejected(robot: str) -> float:
    return REGISTRY.get_sample_value("fleet_edge_policy_rejected_total", {"robot": robot, "reason": "signature"}) or 0


def pinned_updater(robot_id: str, target: str, tmp_path: Path, keys: signing.PinnedKeys) -> Updater:
    last_good = LastGood(tmp_path / robot_id / "policy", keys)
    return Updater(robot_id, FleetClient(target), PolicySlot(NullPolicy(SCHEMA.action.shape)), build, last_good,
                   SCHEMA, TASKS[0], pinned_keys=keys)


def publish(store: PolicyStore, policy: FleetPolicy) -> int:
    manifest = store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names(),
                             parent_version=policy.version)
    policy.version = manifest.version
    return manifest.version


class Replay:
    """An attacker's "signer": copies a genuine signature onto whatever manifest it is given."""

    def __init__(self, signature: dict):
        self.signature, self.key_id = signature, signature["key_id"]

    def sign(self, manifest):
        return dataclasses.replace(manifest, signature=self.signature)


def forge(store_dir, redis, policy: FleetPolicy, signer=None) -> int:
    """What a compromised store or gateway serves: the policy with one tensor changed, every sha256 and the
    total recomputed to match, signed by ``signer`` (another key, a replayed signature) or not at all."""
    tensors = {k: v.clone() for k, v in policy.tensors().items()}
    tensors[sorted(policy.trainable_names())[0]].view(-1)[0] += 1000.0  # e.g. a huge gain on one joint
    attacker = PolicyStore(store_dir, redis, signer=signer)  # writes the store and the pointer, without the key
    return attacker.publish(tensors, policy.manifest_config(), policy.trainable_names(),
                            parent_version=policy.version).version


def test_signature_covers_the_manifest_and_nothing_else_verifies(tmp_path: Path) -> None:
    signer = publisher_key(tmp_path / "keys")
    keys = pinned(tmp_path / "keys")
    store = PolicyStore(tmp_path / "store", signer=signer)
    policy = act_with_frozen_encoder()
    publish(store, policy)
    manifest = store.manifest(1)  # as read back from disk (and as the gateway serves it)
    assert manifest.signature["key_id"] == signer.key_id == keys.key_ids[0]
    keys.verify(manifest)
    entry = manifest.tensors[0]
    for changed in (dataclasses.replace(manifest, version=2),
                    dataclasses.replace(manifest, config={**manifest.config, "tasks": ["open the door"]}),
                    dataclasses.replace(manifest, tensors=(dataclasses.replace(entry, digest="0" * 64),)
                                        + manifest.tensors[1:]),
                    dataclasses.replace(manifest, tensors=(dataclasses.replace(entry, pieces=("0" * 64,)),)
                                        + manifest.tensors[1:]),
                    dataclasses.replace(manifest, signature={**manifest.signature, "ed25519": "00" * 64}),
                    dataclasses.replace(manifest, signature={**manifest.signature, "ed25519": "not hex"}),
                    dataclasses.replace(manifest, signature={}),
                    dataclasses.replace(manifest, signature={"key_id": ["list"], "ed25519": 5})):
        with pytest.raises(PolicyRefused) as info:
            keys.verify(changed)
        assert info.value.reason == "signature"


def test_forged_header_is_refused_before_any_tensor_is_kept(tmp_path: Path) -> None:
    signer = publisher_key(tmp_path / "keys")
    keys = pinned(tmp_path / "keys")
    store = PolicyStore(tmp_path / "store", signer=signer)
    policy = act_with_frozen_encoder()
    publish(store, policy)
    Assembler(_header(store, 1), None, pinned_keys=keys)  # the genuine version passes
    forged = forge(tmp_path / "store", None, policy, Replay(store.manifest(1).signature))
    with pytest.raises(PolicyRefused, match="does not verify"):
        Assembler(_header(store, forged), None, pinned_keys=keys)


def _header(store: PolicyStore, version: int):
    first = pb.PolicyUpdate.FromString(messages(encode_transfer(store, version))[0])
    return FleetClient.policy_event(first)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["unsigned", "replayed_signature", "unpinned_key"])
def test_gateway_serving_a_forged_version_is_refused_and_the_robot_keeps_its_policy(
        gateway, redis_client, tmp_path: Path, attack: str) -> None:
    signer = publisher_key(tmp_path / "keys")
    store = PolicyStore(gateway.cfg.policy_dir, redis_client, signer=signer)
    policy = act_with_frozen_encoder()
    robot = f"edge-{attack}"
    edge = pinned_updater(robot, gateway.target, tmp_path, pinned(tmp_path / "keys"))
    edge.start()
    try:
        update(policy, seed=1)
        v1 = publish(store, policy)
        assert edge.wait_version(v1, timeout_s=30)
        assert edge.slot.swap_if_pending() and edge.slot.current.version == v1
        before = rejected(robot)
        signer = {"unsigned": None, "replayed_signature": Replay(store.manifest(v1).signature),
                  "unpinned_key": publisher_key(tmp_path / "attacker-keys")}[attack]
        forged = forge(gateway.cfg.policy_dir, redis_client, policy, signer)
        assert edge.wait(lambda u: u.rejected >= 1, timeout_s=30)
        assert rejected(robot) == before + 1
        assert edge.refused_version == forged  # the gateway is told: it sends only newer versions
        assert edge.have_version == v1 and edge.held.manifest.version == v1
        assert edge.slot.current.version == v1 and edge.slot.pending_version is None
        assert LastGood(tmp_path / robot / "policy").version() == v1
        update(policy, seed=2)  # the publisher's next version still goes through, as a delta from v1
        v3 = publish(store, policy)
        assert edge.wait_version(v3, timeout_s=30)
        assert edge.last_transfer.base_version == v1
        assert_holds(edge, store, v3)
        assert edge.rejected == 1
    finally:
        edge.stop()


@pytest.mark.timeout(120)
def test_key_rotation_both_keys_pinned_then_only_the_new_one(gateway, redis_client, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    old_signer = publisher_key(keys_dir)
    store = PolicyStore(gateway.cfg.policy_dir, redis_client, signer=old_signer)
    policy = act_with_frozen_encoder()
    assert main(["certs", "rotate-publisher-key", str(keys_dir)]) == 0
    assert stat.S_IMODE(os.stat(keys_dir / signing.PRIVATE_KEY_FILE).st_mode) == 0o600
    new_signer = signing.ManifestSigner.from_file(keys_dir / signing.PRIVATE_KEY_FILE)
    assert new_signer.key_id != old_signer.key_id
    window = pinned(keys_dir, previous=True)
    assert set(window.key_ids) == {old_signer.key_id, new_signer.key_id}

    edge = pinned_updater("rotating", gateway.target, tmp_path, window)
    edge.start()
    try:
        update(policy, seed=1)
        v1 = publish(store, policy)  # a trainer not restarted yet still signs with the old key
        assert edge.wait_version(v1, timeout_s=30)
        store.signer = new_signer
        update(policy, seed=2)
        v2 = publish(store, policy)
        assert edge.wait_version(v2, timeout_s=30)
        assert edge.rejected == 0
    finally:
        edge.stop()

    # The window closes: robots pin only publisher.pub. The last good policy (signed by the new key) still
    # loads; versions signed by the old key are refused, on disk and from the gateway.
    after = pinned(keys_dir)
    assert after.key_ids == (new_signer.key_id,)
    assert LastGood(tmp_path / "rotating" / "policy", after).load_held().manifest.version == v2
    edge = pinned_updater("rotated", gateway.target, tmp_path, after)
    edge.start()
    try:
        assert edge.wait_version(v2, timeout_s=30)
        store.signer = old_signer  # e.g. a trainer still running with the old key file
        update(policy, seed=3)
        v3 = publish(store, policy)
        assert edge.wait(lambda u: u.rejected >= 1, timeout_s=30)
        assert edge.refused_version == v3 and edge.have_version == v2
        assert rejected("rotated") == 1
    finally:
        edge.stop()


def test_last_good_policy_is_verified_again_at_start(tmp_path: Path) -> None:
    signer = publisher_key(tmp_path / "keys")
    store = PolicyStore(tmp_path / "store", signer=signer)
    policy = act_with_frozen_encoder()
    publish(store, policy)
    saved = LastGood(tmp_path / "policy")
    saved.save(store.manifest(1), store.tensors(1))
    assert '"ed25519"' in (tmp_path / "policy" / "manifest.json").read_text()  # stored with its signature
    assert LastGood(tmp_path / "policy", pinned(tmp_path / "keys")).load() is not None
    other = tmp_path / "other-keys"
    publisher_key(other)
    assert LastGood(tmp_path / "policy", pinned(other)).load() is None  # not by a pinned key: not used
    # edited on disk: a tensor and its sha256s rewritten consistently, the signature kept
    forge(tmp_path / "forged", None, policy, Replay(store.manifest(1).signature))
    forged = PolicyStore(tmp_path / "forged")
    LastGood(tmp_path / "policy").save(forged.manifest(1), forged.tensors(1))
    assert LastGood(tmp_path / "policy").load() is not None  # its checksums alone are consistent
    assert LastGood(tmp_path / "policy", pinned(tmp_path / "keys")).load() is None


def test_pinned_key_files_are_checked_at_start(tmp_path: Path) -> None:
    publisher_key(tmp_path / "keys")
    with pytest.raises(ConfigError, match="holds no PEM public key"):
        signing.PinnedKeys.from_files([tmp_path / "keys" / signing.PRIVATE_KEY_FILE])
    with pytest.raises(ConfigError, match="cannot be read"):
        signing.PinnedKeys.from_files([tmp_path / "missing.pub"])
    both = tmp_path / "bundle.pub"
    publisher_key(tmp_path / "keys2")
    both.write_bytes((tmp_path / "keys" / signing.PUBLIC_KEY_FILE).read_bytes()
                     + (tmp_path / "keys2" / signing.PUBLIC_KEY_FILE).read_bytes())
    assert len(signing.PinnedKeys.from_files([both]).key_ids) == 2
    (tmp_path / "ca.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="unreadable public key"):
        signing.PinnedKeys.from_files([tmp_path / "ca.pem"])


def test_certs_publisher_key_commands(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    assert main(["certs", "publisher-key", str(keys)]) == 0
    assert stat.S_IMODE(os.stat(keys / signing.PRIVATE_KEY_FILE).st_mode) == 0o600
    signing.ManifestSigner.from_file(keys / signing.PRIVATE_KEY_FILE)
    with pytest.raises(SystemExit) as info:  # never replaces a key: rotation is explicit
        main(["certs", "publisher-key", str(keys)])
    assert info.value.code == 2 and "rotate-publisher-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["certs", "rotate-publisher-key", str(tmp_path / "nothing")])
    assert info.value.code == 2
    os.chmod(keys / signing.PRIVATE_KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match=r"publish_key_file .*publisher.key.*chmod 600"):
        signing.ManifestSigner.from_file(keys / signing.PRIVATE_KEY_FILE)
    (tmp_path / "ec.key").write_bytes((tmp_path / "nothing").as_posix().encode())
    os.chmod(tmp_path / "ec.key", 0o600)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        signing.ManifestSigner.from_file(tmp_path / "ec.key")


def test_trainer_refuses_a_publish_key_others_can_read(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    signing.make_publisher_key(keys)
    os.chmod(keys / signing.PRIVATE_KEY_FILE, 0o640)
    with pytest.raises(SystemExit) as info:
        main(["trainer", "--redis_url", "redis://127.0.0.1:1/0", "--publish_key_file",
              str(keys / signing.PRIVATE_KEY_FILE), "--policy_dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "publisher.key" in err and "chmod 600" in err, err


class ReplayingGateway:
    """A hostile gateway: answers every WatchPolicy with one fixed, genuine (signed) transfer."""

    def __init__(self, messages: list[bytes]):
        self.messages = messages
        self.served = threading.Event()
        self.server, self.target = serve_watch_policy(self._watch)

    def _watch(self, request: bytes, context):
        yield from self.messages
        self.served.set()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.mark.timeout(60)
def test_a_replayed_older_signed_version_is_refused(tmp_path: Path) -> None:
    signer = publisher_key(tmp_path / "keys")
    keys = pinned(tmp_path / "keys")
    store = PolicyStore(tmp_path / "store", signer=signer)
    policy = act_with_frozen_encoder()
    v1 = publish(store, policy)
    update(policy, seed=2)
    v2 = publish(store, policy)
    hostile = ReplayingGateway(messages(encode_transfer(store, v1)))  # genuine v1, signature and all
    edge = pinned_updater("replayed", hostile.target, tmp_path, keys)
    edge.last_good.save(store.manifest(v2), store.tensors(v2))  # this robot already runs v2
    edge.have_version = v2
    before = REGISTRY.get_sample_value("fleet_edge_policy_rejected_total",
                                       {"robot": "replayed", "reason": "downgrade"}) or 0
    edge.start()
    try:
        assert edge.wait(lambda u: u.rejected >= 1, timeout_s=30)
        assert REGISTRY.get_sample_value("fleet_edge_policy_rejected_total",
                                         {"robot": "replayed", "reason": "downgrade"}) == before + 1
        assert edge.have_version == v2 and edge.held.manifest.version == v2
        assert edge.slot.pending_version is None and LastGood(tmp_path / "replayed" / "policy").version() == v2
    finally:
        edge.stop()
        hostile.stop()
