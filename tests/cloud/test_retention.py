"""Retention on a live buffer: a real gateway (blob store on disk) keeps ingesting while its retention
passes hold the buffer under a byte budget, online episodes going before intervention episodes; the
sampler's index drops what was evicted; evicted episodes can be archived to a LeRobotDataset first."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from cloud.blobstore import open_blob_store
from cloud.buffer.reader import BufferReader
from cloud.buffer.writer import BufferWriter
from cloud.retention import LeRobotArchive, Retention, tier_of
from cloud.sampler import Sampler
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.gateway_config import GatewayConfig, RetentionConfig
from fleet.convert import chunk_to_pb
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step
from tests.conftest import GatewayThread

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (3,)), FeatureSpec("cam", "uint8", (16, 16, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
STEPS = 8
pytestmark = pytest.mark.timeout(180)


def episode(robot: str, eid: str, first_seq: int, intervention: bool) -> Chunk:
    steps = [Step(seq=first_seq + i, index=i, observation={"state": np.full(3, first_seq + i, np.float32)},
                  policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=intervention,
                  reward=0.0, success=i == STEPS - 1, done=i == STEPS - 1, policy_version=1,
                  timestamp_s=time.time() + i / 10,
                  images={"cam": encode_image(np.full((16, 16, 3), 7 * i, np.uint8), "jpeg")})
             for i in range(STEPS)]
    summary = EpisodeSummary(success=True, num_steps=STEPS, intervention_steps=STEPS if intervention else 0,
                             interventions=int(intervention), evaluation=False, policy_version=1)
    return Chunk(robot, eid, TASK, steps, episode_end=summary)


def connect_robot(target: str, robot: str) -> FleetClient:
    client = FleetClient(target, rpc_timeout_s=10.0)
    client.register(RobotInfo(robot, "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION, control_hz=10.0))
    return client


def stream(client: FleetClient, chunks: list[Chunk]) -> int:
    acks = [a.acked_seq for a in client.stream_experience(iter([chunk_to_pb(c, SCHEMA) for c in chunks]))]
    return acks[-1]


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)  # another thread's passes: no event to wait on
    return value


def buffer_bytes(reader: BufferReader) -> int:
    return sum(e.redis_bytes + e.blob_bytes for e in reader.episodes())


def last_pass() -> float:
    return REGISTRY.get_sample_value("fleet_retention_last_pass_timestamp_seconds") or 0.0


def evictions(tier: str) -> float:
    return sum(REGISTRY.get_sample_value("fleet_retention_evictions_total", {"reason": r, "kind": tier}) or 0.0
               for r in ("buffer_bytes", "age", "robot_bytes", "task_bytes", "redis_bytes"))


def test_a_gateway_keeps_the_buffer_under_budget_while_robots_stream(redis_proc, redis_client, tmp_path):
    blobs = open_blob_store(str(tmp_path / "blobs"))
    reader = BufferReader(redis_client, blobs)
    # Measure one episode's bytes with retention off, then size the budget to about six episodes.
    probe = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url, blob_url=str(tmp_path / "blobs"),
                                        policy_dir=str(tmp_path / "policies")))
    client = connect_robot(probe.target, "probe")
    stream(client, [episode("probe", "probe-0", 1, False)])
    client.close()
    probe.stop()
    (one,) = reader.episodes()
    per_episode = one.redis_bytes + one.blob_bytes
    assert one.blob_bytes > 0 and one.redis_bytes > 0
    asyncio.run(_delete(redis_proc.url, "probe", "probe-0", blobs))

    budget = 6 * per_episode + per_episode // 2
    online_before = evictions("online")
    gw = GatewayThread(GatewayConfig(
        listen="127.0.0.1:0", redis_url=redis_proc.url, blob_url=str(tmp_path / "blobs"),
        policy_dir=str(tmp_path / "policies"),
        retention=RetentionConfig(max_bytes=budget, interval_s=0.05, low_watermark=0.8)))
    sampler = Sampler(redis_client, (TASK,), horizon=2, batch_size=8, online_fraction=1.0, blobs=blobs)
    try:
        clients = {r: connect_robot(gw.target, r) for r in ("r1", "r2")}
        seq = dict.fromkeys(clients, 0)
        # Two intervention episodes first (the oldest data), then online episodes keep coming.
        for r in clients:
            seq[r] = stream(clients[r], [episode(r, f"{r}-hg", seq[r] + 1, True)])
        for i in range(10):
            for r, client in clients.items():
                seq[r] = stream(client, [episode(r, f"{r}-on{i}", seq[r] + 1, False)])
            acked_at = time.time()
            wait_until(lambda: last_pass() > acked_at, 30, "a retention pass after the round")
            assert buffer_bytes(reader) <= budget, f"round {i}: over budget after a pass"
            sampler.refresh()  # the trainer samples meanwhile
        for client in clients.values():
            client.close()
    finally:
        gw.stop()

    kept = reader.episodes()
    kept_ids = {e.episode_id for e in kept}
    assert {"r1-hg", "r2-hg"} <= kept_ids, "intervention episodes went before online ones"
    assert {"r1-on9", "r2-on9"} <= kept_ids, "the newest episodes were evicted"
    assert not {"r1-on0", "r2-on0"} & kept_ids, "the oldest online episodes are still there"
    assert all(tier_of(e) == "online" for e in kept if e.episode_id not in ("r1-hg", "r2-hg"))
    assert evictions("online") - online_before >= 22 - len(kept) and evictions("intervention") == 0
    # The frame objects of evicted episodes are gone; those of kept episodes are all there.
    objects = set(blobs.list("frames/"))
    assert {k.split("/")[2] for k in objects} == kept_ids
    # The sampler's index dropped the evicted episodes and still draws windows with their frames.
    sampler.refresh()
    assert sampler.index.evicted_episodes >= 1
    assert sampler.index.count() == STEPS * 2  # trainable (operator-labelled) steps: the two kept hg episodes
    batch = sampler.sample()
    assert batch["obs/cam"].shape == (8, 16, 16, 3)


async def _delete(redis_url: str, robot: str, eid: str, blobs) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        freed = await BufferWriter(redis).delete_episode(robot, eid)
        blobs.delete(freed.blob_keys)
    finally:
        await redis.aclose()


def _fill(redis_proc, tmp_path, blobs_url: str, robot: str, specs: list[tuple[str, bool]]) -> None:
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url, blob_url=blobs_url,
                                     policy_dir=str(tmp_path / "policies")))
    client = connect_robot(gw.target, robot)
    try:
        seq = 0
        for eid, hg in specs:
            seq = stream(client, [episode(robot, eid, seq + 1, hg)])
    finally:
        client.close()
        gw.stop()


async def _one_pass(redis_proc, reader, blobs, cfg, archive):
    redis = aioredis.Redis.from_url(redis_proc.url)
    try:
        return await Retention(reader, BufferWriter(redis), blobs, cfg, archive=archive).run_once()
    finally:
        await redis.aclose()


def test_evicted_episodes_are_archived_to_a_lerobot_dataset_first(redis_proc, redis_client, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    blobs = open_blob_store(str(tmp_path / "blobs"))
    _fill(redis_proc, tmp_path, str(tmp_path / "blobs"), "r1", [("old-0", False), ("old-1", True), ("new", False)])
    reader = BufferReader(redis_client, blobs)
    archive = LeRobotArchive(redis_client, tmp_path / "archive", blobs)
    report = asyncio.run(_one_pass(redis_proc, reader, blobs,
                                   RetentionConfig(max_bytes=1, low_watermark=1.0, archive_tiers=("intervention",)),
                                   archive))
    assert [ev.episode.episode_id for ev in report.evicted] == ["old-0", "new", "old-1"]
    assert report.archived == 1 and reader.episodes() == [] and list(blobs.list()) == []
    (path,) = [p for p in (tmp_path / "archive").iterdir()]
    assert path.name.startswith("r1-") and not path.name.startswith(".")
    dataset = LeRobotDataset("fleet/archive", root=path)
    assert dataset.meta.total_episodes == 1 and dataset.meta.total_frames == STEPS
    frame = dataset[STEPS - 1]
    assert frame["observation.images.cam"].shape[-2:] == (16, 16)
    assert float(frame["observation.images.cam"].max()) * 255 == pytest.approx(7 * (STEPS - 1), abs=4)


def test_an_archive_that_fails_keeps_the_episodes(redis_proc, redis_client, tmp_path):
    blobs = open_blob_store(str(tmp_path / "blobs"))
    _fill(redis_proc, tmp_path, str(tmp_path / "blobs"), "r1", [("a", False), ("b", False)])
    (tmp_path / "not-a-dir").write_text("x")
    reader = BufferReader(redis_client, blobs)
    before = REGISTRY.get_sample_value("fleet_retention_failures_total", {"reason": "archive"}) or 0.0
    report = asyncio.run(_one_pass(redis_proc, reader, blobs, RetentionConfig(max_bytes=1),
                                   LeRobotArchive(redis_client, tmp_path / "not-a-dir" / "archive", blobs)))
    assert report.evicted == [] and report.failed == 2
    assert sorted(e.episode_id for e in reader.episodes()) == ["a", "b"]
    assert REGISTRY.get_sample_value("fleet_retention_failures_total", {"reason": "archive"}) == before + 1


def test_one_retention_at_a_time_holds_the_lease(redis_proc, redis_client):
    cfg = RetentionConfig(max_bytes=1, interval_s=0.05)  # lease: 3 intervals
    a = Retention(BufferReader(redis_client), None, None, cfg)
    b = Retention(BufferReader(redis_client), None, None, cfg)

    async def hold(r: Retention) -> bool:
        return await r._hold_lease()

    assert asyncio.run(hold(a)) and not asyncio.run(hold(b))
    assert asyncio.run(hold(a))  # renewed by its holder
    wait_until(lambda: asyncio.run(hold(b)), 5, "the lease of a stopped retention to expire")
    assert not asyncio.run(hold(a))


def test_frame_objects_left_by_a_blob_store_outage_are_deleted_by_the_next_pass(redis_proc, redis_client, s3_server, tmp_path):
    url = s3_server.url("fleet-retention/frames")
    _fill(redis_proc, tmp_path, url, "r1", [("a", False), ("b", False)])
    blobs = open_blob_store(url)
    reader = BufferReader(redis_client, blobs)
    objects = sorted(blobs.list())
    assert len(objects) == 2
    before = REGISTRY.get_sample_value("fleet_retention_failures_total", {"reason": "backend"}) or 0.0
    s3_server.kill()
    async def two_passes():
        redis = aioredis.Redis.from_url(redis_proc.url)
        retention = Retention(reader, BufferWriter(redis), blobs, RetentionConfig(max_bytes=1, low_watermark=1.0))
        try:
            first = await retention.run_once()
            assert REGISTRY.get_sample_value("fleet_retention_failures_total", {"reason": "backend"}) == before + 1
            await asyncio.to_thread(s3_server.restart)
            second = await retention.run_once()
            return first, second
        finally:
            await redis.aclose()

    first, second = asyncio.run(two_passes())
    # Redis let go of both episodes at once (the sampler drops them); their frame objects could not be deleted
    # while the store was down, and the next pass deleted them.
    assert sorted(ev.episode.episode_id for ev in first.evicted) == ["a", "b"] and reader.episodes() == []
    assert second.evicted == [] and list(blobs.list()) == []


def test_a_gateway_with_an_impossible_retention_config_exits_2_naming_the_field(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fleet.cli", "gateway", "--listen", "127.0.0.1:0",
                          "--redis_url", "redis://127.0.0.1:1/0", "--policy_dir", str(tmp_path / "p"),
                          "--retention.max_bytes", "1000000", "--retention.eviction_order", "[online,offline]"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "retention.eviction_order (['online', 'offline']) must name each of" in out.stderr, out.stderr
