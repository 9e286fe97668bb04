"""bench/operator_allocation.py --quick: the allocation study end to end at a tiny size (real MetaWorld robots,
scripted operators, the real allocator, HG-DAgger updates of the small ACT), its JSON, table and PNG."""

from __future__ import annotations

import json

import pytest

from bench import operator_allocation


@pytest.mark.timeout(120)
def test_quick_study_writes_json_table_and_png(tmp_path, capsys):
    out, png = tmp_path / "study.json", tmp_path / "study.png"
    assert operator_allocation.main(["--quick", "--json", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    conds = result["conditions"]
    assert list(conds) == ["priority M=1", "round_robin M=1", "random M=1", "unlimited M=3"]
    assert png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| unlimited M=3 |" in printed and "[4/4] seed 0 unlimited M=3" in printed
    for run in result["runs"]:
        assert 0.0 <= run["idle_robot_time"] <= 1.0
        assert 0.0 <= run["operator_driving"] <= run["operator_utilisation"] <= 1.0
        assert run["rohe"] == pytest.approx(run["successes"] / (1 + run["intervention_steps"]))
        assert run["episodes"] >= 3 and run["learner_updates"] > 0
    unlimited = result["runs"][-1]
    assert unlimited["idle_robot_time"] == 0.0  # an operator for every robot: nobody holds
    assert unlimited["assignments"] > 0 and unlimited["time_to_help_p99_s"] == 0.0
    assert unlimited["intervention_steps"] > 0  # the operators' gating took over and labelled steps
    one = result["runs"][0]
    assert one["operator_utilisation"] > unlimited["operator_utilisation"]  # one operator shared by three robots
