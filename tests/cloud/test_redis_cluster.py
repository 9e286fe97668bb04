"""The buffer on a real 3-master Redis Cluster (three redis-server processes, AOF on): every
atomic write stays in one slot, ingest through a real gateway is exactly-once, the sampler's
pipelines and the trainer work across nodes, and policy pub/sub reaches the gateway."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import torch

from cloud.buffer import ROBOTS_KEY, ChunkWrite, RobotKeys
from cloud.policy_store import PolicyStore
from cloud.sampler import Sampler
from cloud.trainer import Trainer
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from cloud.buffer.reader import BufferReader
from cloud.trainer_config import TrainerConfig
from fleet.gateway_config import GatewayConfig
from fleet.convert import chunk_to_pb
from fleet.policies import PolicyConfig
from fleet.redis_client import connect, connect_async, is_cluster
from fleet.redis_server import start_redis_cluster
from fleet.types import Chunk, FeatureSpec, RobotInfo, Schema, Step
from tests.conftest import GatewayThread

pytestmark = pytest.mark.timeout(120)

SCHEMA = Schema((FeatureSpec("state", "float32", (4,)),), FeatureSpec("action", "float32", (2,)))
TASK = "reach the goal"
ROBOTS = [f"r{i}" for i in range(6)]
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=16, n_heads=2, dim_feedforward=32,
                     n_encoder_layers=1, n_decoder_layers=1)


def steps(first_seq: int, n: int) -> list[Step]:
    return [Step(seq=first_seq + i, index=first_seq + i - 1,
                 observation={"state": np.full(4, first_seq + i, np.float32)},
                 policy_action=np.zeros(2, np.float32), action=np.full(2, first_seq + i, np.float32),
                 is_intervention=True, reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0)
            for i in range(n)]


def send(client: FleetClient, *chunks: Chunk) -> list[tuple[int, int]]:
    call = client.stream_experience(iter([chunk_to_pb(c, SCHEMA) for c in chunks]))
    return [(a.acked_seq, a.duplicate_steps) for a in call]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    proc = start_redis_cluster(tmp_path_factory.mktemp("cluster"), masters=3)
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def cluster_client(cluster):
    client = connect(cluster.url)
    yield client
    client.close()


def test_every_atomic_write_stays_in_one_slot_and_robots_spread(cluster, cluster_client):
    assert is_cluster(cluster.url)
    nodes = set()
    for rid in ROBOTS:
        write = ChunkWrite(rid, "e1", TASK, 1, 1, b"x", [(0, 1)], 1)
        keys, _ = write.keys_and_args(0.0)
        assert len({cluster_client.keyslot(k) for k in keys}) == 1, keys
        nodes.add(cluster_client.get_node_from_key(keys[0]).port)
    assert len(nodes) >= 2, "robots should land on several masters for this test to mean anything"


def test_ingest_exactly_once_sampling_trainer_and_pubsub_on_cluster(cluster, cluster_client, tmp_path):
    policy_dir = str(tmp_path / "policies")
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=cluster.url, policy_dir=policy_dir))
    client = FleetClient(gw.target)
    try:
        for rid in ROBOTS:
            assert client.register(RobotInfo(rid, "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION)).last_acked_seq == 0
            assert send(client, Chunk(rid, "e1", TASK, steps(1, 5))) == [(5, 0)]
            # A reconnecting edge resends overlapping chunks: nothing is stored twice.
            assert send(client, Chunk(rid, "e1", TASK, steps(1, 5)), Chunk(rid, "e1", TASK, steps(4, 4))) \
                == [(5, 5), (7, 2)]
            # A gap is refused with the last acked seq, unless the edge declares its spool dropped steps.
            with pytest.raises(grpc.RpcError) as err:
                send(client, Chunk(rid, "e1", TASK, steps(10, 2)))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert dict(err.value.trailing_metadata())["fleet-last-acked-seq"] == "7"
            assert send(client, Chunk(rid, "e1", TASK, steps(10, 2), gap_declared=True)) == [(11, 0)]
        for rid in ROBOTS:
            keys = RobotKeys(rid)
            stored = [s.seq for s in BufferReader(cluster_client).steps(rid, "e1", SCHEMA)]
            assert stored == [1, 2, 3, 4, 5, 6, 7, 10, 11]
            assert int(cluster_client.get(keys.seq)) == 11
            assert int(cluster_client.hget(keys.stats, "dropped_steps")) == 2
        assert set(k.decode() for k in cluster_client.hkeys(ROBOTS_KEY)) == set(ROBOTS)

        # Sampling: one pipeline of LRANGEs over robots on different masters.
        sampler = Sampler(cluster_client, (TASK,), horizon=3, batch_size=32, online_fraction=1.0, seed=0)
        assert sampler.refresh() == 9 * len(ROBOTS)
        batch = sampler.sample()
        assert batch["obs/state"].shape == (32, 4) and batch["action"].shape == (32, 3, 2)
        # Each window starts at its observation's step: action[0] == state (both carry the seq).
        np.testing.assert_array_equal(batch["action"][:, 0, 0], batch["obs/state"][:, 0])

        # The trainer runs unchanged on the cluster and publishes; the gateway's feed hears of it.
        trainer = Trainer(TrainerConfig(redis_url=cluster.url, policy_dir=policy_dir, tasks=(TASK,), batch_size=8,
                                        seed_bc_steps=0, min_labeled_steps=8, max_steps=3, policy=SMALL),
                          threading.Event())
        state = trainer.run()
        assert state.step == 3 and state.version >= 1
        assert int(cluster_client.hget("fleet:trainer:status", "version")) == state.version
        seen = asyncio.run_coroutine_threadsafe(gw.gw.feed.wait_newer(0, 10.0), gw.loop).result(15)
        assert seen == state.version
    finally:
        client.close()
        gw.stop()


def test_policy_pubsub_crosses_nodes(cluster, tmp_path):
    """PUBLISH on a cluster reaches subscribers connected to any node (what PolicyFeed relies on)."""

    async def roundtrip() -> bytes:
        sub = connect_async(cluster.url)
        await sub.initialize()  # the async cluster client learns the slot map lazily
        pubsub = sub.pubsub()
        await pubsub.subscribe("fleet:policy:published")
        store = PolicyStore(tmp_path / "store", connect(cluster.url))
        manifest = store.publish({"w": torch.ones(2)}, {"kind": "test"})
        msg = None
        for _ in range(50):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg is not None:
                break
        await pubsub.aclose()
        await sub.aclose()
        assert manifest.version >= 1
        return msg["data"] if msg else b""

    assert asyncio.run(roundtrip()).isdigit()
