"""Stopping a child process: SIGTERM, a grace period, then SIGKILL (Redis, SeaweedFS, Prometheus, fleet children)."""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0, name: str = "") -> int | None:
    """SIGTERM ``proc``, wait up to ``timeout_s``, then SIGKILL it (logged with ``name``); returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", name or proc.args, timeout_s)
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode
