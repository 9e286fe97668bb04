"""RECAP: the value function learns steps-to-go, advantage labels are right (interventions forced
positive), it trains on a real buffer, and the conditioned policy acts positive on the edge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cloud.algorithms.recap import Recap, RecapConfig, improvement_indicators
from cloud.buffer import SOURCE_OFFLINE
from cloud.policy_store import PolicyStore
from cloud.trainer import Trainer
from edge.agent import build_fleet_policy
from edge.hotswap import PolicySlot
from edge.loop import ControlLoop, LoopConfig
from edge.operator import NoOperator
from edge.sim.metaworld import SCHEMA as METAWORLD_SCHEMA
from edge.sim.metaworld import MetaWorldRobot
from cloud.trainer_config import TrainerConfig
from fleet.errors import ConfigError
from fleet.policies import PolicyConfig, build_policy, set_torch_threads
from fleet.types import FeatureSpec, Schema
from tests.cloud.fleet_sim import IngestSink, synthetic_episode

SCHEMA = Schema((FeatureSpec("state", "float32", (4,)),), FeatureSpec("action", "float32", (2,)))
TASKS = ("task a", "task b")
TINY = PolicyConfig(chunk_size=3, n_action_steps=3, dim_model=16, n_heads=2, dim_feedforward=32,
                    n_encoder_layers=1, n_decoder_layers=1, conditioning="advantage")


@pytest.fixture(autouse=True)
def _one_thread():
    set_torch_threads(1)


def episode_batch(rng: np.random.Generator, n: int, length: int = 20, n_step: int = 5) -> dict[str, np.ndarray]:
    """Windows of synthetic episodes whose state is their progress t / length; odd task ids fail."""
    t = rng.integers(0, length, n)
    task = rng.integers(0, 2, n)
    state = np.zeros((n, 4), np.float32)
    state[:, 0], state[:, 1] = t / length, task
    nxt = state.copy()
    nxt[:, 0] = np.minimum(t + n_step, length - 1) / length
    return {"obs/state": state, "next/state": nxt, "has_next": t + n_step < length, "task_index": task,
            "t": t, "episode_len": np.full(n, length), "task_max_len": np.full(n, length), "success": task == 0,
            "is_intervention": np.zeros(n, bool), "is_online": np.ones(n, bool),
            "action": np.zeros((n, 3, 2), np.float32), "action_is_pad": np.zeros((n, 3), bool)}


@pytest.mark.parametrize("head", ["distributional", "scalar"])
def test_value_function_learns_monotone_steps_to_go(head):
    policy = build_policy(TINY, SCHEMA, TASKS)
    recap = Recap(policy, RecapConfig(value_head=head, n_step=5, value_lr=1e-2, value_hidden_dim=64,
                                      value_warmup_steps=0))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for _ in range(300):
        stats = recap.update(episode_batch(rng, 32)).stats
    assert np.isfinite(stats["loss/value"]) and np.isfinite(stats["loss/bc"])
    t = np.arange(20)
    for task, failed in ((0, 0.0), (1, 1.0)):
        probe = episode_batch(rng, 20)
        probe["obs/state"][:, 0], probe["obs/state"][:, 1] = t / 20, task
        probe["task_index"][:] = task
        with torch.no_grad():
            v = recap.value.value(recap._value_input(probe, "obs/")).numpy()
        truth = -(20 - t + 20 * failed) / 40  # C = the longest episode: normalised by 20 + 20
        assert np.all(np.diff(v) > 0), (task, v)  # fewer steps to go, higher value
        assert np.abs(v - truth).mean() < 0.05, (task, v, truth)


def test_advantage_labels_and_forced_positive_interventions():
    rng = np.random.default_rng(0)
    advantage = np.linspace(-1, 1, 1000)
    operator = np.zeros(1000, bool)
    operator[:100] = True  # the worst advantages, but the operator drove
    labels = improvement_indicators(advantage, np.full(1000, 0.4), operator, 0.0, rng)
    np.testing.assert_array_equal(labels, ((advantage > 0.4) | operator).astype(int))
    dropped = improvement_indicators(advantage, np.full(1000, 0.4), operator, 0.3, rng)
    assert 0.25 < np.mean(dropped == -1) < 0.35
    assert set(dropped[operator].tolist()) <= {1, -1}

    # Per-task thresholds in the algorithm: about the top 30% of each task's advantages are positive,
    # whatever the task's scale; operator steps are positive whatever their advantage.
    policy = build_policy(TINY, SCHEMA, TASKS)
    recap = Recap(policy, RecapConfig(n_step=0, indicator_dropout=0.0, value_warmup_steps=0))
    positives = {0: [], 1: []}
    for _ in range(30):
        batch = episode_batch(rng, 64)
        batch["is_intervention"][:8] = True
        recap.update(batch)
        for task in (0, 1):
            mask = (batch["task_index"] == task) & ~batch["is_intervention"]
            positives[task].extend(recap.last_indicator[mask] == 1)
        assert (recap.last_indicator[:8] == 1).all()
    for task in (0, 1):
        assert 0.2 <= np.mean(positives[task][-300:]) <= 0.45, (task, np.mean(positives[task][-300:]))
    warmup = Recap(policy, RecapConfig(value_warmup_steps=5, indicator_dropout=0.0))
    batch = episode_batch(rng, 16)
    batch["is_intervention"][:4] = True
    warmup.update(batch)
    np.testing.assert_array_equal(warmup.last_indicator, [1] * 4 + [-1] * 12)


def test_recap_requires_a_conditioned_policy():
    with pytest.raises(ConfigError, match="conditioning"):
        Recap(build_policy(dataclasses.replace(TINY, conditioning="none"), SCHEMA, TASKS))


@pytest.mark.timeout(120)
def test_recap_trains_online_on_the_buffer_and_the_edge_acts_positive(redis_proc, tmp_path):
    """The trainer runs RECAP on a real buffer; its published policy is advantage-conditioned, and a
    conditioned policy rebuilt from a manifest acts with "Advantage: positive" (and CFG) in the edge loop."""
    demos = IngestSink(redis_proc.url, "demos", SCHEMA, TASKS, source=SOURCE_OFFLINE)
    robot = IngestSink(redis_proc.url, "r0", SCHEMA, TASKS)
    for task_id in (0, 1):
        demos.write_episode(TASKS[task_id], *synthetic_episode(task_id, 10))
        robot.write_episode(TASKS[task_id], *synthetic_episode(task_id, 12, interventions=[True] * 4))
        robot.write_episode(TASKS[task_id], *synthetic_episode(task_id, 15, success=False))
    cfg = TrainerConfig(redis_url=redis_proc.url, policy_dir=str(tmp_path / "policies"), tasks=TASKS,
                        batch_size=16, seed_bc_steps=5, publish_every_steps=10,
                        min_labeled_steps=8, max_steps=25, checkpoint_every_steps=0, checkpoint_every_s=0,
                        policy=dataclasses.replace(TINY, conditioning="none"),
                        algorithm=RecapConfig(n_step=3, value_warmup_steps=10, cfg_beta=1.5))
    trainer = Trainer(cfg)
    assert trainer.run().step == 25
    assert trainer.sampler.index.count("online") == 2 * (12 + 15)  # every finished episode trains
    manifest = trainer.store.manifest(trainer.store.latest_version())
    assert manifest.config["policy_config"]["conditioning"] == "advantage"
    assert manifest.config["policy_config"]["cfg_beta"] == 1.5
    assert manifest.config["policy_config"]["value_head"] == "distributional"  # its value function rides along
    assert "fleet_value.failure_threshold" in {t.name for t in manifest.tensors}
    assert np.isfinite(trainer.state.last_loss)

    # A conditioned policy whose action is +1 for "positive", -1 for "negative", 0 without the indicator.
    policy = build_policy(dataclasses.replace(TINY, lr=3e-3), METAWORLD_SCHEMA, ("reach the goal",))
    optimizer = policy.make_optimizer()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for _ in range(150):
        indicator = rng.integers(-1, 2, 32)
        target = np.zeros((32, 3, 4), np.float32)
        target[..., 0] = np.where(indicator == -1, 0.0, 2.0 * indicator - 1)[:, None]
        batch = {"obs/state": rng.normal(size=(32, 39)).astype(np.float32), "task_index": np.zeros(32, int),
                 "indicator": indicator, "action": target, "action_is_pad": np.zeros((32, 3), bool)}
        loss = policy.sample_losses(policy.train_batch_to_torch(batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    store = PolicyStore(tmp_path / "edge-policies")
    published = store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names())
    first = _edge_actions(build_fleet_policy(published, store.tensors(published.version)))
    assert np.all(np.abs(first[:, 0] - 1.0) < 0.2), first[:, 0]
    guided_config = dict(published.config, policy_config={**published.config["policy_config"], "cfg_beta": 2.0})
    guided = build_fleet_policy(dataclasses.replace(published, config=guided_config), store.tensors(1))
    assert np.all(np.abs(_edge_actions(guided)[:, 0] - 2.0) < 0.4)  # u + 2 (c - u) with u ~ 0, c ~ 1


def _edge_actions(policy) -> np.ndarray:
    """The policy actions of one 6-step episode of the edge control loop on a MetaWorld robot."""
    recorded = []

    class Sink:
        def record(self, episode_id, task, evaluation, step, episode_end):
            recorded.append(step.policy_action)

    with MetaWorldRobot(("reach-v3",), max_episode_steps=6) as robot:
        loop = ControlLoop("edge", robot, PolicySlot(policy), NoOperator(), Sink(),
                           LoopConfig(realtime=False, max_episode_steps=6))
        loop.run_episode()
    return np.stack(recorded)
