"""A real LeRobot SmolVLA built from a tiny local backbone (random weights, no hub) trains end to end on
CPU (images + language + action chunks, advantage text), and its weights go through publish and swap."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cloud.algorithms.base import OptimizerStep
from cloud.policy_store import PolicyStore
from edge.hotswap import PolicySlot
from fleet.errors import ConfigError
from fleet.policies import FleetPolicy, PolicyConfig, build_policy, set_torch_threads
from fleet.policies.smolvla import ensure_tiny_vlm, resolve_vlm_path, tokenizer_of
from fleet.types import FeatureSpec, Schema

pytest.importorskip("transformers", reason="SmolVLA needs LeRobot's smolvla extra (transformers)")

TASKS = ("open the drawer", "push the puck")
SCHEMA = Schema((FeatureSpec("state", "float32", (6,)), FeatureSpec("top", "uint8", (24, 32, 3), is_image=True)),
                FeatureSpec("action", "float32", (3,)))
CONFIG = PolicyConfig(type="smolvla", chunk_size=4, n_action_steps=2, lr=1e-3, freeze_backbone=True,
                      conditioning="advantage")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> None:
    set_torch_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLEET_CACHE_DIR", str(tmp_path_factory.mktemp("fleet-cache")))
    yield
    mp.undo()


def batch(rng: np.random.Generator, n: int = 4) -> dict[str, np.ndarray]:
    task = rng.integers(0, 2, n)
    return {"obs/state": rng.normal(size=(n, 6)).astype(np.float32),
            "obs/top": rng.integers(0, 255, (n, 24, 32, 3), dtype=np.uint8), "task_index": task,
            "indicator": rng.integers(-1, 2, n),
            "action": np.repeat(np.where(task == 0, 0.5, -0.5)[:, None, None], 4, 1).repeat(3, 2).astype(np.float32),
            "action_is_pad": np.zeros((n, 4), bool)}


@pytest.mark.timeout(240)
def test_smolvla_trains_on_cpu_and_goes_through_publish_and_swap(cache, tmp_path):
    policy = build_policy(CONFIG, SCHEMA, TASKS, seed=0)
    vlm = resolve_vlm_path("")
    assert (vlm / "config.json").is_file() and ensure_tiny_vlm() == vlm  # generated once, then reused
    # Frozen backbone: only the action expert and projections train.
    trainable = policy.trainable_names()
    assert trainable and not any(".vlm." in name for name in trainable)
    frozen = {k: v.clone() for k, v in policy.model.state_dict().items() if ".vlm." in k}

    torch_batch = policy.train_batch_to_torch(batch(np.random.default_rng(0)))
    prompts = tokenizer_of(policy.model).batch_decode(torch_batch["observation.language.tokens"],
                                                      skip_special_tokens=True)
    assert any("Advantage: positive" in p for p in prompts) or any("Advantage: negative" in p for p in prompts)
    assert torch_batch["observation.images.top"].shape == (4, 3, 24, 32)

    step = OptimizerStep(policy.trainable_parameters(), policy.make_optimizer(), accumulation_steps=2)
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    losses = []
    for _ in range(6):
        per_sample = policy.sample_losses(policy.train_batch_to_torch(batch(rng)))
        assert per_sample.shape == (4,)
        step(per_sample.mean())
        losses.append(float(per_sample.detach().mean()))
    assert np.all(np.isfinite(losses)) and step.optimizer_steps == 3
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in frozen.items())
    policy.config = dataclasses.replace(CONFIG, precision="bf16")  # the AMP path (CPU autocast here)
    with policy.autocast():
        assert torch.is_autocast_enabled("cpu")
        bf16_losses = policy.sample_losses(policy.train_batch_to_torch(batch(rng)))
    step(bf16_losses.mean())
    assert torch.isfinite(bf16_losses).all()
    policy.config = CONFIG

    store = PolicyStore(tmp_path / "policies")
    manifest = store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names())
    assert manifest.config["lerobot_config"]["type"] == "smolvla"
    edge = FleetPolicy.from_manifest(manifest.config, store.tensors(manifest.version), manifest.version)
    slot = PolicySlot(build_policy(CONFIG, SCHEMA, TASKS, seed=1))
    slot.offer(edge)
    assert slot.swap_if_pending() and slot.current.version == manifest.version
    obs = {"state": np.ones(6, np.float32), "top": np.full((24, 32, 3), 128, np.uint8)}
    policy.reset()
    torch.manual_seed(3)
    expected = policy.select_action(obs, TASKS[0])
    torch.manual_seed(3)
    acted = slot.current.select_action(obs, TASKS[0])
    assert acted.shape == (3,) and np.all(np.isfinite(acted))
    np.testing.assert_allclose(acted, expected, atol=1e-5)  # same weights, same noise: same action


def test_smolvla_config_errors(cache, tmp_path):
    with pytest.raises(ConfigError, match="vlm_path"):
        resolve_vlm_path(str(tmp_path / "nowhere"))
    no_camera = Schema((FeatureSpec("state", "float32", (6,)),), FeatureSpec("action", "float32", (3,)))
    with pytest.raises(ConfigError, match="camera"):
        build_policy(CONFIG, no_camera, TASKS)
    with pytest.raises(ConfigError, match="hub"):
        PolicyConfig(type="pi05")
