"""The operators service against a real redis-server: the robots' status hashes are written directly (as the
gateway writes them on heartbeats), the assignments and metrics are read back; `fleet operators` as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY

from cloud.buffer.layout import OPS_ASSIGNMENTS_KEY, OPS_OPERATORS_KEY, ROBOTS_KEY, RobotKeys
from cloud.buffer.reader import BufferReader
from cloud.operators.config import OperatorsConfig
from cloud.operators.service import OperatorsService
from fleet.errors import ConfigError
from fleet.redis_server import free_port
from tests.waiting import wait_until

T0 = 1_000_000.0


def heartbeat(redis, robot: str, now: float, score: float = 0.0, wanted: bool = False, holding: bool = False,
              risk: float = 0.0, waited: float = 0.0, **extra) -> None:
    """What the gateway writes for one heartbeat with a help signal."""
    redis.hset(ROBOTS_KEY, robot, json.dumps({"source": "online", "embodiment": "sim"}))
    redis.hset(RobotKeys(robot).status, mapping={
        "last_seen_s": now, "policy_version": 3, "task": "reach the goal", "help_score": score,
        "help_uncertainty": score / 2, "help_stall": 0.0, "help_risk": risk, "help_wanted": int(wanted),
        "holding": int(holding), "intervening": 0, "wanted_for_s": waited, "operator": "", **extra})


def assigned(redis) -> dict[str, dict]:
    return {r: json.loads(v) for r, v in BufferReader(redis).assignments().items()}


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_assigns_the_wanting_robots_in_priority_order_and_releases_after_the_hold(redis_client):
    service = OperatorsService(OperatorsConfig(operators="2", min_hold_s=5.0), redis_client)
    heartbeat(redis_client, "r-calm", T0, score=0.95)  # a high score but not wanting help: never served
    heartbeat(redis_client, "r-low", T0, score=0.6, wanted=True, waited=3.0)
    heartbeat(redis_client, "r-high", T0, score=0.9, wanted=True, waited=1.0)
    heartbeat(redis_client, "r-held", T0, score=0.3, wanted=True, holding=True, waited=2.0)
    heartbeat(redis_client, "r-gone", T0 - 60, score=1.0, wanted=True, holding=True, waited=9.0)  # not seen lately
    helped_before = sample("fleet_operators_time_to_help_seconds_count")
    busy_before = sample("fleet_operator_busy_seconds_total", operator="operator-1")

    service.tick(now=T0)
    got = assigned(redis_client)
    assert got == {"r-held": {"operator": "operator-1", "since_s": T0, "manual": False},
                   "r-high": {"operator": "operator-2", "since_s": T0, "manual": False}}
    assert set(BufferReader(redis_client).operators()) == {"operator-1", "operator-2"}
    assert 0 < redis_client.pttl(OPS_ASSIGNMENTS_KEY) <= service.ttl_s * 1000  # expires if the service dies
    assert sample("fleet_operators_utilisation_ratio") == 1.0
    assert sample("fleet_operators_queue_robots") == 1.0  # r-low (r-gone is not seen any more)
    assert sample("fleet_operators_wanting_robots") == 3.0
    assert sample("fleet_operators_holding_robots") == 1.0
    assert sample("fleet_operators_longest_wait_seconds") == 3.0
    assert sample("fleet_operators_time_to_help_seconds_count") == helped_before + 2
    snap = service.snapshot()
    assert [r["robot_id"] for r in snap["robots"]] == ["r-held", "r-high", "r-low", "r-calm", "r-gone"]
    assert [r["connected"] for r in snap["robots"]] == [True, True, True, True, False]
    assert snap["robots"][0]["operator"] == "operator-1" and snap["robots"][2]["operator"] == ""
    assert {o["operator_id"]: o["queue"] for o in snap["operators"]} == {"operator-1": ["r-low"], "operator-2": []}

    # The two served robots no longer want help: their operators stay for the hold time, then move to r-low.
    for robot in ("r-held", "r-high"):
        heartbeat(redis_client, robot, T0 + 4, score=0.1)
    heartbeat(redis_client, "r-low", T0 + 4, score=0.6, wanted=True, waited=7.0)
    service.tick(now=T0 + 4)
    assert set(assigned(redis_client)) == {"r-held", "r-high"}
    assert sample("fleet_operators_longest_wait_seconds") == 7.0
    service.tick(now=T0 + 5)
    assert assigned(redis_client) == {"r-low": {"operator": "operator-1", "since_s": T0 + 5, "manual": False}}
    assert sample("fleet_operators_utilisation_ratio") == 0.5
    assert sample("fleet_operators_queue_robots") == 0.0
    assert sample("fleet_operator_busy_seconds_total", operator="operator-1") == busy_before + 5.0
    # time to help is the robot's wanted_for_s aged by the time since its heartbeat (1 s)
    assert sample("fleet_operators_time_to_help_seconds_bucket", le="10.0") >= 3


def test_take_over_is_written_at_once_and_pinned_until_hand_back(redis_client):
    service = OperatorsService(OperatorsConfig(operators="alice,bob", min_hold_s=0.0), redis_client)
    heartbeat(redis_client, "r1", T0, score=0.1)
    heartbeat(redis_client, "r2", T0, score=0.9, wanted=True, holding=True)
    service.tick(now=T0)
    assert assigned(redis_client) == {"r2": {"operator": "alice", "since_s": T0, "manual": False}}
    service.take_over("bob", "r1")
    assert assigned(redis_client)["r1"]["operator"] == "bob" and assigned(redis_client)["r1"]["manual"] is True
    service.tick(now=T0 + 100)
    assert assigned(redis_client)["r1"]["manual"] is True  # a calm robot keeps its pinned operator
    for bad in (("carol", "r1"), ("bob", "r9")):
        with pytest.raises(ConfigError):
            service.take_over(*bad)
    with pytest.raises(ConfigError, match="does not hold"):
        service.hand_back("alice", "r1")
    service.hand_back("bob", "r1")
    assert "r1" not in assigned(redis_client)
    with pytest.raises(KeyError):
        service.thumbnail("r9")
    assert service.thumbnail("r1") is None
    redis_client.set(RobotKeys("r1").thumb, b"\xff\xd8jpeg")
    assert service.thumbnail("r1") == b"\xff\xd8jpeg"
    assert [r["has_thumbnail"] for r in service.snapshot()["robots"] if r["robot_id"] == "r1"] == [True]


def test_malformed_status_fields_read_as_no_need(redis_client):
    service = OperatorsService(OperatorsConfig(operators="1"), redis_client)
    now = time.time()
    heartbeat(redis_client, "r-bad", now, help_score="nan", help_risk="-inf", wanted_for_s="x", help_wanted="yes")
    heartbeat(redis_client, "r-ok", now, score=0.5, wanted=True)
    redis_client.hset(ROBOTS_KEY, "r-old", json.dumps({"source": "online"}))  # registered, never heartbeated
    assert {r: a.operator for r, a in service.tick().items()} == {"r-ok": "operator-1"}
    bad = next(r for r in service.snapshot()["robots"] if r["robot_id"] == "r-bad")
    assert (bad["score"], bad["risk"], bad["wanted_for_s"], bad["wanted"]) == (0.0, 0.0, 0.0, False)


def test_fleet_operators_process_assigns_serves_metrics_and_withdraws_on_sigterm(redis_proc, redis_client):
    port = free_port()
    heartbeat(redis_client, "r1", time.time(), score=0.8, wanted=True, waited=1.0)
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "operators", "--redis_url", redis_proc.url,
                             "--operators", "2", "--period_s", "0.05", "--metrics_port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "r1" in assigned(redis_client), 30, "the process to assign r1")
        assert redis_client.hgetall(OPS_OPERATORS_KEY).keys() == {b"operator-1", b"operator-2"}

        def metrics_text() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()

        text = wait_until(lambda: "fleet_operators_assigned 1.0" in metrics_text() and metrics_text(), 10,
                          "the metrics to show one operator assigned")
        assert "fleet_operators 2.0" in text and "fleet_operators_wait_alert_seconds 60.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not redis_client.exists(OPS_ASSIGNMENTS_KEY)  # withdrawn: robots hold rather than follow a stale one
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode(errors="replace")
    assert "operator operator-1 -> robot r1" in out, out


def test_bad_config_exits_2_naming_the_field():
    for args, needle in ((["--policy", "fifo"], "policy must be one of"), (["--operators", "0"], "operators"),
                         (["--min_hold_s", "-1"], "min_hold_s"), (["--console_listen", "nowhere"], "console_listen")):
        done = subprocess.run([sys.executable, "-m", "fleet.cli", "operators", *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and needle in done.stderr, (args, done.stderr)


def test_run_learner_starts_the_operators_service_as_a_third_child(redis_proc, redis_client, tmp_path):
    import threading

    from cloud.app import operators_args, run_learner

    stop, codes = threading.Event(), []
    heartbeat(redis_client, "r1", time.time(), score=0.8, wanted=True)
    learner = threading.Thread(target=lambda: codes.append(run_learner(
        f"127.0.0.1:{free_port()}", redis_proc.url, str(tmp_path / "policies"), ["--seed_bc_steps", "0"],
        tmp_path / "logs", stop, operator_args=operators_args(redis_proc.url, "alice", ["--period_s", "0.1"]))))
    learner.start()
    try:
        wait_until(lambda: assigned(redis_client).get("r1", {}).get("operator") == "alice", 60,
                   "the learner's operators child to assign r1")
    finally:
        stop.set()
        learner.join(timeout=90)
    assert len(codes) == 1  # (the trainer, stopped while still importing torch, may end by the signal: -15)
    assert "operators service: 1 operators (alice)" in (tmp_path / "logs" / "operators.log").read_text()
    assert not redis_client.exists(OPS_ASSIGNMENTS_KEY)  # the operators child stopped gracefully


def test_demo_operators_values_are_checked():
    from fleet.cli import parse_config

    for argv, needle in ((["--operators", "-1"], "operators (-1) must be >= 0"),
                         (["--operators", "2", "--operator_policy", "fifo"], "operator_policy must be one of")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            parse_config("demo", argv, exit_on_error=False)
    assert parse_config("demo", ["--operators", "2"], exit_on_error=False).operators == 2


@pytest.mark.timeout(60)
def test_a_redis_outage_is_waited_out(tmp_path):
    import threading

    import redis as redis_lib

    from fleet.redis_server import start_redis

    redis_proc = start_redis(tmp_path / "redis", appendfsync="always")
    client = redis_lib.Redis.from_url(redis_proc.url)
    service = OperatorsService(OperatorsConfig(redis_url=redis_proc.url, operators="1", period_s=0.05))
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        heartbeat(client, "r1", time.time(), score=0.8, wanted=True)
        wait_until(lambda: "r1" in assigned(client), 10, "r1 assigned")
        redis_proc.kill()  # SIGKILL
        wait_until(lambda: sample("fleet_operators_redis_up") == 0, 10, "fleet_operators_redis_up 0")
        assert runner.is_alive()
        redis_proc = start_redis(redis_proc.data_dir, port=redis_proc.port, appendfsync="always")
        heartbeat(client, "r2", time.time(), score=0.9, wanted=True, holding=True)
        heartbeat(client, "r1", time.time(), score=0.8, wanted=True)
        wait_until(lambda: sample("fleet_operators_redis_up") == 1 and assigned(client), 20,
                   "the service back, writing assignments")
        assert runner.is_alive()
    finally:
        stop.set()
        runner.join(timeout=30)
        client.close()
        redis_proc.kill()
    assert not runner.is_alive()


@pytest.mark.parametrize("init, series", [("init_operators()", "fleet_operators_"),
                                          ("init_trainer(())", "fleet_trainer_redis_up"),
                                          ("init_trainer(())", "fleet_trainer_optimizer_steps_total")])
def test_only_the_owning_process_exports_its_unlabelled_series(init, series):
    """Unlabelled series would be exported at 0 by every process, and the rules over them would see those too
    (the trainer-not-stepping and trainer-Redis-down alerts fired for every gateway and edge target)."""
    code = ("from prometheus_client import generate_latest; from fleet import metrics; "
            f"before = generate_latest().decode(); metrics.{init}; metrics.{init}; "
            f"after = generate_latest().decode(); print({series!r} in before, {series!r} in after)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr
