"""One run of the study, and the start policy every run shares.

A run: a fresh redis-server, the same scripted demonstrations as offline data,
the shared start policy installed as version 1, then ``fleet gateway``,
``fleet trainer`` (HG-DAgger, resuming v1) and ``fleet sim-fleet`` (N robots in
real time with the simulated operator) as processes, started together. The
trainer's rate limiter holds its first update until the robots have stored a
step, so no run trains ahead on demonstrations alone. The clock starts at the
learner's first update, so every run has exactly v1 at t = 0; robots that come
up later lose that time (``all_robots_running_s``: conservative for large
fleets), and steps stored before t = 0 are in the ``start`` sample. At the end
of the budget the processes are stopped and the run's record is read back: the
versions with their publication times, every episode's outcome and human
effort, and a timeline of the learner (steps, CPU) and of the machine.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import redis as redis_lib

from bench.scaling.config import StudyConfig
from bench.scaling.machine import machine_cpu_s, process_cpu_s
from cloud.app import Child, gateway_args, spawn
from cloud.buffer import SOURCE_ONLINE, RobotKeys
from edge.sim.demos import seed_scripted_demos
from cloud.policy_store import PolicyStore
from cloud.status import fleet_status
from fleet.redis_server import free_port, start_redis

log = logging.getLogger(__name__)

TRAINER_STATUS_KEY = "fleet:trainer:status"
POLL_S = 2.0
"""Seconds between timeline samples during a run."""


def instructions(tasks: tuple[str, ...]) -> tuple[str, ...]:
    """Language instructions of MetaWorld tasks (env names or instructions)."""
    from edge.sim.metaworld import env_name_for, instruction_for

    return tuple(instruction_for(env_name_for(t)) for t in tasks)


def _trainer_args(cfg: StudyConfig, redis_url: str, policy_dir: Path, seed: int) -> list[str]:
    return ["trainer", "--redis_url", redis_url, "--policy_dir", str(policy_dir),
            "--tasks", json.dumps(list(instructions(cfg.tasks))), "--batch_size", str(cfg.batch_size),
            "--publish_every_steps", str(cfg.publish_every_steps), "--seed", str(seed),
            "--torch_threads", str(cfg.trainer_torch_threads), "--policy.device", cfg.device, *cfg.policy_args]


def _start_key(cfg: StudyConfig) -> dict:
    """Everything the start policy depends on (it is reused while this is unchanged)."""
    return {k: v for k, v in asdict(cfg).items() if k in (
        "tasks", "max_episode_steps", "demos_per_task", "demo_seed", "seed_bc_steps", "batch_size", "device",
        "policy_args", "trainer_torch_threads")}


def train_start_policy(cfg: StudyConfig, root: Path, timeout_s: float = 1800.0) -> Path:
    """Behaviour-clone the shared start policy once (``fleet trainer --max_steps``); returns its store dir.

    Reused when ``root`` already holds one trained with the same settings."""
    policy_dir = root / "policies"
    key_file = root / "start_policy.json"
    key = json.loads(json.dumps(_start_key(cfg)))
    if key_file.exists() and json.loads(key_file.read_text()) == key and 1 in PolicyStore(policy_dir).versions():
        log.info("reusing the start policy in %s", policy_dir)
        return policy_dir
    root.mkdir(parents=True, exist_ok=True)
    # Everything of a start policy trained with other settings goes, its checkpoints above all: the trainer
    # would resume them (another task list included) instead of behaviour-cloning anew.
    checkpoints = root / "checkpoints"
    for stale in (policy_dir, checkpoints, root / "redis"):
        if stale.exists():
            shutil.rmtree(stale)
    redis_proc = start_redis(root / "redis")
    try:
        seed_scripted_demos(redis_proc.url, cfg.tasks, cfg.demos_per_task, cfg.max_episode_steps, cfg.demo_seed)
        args = _trainer_args(cfg, redis_proc.url, policy_dir, cfg.demo_seed)
        args += ["--seed_bc_steps", str(cfg.seed_bc_steps), "--max_steps", str(cfg.seed_bc_steps),
                 "--checkpoint_dir", str(checkpoints)]
        child = spawn("start-policy-trainer", args, root / "logs")
        try:
            code = child.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            raise RuntimeError(f"start policy: trainer did not finish within {timeout_s:.0f}s; see "
                               f"{child.log_path}") from None
        if code != 0 or 1 not in PolicyStore(policy_dir).versions():
            raise RuntimeError(f"start policy: trainer exited with {code} without publishing v1; see {child.log_path}")
    finally:
        redis_proc.stop()
    key_file.write_text(json.dumps(key, indent=2))
    return policy_dir


def install_start_policy(start_dir: Path, policy_dir: Path, redis) -> None:
    """Publish the start policy (v1 of ``start_dir``) as version 1 of a fresh store and Redis."""
    source = PolicyStore(start_dir)
    manifest = source.manifest(1)
    trainable = {t.name for t in manifest.tensors if t.trainable}
    published = PolicyStore(policy_dir, redis).publish(source.tensors(1), manifest.config, trainable,
                                                       parent_version=0)
    if published.version != 1:
        raise RuntimeError(f"the fresh policy store {policy_dir} published v{published.version}, expected v1")


def _dec(d: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in d.items()}


class _Watch:
    """Samples the learner, the robots and the machine while a run is timed."""

    def __init__(self, redis, children: dict[str, Child], t0: float):
        self.redis = redis
        self.children = children
        self.t0 = t0
        self.samples: list[dict] = []

    def sample(self) -> dict:
        status = fleet_status(self.redis)
        online = [r for r in status["robots"] if r["source"] == SOURCE_ONLINE]
        trainer = _dec(self.redis.hgetall(TRAINER_STATUS_KEY))
        machine = machine_cpu_s()
        row = {
            "t_s": time.time() - self.t0,
            "trainer_step": int(float(trainer.get("step", 0) or 0)),
            "trainer_version": int(float(trainer.get("version", 0) or 0)),
            "trainer_samples_per_s": float(trainer.get("samples_per_s", 0) or 0),
            "robots_running": sum(r["steps_stored"] > 0 for r in online),
            "steps_stored": sum(r["steps_stored"] for r in online),
            "intervention_steps_stored": sum(r["intervention_steps_stored"] for r in online),
            "robot_steps_per_s": [r["steps_per_s"] for r in online],
            "machine_busy_cpu_s": machine[0] if machine else None,
            "machine_total_cpu_s": machine[1] if machine else None,
        }
        for name, child in self.children.items():
            row[f"{name}_cpu_s"] = process_cpu_s(child.proc.pid)
        self.samples.append(row)
        return row


def _check_alive(children: dict[str, Child]) -> None:
    for child in children.values():
        if child.proc.poll() is not None:
            tail = child.log_path.read_text(errors="replace")[-2000:] if child.log_path.exists() else ""
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}\n{tail}")


def _wait_learning(cfg: StudyConfig, redis, children: dict[str, Child]) -> float:
    """Until the learner's first update (it waits for the first robot's data); returns its time (unix s)."""
    deadline = time.monotonic() + cfg.startup_timeout_s
    while time.monotonic() < deadline:
        _check_alive(children)
        trainer = _dec(redis.hgetall(TRAINER_STATUS_KEY))
        if int(float(trainer.get("step", 0) or 0)) > 0:
            return min(float(trainer.get("updated_s", time.time())), time.time())
        time.sleep(0.25)  # polling Redis written by other processes: there is no event to wait on
    raise TimeoutError(f"the robots and the learner were not running within {cfg.startup_timeout_s:.0f}s")


def _stop_all(children: dict[str, Child], timeout_s: float = 30.0) -> None:
    """SIGTERM every child at once (what arrives after the budget is not counted, so nothing needs to
    drain in order), then wait for each; kill what outlives ``timeout_s``."""
    stopping = time.monotonic()
    for child in children.values():
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children.values():
        try:
            child.proc.wait(timeout=max(0.1, stopping + timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", child.name, timeout_s)
            child.kill()
    log.info("stopped %s in %.1fs", ", ".join(children), time.monotonic() - stopping)


def _episodes(redis, t0: float) -> list[dict]:
    out = []
    for rid, raw in redis.hgetall("fleet:robots").items():
        if json.loads(raw).get("source", SOURCE_ONLINE) != SOURCE_ONLINE:
            continue
        rid = rid.decode() if isinstance(rid, bytes) else rid
        for _, fields in redis.xrange(RobotKeys(rid).events):
            e = json.loads(fields[b"summary"])
            out.append({"t_s": float(e["ts"]) - t0, "robot_id": rid, "task": e["task"], "success": e["success"],
                        "num_steps": e["num_steps"], "intervention_steps": e["intervention_steps"],
                        "interventions": e["interventions"], "policy_version": e["policy_version"]})
    return sorted(out, key=lambda e: e["t_s"])


def run_fleet(cfg: StudyConfig, robots: int, seed: int, start_dir: Path, run_dir: Path) -> dict:
    """One timed run of ``robots`` robots with ``seed``; returns its record (also ``run_dir/run.json``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    setup_start = time.time()
    redis_proc = start_redis(run_dir / "redis")
    client = redis_lib.Redis.from_url(redis_proc.url, socket_timeout=30)
    children: dict[str, Child] = {}
    try:
        seed_scripted_demos(redis_proc.url, cfg.tasks, cfg.demos_per_task, cfg.max_episode_steps, cfg.demo_seed)
        install_start_policy(start_dir, run_dir / "policies", client)
        port = free_port()
        children["gateway"] = spawn("gateway", gateway_args(f"127.0.0.1:{port}", redis_proc.url,
                                                            str(run_dir / "policies")), logs)
        # The trainer starts with the robots (its start-up overlaps theirs) but its rate limiter holds
        # the first update until the robots have stored a step: no run trains ahead on demos alone.
        children["trainer"] = spawn("trainer", [
            *_trainer_args(cfg, redis_proc.url, run_dir / "policies", seed), "--rate_limit.min_size_steps", "1",
            "--rate_limit.samples_per_insert", "1e12", *cfg.trainer_args], logs)
        children["fleet"] = spawn("sim-fleet", [
            "sim-fleet", "--robots", str(robots), "--state_root", str(run_dir / "edge"), "--seed", str(1000 * seed),
            "--edge.gateway", f"127.0.0.1:{port}", "--edge.tasks", json.dumps(list(instructions(cfg.tasks))),
            "--edge.loop.control_hz", str(cfg.control_hz), "--edge.loop.max_episode_steps", str(cfg.max_episode_steps),
            "--edge.loop.eval_every", "0", *cfg.edge_args,
            *(("--edge.backend.type", "metaworld", "--edge.backend.fresh_variants", "true") if cfg.fresh_variants
              else ())], logs)
        t0 = _wait_learning(cfg, client, children)
        watch = _Watch(client, children, t0)
        start = watch.sample()
        budget = cfg.budget_for(robots)
        log.info("run %d robots seed %d: learning (set-up %.0fs); budget %.0fs", robots, seed, t0 - setup_start,
                 budget)
        while time.time() < t0 + budget:
            time.sleep(max(0.0, min(POLL_S, t0 + budget - time.time())))  # a fixed sampling clock
            _check_alive(children)
            watch.sample()
        end = watch.samples[-1]
        trainer_status = _dec(client.hgetall(TRAINER_STATUS_KEY))
        _stop_all(children)
        episodes = _episodes(client, t0)
        store = PolicyStore(run_dir / "policies")
        versions = [{"version": v, "t_s": store.manifest(v).created_s - t0} for v in store.versions()]
    finally:
        for child in children.values():
            child.kill()  # only those still running after an error
        client.close()
        redis_proc.stop()
    record = {
        "fleet_size": robots, "seed": seed, "run_dir": str(run_dir), "budget_s": budget,
        "setup_s": t0 - setup_start, "t0_unix_s": t0, "start": start, "end": end,
        "all_robots_running_s": next((r["t_s"] for r in watch.samples if r["robots_running"] >= robots), None),
        "trainer_status_end": trainer_status,
        "versions": versions, "episodes": episodes, "timeline": watch.samples,
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    return record
