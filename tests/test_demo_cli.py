"""Tiny-budget smoke runs of the CLI entry points (CleanRL style)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

from tests.waiting import wait_until

FLEET = [sys.executable, "-m", "fleet.cli"]


@pytest.mark.timeout(300)
def test_demo_runs_to_completion_and_writes_summary_and_png(tmp_path):
    """A tiny demo; stdout is a pipe, so it shows progress lines (and no log lines)."""
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*FLEET, "demo", "--fleet.robots", "1", "--duration_s", "25", "--run_dir", str(run_dir), "--tasks",
         "reach-v3", "--demos_per_task", "2", "--trainer.seed_bc_steps", "20", "--trainer.publish_every_steps", "20",
         "--trainer.batch_size", "16", "--fleet.edge.loop.control_hz", "40", "--fleet.edge.loop.max_episode_steps",
         "60", "--progress_interval_s", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        assert proc.wait(timeout=280) == 0, "\n".join(lines[-60:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    out = "\n".join(lines)
    assert f"run directory: {run_dir}" in out and f"logs: {run_dir}/logs/" in out
    assert [l for l in lines if l.startswith("[") and "steps stored" in l], out  # progress lines
    assert not [l for l in lines if re.search(r"(^|\s)(DEBUG|INFO|WARNING|ERROR)[: ]", l)], out  # logs: in run_dir
    assert "INFO" in (run_dir / "logs" / "demo.log").read_text()
    assert f"learning curve: {run_dir}/learning_curve.png" in out
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
