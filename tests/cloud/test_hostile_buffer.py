"""The trainer never trusts the buffer. Chunks the gateway accepts, drawn by hypothesis, go through a
real gateway into a real Redis and then through the trainer's index and sampler, which keep drawing
batches; records that cannot be used (corrupt entries, unknown tasks, a schema changed by a second
registration, undecodable steps) are skipped and counted by reason, never raised. A real `fleet
trainer` process keeps stepping on such a buffer."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from cloud.buffer import ROBOTS_KEY, RobotKeys
from cloud.buffer_index import DataSpec
from cloud.sampler import Sampler, SamplerConfig
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.gateway_config import GatewayConfig
from fleet.convert import chunk_to_pb
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step
from tests.conftest import GatewayThread

TASKS = ("reach the goal", "push the puck")
SCHEMA = Schema((FeatureSpec("state", "float32", (3,)), FeatureSpec("cam", "uint8", (8, 8, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
OTHER = Schema((FeatureSpec("state", "float32", (5,)),), FeatureSpec("action", "float32", (2,)))
IMAGES = [encode_image(np.full((8, 8, 3), v, np.uint8), enc) for v, enc in ((0, "png"), (200, "jpeg"))]
ROBOTS = ("r1", "r2")
SPEC = DataSpec(interventions=True, successes=True, episodes=True, offline=True)
pytestmark = pytest.mark.timeout(300)


def skipped(reason: str) -> float:
    return REGISTRY.get_sample_value("fleet_trainer_skipped_records_total", {"reason": reason}) or 0.0


def make_sampler(redis_client) -> Sampler:
    return Sampler(redis_client, TASKS, horizon=3, batch_size=8, online_fraction=0.5, spec=SPEC,
                   config=SamplerConfig(cache_bytes=1 << 20))


def draw_batches(sampler: Sampler, n: int = 3) -> int:
    """Refresh and draw ``n`` batches; returns how many were drawn (0 while nothing is usable)."""
    sampler.refresh()
    if not sampler.index.count():
        return 0
    for _ in range(n):
        try:
            batch = sampler.sample()
        except LookupError:  # what the trainer's prefetcher waits on: every usable episode was quarantined
            assert sampler.index.count() == 0
            return 0
        assert batch["action"].shape == (8, 3, 2) and batch["obs/cam"].shape == (8, 8, 8, 3)
        assert np.isfinite(batch["action"]).all() and (batch["task_index"] >= 0).all()
    return n


floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
episode_ids = st.one_of(st.sampled_from(["e1", "e2", "r1-0a1b2c3d4e5f"]), st.text(max_size=12),
                        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True))
tasks = st.one_of(st.sampled_from(TASKS), st.text(max_size=8))


@st.composite
def chunks(draw, next_seq: dict[str, int]):
    robot = draw(st.sampled_from(ROBOTS))
    n = draw(st.integers(1, 4))
    first = max(0, next_seq[robot] + draw(st.sampled_from([0, 0, 0, -1, 1])))
    done = draw(st.booleans())
    out = []
    for i in range(n):
        last = i == n - 1
        out.append(Step(seq=first + i, index=draw(st.integers(0, 6)), observation={
            "state": np.array(draw(st.lists(floats, min_size=3, max_size=3)), np.float32)},
            policy_action=np.zeros(2, np.float32), action=np.array(draw(st.lists(floats, min_size=2, max_size=2)),
                                                                   np.float32),
            is_intervention=draw(st.booleans()), reward=draw(floats), success=draw(st.booleans()),
            done=done and last, policy_version=draw(st.integers(0, 3)), timestamp_s=1.0,
            images={"cam": draw(st.sampled_from(IMAGES))}))
    end = None
    if done and draw(st.booleans()):
        end = EpisodeSummary(success=draw(st.booleans()), num_steps=draw(st.integers(0, 12)),
                             intervention_steps=draw(st.integers(0, 4)), interventions=draw(st.integers(0, 2)),
                             evaluation=draw(st.booleans()), policy_version=1)
    return Chunk(robot, draw(episode_ids), draw(tasks), out, gap_declared=draw(st.booleans()), episode_end=end)


def test_accepted_chunks_of_any_shape_keep_the_sampler_drawing(redis_proc, redis_client, tmp_path):
    gateway = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                          policy_dir=str(tmp_path / "policies")))
    client = FleetClient(gateway.target, rpc_timeout_s=10.0)
    next_seq = {}
    for rid in ROBOTS:
        next_seq[rid] = client.register(RobotInfo(rid, "arm", SCHEMA, TASKS, PROTOCOL_VERSION)).last_acked_seq + 1
    sampler = make_sampler(redis_client)
    outcome = {"accepted": 0, "refused": 0, "batches": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        chunk = data.draw(chunks(next_seq))
        try:
            acks = list(client.stream_experience(iter([chunk_to_pb(chunk)])))
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), err
            outcome["refused"] += 1
        else:
            next_seq[chunk.robot_id] = acks[-1].acked_seq + 1
            outcome["accepted"] += 1
        outcome["batches"] += draw_batches(sampler, 1)

    try:
        one()
        assert outcome["accepted"] >= 30 and outcome["refused"] >= 10, outcome
        assert outcome["batches"] >= 10, outcome
        assert draw_batches(sampler, 5) == 5
    finally:
        client.close()
        gateway.stop()


def test_unusable_records_are_skipped_and_counted_by_reason(redis_proc, redis_client, tmp_path):
    gateway = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                          policy_dir=str(tmp_path / "policies")))
    client = FleetClient(gateway.target, rpc_timeout_s=10.0)
    try:
        for rid in ROBOTS:
            client.register(RobotInfo(rid, "arm", SCHEMA, TASKS, PROTOCOL_VERSION))
        for rid in ROBOTS:  # one finished, operator-driven episode each
            steps = [Step(seq=1 + i, index=i, observation={"state": np.full(3, i, np.float32)},
                          policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=True,
                          reward=0.0, success=i == 4, done=i == 4, policy_version=1, timestamp_s=1.0,
                          images={"cam": IMAGES[0]}) for i in range(5)]
            summary = EpisodeSummary(True, 5, 5, 1, False, 1)
            list(client.stream_experience(iter([chunk_to_pb(Chunk(rid, f"{rid}-ep", TASKS[0], steps,
                                                                  episode_end=summary))])))
        sampler = make_sampler(redis_client)
        assert draw_batches(sampler) == 3
        before = {reason: skipped(reason) for reason in ("corrupt_labeled", "unknown_task", "corrupt_registration",
                                                         "corrupt_event", "corrupt_catalog", "corrupt_step",
                                                         "schema_changed")}

        keys = RobotKeys("r1")
        # The crash: an episode id with "|" in a labeled entry (as written before the name rule).
        redis_client.rpush(keys.labeled, b"e|x|0|reach the goal", b"garbage", b"e1|-4|reach the goal", b"\xff\xfe|1|t")
        redis_client.rpush(keys.episode_ids, b"r1-j|juggle")  # episode number 1: a task the trainer does not know
        redis_client.rpush(keys.labeled, b"1|0|1")
        redis_client.rpush(keys.labeled, b"99|0")  # not a run (and no episode 99 in episode_ids)
        redis_client.hset(ROBOTS_KEY, "ghost", b"{not json")
        redis_client.xadd(keys.events, {"episode": "r1-x"})  # no task, no summary
        redis_client.hset(RobotKeys("r2").catalog, "bad", b"[1, 2]")
        sampler.refresh()
        assert skipped("corrupt_labeled") - before["corrupt_labeled"] == 5
        assert skipped("unknown_task") - before["unknown_task"] == 1
        assert skipped("corrupt_registration") - before["corrupt_registration"] == 1
        assert skipped("corrupt_event") - before["corrupt_event"] == 1
        assert draw_batches(sampler) == 3
        fresh = make_sampler(redis_client)  # catalogs are read when a robot is first seen
        assert draw_batches(fresh) == 3
        assert fresh.index.skipped["corrupt_catalog"] == 1 and fresh.index.skipped["corrupt_labeled"] == 5

        # Undecodable bytes in one stored episode: quarantined, the others still sampled.
        redis_client.lset(RobotKeys("r2").episode("r2-ep"), 0, b"\x0a\xff\xff\xff")
        sampler.cache.forget("r2", "r2-ep")
        for _ in range(20):
            draw_batches(sampler, 1)
        assert skipped("corrupt_step") - before["corrupt_step"] == 1
        assert {seg.robot_id for pool in sampler.index.pools.values() for seg in pool.segments} == {"r1"}

        # r1 registers again with another schema (an operator allowed it): its new records are skipped.
        redis_client.set(RobotKeys("r1").allow_schema_change, "1")
        client.register(RobotInfo("r1", "arm", OTHER, TASKS, PROTOCOL_VERSION))
        other = [Step(seq=6, index=0, observation={"state": np.zeros(5, np.float32)},
                      policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=True,
                      reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0)]
        list(client.stream_experience(iter([chunk_to_pb(Chunk("r1", "r1-new", TASKS[0], other))])))
        sampler.refresh()
        assert skipped("schema_changed") - before["schema_changed"] == 1
        assert draw_batches(sampler) == 3
        assert json.loads(redis_client.hget(ROBOTS_KEY, "r1"))["schema"]["observation"][0]["shape"] == [5]
    finally:
        client.close()
        gateway.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_real_trainer_keeps_stepping_on_a_corrupt_buffer(redis_proc, redis_client, tmp_path):
    from edge.sim.demos import seed_scripted_demos
    from cloud.policy_store import PolicyStore
    from tests.cloud.test_recovery import TASKS as TRAINER_TASKS
    from tests.cloud.test_recovery import start_watched_trainer, status, wait_for
    from tests.test_observability import scrape, total

    seed_scripted_demos(redis_proc.url, TRAINER_TASKS, episodes_per_task=2, max_episode_steps=40)
    (demo,) = [k.decode() for k in redis_client.hkeys(ROBOTS_KEY)]
    keys = RobotKeys(demo)
    episodes = sorted(k.decode() for k in redis_client.hkeys(keys.catalog))
    # The crash-loop (an episode id with "|"), garbage, an unknown task, a corrupt registration,
    # and undecodable bytes in one stored episode.
    number = redis_client.rpush(keys.episode_ids, "juggled|juggle") - 1  # an episode of a task nobody knows
    redis_client.rpush(keys.labeled, f"e|x|0|{TRAINER_TASKS[0]}", b"\xff|1|t", f"{number}|0|1")
    redis_client.hset(ROBOTS_KEY, "ghost", b'{"schema": 7}')
    redis_client.lset(keys.episode(episodes[1]), 0, b"\x0a\xff\xff\xff")
    trainer, policy_dir, metrics_port, log_path = start_watched_trainer(redis_proc.url, tmp_path)
    try:
        wait_for(lambda: int(status(redis_client).get("step", 0)) >= 40 and len(PolicyStore(policy_dir).versions())
                 >= 2, "40 steps and two versions", trainer, log_path, timeout_s=120)
        samples = scrape(metrics_port)
        reasons = {reason: total(samples, "fleet_trainer_skipped_records_total", reason=reason)
                   for reason in ("corrupt_labeled", "unknown_task", "corrupt_registration", "corrupt_step")}
        assert reasons["corrupt_labeled"] == 2 and reasons["unknown_task"] == 1, reasons
        assert reasons["corrupt_registration"] == 1 and reasons["corrupt_step"] == 1, reasons
        text = log_path.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert text.count("(corrupt_labeled)") == 1, text[-3000:]  # logged once per robot and reason
    finally:
        trainer.kill()
        trainer.wait(30)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.booleans(), max_size=64))
def test_label_runs_are_the_runs_of_true(flags):
    """The writer's label runs (one (start, end) pair per run of labelled steps, end exclusive) for any flags."""
    from cloud.buffer.writer import label_runs

    expected, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            expected.append((start, i))
            start = None
    runs = label_runs(np.array(flags, bool))
    assert runs.shape == (len(expected), 2) and [tuple(r) for r in runs.tolist()] == expected
