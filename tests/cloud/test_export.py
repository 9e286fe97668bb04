"""Export from a real Redis buffer: a LeRobotDataset v3 that LeRobot's own ``LeRobotDataset``
loads (local root, no hub) and a MCAP rosbag2 that ``rosbags`` reads, with values equal to
what Redis holds; filters; the CLI; mixed schemas refused."""

from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

from cloud.buffer import ROBOTS_KEY, RobotKeys
from cloud.export import ExportFilter, iter_steps, select_episodes
from cloud.export.lerobot import REPO_ID, SIDECAR, export_lerobot
from cloud.export.rosbag2 import export_rosbag2, ros_name
from cloud.ingest import Ingest
from fleet import PROTOCOL_VERSION
from fleet.codec import decode_image, encode_image
from fleet.errors import ConfigError
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step

CAM = Schema(observation=(FeatureSpec("state", "float32", (3,)), FeatureSpec("front", "uint8", (6, 8, 3), True)),
             action=FeatureSpec("action", "float32", (2,)))
PLAIN = Schema(observation=(FeatureSpec("state", "float32", (5,)),), action=FeatureSpec("action", "float32", (2,)))
T0 = 1_700_000_000.0


def make_steps(rng, schema: Schema, n: int, start_s: float, version: int, success: bool) -> list[Step]:
    steps = []
    for t in range(n):
        obs = {"state": rng.normal(size=schema.observation[0].shape).astype(np.float32)}
        images = {}
        if schema is CAM:
            images["front"] = encode_image(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), "png" if version % 2 else "jpeg")  # one encoding per camera and chunk
        policy = rng.normal(size=2).astype(np.float32)
        intervening = 2 <= t < 4
        steps.append(Step(seq=0, index=t, observation=obs, images=images, policy_action=policy,
                          action=rng.normal(size=2).astype(np.float32) if intervening else policy,
                          is_intervention=intervening, reward=float(t) / 10, success=success and t == n - 1,
                          done=t == n - 1, policy_version=version, timestamp_s=start_s + 0.05 * t))
    return steps


async def _fill(url: str) -> None:
    redis = aioredis.Redis.from_url(url)
    ingest = Ingest(redis)
    rng = np.random.default_rng(0)
    plan = [("arm-a", CAM, "toy", [("stack", 5, T0, 1, True), ("stack", 4, T0 + 100, 2, False),
                                   ("wipe", 3, T0 + 200, 3, True)]),
            ("arm-b", CAM, "toy", [("stack", 4, T0 + 50, 2, True), ("wipe", 6, T0 + 102, 3, False)]),
            ("sim-c", PLAIN, "other", [("stack", 3, T0 + 10, 1, False)])]
    for rid, schema, embodiment, episodes in plan:
        seq = await ingest.register(RobotInfo(rid, embodiment, schema, ("stack", "wipe"), PROTOCOL_VERSION))
        for task, n, start, version, success in episodes:
            steps = make_steps(rng, schema, n, start, version, success)
            for s in steps:
                seq += 1
                s.seq = seq
            end = EpisodeSummary(success, n, 2, 1, False, version)
            chunk = Chunk(rid, f"{rid}-{uuid.uuid4().hex[:8]}", task, steps, episode_end=end)
            await ingest.write(chunk)
    await redis.aclose()


@pytest.fixture
def buffer(redis_proc, redis_client):
    asyncio.run(_fill(redis_proc.url))
    return redis_client


def test_filters_select_the_right_episodes(buffer):
    def count(**kw) -> int:
        return len(select_episodes(buffer, ExportFilter(**kw)))

    assert count() == 6
    assert count(embodiment="toy") == 5
    assert count(robots=("arm-b",)) == 2
    assert count(tasks=("wipe",)) == 2
    assert count(min_version=2, max_version=2) == 2
    assert count(since_s=T0 + 50, until_s=T0 + 150) == 3  # starts at +50, +100, +102
    refs = select_episodes(buffer, ExportFilter(embodiment="toy"))
    assert [r.start_s for r in refs] == sorted(r.start_s for r in refs)
    with pytest.raises(ConfigError, match="unknown robot"):
        count(robots=("nope",))


def test_mixed_schemas_and_tiny_videos_are_refused(buffer, tmp_path):
    with pytest.raises(ConfigError, match="2 different schemas.*--embodiment"):
        export_lerobot(buffer, tmp_path / "ds", ExportFilter())
    with pytest.raises(ConfigError, match="at least 32 px"):  # SVT-AV1 crashes (SIGFPE) on 16 px frames
        export_lerobot(buffer, tmp_path / "ds", ExportFilter(embodiment="toy"), video=True)


@pytest.mark.timeout(120)
def test_lerobot_export_loads_in_lerobot_with_redis_values(buffer, redis_proc, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from fleet.cli import main

    out = tmp_path / "ds"
    assert main(["export", "--format", "lerobot", "--out", str(out), "--redis_url", redis_proc.url,
                 "--embodiment", "toy", "--since", "2023-11-14T22:13:00", "--min_version", "1"]) == 0
    refs = select_episodes(buffer, ExportFilter(embodiment="toy"))
    ds = LeRobotDataset(REPO_ID, root=out)
    assert ds.num_episodes == len(refs) == 5 and ds.fps == 20
    assert ds.meta.robot_type == "toy"
    sidecar = [json.loads(line) for line in (out / SIDECAR).read_text().splitlines()]
    assert [(r["robot_id"], r["episode_id"]) for r in sidecar] == [(r.robot_id, r.episode_id) for r in refs]
    expected = [(ref, step) for ref in refs for step in iter_steps(buffer, ref)]
    assert len(ds) == len(expected)
    for i, (ref, step) in enumerate(expected):
        frame = ds[i]
        assert frame["task"] == ref.task and int(frame["frame_index"]) == step.index
        np.testing.assert_array_equal(frame["observation.state"].numpy(), step.observation["state"])
        pixels = decode_image(step.images["front"])
        np.testing.assert_allclose(frame["observation.images.front"].numpy(),
                                   pixels.transpose(2, 0, 1) / 255.0, atol=1e-6)
        np.testing.assert_array_equal(frame["action"].numpy(), step.action)
        np.testing.assert_array_equal(frame["policy_action"].numpy(), step.policy_action)
        assert bool(frame["is_intervention"]) == step.is_intervention
        assert int(frame["policy_version"]) == step.policy_version
        assert float(frame["next.reward"]) == pytest.approx(step.reward)
        assert bool(frame["next.done"]) == step.done and bool(frame["next.success"]) == step.success
        assert int(frame["wall_time_ns"]) == round(step.timestamp_s * 1e9)


@pytest.mark.timeout(60)
def test_rosbag2_export_reads_back_with_rosbags(buffer, tmp_path):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    out = tmp_path / "bag"
    result = export_rosbag2(buffer, out, ExportFilter(tasks=("stack",)))
    refs = select_episodes(buffer, ExportFilter(tasks=("stack",)))
    assert result.episodes == len(refs) == 4
    assert list(out.glob("*.mcap")), "no MCAP file written"
    store = get_typestore(Stores.ROS2_JAZZY)
    got: dict[tuple[str, int], dict] = {}
    events = []
    last_ns = 0
    with Reader(out) as reader:
        assert reader.message_count > 0 and all(c.msgtype for c in reader.connections)
        for conn, time_ns, raw in reader.messages():
            assert time_ns >= last_ns, "messages are not in time order"
            last_ns = time_ns
            msg = store.deserialize_cdr(raw, conn.msgtype)
            _, _, robot, *rest = conn.topic.split("/")
            if rest == ["episode"]:
                events.append(json.loads(msg.data))
                continue
            got.setdefault((robot, time_ns), {})["/".join(rest)] = msg
    steps = 0
    for ref in refs:
        for step in iter_steps(buffer, ref):
            msgs = got[(ros_name(ref.robot_id), round(step.timestamp_s * 1e9))]
            steps += 1
            np.testing.assert_array_equal(msgs["observation/state"].data, step.observation["state"])
            if "front" in step.images:
                image = msgs["observation/images/front"]
                assert image.format == step.images["front"].encoding
                assert bytes(image.data) == step.images["front"].data
            np.testing.assert_array_equal(msgs["action"].data, step.action)
            np.testing.assert_array_equal(msgs["policy_action"].data, step.policy_action)
            assert msgs["is_intervention"].data == step.is_intervention
            assert msgs["reward"].data == pytest.approx(step.reward)
            assert msgs["policy_version"].data == step.policy_version
    assert steps == result.steps == len(got)
    ends = {e["episode_id"]: e for e in events if e["event"] == "end"}
    assert {e["episode_id"] for e in events if e["event"] == "start"} == set(ends) == {r.episode_id for r in refs}
    for ref in refs:
        assert ends[ref.episode_id]["success"] == ref.success and ends[ref.episode_id]["steps"] == ref.length


def test_export_refuses_an_existing_directory(buffer, tmp_path):
    with pytest.raises(ConfigError, match="exists"):
        export_rosbag2(buffer, tmp_path, ExportFilter())
    with pytest.raises(ConfigError, match="no episodes"):
        export_rosbag2(buffer, tmp_path / "x", ExportFilter(tasks=("fly",)))


def test_time_parsing():
    from cloud.export import parse_time

    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2023-11-14T22:13:20") == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0
    with pytest.raises(ConfigError, match="yesterday"):
        parse_time("yesterday")


@pytest.mark.timeout(120)
def test_export_then_import_round_trips_as_offline_data(buffer, redis_proc, tmp_path):
    import redis as redis_lib

    from cloud.buffer import SOURCE_OFFLINE
    from fleet.cli import main
    from fleet.convert import schema_from_dict

    out = tmp_path / "ds"
    refs = select_episodes(buffer, ExportFilter(robots=("arm-b",)))
    export_lerobot(buffer, out, ExportFilter(robots=("arm-b",)))
    assert main(["import", "--path", str(out), "--redis_url", redis_proc.url, "--robot_id", "demos-b"]) == 0
    client = redis_lib.Redis.from_url(redis_proc.url)
    reg = json.loads(client.hget(ROBOTS_KEY, "demos-b"))
    assert reg["source"] == SOURCE_OFFLINE and reg["embodiment"] == "toy"  # from the export's sidecar
    assert schema_from_dict(reg["schema"]) == CAM  # so the "toy" trainer learns from it
    imported = select_episodes(client, ExportFilter(robots=("demos-b",)))
    assert [(r.task, r.length) for r in imported] == [(r.task, r.length) for r in refs]
    for ref, new in zip(refs, imported):
        for a, b in zip(iter_steps(buffer, ref), iter_steps(client, new)):
            np.testing.assert_array_equal(a.observation["state"], b.observation["state"])
            np.testing.assert_array_equal(decode_image(a.images["front"]), decode_image(b.images["front"]))
            np.testing.assert_array_equal(a.action, b.action)
            np.testing.assert_array_equal(a.policy_action, b.policy_action)
            assert (a.is_intervention, a.policy_version, a.done) == (b.is_intervention, b.policy_version, b.done)
            assert b.timestamp_s == pytest.approx(a.timestamp_s, abs=1e-6)
    runs = [tuple(map(int, x.split(b"|"))) for x in client.lrange(RobotKeys("demos-b").labeled, 0, -1)]
    assert sum(end - start for _, start, end in runs) == sum(r.length for r in refs)  # every offline step is a label


@pytest.mark.timeout(120)
def test_video_export_decodes_close_to_the_frames(redis_proc, redis_client, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    schema = Schema(observation=(FeatureSpec("state", "float32", (2,)), FeatureSpec("top", "uint8", (32, 32, 3), True)),
                    action=FeatureSpec("action", "float32", (2,)))
    ramp = np.linspace(0, 255, 32, dtype=np.float32)

    async def fill() -> None:
        redis = aioredis.Redis.from_url(redis_proc.url)
        ingest = Ingest(redis)
        await ingest.register(RobotInfo("cam", "cam-arm", schema, ("look",), PROTOCOL_VERSION))
        steps = []
        for t in range(6):  # smooth frames: a gradient shifting each step (lossy AV1 keeps them close)
            frame = np.clip(ramp[None, :, None] + 20 * t, 0, 255).astype(np.uint8).repeat(32, 0).repeat(3, 2)
            steps.append(Step(t + 1, t, {"state": np.full(2, t, np.float32)}, np.zeros(2, np.float32),
                              np.zeros(2, np.float32), False, 0.0, False, t == 5, 1, T0 + t / 20,
                              {"top": encode_image(frame, "png")}))
        await ingest.write(Chunk("cam", "cam-e1", "look", steps, episode_end=EpisodeSummary(False, 6, 0, 0, False, 1)))
        await redis.aclose()

    asyncio.run(fill())
    out = tmp_path / "vid"
    export_lerobot(redis_client, out, ExportFilter(), video=True)
    assert list((out / "videos").rglob("*.mp4")), "no video file written"
    ds = LeRobotDataset(REPO_ID, root=out, video_backend="pyav")
    ref = select_episodes(redis_client, ExportFilter())[0]
    for i, step in enumerate(iter_steps(redis_client, ref)):
        expected = decode_image(step.images["top"]).transpose(2, 0, 1) / 255.0
        assert np.abs(ds[i]["observation.images.top"].numpy() - expected).mean() < 0.03


def _fill_rates(url: str, rates: dict[str, float]) -> None:
    """One 4-step episode per robot, stamped 1 ms apart (as fast as a simulator), registered at ``rates``."""
    async def fill() -> None:
        redis = aioredis.Redis.from_url(url)
        ingest = Ingest(redis)
        for rid, hz in rates.items():
            await ingest.register(RobotInfo(rid, "toy", PLAIN, ("stack",), PROTOCOL_VERSION, control_hz=hz))
            steps = make_steps(np.random.default_rng(1), PLAIN, 4, T0, 1, True)
            for i, s in enumerate(steps):
                s.seq, s.timestamp_s = i + 1, T0 + 0.001 * i
            await ingest.write(Chunk(rid, f"{rid}-e1", "stack", steps, episode_end=EpisodeSummary(True, 4, 2, 1, False, 1)))
        await redis.aclose()

    asyncio.run(fill())


@pytest.mark.timeout(60)
def test_fps_is_the_registered_control_rate(redis_proc, redis_client, tmp_path, caplog):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    _fill_rates(redis_proc.url, {"fast-a": 30.0, "fast-b": 30.0, "slow": 10.0, "legacy": 0.0})
    reg = json.loads(redis_client.hget(ROBOTS_KEY, "fast-a"))
    assert reg["control_hz"] == 30.0
    with caplog.at_level("WARNING", logger="cloud.export.lerobot"):
        export_lerobot(redis_client, tmp_path / "a", ExportFilter(robots=("fast-a", "fast-b")))
    assert LeRobotDataset(REPO_ID, root=tmp_path / "a").fps == 30  # not the 1000 the timestamps say
    assert json.loads((tmp_path / "a" / "meta" / "info.json").read_text())["fps"] == 30
    assert not [r for r in caplog.records if "estimated" in r.getMessage()]
    with pytest.raises(ConfigError, match=r"2 control rates \(10 Hz: slow; 30 Hz: fast-a, fast-b\).*--robot"):
        export_lerobot(redis_client, tmp_path / "b", ExportFilter(robots=("fast-a", "fast-b", "slow")))
    with caplog.at_level("WARNING", logger="cloud.export.lerobot"):
        export_lerobot(redis_client, tmp_path / "c", ExportFilter(robots=("legacy",)))
    assert LeRobotDataset(REPO_ID, root=tmp_path / "c").fps == 1000  # no rate registered: the timestamps' estimate
    assert any("['legacy'] registered no control rate" in r.getMessage() for r in caplog.records)
    export_lerobot(redis_client, tmp_path / "d", ExportFilter(robots=("slow", "legacy")), fps=10)  # --fps overrides
    assert LeRobotDataset(REPO_ID, root=tmp_path / "d").fps == 10


@pytest.mark.parametrize("hz", [float("nan"), float("inf"), -1.0, 1e9])
def test_a_nonsense_control_rate_is_refused_at_register(redis_proc, hz):
    from fleet.errors import InvalidInput

    async def register() -> None:
        redis = aioredis.Redis.from_url(redis_proc.url)
        try:
            await Ingest(redis).register(RobotInfo("r9", "toy", PLAIN, ("stack",), PROTOCOL_VERSION, control_hz=hz))
        finally:
            await redis.aclose()

    with pytest.raises(InvalidInput, match="control_hz"):
        asyncio.run(register())
