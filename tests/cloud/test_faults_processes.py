"""Faults with real processes, killed with SIGKILL: gateway, Redis, edge, network, replicas.

One module-scoped cloud: redis-server (AOF, ``appendfsync always``), two ``fleet gateway``
processes (replicas A and B) and a TCP proxy in front of them that the robots dial. Each test
drives its own robots, injects one fault mid-stream, and compares the steps the robots recorded
with what is in Redis: 0 lost, 0 duplicated. The robots are light drivers (a real Spool and
Streamer fed at 100 Hz from a thread) except in the edge-kill test, which runs `fleet edge`
(a real EdgeAgent with MetaWorld) as a process and kills it mid-episode.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis as redis_lib

from cloud.blobstore import open_blob_store
from cloud.buffer.reader import BufferReader
from cloud.buffer import RobotKeys
from edge.client import FleetClient
from edge.spool import Spool
from edge.streamer import Backoff, Streamer
from fleet import PROTOCOL_VERSION
from fleet.redis_server import RedisProcess, free_port, start_redis
from fleet.codec import encode_image
from fleet.types import EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step
from tests.waiting import wait_until

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (39,)),), FeatureSpec("action", "float32", (4,)))
CAM_SCHEMA = Schema((*SCHEMA.observation, FeatureSpec("cam", "uint8", (16, 16, 3), is_image=True)), SCHEMA.action)
FRAMES = [encode_image(np.full((16, 16, 3), 30 * k, np.uint8), "jpeg") for k in range(8)]
"""A camera robot's frame at episode index t is FRAMES[t % 8]: what the buffer returns can be checked."""
EPISODE_STEPS = 40
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


# --- the network: a TCP proxy that can cut every connection and be repointed -----------------


class Proxy:
    """Forwards 127.0.0.1:port to a target port; ``cut()`` drops all connections and refuses new ones."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.refusing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._transports: set[asyncio.Transport] = set()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._transports -= pair

    def _drop_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()  # RST: what a dead link or a load balancer failover looks like to gRPC
        self._transports.clear()

    def _call(self, fn: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            fn()
            done.set()

        self._loop.call_soon_threadsafe(run)
        assert done.wait(10)

    def cut(self) -> None:
        def do() -> None:
            self.refusing = True
            self._drop_all()
        self._call(do)

    def restore(self) -> None:
        def do() -> None:
            self.refusing = False
        self._call(do)

    def point_to(self, port: int) -> None:
        def do() -> None:
            self.target_port = port
            self._drop_all()
        self._call(do)

    def close(self) -> None:
        self._call(self._drop_all)
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --- the cloud: Redis + two gateway processes -------------------------------------------------


class GatewayProcess:
    """``python -m fleet.cli gateway`` on a fixed port (so it can be restarted on the same one)."""

    def __init__(self, name: str, redis_url: str, policy_dir: Path, log_dir: Path, blob_dir: Path):
        self.name, self.redis_url, self.policy_dir, self.log_dir = name, redis_url, policy_dir, log_dir
        self.blob_dir = blob_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_dir / f"gateway-{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "gateway", "--listen", f"127.0.0.1:{self.port}", "--redis_url",
             self.redis_url, "--policy_dir", str(self.policy_dir), "--blob_url", str(self.blob_dir),
             "--redis_timeout_s", "2", "--retry_after_s",
             "0.2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                assert self.proc is not None and self.proc.poll() is None, \
                    f"gateway {self.name} exited: {(self.log_dir / f'gateway-{self.name}.log').read_text()[-3000:]}"
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    return
                except grpc.FutureTimeoutError:
                    assert time.monotonic() < deadline, f"gateway {self.name} not listening after {timeout_s}s"
        finally:
            channel.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Cloud:
    def __init__(self, root: Path):
        self.root = root
        self.redis: RedisProcess = start_redis(root / "redis", appendfsync="always")
        self.redis_url = self.redis.url
        self.client = redis_lib.Redis.from_url(self.redis_url)
        self.policy_dir = root / "policies"
        self.blobs = open_blob_store(str(root / "blobs"))  # camera frames: a local directory, fsync per put
        self.gateways = {name: GatewayProcess(name, self.redis_url, self.policy_dir, root, root / "blobs")
                         for name in "AB"}
        for gw in self.gateways.values():
            gw.start()
        for gw in self.gateways.values():
            gw.wait_ready()
        self.proxy = Proxy(self.gateways["A"].port)

    def restart_redis(self) -> None:
        self.redis = start_redis(self.root / "redis", port=self.redis.port, appendfsync="always")

    def close(self) -> None:
        self.proxy.close()
        for gw in self.gateways.values():
            gw.kill()
        self.client.close()
        self.redis.kill()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    c = Cloud(tmp_path_factory.mktemp("cloud"))
    yield c
    c.close()


@pytest.fixture
def fresh_proxy(cloud):
    """Every test starts with the proxy open and pointing at replica A (restarted if a test killed it)."""
    gw = cloud.gateways["A"]
    if gw.proc is None or gw.proc.poll() is not None:
        gw.start()
        gw.wait_ready()
    cloud.proxy.restore()
    cloud.proxy.point_to(gw.port)
    return cloud.proxy


# --- robots: light drivers (a real Spool + Streamer, steps recorded at 100 Hz) ----------------


class Driver:
    """One simulated robot: a thread records steps at ``hz`` into a real Spool; a real Streamer sends them."""

    def __init__(self, robot_id: str, target: str, state_dir: Path, hz: float = 100.0, camera: bool = False):
        self.robot_id = robot_id
        self.hz = hz
        self.camera = camera
        schema = CAM_SCHEMA if camera else SCHEMA
        self.info = RobotInfo(robot_id, "test-arm", schema, (TASK,), PROTOCOL_VERSION)
        self.spool = Spool(state_dir / f"{robot_id}.db", schema)
        self.client = FleetClient(target, rpc_timeout_s=3.0)
        self.streamer = Streamer(self.info, self.spool, self.client, flush_interval_s=0.02,
                                 backoff=Backoff(base_s=0.05, max_s=0.5), ack_timeout_s=10.0)
        self.recorded: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"driver-{robot_id}", daemon=True)

    def start(self) -> Driver:
        self.streamer.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = np.random.default_rng(len(self.robot_id))
        period_s, deadline, episode, t = 1.0 / self.hz, time.perf_counter(), 0, 0
        while not self._stop.is_set():
            end = t == EPISODE_STEPS - 1
            step = Step(seq=0, index=t, observation={"state": rng.standard_normal(39).astype(np.float32)},
                        policy_action=np.zeros(4, np.float32), action=rng.uniform(-1, 1, 4).astype(np.float32),
                        is_intervention=t % 7 == 0, reward=0.0, success=False, done=end, policy_version=1,
                        timestamp_s=time.time(), images={"cam": FRAMES[t % 8]} if self.camera else {})
            summary = EpisodeSummary(False, EPISODE_STEPS, 0, 0, False, 1) if end else None
            self.recorded.append(self.spool.record(f"{self.robot_id}-ep{episode}", TASK, False, step, summary))
            episode, t = (episode + 1, 0) if end else (episode, t + 1)
            deadline += period_s
            self._stop.wait(max(0.0, deadline - time.perf_counter()))

    def steps_recorded(self) -> int:
        return len(self.recorded)

    def finish(self, timeout_s: float = 30.0) -> None:
        """Stop recording and wait until everything recorded is acked."""
        self._stop.set()
        self._thread.join(5)
        assert self.streamer.wait_acked(self.recorded[-1], timeout_s), \
            f"{self.robot_id}: acked {self.streamer.acked_seq} of {self.recorded[-1]}"

    def close(self) -> None:
        self._stop.set()
        self.streamer.stop()
        self.client.close()
        self.spool.close()


@pytest.fixture
def drivers(tmp_path):
    made: list[Driver] = []

    def make(target: str, n: int, prefix: str, cameras: int = 0) -> list[Driver]:
        """``n`` robots; the last ``cameras`` of them record a camera frame per step."""
        out = [Driver(f"{prefix}{i}", target, tmp_path, camera=i >= n - cameras).start() for i in range(n)]
        made.extend(out)
        return out

    yield make
    for d in made:
        d.close()


def stored_steps(client: redis_lib.Redis, robot_id: str, blobs=None) -> dict[str, list[Step]]:
    reader = BufferReader(client, blobs)
    schema = reader.schema(robot_id)
    return {eid.decode(): reader.steps(robot_id, eid.decode(), schema) for eid in client.hkeys(RobotKeys(robot_id).catalog)}


def assert_exactly_once(client: redis_lib.Redis, robot_id: str, recorded: list[int], blobs=None) -> None:
    """Redis holds every recorded step once: 0 lost, 0 duplicated, episodes without holes; a camera robot's
    every frame is in the blob store (``blobs``) and is the one recorded."""
    episodes = stored_steps(client, robot_id, blobs)
    for steps in episodes.values():
        for s in steps:
            assert not s.images or s.images["cam"].data == FRAMES[s.index % 8].data, f"{robot_id} seq {s.seq}: frame"
    seqs = [s.seq for steps in episodes.values() for s in steps]
    assert len(seqs) == len(set(seqs)), f"{robot_id}: {len(seqs) - len(set(seqs))} steps stored twice"
    lost = sorted(set(recorded) - set(seqs))
    assert not lost, f"{robot_id}: {len(lost)} recorded steps not in Redis, e.g. {lost[:5]}"
    assert sorted(seqs) == sorted(recorded)
    for eid, steps in episodes.items():
        assert [s.index for s in steps] == list(range(len(steps))), f"{robot_id} {eid}: hole in the episode"
    stats = client.hgetall(RobotKeys(robot_id).stats)
    assert int(stats.get(b"dropped_steps", 0)) == 0 and int(stats[b"steps"]) == len(recorded)


# --- the faults -------------------------------------------------------------------------------


def test_network_cut_while_robots_keep_running(cloud, fresh_proxy, drivers):
    robots = drivers(fresh_proxy.target, 2, "net")
    wait_until(lambda: all(r.streamer.acked_seq >= 30 for r in robots), 30, "first acks")
    fresh_proxy.cut()
    wait_until(lambda: not any(r.streamer.connected.is_set() for r in robots), 10, "robots to notice the cut")
    during = [r.steps_recorded() for r in robots]
    acked = [r.streamer.acked_seq for r in robots]
    wait_until(lambda: all(r.steps_recorded() >= n + 100 for r, n in zip(robots, during)), 30,
               "robots to keep recording while cut off")
    assert [r.streamer.acked_seq for r in robots] == acked, "acks arrived through a cut network"
    fresh_proxy.restore()
    for r in robots:
        r.finish()
        assert_exactly_once(cloud.client, r.robot_id, r.recorded)
        assert r.streamer.sessions >= 2


def test_robot_switches_between_two_gateway_replicas(cloud, fresh_proxy, drivers):
    robots = drivers(fresh_proxy.target, 2, "lb")
    a, b = cloud.gateways["A"].port, cloud.gateways["B"].port
    for i, port in enumerate((b, a, b)):
        wait_until(lambda i=i: all(r.streamer.acked_seq >= 25 * (i + 1) for r in robots), 30,
                   f"acks before switch {i}")
        fresh_proxy.point_to(port)
    for r in robots:
        r.finish()
        assert_exactly_once(cloud.client, r.robot_id, r.recorded)
    statuses = {json.loads(v)["robot_id"] for v in cloud.client.hvals("fleet:robots")}
    assert {r.robot_id for r in robots} <= statuses
    assert cloud.gateways["A"].proc.poll() is None and cloud.gateways["B"].proc.poll() is None


def test_gateway_killed_and_restarted(cloud, fresh_proxy, drivers):
    robots = drivers(fresh_proxy.target, 2, "gwk", cameras=1)  # frames: blob put, then the Redis write, then the ack
    gw = cloud.gateways["A"]
    wait_until(lambda: all(r.streamer.acked_seq >= 30 for r in robots), 30, "first acks")
    gw.kill()  # SIGKILL mid-stream: chunks in flight are lost at the gateway, not at the robots
    recorded = [r.steps_recorded() for r in robots]
    gw.start()  # same port: robots reconnect by themselves once it listens
    gw.wait_ready()
    wait_until(lambda: all(r.steps_recorded() > n for r, n in zip(robots, recorded)), 10, "robots still recording")
    for r in robots:
        r.finish()
        assert_exactly_once(cloud.client, r.robot_id, r.recorded, cloud.blobs)


def test_redis_killed_and_restarted_from_its_aof(cloud, fresh_proxy, drivers):
    robots = drivers(fresh_proxy.target, 2, "rk")
    wait_until(lambda: all(r.streamer.acked_seq >= 30 for r in robots), 30, "first acks")
    cloud.redis.kill()  # SIGKILL; appendfsync always: every acked write was fsynced before its reply
    acked = [r.streamer.acked_seq for r in robots]
    wait_until(lambda: all(r.steps_recorded() > r.recorded.index(a) + 50 for r, a in zip(robots, acked)), 30,
               "robots recording while Redis is down")
    cloud.restart_redis()
    for r, a in zip(robots, acked):
        assert int(cloud.client.get(RobotKeys(r.robot_id).seq)) >= a, "an acked step did not survive the kill"
    for r in robots:
        r.finish(timeout_s=45)
        assert_exactly_once(cloud.client, r.robot_id, r.recorded)


# --- the edge process ----------------------------------------------------------------------


def _last_good_policy(state_dir: Path) -> None:
    """Leave a tiny ACT policy on the edge's disk as its last good one, so it acts at once."""
    from edge.sim.metaworld import SCHEMA as MW_SCHEMA
    from edge.sim.metaworld import MetaWorldRobot
    from edge.updater import LastGood
    from fleet.policies import PolicyConfig, build_policy
    from fleet.weights import build_manifest

    small = PolicyConfig(chunk_size=5, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64,
                         n_encoder_layers=1, n_decoder_layers=1)
    policy = build_policy(small, MW_SCHEMA, MetaWorldRobot(tasks=(TASK,)).tasks, seed=0)
    tensors = policy.tensors()
    manifest, _ = build_manifest(1, 0, tensors, policy.manifest_config(), policy.trainable_names(),
                                 created_s=time.time())
    LastGood(state_dir / "policy").save(manifest, tensors)


def _spawn_edge(robot_id: str, target: str, state_dir: Path) -> subprocess.Popen:
    log = open(state_dir.parent / f"{robot_id}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "edge", "--robot_id", robot_id, "--gateway", target, "--tasks", TASK,
         "--state_dir", str(state_dir), "--loop.control_hz", "100", "--loop.max_episode_steps", "400",
         "--loop.eval_every", "0", "--interventions", "false", "--heartbeat_interval_s", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    return proc


def test_edge_killed_mid_episode_and_restarted(cloud, fresh_proxy, tmp_path):
    rid, state_dir = "edge-k", tmp_path / "edge-k"
    _last_good_policy(state_dir)
    seq_key = RobotKeys(rid).seq

    def acked() -> int:
        return int(cloud.client.get(seq_key) or 0)

    proc = _spawn_edge(rid, fresh_proxy.target, state_dir)
    try:
        wait_until(lambda: acked() >= 120 or proc.poll() is not None, 90, "the edge to stream 120 steps")
        assert proc.poll() is None, (tmp_path / f"{rid}.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # mid-episode: the first episode runs 400 steps (4 s)
        proc.wait(10)
        spool = Spool(state_dir / "spool.db")
        killed_at = spool.assigned_seq()
        spool.close()
        assert 120 <= killed_at < 400, f"killed at seq {killed_at}: not inside the first episode"
        proc = _spawn_edge(rid, fresh_proxy.target, state_dir)  # same state dir: resumes from its spool
        wait_until(lambda: acked() >= killed_at + 50 or proc.poll() is not None, 90,
                   "the restarted edge to deliver its spool and new steps")
        proc.send_signal(signal.SIGTERM)  # graceful: finish the step, drain (bounded), exit
        assert proc.wait(60) == 0, (tmp_path / f"{rid}.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    spool = Spool(state_dir / "spool.db")
    recorded_n = spool.assigned_seq()  # every seq the edge ever gave a step, before and after the kill
    pending = []
    seq = 0
    while (batch := spool.read_after(seq, max_steps=1000)) is not None:
        pending += list(range(batch.first_seq, batch.last_seq + 1))
        seq = batch.last_seq
    assert spool.dropped_steps == 0 and spool.quarantined_steps == 0
    episodes = stored_steps(cloud.client, rid)
    seqs = sorted(s.seq for steps in episodes.values() for s in steps)
    assert len(seqs) == len(set(seqs)), "a step was stored twice"
    assert sorted(seqs + pending) == list(range(1, recorded_n + 1)), "a recorded step is neither in Redis nor spooled"
    assert len(pending) <= 10, f"{len(pending)} steps still spooled after a graceful stop"
    assert recorded_n > killed_at
    catalog = {k.decode(): json.loads(v) for k, v in cloud.client.hgetall(RobotKeys(rid).catalog).items()}
    killed = next(e for e, steps in episodes.items() if any(s.seq == killed_at for s in steps))
    assert not catalog[killed]["ended"] and catalog[killed]["len"] == killed_at, \
        f"the kill did not cut an episode: seq {killed_at} in {killed} {catalog[killed]}; {catalog}"
    assert killed_at + 1 in [s.seq for steps in episodes.values() for s in steps if s.index == 0], \
        "the restarted edge did not start a new episode"
    for eid, steps in episodes.items():
        assert [s.index for s in steps] == list(range(len(steps))), f"{eid}: hole in the episode"
