"""``fleet demo``: the whole system on one machine, with an embedded default.

Starts a private redis-server (AOF in the run directory), seeds one scripted
demonstration per task, starts the gateway and the trainer (a few behaviour-cloning
steps on the demos publish v1: weak, it fails almost every held-out episode), then
N simulated robots in real time with a simulated operator (HG-DAgger) whose
take-overs teach the policy. Shows live progress (``edge/sim/demo_view.py``), and at the end
writes ``summary.json`` and ``learning_curve.png`` to the run directory. With ``monitor``, a
private Prometheus (``fleet/prometheus_server.py``) scrapes every process with the rules and alerts
of ``deploy/prometheus``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import redis as redis_lib

from cloud.app import Child, gateway_args, operators_args, spawn
from cloud.buffer import SOURCE_ONLINE
from cloud.buffer.reader import BufferReader
from edge.sim.demo_view import RECENT_S, DemoView, Snapshot
from edge.sim.demos import seed_scripted_demos
from cloud.status import fleet_status, online_robots
from cloud.trainer_config import TrainerConfig
from edge.agent import EdgeConfig
from edge.help import HelpConfig
from edge.loop import LoopConfig
from edge.sim.fleet import SimFleetConfig
from fleet.config import require
from fleet.prometheus_server import APT_HINT, PrometheusProcess, deploy_scrape_configs, find_prometheus
from fleet.redis_server import free_port, start_redis

log = logging.getLogger(__name__)


DEMO_TASKS = ("reach the goal", "open the drawer", "open the window")
"""The demo's MetaWorld tasks: a barely trained policy fails them on held-out variants (reach needs the
goal's position, the others the handle's); interventions teach the two openings within a minute or two
and reach over the whole run. (With "press the button from the top" instead of reach, and without the
update gate below, the first minute's held-out success was already 0.8: no weak start to show.)"""


def _demo_trainer() -> TrainerConfig:
    """A small ACT (LeRobot's defaults are sized for GPUs and long chunks) that learns within minutes on a CPU.

    v1 is 10 behaviour-cloning steps on the seeded demos (the demos mostly fix the normalisation), and the
    trainer holds its next update until a robot has stored a step (as bench/fleet_scaling.py does), so it
    does not clone the demos further while the robots start: the demo starts weak. A version every 200
    optimizer steps (about 25 s on 2 busy cores)."""
    from lerobot.policies.act.configuration_act import ACTConfig

    from cloud.rate_limiter import RateLimiterConfig

    return TrainerConfig(seed_bc_steps=10, publish_every_steps=200,
                         rate_limit=RateLimiterConfig(samples_per_insert=1e12, min_size_steps=1),
                         policy=ACTConfig(chunk_size=10, n_action_steps=5, dim_model=128, n_heads=4,
                                          dim_feedforward=512, n_encoder_layers=2, n_decoder_layers=1, use_vae=False,
                                          optimizer_lr=3e-4, pretrained_backbone_weights=None))


def _demo_fleet() -> SimFleetConfig:
    """120-step episodes, every 2nd one evaluated. The help signal counts only reward as progress, over 40 ticks:
    a failing MetaWorld policy keeps the arm moving, so motion hides its stalls (in bench/operator_allocation.py,
    counting motion over 60 ticks left one operator for 8 robots busy 36% of the time instead of ~70%). It
    matters with --operators."""
    return SimFleetConfig(edge=EdgeConfig(loop=LoopConfig(max_episode_steps=120, eval_every=2),
                                          help_signal=HelpConfig(stall_window_steps=40, stall_min_motion=0.0)))


@dataclass(frozen=True)
class DemoConfig:
    """The demo: private Redis, learner and a simulated fleet on this machine, built from the same configs as
    `fleet trainer` and `fleet sim-fleet` (the demo sets their Redis, policy directory, gateway and tasks)."""

    duration_s: float = 600.0
    """How long the fleet runs, seconds (after set-up)."""
    run_dir: str = ""
    """Run directory (default: runs/demo-<time>)."""
    tasks: tuple[str, ...] = DEMO_TASKS
    """MetaWorld tasks (language instructions or env names): the trainer's and every robot's."""
    demos_per_task: int = 1
    """Scripted demonstrations per task used to seed the policy (and its normalisation)."""
    progress_interval_s: float = 10.0
    """Seconds between progress lines when stdout is not a terminal (on one, a live table is redrawn twice a second)."""
    monitor: bool = False
    """Also run a local Prometheus (`prometheus` on PATH) scraping every process with deploy/prometheus's rules and
    alerts; prints its URL and stops it at the end (without the binary: a one-line note, the demo runs on)."""
    redis_appendfsync: str = "everysec"
    """Redis AOF fsync: everysec (acked steps survive a Redis crash, ~1 s lost on power loss) or always."""
    operators: int = 0
    """Share this many simulated operators among the robots: `fleet operators` runs as another child and the robots
    run in allocated mode (an operator acts on a robot only while assigned to it; docs/operators.md). 0 = every robot
    has its own operator, always watching."""
    operator_policy: str = "priority"
    """With operators: who gets one (priority, round_robin or random)."""
    trainer: TrainerConfig = field(default_factory=_demo_trainer)
    """The trainer (`fleet trainer --help`); the demo's policy is a small ACT."""
    fleet: SimFleetConfig = field(default_factory=_demo_fleet)
    """The simulated robots (`fleet sim-fleet --help`); the demo runs each as its own `fleet edge` process and
    evaluates every 2nd episode of each robot without the operator, from a held-out task variant (measures
    autonomous success on initial states never trained on)."""

    def __post_init__(self) -> None:
        require(self.duration_s > 0, f"duration_s ({self.duration_s}) must be > 0 seconds")
        require(self.operators >= 0, f"operators ({self.operators}) must be >= 0 (0 = one operator per robot)")
        if self.operators:
            from cloud.operators.allocator import POLICIES

            require(self.operator_policy in POLICIES,
                    f"operator_policy must be one of {', '.join(POLICIES)}, got {self.operator_policy!r}")
        require(self.redis_appendfsync in ("everysec", "always"),
                f"redis_appendfsync must be everysec or always, got {self.redis_appendfsync!r}")
        require(self.fleet.edge.loop.eval_every > 0,
                f"fleet.edge.loop.eval_every ({self.fleet.edge.loop.eval_every}) must be > 0: the demo measures "
                "autonomous success on evaluation episodes")
        loop, n_tasks = self.fleet.edge.loop, len(set(self.tasks))
        require(loop.task_order != "round_robin" or math.gcd(loop.eval_every, n_tasks) == 1,
                f"with {n_tasks} tasks in round robin, every {loop.eval_every}th episode would evaluate only "
                f"{n_tasks // math.gcd(loop.eval_every, n_tasks)} of them: pick a task count with no common factor "
                f"with fleet.edge.loop.eval_every, or --fleet.edge.loop.task_order random")


def _write_config(cfg, path: Path) -> str:
    """``cfg`` as a JSON file a child reads with ``--config_path`` (the child validates it again; JSON as
    LeRobot writes its configs: enums as their values)."""
    import draccus

    with open(path, "w") as fh, draccus.config_type("json"):
        draccus.dump(cfg, fh, indent=2)
    return str(path)


class EpisodeLog:
    """Reads every robot's episode-end events from Redis incrementally."""

    def __init__(self, redis):
        self.redis = redis
        self._last: dict[str, bytes] = {}
        self.episodes: list[dict] = []

    def poll(self, robot_ids: list[str]) -> None:
        for rid in robot_ids:
            start = b"(" + self._last[rid] if rid in self._last else b"-"
            for entry_id, fields in BufferReader(self.redis).events(rid, start):
                self._last[rid] = entry_id
                summary = json.loads(fields[b"summary"])
                self.episodes.append(summary)


Z95 = 1.959964
"""Two-sided 95% normal quantile."""


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaNs without trials)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def ratio_interval(num: np.ndarray, den: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of sum(num)/sum(den) over episodes (NaNs without episodes)."""
    if len(den) == 0 or den.sum() == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(den), size=(resamples, len(den)))
    d = den[idx].sum(axis=1)
    r = num[idx].sum(axis=1) / np.where(d > 0, d, 1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def _rates(episodes: list[dict], t0: float, t1: float) -> dict:
    """Autonomous success on evaluation episodes and intervention rate (share of steps the operator drove) on
    operator episodes in [t0, t1), each with its 95% interval (Wilson; bootstrap over episodes)."""
    ev = [e for e in episodes if e["evaluation"] and t0 <= e["ts"] < t1]
    op = [e for e in episodes if not e["evaluation"] and t0 <= e["ts"] < t1]
    wins = sum(bool(e["success"]) for e in ev)
    steps = np.array([e["num_steps"] for e in op], dtype=float)
    inter = np.array([e["intervention_steps"] for e in op], dtype=float)
    return {"success": wins / len(ev) if ev else float("nan"), "success_ci": wilson(wins, len(ev)),
            "intervention": float(inter.sum() / steps.sum()) if steps.sum() else float("nan"),
            "intervention_ci": ratio_interval(inter, steps), "n_eval": len(ev), "n_op": len(op)}


def curves(episodes: list[dict], start: float, end: float, bins: int = 10) -> dict:
    edges = np.linspace(start, end, bins + 1)
    out = {"t_s": [], "success_rate": [], "success_ci": [], "intervention_rate": [], "intervention_ci": [],
           "eval_episodes": [], "episodes": []}
    for a, b in zip(edges[:-1], edges[1:]):
        r = _rates(episodes, a, b)
        out["t_s"].append(float((a + b) / 2 - start))
        out["success_rate"].append(r["success"])
        out["success_ci"].append(list(r["success_ci"]))
        out["intervention_rate"].append(r["intervention"])
        out["intervention_ci"].append(list(r["intervention_ci"]))
        out["eval_episodes"].append(r["n_eval"])
        out["episodes"].append(r["n_eval"] + r["n_op"])
    return out


def plot(curve: dict, path: Path, title: str) -> None:
    """Autonomous success (held-out evaluation episodes) and human effort over time, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    t = np.asarray(curve["t_s"]) / 60.0
    for key, fmt, label in (("success", "o-", "autonomous success (held-out eval episodes)"),
                            ("intervention", "s-", "human effort: intervention rate (share of steps)")):
        y = np.asarray(curve[f"{key}_rate"], dtype=float)
        ci = np.asarray(curve[f"{key}_ci"], dtype=float).reshape(-1, 2)
        err = np.nan_to_num(np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])))
        ax.errorbar(t, y, yerr=err, fmt=fmt, capsize=3, label=label)
    ax.set_xlabel("wall-clock time (min)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(f"{title} (bars: 95% intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(value):
    """NaN (no episodes in a window) becomes null, so summary.json is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


MONITOR_SCRAPE_S = 2.0
"""Scrape and rule-evaluation interval of the demo's Prometheus, seconds."""


def run_dir_of(cfg: DemoConfig) -> Path:
    """The run directory: ``cfg.run_dir``, or runs/demo-<time>, absolute."""
    return Path(cfg.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def _raise_if_a_child_died(children: list[Child]) -> None:
    dead = [c for c in children if c.proc.poll() is not None]
    if dead:
        raise RuntimeError(f"{dead[0].name} exited with {dead[0].proc.returncode}; see {dead[0].log_path}")


def _start_monitor(run_dir: Path, ports: dict[str, list[int]], echo) -> PrometheusProcess | None:
    """A private Prometheus scraping ``ports`` (deploy/prometheus job name -> ports), or None with a note why."""
    binary = find_prometheus()
    if binary is None:
        echo(f"monitor: prometheus is not on PATH ({APT_HINT}); the demo runs without it")
        return None
    try:
        scrape = deploy_scrape_configs({job: [f"127.0.0.1:{p}" for p in ps] for job, ps in ports.items()})
        prom = PrometheusProcess(run_dir / "prometheus", scrape, interval_s=MONITOR_SCRAPE_S, binary=binary)
    except OSError as exc:  # deploy/prometheus missing (not a source checkout), or the binary will not start
        echo(f"monitor: cannot start prometheus ({exc}); the demo runs without it")
        return None
    try:
        prom.wait_ready(30.0)
    except RuntimeError as exc:
        prom.stop()
        echo(f"monitor: {exc}; the demo runs without it")
        return None
    targets = sum(len(ps) for ps in ports.values())
    echo(f"prometheus: {prom.url} (scrapes {targets} processes every {MONITOR_SCRAPE_S:g}s with the rules and "
         f"alerts of deploy/prometheus; data in {prom.workdir})")
    return prom


def run_demo(cfg: DemoConfig, stop: threading.Event, view: DemoView | None = None) -> dict:
    """Run the demo, showing it in ``view`` (default: progress lines); returns the summary (also written to
    ``run_dir/summary.json``)."""
    view = view or DemoView(live=False, progress_interval_s=cfg.progress_interval_s)
    echo = view.echo
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    echo(f"run directory: {run_dir}")
    echo(f"logs: {logs}/ (one file per process)")
    _write_config(cfg, run_dir / "config.json")
    redis_proc = start_redis(run_dir / "redis", appendfsync=cfg.redis_appendfsync)
    children: list[Child] = []
    prometheus: PrometheusProcess | None = None
    client = redis_lib.Redis.from_url(redis_proc.url)
    try:
        echo(f"redis-server on port {redis_proc.port} (AOF in {redis_proc.data_dir})")
        from edge.sim.metaworld import MetaWorldRobot

        tasks = tuple(MetaWorldRobot(tasks=cfg.tasks).tasks)
        fleet_cfg = cfg.fleet
        seeded = seed_scripted_demos(redis_proc.url, tasks, cfg.demos_per_task, fleet_cfg.edge.loop.max_episode_steps,
                                     fleet_cfg.seed)
        echo(f"seeded {seeded['episodes']} scripted demonstrations ({seeded['steps']} steps)")
        port = free_port()
        # --monitor: every process serves /metrics on a port of its own (0 = off otherwise).
        metrics = {"fleet-gateway": [free_port()], "fleet-trainer": [cfg.trainer.metrics_port or free_port()],
                   "fleet-edge": []} if cfg.monitor else {}
        policy_dir, blob_url = str(run_dir / "policies"), str((run_dir / "blobs").resolve())  # frames: local dir
        children.append(spawn("gateway", gateway_args(f"127.0.0.1:{port}", redis_proc.url, policy_dir,
                                                      metrics["fleet-gateway"][0] if metrics else 0,
                                                      blob_url=blob_url, weights_listen="127.0.0.1:0"), logs))
        trainer = replace(cfg.trainer, redis_url=redis_proc.url, blob_url=blob_url, policy_dir=policy_dir,
                          tasks=tasks, metrics_port=metrics["fleet-trainer"][0] if metrics else cfg.trainer.metrics_port)
        children.append(spawn("trainer", ["trainer", "--config_path",
                                          _write_config(trainer, run_dir / "trainer.json")], logs))
        edge = replace(fleet_cfg.edge, gateway=f"127.0.0.1:{port}", tasks=tasks)
        if cfg.operators:  # M simulated operators shared by the robots, allocated by `fleet operators`
            if metrics:
                metrics["fleet-operators"] = [free_port()]
            children.append(spawn("operators", operators_args(redis_proc.url, str(cfg.operators), [
                "--kind", "sim", "--policy", cfg.operator_policy,
                "--metrics_port", str(metrics["fleet-operators"][0] if metrics else 0)]), logs))
            edge = replace(edge, operator=replace(edge.operator, allocation="allocated"))
        fleet_cfg = replace(fleet_cfg, state_root=str(run_dir / "edge"), edge=edge)
        robots = fleet_cfg.robot_configs()
        if metrics:
            robots = [replace(r, metrics_port=free_port()) for r in robots]
            metrics["fleet-edge"] = [r.metrics_port for r in robots]
        robot_ids = [r.robot_id for r in robots]
        for robot in robots:
            children.append(spawn(robot.robot_id, ["edge", "--config_path",
                                                   _write_config(robot, run_dir / f"{robot.robot_id}.json")], logs))
        echo(f"gateway on 127.0.0.1:{port}; trainer and {cfg.fleet.robots} robots starting" +
             (f"; {cfg.operators} operators shared ({cfg.operator_policy})" if cfg.operators else ""))
        if metrics:
            prometheus = _start_monitor(run_dir, metrics, echo)
        view.footer = f"logs: {logs}/" + (f" | prometheus: {prometheus.url}" if prometheus else "") + \
            " | Ctrl-C stops early"

        events = EpisodeLog(client)
        with view:
            # The clock starts when the first robot acts (v1 published and swapped in).
            while not stop.is_set():
                _raise_if_a_child_died(children)
                status = fleet_status(client, window_s=RECENT_S)
                if any(r["steps_stored"] for r in online_robots(status)):
                    break
                view.show(Snapshot(status, [], time.time()))
                stop.wait(0.5)
            start = time.time()
            end = start
            events.poll(robot_ids)
            status = fleet_status(client)
            echo(f"fleet running for {cfg.duration_s:.0f}s; Ctrl-C stops early")
            while not stop.wait(min(view.poll_s, max(0.1, start + cfg.duration_s - time.time()))):
                events.poll(robot_ids)
                now = time.time()
                _raise_if_a_child_died(children)
                status = fleet_status(client, window_s=RECENT_S)
                view.show(Snapshot(status, events.episodes, now, now - start, cfg.duration_s))
                if now - start >= cfg.duration_s:
                    break
        end = time.time()
        events.poll(robot_ids)
        status = fleet_status(client)
    finally:
        for child in reversed(children):  # robots first, then trainer, then gateway
            child.terminate()
        if prometheus is not None:
            prometheus.stop()
        client.close()
        redis_proc.stop()

    duration = end - start
    # "Start" is the first 10% of the run (at least 60 s, at most a quarter): the policy
    # improves within minutes, so a wider window would hide where it started.
    quarter = duration / 4
    first = min(max(60.0, duration / 10), quarter)
    r0 = _rates(events.episodes, start, start + first)
    r1 = _rates(events.episodes, end - quarter, end + 60)
    curve = curves(events.episodes, start, end)
    online = [r for r in status["robots"] if r["source"] == SOURCE_ONLINE]
    summary = {
        "success_rate_start": r0["success"], "success_rate_end": r1["success"],
        "success_rate_start_ci": r0["success_ci"], "success_rate_end_ci": r1["success_ci"],
        "intervention_rate_start": r0["intervention"], "intervention_rate_end": r1["intervention"],
        "intervention_rate_start_ci": r0["intervention_ci"], "intervention_rate_end_ci": r1["intervention_ci"],
        "eval_episodes_start": r0["n_eval"], "eval_episodes_end": r1["n_eval"],
        "policy_versions_published": status["latest_policy_version"],
        "steps_ingested": sum(r["steps_stored"] for r in online),
        "episodes": len(events.episodes),
        "robots": cfg.fleet.robots, "duration_s": duration, "tasks": list(tasks),
        "final_versions": {r["robot_id"]: r["policy_version"] for r in online},
        "curve": curve, "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False))
    plot(curve, run_dir / "learning_curve.png",
         f"{cfg.fleet.robots} robots, {len(tasks)} MetaWorld tasks, {cfg.trainer.algorithm.type}")
    return summary
