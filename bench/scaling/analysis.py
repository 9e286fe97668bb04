"""From run records and evaluations to the study's numbers.

success(t) of a run is the held-out success of the newest version published
by time t (t = 0: the start policy). Time to threshold is the first point of
the evaluated grid where success(t) >= threshold (and, as a check on
evaluation noise, the first point from which it stays there); a run that never
gets there is censored at the budget, so its fleet size gets a lower bound
instead of a time, and speed-ups get bounds instead of values. Human effort is
the operator's intervention steps per episode; Return on Human Effort (ROHE,
Fleet-DAgger) is successful episodes per intervention step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bench.scaling.config import StudyConfig

SAMPLES_PER_LABEL_DATA_BOUND = 4.0
"""A learner that draws at least this many samples per freshly labelled step has compute to spare:
the data (the robots and the operator) is the bottleneck. Below it, labels arrive faster than it uses them."""


def grid(cfg: StudyConfig, budget_s: float | None = None) -> list[float]:
    """Times (s) at which success(t) is evaluated: 0 and even steps up to the budget (``budget_s``, default the
    common one), ``eval_points`` of them over the common budget, at the same spacing over a longer one."""
    budget = cfg.budget_s if budget_s is None else budget_s
    points = max(1, round(cfg.eval_points * budget / cfg.budget_s))
    return [budget * k / points for k in range(points + 1)]


def version_at(run: dict, t_s: float) -> int:
    """The newest version published by ``t_s`` (the start policy, v1, at or before 0)."""
    published = [v["version"] for v in run["versions"] if v["t_s"] <= t_s or v["version"] == 1]
    return max(published)


def versions_to_evaluate(run: dict, cfg: StudyConfig) -> set[int]:
    return {version_at(run, t) for t in grid(cfg, _budget(run, cfg))}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _std(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.std(xs)) if xs else None


def _delta(end: dict, start: dict, key: str) -> float | None:
    if end.get(key) is None or start.get(key) is None:
        return None
    return end[key] - start[key]


def time_to(curve_t: Sequence[float], curve_s: Sequence[float], threshold: float) -> float | None:
    """First time the curve reaches ``threshold`` (None: never within the curve)."""
    return next((t for t, s in zip(curve_t, curve_s) if s >= threshold), None)


def time_to_sustained(curve_t: Sequence[float], curve_s: Sequence[float], threshold: float) -> float | None:
    """First time from which the curve stays >= ``threshold`` to the end (None: it ends below)."""
    out = None
    for t, s in zip(curve_t, curve_s):
        out = (out if out is not None else t) if s >= threshold else None
    return out


def steadiness(curve_t: Sequence[float], curve_s: Sequence[float], threshold: float) -> dict:
    """From the first point at ``threshold`` on: the lowest success and the mean change from one evaluated
    version to the next (None: the curve never got there)."""
    start = time_to(curve_t, curve_s, threshold)
    if start is None:
        return {"lowest_after": None, "swing": None}
    after = [s for t, s in zip(curve_t, curve_s) if t >= start]
    return {"lowest_after": min(after), "swing": float(np.mean(np.abs(np.diff(after)))) if len(after) > 1 else 0.0}


def effort_bins(episodes: list[dict], budget_s: float, bins: int) -> dict:
    """Per time bin: episodes, intervention steps per episode, intervention share of steps, ROHE."""
    edges = np.linspace(0.0, budget_s, bins + 1)
    out: dict[str, list] = {"t_s": [], "episodes": [], "intervention_steps_per_episode": [],
                            "intervention_share": [], "success_rate": [], "rohe": []}
    for a, b in zip(edges[:-1], edges[1:]):
        eps = [e for e in episodes if a <= e["t_s"] < b or (b == budget_s and e["t_s"] == b)]
        steps = sum(e["num_steps"] for e in eps)
        inter = sum(e["intervention_steps"] for e in eps)
        wins = sum(bool(e["success"]) for e in eps)
        out["t_s"].append(float((a + b) / 2))
        out["episodes"].append(len(eps))
        out["intervention_steps_per_episode"].append(inter / len(eps) if eps else None)
        out["intervention_share"].append(inter / steps if steps else None)
        out["success_rate"].append(wins / len(eps) if eps else None)
        out["rohe"].append(wins / inter if inter else None)
    return out


def _effort_slope_per_min(episodes: list[dict]) -> float | None:
    """Least-squares slope of intervention steps per episode against time, steps per minute."""
    if len(episodes) < 3:
        return None
    t = np.array([e["t_s"] for e in episodes]) / 60.0
    y = np.array([e["intervention_steps"] for e in episodes], dtype=float)
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, y, 1)[0])


def labels_stored_by(run: dict, t_s: float | None) -> int | None:
    """Operator-labelled (intervention) steps the robots had stored by ``t_s`` (the last timeline sample at or
    before it; None for None): the human effort a fleet spent to get there."""
    if t_s is None:
        return None
    samples = [row for row in run.get("timeline", ()) if row["t_s"] <= t_s + 1e-9]
    return int(samples[-1]["intervention_steps_stored"]) if samples else None


def acting_policy_age_s(run: dict, episodes: list[dict]) -> float | None:
    """Mean, over episodes, of how old the version a robot acted with was when the episode ended (seconds since
    its publication; the start policy counts from t = 0). Robots swap versions between episodes only, so this is
    how far behind the learner the data of the fleet is; the learner needs it to be small next to the time to
    the threshold."""
    published = {v["version"]: max(0.0, v["t_s"]) for v in run["versions"]}
    ages = [e["t_s"] - published[e["policy_version"]] for e in episodes if e.get("policy_version") in published]
    return float(np.mean(ages)) if ages else None


def data_and_lag(run: dict, budget_s: float, crossed_s: float | None) -> dict:
    """A run's ``labels_to_threshold`` (stored by ``crossed_s``) and ``acting_policy_age_s`` (episodes within
    its budget)."""
    episodes = [e for e in run["episodes"] if 0.0 <= e["t_s"] <= budget_s]
    return {"labels_to_threshold": labels_stored_by(run, crossed_s),
            "acting_policy_age_s": acting_policy_age_s(run, episodes)}


def learner_usage(run: dict, cfg: StudyConfig) -> dict:
    """Learner throughput and CPU, fresh labels, the robots' real-time ratio, the machine's load."""
    start, end = run["start"], run["end"]
    wall = max(end["t_s"] - start["t_s"], 1e-9)
    steps = end["trainer_step"] - start["trainer_step"]
    labels = end["intervention_steps_stored"] - start["intervention_steps_stored"]
    stored = end["steps_stored"] - start["steps_stored"]
    samples = steps * cfg.batch_size
    cpu = {name: (_delta(end, start, f"{name}_cpu_s") or 0.0) / wall for name in ("trainer", "fleet", "gateway")}
    busy, total = _delta(end, start, "machine_busy_cpu_s"), _delta(end, start, "machine_total_cpu_s")
    machine_busy = busy / wall if busy is not None else None
    cores = total / wall if total is not None else None
    per_label = samples / labels if labels else None
    starved = (cpu["trainer"] < 0.7 * cfg.trainer_torch_threads and machine_busy is not None and cores is not None
               and machine_busy >= 0.9 * cores)
    if starved:
        bottleneck = "learner (CPU-starved)"
    elif per_label is not None and per_label < SAMPLES_PER_LABEL_DATA_BOUND:
        bottleneck = "learner"
    else:
        bottleneck = "data"
    return {
        "trainer_steps": steps, "trainer_steps_per_s": steps / wall, "trainer_samples_per_s": samples / wall,
        "fresh_labeled_steps": labels, "samples_per_fresh_labeled_step": per_label,
        "trainer_cpu_cores": cpu["trainer"], "robots_cpu_cores": cpu["fleet"], "gateway_cpu_cores": cpu["gateway"],
        "machine_busy_cores": machine_busy, "machine_cores": cores,
        "other_load_cores": (machine_busy - sum(cpu.values())) if machine_busy is not None else None,
        "robot_steps_stored": stored,
        "robot_realtime_ratio": stored / (run["fleet_size"] * cfg.control_hz * wall),
        "bottleneck": bottleneck,
    }


FINAL_WINDOW_S = 60.0
"""The last minute of a run: its versions' mean success says where the curve ends better than the last one
alone (75 episodes of one version, which online training moves by a few points from version to version)."""


def final_minute_success(curve_t: Sequence[float], curve_s: Sequence[float], budget_s: float) -> float:
    """Mean success of the curve's points in the run's last ``FINAL_WINDOW_S``."""
    return float(np.mean([s for t, s in zip(curve_t, curve_s) if t >= budget_s - FINAL_WINDOW_S]))


def summarize_run(run: dict, evals: dict[int, dict[str, float]], cfg: StudyConfig) -> dict:
    """One run's curve, time to threshold, final success, human effort, ROHE and learner usage."""
    budget = _budget(run, cfg)
    ts = grid(cfg, budget)
    versions = [version_at(run, t) for t in ts]
    success = [float(np.mean(list(evals[v].values()))) for v in versions]
    common = min(range(len(ts)), key=lambda i: abs(ts[i] - cfg.budget_s))
    episodes = [e for e in run["episodes"] if 0.0 <= e["t_s"] <= budget]
    inter = sum(e["intervention_steps"] for e in episodes)
    wins = sum(bool(e["success"]) for e in episodes)
    bins = effort_bins(episodes, budget, max(1, round(cfg.effort_bins * budget / cfg.budget_s)))
    filled = [x for x in bins["intervention_steps_per_episode"] if x is not None]
    slope = _effort_slope_per_min(episodes)
    crossed = time_to(ts, success, cfg.success_threshold)
    return {
        "fleet_size": run["fleet_size"], "seed": run["seed"], "budget_s": budget, "setup_s": run["setup_s"],
        "all_robots_running_s": run.get("all_robots_running_s"), "steps_before_t0": run["start"]["steps_stored"],
        "curve": {"t_s": ts, "version": versions, "success": success},
        "time_to_threshold_s": crossed, **data_and_lag(run, budget, crossed),
        "time_to_threshold_sustained_s": time_to_sustained(ts, success, cfg.success_threshold),
        "final_version": versions[-1], "final_success": success[-1], "final_success_per_task": evals[versions[-1]],
        "final_minute_success": final_minute_success(ts, success, budget),
        "success_at_common_budget": success[common],
        "versions_published": max(v["version"] for v in run["versions"]),
        "episodes": len(episodes), "successes": wins, "intervention_steps": inter,
        "rohe": wins / inter if inter else None,
        "human_effort": {**bins, "slope_steps_per_episode_per_min": slope,
                         "falls": (slope is not None and slope < 0) and (len(filled) < 2 or filled[-1] <= filled[0])},
        "learner": learner_usage(run, cfg),
    }


def _speedup(t1: dict, tn: dict) -> tuple[float | None, float | None, float | None]:
    """(speed-up, lower bound, upper bound) of fleet n over 1 robot from their time-to-threshold entries.

    None where fleet n was at the threshold from t = 0 (the start policy already was: nothing to speed up)."""
    if tn["mean_s"] == 0:
        return None, None, None
    if t1["mean_s"] is not None and tn["mean_s"] is not None:
        value = t1["mean_s"] / tn["mean_s"]
        return value, value, value
    if tn["mean_s"] is not None:  # 1 robot censored: it needed at least its lower bound
        return None, t1["lower_bound_s"] / tn["mean_s"], None
    if t1["mean_s"] is not None:  # fleet n censored
        return None, None, t1["mean_s"] / tn["lower_bound_s"]
    return None, None, None


def speedup_interval(t1: list[float | None], tn: list[float | None], resamples: int = 10_000,
                     seed: int = 0, censored_t1_s: float | Sequence[float] | None = None) -> dict:
    """95% percentile-bootstrap interval of mean(t1) / mean(tn) over seeds (each size resampled on its own).

    None where a run never reached the threshold (a censored time has no value to resample), a size has
    one seed only (no spread to resample) or a fleet-n run was at the threshold from t = 0.

    ``censored_t1_s`` (the budget, or each 1-robot run's budget): a 1-robot run that never got there counts as
    reaching it then. It needed longer, so every resampled ratio, and the interval, is then one of a lower bound on
    the speed-up."""
    if censored_t1_s is not None:
        budgets = [censored_t1_s] * len(t1) if isinstance(censored_t1_s, (int, float)) else list(censored_t1_s)
        t1 = [b if t is None else t for t, b in zip(t1, budgets)]
    if any(t is None for t in (*t1, *tn)) or len(t1) < 2 or len(tn) < 2 or not all(tn):
        return {"lower": None, "upper": None, "resamples": 0}
    rng = np.random.default_rng(seed)
    a, b = np.asarray(t1, dtype=float), np.asarray(tn, dtype=float)
    ratio = (a[rng.integers(0, len(a), (resamples, len(a)))].mean(1)
             / b[rng.integers(0, len(b), (resamples, len(b)))].mean(1))
    return {"lower": float(np.percentile(ratio, 2.5)), "upper": float(np.percentile(ratio, 97.5)),
            "resamples": resamples}


def _budget(summary: dict, cfg: StudyConfig) -> float:
    """A run's (record's or summary's) own budget; older study JSONs kept none: the common one."""
    return summary.get("budget_s", cfg.budget_s)


def aggregate(summaries: list[dict], cfg: StudyConfig) -> dict:
    """Per fleet size over seeds: the fields of the study's JSON (keys are fleet sizes as strings)."""
    sizes = sorted({s["fleet_size"] for s in summaries})
    by = {n: [s for s in summaries if s["fleet_size"] == n] for n in sizes}
    curves, t_to, final, effort, rohe, learner, lag = {}, {}, {}, {}, {}, {}, {}
    for n, runs in by.items():
        key = str(n)
        common = min(len(r["curve"]["success"]) for r in runs)  # runs merged from studies of other budgets
        stack = np.array([r["curve"]["success"][:common] for r in runs])
        curves[key] = {"t_s": runs[0]["curve"]["t_s"][:common], "mean": stack.mean(0).tolist(),
                       "std": stack.std(0).tolist(), "per_seed": [r["curve"]["success"] for r in runs]}
        times = [r["time_to_threshold_s"] for r in runs]
        reached = [t for t in times if t is not None]
        t_to[key] = {"per_seed_s": times, "reached": f"{len(reached)}/{len(times)}",
                     "sustained_per_seed_s": [r["time_to_threshold_sustained_s"] for r in runs],
                     "mean_s": float(np.mean(reached)) if len(reached) == len(times) else None,
                     "std_s": float(np.std(reached)) if len(reached) == len(times) else None,
                     "lower_bound_s": float(np.mean([t if t is not None else _budget(r, cfg)
                                                     for t, r in zip(times, runs)]))}
        tasks = runs[0]["final_success_per_task"]
        final[key] = {"mean": _mean(r["final_success"] for r in runs), "std": _std(r["final_success"] for r in runs),
                      "per_seed": [r["final_success"] for r in runs], "budget_s": [_budget(r, cfg) for r in runs],
                      "per_task": {t: _mean(r["final_success_per_task"][t] for r in runs) for t in tasks}}
        minute = [r.get("final_minute_success") for r in runs]  # absent from studies older than this field
        final[key]["last_minute"] = {"mean": _mean(minute), "std": _std(minute), "per_seed": minute}
        at_common = [r.get("success_at_common_budget", r["final_success"]) for r in runs]
        final[key]["at_common_budget"] = {"t_s": cfg.budget_s, "mean": _mean(at_common), "std": _std(at_common),
                                          "per_seed": at_common}
        bins = max(len(r["human_effort"]["t_s"]) for r in runs)
        per_ep = np.full((len(runs), bins), np.nan)  # NaN past the end of a shorter run
        for row, r in zip(per_ep, runs):
            steps = r["human_effort"]["intervention_steps_per_episode"]
            row[:len(steps)] = [x if x is not None else np.nan for x in steps]
        effort[key] = {
            "t_s": max((r["human_effort"]["t_s"] for r in runs), key=len),
            "intervention_steps_per_episode": [None if np.all(np.isnan(c)) else float(np.nanmean(c)) for c in per_ep.T],
            "intervention_steps_total": [r["intervention_steps"] for r in runs],
            "episodes_total": [r["episodes"] for r in runs],
            "slope_steps_per_episode_per_min": [r["human_effort"]["slope_steps_per_episode_per_min"] for r in runs],
            "falls_in_every_run": all(r["human_effort"]["falls"] for r in runs),
        }
        rohe[key] = {"mean": _mean(r["rohe"] for r in runs), "std": _std(r["rohe"] for r in runs),
                     "per_seed": [r["rohe"] for r in runs]}
        labels = [r.get("labels_to_threshold") for r in runs]  # absent from studies older than this field
        lag[key] = {"labels_to_threshold_per_seed": labels, "labels_to_threshold_mean": _mean(labels),
                    "acting_policy_age_s_per_seed": [r.get("acting_policy_age_s") for r in runs],
                    "acting_policy_age_s_mean": _mean(r.get("acting_policy_age_s") for r in runs)}
        learner[key] = {k: _mean(r["learner"][k] for r in runs) for k in runs[0]["learner"] if k != "bottleneck"}
        learner[key]["bottleneck"] = [r["learner"]["bottleneck"] for r in runs]
    speedup, bounds, intervals, lower_intervals = {}, {}, {}, {}
    for n in sizes:
        if 1 not in by:
            speedup[str(n)], bounds[str(n)] = None, {"lower": None, "upper": None}
            intervals[str(n)] = lower_intervals[str(n)] = speedup_interval([None], [None])
            continue
        value, lower, upper = _speedup(t_to["1"], t_to[str(n)])
        speedup[str(n)], bounds[str(n)] = value, {"lower": lower, "upper": upper}
        intervals[str(n)] = speedup_interval(t_to["1"]["per_seed_s"], t_to[str(n)]["per_seed_s"])
        lower_intervals[str(n)] = speedup_interval(t_to["1"]["per_seed_s"], t_to[str(n)]["per_seed_s"],
                                                   censored_t1_s=[_budget(r, cfg) for r in by[1]])
    return {"success_curves": curves, "time_to_0_8_s": t_to, "speedup_to_0_8": speedup,
            "speedup_bounds": bounds, "speedup_ci95": intervals, "speedup_lower_bound_ci95": lower_intervals,
            "final_success": final, "human_effort": effort, "rohe": rohe, "learner": learner,
            "data_and_lag": lag}
