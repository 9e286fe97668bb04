"""Real ROS 2 processes for tests: the simulated arm (`fleet ros2-sim-robot`) and `fleet edge`.

They inherit tests/conftest.py's ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, and
import this checkout (PYTHONPATH), whatever the venv's editable install points at."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    """A `python -m fleet.cli ...` child with its output in a log file."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, cond, what: str, timeout_s: float = 60.0) -> None:
        """Poll another process's effects (its log, Redis, files): there is no in-process event to wait on."""
        deadline = time.monotonic() + timeout_s
        while not cond():
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.log_path.name} exited with {self.popen.returncode} while waiting "
                                     f"for {what}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def start_sim_arm(log_path: Path, *options: str, wait: bool = True) -> Proc:
    """`fleet ros2-sim-robot OPTIONS`; with ``wait``, returns once it publishes."""
    proc = Proc(["ros2-sim-robot", *options], log_path)
    if wait:
        proc.wait_for(lambda: " up: " in proc.log(), "the sim arm to come up")
    return proc


def read_stats(path: Path) -> dict:
    """The stats a sim arm writes at exit (``--stats_path``)."""
    return json.loads(path.read_text())
