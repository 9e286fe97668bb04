"""``fleet status`` and the per-task window summary, over a real gateway (gRPC on loopback) and a
real redis-server: robots register, stream episodes and heartbeat exactly as edges do."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

from cloud.buffer import POLICY_LATEST_KEY, SOURCE_OFFLINE
from cloud.ingest import Ingest
from cloud.status import fleet_status, format_table, online_robots, run_status
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from fleet.convert import chunk_to_pb
from fleet.redis_server import free_port
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step

pytestmark = pytest.mark.timeout(120)

SCHEMA = Schema((FeatureSpec("state", "float32", (3,)),), FeatureSpec("action", "float32", (2,)))
REACH, PRESS = "reach the goal", "press the button"


class FakeRobot:
    """Registers, streams whole episodes and heartbeats through a real FleetClient."""

    def __init__(self, client: FleetClient, robot_id: str):
        self.client, self.robot_id, self.seq = client, robot_id, 0
        client.register(RobotInfo(robot_id, "test-arm", SCHEMA, (REACH, PRESS), PROTOCOL_VERSION))

    def episode(self, task: str, n: int, interventions: int = 0, success: bool = False,
                evaluation: bool = False) -> None:
        steps = [Step(seq=self.seq + i + 1, index=i, observation={"state": np.zeros(3, np.float32)},
                      policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32),
                      is_intervention=i < interventions, reward=0.0, success=success and i == n - 1,
                      done=i == n - 1, policy_version=1, timestamp_s=time.time()) for i in range(n)]
        self.seq += n
        end = EpisodeSummary(success=success, num_steps=n, intervention_steps=interventions,
                             interventions=int(interventions > 0), evaluation=evaluation, policy_version=1)
        chunk = Chunk(self.robot_id, f"{self.robot_id}-{uuid.uuid4().hex[:8]}", task, steps, episode_end=end,
                      evaluation=evaluation)
        acks = list(self.client.stream_experience(iter([chunk_to_pb(chunk, SCHEMA)])))
        assert acks[-1].acked_seq == self.seq

    def heartbeat(self, version: int, spool_steps: int = 0, spool_bytes: int = 0, task: str = REACH) -> None:
        self.client.heartbeat(self.robot_id, version, spool_steps, spool_bytes, "running", task, 19.5, 0.25)


def seed_offline(url: str, n: int = 7) -> None:
    """Offline demonstrations under their own robot id (source=offline), through the real Ingest."""
    async def write():
        redis = aioredis.Redis.from_url(url)
        try:
            ingest = Ingest(redis, source=SOURCE_OFFLINE)
            await ingest.register(RobotInfo("demos", "test-arm", SCHEMA, (REACH,), PROTOCOL_VERSION))
            steps = [Step(seq=i + 1, index=i, observation={"state": np.zeros(3, np.float32)},
                          policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32),
                          is_intervention=False, reward=0.0, success=i == n - 1, done=i == n - 1,
                          policy_version=0, timestamp_s=time.time()) for i in range(n)]
            end = EpisodeSummary(True, n, 0, 0, False, 0)
            await ingest.write(Chunk("demos", "demos-1", REACH, steps, episode_end=end))
        finally:
            await redis.aclose()
    asyncio.run(write())


@pytest.fixture
def fleet(gateway, redis_proc, redis_client):
    """Two robots and an offline source; a, b heartbeat; latest published version 5."""
    client = FleetClient(gateway.target)
    a, b = FakeRobot(client, "robot-a"), FakeRobot(client, "robot-b")
    seed_offline(redis_proc.url)
    a.episode(REACH, 10, interventions=4, success=True)            # supervised, success
    a.episode(REACH, 6, success=True, evaluation=True)             # autonomous success
    b.episode(REACH, 8, success=False, evaluation=True)            # autonomous failure
    b.episode(PRESS, 12, interventions=12, success=False)          # supervised, failure, all human
    redis_client.set(POLICY_LATEST_KEY, 5)
    a.heartbeat(version=5, spool_steps=3, spool_bytes=3 * 1024 * 1024)
    b.heartbeat(version=2, task=PRESS)
    yield a, b
    client.close()


def test_robot_rows_follow_registrations_heartbeats_and_stored_counts(fleet, redis_client):
    status = fleet_status(redis_client)
    rows = {r["robot_id"]: r for r in status["robots"]}
    assert set(rows) == {"robot-a", "robot-b", "demos"}
    assert rows["demos"]["source"] == SOURCE_OFFLINE and rows["demos"]["version_lag"] is None
    a, b = rows["robot-a"], rows["robot-b"]
    assert (a["embodiment"], a["task"], a["connected"], a["policy_version"], a["version_lag"]) == \
        ("test-arm", REACH, True, 5, 0)
    assert (b["task"], b["policy_version"], b["version_lag"]) == (PRESS, 2, 3)
    assert (a["spool_steps"], a["spool_bytes"]) == (3, 3 * 1024 * 1024)
    assert a["steps_per_s"] == pytest.approx(19.5) and a["intervention_rate"] == pytest.approx(0.25)
    assert (a["steps_stored"], a["intervention_steps_stored"], a["episodes"], a["successes"]) == (16, 4, 2, 2)
    assert (b["steps_stored"], b["intervention_steps_stored"], b["episodes"], b["successes"]) == (20, 12, 2, 0)
    assert a["last_acked_seq"] == 16 and a["bytes_stored"] > 0
    assert [r["robot_id"] for r in online_robots(status)] == ["robot-a", "robot-b"]
    # Seen from a minute later, nobody is connected any more.
    later = fleet_status(redis_client, now_s=time.time() + 60)
    assert not any(r["connected"] for r in later["robots"])


def test_task_window_success_interventions_and_return_on_human_effort(fleet, redis_client):
    tasks = fleet_status(redis_client)["tasks"]
    assert set(tasks) == {REACH, PRESS}  # the offline demos are not fleet work
    reach, press = tasks[REACH], tasks[PRESS]
    assert (reach["episodes"], reach["eval_episodes"], reach["successes"], reach["eval_successes"]) == (3, 2, 2, 1)
    assert reach["autonomous_success_ratio"] == pytest.approx(0.5)
    assert reach["supervised_success_ratio"] == pytest.approx(1.0)
    assert (reach["steps"], reach["intervention_steps"]) == (10, 4)  # supervised episodes only
    assert reach["intervention_ratio"] == pytest.approx(0.4)
    assert reach["return_on_human_effort"] == pytest.approx(2 / (1 + 4))
    assert press["autonomous_success_ratio"] is None and press["intervention_ratio"] == pytest.approx(1.0)
    assert press["return_on_human_effort"] == 0.0
    # The window is read by stream id (time): seen from 20 minutes later with a 10-minute window, empty.
    assert fleet_status(redis_client, window_s=600, now_s=time.time() + 1200)["tasks"] == {}


def test_table_shows_robots_lag_backlog_and_tasks(fleet, redis_client):
    text = format_table(fleet_status(redis_client))
    lines = text.splitlines()
    assert lines[0] == "latest policy v5"
    header = lines[1].split()
    assert header[:6] == ["robot", "embodiment", "task", "conn", "ver", "lag"]
    row_a = next(line for line in lines if line.startswith("robot-a"))
    assert "3.0MiB" in row_a and " True " in row_a
    row_b = next(line for line in lines if line.startswith("robot-b"))
    assert row_b.split()[-8:-6] == ["2", "3"]  # version 2, lag 3
    assert not any(line.startswith("demos") for line in lines)
    task_line = next(line for line in lines if line.startswith(REACH))
    assert task_line.split()[-4:] == ["0.50", "0.40", "4", "0.4000"]


def _cells(text: str, first: str) -> list[str]:
    """The cells of the table row of ``text`` whose first cell is ``first`` (cells are 2+ spaces apart)."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_demo_view_shows_a_row_per_robot_and_the_learner_from_status(fleet, redis_client):
    """`fleet demo`'s view, rendered without a terminal, from the real status and episode events."""
    from io import StringIO

    from cloud.status import TRAINER_STATUS_KEY

    redis_client.hset(TRAINER_STATUS_KEY, mapping={"step": 340, "loss": 0.0123, "samples_per_s": 512.0})
    now, status = time.time(), fleet_status(redis_client)  # before the imports (seconds): robots still connected

    from rich.console import Console

    from edge.sim.demo import EpisodeLog
    from edge.sim.demo_view import DemoView, Snapshot, render

    events = EpisodeLog(redis_client)
    events.poll(["robot-a", "robot-b"])
    snap = Snapshot(status, events.episodes, now, elapsed_s=42.0, duration_s=600.0)
    console = Console(file=StringIO(), width=200, record=True)
    console.print(render(snap, footer="logs: /run/logs/"))
    text = console.export_text()
    assert text.splitlines()[0] == "42s of 600s | latest v5" and "logs: /run/logs/" in text
    # robot, policy, episodes, success (eval) so far, recent, take-overs, operator share, spool, steps/s
    assert _cells(text, "robot-a") == ["robot-a", "v5", "2", "1.00", "1.00 n=1", "1", "0.40", "3", "19.5"]
    assert _cells(text, "robot-b") == ["robot-b", "v2", "2", "0.00", "0.00 n=1", "1", "1.00", "0", "19.5"]
    assert not any(line.startswith("demos") for line in text.splitlines())  # an offline source, not a robot
    # learner: step, loss, versions published, buffer steps (robots' 16 + 20 and the 7 seeded), samples/s
    assert _cells(text, "trainer") == ["trainer", "340", "0.0123", "5", "43", "512"]

    lines: list[str] = []  # stdout not a terminal: a progress line per interval
    plain = DemoView(live=False, progress_interval_s=60.0, write=lines.append)
    plain.show(snap)
    plain.show(snap)
    assert len(lines) == 1 and "robots a:v5 b:v2" in lines[0] and "success(2min) 0.50 (n=2)" in lines[0]
    assert "43 steps stored | trainer step 340 loss 0.0123" in lines[0]

    buf = StringIO()  # a terminal: the live table, with lines printed above it
    live = DemoView(live=True, _console=Console(file=buf, force_terminal=True, width=200))
    with live:
        live.echo("fleet running for 600s")
        live.show(snap)
    out = buf.getvalue()
    assert "fleet running for 600s" in out and "robot-b" in out and "0.0123" in out and lines == lines[:1]


def test_cli_json_lists_the_fleets_robots_and_watch_refreshes_until_stopped(fleet, redis_proc, redis_client,
                                                                           capsys, cli_main):
    main = cli_main
    assert main(["status", "--redis_url", redis_proc.url, "--json"]) == 0
    robots = json.loads(capsys.readouterr().out)
    assert [r["robot_id"] for r in robots] == ["robot-a", "robot-b"]
    assert robots[1]["version_lag"] == 3 and robots[0]["steps_stored"] == 16

    frames: list[str] = []
    stop = threading.Event()

    def write(text: str) -> None:
        frames.append(text)
        if len(frames) == 3:
            stop.set()

    fleet[0].heartbeat(version=4)
    assert run_status(redis_client, True, True, 0.01, 600, stop, write) == 3
    assert json.loads(frames[-1])[0]["policy_version"] == 4
    assert run_status(redis_client, False, True, 0.01, 600, stop, frames.append) == 1  # already stopped
    assert frames[-1].startswith("\033[2J\033[H")


def test_cli_errors_name_the_bad_value_or_the_unreachable_redis(capsys, cli_main):
    main = cli_main
    with pytest.raises(SystemExit) as exc:
        main(["status", "--interval", "0"])
    assert exc.value.code == 2 and "--interval (0.0)" in capsys.readouterr().err
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["status", "--redis_url", url, "--json"]) == 1
    assert f"cannot read Redis at {url}" in capsys.readouterr().err


def _samples(registry) -> dict[tuple[str, frozenset], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_fleet_collector_exports_robots_windows_buffer_and_redis_memory(fleet, redis_client):
    from prometheus_client import CollectorRegistry

    from cloud.fleet_metrics import FleetCollector

    registry = CollectorRegistry()
    FleetCollector(redis_client, min_interval_s=0).register(registry)
    got = _samples(registry)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("fleet_redis_up") == 1
    assert value("fleet_policy_latest_version") == 5
    assert value("fleet_robot_connected", robot="robot-a") == 1
    assert (value("fleet_robot_policy_version", robot="robot-b"), value("fleet_robot_policy_version_lag",
                                                                         robot="robot-b")) == (2, 3)
    assert value("fleet_robot_spool_bytes", robot="robot-a") == 3 * 1024 * 1024
    assert value("fleet_robot_steps_stored_total", robot="robot-a", source="online") == 16
    assert value("fleet_robot_intervention_steps_stored_total", robot="robot-b", source="online") == 12
    assert value("fleet_robot_steps_stored_total", robot="demos", source="offline") == 7
    assert ("fleet_robot_connected", frozenset({("robot", "demos")})) not in got  # demos send no heartbeats
    assert value("fleet_robot_info", robot="robot-a", embodiment="test-arm", source="online") == 1
    # Per task over the window.
    assert value("fleet_window_episodes", task=REACH, mode="autonomous") == 2
    assert value("fleet_window_success_ratio", task=REACH, mode="autonomous") == pytest.approx(0.5)
    assert value("fleet_window_success_ratio", task=REACH, mode="supervised") == pytest.approx(1.0)
    assert value("fleet_window_intervention_steps", task=PRESS) == 12
    assert value("fleet_window_intervention_ratio", task=REACH) == pytest.approx(0.4)
    assert value("fleet_window_return_on_human_effort", task=REACH) == pytest.approx(0.4)
    assert ("fleet_window_success_ratio", frozenset({("task", PRESS), ("mode", "autonomous")})) not in got
    # Buffer by task and source, from the episode catalogs; bytes add up to what the robots stored.
    assert value("fleet_buffer_steps", task=REACH, source="online") == 10 + 6 + 8
    assert value("fleet_buffer_steps", task=PRESS, source="online") == 12
    assert value("fleet_buffer_steps", task=REACH, source="offline") == 7
    stored = sum(int(redis_client.hget(f"fleet:{{r:{r}}}:stats", "bytes")) for r in ("robot-a", "robot-b"))
    assert value("fleet_buffer_bytes", task=REACH, source="online") + \
        value("fleet_buffer_bytes", task=PRESS, source="online") == pytest.approx(stored)
    nodes = [dict(labels)["node"] for name, labels in got if name == "fleet_redis_used_memory_bytes"]
    assert len(nodes) == 1 and value("fleet_redis_used_memory_bytes", node=nodes[0]) > 0
    assert value("fleet_redis_maxmemory_bytes", node=nodes[0]) == 0  # the fixture's Redis has no limit
    # Prometheus conventions: fleet_ prefix, counters end in _total, no unbounded labels.
    for name, labels in got:
        assert name.startswith("fleet_"), name
        assert not {"episode", "episode_id", "seq"} & {k for k, _ in labels}, name


def test_fleet_collector_scrape_succeeds_when_redis_is_down_and_install_replaces(redis_proc):
    from prometheus_client import CollectorRegistry

    from cloud import fleet_metrics

    registry = CollectorRegistry()
    fleet_metrics.install(redis_proc.url, registry=registry)
    fleet_metrics.install(redis_proc.url, registry=registry)  # replaces: one collector, one series each
    assert _samples(registry)[("fleet_redis_up", frozenset())] == 1
    fleet_metrics.uninstall()
    assert _samples(registry) == {}
    fleet_metrics.install(f"redis://127.0.0.1:{free_port()}/0", registry=registry)
    try:
        assert _samples(registry)[("fleet_redis_up", frozenset())] == 0
    finally:
        fleet_metrics.uninstall()
