"""Tiny-budget smoke runs of the CLI entry points (CleanRL style)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request

import pytest
import yaml

from fleet.prometheus_server import find_prometheus, rule_files
from tests.conftest import CLI_COMMANDS
from tests.waiting import wait_until

FLEET = [sys.executable, "-m", "fleet.cli"]
PROMETHEUS = find_prometheus()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.mark.timeout(300)
def test_demo_runs_to_completion_and_writes_summary_and_png(tmp_path):
    """A tiny demo, with --monitor: while it runs, a real Prometheus scrapes each of its processes (or, without
    the binary, one line says so); stdout is a pipe, so it shows progress lines and no log lines."""
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*FLEET, "demo", "--fleet.robots", "1", "--duration_s", "25", "--run_dir", str(run_dir), "--tasks",
         "reach-v3", "--demos_per_task", "2", "--trainer.seed_bc_steps", "20", "--trainer.publish_every_steps", "20",
         "--trainer.batch_size", "16", "--fleet.edge.loop.control_hz", "40", "--fleet.edge.loop.max_episode_steps",
         "60", "--progress_interval_s", "5", "--monitor"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        if PROMETHEUS:
            url = wait_until(lambda: next((l.split()[1] for l in lines if l.startswith("prometheus: ")), None), 240,
                             "the demo's Prometheus URL", poll_s=0.2)

            def every_process_up():
                assert proc.poll() is None, "the demo ended before Prometheus saw every process up:\n" + \
                    "\n".join(lines[-40:])
                try:
                    active = _get_json(f"{url}/api/v1/targets?state=active")["data"]["activeTargets"]
                except OSError:  # between two scrapes of a loaded machine Prometheus may be slow to answer
                    return None
                health = sorted((t["labels"]["job"], t["health"]) for t in active)
                return active if health == [("fleet-edge", "up"), ("fleet-gateway", "up"), ("fleet-trainer", "up")] \
                    else None

            active = wait_until(every_process_up, 60, "gateway, trainer and robot scraped", poll_s=0.5)
            assert all(t["scrapeUrl"].startswith("http://127.0.0.1:") for t in active)
            groups = _get_json(f"{url}/api/v1/rules")["data"]["groups"]  # deploy/prometheus's rules and alerts
            assert {r["type"] for g in groups for r in g["rules"]} == {"recording", "alerting"}
            assert sum(len(g["rules"]) for g in groups) == sum(
                len(g["rules"]) for f in rule_files() for g in yaml.safe_load(open(f).read())["groups"])
        assert proc.wait(timeout=280) == 0, "\n".join(lines[-60:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    out = "\n".join(lines)
    assert f"run directory: {run_dir}" in out and f"logs: {run_dir}/logs/" in out
    if PROMETHEUS:
        with pytest.raises(OSError):  # stopped with the demo
            _get_json(f"{url}/api/v1/targets")
        assert (run_dir / "prometheus" / "prometheus.yml").exists()
    else:
        assert "monitor: prometheus is not on PATH" in out
    assert [l for l in lines if l.startswith("[") and "steps stored" in l], out  # progress lines
    assert not [l for l in lines if re.search(r"(^|\s)(DEBUG|INFO|WARNING|ERROR)[: ]", l)], out  # logs: in run_dir
    assert "INFO" in (run_dir / "logs" / "demo.log").read_text()
    assert "weight side channel: sent v1" in (run_dir / "logs" / "gateway.log").read_text()  # policies: sendfile
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


def test_monitor_without_prometheus_is_one_line_and_the_demo_goes_on(tmp_path, monkeypatch):
    from edge.sim.demo import _start_monitor

    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus here
    lines: list[str] = []
    assert _start_monitor(tmp_path, {"fleet-gateway": [9100]}, lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("monitor: prometheus is not on PATH (install it with")
    assert not (tmp_path / "prometheus").exists()


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_every_subcommand_has_help(command, cli_help):
    code, text = cli_help[command]
    assert code == 0
    assert "usage: fleet " + command in text
    assert len(text) > 300


def _demo_exit(cli_main, capsys, *argv: str) -> tuple[int, str]:
    """``fleet demo <argv>`` in this process (the torch/LeRobot import is paid once per session): exit code, stderr."""
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", *argv])
    return exc.value.code, capsys.readouterr().err


def test_bad_config_value_is_a_clear_cli_error(cli_main, capsys):
    code, err = _demo_exit(cli_main, capsys, "--fleet.robots", "0")
    assert code == 2
    assert "robots (0) must be >= 1" in err


def test_evaluation_that_would_skip_tasks_is_a_clear_cli_error(cli_main, capsys):
    # Round robin over 4 tasks with every 2nd episode evaluated would only ever evaluate 2 of them.
    code, err = _demo_exit(cli_main, capsys, "--tasks",
                           '["reach-v3", "drawer-open-v3", "window-open-v3", "drawer-close-v3"]')
    assert code == 2
    assert "would evaluate only 2 of them" in err
