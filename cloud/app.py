"""The learner: composition root of the cloud side.

    gateway (gRPC, asyncio; ingest -> Redis buffer; policy feed <- store)
    trainer (sampler <- Redis; algorithm; publisher -> policy store + Redis pointer)
    operators (optional: robots' help signals <- Redis; allocator; assignments -> Redis; console)

They are separate processes (the GIL: ingest must not stall behind a training
step) and meet only in Redis and the policy store directory. ``run_learner``
starts them as child processes and stops them in reverse order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fleet.subprocs import stop_process

log = logging.getLogger(__name__)


@dataclass
class Child:
    """A child process of ours, with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def terminate(self, timeout_s: float = 30.0) -> int:
        return stop_process(self.proc, timeout_s, self.name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the parent dies (Linux), so a killed demo or
    learner never leaves orphans behind. A no-op where prctl is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(name: str, args: list[str], log_dir: Path, env: dict | None = None) -> Child:
    """Run ``fleet <args>`` as a child in its own session (Ctrl-C reaches only us)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    fh = open(log_path, "ab")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True, env=full_env, preexec_fn=_die_with_parent)
    fh.close()
    return Child(name=name, proc=proc, log_path=log_path)


def gateway_args(listen: str, redis_url: str, policy_dir: str, metrics_port: int = 0,
                 embodiment: str = "", insecure: bool = False, blob_url: str = "", weights_listen: str = "") -> list[str]:
    return ["gateway", "--listen", listen, "--redis_url", redis_url, "--policy_dir", policy_dir,
            *(["--blob_url", blob_url] if blob_url else []),
            *(["--weights_listen", weights_listen] if weights_listen else []),
            "--metrics_port", str(metrics_port), *(["--embodiment", embodiment] if embodiment else []),
            *(["--insecure"] if insecure else [])]


def operators_args(redis_url: str, operators: str, extra: list[str] = ()) -> list[str]:
    """``fleet operators`` for ``operators`` (a count or names) on ``redis_url``, then ``extra`` flags."""
    return ["operators", "--redis_url", redis_url, "--operators", operators, *extra]


def run_learner(listen: str, redis_url: str, policy_dir: str, trainer_args: list[str], log_dir: Path,
                stop: threading.Event, gateway_metrics_port: int = 0, embodiment: str = "",
                insecure: bool = False, operator_args: list[str] | None = None) -> int:
    """Gateway and trainer (and, given ``operator_args``, the operators service) as children until ``stop``;
    returns the first non-zero exit code.

    ``embodiment``: both serve/train that embodiment's policy line (one learner per embodiment).
    ``insecure``: the gateway child may serve a non-loopback ``listen`` without TLS and tokens.
    ``operator_args``: the `fleet operators` command line (:func:`operators_args`); None = no shared operators."""
    gateway = spawn("gateway", gateway_args(listen, redis_url, policy_dir, gateway_metrics_port, embodiment,
                                            insecure), log_dir)
    line = ["--embodiment", embodiment] if embodiment else []
    trainer = spawn("trainer", ["trainer", "--redis_url", redis_url, "--policy_dir", policy_dir, *line,
                                *trainer_args], log_dir)
    children = [gateway, trainer]
    if operator_args is not None:
        children.append(spawn("operators", operator_args, log_dir))
    log.info("learner: %s, logs in %s", ", ".join(f"{c.name} pid {c.proc.pid}" for c in children), log_dir)
    while not stop.wait(1.0):
        for child in children:
            if child.proc.poll() is not None:
                log.error("%s exited with %s; see %s", child.name, child.proc.returncode, child.log_path)
                stop.set()
    codes = [child.terminate() for child in reversed(children)]
    return next((c for c in codes if c), 0)
