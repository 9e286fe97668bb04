"""Shared fixtures: a real redis-server per test (free port, own dir, AOF on) and an
in-process gateway on a free loopback port."""

from __future__ import annotations

import asyncio
import logging
import json
import os
import random
import subprocess
import sys
import threading

import hypothesis  # noqa: F401  (import before any test starts threads: CPython 3.11.7's ast.parse is
# not thread-safe (gh-106905), and pytest rewrites hypothesis' plugin modules with ast when first imported)
import pytest
import redis as redis_lib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ROS 2 tests (real rclpy, and the processes they start, which inherit this): DDS discovery on this
# host only, in a domain drawn for this session, so parallel sessions and robots on the LAN never meet.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 200))
# UDP only: Fast DDS's shared-memory transport leaves segments in /dev/shm behind SIGKILLed processes
# (the driver-dying test kills one on purpose), which later participants of the domain trip over.
os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = "UDPv4"


@pytest.fixture(autouse=True)
def _normal_scheduling():
    """Children inherit the spawning thread's scheduling policy. In the full suite something run by an
    earlier test leaves this thread under SCHED_FIFO (seen: the ROS 2 end-to-end test's edge and sim arm
    at real-time priority 99, spinning and starving each other's DDS threads, while alone it passes).
    Every test starts its processes under the normal policy."""
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    yield


@pytest.fixture
def ros_domain(monkeypatch):
    """A ROS domain of this test's own for the processes it starts: nothing an earlier test left running
    or half-dead in the session's domain can reach them."""
    session = int(os.environ["ROS_DOMAIN_ID"])
    domain = random.SystemRandom().choice([d for d in range(1, 201) if d != session])
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    return domain


@pytest.fixture
def redis_proc(tmp_path):
    from fleet.redis_server import start_redis

    proc = start_redis(tmp_path / "redis")
    yield proc
    proc.kill()


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A private SeaweedFS S3 server of this test's own (it may kill and restart it): .endpoint, .url("bucket/prefix")
    (creates the bucket), .kill(), .restart(). boto3 finds its credentials in the environment."""
    from fleet.s3_server import start_weed

    weed = start_weed(tmp_path / "weed")
    for name, value in weed.env.items():
        if name != "AWS_ENDPOINT_URL":  # URLs carry ?endpoint=; boto3 elsewhere keeps its default endpoint
            monkeypatch.setenv(name, value)
    yield weed
    weed.kill()


@pytest.fixture(scope="session")
def s3_shared(tmp_path_factory):
    """One SeaweedFS S3 server for the whole session (about 3 s to start), for tests that never kill it:
    each test uses its own bucket prefix."""
    from fleet.s3_server import start_weed

    weed = start_weed(tmp_path_factory.mktemp("weed-shared"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in weed.env.items():
            if name != "AWS_ENDPOINT_URL":
                mp.setenv(name, value)
        yield weed
    weed.kill()


@pytest.fixture
def redis_client(redis_proc):
    client = redis_lib.Redis.from_url(redis_proc.url)
    yield client
    client.close()


class GatewayThread:
    """A real grpc.aio gateway on its own event loop in a background thread."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        from cloud.gateway.server import start_gateway

        self.gw = asyncio.run_coroutine_threadsafe(start_gateway(cfg), self.loop).result(30)
        self.port = self.gw.port
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gw.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def gateway(redis_proc, tmp_path):
    from fleet.gateway_config import GatewayConfig

    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies")))
    yield gw
    gw.stop()


def serve_watch_policy(watch, port: int = 0) -> tuple:
    """A real gRPC server on loopback answering only ``WatchPolicy`` with ``watch(request_bytes, context)``
    (raw bytes both ways): a hostile gateway, or a proxy that tampers with transfers. Returns (server, target)."""
    from concurrent import futures

    import grpc

    handler = grpc.method_handlers_generic_handler(
        "fleet.v1.FleetService", {"WatchPolicy": grpc.unary_stream_rpc_method_handler(watch)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    target = f"127.0.0.1:{server.add_insecure_port(f'127.0.0.1:{port}')}"
    server.start()
    return server, target


@pytest.fixture
def cli_main():
    """``fleet.cli.main`` in this process; removes the log handler it installs on the captured stderr."""
    from fleet.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield main
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


CLI_COMMANDS = ("demo", "learner", "gateway", "trainer", "operators", "edge", "sim-fleet", "status", "seed")
_HELP_SCRIPT = """
import contextlib, io, json, sys
from fleet.cli import main
out = {}
for command in sys.argv[1:]:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = main([command, "--help"])
    except SystemExit as e:
        code = e.code
    out[command] = [code or 0, buf.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def cli_help() -> dict[str, tuple[int, str]]:
    """``fleet <command> --help`` for every command: (exit code, stdout), from ONE fresh interpreter (each
    command's help in its own would pay torch's and LeRobot's import again: ~10 s each on 2 cores)."""
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, *CLI_COMMANDS], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {command: (code, text) for command, (code, text) in json.loads(proc.stdout.splitlines()[-1]).items()}
