"""Allocation study: M operators for N robots. Which robot gets the human matters (Fleet-DAgger, Hoque et al. 2022).

N simulated MetaWorld robots learn one shared policy online (HG-DAgger) while a pool of M scripted operators
(MetaWorld experts, ``edge/sim/operator.py``'s SimulatedOperator and its gating) is shared among them by the
project's real allocator (``cloud/operators/allocator.py``), for each policy (priority, round_robin,
random) at M = 1 and 2, against the unlimited-operator upper bound (M = N), over several seeds. Every
condition of a seed starts from the same weak policy (a few behaviour-cloning steps on one scripted
demonstration per task) and runs the same number of control ticks.

How a robot behaves (the edge's "allocated" mode, docs/operators.md): each tick it computes its need for
help; while an operator is assigned, the operator's HG-DAgger gating may take over (those steps are the
labels the learner trains on); while help is wanted and nobody is assigned, it HOLDS (zero action: idle
robot time); otherwise the policy acts. Every 2nd episode of a robot is an evaluation episode (no
operator, no help asked, a held-out task variant): its outcome is the autonomous success over time.

The help score is the edge's own (``edge/help.py`` HelpScorer, its defaults but two): a noisy OR,
``1 - (1 - u)(1 - 0.8 s)``, of **uncertainty** u (the RMS disagreement, in action standard deviations,
between the previous action chunk's prediction of the ticks the new chunk predicts again) and **stall** s
(ticks since the last progress, reward up by 0.05 over its best, over ``stall_window_steps`` = 40 ticks,
capped at 1; reward only, ``stall_min_motion`` 0, since a failing policy keeps moving); help is wanted at
>= 0.6. No risk term (no value function on the robot).

Simplifications for a study on 2 CPU cores, in one process and in simulated time (ticks of 1/20 s, not
wall-clock): the robots act with the learner's latest weights (no publication delay), chunks for all
robots are predicted in one batch, and the learner makes ``updates_per_tick`` HG-DAgger updates per tick
(``cloud/algorithms/hg_dagger.py`` on the small ACT of ``fleet demo``) on 50% operator labels and 50% demos.

Reports, per condition (mean ± std over seeds): autonomous success over time and at the end (last third),
human effort (operator-driven steps), ROHE (Return on Human Effort as in Fleet-DAgger and ``fleet status``:
successes / (1 + intervention steps)), idle robot time (share of robot ticks spent holding), operator
utilisation (share of operator ticks assigned to a robot; and driving), time to help (p50/p99).

    python bench/operator_allocation.py --quick            # ~20 s: the test's size
    nice -n 10 python bench/operator_allocation.py --json runs/ops/study.json --plot docs/operator_allocation.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import fmt, write_json  # noqa: E402

log = logging.getLogger("operator_allocation")


@dataclass(frozen=True)
class StudyConfig:
    robots: int = 8
    """N simulated robots."""
    operator_counts: tuple[int, ...] = (1, 2)
    """M values studied (each with every policy); the unlimited bound M = N is added."""
    policies: tuple[str, ...] = ("priority", "round_robin", "random")
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ("reach the goal", "open the drawer", "open the window")
    ticks: int = 2400
    """Control ticks per condition (20 Hz: 2400 = 2 simulated minutes)."""
    control_hz: float = 20.0
    max_episode_steps: int = 120
    eval_every: int = 2
    """Every n-th episode of a robot is an autonomous evaluation episode."""
    min_hold_s: float = 2.0
    """Allocator hold time (simulated seconds)."""
    help_threshold: float = 0.6
    stall_window_steps: int = 40
    updates_per_tick: float = 0.5
    batch_size: int = 32
    seed_bc_steps: int = 10
    demos_per_task: int = 1
    time_bins: int = 6
    """Bins of the success-over-time curves."""


QUICK = StudyConfig(robots=3, operator_counts=(1,), seeds=(0,), tasks=("open the drawer",), ticks=300,
                    updates_per_tick=0.1, time_bins=2)


# --- one robot -------------------------------------------------------------------------------------------------

@dataclass
class Episode:
    task_index: int
    evaluation: bool
    states: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    labels: list = field(default_factory=list)


class StudyRobot:
    """A MetaWorld robot with its operator gating and help signal (kept across conditions: env set-up is slow)."""

    def __init__(self, index: int, cfg: StudyConfig):
        from edge.help import HelpConfig, HelpScorer
        from edge.operator import OperatorConfig
        from edge.sim.metaworld import MetaWorldRobot
        from edge.sim.operator import SimulatedOperator

        self.id = f"robot-{index}"
        self.index, self.cfg = index, cfg
        self.robot = MetaWorldRobot(tasks=cfg.tasks, seed=index, max_episode_steps=cfg.max_episode_steps,
                                    held_out_eval=True)
        self.robot.connect()
        self.operator = SimulatedOperator(OperatorConfig(seed=index))
        self.help = HelpScorer(HelpConfig(threshold=cfg.help_threshold, stall_window_steps=cfg.stall_window_steps,
                                          stall_min_motion=0.0))

    def start(self, seed: int) -> None:
        """A fresh condition: reseed the variant choice and start the first episode."""
        self.robot._rng = np.random.default_rng(1000 * seed + self.index)  # reseed without rebuilding the envs
        self.episodes_done = 0
        self.next_task = self.index % len(self.robot.tasks)
        self.holding = False
        self._new_episode()

    def _new_episode(self) -> None:
        evaluation = self.episodes_done % self.cfg.eval_every == self.cfg.eval_every - 1
        task_index, self.next_task = self.next_task, (self.next_task + 1) % len(self.robot.tasks)
        self.robot.set_evaluation(evaluation)
        self.obs = self.robot.reset(self.robot.tasks[task_index])
        self.operator.reset(self.robot.tasks[task_index])
        self.episode = Episode(task_index, evaluation)
        self.queue: list[np.ndarray] = []
        self.previous_chunk: np.ndarray | None = None
        self.action_disagreement = 0.0  # what HelpScorer reads from the acting policy
        self.help.reset()
        self.wanted = False
        self.t = 0
        self.was_driven = False

    # help signal ---------------------------------------------------------------------------------------------
    def take_chunk(self, chunk: np.ndarray, action_std: np.ndarray, n_action_steps: int) -> None:
        if self.previous_chunk is not None:  # the ticks both chunks predicted: previous[n:], new[:-n]
            overlap = len(chunk) - n_action_steps
            diff = (self.previous_chunk[n_action_steps:] - chunk[:overlap]) / action_std
            self.action_disagreement = float(np.sqrt(np.mean(diff ** 2)))
        self.previous_chunk = chunk
        self.queue = list(chunk[:n_action_steps])

    def need(self, now_s: float):
        """This tick's help signal as the allocator's Need (evaluation episodes never ask for help)."""
        from cloud.operators.allocator import Need

        sig = self.help.update(self.obs.features, self.obs.reward, self, now_s)
        self.wanted = sig.wanted and not self.episode.evaluation
        return Need(self.id, sig.score, sig.uncertainty, sig.stall, sig.risk, self.wanted,
                    self.wanted and self.holding, sig.wanted_for_s if self.wanted else 0.0)

    # one tick ------------------------------------------------------------------------------------------------
    def act(self, assigned: bool, now_s: float) -> dict | None:
        """Execute one tick; returns the finished episode's record at its end, else None."""
        policy_action = self.queue.pop(0)
        self.holding = False
        driven = None
        if assigned and not self.episode.evaluation:
            driven = self.operator.decide(self.obs, policy_action)
        if driven is not None:
            action = driven
        elif self.wanted and not assigned:
            action, self.holding = np.zeros_like(policy_action), True
            self.queue = []  # the chunk is stale once the robot has stood still
        else:
            action = policy_action
        if self.was_driven and driven is None:
            self.queue = []  # control handed back: predict afresh (as the edge resets the policy)
        self.was_driven = driven is not None
        ep = self.episode
        ep.states.append(self.obs.features["state"])
        ep.actions.append(np.asarray(action, dtype=np.float32))
        ep.labels.append(driven is not None)
        self.obs = self.robot.act(action)
        self.t += 1
        done = self.obs.success or self.obs.terminated or self.t >= self.cfg.max_episode_steps
        if not done:
            return None
        record = {"robot": self.id, "end_s": now_s, "task": self.robot.tasks[ep.task_index],
                  "evaluation": ep.evaluation, "success": bool(self.obs.success), "steps": self.t,
                  "intervention_steps": int(sum(ep.labels))}
        self.finished = ep
        self.episodes_done += 1
        self._new_episode()
        return record


# --- the learner -----------------------------------------------------------------------------------------------

class Learner:
    """The shared policy (``fleet demo``'s small ACT) and HG-DAgger on operator labels + demonstrations."""

    def __init__(self, cfg: StudyConfig, tasks: tuple[str, ...], demos: dict, seed: int):
        import torch

        from cloud.algorithms.hg_dagger import HGDAgger
        from edge.sim.demo import _demo_trainer
        from edge.sim.metaworld import SCHEMA
        from fleet.policies import NormStats, build_policy

        self.torch, self.cfg = torch, cfg
        torch.manual_seed(seed)  # dropout: every condition of a seed starts and trains alike
        stats = NormStats.from_data(demos["state"], demos["action"][:, 0])
        self.policy = build_policy(_demo_trainer().fleet_policy(), SCHEMA, tasks, stats, seed=seed)
        self.chunk = self.policy.config.chunk_size
        self.n_action_steps = self.policy.model.config.n_action_steps
        self.action_std = self.policy._norm["action_std"].cpu().numpy()
        self.algorithm = HGDAgger(self.policy)
        self.demos, self.online = demos, {k: [] for k in ("state", "task_index", "action", "action_is_pad")}
        self.rng = np.random.default_rng(seed)
        self.updates = 0
        for _ in range(cfg.seed_bc_steps):
            self.update(online_fraction=0.0)

    def predict(self, states: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """Action chunks (B, chunk, A) for B robots in one forward pass."""
        p = self.policy
        with self.torch.no_grad():
            batch = {"observation.state": p.normalized_state({"state": states}.__getitem__, (len(states),)),
                     **p._task_inputs(task_index, None)}
            chunk = p.model.predict_action_chunk(batch)
            return (chunk * p._norm["action_std"] + p._norm["action_mean"]).cpu().numpy()

    def add_episode(self, ep: Episode) -> None:
        """The operator-driven steps of a finished episode, each with the executed actions that follow."""
        actions = np.stack(ep.actions)
        for t in np.nonzero(ep.labels)[0]:
            target, pad = chunk_targets(actions, t, self.chunk)
            self.online["state"].append(ep.states[t])
            self.online["task_index"].append(ep.task_index)
            self.online["action"].append(target)
            self.online["action_is_pad"].append(pad)

    def update(self, online_fraction: float = 0.5) -> None:
        n = self.cfg.batch_size
        n_online = int(round(n * online_fraction)) if self.online["state"] else 0
        parts = []
        if n_online:
            idx = self.rng.integers(0, len(self.online["state"]), n_online)
            online = {k: np.asarray(v)[idx] for k, v in self.online.items()}
            parts.append(online | {"is_online": np.ones(n_online, bool)})
        idx = self.rng.integers(0, len(self.demos["state"]), n - n_online)
        parts.append({k: self.demos[k][idx] for k in self.online} | {"is_online": np.zeros(n - n_online, bool)})
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        batch["obs/state"] = batch.pop("state")
        batch["is_intervention"] = batch["is_online"]
        self.algorithm.update(batch)
        self.updates += 1


def chunk_targets(actions: np.ndarray, t: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Executed actions t..t+chunk-1 of an episode, padded (and marked) past its end."""
    target = actions[t:t + chunk]
    pad = np.zeros(chunk, dtype=bool)
    if len(target) < chunk:
        pad[len(target):] = True
        target = np.concatenate([target, np.repeat(target[-1:], chunk - len(target), axis=0)])
    return target, pad


def demonstrations(cfg: StudyConfig, chunk: int) -> dict:
    from edge.sim.demos import scripted_demos
    from edge.sim.metaworld import MetaWorldRobot

    tasks = MetaWorldRobot(tasks=cfg.tasks).tasks
    out = {k: [] for k in ("state", "task_index", "action", "action_is_pad")}
    for task, steps, _ in scripted_demos(cfg.tasks, cfg.demos_per_task, cfg.max_episode_steps, seed=0):
        actions = np.stack([s.action for s in steps])
        for t, s in enumerate(steps):
            target, pad = chunk_targets(actions, t, chunk)
            out["state"].append(s.observation["state"])
            out["task_index"].append(tasks.index(task))
            out["action"].append(target)
            out["action_is_pad"].append(pad)
    return {k: np.asarray(v) for k, v in out.items()}


# --- one condition -----------------------------------------------------------------------------------------------

def run_condition(cfg: StudyConfig, robots: list[StudyRobot], demos: dict, policy: str, operators: int,
                  seed: int) -> dict:
    """N robots, M operators under ``policy``, from the seed's start policy, for ``cfg.ticks`` ticks."""
    from cloud.operators.allocator import Allocator

    learner = Learner(cfg, robots[0].robot.tasks, demos, seed)
    allocator = Allocator([f"operator-{i + 1}" for i in range(operators)], policy, cfg.min_hold_s, seed)
    for r in robots:
        r.start(seed)
    episodes, waits = [], []
    holding_ticks = busy_ticks = driving_ticks = 0
    assignments: dict = {}
    began, update_credit = time.monotonic(), 0.0
    for tick in range(cfg.ticks):
        now = tick / cfg.control_hz
        refill = [r for r in robots if not r.queue]
        if refill:
            chunks = learner.predict(np.stack([r.obs.features["state"] for r in refill]),
                                     np.array([r.episode.task_index for r in refill]))
            for r, chunk in zip(refill, chunks):
                r.take_chunk(chunk, learner.action_std, learner.n_action_steps)
        needs = {r.id: r.need(now) for r in robots}
        before = assignments
        assignments = allocator.step(needs, now)
        waits += [needs[rid].wanted_for_s for rid, a in assignments.items()
                  if rid not in before or before[rid].operator != a.operator]
        busy_ticks += len(assignments)
        for r in robots:
            record = r.act(r.id in assignments, now)
            holding_ticks += r.holding
            driving_ticks += r.was_driven
            if record is not None:
                episodes.append(record)
                learner.add_episode(r.finished)
        update_credit += cfg.updates_per_tick
        while update_credit >= 1.0:
            learner.update()
            update_credit -= 1.0
    return summarize(cfg, episodes, waits, holding_ticks, busy_ticks, driving_ticks, operators, learner.updates,
                     time.monotonic() - began)


def summarize(cfg: StudyConfig, episodes: list[dict], waits: list[float], holding_ticks: int, busy_ticks: int,
              driving_ticks: int, operators: int, updates: int, wall_s: float) -> dict:
    duration_s = cfg.ticks / cfg.control_hz
    edges = np.linspace(0.0, duration_s, cfg.time_bins + 1)
    evals = [e for e in episodes if e["evaluation"]]
    curve = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [e["success"] for e in evals if lo <= e["end_s"] < hi or (hi == duration_s and e["end_s"] == hi)]
        curve.append(float(np.mean(inside)) if inside else None)
    late = [e["success"] for e in evals if e["end_s"] >= duration_s * 2 / 3]
    successes = sum(e["success"] for e in episodes)
    effort = sum(e["intervention_steps"] for e in episodes)
    return {"episodes": len(episodes), "evaluation_episodes": len(evals), "successes": successes,
            "success_curve": curve, "bin_edges_s": edges.tolist(),
            "final_autonomous_success": float(np.mean(late)) if late else None,
            "supervised_success": _mean([e["success"] for e in episodes if not e["evaluation"]]),
            "intervention_steps": effort, "rohe": successes / (1 + effort),
            "idle_robot_time": holding_ticks / (cfg.robots * cfg.ticks),
            "operator_utilisation": busy_ticks / (operators * cfg.ticks),
            "operator_driving": driving_ticks / (operators * cfg.ticks),
            "assignments": len(waits),
            "time_to_help_p50_s": float(np.percentile(waits, 50)) if waits else None,
            "time_to_help_p99_s": float(np.percentile(waits, 99)) if waits else None,
            "learner_updates": updates, "wall_s": wall_s}


def _mean(xs: list) -> float | None:
    return float(np.mean(xs)) if xs else None


# --- the study ---------------------------------------------------------------------------------------------------

def conditions(cfg: StudyConfig) -> list[tuple[str, str, int]]:
    """(label, policy, M): every policy at every M, then the unlimited bound (M = N)."""
    out = [(f"{p} M={m}", p, m) for m in cfg.operator_counts for p in cfg.policies]
    return out + [(f"unlimited M={cfg.robots}", "priority", cfg.robots)]


def run_study(cfg: StudyConfig, progress=print) -> dict:
    import torch

    torch.set_num_threads(1)
    began = time.time()
    from edge.sim.demo import _demo_trainer

    demos = demonstrations(cfg, _demo_trainer().fleet_policy().chunk_size)
    robots = [StudyRobot(i, cfg) for i in range(cfg.robots)]
    runs = []
    todo = [(seed, c) for seed in cfg.seeds for c in conditions(cfg)]
    for i, (seed, (label, policy, m)) in enumerate(todo):
        result = run_condition(cfg, robots, demos, policy, m, seed)
        runs.append({"condition": label, "policy": policy, "operators": m, "seed": seed, **result})
        progress(f"[{i + 1}/{len(todo)}] seed {seed} {label}: final autonomous success "
                 f"{fmt(result['final_autonomous_success'])}, human effort {result['intervention_steps']} steps, "
                 f"ROHE {result['rohe'] * 1000:.1f}/1000, idle {100 * result['idle_robot_time']:.0f}%, "
                 f"operators busy {100 * result['operator_utilisation']:.0f}% ({result['wall_s']:.0f}s)")
    for r in robots:
        r.robot.disconnect()
    return {"config": asdict(cfg), "conditions": aggregate(cfg, runs), "runs": runs, "wall_time_s": time.time() - began}


METRICS = ("final_autonomous_success", "supervised_success", "intervention_steps", "rohe", "idle_robot_time",
           "operator_utilisation", "operator_driving", "time_to_help_p50_s", "time_to_help_p99_s")


def aggregate(cfg: StudyConfig, runs: list[dict]) -> dict:
    out = {}
    for label, policy, m in conditions(cfg):
        mine = [r for r in runs if r["condition"] == label]
        entry = {"policy": policy, "operators": m, "seeds": len(mine)}
        for key in METRICS:
            xs = [r[key] for r in mine if r[key] is not None]
            entry[key] = {"mean": _mean(xs), "std": float(np.std(xs)) if xs else None}
        curves = np.array([[np.nan if v is None else v for v in r["success_curve"]] for r in mine], dtype=float)
        with warnings.catch_warnings():  # a bin without evaluation episodes in any seed: None
            warnings.simplefilter("ignore", RuntimeWarning)
            entry["success_curve"] = [None if np.isnan(v) else float(v) for v in np.nanmean(curves, axis=0)]
        entry["bin_edges_s"] = mine[0]["bin_edges_s"]
        out[label] = entry
    return out


def table(result: dict) -> str:
    head = ("| condition | final autonomous success | success over time (per bin) | human effort (steps) "
            "| ROHE (succ./1000 interv. steps) | idle robot time | operator utilisation (driving) "
            "| time to help p50 / p99 (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, c in result["conditions"].items():
        def ms(key, scale=1.0, spec=".2f"):
            m, s = c[key]["mean"], c[key]["std"]
            return "-" if m is None else f"{m * scale:{spec}} ± {s * scale:{spec}}"
        curve = " ".join(fmt(v) for v in c["success_curve"])
        driving = c["operator_driving"]["mean"]
        p50, p99 = c["time_to_help_p50_s"]["mean"], c["time_to_help_p99_s"]["mean"]
        lines.append(f"| {label} | {ms('final_autonomous_success')} | {curve} | {ms('intervention_steps', spec='.0f')} "
                     f"| {ms('rohe', 1000, '.1f')} | {ms('idle_robot_time', 100, '.0f')}% "
                     f"| {ms('operator_utilisation', 100, '.0f')}% ({fmt(driving and 100 * driving, '.0f')}%) "
                     f"| {fmt(p50, '.1f')} / {fmt(p99, '.1f')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds, robots = result["conditions"], result["config"]["robots"]
    ms = sorted({c["operators"] for c in conds.values() if c["operators"] != robots})
    fig, axes = plt.subplots(1, len(ms) + 1, figsize=(5.5 * (len(ms) + 1), 4.2))
    for ax, m in zip(axes, ms):
        for label, c in conds.items():
            if c["operators"] != m and not label.startswith("unlimited"):
                continue
            edges = np.array(c["bin_edges_s"])
            mids = (edges[:-1] + edges[1:]) / 2
            ys = np.array([np.nan if v is None else v for v in c["success_curve"]])
            ax.plot(mids, ys, marker="o", label=label, linestyle="--" if label.startswith("unlimited") else "-")
        ax.set(title=f"autonomous success, M = {m} (dashed: M = N = {robots})", xlabel="simulated time (s)",
               ylabel="held-out success (eval episodes)", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels = list(conds)
    x = np.arange(len(labels))
    ax.bar(x - 0.27, [conds[k]["rohe"]["mean"] * 1000 for k in labels], 0.27, label="ROHE (per 1000 steps)")
    ax.bar(x, [conds[k]["idle_robot_time"]["mean"] * 100 for k in labels], 0.27, label="idle robot time %")
    ax.bar(x + 0.27, [conds[k]["operator_utilisation"]["mean"] * 100 for k in labels], 0.27, label="operators busy %")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    fig.suptitle(f"{result['config']['robots']} robots, seeds {result['config']['seeds']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the test's size (3 robots, M=1, one seed, 300 ticks)")
    p.add_argument("--json", type=Path, default=Path("runs/operator_allocation/study.json"))
    p.add_argument("--plot", type=Path, default=Path("runs/operator_allocation/study.png"))
    p.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 0,1,2")
    p.add_argument("--ticks", type=int, help="control ticks per condition")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    cfg = QUICK if args.quick else StudyConfig()
    cfg = replace(cfg, **{k: v for k, v in (("seeds", args.seeds), ("ticks", args.ticks)) if v})
    result = run_study(cfg, progress=lambda line: print(line, flush=True))
    write_json(str(args.json), result)
    plot(result, args.plot)
    print(table(result))
    print(f"wall time {result['wall_time_s']:.0f} s\njson: {args.json}\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
