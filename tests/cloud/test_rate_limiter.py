"""The Reverb-style SampleToInsertRatio, alone and holding a real trainer to its update-to-data ratio."""

from __future__ import annotations

import threading

import pytest

from cloud.buffer import SOURCE_OFFLINE
from cloud.rate_limiter import RateLimiterConfig, SampleToInsertRatio
from cloud.trainer import Trainer
from cloud.trainer_config import TrainerConfig
from fleet.errors import ConfigError
from fleet.policies import PolicyConfig
from fleet.types import FeatureSpec, Schema
from tests.cloud.fleet_sim import IngestSink, synthetic_episode

TASKS = ("task a",)
SCHEMA = Schema((FeatureSpec("state", "float32", (4,)),), FeatureSpec("action", "float32", (2,)))
TINY = PolicyConfig(chunk_size=3, n_action_steps=3, dim_model=16, n_heads=2, dim_feedforward=32,
                    n_encoder_layers=1, n_decoder_layers=1)


def test_ratio_min_size_and_error_buffer():
    limiter = SampleToInsertRatio(samples_per_insert=2.0, min_size_steps=10)
    limiter.set_inserted(100)  # the zero point: steps stored before the limiter started are not fresh
    assert not limiter.can_sample(4)
    limiter.set_inserted(109)
    assert not limiter.can_sample(4)  # 9 < min_size_steps
    limiter.set_inserted(110)
    for _ in range(5):
        assert limiter.can_sample(4)
        limiter.sample(4)
    assert limiter.samples == 20 and not limiter.can_sample(4)  # 20 samples = 2 x 10 inserts
    limiter.set_inserted(112)
    assert limiter.can_sample(4)
    slack = SampleToInsertRatio(samples_per_insert=1.0, error_buffer=8.0)
    slack.set_inserted(0)
    slack.set_inserted(4)
    slack.sample(4)
    assert slack.can_sample(8) and not slack.can_sample(9)  # 4 + 8 <= 1 x 4 + 8
    stop = threading.Event()
    stop.set()
    assert not slack.wait(100, lambda: 4, stop)  # a stop ends the wait
    with pytest.raises(ConfigError, match="samples_per_insert"):
        RateLimiterConfig(samples_per_insert=-1)
    assert SampleToInsertRatio.from_config(RateLimiterConfig()) is None


@pytest.mark.timeout(90)
def test_trainer_holds_the_update_to_data_ratio(redis_proc):
    demos = IngestSink(redis_proc.url, "demos", SCHEMA, TASKS, source=SOURCE_OFFLINE)
    demos.write_episode(TASKS[0], *synthetic_episode(0, 20))
    robot = IngestSink(redis_proc.url, "r0", SCHEMA, TASKS)
    spi, batch, episode_steps = 2.0, 8, 10
    cfg = TrainerConfig(redis_url=redis_proc.url, policy_dir=str(redis_proc.data_dir.parent / "policies"),
                        tasks=TASKS, batch_size=batch, seed_bc_steps=0, min_labeled_steps=1,
                        publish_every_steps=1000, refresh_interval_s=0.02, checkpoint_every_steps=0,
                        checkpoint_every_s=0, max_steps=1000, policy=TINY,
                        rate_limit=RateLimiterConfig(samples_per_insert=spi, min_size_steps=episode_steps))
    stop = threading.Event()
    trainer = Trainer(cfg, stop)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    try:
        written = 0
        for _ in range(4):
            # The trainer catches up with the data, then waits for more: it never runs ahead of the ratio.
            assert _wait_for(lambda: trainer.rate_limiter is not None and trainer.state.samples + batch
                             > spi * written and trainer.rate_limiter.waits > 0, stop), trainer.state
            assert trainer.state.samples <= spi * written
            robot.write_episode(TASKS[0], *synthetic_episode(0, episode_steps, interventions=[True] * 5))
            written += episode_steps
        assert _wait_for(lambda: trainer.state.samples + batch > spi * written, stop)
        assert spi * written - batch < trainer.state.samples <= spi * written
    finally:
        stop.set()
        thread.join(30)
    assert trainer.rate_limiter.waits >= 4


def _wait_for(cond, stop: threading.Event, timeout_s: float = 30.0) -> bool:
    """Poll ``cond`` (trainer counters have no event to wait on) until true or the timeout."""
    deadline = threading.Event()
    timer = threading.Timer(timeout_s, deadline.set)
    timer.start()
    try:
        while not cond():
            if deadline.wait(0.02) or stop.is_set():
                return cond()
        return True
    finally:
        timer.cancel()
