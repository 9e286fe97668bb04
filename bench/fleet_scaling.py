"""Fleet-scaling study: how much faster does a fleet reach 80% success than one robot?

For every fleet size and seed, one run under a wall-clock budget (the same for
every size, or a longer one for 1 robot with --budget-by-size 1:600): the
real system (``fleet gateway``, ``fleet trainer`` with HG-DAgger, ``fleet
sim-fleet`` with N MetaWorld robots in real time and the simulated operator),
starting from the same weak behaviour-cloned policy. After each run, the
versions it published are evaluated on held-out initial states with the
operator off. Writes a JSON with every number and a PNG, and prints a table.

    python bench/fleet_scaling.py --quick --json quick.json --plot quick.png   # ~18 min, 2 CPU cores
    python bench/fleet_scaling.py --device cuda --json full.json --plot full.png  # MT10, GPU machine

See docs/fleet-scaling.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import fmt  # noqa: E402
from bench.scaling.config import FULL, QUICK, StudyConfig  # noqa: E402

log = logging.getLogger("fleet_scaling")


def _targets(result: dict) -> dict:
    """The issue's targets, each True/False, or None where this study cannot tell."""

    def at_least(n: str, goal: float):
        if n not in result["speedup_to_0_8"]:
            return None
        value, bounds = result["speedup_to_0_8"][n], result["speedup_bounds"][n]
        if value is not None:
            return value >= goal
        if bounds["lower"] is not None and bounds["lower"] >= goal:
            return True  # 1 robot censored: even the lower bound is there
        if bounds["upper"] is not None and bounds["upper"] < goal:
            return False
        return None

    finals = [f["mean"] for f in result["final_success"].values() if f["mean"] is not None]
    return {"speedup_4_robots_ge_3_5": at_least("4", 3.5), "speedup_8_robots_ge_6": at_least("8", 6.0),
            "human_effort_falls_in_every_run": all(e["falls_in_every_run"] for e in result["human_effort"].values()),
            "final_success_ge_0_95": (max(finals) >= 0.95) if finals else None}


def run_study(cfg: StudyConfig) -> dict:
    """Train the start policy, run every (seed, fleet size), evaluate, aggregate."""
    from bench.scaling.analysis import aggregate, summarize_run, versions_to_evaluate
    from bench.scaling.evaluate import EvalSpec, evaluate_versions
    from bench.scaling.machine import hardware
    from bench.scaling.run import run_fleet, train_start_policy
    from cloud.policy_store import PolicyStore

    began = time.time()
    hw = hardware()
    out = Path(cfg.out_dir).resolve()
    spec = EvalSpec(tasks=tuple(cfg.tasks), episodes_per_task=cfg.eval_episodes_per_task,
                    max_episode_steps=cfg.max_episode_steps, seed=cfg.eval_seed, device=cfg.device,
                    deal_variants=cfg.eval_deal_variants)
    start_dir = train_start_policy(cfg, out / "start")
    start_eval = evaluate_versions(start_dir, [1], spec)[1]
    log.info("start policy: held-out success %s", {t: round(s, 2) for t, s in start_eval.items()})
    summaries = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seed in cfg.seeds:
        for n in cfg.fleet_sizes:
            run_dir = out / f"runs-{stamp}" / f"n{n}-seed{seed}"
            run = run_fleet(cfg, n, seed, start_dir, run_dir)
            wanted = versions_to_evaluate(run, cfg) - {1}
            evaluating = time.monotonic()
            evals = evaluate_versions(run_dir / "policies", sorted(wanted), spec, cfg.eval_workers)
            log.info("evaluated %d versions in %.0fs", len(wanted), time.monotonic() - evaluating)
            evals[1] = start_eval
            summary = summarize_run(run, evals, cfg)
            summary["run_dir"] = str(run_dir)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))  # kept if a later run fails
            summaries.append(summary)
            log.info("%d robots seed %d: final success %.2f, time to %.0f%%: %s, %d episodes, %d intervention "
                     "steps, learner %.1f steps/s", n, seed, summary["final_success"], 100 * cfg.success_threshold,
                     summary["time_to_threshold_s"], summary["episodes"], summary["intervention_steps"],
                     summary["learner"]["trainer_steps_per_s"])
    result = {"fleet_sizes": list(cfg.fleet_sizes), "seeds": list(cfg.seeds),
              "success_threshold": cfg.success_threshold, "config": asdict(cfg),
              "start_policy": {"success": sum(start_eval.values()) / len(start_eval), "per_task": start_eval,
                               "weights_sha256": PolicyStore(start_dir).manifest(1).total_sha256},
              **aggregate(summaries, cfg), "runs": summaries}
    hw["load_average_1m_end"] = hardware()["load_average_1m"]
    result["hardware"] = hw
    result["targets"] = _targets(result)
    result["wall_time_s"] = time.time() - began
    return result


def table(result: dict) -> str:
    """The per-fleet-size table (markdown)."""
    head = ("| robots | time to 0.8 (s) | speed-up [95% bootstrap over seeds] | final success "
            "| interv. steps/episode (first → last bin) "
            "| ROHE (succ./1000 interv. steps) | labels to 0.8 | acting policy age (s) | learner steps/s "
            "| samples per fresh label | robots real-time | bottleneck |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in map(str, result["fleet_sizes"]):
        t = result["time_to_0_8_s"][n]
        time_s = fmt(t["mean_s"], ".0f") if t["mean_s"] is not None else f"> {t['lower_bound_s']:.0f} ({t['reached']})"
        if t["mean_s"] is not None and t["std_s"] and len(result["seeds"]) > 1:
            time_s += f" ± {t['std_s']:.0f}"
        sp, b = result["speedup_to_0_8"][n], result["speedup_bounds"][n]
        ci = result.get("speedup_ci95", {}).get(n, {})
        lci = result.get("speedup_lower_bound_ci95", {}).get(n, {})
        speed = (fmt(sp) + "x" + (f" [{ci['lower']:.2f}, {ci['upper']:.2f}]" if ci.get("lower") is not None else "")
                 if sp is not None else f">= {b['lower']:.2f}x" + (
                     f" [{lci['lower']:.2f}, {lci['upper']:.2f}]" if lci.get("lower") is not None else "")
                 if b["lower"] is not None else f"<= {b['upper']:.2f}x" if b["upper"] is not None else "-")
        f = result["final_success"][n]
        final = fmt(f["mean"]) + (f" ± {f['std']:.2f}" if len(result["seeds"]) > 1 else "")
        common = f.get("at_common_budget")
        if common and any(b != common["t_s"] for b in f.get("budget_s", ())):  # a longer budget for this size
            final += f" at {max(f['budget_s']):.0f} s; {fmt(common['mean'])} at {common['t_s']:.0f} s"
        minute = f.get("last_minute", {})
        if minute.get("mean") is not None:
            final += f" (last minute {fmt(minute['mean'])})"
        eff = [x for x in result["human_effort"][n]["intervention_steps_per_episode"] if x is not None]
        effort = f"{eff[0]:.1f} → {eff[-1]:.1f}" if eff else "-"
        rohe = result["rohe"][n]["mean"]
        learner = result["learner"][n]
        lag = result.get("data_and_lag", {}).get(n, {})  # absent from studies older than these fields
        lines.append(f"| {n} | {time_s} | {speed} | {final} | {effort} | {fmt(rohe * 1000 if rohe else None, '.1f')}"
                     f" | {fmt(lag.get('labels_to_threshold_mean'), '.0f')}"
                     f" | {fmt(lag.get('acting_policy_age_s_mean'), '.1f')}"
                     f" | {fmt(learner['trainer_steps_per_s'], '.1f')} | "
                     f"{fmt(learner['samples_per_fresh_labeled_step'], '.1f')} | "
                     f"{fmt(learner['robot_realtime_ratio'])} | {', '.join(sorted(set(learner['bottleneck'])))} |")
    return "\n".join(lines)


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def _budgets(s: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(n), float(b)) for n, b in (part.split(":") for part in s.split(",") if part.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected fleet-size:seconds pairs, e.g. 1:600,2:450") from None


def _options(s: str) -> tuple[str, ...]:
    """A quoted string of command-line options as arguments (``--trainer-args``, ``--edge-args``)."""
    return tuple(shlex.split(s))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ~18 minute preset for 2 CPU cores (default: full)")
    p.add_argument("--json", type=Path, help="where to write the JSON (default: <out-dir>/fleet_scaling.json)")
    p.add_argument("--plot", type=Path, help="where to write the PNG (default: <out-dir>/fleet_scaling.png)")
    p.add_argument("--fleet-sizes", type=_csv(int), help="comma-separated fleet sizes, e.g. 1,2,4,8")
    p.add_argument("--seeds", type=_csv(int), help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--tasks", type=_csv(str), help="comma-separated MetaWorld tasks (env names or instructions)")
    for name, kind in (("budget_s", float), ("control_hz", float), ("max_episode_steps", int),
                       ("demos_per_task", int), ("seed_bc_steps", int), ("batch_size", int),
                       ("publish_every_steps", int), ("eval_episodes_per_task", int), ("eval_points", int),
                       ("eval_workers", int), ("effort_bins", int), ("device", str), ("out_dir", str)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                       help=f"override the preset's {name} (see bench/scaling/config.py)")
    p.add_argument("--budget-by-size", dest="budget_by_size", type=_budgets, metavar="N:S,...",
                   help="a longer budget for some fleet sizes, e.g. 1:600 (the evaluation grid keeps its spacing)")
    p.add_argument("--trainer-args", dest="trainer_args", type=_options, metavar="'OPTIONS'",
                   help="extra `fleet trainer` options for the runs' learner (not the start policy), e.g. "
                        "'--algorithm.type hg_dagger --algorithm.use_successes true'")
    p.add_argument("--edge-args", dest="edge_args", type=_options, metavar="'OPTIONS'",
                   help="extra `fleet sim-fleet` options for every robot, after the preset's (the later option wins), "
                        "e.g. '--edge.operator.patience_steps 80'")
    p.add_argument("--fresh-variants", dest="fresh_variants", action="store_true", default=None,
                   help="robots start training episodes from freshly sampled initial states (see the config)")
    p.add_argument("--reanalyse", type=Path, nargs="+", metavar="JSON",
                   help="recompute the aggregates, targets, table and plot of a finished study's JSON (runs not rerun); "
                        "several JSONs of one design (other seeds or fleet sizes) are pooled into one study")
    p.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                   help="set finished studies of different designs side by side (what differs in their configs "
                        "labels them): a table of each run's time to 0.8, final and last-minute success and how "
                        "steady the policy stayed after 0.8, the JSON and a PNG (default fleet_scaling_compare.*)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def study_config(result: dict) -> StudyConfig:
    """The StudyConfig a study's JSON was run with."""
    def frozen(v):
        return tuple(map(frozen, v)) if isinstance(v, list) else v

    return StudyConfig(**{k: frozen(v) for k, v in result["config"].items()})


def run_budgets(result: dict) -> dict[int, float]:
    """The budget of each fleet size a study ran, seconds."""
    cfg = study_config(result)
    return {n: cfg.budget_for(n) for n in result["fleet_sizes"]}


def reanalyse(result: dict) -> dict:
    """``result`` (a study's JSON) with its aggregates and targets recomputed from its runs by this code; a run
    summary older than ``labels_to_threshold`` / ``acting_policy_age_s`` gets them from its run record
    (``<run_dir>/run.json``) where that is still on disk, one older than ``final_minute_success`` from its
    curve."""
    from bench.scaling.analysis import aggregate, data_and_lag, final_minute_success

    runs = []
    for summary in result["runs"]:
        record = Path(summary.get("run_dir", "")) / "run.json"
        if "labels_to_threshold" not in summary and summary.get("run_dir") and record.is_file():
            run = json.loads(record.read_text())
            summary = {**summary, **data_and_lag(run, summary["budget_s"], summary["time_to_threshold_s"])}
        if "final_minute_success" not in summary:
            curve = summary["curve"]
            summary = {**summary, "final_minute_success": final_minute_success(curve["t_s"], curve["success"],
                                                                               summary["budget_s"])}
        runs.append(summary)
    result = {**result, "runs": runs, **aggregate(runs, study_config(result))}
    result["targets"] = _targets(result)
    return result


def same_start_policy(a: dict, b: dict) -> bool:
    """One start policy: the same weights where both studies recorded their digest, else (older studies
    recorded none) the same held-out success on every task."""
    if a.get("weights_sha256") and b.get("weights_sha256"):
        return a["weights_sha256"] == b["weights_sha256"]
    return (a["success"], a["per_task"]) == (b["success"], b["per_task"])


def _start_policy_name(start: dict) -> str:
    digest = f"weights {start['weights_sha256'][:8]}, " if start.get("weights_sha256") else ""
    return f"{digest}{start['success']:.3f} held-out success"


POOLED_FIELDS = ("seeds", "fleet_sizes", "out_dir")
"""What studies pooled by ``merge_studies`` may differ in: everything else is one design."""


def merge_studies(results: list[dict], names: list[str]) -> dict:
    """Several studies of one design (the same config and start policy, other seeds or fleet sizes) as one: their
    runs together. ValueError naming the first field that differs, or a (fleet size, seed) run found twice."""
    first, seen, budgets = results[0], {}, {}
    for result, name in zip(results, names):
        for n, budget in run_budgets(result).items():  # a size's runs pool at one budget
            if budgets.setdefault(n, (budget, name))[0] != budget:
                raise ValueError(f"{name}: {n} robot(s) ran for {budget:.0f} s, in {budgets[n][1]} for "
                                 f"{budgets[n][0]:.0f} s: only runs of one budget can be pooled")
        for key in sorted(set(first["config"]) | set(result["config"])):
            if key == "budget_by_size":  # checked above, size by size (a budget for a size no study ran does not matter)
                continue
            if key not in POOLED_FIELDS and first["config"].get(key) != result["config"].get(key):
                raise ValueError(f"{name}: config {key!r} is {result['config'].get(key)!r}, {names[0]} has "
                                 f"{first['config'].get(key)!r}: only studies of one design can be pooled (they "
                                 f"may differ in {', '.join(POOLED_FIELDS)})")
        if not same_start_policy(result["start_policy"], first["start_policy"]):
            raise ValueError(f"{name}: another start policy ({_start_policy_name(result['start_policy'])}, "
                             f"{names[0]} {_start_policy_name(first['start_policy'])}): only runs from one "
                             "start policy can be pooled")
        for run in result["runs"]:
            pair = (run["fleet_size"], run["seed"])
            if pair in seen:
                raise ValueError(f"{name}: {pair[0]} robot(s), seed {pair[1]} is also in {seen[pair]}")
            seen[pair] = name
    if len(results) == 1:
        return first
    seeds = list(dict.fromkeys(s for r in results for s in r["seeds"]))
    sizes = sorted({n for r in results for n in r["fleet_sizes"]})
    config = {**first["config"], "seeds": seeds, "fleet_sizes": sizes,
              "budget_by_size": [[n, b] for n, (b, _) in sorted(budgets.items()) if b != first["config"]["budget_s"]]}
    return {**first, "seeds": seeds, "fleet_sizes": sizes, "config": config,
            "runs": [run for r in results for run in r["runs"]],
            "wall_time_s": sum(r["wall_time_s"] for r in results),
            "pooled_from": [{"json": name, "seeds": r["seeds"], "fleet_sizes": r["fleet_sizes"],
                             "hardware": r["hardware"], "wall_time_s": r["wall_time_s"]}
                            for r, name in zip(results, names)]}


def design_labels(results: list[dict], names: list[str]) -> list[str]:
    """What sets each study's design apart: the config fields that differ between them (seeds, fleet sizes,
    output directory and budgets aside); the file names where nothing does."""
    def show(v) -> str:
        return " ".join(map(str, v)) or "(none)" if isinstance(v, list) else str(v)

    keys = sorted({k for r in results for k in r["config"]} - set(POOLED_FIELDS) - {"budget_s", "budget_by_size"})
    differ = [k for k in keys if any(r["config"].get(k) != results[0]["config"].get(k) for r in results)]
    if not differ:
        return [Path(name).stem for name in names]
    return ["; ".join(f"{k}: {show(r['config'].get(k))}" for k in differ) for r in results]


def comparison(results: list[dict], names: list[str]) -> dict:
    """Each study's runs, fleet size by fleet size: time to 0.8, final and last-minute success, steadiness."""
    from bench.scaling.analysis import steadiness

    designs = []
    for result, name, label in zip(results, names, design_labels(results, names)):
        threshold = result["success_threshold"]
        sizes = {}
        for n in result["fleet_sizes"]:
            runs = sorted((r for r in result["runs"] if r["fleet_size"] == n), key=lambda r: r["seed"])
            steady = [steadiness(r["curve"]["t_s"], r["curve"]["success"], threshold) for r in runs]
            sizes[str(n)] = {
                "seeds": [r["seed"] for r in runs], "budget_s": [r["budget_s"] for r in runs],
                "time_to_threshold_s": [r["time_to_threshold_s"] for r in runs],
                "final_success": [r["final_success"] for r in runs],
                "final_minute_success": [r["final_minute_success"] for r in runs],
                "lowest_after_threshold": [s["lowest_after"] for s in steady],
                "swing": [s["swing"] for s in steady],
                "curve": result["success_curves"][str(n)]}
        designs.append({"label": label, "json": name, "start_policy_success": result["start_policy"]["success"],
                        "hardware": result["hardware"]["cpu_model"], "fleet_sizes": sizes})
    return {"success_threshold": results[0]["success_threshold"], "designs": designs}


def comparison_table(compared: dict) -> str:
    """The comparison as markdown: one row per design and fleet size, seed values in seed order."""
    def seeds(xs, spec=".2f") -> str:
        return ", ".join(fmt(x, spec) for x in xs)

    def mean(xs) -> str:
        xs = [x for x in xs if x is not None]
        return fmt(sum(xs) / len(xs), ".2f") if xs else "-"

    head = ("| design | start policy | robots | seeds | time to 0.8 (s) | final success | last minute "
            "| lowest after 0.8 | mean change per version after 0.8 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in compared["designs"]:
        for n, row in d["fleet_sizes"].items():
            lines.append(
                f"| {d['label']} | {d['start_policy_success']:.2f} | {n} | {seeds(row['seeds'], 'd')} "
                f"| {seeds(row['time_to_threshold_s'], '.0f')} | {seeds(row['final_success'])} "
                f"(mean {mean(row['final_success'])}) | {seeds(row['final_minute_success'])} "
                f"(mean {mean(row['final_minute_success'])}) | {seeds(row['lowest_after_threshold'])} "
                f"| {seeds(row['swing'], '.3f')} |")
    return "\n".join(lines)


def compare_studies(paths: list[Path], json_path: Path | None, plot_path: Path | None) -> int:
    """``--compare``: the table printed, the JSON and the PNG written; 2 with the reason on an unreadable study."""
    try:
        results = [reanalyse(json.loads(path.read_text())) for path in paths]
        compared = comparison(results, [str(p) for p in paths])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"fleet_scaling: cannot compare {' '.join(map(str, paths))}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    from bench.scaling.plot import plot_comparison

    json_path = json_path or Path("fleet_scaling_compare.json")
    plot_path = plot_path or Path("fleet_scaling_compare.png")
    for path in (json_path, plot_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(compared, indent=1))
    plot_comparison(compared, plot_path)
    print(comparison_table(compared))
    print(f"json: {json_path}\nplot: {plot_path}")
    return 0


def study_from_args(args: argparse.Namespace) -> StudyConfig:
    """The preset with the command line's overrides; ``--edge-args`` adds to the preset's robot options."""
    base = QUICK if args.quick else FULL
    overrides = {k: v for k, v in vars(args).items() if k in StudyConfig.__dataclass_fields__}
    if args.edge_args:
        overrides["edge_args"] = base.edge_args + args.edge_args
    return base.with_overrides(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("edge.loop").setLevel(logging.WARNING)  # one line per evaluation episode otherwise
    if args.compare:
        return compare_studies(args.compare, args.json, args.plot)
    cfg = study_from_args(args)
    if args.reanalyse:
        try:
            studies = [json.loads(path.read_text()) for path in args.reanalyse]
            result = reanalyse(merge_studies(studies, [str(p) for p in args.reanalyse]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"fleet_scaling: cannot reanalyse {' '.join(map(str, args.reanalyse))}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        cfg = study_config(result)
    json_path = args.json or Path(cfg.out_dir) / "fleet_scaling.json"
    plot_path = args.plot or Path(cfg.out_dir) / "fleet_scaling.png"
    if not args.reanalyse:
        result = run_study(cfg)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    from bench.scaling.plot import plot_study

    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_study(result, plot_path)
    print(table(result))
    print(f"start policy success {result['start_policy']['success']:.2f}; targets: {result['targets']}")
    print(f"hardware: {result['hardware']['cpu_cores']} cores ({result['hardware']['cpu_model']}), "
          f"GPU: {result['hardware']['gpu'] or 'none'}; wall time {result['wall_time_s']:.0f} s")
    print(f"json: {json_path}\nplot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
