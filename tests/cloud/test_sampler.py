"""The SOP sampler on a real redis-server: per-task balance, the adaptive online share, what each
algorithm's DataSpec delivers, images, and its checkpointable state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloud.buffer import SOURCE_OFFLINE, SOURCE_ONLINE
from cloud.offline import seed_lerobot_dataset
from cloud.sampler import DataSpec, Prefetcher, Sampler, SamplerConfig
from fleet.codec import encode_image
from fleet.errors import ConfigError
from fleet.types import FeatureSpec, Schema
from tests.cloud.fleet_sim import IngestSink, synthetic_episode

TASKS = ("task a", "task b")
SCHEMA = Schema((FeatureSpec("state", "float32", (4,)),), FeatureSpec("action", "float32", (2,)))
H = 4

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def buffer(redis_proc):
    """Offline: task a 10 episodes x 20 steps, task b 1 x 20. Online (robot r0): per task one episode of 12
    steps whose first 3 steps were operator-driven, one failed autonomous episode, one evaluation episode."""
    offline = IngestSink(redis_proc.url, "demos", SCHEMA, TASKS, source=SOURCE_OFFLINE)
    for task_id, n in ((0, 10), (1, 1)):
        for _ in range(n):
            offline.write_episode(TASKS[task_id], *synthetic_episode(task_id, 20))
    online = IngestSink(redis_proc.url, "r0", SCHEMA, TASKS)
    for task_id in (0, 1):
        online.write_episode(TASKS[task_id], *synthetic_episode(task_id, 12, interventions=[True] * 3))
        online.write_episode(TASKS[task_id], *synthetic_episode(task_id, 7, success=False))
        online.write_episode(TASKS[task_id], *synthetic_episode(task_id, 9), evaluation=True)
    return redis_proc


def make(redis_client, spec=DataSpec(), online_fraction=0.5, **cfg) -> Sampler:
    sampler = Sampler(redis_client, TASKS, H, batch_size=256, online_fraction=online_fraction, seed=0, spec=spec,
                      config=SamplerConfig(**cfg))
    sampler.refresh()
    return sampler


def test_equal_weight_per_task_whatever_the_data_size(buffer, redis_client):
    sampler = make(redis_client)
    assert sampler.index.count(SOURCE_OFFLINE) == 220 and sampler.index.count(SOURCE_ONLINE) == 6
    batch = sampler.sample(SOURCE_OFFLINE)
    share_b = np.mean(batch["task_index"] == 1)
    assert 0.4 < share_b < 0.6, share_b  # 1/11 of the steps, half of the samples
    # The window starts at the observation's step and targets the next H actions of the same episode.
    t = batch["obs/state"][:, 0].astype(int)
    np.testing.assert_array_equal(batch["action"][:, 0, 0], t)
    np.testing.assert_array_equal(batch["t"], t)
    np.testing.assert_array_equal(batch["action_is_pad"].sum(1), np.maximum(0, t + H - 20))


def test_intervention_windows_end_when_the_operator_hands_back(buffer, redis_client):
    sampler = make(redis_client, online_fraction=1.0, adaptive=False)
    batch = sampler.sample()
    assert batch["is_online"].all() and batch["is_intervention"].all()
    t = batch["t"]
    assert set(t.tolist()) == {0, 1, 2}  # only the 3 operator-driven steps are labels
    np.testing.assert_array_equal((~batch["action_is_pad"]).sum(1), 3 - t)


def test_data_specs(buffer, redis_client):
    recap = make(redis_client, DataSpec(interventions=False, episodes=True, offline=True, lookahead_steps=5),
                 online_fraction=1.0, adaptive=False)
    assert recap.index.count(SOURCE_ONLINE) == 2 * (12 + 7) and recap.index.task_max_len == {"task a": 20,
                                                                                         "task b": 20}
    batch = recap.sample()
    length, t = batch["episode_len"], batch["t"]
    assert set(length.tolist()) == {12, 7} and (batch["success"] == (length == 12)).all()
    np.testing.assert_array_equal(batch["obs/state"][:, 2], length)
    np.testing.assert_array_equal(batch["has_next"], t + 5 < length)
    np.testing.assert_array_equal(batch["next/state"][:, 0], np.minimum(t + 5, length - 1))
    np.testing.assert_array_equal(batch["is_intervention"], (length == 12) & (t < 3))
    assert (batch["task_max_len"] == 20).all()


def test_successes_are_the_robots_own_autonomous_successes(buffer, redis_client):
    only_successes = DataSpec(interventions=False, successes=True, offline=False)
    # The fixture's successful episodes were rescued by the operator: they hold the policy's mistakes.
    assert make(redis_client, only_successes).index.count(SOURCE_ONLINE) == 0
    online = IngestSink(buffer.url, "r1", SCHEMA, TASKS)
    for task_id in (0, 1):
        online.write_episode(TASKS[task_id], *synthetic_episode(task_id, 11))
        online.write_episode(TASKS[task_id], *synthetic_episode(task_id, 5, success=False))
    successes = make(redis_client, only_successes)
    assert successes.index.count(SOURCE_ONLINE) == 22  # the two autonomous successes, eval excluded
    batch = successes.sample()
    assert (batch["episode_len"] == 11).all() and batch["success"].all() and not batch["is_intervention"].any()
    assert (~batch["action_is_pad"][batch["t"] <= 11 - H]).all()  # autonomous steps are targets too


def test_adaptive_online_share_follows_the_losses(buffer, redis_client):
    sampler = make(redis_client, alpha=2.0, window_steps=3)
    assert sampler.online_share("task a") == 0.5  # no losses yet: the fixed share

    def observe(task_id: int, online_loss: float, offline_loss: float) -> None:
        batch = {"task_index": np.array([task_id] * 4), "is_online": np.array([True, True, False, False])}
        sampler.observe_losses(batch, np.array([online_loss, online_loss, offline_loss, offline_loss]))

    observe(0, 0.3, 0.4)
    expected = math.exp(2 * 0.3) / (math.exp(2 * 0.3) + math.exp(0.4))
    assert sampler.online_share("task a") == pytest.approx(expected)
    assert sampler.online_share("task b") == 0.5  # per task
    for _ in range(3):  # the window forgets the first update
        observe(0, 2.0, 0.1)
    assert sampler.online_share("task a") == 0.8  # clipped at SOP's upper bound
    batch = sampler.sample()
    online_a = batch["is_online"][batch["task_index"] == 0].mean()
    assert 0.7 < online_a < 0.9, online_a
    for _ in range(3):
        observe(0, 0.01, 3.0)
    assert sampler.online_share("task a") == 0.2
    fixed = make(redis_client, adaptive=False)
    fixed.observe_losses({"task_index": np.array([0, 0]), "is_online": np.array([True, False])}, np.array([9., 0.]))
    assert fixed.online_share("task a") == 0.5

    restored = make(redis_client)
    restored.load_state_dict(sampler.state_dict())
    assert restored.online_share("task a") == 0.2
    np.testing.assert_array_equal(restored.sample()["t"], sampler.sample()["t"])  # same RNG state


def test_images_are_decoded_and_the_prefetcher_delivers(redis_proc, redis_client):
    schema = Schema((FeatureSpec("state", "float32", (4,)), FeatureSpec("cam", "uint8", (8, 6, 3), is_image=True)),
                    FeatureSpec("action", "float32", (2,)))
    frame = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    sink = IngestSink(redis_proc.url, "demos", schema, TASKS, source=SOURCE_OFFLINE)
    sink.write_episode(TASKS[0], *synthetic_episode(0, 10, images={"cam": encode_image(frame)}))
    sampler = Sampler(redis_client, TASKS, H, batch_size=8, online_fraction=0.5, seed=0)
    sampler.refresh()
    prefetch = Prefetcher(sampler, depth=2)
    try:
        batch = prefetch.get(timeout_s=10)
    finally:
        prefetch.close()
    assert batch["obs/cam"].dtype == np.uint8 and batch["obs/cam"].shape == (8, 8, 6, 3)
    np.testing.assert_array_equal(batch["obs/cam"][3], frame)
    assert sampler.cache.misses >= 1 and sampler.cache.hits >= 7  # one fetch per episode, then RAM
    # A policy without cameras: the frames are never decoded.
    blind = Sampler(redis_client, TASKS, H, batch_size=8, online_fraction=0.5, seed=0, use_images=False)
    blind.refresh()
    assert "obs/cam" not in blind.sample() and blind._decoder is None and sampler._decoder is not None


def test_empty_buffer_and_bad_config(redis_client):
    sampler = Sampler(redis_client, TASKS, H, batch_size=2, online_fraction=0.5)
    sampler.refresh()
    with pytest.raises(LookupError, match="no usable"):
        sampler.sample()
    with pytest.raises(ConfigError, match="min <= max"):
        SamplerConfig(min_online_fraction=0.9, max_online_fraction=0.2)
    with pytest.raises(ConfigError, match="alpha"):
        SamplerConfig(alpha=0)


@pytest.mark.timeout(120)
def test_offline_data_from_a_local_lerobot_dataset(redis_proc, redis_client, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {"observation.state": {"dtype": "float32", "shape": (4,), "names": None},
                "observation.images.top": {"dtype": "image", "shape": (8, 8, 3), "names": ["h", "w", "c"]},
                "action": {"dtype": "float32", "shape": (2,), "names": None}}
    dataset = LeRobotDataset.create("local/toy", fps=10, features=features, root=tmp_path / "toy", use_videos=False)
    for episode, task in enumerate(TASKS):
        for t in range(6):
            dataset.add_frame({"observation.state": np.full(4, t, np.float32),
                               "observation.images.top": np.full((8, 8, 3), 40 * t, np.uint8),
                               "action": np.array([t, episode], np.float32), "task": task})
        dataset.save_episode()
    dataset.finalize()

    assert seed_lerobot_dataset(redis_proc.url, str(tmp_path / "toy")) == {"episodes": 2, "steps": 12,
                                                                           "tasks": list(TASKS)}
    sampler = Sampler(redis_client, TASKS, H, batch_size=32, online_fraction=0.5, seed=0)
    sampler.refresh()
    assert sampler.index.count(SOURCE_OFFLINE) == 12
    batch = sampler.sample(SOURCE_OFFLINE)
    t = batch["obs/state"][:, 0].astype(int)
    np.testing.assert_array_equal(batch["action"][:, 0, 0], t)
    np.testing.assert_array_equal(batch["action"][:, 0, 1], batch["task_index"])  # task text kept
    np.testing.assert_array_equal(batch["obs/top"][:, 0, 0, 0], 40 * t)  # images round-trip exactly
    with pytest.raises(ConfigError, match="LeRobotDataset"):
        seed_lerobot_dataset(redis_proc.url, str(tmp_path / "missing"))


def test_one_robot_cannot_take_over_a_task_or_the_batch(redis_proc, redis_client):
    """An honest robot with 2 episodes of a task, an attacker with 20 of the same task plus episodes of
    tasks the trainer does not know: the attacker gets about half of that task's rows, none of the others."""
    honest = IngestSink(redis_proc.url, "honest", SCHEMA, TASKS)
    for _ in range(2):
        honest.write_episode(TASKS[0], *synthetic_episode(0, 10, interventions=[True] * 10))
    junk = tuple(f"junk {i}" for i in range(20))
    attacker = IngestSink(redis_proc.url, "attacker", SCHEMA, (TASKS[0], *junk))
    for _ in range(20):
        attacker.write_episode(TASKS[0], *synthetic_episode(0, 10, interventions=[True] * 10))
    for task in junk:
        attacker.write_episode(task, *synthetic_episode(0, 1, interventions=[True]))
    sampler = make(redis_client)
    assert sampler.index.tasks() == [TASKS[0]]  # tasks the policy does not know are never sampled
    assert sampler.index.skipped["unknown_task"] == 2 * len(junk)  # its labeled step and its episode
    for _ in range(4):
        assert (sampler.sample()["task_index"] == 0).all()
    # Which robot each row came from: the honest robot holds 20 of the 220 steps (9%), yet gets half.
    picks = sampler.index.pools[(TASKS[0], SOURCE_ONLINE)].sample(np.random.default_rng(1), 4000)
    honest_share = np.mean([seg.robot_id == "honest" for seg, _ in picks])
    assert 0.45 < honest_share < 0.55, honest_share
