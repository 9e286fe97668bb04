"""A buffer seeded the project's own way (scripted MetaWorld demos, real redis-server), exported with
``fleet export --format lerobot``, then read by LeRobot's own tools: its dataset reader replays every
episode step for step against Redis, and ``lerobot-train`` (ACT, CPU, two steps) trains on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud.buffer import ROBOTS_KEY
from cloud.export import ExportFilter, iter_steps, select_episodes
from cloud.export.lerobot import REPO_ID, SIDECAR
from edge.sim.demos import seed_scripted_demos
from edge.loop import LoopConfig
from edge.sim.metaworld import SCHEMA
from fleet.cli import main
from fleet.convert import schema_from_dict

ROOT = Path(__file__).resolve().parents[2]
TASK = "reach-v3"
EPISODES, STEPS = 2, 30


def seed_and_export(redis_url: str, out: Path) -> None:
    seeded = seed_scripted_demos(redis_url, (TASK,), episodes_per_task=EPISODES, max_episode_steps=STEPS)
    assert seeded["episodes"] == EPISODES
    assert main(["export", "--format", "lerobot", "--out", str(out), "--redis_url", redis_url]) == 0


@pytest.mark.timeout(240)
def test_exported_episodes_replay_in_lerobot_as_in_redis(redis_proc, redis_client, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out = tmp_path / "ds"
    seed_and_export(redis_proc.url, out)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["fps"] == LoopConfig.control_hz == 20  # the registered rate; the demos ran at simulation speed
    assert info["features"]["observation.state"]["shape"] == [4]  # hand xyz + gripper
    assert info["features"]["observation.environment_state"]["shape"] == [35]  # objects, previous frame, goal
    assert "observation.state" in info["features"] and len(info["features"]["observation.state"]["names"]) == 4

    refs = select_episodes(redis_client, ExportFilter())
    ds = LeRobotDataset(REPO_ID, root=out)
    assert ds.fps == 20 and ds.num_episodes == len(refs) == EPISODES
    sidecar = [json.loads(line) for line in (out / SIDECAR).read_text().splitlines()]
    assert [row["episode_id"] for row in sidecar] == [r.episode_id for r in refs]
    for index, ref in enumerate(refs):
        episode = ds.meta.episodes[index]
        start, stop = int(episode["dataset_from_index"]), int(episode["dataset_to_index"])
        steps = list(iter_steps(redis_client, ref))
        assert stop - start == len(steps) == ref.length and episode["tasks"] == [ref.task]
        for offset, step in enumerate(steps):
            frame = ds[start + offset]
            assert int(frame["episode_index"]) == index and int(frame["frame_index"]) == step.index == offset
            assert float(frame["timestamp"]) == pytest.approx(offset / 20)
            assert frame["task"] == ref.task == "reach the goal"
            state = step.observation["state"]
            np.testing.assert_array_equal(frame["observation.state"].numpy(), state[:4])
            np.testing.assert_array_equal(frame["observation.environment_state"].numpy(), state[4:])
            np.testing.assert_array_equal(frame["action"].numpy(), step.action)
            assert bool(frame["next.done"]) == step.done == (offset == len(steps) - 1)
            assert bool(frame["next.success"]) == step.success
            assert float(frame["next.reward"]) == pytest.approx(step.reward)

    # Imported back, the split state is one vector again: the MetaWorld trainer learns from it.
    assert main(["import", "--path", str(out), "--redis_url", redis_proc.url, "--robot_id", "again"]) == 0
    reg = json.loads(redis_client.hget(ROBOTS_KEY, "again"))
    assert schema_from_dict(reg["schema"]) == SCHEMA and reg["control_hz"] == 20.0
    imported = select_episodes(redis_client, ExportFilter(robots=("again",)))
    for ref, new in zip(refs, imported, strict=True):
        for a, b in zip(iter_steps(redis_client, ref), iter_steps(redis_client, new), strict=True):
            np.testing.assert_array_equal(a.observation["state"], b.observation["state"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lerobot_train_accepts_the_export(redis_proc, tmp_path):
    out = tmp_path / "ds"
    seed_and_export(redis_proc.url, out)
    train = Path(sys.executable).with_name("lerobot-train")
    assert train.exists(), f"LeRobot's CLI is not installed next to {sys.executable}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    small_act = ["--policy.type=act", "--policy.device=cpu", "--policy.push_to_hub=false",
                 "--policy.pretrained_backbone_weights=null", "--policy.dim_model=32", "--policy.n_heads=2",
                 "--policy.dim_feedforward=64", "--policy.n_encoder_layers=1", "--policy.n_decoder_layers=1",
                 "--policy.n_vae_encoder_layers=1", "--policy.latent_dim=8", "--policy.chunk_size=5",
                 "--policy.n_action_steps=5"]
    result = subprocess.run(
        [str(train), f"--dataset.repo_id={REPO_ID}", f"--dataset.root={out}", *small_act, "--wandb.enable=false",
         "--steps=2", "--batch_size=2", "--num_workers=0", "--save_checkpoint=false", "--eval_freq=0",
         "--log_freq=1", f"--output_dir={tmp_path / 'train'}"],
        env=env, capture_output=True, text=True, timeout=280)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    frames = json.loads((out / "meta" / "info.json").read_text())["total_frames"]
    assert f"dataset.num_frames={frames}" in log and "step:2 " in log and "End of training" in log


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"state": [{"key": "observation.state"}]}',
                                  '{"state": [{"key": "observation.state", "start": 0, "stop": 5}]}',
                                  '{"state": [{"key": "observation.state", "start": 1, "stop": 4}]}',
                                  '{"state": []}'])
def test_a_broken_feature_layout_is_a_config_error(tmp_path, text):
    from cloud.export.layout import LAYOUT_FILE, read_layout
    from fleet.errors import ConfigError

    (tmp_path / "meta").mkdir()
    (tmp_path / LAYOUT_FILE).write_text(text)
    with pytest.raises(ConfigError, match="fleet_features.json"):
        read_layout(tmp_path, {"observation.state": {"dtype": "float32", "shape": [4]}})
