"""Tiny-budget smoke runs of the CLI entry points (CleanRL style)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FLEET = [sys.executable, "-m", "fleet.cli"]


@pytest.mark.timeout(300)
def test_demo_runs_to_completion_and_writes_summary_and_png(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [*FLEET, "demo", "--fleet.robots", "1", "--duration_s", "25", "--run_dir", str(run_dir), "--tasks",
         "reach-v3", "--demos_per_task", "2", "--trainer.seed_bc_steps", "20", "--trainer.publish_every_steps", "20",
         "--trainer.batch_size", "16", "--fleet.edge.loop.control_hz", "40", "--fleet.edge.loop.max_episode_steps",
         "60", "--progress_interval_s", "5"],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run directory: {run_dir}" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("success_rate_start", "success_rate_end", "intervention_rate_start", "intervention_rate_end",
                "policy_versions_published", "steps_ingested"):
        assert key in summary, key
    assert summary["policy_versions_published"] >= 2
    assert summary["steps_ingested"] > 100
    png = (run_dir / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # The AOF is on and holds the data.
    assert any((run_dir / "redis").rglob("*.aof"))


@pytest.mark.parametrize("command", ["demo", "learner", "gateway", "trainer", "edge", "sim-fleet", "status", "seed"])
def test_every_subcommand_has_help(command):
    proc = subprocess.run([*FLEET, command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: fleet " + command in proc.stdout
    assert len(proc.stdout) > 300


def test_bad_config_value_is_a_clear_cli_error():
    proc = subprocess.run([*FLEET, "demo", "--fleet.robots", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "robots (0) must be >= 1" in proc.stderr


def test_evaluation_that_would_skip_tasks_is_a_clear_cli_error():
    # Round robin over 4 tasks with every 2nd episode evaluated would only ever evaluate 2 of them.
    proc = subprocess.run([*FLEET, "demo", "--tasks", '["reach-v3", "drawer-open-v3", "window-open-v3", '
                           '"drawer-close-v3"]'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "would evaluate only 2 of them" in proc.stderr
