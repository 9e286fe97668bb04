"""The fleet-scaling study (bench/fleet_scaling.py): its arithmetic, ``fleet sim-fleet``'s
configuration, and the whole machinery in a reduced configuration (2 tasks, 1 and 2 robots,
a budget of seconds) producing its JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench.scaling.analysis import (_speedup, acting_policy_age_s, aggregate, effort_bins, labels_stored_by,
                                    speedup_interval, steadiness, summarize_run, time_to, time_to_sustained,
                                    version_at)
from bench.scaling.config import QUICK, StudyConfig
from edge.agent import EdgeConfig
from edge.robots.config import MetaWorldConfig
from edge.sim.fleet import OPERATOR_SEED_OFFSET, SimFleetConfig
from fleet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# --- arithmetic ------------------------------------------------------------------------------


def _run(fleet_size: int, versions: list[tuple[int, float]], episodes: list[tuple[float, int, bool]],
         trainer_steps: int = 100, labels: int = 50) -> dict:
    start = {"t_s": 0.0, "trainer_step": 0, "intervention_steps_stored": 0, "steps_stored": 0}
    end = {"t_s": 100.0, "trainer_step": trainer_steps, "intervention_steps_stored": labels,
           "steps_stored": 2000 * fleet_size}
    return {"fleet_size": fleet_size, "seed": 0, "setup_s": 1.0, "start": start, "end": end,
            "versions": [{"version": v, "t_s": t} for v, t in versions],
            "episodes": [{"t_s": t, "num_steps": 100, "intervention_steps": i, "success": s} for t, i, s in episodes]}


def test_version_at_is_the_newest_published_by_then_and_v1_at_the_start():
    run = _run(1, [(1, -3.0), (2, 10.0), (3, 20.0)], [])
    assert [version_at(run, t) for t in (0.0, 9.9, 10.0, 25.0)] == [1, 1, 2, 3]


def test_time_to_threshold_is_the_first_crossing_or_none():
    assert time_to([0, 10, 20, 30], [0.1, 0.85, 0.7, 0.9], 0.8) == 10
    assert time_to([0, 10], [0.1, 0.79], 0.8) is None
    assert time_to_sustained([0, 10, 20, 30], [0.1, 0.85, 0.7, 0.9], 0.8) == 30
    assert time_to_sustained([0, 10, 20], [0.9, 0.9, 0.7], 0.8) is None


def test_steadiness_is_the_lowest_point_and_mean_change_after_the_first_crossing():
    assert steadiness([0, 10, 20, 30, 40], [0.5, 0.85, 0.75, 0.95, 0.95], 0.8) == pytest.approx(
        {"lowest_after": 0.75, "swing": (0.10 + 0.20 + 0.0) / 3})
    assert steadiness([0, 10], [0.5, 0.6], 0.8) == {"lowest_after": None, "swing": None}
    assert steadiness([0, 10], [0.5, 0.9], 0.8) == {"lowest_after": 0.9, "swing": 0.0}


def test_speedup_is_a_ratio_or_honest_bounds_when_a_run_never_reached_the_threshold():
    known = {"mean_s": 100.0, "lower_bound_s": 100.0}
    censored = {"mean_s": None, "lower_bound_s": 300.0}
    assert _speedup(known, {"mean_s": 25.0, "lower_bound_s": 25.0}) == (4.0, 4.0, 4.0)
    assert _speedup(censored, {"mean_s": 50.0, "lower_bound_s": 50.0}) == (None, 6.0, None)  # at least 6x
    assert _speedup(known, censored) == (None, None, 100.0 / 300.0)  # at most 1/3x
    assert _speedup(censored, censored) == (None, None, None)
    at_start = {"mean_s": 0.0, "lower_bound_s": 0.0}  # the start policy was at the threshold already
    assert _speedup(known, at_start) == _speedup(at_start, at_start) == (None, None, None)
    assert speedup_interval([100.0, 90.0], [0.0, 20.0])["lower"] is None


def test_effort_bins_count_interventions_and_rohe_per_bin():
    eps = [{"t_s": 5.0, "num_steps": 100, "intervention_steps": 40, "success": False},
           {"t_s": 6.0, "num_steps": 100, "intervention_steps": 20, "success": True},
           {"t_s": 15.0, "num_steps": 50, "intervention_steps": 0, "success": True}]
    bins = effort_bins(eps, 20.0, 2)
    assert bins["episodes"] == [2, 1]
    assert bins["intervention_steps_per_episode"] == [30.0, 0.0]
    assert bins["intervention_share"] == [0.3, 0.0]
    assert bins["rohe"] == [1 / 60, None]


def test_speedup_interval_bootstraps_over_seeds_and_refuses_censored_runs():
    ci = speedup_interval([100.0, 120.0, 80.0], [25.0, 30.0, 20.0])
    assert ci["lower"] < 4.0 < ci["upper"] and ci["lower"] > 2.0 and ci["upper"] < 8.0
    same = speedup_interval([100.0, 100.0], [50.0, 50.0])
    assert same["lower"] == same["upper"] == 2.0
    assert speedup_interval([100.0, None], [50.0, 40.0])["lower"] is None  # censored: no value to resample
    bound = speedup_interval([100.0, None], [50.0, 40.0], censored_t1_s=300.0)  # a lower bound's interval
    assert bound == speedup_interval([100.0, 300.0], [50.0, 40.0]) and bound["lower"] >= 100.0 / 50.0
    assert speedup_interval([100.0], [50.0])["upper"] is None  # one seed: no spread


def test_aggregate_gives_every_fleet_size_its_numbers():
    cfg = StudyConfig(fleet_sizes=(1, 2), seeds=(0,), budget_s=100.0, tasks=("reach-v3",), eval_points=4,
                      effort_bins=2, batch_size=10)
    evals = {1: {"reach the goal": 0.2}, 2: {"reach the goal": 0.5}, 3: {"reach the goal": 0.9}}
    slow = _run(1, [(1, -1.0), (2, 30.0), (3, 80.0)], [(10.0, 50, False), (60.0, 30, True), (90.0, 10, True)])
    fast = _run(2, [(1, -1.0), (2, 10.0), (3, 40.0)], [(10.0, 50, False), (20.0, 40, True), (90.0, 5, True)],
                labels=500)
    summaries = [summarize_run(slow, evals, cfg), summarize_run(fast, evals, cfg)]
    assert summaries[0]["time_to_threshold_s"] == 100.0 and summaries[1]["time_to_threshold_s"] == 50.0
    assert summaries[0]["human_effort"]["falls"] and summaries[1]["rohe"] == 2 / 95
    assert summaries[0]["learner"]["samples_per_fresh_labeled_step"] == 100 * 10 / 50
    result = aggregate(summaries, cfg)
    assert result["speedup_to_0_8"] == {"1": 1.0, "2": 2.0}
    assert result["final_success"]["2"]["per_task"] == {"reach the goal": 0.9}
    assert result["human_effort"]["1"]["falls_in_every_run"] is True


def test_labels_to_the_threshold_and_the_age_of_the_policy_robots_act_with():
    run = _run(4, [(1, -5.0), (2, 10.0), (3, 30.0)], [])
    run["timeline"] = [{"t_s": t, "intervention_steps_stored": n} for t, n in ((0.0, 3), (20.0, 40), (40.0, 90))]
    assert [labels_stored_by(run, t) for t in (None, 0.0, 25.0, 40.0, 99.0)] == [None, 3, 40, 90, 90]
    episodes = [{"t_s": 12.0, "policy_version": 1}, {"t_s": 25.0, "policy_version": 2},
                {"t_s": 31.0, "policy_version": 3}, {"t_s": 50.0, "policy_version": 9}]  # v9: not published here
    assert acting_policy_age_s(run, episodes) == pytest.approx((12.0 + 15.0 + 1.0) / 3)  # v1 counts from t = 0
    assert acting_policy_age_s(run, []) is None
    cfg = StudyConfig(fleet_sizes=(4,), seeds=(0,), budget_s=40.0, tasks=("reach-v3",), eval_points=4, batch_size=10)
    evals = {1: {"reach the goal": 0.2}, 2: {"reach the goal": 0.5}, 3: {"reach the goal": 0.9}}
    run["episodes"] = [{**e, "num_steps": 50, "intervention_steps": 5, "success": True} for e in episodes[:3]]
    summary = summarize_run(run, evals, cfg)
    assert summary["time_to_threshold_s"] == 30.0 and summary["labels_to_threshold"] == 40
    lag = aggregate([summary], cfg)["data_and_lag"]["4"]
    assert lag["labels_to_threshold_mean"] == 40 and lag["acting_policy_age_s_mean"] == pytest.approx(28.0 / 3)


def test_a_longer_budget_for_one_robot_extends_its_grid_and_its_censoring_bound():
    cfg = StudyConfig(fleet_sizes=(1, 2), seeds=(0, 1), budget_s=100.0, budget_by_size=((1, 200.0),),
                      tasks=("reach-v3",), eval_points=4, effort_bins=2, batch_size=10)
    assert (cfg.budget_for(1), cfg.budget_for(2)) == (200.0, 100.0)
    evals = {1: {"reach the goal": 0.2}, 2: {"reach the goal": 0.5}, 3: {"reach the goal": 0.9}}
    late = {**_run(1, [(1, -1.0), (2, 30.0), (3, 150.0)], [(10.0, 50, False), (160.0, 10, True)]), "budget_s": 200.0}
    never = {**_run(1, [(1, -1.0), (2, 30.0)], [(10.0, 50, False), (190.0, 40, False)]), "budget_s": 200.0}
    fast = [_run(2, [(1, -1.0), (3, 40.0)], [(10.0, 50, False), (90.0, 5, True)]) for _ in range(2)]
    summaries = [summarize_run(r, evals, cfg) for r in (late, never, *fast)]
    assert summaries[0]["curve"]["t_s"] == [0.0, 25.0, 50.0, 75.0, 100.0, 125.0, 150.0, 175.0, 200.0]  # same spacing
    assert summaries[0]["time_to_threshold_s"] == 150.0  # past the common budget: 1 robot not censored at 100 s
    assert summaries[0]["success_at_common_budget"] == 0.5 and summaries[0]["final_success"] == 0.9
    assert len(summaries[0]["human_effort"]["t_s"]) == 4 and len(summaries[2]["human_effort"]["t_s"]) == 2
    result = aggregate(summaries, cfg)
    assert result["time_to_0_8_s"]["1"]["lower_bound_s"] == (150.0 + 200.0) / 2  # censored at its own budget
    assert result["speedup_bounds"]["2"]["lower"] == 175.0 / 50.0
    assert result["speedup_lower_bound_ci95"]["2"] == speedup_interval([150.0, 200.0], [50.0, 50.0])
    assert result["final_success"]["1"]["at_common_budget"]["per_seed"] == [0.5, 0.5]
    assert result["final_success"]["1"]["last_minute"]["per_seed"] == [0.9, 0.5]  # t >= 140: 150, 175, 200 s
    # A worse last version: the last minute (0.9, 0.9, 0.6) says more than the last point alone.
    dip = {**_run(1, [(1, -1.0), (2, 30.0), (3, 150.0), (4, 190.0)], [(10.0, 50, False)]), "budget_s": 200.0}
    dipped = summarize_run(dip, {**evals, 4: {"reach the goal": 0.6}}, cfg)
    assert dipped["final_success"] == 0.6 and dipped["final_minute_success"] == pytest.approx(0.8)
    assert len(result["success_curves"]["1"]["mean"]) == 9 and len(result["human_effort"]["1"]["t_s"]) == 4
    merged = aggregate([summaries[0], {**summaries[2], "fleet_size": 1}], cfg)  # runs of two budgets, one size
    assert merged["success_curves"]["1"]["t_s"] == [0.0, 25.0, 50.0, 75.0, 100.0]  # the common part
    with pytest.raises(ConfigError, match=r"budget_by_size: 1 robots get 50.0 s"):
        cfg.with_overrides(budget_by_size=((1, 50.0),))


def test_studies_pool_only_from_one_start_policy_by_its_weights_where_recorded():
    """Two start policies can score the same held-out success (one CPU model behaviour-clones another network
    from the same settings): the weights' digest decides where both studies recorded it."""
    from bench.fleet_scaling import merge_studies, same_start_policy

    old = {"success": 0.39, "per_task": {"reach": 0.2, "push": 0.58}}
    a, b = {**old, "weights_sha256": "9ad37f9f" + "0" * 56}, {**old, "weights_sha256": "fd805bc7" + "0" * 56}
    assert same_start_policy(a, dict(a)) and not same_start_policy(a, b)
    assert same_start_policy(old, a)  # a study from before the digest was recorded: its success decides
    assert not same_start_policy(old, {**a, "per_task": {"reach": 0.3, "push": 0.48}})

    def study(seed: int, start: dict) -> dict:
        config = {**json.loads(json.dumps(asdict(QUICK))), "seeds": [seed], "fleet_sizes": [1]}
        return {"seeds": [seed], "fleet_sizes": [1], "config": config, "start_policy": start,
                "runs": [{"fleet_size": 1, "seed": seed}], "wall_time_s": 1.0, "hardware": {}}

    assert len(merge_studies([study(0, a), study(1, a)], ["a.json", "a1.json"])["runs"]) == 2
    with pytest.raises(ValueError, match=r"b.json: another start policy \(weights fd805bc7, 0.390 held-out success, "
                                         r"a.json weights 9ad37f9f"):
        merge_studies([study(0, a), study(1, b)], ["a.json", "b.json"])


def test_study_config_rejects_bad_values_naming_them():
    with pytest.raises(ConfigError, match=r"fleet_sizes \(\(0, 2\)\)"):
        StudyConfig(fleet_sizes=(0, 2))
    with pytest.raises(ConfigError, match=r"budget_s \(-1"):
        QUICK.with_overrides(budget_s=-1.0)


def test_command_line_edge_args_add_to_the_presets_operator():
    from bench.fleet_scaling import parse_args, study_from_args

    cfg = study_from_args(parse_args(["--quick", "--edge-args", "--edge.operator.patience_steps 80",
                                      "--trainer-args", "--algorithm.type hg_dagger"]))
    assert cfg.edge_args == (*QUICK.edge_args, "--edge.operator.patience_steps", "80")
    assert cfg.trainer_args == ("--algorithm.type", "hg_dagger")
    assert study_from_args(parse_args(["--quick"])) == QUICK


# --- fleet sim-fleet --------------------------------------------------------------------------


def test_sim_fleet_derives_each_robots_id_state_dir_and_seeds(tmp_path):
    cfg = SimFleetConfig(robots=3, first_index=2, state_root=str(tmp_path), seed=1000)
    robots = cfg.robot_configs()
    assert [r.robot_id for r in robots] == ["robot-2", "robot-3", "robot-4"]
    assert [r.backend.seed for r in robots] == [1002, 1003, 1004]
    assert [r.operator.seed for r in robots] == [1000 + OPERATOR_SEED_OFFSET + i for i in (2, 3, 4)]
    assert robots[1].state_dir == str(tmp_path / "robot-3")
    assert all(r.backend.held_out_eval for r in robots)  # evaluation episodes from held-out variants
    plain = SimFleetConfig(edge=EdgeConfig(backend=MetaWorldConfig(held_out_eval=False))).robot_configs()
    assert not plain[0].backend.held_out_eval  # the template's choices reach every robot
    fresh = SimFleetConfig(robots=2, edge=EdgeConfig(backend=MetaWorldConfig(fresh_variants=True))).robot_configs()
    assert [(r.backend.fresh_variants, r.backend.seed) for r in fresh] == [(True, 0), (True, 1)]
    with pytest.raises(ConfigError, match=r"robots \(0\) must be >= 1"):
        SimFleetConfig(robots=0)


# --- the machinery, reduced -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_start_policy_is_trained_anew_when_its_settings_change(tmp_path):
    """Reused while its settings are the same; with other tasks, behaviour-cloned again on them (the trainer
    must not resume the earlier start policy's checkpoint, which knows the other tasks)."""
    from bench.scaling.run import train_start_policy
    from cloud.policy_store import PolicyStore

    small = dict(seed_bc_steps=10, demos_per_task=2, max_episode_steps=30, batch_size=8)
    first = train_start_policy(replace(QUICK, tasks=("reach-v3",), **small), tmp_path / "start")
    tasks = PolicyStore(first).manifest(1).config["tasks"]
    written = (first / "v00000001" / "manifest.json").stat().st_mtime_ns
    again = train_start_policy(replace(QUICK, tasks=("reach-v3",), **small), tmp_path / "start")
    assert (again / "v00000001" / "manifest.json").stat().st_mtime_ns == written  # reused
    other = train_start_policy(replace(QUICK, tasks=("drawer-close-v3",), **small), tmp_path / "start")
    new_tasks = PolicyStore(other).manifest(1).config["tasks"]
    assert len(new_tasks) == 1 and new_tasks != tasks


@pytest.mark.timeout(300)
def test_reduced_study_runs_and_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet_scaling.py"), "--quick", "--fleet-sizes", "1,2", "--seeds", "0",
         "--tasks", "reach-v3,drawer-close-v3", "--budget-s", "10", "--seed-bc-steps", "10", "--demos-per-task", "1",
         "--max-episode-steps", "30", "--control-hz", "20", "--eval-episodes-per-task", "1", "--eval-points", "2",
         "--effort-bins", "2", "--budget-by-size", "1:15", "--out-dir", str(tmp_path / "study"), "--json", str(out_json), "--plot", str(out_png)],
        cwd=ROOT, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out_json.read_text())
    for key in ("fleet_sizes", "speedup_to_0_8", "final_success", "human_effort", "rohe", "hardware",
                "time_to_0_8_s", "success_curves", "learner", "targets"):
        assert key in result, key
    assert result["fleet_sizes"] == [1, 2]
    assert {r["fleet_size"]: r["budget_s"] for r in result["runs"]} == {1: 15.0, 2: 10.0}  # --budget-by-size 1:15
    assert set(result["speedup_to_0_8"]) == set(result["final_success"]) == {"1", "2"}
    assert result["hardware"]["cpu_cores"] >= 1
    for run in result["runs"]:
        assert 0.0 <= run["final_success"] <= 1.0
        assert run["episodes"] >= 1  # the robots ran real episodes within the budget
        assert run["learner"]["robot_steps_stored"] > 0
        assert run["curve"]["version"][0] == 1  # every run starts from the shared start policy
    assert "| 2 |" in proc.stdout  # the table
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000

    def reanalyse(*paths: Path) -> subprocess.CompletedProcess:  # writes reanalysed.json / .png
        return subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_scaling.py"), "--reanalyse",
                               *map(str, paths), "--json", str(tmp_path / "reanalysed.json"),
                               "--plot", str(tmp_path / "reanalysed.png")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    proc = reanalyse(out_json)  # a finished study re-analysed without rerunning it: the same numbers
    assert proc.returncode == 0, proc.stderr[-3000:]
    redone = json.loads((tmp_path / "reanalysed.json").read_text())
    for key in ("time_to_0_8_s", "speedup_to_0_8", "speedup_lower_bound_ci95", "final_success", "targets"):
        assert redone[key] == result[key], key

    # Pooling a second study of the same design (here: the same runs relabelled as seed 7) into one.
    other = json.loads(out_json.read_text())
    other["seeds"], other["config"]["seeds"] = [7], [7]
    for run in other["runs"]:
        run["seed"] = 7
    seed7 = tmp_path / "seed7.json"
    seed7.write_text(json.dumps(other))
    proc = reanalyse(out_json, seed7)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pooled = json.loads((tmp_path / "reanalysed.json").read_text())
    assert pooled["seeds"] == [0, 7] and len(pooled["runs"]) == 2 * len(result["runs"])
    assert pooled["final_success"]["1"]["per_seed"] == 2 * result["final_success"]["1"]["per_seed"]
    assert [p["json"] for p in pooled["pooled_from"]] == [str(out_json), str(seed7)]
    # The same run twice, or a study of another design, is refused with exit 2 and the reason.
    proc = reanalyse(out_json, out_json)
    assert proc.returncode == 2 and "seed 0 is also in" in proc.stderr, proc.stderr[-3000:]
    other["config"]["control_hz"] = 5.0
    seed7.write_text(json.dumps(other))
    proc = reanalyse(out_json, seed7)
    assert proc.returncode == 2 and "'control_hz' is 5.0" in proc.stderr, proc.stderr[-3000:]

    # A study of some fleet sizes only pools with runs of those sizes at their budgets: a budget set for a size
    # it did not run does not matter, one for a size both ran must agree.
    only2 = json.loads(out_json.read_text())
    only2["seeds"], only2["fleet_sizes"] = [8], [2]
    only2["config"].update(seeds=[8], fleet_sizes=[2], budget_by_size=[[1, 99.0]])
    only2["runs"] = [{**run, "seed": 8} for run in only2["runs"] if run["fleet_size"] == 2]
    seed8 = tmp_path / "seed8.json"
    seed8.write_text(json.dumps(only2))
    proc = reanalyse(out_json, seed8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pooled = json.loads((tmp_path / "reanalysed.json").read_text())
    assert pooled["config"]["budget_by_size"] == [[1, 15.0]] and len(pooled["final_success"]["2"]["per_seed"]) == 2
    only2["config"]["budget_by_size"] = [[2, 30.0]]
    seed8.write_text(json.dumps(only2))
    proc = reanalyse(out_json, seed8)
    assert proc.returncode == 2 and "2 robot(s) ran for 30 s" in proc.stderr, proc.stderr[-3000:]

    # A study written before labels_to_threshold / acting_policy_age_s existed gets them from its run records.
    older = json.loads(out_json.read_text())
    for run in older["runs"]:
        del run["labels_to_threshold"], run["acting_policy_age_s"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    proc = reanalyse(tmp_path / "older.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "reanalysed.json").read_text())["data_and_lag"] == result["data_and_lag"]

    # Studies of different designs side by side (seed7.json has control_hz 5.0): labelled by what differs.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_scaling.py"), "--compare", str(out_json),
                           str(seed7), "--json", str(tmp_path / "compare.json"), "--plot", str(tmp_path / "compare.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compared = json.loads((tmp_path / "compare.json").read_text())
    assert [d["label"] for d in compared["designs"]] == ["control_hz: 20.0", "control_hz: 5.0"]
    rows = compared["designs"][0]["fleet_sizes"]
    assert set(rows) == {"1", "2"} and rows["1"]["final_success"] == result["final_success"]["1"]["per_seed"]
    assert "| control_hz: 5.0 | " in proc.stdout
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_scaling.py"), "--compare",
                           str(tmp_path / "missing.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot compare" in proc.stderr, proc.stderr[-3000:]
