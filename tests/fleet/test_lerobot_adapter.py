"""Real LeRobot ACT/Diffusion policies behind FleetPolicy: fit, act, serialize."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fleet.errors import ConfigError, InvalidInput
from fleet.policies import FleetPolicy, NormStats, PolicyConfig, build_policy, set_torch_threads
from fleet.types import FeatureSpec, Schema

STATE_DIM, ACTION_DIM, CHUNK = 39, 4, 10
TASKS = ("reach the button", "open the drawer", "push the puck")
SCHEMA = Schema(
    observation=(
        FeatureSpec("joints", "float32", (32,)),
        FeatureSpec("camera", "uint8", (8, 8, 3), is_image=True),  # not used by the state-only adapter
        FeatureSpec("gripper", "float64", (7,)),
    ),
    action=FeatureSpec("action", "float32", (ACTION_DIM,)),
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    set_torch_threads(1)


class LinearTasks:
    """Synthetic demos: action = W_task @ state (+ offset), same action over the chunk."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.weights = self.rng.normal(size=(len(TASKS), ACTION_DIM, STATE_DIM)) / np.sqrt(STATE_DIM)
        self.offset = np.array([0.5, -1.0, 2.0, 0.0])
        self.state_scale = self.rng.uniform(0.5, 3.0, size=STATE_DIM)

    def states(self, n: int) -> np.ndarray:
        return (self.rng.normal(size=(n, STATE_DIM)) * self.state_scale + 1.0).astype(np.float32)

    def target(self, task: int, state: np.ndarray) -> np.ndarray:
        return (self.weights[task] @ (state / self.state_scale) + self.offset).astype(np.float32)

    def batch(self, n: int) -> dict[str, np.ndarray]:
        states, tasks = self.states(n), self.rng.integers(0, len(TASKS), n)
        actions = np.stack([self.target(t, s) for t, s in zip(tasks, states, strict=True)])
        return {
            "obs/joints": states[:, :32],
            "obs/camera": np.zeros((n, 8, 8, 3), np.uint8),
            "obs/gripper": states[:, 32:].astype(np.float64),
            "task_index": tasks.astype(np.int64),
            "action": np.repeat(actions[:, None], CHUNK, axis=1),
            "action_is_pad": np.zeros((n, CHUNK), bool),
        }


def observation(state: np.ndarray) -> dict[str, np.ndarray]:
    return {"joints": state[:32], "gripper": state[32:].astype(np.float64), "camera": np.zeros((8, 8, 3), np.uint8)}


def tracking_error(policy: FleetPolicy, data: LinearTasks, per_task: int = 15) -> float:
    errors = []
    for task_index, task in enumerate(TASKS):
        for state in data.states(per_task):
            policy.reset()
            action = policy.select_action(observation(state), task)
            errors.append(np.abs(action - data.target(task_index, state)).mean())
    return float(np.mean(errors))


def fit(policy: FleetPolicy, data: LinearTasks, steps: int, batch_size: int = 32) -> list[float]:
    optimizer = policy.make_optimizer()
    losses = []
    for _ in range(steps):
        loss = policy.sample_losses(policy.train_batch_to_torch(data.batch(batch_size))).mean()
        optimizer.zero_grad()
        loss.backward()
        policy.clip_grad_norm_()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def stats_for(data: LinearTasks) -> NormStats:
    batch = data.batch(2000)
    states = np.concatenate([batch["obs/joints"], batch["obs/gripper"]], axis=1)
    return NormStats.from_data(states, batch["action"][:, 0])


@pytest.fixture(scope="module")
def trained() -> tuple[FleetPolicy, LinearTasks, float]:
    data = LinearTasks()
    policy = build_policy(PolicyConfig(), SCHEMA, TASKS, stats_for(data), seed=0)
    untrained_error = tracking_error(policy, data)
    torch.manual_seed(0)  # dropout
    losses = fit(policy, data, steps=300)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    return policy, data, untrained_error


def test_bc_fit_tracks_each_task(trained: tuple[FleetPolicy, LinearTasks, float]) -> None:
    policy, data, untrained_error = trained
    for task_index, task in enumerate(TASKS):
        errors = []
        for state in data.states(15):
            policy.reset()
            action = policy.select_action(observation(state), task)
            assert action.shape == (ACTION_DIM,) and action.dtype == np.float32
            errors.append(np.abs(action - data.target(task_index, state)).mean())
        assert np.mean(errors) < 0.35 * untrained_error, (task, np.mean(errors), untrained_error)


def test_action_disagreement_rises_when_chunk_re_predictions_disagree(
        trained: tuple[FleetPolicy, LinearTasks, float]) -> None:
    """ACT predicts 10 actions and executes 5: the next chunk re-predicts the last 5 ticks of the previous one.
    A steady state gives agreeing re-predictions; a state that jumps between chunks makes them disagree."""
    policy, data, _ = trained
    steady, jumps = data.states(1)[0], data.states(8)

    def disagreements(states) -> list[float]:
        policy.reset()
        assert policy.action_disagreement == 0.0
        seen = []
        for tick in range(40):
            policy.select_action(observation(states[(tick // 5) % len(states)]), TASKS[0])
            if tick % 5 == 0:  # a new chunk was predicted at this tick
                seen.append(policy.action_disagreement)
        return seen[1:]  # the first chunk has nothing to disagree with

    calm, jumpy = disagreements([steady]), disagreements(jumps)
    assert max(calm) < 0.2 and min(jumpy) > 2 * max(calm) and np.mean(jumpy) > 0.4, (calm, jumpy)
    policy.reset()
    assert policy.action_disagreement == 0.0


def test_task_conditioning_matters(trained: tuple[FleetPolicy, LinearTasks, float]) -> None:
    policy, data, _ = trained
    state = data.states(1)[0]
    actions = []
    for task in TASKS:
        policy.reset()
        actions.append(policy.select_action(observation(state), task))
    assert np.abs(actions[0] - actions[1]).mean() > 0.1


def test_manifest_round_trip_is_bit_identical(trained: tuple[FleetPolicy, LinearTasks, float]) -> None:
    policy, data, _ = trained
    manifest = json.loads(json.dumps(policy.manifest_config()))
    assert manifest["lerobot_config"]["type"] == "act"
    assert manifest["schema"]["observation"][1] == {"name": "camera", "dtype": "uint8", "shape": [8, 8, 3],
                                                   "is_image": True, "allow_nonfinite": False}
    tensors = policy.tensors()
    assert policy.trainable_names() <= set(tensors)
    assert {k for k in tensors if k.startswith("fleet_norm.")} == {
        "fleet_norm.state_mean", "fleet_norm.state_std", "fleet_norm.action_mean", "fleet_norm.action_std"}
    clone = FleetPolicy.from_manifest(manifest, tensors, version=7)
    assert clone.version == 7 and clone.tasks == TASKS and clone.schema == SCHEMA
    policy.reset()
    for state in data.states(7):  # crosses a chunk boundary (n_action_steps=5)
        expected = policy.select_action(observation(state), TASKS[1])
        np.testing.assert_array_equal(clone.select_action(observation(state), TASKS[1]), expected)


def test_load_tensors_updates_in_place_and_checks_the_layout(trained: tuple[FleetPolicy, LinearTasks, float]) -> None:
    policy, data, _ = trained
    fresh = build_policy(PolicyConfig(), SCHEMA, TASKS, seed=1)
    fresh.load_tensors(policy.tensors(), version=3)
    assert fresh.version == 3
    state = data.states(1)[0]
    policy.reset()
    np.testing.assert_array_equal(fresh.select_action(observation(state), TASKS[2]),
                                  policy.select_action(observation(state), TASKS[2]))
    other_tasks = build_policy(PolicyConfig(), SCHEMA, TASKS[:2])
    with pytest.raises(InvalidInput):  # another task count: another task-embedding shape
        other_tasks.load_tensors(policy.tensors(), version=4)
    bad = dict(policy.tensors())
    bad.pop("fleet_norm.state_std")
    with pytest.raises(InvalidInput):
        fresh.load_tensors(bad, version=4)


def test_select_action_keeps_train_mode_and_warns_once_on_unknown_task(
        trained: tuple[FleetPolicy, LinearTasks, float], caplog: pytest.LogCaptureFixture) -> None:
    policy, data, _ = trained
    policy.model.train()
    state = data.states(1)[0]
    with caplog.at_level(logging.WARNING, logger="fleet.policies.lerobot_adapter"):
        for _ in range(3):
            policy.reset()
            action = policy.select_action(observation(state), "juggle")
    assert policy.model.training
    assert np.all(np.isfinite(action))
    assert sum("juggle" in r.getMessage() for r in caplog.records) == 1
    batch = data.batch(4)
    batch["task_index"][:] = -1
    assert torch.count_nonzero(policy.train_batch_to_torch(batch)["observation.environment_state"]) == 0


def test_diffusion_state_only() -> None:
    data = LinearTasks(seed=1)
    policy = build_policy(PolicyConfig(type="diffusion"), SCHEMA, TASKS, stats_for(data))
    batch = policy.train_batch_to_torch(data.batch(8))
    assert policy.horizon == 12  # chunk_size 10 rounded up to the U-Net's multiple of 4
    assert batch["action"].shape == (8, 12, ACTION_DIM) and batch["observation.state"].shape == (8, 1, STATE_DIM)
    assert batch["action_is_pad"][:, CHUNK:].all()
    losses = fit(policy, data, steps=3, batch_size=8)
    assert np.all(np.isfinite(losses))
    clone = FleetPolicy.from_manifest(json.loads(json.dumps(policy.manifest_config())), policy.tensors(), 1)
    state = data.states(1)[0]
    torch.manual_seed(0)
    expected = policy.select_action(observation(state), TASKS[0])
    torch.manual_seed(0)
    np.testing.assert_array_equal(clone.select_action(observation(state), TASKS[0]), expected)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"'pi0'.*hub.*\('act', 'diffusion', 'smolvla'\)"):
        PolicyConfig(type="pi0")
    with pytest.raises(ConfigError, match="n_action_steps"):
        PolicyConfig(chunk_size=4, n_action_steps=5)
    with pytest.raises(ConfigError, match="lr"):
        PolicyConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="tasks"):
        build_policy(PolicyConfig(), SCHEMA, [])
    manifest = build_policy(PolicyConfig(), SCHEMA, TASKS).manifest_config()
    manifest["lerobot_config"]["no_such_field"] = 1
    with pytest.raises(ConfigError):
        FleetPolicy.from_manifest(manifest, {}, version=1)


def test_norm_stats() -> None:
    states = np.array([[1.0, 5.0], [3.0, 5.0]], np.float64)
    actions = np.array([[0.0], [2.0]])
    stats = NormStats.from_data(states, actions)
    np.testing.assert_allclose(stats.state_mean, [2.0, 5.0])
    np.testing.assert_allclose(stats.state_std, [1.0, 0.0])
    assert stats.state_mean.dtype == np.float32 and stats.action_std.dtype == np.float32
    schema = Schema((FeatureSpec("s", "float32", (2,)),), FeatureSpec("a", "float32", (1,)))
    policy = build_policy(PolicyConfig(), schema, ["t"], stats)
    assert torch.equal(policy.tensors()["fleet_norm.state_std"], torch.tensor([1.0, 1e-2]))  # clamped
    with pytest.raises(InvalidInput):
        NormStats.from_data(np.zeros((0, 2)), np.zeros((0, 1)))
    with pytest.raises(InvalidInput):
        build_policy(PolicyConfig(), schema, ["t"], NormStats.identity(3, 1))


def test_manifest_keeps_allow_nonfinite_of_the_schema():
    """One schema <-> dict (fleet.convert): the adapter's own copy dropped allow_nonfinite."""
    from fleet.policies import PolicyConfig, build_policy
    from fleet.types import FeatureSpec, Schema

    schema = Schema((FeatureSpec("state", "float32", (3,)), FeatureSpec("depth", "float32", (2,), False, True)),
                    FeatureSpec("action", "float32", (2,)))
    policy = build_policy(PolicyConfig(chunk_size=2, n_action_steps=2, dim_model=16, n_heads=2, dim_feedforward=32,
                                       n_encoder_layers=1, n_decoder_layers=1), schema, ["t"])
    config = policy.manifest_config()
    assert config["schema"]["observation"][1]["allow_nonfinite"] is True
    from fleet.policies import FleetPolicy

    assert FleetPolicy.from_manifest(config, policy.tensors(), version=1).schema == schema
