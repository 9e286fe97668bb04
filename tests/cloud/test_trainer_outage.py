"""Outages are waited out, not crashed on: a `fleet trainer` process keeps running while its Redis is
SIGKILLed and restarted from its AOF, and while its policy directory refuses writes."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import redis as redis_lib

from edge.sim.demos import seed_scripted_demos
from cloud.policy_store import PolicyStore
from fleet.redis_server import free_port, start_redis
from tests.cloud.test_recovery import TASKS, start_trainer, start_watched_trainer, status, trainer_args, wait_for
from tests.test_observability import scrape, total

pytestmark = [pytest.mark.slow]


def gauge(port: int, name: str) -> float:
    return total(scrape(port), name)


def step_of(client: redis_lib.Redis) -> int:
    try:
        return int(status(client).get("step", 0))
    except redis_lib.exceptions.ConnectionError:
        return -1


OUTAGE_S = 30.0
"""Long enough for the backoff (0.25 s doubling, fleet.redis_client.OUTAGE_BACKOFF_S) to reach its 10 s cap at ~16 s
and wait at it."""


@pytest.mark.timeout(240)
def test_trainer_waits_out_redis_kill_and_restart(tmp_path):
    redis_proc = start_redis(tmp_path / "redis", appendfsync="always")
    client = redis_lib.Redis.from_url(redis_proc.url)
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=40)
    trainer, policy_dir, metrics_port, log_path = start_watched_trainer(redis_proc.url, tmp_path)
    try:
        wait_for(lambda: step_of(client) >= 15 and len(PolicyStore(policy_dir).versions()) >= 2,
                 "training past seed BC and a published version", trainer, log_path, timeout_s=90)
        before_step = step_of(client)
        before_version = max(PolicyStore(policy_dir).versions())
        pid = status(client)["pid"]

        redis_proc.kill()  # SIGKILL
        wait_for(lambda: gauge(metrics_port, "fleet_trainer_redis_up") == 0,
                 "fleet_trainer_redis_up 0", trainer, log_path, timeout_s=30)
        assert gauge(metrics_port, "fleet_redis_up") == 0
        # Stay down past the backoff's cap, watching that the trainer does not exit.
        down_until = time.monotonic() + OUTAGE_S
        wait_for(lambda: time.monotonic() > down_until, f"{OUTAGE_S:.0f} s of outage", trainer, log_path,
                 timeout_s=OUTAGE_S + 30)
        assert trainer.poll() is None
        assert gauge(metrics_port, "fleet_trainer_redis_up") == 0

        redis_proc = start_redis(redis_proc.data_dir, port=redis_proc.port, appendfsync="always")
        wait_for(lambda: step_of(client) > before_step + 5, "a step past the pre-outage one", trainer, log_path,
                 timeout_s=60)
        wait_for(lambda: max(PolicyStore(policy_dir).versions()) > before_version, "a new version", trainer,
                 log_path, timeout_s=60)
        now = status(client)
        assert now["pid"] == pid  # the same process, no restart
        assert now["resumed_from"] == "new policy"  # not re-initialised from a checkpoint
        wait_for(lambda: gauge(metrics_port, "fleet_trainer_redis_up") == 1, "fleet_trainer_redis_up 1",
                 trainer, log_path, timeout_s=30)
        assert trainer.poll() is None
        text = log_path.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert text.count("Redis is unavailable") == 1, text[-3000:]  # one warning per outage
    finally:
        trainer.kill()
        trainer.wait(30)
        client.close()
        redis_proc.kill()


@pytest.mark.timeout(120)
def test_trainer_starts_while_redis_is_down(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    policy_dir = tmp_path / "policies"
    log_path = tmp_path / "trainer.log"
    trainer = start_trainer(trainer_args(url, str(policy_dir), tmp_path / "ckpt"), log_path)
    redis_proc = None
    try:
        wait_for(lambda: "Redis is unavailable" in log_path.read_text(), "the outage warning", trainer, log_path,
                 timeout_s=60)
        redis_proc = start_redis(tmp_path / "redis", port=port)
        seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=40)
        wait_for(lambda: len(PolicyStore(policy_dir).versions()) >= 1, "a published version", trainer, log_path,
                 timeout_s=90)
        assert trainer.poll() is None
        assert "Traceback" not in log_path.read_text()
    finally:
        trainer.kill()
        trainer.wait(30)
        if redis_proc is not None:
            redis_proc.kill()


@pytest.mark.timeout(120)
def test_trainer_postpones_publishing_while_the_policy_dir_is_unwritable(redis_proc, redis_client, tmp_path):
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=40)
    policy_dir = tmp_path / "policies"
    log_path = tmp_path / "trainer.log"
    trainer = start_trainer(trainer_args(redis_proc.url, str(policy_dir), tmp_path / "ckpt"), log_path)
    try:
        wait_for(lambda: int(status(redis_client).get("step", 0)) >= 15 and len(PolicyStore(policy_dir).versions())
                 >= 2, "training past seed BC and a published version", trainer, log_path, timeout_s=90)
        # chmod 0500 does not stop root: replace the directory with a file instead (mkdir under it fails).
        aside = tmp_path / "policies-aside"
        os.rename(policy_dir, aside)
        policy_dir.write_text("not a directory")
        wait_for(lambda: "cannot write the policy" in log_path.read_text(), "the publish warning", trainer,
                 log_path, timeout_s=60)
        blocked_step = int(status(redis_client)["step"])
        wait_for(lambda: int(status(redis_client)["step"]) > blocked_step + 15, "training continuing", trainer,
                 log_path, timeout_s=60)
        assert trainer.poll() is None

        before_version = max(PolicyStore(aside).versions())
        policy_dir.unlink()
        os.rename(aside, policy_dir)
        wait_for(lambda: max(PolicyStore(policy_dir).versions()) > before_version, "a version after the fix",
                 trainer, log_path, timeout_s=90)
        assert int(redis_client.get(PolicyStore(policy_dir).keys.latest)) == max(PolicyStore(policy_dir).versions())
        assert trainer.poll() is None
        assert "Traceback" not in log_path.read_text()
    finally:
        trainer.kill()
        trainer.wait(30)
        shutil.rmtree(tmp_path / "policies-aside", ignore_errors=True)
