"""HG-DAgger: the loss weighting and gradient accumulation, and a real improvement on MetaWorld.

The MetaWorld test runs the pieces of the fleet in-process, without gRPC: the edge control loop with
the simulated operator, a sink writing through cloud.ingest into a real redis-server, the trainer's
sampler/algorithm/publisher, and evaluation without the operator on held-out task variants.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.algorithms import algorithm_class
from cloud.algorithms.base import OptimizerStep
from cloud.algorithms.hg_dagger import HGDAgger, HGDAggerConfig
from edge.sim.demos import seed_scripted_demos
from cloud.sampler import SamplerConfig
from cloud.trainer import Trainer
from edge.hotswap import PolicySlot
from edge.loop import ControlLoop, LoopConfig
from edge.operator import NoOperator, OperatorConfig
from edge.sim.operator import SimulatedOperator
from edge.sim.metaworld import SCHEMA, MetaWorldRobot
from cloud.trainer_config import TrainerConfig
from fleet.errors import ConfigError
from fleet.policies import FleetPolicy, PolicyConfig, build_policy, set_torch_threads
from tests.cloud.fleet_sim import IngestSink

TASKS = ("drawer-close-v3", "button-press-topdown-v3")
EPISODE_STEPS = 80
SMALL = PolicyConfig(chunk_size=5, n_action_steps=5, dim_model=64, n_heads=2, dim_feedforward=128,
                     n_encoder_layers=1, n_decoder_layers=1, lr=1e-3)


@pytest.fixture(autouse=True)
def _one_thread():
    set_torch_threads(1)


def _batch(rng: np.random.Generator, n: int = 8) -> dict[str, np.ndarray]:
    return {"obs/state": rng.normal(size=(n, 39)).astype(np.float32), "task_index": np.zeros(n, int),
            "action": rng.normal(size=(n, 5, 4)).astype(np.float32), "action_is_pad": np.zeros((n, 5), bool),
            "is_intervention": np.arange(n) < n // 2, "is_online": np.arange(n) < n // 2}


def test_intervention_weight_and_gradient_accumulation():
    rng = np.random.default_rng(0)
    policy = build_policy(SMALL, SCHEMA, ("close the drawer",))
    algo = HGDAgger(policy, HGDAggerConfig(intervention_weight=3.0), accumulation_steps=2)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    torch.manual_seed(0)
    first = algo.update(_batch(rng))
    losses = first.sample_losses
    assert losses.shape == (8,)
    weights = np.where(np.arange(8) < 4, 3.0, 1.0)
    assert first.stats["loss/bc"] == pytest.approx((weights * losses).sum() / weights.sum(), rel=1e-5)
    assert "grad_norm" not in first.stats  # accumulating: no optimizer step yet
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in before.items())
    second = algo.update(_batch(rng))
    assert "grad_norm" in second.stats and algo.step.optimizer_steps == 1
    assert any(not torch.equal(v, policy.model.state_dict()[k]) for k, v in before.items())
    restored = HGDAgger(policy, accumulation_steps=2)
    restored.load_state_dict(algo.state_dict())
    assert restored.step.micro_steps == 2
    assert algorithm_class("hg_dagger") is HGDAgger
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'"):
        algorithm_class("ppo")
    with pytest.raises(ConfigError, match="intervention_weight"):
        HGDAggerConfig(intervention_weight=0)
    with pytest.raises(ConfigError, match="grad_accumulation_steps"):
        OptimizerStep([], torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), accumulation_steps=0)


class _Discard:
    def record(self, *args) -> None:
        pass


def _evaluate(policy: FleetPolicy, episodes_per_task: int = 10) -> dict[str, float]:
    """Autonomous success per task on held-out variants, the same variant sequence every call."""
    successes: dict[str, list[bool]] = {}
    with MetaWorldRobot(TASKS, seed=123, max_episode_steps=EPISODE_STEPS, held_out=True) as robot:
        loop = ControlLoop("eval", robot, PolicySlot(policy), NoOperator(), _Discard(),
                           LoopConfig(realtime=False, max_episode_steps=EPISODE_STEPS))
        for _ in range(episodes_per_task * len(TASKS)):
            summary = loop.run_episode()
            successes.setdefault(loop.stats().current_task, []).append(summary.success)
    return {task: float(np.mean(s)) for task, s in successes.items()}


@pytest.mark.timeout(240)
def test_hg_dagger_improves_metaworld_success_over_the_starting_policy(redis_proc, tmp_path):
    torch.manual_seed(0)
    instructions = MetaWorldRobot(TASKS).tasks
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=EPISODE_STEPS)
    trainer = Trainer(TrainerConfig(
        redis_url=redis_proc.url, policy_dir=str(tmp_path / "policies"), tasks=instructions, batch_size=32,
        seed_bc_steps=100, min_labeled_steps=8, checkpoint_every_steps=0, checkpoint_every_s=0, policy=SMALL,
        sampler=SamplerConfig(adaptive=False)))
    trainer.setup()
    trainer.seed_bc()  # a weak starting policy: behaviour cloning on one demonstration per task

    def published() -> FleetPolicy:
        version = trainer.store.latest_version()
        return FleetPolicy.from_manifest(trainer.store.manifest(version).config, trainer.store.tensors(version),
                                         version)

    start = _evaluate(published())
    sink = IngestSink(redis_proc.url, "robot-0", SCHEMA, instructions)
    slot = PolicySlot(published())
    operator = SimulatedOperator(OperatorConfig(seed=0, segment_steps=20))
    with MetaWorldRobot(TASKS, seed=7, max_episode_steps=EPISODE_STEPS) as robot:
        loop = ControlLoop("robot-0", robot, slot, operator, sink,
                           LoopConfig(realtime=False, max_episode_steps=EPISODE_STEPS))
        for _ in range(5):  # rounds: episodes with the operator, then updates on the aggregate, then publish
            for _ in range(2 * len(TASKS)):
                loop.run_episode()
            trainer.sampler.refresh()
            for _ in range(100):
                batch = trainer.sampler.sample()
                trainer.sampler.observe_losses(batch, trainer.algorithm.update(batch).sample_losses)
            trainer.publisher.publish(trainer.policy, step=0)
            slot.offer(published())  # swapped in at the next episode boundary
    assert loop.stats().intervention_steps > 0 and trainer.sampler.index.count("online") > 0
    end = _evaluate(published())
    gain = np.mean(list(end.values())) - np.mean(list(start.values()))
    assert gain >= 0.3, (start, end)
    assert all(end[task] >= start[task] for task in start), (start, end)
