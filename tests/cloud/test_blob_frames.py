"""Camera frames in the blob store: one object per (chunk, camera), put before the Redis write, so an ack
means the frames are durable; an outage of the store acks nothing and a resend stores once; the sampler
reads frames back from the store; an evicted episode is dropped by the index and never crashes it."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from cloud.blobstore import open_blob_store
from cloud.buffer import RobotKeys
from cloud.buffer.reader import BufferReader
from cloud.buffer.writer import BufferWriter
from cloud.sampler import Sampler
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.columns import FRAMES_BLOB, decode_element
from fleet.gateway_config import GatewayConfig
from fleet.convert import chunk_to_pb
from fleet.types import Chunk, FeatureSpec, RobotInfo, Schema, Step
from tests.conftest import GatewayThread

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (3,)), FeatureSpec("cam", "uint8", (16, 16, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
pytestmark = pytest.mark.timeout(120)


def chunk(first_seq: int, n: int, episode: str = "e1") -> Chunk:
    steps = [Step(seq=first_seq + i, index=first_seq + i - 1, observation={"state": np.full(3, first_seq + i, np.float32)},
                  policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=True,
                  reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0,
                  images={"cam": encode_image(np.full((16, 16, 3), 10 * (first_seq + i), np.uint8), "jpeg")})
             for i in range(n)]
    return Chunk("r1", episode, TASK, steps)


def send(client: FleetClient, *chunks: Chunk) -> list[int]:
    return [a.acked_seq for a in client.stream_experience(iter([chunk_to_pb(c, SCHEMA) for c in chunks]))]


def start(redis_proc, tmp_path, blob_url: str) -> tuple[GatewayThread, FleetClient]:
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url, blob_url=blob_url,
                                     policy_dir=str(tmp_path / "policies"), retry_after_s=0.2))
    client = FleetClient(gw.target, rpc_timeout_s=10.0)
    client.register(RobotInfo("r1", "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION))
    return gw, client


def test_frames_live_in_the_blob_store_and_the_sampler_reads_them_until_evicted(redis_proc, redis_client, tmp_path):
    blobs = open_blob_store(str(tmp_path / "blobs"))
    gw, client = start(redis_proc, tmp_path, str(tmp_path / "blobs"))
    try:
        assert send(client, chunk(1, 4), chunk(5, 4)) == [4, 8]
    finally:
        client.close()
        gw.stop()
    raws = redis_client.lrange(RobotKeys("r1").episode("e1"), 0, -1)
    assert [decode_element(r, SCHEMA).frames_where for r in raws] == [FRAMES_BLOB, FRAMES_BLOB]
    assert chunk(1, 1).steps[0].images["cam"].data not in raws[0]  # no frame bytes in Redis
    assert sorted(blobs.list("frames/r1/e1/")) == [f"frames/r1/e1/{s:020d}/cam" for s in (1, 5)]
    steps = BufferReader(redis_client, blobs).steps("r1", "e1", SCHEMA)
    assert [s.images["cam"].data for s in steps] == [chunk(i, 1).steps[0].images["cam"].data for i in range(1, 9)]

    sampler = Sampler(redis_client, (TASK,), horizon=2, batch_size=16, online_fraction=1.0, blobs=blobs)
    assert sampler.refresh() == 8
    batch = sampler.sample()
    assert batch["obs/cam"].shape == (16, 16, 16, 3)
    # The frame of step t holds the value 10 * seq (JPEG: approximately).
    np.testing.assert_allclose(batch["obs/cam"][:, 0, 0, 0], 10 * (batch["t"] + 1), atol=3)

    async def evict():
        redis = aioredis.Redis.from_url(redis_proc.url)
        try:
            return await BufferWriter(redis).delete_episode("r1", "e1")
        finally:
            await redis.aclose()

    freed = asyncio.run(evict())
    assert sorted(freed.blob_keys) == sorted(blobs.list("frames/r1/e1/")) and freed.redis_bytes > 0
    assert freed.steps == 8 and not redis_client.exists(RobotKeys("r1").episode("e1"))
    blobs.delete(freed.blob_keys)
    assert list(blobs.list("frames/")) == []
    sampler.refresh()
    assert sampler.index.evicted_episodes == 1 and sampler.index.count() == 0
    with pytest.raises(LookupError):
        sampler.sample()


def test_a_blob_store_outage_acks_nothing_and_the_resend_stores_once(redis_proc, redis_client, s3_server, tmp_path):
    url = s3_server.url("fleet/frames")
    gw, client = start(redis_proc, tmp_path, url)
    try:
        assert send(client, chunk(1, 4)) == [4]
        s3_server.kill()
        with pytest.raises(grpc.RpcError) as err:
            send(client, chunk(5, 4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "fleet-retry-after-s" in dict(err.value.trailing_metadata() or ())
        assert int(redis_client.get(RobotKeys("r1").seq)) == 4  # nothing acked, nothing written
        assert BufferReader(redis_client).episode_length("r1", "e1") == 4
        s3_server.restart()
        assert send(client, chunk(5, 4)) == [8]
        assert send(client, chunk(5, 4)) == [8]  # a resend after a lost ack: stored once
    finally:
        client.close()
        gw.stop()
    blobs = open_blob_store(url)
    steps = BufferReader(redis_client, blobs).steps("r1", "e1", SCHEMA)
    assert [s.seq for s in steps] == list(range(1, 9))
    assert all(s.images["cam"].data.endswith(b"\xff\xd9") for s in steps)
