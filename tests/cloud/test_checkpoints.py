"""Checkpoints: the state round-trips exactly, writes are atomic and verified, the newest complete
one is used, and a trainer resumed in-process carries on from it (real Redis, real LeRobot ACT)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading

import numpy as np
import pytest
import torch

from cloud.checkpoints import CheckpointDir, CheckpointSchedule, capture_rng, decode_tree, encode_tree, restore_rng
from edge.sim.demos import seed_scripted_demos
from cloud.policy_store import PolicyStore
from cloud.trainer import Trainer, checkpoint_dir_for
from cloud.trainer_config import TrainerConfig
from fleet.errors import ConfigError, IntegrityError
from fleet.policies import PolicyConfig

TASKS = ("reach the goal", "press the button from the top")
SMALL = PolicyConfig(chunk_size=5, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


def assert_tree_equal(a, b, path="") -> None:
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}.{i}")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


def test_state_tree_round_trips_exactly():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), 0-dim tensors
        "rng": capture_rng(),  # python tuple of ints, numpy uint32 array, torch uint8 tensor
        "sampler": np.random.default_rng(7).bit_generator.state,  # 128-bit ints
        "bf16": torch.arange(4, dtype=torch.bfloat16), "nan": float("nan"), "none": None,
        "lookalike": {"__tuple__": [1]}, "empty": np.zeros((0, 3), dtype=np.int16),
    }
    encoded, tensors = encode_tree(state)
    back = decode_tree(json.loads(json.dumps(encoded)), tensors)
    assert_tree_equal(state, back)
    with pytest.raises(TypeError, match=r"'\.bad' has a set"):
        encode_tree({"bad": {1, 2}})


def test_rng_restore_replays_the_same_draws():
    saved = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(decode_tree(*encode_tree(saved)))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def _save(ckpts: CheckpointDir, step: int):
    tensors = {"w": torch.full((4,), float(step))}
    state = {"trainer": {"step": step}, "opt": {0: torch.tensor(float(step))}}
    return ckpts.save(step, {"kind": "toy"}, tensors, state)


def test_save_load_prune_and_corruption(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        _save(ckpts, step)
    assert ckpts.steps() == [20, 30]  # the oldest was pruned
    loaded = ckpts.latest()
    assert loaded.step == 30 and loaded.policy_config == {"kind": "toy"}
    assert torch.equal(loaded.policy_tensors["w"], torch.full((4,), 30.0))
    assert loaded.state["opt"][0].item() == 30.0
    # Flip one byte of the newest: it fails its checksum and the one before is used, with a warning.
    model = tmp_path / "ck" / "step-00000030" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cloud.checkpoints"):
        assert ckpts.latest().step == 20
    assert "step-00000030" in caplog.text and "sha256" in caplog.text
    with pytest.raises(IntegrityError, match="model.safetensors"):
        ckpts.load(model.parent)


def test_half_written_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path, keep=3)
    _save(ckpts, 5)
    half = tmp_path / ".tmp-step-00000009-123"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    no_marker = tmp_path / "step-00000010"  # e.g. an interrupted copy: no DONE
    no_marker.mkdir()
    with caplog.at_level(logging.WARNING, logger="cloud.checkpoints"):
        assert CheckpointDir(tmp_path, keep=3).latest().step == 5
    assert str(half) in caplog.text and str(no_marker) in caplog.text
    assert not half.exists()


def test_set_aside_for_a_fresh_start(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=3)
    _save(ckpts, 5)
    aside = ckpts.set_aside()
    assert ckpts.latest() is None and (aside / "step-00000005" / "DONE").exists()


def test_schedule_by_steps_and_time():
    by_steps = CheckpointSchedule(every_steps=10, every_s=0)
    assert not by_steps.due(9) and by_steps.due(10)
    by_steps.mark(10)
    assert not by_steps.due(10) and by_steps.due(20)
    by_time = CheckpointSchedule(every_steps=0, every_s=1e-9)
    assert by_time.due(1) and not by_time.due(0)


def test_config_names_bad_values():
    with pytest.raises(ConfigError, match=r"keep_checkpoints \(0\)"):
        TrainerConfig(keep_checkpoints=0)
    with pytest.raises(ConfigError, match=r"checkpoint_every_s \(-1"):
        TrainerConfig(checkpoint_every_s=-1)
    assert str(checkpoint_dir_for(TrainerConfig(policy_dir="runs/x/policies/"))) == "runs/x/policies-checkpoints"


def test_version_floor_survives_a_lost_counter(redis_client, tmp_path):
    store = PolicyStore(tmp_path / "p", redis_client)
    store.ensure_above(41)  # what a checkpoint recorded
    assert store.next_version() == 42
    assert PolicyStore(tmp_path / "q").next_version() == 1
    offline = PolicyStore(tmp_path / "q")
    offline.ensure_above(7)
    assert offline.next_version() == 8


@pytest.mark.timeout(120)
def test_trainer_resumes_exact_state_in_process(redis_proc, tmp_path):
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=30)
    cfg = TrainerConfig(redis_url=redis_proc.url, policy_dir=str(tmp_path / "policies"), tasks=TASKS,
                        batch_size=8, seed_bc_steps=6, publish_every_steps=5, min_labeled_steps=8,
                        checkpoint_every_steps=4, checkpoint_every_s=0, max_steps=14, policy=SMALL)
    first = Trainer(cfg)
    assert first.run().step == 14  # checkpoints at 4, 8, 12 and 14 (at max_steps)
    assert first.checkpoints.steps() == [8, 12, 14]
    saved = first.checkpoints.load(first.checkpoints.root / "step-00000014")
    versions_before = first.store.versions()

    resumed = Trainer(dataclasses.replace(cfg, max_steps=20), threading.Event())
    resumed.setup()
    assert resumed.state.step == 14 and resumed.resumed_from.endswith("step-00000014")
    assert_tree_equal(saved.state["algorithm"]["state"],
                      decode_tree(*encode_tree(resumed.algorithm.state_dict())))
    assert_tree_equal(saved.state["rng"], decode_tree(*encode_tree(capture_rng())))
    assert resumed.sampler.state_dict() == saved.state["sampler"]
    for name, value in resumed.policy.tensors().items():
        assert torch.equal(value, saved.policy_tensors[name]), name
    resumed.run()
    assert resumed.state.step == 20
    assert min(set(resumed.store.versions()) - set(versions_before)) > max(versions_before)

    # Another policy line must not resume this one's checkpoint.
    with pytest.raises(ConfigError, match="belongs to embodiment ''"):
        Trainer(dataclasses.replace(cfg, embodiment="aloha")).setup()


def test_a_fresh_trainer_with_the_same_seed_trains_the_same_weights(redis_proc, tmp_path):
    """Seed BC repeats bit for bit (dropout draws from the seeded global RNG, whatever ran before in the
    process), so a benchmark's start policy is the same on every run; another seed gives other weights."""

    def seed_bc(db: int, seed: int) -> dict[str, torch.Tensor]:
        url, name = f"{redis_proc.url.rsplit('/', 1)[0]}/{db}", f"db{db}"  # a fresh database: v1 is new there
        seed_scripted_demos(url, TASKS, episodes_per_task=1, max_episode_steps=30)
        torch.rand(7)  # whatever the process drew before must not matter
        trainer = Trainer(TrainerConfig(redis_url=url, policy_dir=str(tmp_path / name), tasks=TASKS,
                                        batch_size=8, seed_bc_steps=6, seed=seed, policy=SMALL,
                                        checkpoint_dir=str(tmp_path / f"{name}-checkpoints")), threading.Event())
        trainer.setup()
        trainer.seed_bc()
        return trainer.policy.tensors()

    first, again, other = seed_bc(1, 0), seed_bc(2, 0), seed_bc(3, 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
