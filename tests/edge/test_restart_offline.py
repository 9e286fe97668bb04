"""An edge restarted while the cloud is down acts with its last good policy from local disk
(checksums verified), spools what it does, and takes the next version once the cloud is back."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from cloud.buffer import ROBOTS_KEY
from cloud.policy_store import PolicyStore
from edge.agent import EdgeAgent, EdgeConfig
from edge.loop import LoopConfig
from edge.sim.metaworld import SCHEMA, MetaWorldRobot
from edge.updater import LastGood
from fleet.gateway_config import GatewayConfig
from fleet.policies import PolicyConfig, build_policy
from fleet.redis_server import free_port
from fleet.weights import build_manifest
from tests.conftest import GatewayThread

TASKS = ("reach the goal", "press the button from the top")
SMALL = PolicyConfig(chunk_size=5, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


def small_policy():
    return build_policy(SMALL, SCHEMA, MetaWorldRobot(tasks=TASKS).tasks, seed=0)


def save_last_good(state_dir: Path, version: int) -> LastGood:
    """What the updater leaves on disk after verifying ``version``."""
    policy = small_policy()
    tensors = policy.tensors()
    manifest, _ = build_manifest(version, version - 1, tensors, policy.manifest_config(), policy.trainable_names(),
                                 created_s=time.time())
    last_good = LastGood(state_dir / "policy")
    last_good.save(manifest, tensors)
    return last_good


def spooled_versions(agent: EdgeAgent) -> set[int]:
    versions, seq = set(), 0
    while (batch := agent.spool.read_after(seq)) is not None:
        versions |= {s.policy_version for s in agent.spool.steps(batch)}
        seq = batch.last_seq
    return versions


@pytest.mark.timeout(120)
def test_edge_restarted_with_cloud_down_runs_last_good_then_updates(redis_proc, redis_client, tmp_path):
    state_dir = tmp_path / "edge"
    save_last_good(state_dir, version=7)
    port = free_port()  # nothing listens here yet: the cloud is down
    agent = EdgeAgent(EdgeConfig(robot_id="r0", gateway=f"127.0.0.1:{port}", tasks=TASKS, state_dir=str(state_dir),
                                 loop=LoopConfig(control_hz=200.0, max_episode_steps=10, eval_every=0), heartbeat_interval_s=0.5,
                                 first_policy_timeout_s=1.0))
    stop = threading.Event()
    gateway = None
    try:
        agent.start(stop)  # would wait for a first policy (and time out after 1 s) without the one on disk
        assert agent.slot.current.version == 7
        assert agent.loop.wait_episodes(2, timeout_s=60)
        assert agent.streamer.acked_seq == 0 and not agent.streamer.connected.is_set()
        assert spooled_versions(agent) == {7}

        # The cloud comes back with a newer version: the edge takes it and its spool drains.
        policy_dir = tmp_path / "policies"
        store = PolicyStore(policy_dir, redis_client)
        store.ensure_above(7)
        policy = small_policy()
        assert store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names()).version == 8
        gateway = GatewayThread(GatewayConfig(listen=f"127.0.0.1:{port}", redis_url=redis_proc.url,
                                              policy_dir=str(policy_dir)))
        assert agent.updater.wait_version(8, timeout_s=60)
        assert agent.slot.swapped.wait(60) and agent.slot.current.version == 8
        recorded = agent.loop.stats().steps
        assert agent.streamer.wait_acked(recorded, timeout_s=60)
        registered = json.loads(redis_client.hget(ROBOTS_KEY, "r0"))
        assert registered["control_hz"] == 200.0  # the edge registers its control rate (an export's fps)
    finally:
        stop.set()
        agent.stop()
        if gateway is not None:
            gateway.stop()


def test_tampered_last_good_policy_is_refused(tmp_path, caplog):
    last_good = save_last_good(tmp_path, version=3)
    model = tmp_path / "policy" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edge.updater"):
        assert last_good.load() is None
    assert "unusable" in caplog.text
