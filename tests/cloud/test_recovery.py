"""Learner crash recovery with real processes: `python -m fleet.cli trainer` children against a real
redis-server, SIGKILLed mid-training and mid-checkpoint, and SIGTERMed (the restarted one, to keep
the number of process starts, ~10 s each, down)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud.buffer.reader import BufferReader
from cloud.buffer import ROBOTS_KEY, RobotKeys
from cloud.checkpoints import CheckpointDir
from edge.sim.demos import seed_scripted_demos
from cloud.policy_store import PolicyStore
from cloud.trainer import TRAINER_STATUS_KEY, Trainer
from edge.client import FleetClient
from edge.sim.metaworld import SCHEMA
from fleet import PROTOCOL_VERSION
from cloud.trainer_config import TrainerConfig
from fleet.cli import parse_config
from fleet.convert import chunk_to_pb
from fleet.types import Chunk, EpisodeSummary, RobotInfo, Step

TASKS = ("reach the goal", "press the button from the top")


def trainer_args(redis_url: str, policy_dir: str, checkpoint_dir: Path, *extra: str) -> list[str]:
    return ["trainer", "--redis_url", redis_url, "--policy_dir", policy_dir, "--checkpoint_dir", str(checkpoint_dir),
            "--tasks", json.dumps(list(TASKS)), "--policy.dim_model", "32", "--policy.n_heads", "2",
            "--policy.dim_feedforward", "64", "--policy.chunk_size", "5", "--policy.n_action_steps", "5",
            "--policy.n_encoder_layers", "1", "--policy.n_decoder_layers", "1", "--batch_size", "16",
            "--seed_bc_steps", "10", "--publish_every_steps", "10", "--min_labeled_steps", "8",
            "--refresh_interval_s", "0.2", "--checkpoint_every_s", "0", *extra]


def start_watched_trainer(redis_url: str, tmp_path: Path) -> tuple[subprocess.Popen, Path, int, Path]:
    """A `fleet trainer` child with a /metrics port, checkpoints and logs under ``tmp_path``;
    returns (process, policy_dir, metrics_port, log_path)."""
    from fleet.redis_server import free_port

    policy_dir, metrics_port, log_path = tmp_path / "policies", free_port(), tmp_path / "trainer.log"
    trainer = start_trainer(trainer_args(redis_url, str(policy_dir), tmp_path / "ckpt", "--metrics_port",
                                         str(metrics_port)), log_path)
    return trainer, policy_dir, metrics_port, log_path


def start_trainer(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def wait_for(cond, what: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> None:
    """Poll another process's effects (Redis, files): there is no in-process event to wait on."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} while waiting for {what}:\n"
                                 f"{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)


def status(redis_client) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(TRAINER_STATUS_KEY).items()}


def adam_step_counts(tree) -> set[int]:
    """The per-parameter step counts of every Adam(W) state in a checkpoint's algorithm state."""
    found: set[int] = set()
    if isinstance(tree, dict):
        if "exp_avg" in tree and "step" in tree:
            found.add(int(tree["step"]))
        for value in tree.values():
            found |= adam_step_counts(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            found |= adam_step_counts(value)
    return found


def stream_operator_steps(target: str, robot_id: str, n: int) -> int:
    """A robot sends ``n`` operator-driven steps through the gateway; returns the acked seq."""
    rng = np.random.default_rng(1)
    client = FleetClient(target)
    try:
        client.register(RobotInfo(robot_id, "metaworld-sawyer", SCHEMA, TASKS, PROTOCOL_VERSION))
        steps = [Step(seq=i + 1, index=i, observation={"state": rng.normal(size=39).astype(np.float32)},
                      policy_action=np.zeros(4, np.float32), action=rng.uniform(-1, 1, 4).astype(np.float32),
                      is_intervention=True, reward=0.0, success=False, done=i == n - 1, policy_version=1,
                      timestamp_s=time.time()) for i in range(n)]
        chunk = Chunk(robot_id, f"{robot_id}-e1", TASKS[0], steps, episode_end=EpisodeSummary(False, n, n, 1, False, 1))
        acks = list(client.stream_experience(iter([chunk_to_pb(chunk, SCHEMA)])))
    finally:
        client.close()
    return acks[-1].acked_seq


def labeled_in_redis(redis_client) -> int:
    return sum(BufferReader(redis_client).labeled_steps(rid.decode()) for rid in redis_client.hkeys(ROBOTS_KEY))


@pytest.mark.timeout(240)
def test_sigkill_restart_resumes_then_sigterm_checkpoints(redis_proc, redis_client, gateway, tmp_path):
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=40)
    policy_dir = gateway.cfg.policy_dir
    checkpoints = CheckpointDir(tmp_path / "ckpt", keep=3)
    args = trainer_args(redis_proc.url, policy_dir, checkpoints.root, "--checkpoint_every_steps", "20")
    log1, log2 = tmp_path / "trainer1.log", tmp_path / "trainer2.log"

    first = start_trainer(args, log1)
    try:
        wait_for(lambda: len(checkpoints.steps()) >= 2 and int(status(redis_client).get("step", 0)) >=
                 checkpoints.steps()[-1] + 5, "two checkpoints and training past them", first, log1)
    finally:
        first.kill()  # SIGKILL: no chance to checkpoint
        first.wait(30)
    resume_step = checkpoints.steps()[-1]
    versions_before = PolicyStore(policy_dir).versions()
    assert versions_before

    # While the trainer is down a robot streams operator-labelled steps: the gateway acks them.
    acked = stream_operator_steps(gateway.target, "r-online", n=30)
    assert acked == 30

    second = start_trainer(args, log2)
    try:
        wait_for(lambda: status(redis_client).get("pid") == str(second.pid)
                 and int(status(redis_client)["step"]) > resume_step, "a step after the restart", second, log2)
        now = status(redis_client)
        assert int(now["resumed_step"]) == resume_step
        assert now["resumed_from"].endswith(f"step-{resume_step:08d}")
        # The index was rebuilt from Redis: it holds what arrived while the trainer was down.
        assert int(now["labeled_steps"]) == labeled_in_redis(redis_client) >= acked

        # The optimizer carried on from the checkpoint: Adam's step counts continue from the saved ones.
        wait_for(lambda: checkpoints.steps()[-1] > resume_step, "a checkpoint after the restart", second, log2)
        later = checkpoints.load(checkpoints.root / f"step-{checkpoints.steps()[-1]:08d}")
        assert adam_step_counts(later.state["algorithm"]) == {later.step}

        # Published versions keep rising: every version of the restarted trainer is above all earlier ones.
        wait_for(lambda: max(PolicyStore(policy_dir).versions()) > max(versions_before), "a new version",
                 second, log2)
        new_versions = sorted(set(PolicyStore(policy_dir).versions()) - set(versions_before))
        assert new_versions[0] > max(versions_before)

        # SIGTERM: the step in progress finishes, a checkpoint of the last step is written, exit code 0.
        t0 = time.monotonic()
        second.send_signal(signal.SIGTERM)
        rc = second.wait(60)
        exit_s = time.monotonic() - t0
    finally:
        second.kill()
        second.wait(30)
    assert rc == 0, log2.read_text()[-3000:]
    assert exit_s < TrainerConfig().shutdown_timeout_s
    final_step = int(status(redis_client)["step"])
    assert checkpoints.steps()[-1] == final_step
    assert checkpoints.load(checkpoints.root / f"step-{final_step:08d}").state["trainer"]["step"] == final_step

    # No acked step is missing from the buffer (nor stored twice).
    for rid in ("r-online", "demos-metaworld"):
        keys = RobotKeys(rid)
        last = int(redis_client.get(keys.seq))
        reader = BufferReader(redis_client)
        seqs = [s.seq for eid in redis_client.hkeys(keys.catalog)
                for s in reader.steps(rid, eid.decode(), reader.schema(rid))]
        assert sorted(seqs) == list(range(1, last + 1)), rid


def stop_mid_checkpoint(proc: subprocess.Popen, checkpoints: CheckpointDir, log_path: Path,
                        timeout_s: float = 120.0) -> tuple[Path, int]:
    """SIGSTOP the trainer while it writes a checkpoint after a complete one; returns (its temp dir, the newest
    complete step). A save lasts milliseconds, so the directory is polled tightly; a save that completes
    before the stop lands is let go (SIGCONT) and the next one is caught instead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if checkpoints.steps() and list(checkpoints.root.glob(".tmp-step-*")):
            os.kill(proc.pid, signal.SIGSTOP)
            half = [p for p in checkpoints.root.glob(f".tmp-step-*-{proc.pid}") if not (p / "DONE").exists()]
            if half:
                return half[0], checkpoints.steps()[-1]
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError(f"no checkpoint caught half-written in {timeout_s:.0f}s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.timeout(180)
def test_sigkill_during_checkpoint_write_uses_the_previous_one(redis_proc, tmp_path, caplog):
    seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=40)
    checkpoints = CheckpointDir(tmp_path / "ckpt", keep=3)
    args = trainer_args(redis_proc.url, str(tmp_path / "policies"), checkpoints.root,
                        "--checkpoint_every_steps", "15")
    log = tmp_path / "trainer.log"
    proc = start_trainer(args, log)
    try:
        half, last_complete = stop_mid_checkpoint(proc, checkpoints, log)
    finally:
        proc.kill()  # SIGKILL, stopped or not: the temp directory stays as it was
        proc.wait(30)
    assert half.exists() and not (half / "DONE").exists()
    assert int(half.name.split("-")[2]) > last_complete == checkpoints.steps()[-1]

    # Restart (in this process, with the same options): the half-written one is ignored, the last complete used.
    cfg = parse_config(args[0], args[1:])
    trainer = Trainer(cfg)
    with caplog.at_level(logging.WARNING, logger="cloud.checkpoints"):
        trainer.setup()
    assert str(half) in caplog.text and not half.exists()
    assert trainer.state.step == last_complete and trainer.resumed_from.endswith(f"step-{last_complete:08d}")
    saved = checkpoints.load(checkpoints.root / f"step-{last_complete:08d}")
    restored = trainer.algorithm.state_dict()
    assert adam_step_counts(restored) == adam_step_counts(saved.state["algorithm"]["state"]) == {last_complete}
