"""Publishing a moving average of the weights (``--publish_average_steps``): robots get the average, the
trainer keeps training its own weights, the seed-BC version is untouched and a checkpoint keeps the average
(real Redis, real LeRobot ACT)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from cloud.trainer import Trainer
from cloud.trainer_config import TrainerConfig
from cloud.weight_average import WeightAverage
from edge.sim.demos import seed_scripted_demos
from fleet.errors import ConfigError
from tests.cloud.test_checkpoints import SMALL, TASKS


def test_the_average_follows_the_weights_with_a_warm_up(redis_proc, tmp_path):
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=30)
    trainer = Trainer(TrainerConfig(redis_url=redis_proc.url, policy_dir=str(tmp_path / "p"), tasks=TASKS,
                                    seed_bc_steps=0, policy=SMALL, checkpoint_dir=str(tmp_path / "c")),
                      threading.Event())
    trainer.setup()
    policy, average = trainer.policy, WeightAverage(steps=4)
    average.start(policy)
    before = policy.tensors()
    assert set(average.average) == {n for n in policy.trainable_names() if before[n].is_floating_point()}
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1.0)
    average.update()  # warm-up: the first update weighs the new weights 0.9, not 1/4
    published = average.published(policy)
    for name in average.average:
        assert torch.allclose(published[name], before[name] + 0.9), name
    for name in set(before) - set(average.average):  # normalisation stats and buffers are the newest
        assert torch.equal(published[name], policy.tensors()[name]), name
    for _ in range(200):
        average.update()
    assert average.decay == 0.75
    name = next(iter(average.average))
    assert torch.allclose(average.average[name], before[name] + 1.0)  # converges on weights that stay put


@pytest.mark.timeout(120)
def test_robots_get_the_average_and_a_checkpoint_keeps_it(redis_proc, tmp_path):
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=30)
    cfg = TrainerConfig(redis_url=redis_proc.url, policy_dir=str(tmp_path / "policies"), tasks=TASKS,
                        batch_size=8, seed_bc_steps=6, publish_every_steps=8, min_labeled_steps=8,
                        checkpoint_every_steps=4, checkpoint_every_s=0, max_steps=14, policy=SMALL,
                        publish_average_steps=50)
    first = Trainer(cfg)
    assert first.run().step == 14
    versions = first.store.versions()  # the seed-BC version and step 14's (6 + 8)
    assert len(versions) == 2
    last = first.store.tensors(versions[-1])
    trainable = set(first.average.average)
    live = first.policy.tensors()
    for name in trainable:
        assert torch.equal(last[name], first.average.average[name]), name
    assert any(not torch.equal(last[name], live[name]) for name in trainable)  # not the trainer's weights
    assert first.average.updates == 14 - 6

    # The seed-BC version is what seed BC trained, as without averaging.
    plain = Trainer(dataclasses.replace(cfg, publish_average_steps=0, max_steps=6,
                                        policy_dir=str(tmp_path / "plain"), redis_url=f"{redis_proc.url.rsplit('/', 1)[0]}/1",
                                        checkpoint_dir=str(tmp_path / "plain-checkpoints")))
    seed_scripted_demos(plain.cfg.redis_url, TASKS, episodes_per_task=1, max_episode_steps=30)
    plain.run()
    v1, plain_v1 = first.store.tensors(versions[0]), plain.store.tensors(plain.store.versions()[0])
    assert all(torch.equal(v1[name], plain_v1[name]) for name in v1)

    resumed = Trainer(dataclasses.replace(cfg, max_steps=20), threading.Event())
    resumed.setup()
    assert resumed.average.updates == 8
    for name in trainable:
        assert torch.equal(resumed.average.average[name], first.average.average[name]), name
    resumed.run()
    assert resumed.average.updates == 14


def test_the_option_is_checked():
    with pytest.raises(ConfigError, match=r"publish_average_steps \(-1\) must be >= 0"):
        TrainerConfig(publish_average_steps=-1)
    with pytest.raises(ConfigError, match="publish_average_steps .* with fsdp"):
        TrainerConfig(publish_average_steps=10, distributed_strategy="fsdp")
