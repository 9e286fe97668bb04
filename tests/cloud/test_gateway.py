"""Gateway over real gRPC on loopback and a real redis-server: acks after Redis,
exactly-once on resend, precise status codes for bad input."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cloud.buffer import RobotKeys
from cloud.buffer.reader import BufferReader
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from fleet.convert import chunk_to_pb, legacy_chunk_to_pb
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step

SCHEMA = Schema((FeatureSpec("state", "float32", (6,)),), FeatureSpec("action", "float32", (2,)))
TASK = "reach the goal"


def info(robot_id="r1", protocol=PROTOCOL_VERSION):
    return RobotInfo(robot_id, "test-arm", SCHEMA, (TASK,), protocol)


def steps(first_seq, n, obs_dim=6, last_done=False):
    out = []
    for i in range(n):
        out.append(Step(seq=first_seq + i, index=first_seq + i - 1,
                        observation={"state": np.full(obs_dim, first_seq + i, np.float32)},
                        policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32),
                        is_intervention=i % 2 == 0, reward=0.0, success=False,
                        done=last_done and i == n - 1, policy_version=1, timestamp_s=1.0))
    return out


def send(client, *chunks):
    call = client.stream_experience(iter([chunk_to_pb(c, SCHEMA) for c in chunks]))
    return [a for a in call]


@pytest.fixture
def client(gateway):
    c = FleetClient(gateway.target)
    yield c
    c.close()


def test_ack_only_after_redis_and_exactly_once(client, redis_client):
    assert client.register(info()).last_acked_seq == 0
    acks = send(client, Chunk("r1", "e1", TASK, steps(1, 5)))
    assert [a.acked_seq for a in acks] == [5]
    reader = BufferReader(redis_client)
    assert [s.seq for s in reader.steps("r1", "e1", SCHEMA)] == [1, 2, 3, 4, 5]
    assert redis_client.llen(RobotKeys("r1").episode("e1")) == 1  # one element per chunk
    # Resend overlapping and full duplicates (what a reconnecting edge does): nothing stored twice.
    acks = send(client, Chunk("r1", "e1", TASK, steps(1, 5)), Chunk("r1", "e1", TASK, steps(4, 4)))
    assert [(a.acked_seq, a.duplicate_steps) for a in acks] == [(5, 5), (7, 2)]
    stored = reader.steps("r1", "e1", SCHEMA)
    assert [(s.seq, s.index, s.observation["state"][0]) for s in stored] == [(i, i - 1, i) for i in range(1, 8)]
    assert redis_client.llen(RobotKeys("r1").episode("e1")) == 2  # the overlap's new tail is its own element
    assert client.register(info()).last_acked_seq == 7
    # Label runs "<episode number>|start|end[|start|end...]", one entry per chunk, cover the intervention steps.
    labeled = [x.decode() for x in redis_client.lrange(RobotKeys("r1").labeled, 0, -1)]
    assert labeled == ["0|0|1|2|3|4|5", "0|5|6"]  # episode number 0: its id and task are stored once
    assert redis_client.lrange(RobotKeys("r1").episode_ids, 0, -1) == [f"e1|{TASK}".encode()]


def test_episode_end_is_recorded(client, redis_client):
    client.register(info())
    summary = EpisodeSummary(True, 3, 2, 1, False, 1)
    send(client, Chunk("r1", "e9", TASK, steps(1, 3, last_done=True), episode_end=summary))
    stats = redis_client.hgetall(RobotKeys("r1").stats)
    assert int(stats[b"episodes"]) == 1 and int(stats[b"successes"]) == 1 and int(stats[b"steps"]) == 3
    assert len(redis_client.xrange(RobotKeys("r1").events)) == 1


def _status(client, chunk):
    with pytest.raises(grpc.RpcError) as err:
        send(client, chunk)
    return err.value


def test_bad_input_gets_precise_status_and_writes_nothing(client, redis_client):
    client.register(info())
    send(client, Chunk("r1", "e1", TASK, steps(1, 2)))
    before = redis_client.llen(RobotKeys("r1").episode("e1"))

    err = _status(client, Chunk("nobody", "e1", TASK, steps(3, 1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "has not registered" in err.details()

    err = _status(client, Chunk("r1", "e1", TASK, steps(3, 1, obs_dim=7)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "registered float32 [6] takes 24 bytes a step" in err.details()

    bad = steps(3, 2)
    bad[1].observation["state"][0] = np.nan
    err = _status(client, Chunk("r1", "e1", TASK, bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in err.details()

    err = _status(client, Chunk("r1", "e1", TASK, steps(10, 1)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "resend from seq 3" in err.details()
    assert dict(err.trailing_metadata())["fleet-last-acked-seq"] == "2"

    err = _status(client, Chunk("r1", "e1", "juggle", steps(3, 1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not among the tasks" in err.details()

    assert redis_client.llen(RobotKeys("r1").episode("e1")) == before
    assert client.register(info()).last_acked_seq == 2


def test_register_refuses_other_protocol(client):
    with pytest.raises(grpc.RpcError) as err:
        client.register(info(protocol="fleet.v1/1"))  # protocol 1: per-step chunks
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "upgrade" in err.value.details()


def test_an_old_edge_streaming_per_step_chunks_is_told_to_upgrade(client, gateway, redis_client):
    import grpc as _grpc

    from fleet.v1 import fleet_pb2_grpc as pb_grpc

    client.register(info())
    stub = pb_grpc.FleetServiceStub(_grpc.insecure_channel(gateway.target))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamExperience(iter([legacy_chunk_to_pb(Chunk("r1", "e1", TASK, steps(1, 2)), SCHEMA)])))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "upgrade" in err.value.details()
    assert redis_client.get(RobotKeys("r1").seq) is None


def test_a_chunk_naming_another_schema_is_refused(client, redis_client):
    client.register(info())
    other = Schema((FeatureSpec("state", "float64", (3,)),), FeatureSpec("action", "float32", (2,)))
    chunk = Chunk("r1", "e1", TASK, steps(1, 1))
    for s in chunk.steps:
        s.observation["state"] = s.observation["state"][:3].astype(np.float64)  # same 24 bytes, other dtype
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream_experience(iter([chunk_to_pb(chunk, other)])))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "register again" in err.value.details()
    assert redis_client.get(RobotKeys("r1").seq) is None


def test_register_carries_the_control_rate_into_the_registration(client, redis_client):
    import dataclasses
    import json

    from cloud.buffer import ROBOTS_KEY

    client.register(dataclasses.replace(info(), control_hz=20.0))
    assert json.loads(redis_client.hget(ROBOTS_KEY, "r1"))["control_hz"] == 20.0
    client.register(info("r2"))  # a robot that does not say: 0, unknown
    assert json.loads(redis_client.hget(ROBOTS_KEY, "r2"))["control_hz"] == 0.0
    with pytest.raises(grpc.RpcError) as err:
        client.register(dataclasses.replace(info("r3"), control_hz=float("nan")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "control_hz (nan)" in err.value.details()
    assert redis_client.hget(ROBOTS_KEY, "r3") is None


def test_declared_gap_is_accepted_and_counted(client, redis_client):
    client.register(info())
    send(client, Chunk("r1", "e1", TASK, steps(1, 2)))
    acks = send(client, Chunk("r1", "e1", TASK, steps(6, 1), gap_declared=True))
    assert acks[0].acked_seq == 6
    assert int(redis_client.hget(RobotKeys("r1").stats, "dropped_steps")) == 3


def test_episode_ids_and_tasks_are_stored_once_per_episode_not_per_labeled_step(client, redis_client):
    """The issue's amplification: a long task and episode id on 1024 operator-driven steps used to be
    copied into every labeled entry (about 460 bytes each); now each entry is a few bytes."""
    task, episode = "t" * 256, "e" * 200
    client.register(RobotInfo("r1", "test-arm", SCHEMA, (task,), PROTOCOL_VERSION))
    out = steps(1, 1024)
    for s in out:
        s.is_intervention = True
    send(client, Chunk("r1", episode, task, out))
    keys = RobotKeys("r1")
    assert redis_client.lrange(keys.labeled, 0, -1) == [b"0|0|1024"]  # one label run, not 1024 entries
    assert redis_client.lrange(keys.episode_ids, 0, -1) == [f"{episode}|{task}".encode()]
    index_bytes = redis_client.memory_usage(keys.labeled) + redis_client.memory_usage(keys.episode_ids)
    assert index_bytes < 1024, index_bytes  # was ~5x the steps' own bytes; now independent of the step count


def test_task_labels_stay_bounded_however_many_tasks_robots_send(client, redis_client):
    """Five robots with 64 tasks each (the most a robot may register): /metrics keeps at most
    MAX_TASK_LABELS task values; the steps of later tasks are counted under "other", none are lost."""
    from prometheus_client import REGISTRY

    from fleet import metrics

    for r in range(5):
        rid = f"many-{r}"
        tasks = tuple(f"task {r}-{i}" for i in range(64))
        client.register(RobotInfo(rid, "test-arm", SCHEMA, tasks, PROTOCOL_VERSION))
        chunks = []
        for i, task in enumerate(tasks):
            s = steps(i + 1, 1)[0]
            s.index = 0
            chunks.append(Chunk(rid, f"{rid}-e{i}", task, [s]))
        send(client, *chunks)
    samples = [s for family in REGISTRY.collect() if family.name == "fleet_gateway_steps_ingested"
               for s in family.samples if s.name.endswith("_total")]
    values = {s.labels["task"] for s in samples}
    assert len(values - {"other"}) <= metrics.MAX_TASK_LABELS and "other" in values
    ours = sum(s.value for s in samples if s.labels["robot"].startswith("many-"))
    assert ours == 5 * 64


def test_two_gateways_writing_one_episode_in_turn_keep_indexes_and_label_runs_right(redis_proc, redis_client):
    """Each writer sends the element's first_index and the label runs from its own idea of the episode;
    when another replica wrote meanwhile the write is refused inside the transaction and redone."""
    import asyncio

    import redis.asyncio as aioredis

    from cloud.ingest import Ingest

    async def run():
        clients = [aioredis.Redis.from_url(redis_proc.url) for _ in range(2)]
        a, b = (Ingest(c) for c in clients)
        await a.register(info())
        for k, writer in enumerate([a, b, b, a, a, b]):
            result = await writer.write(Chunk("r1", "e1", TASK, steps(1 + 3 * k, 3)))
            assert (result.stored_steps, result.acked_seq) == (3, 3 * k + 3)
        await b.write(Chunk("r1", "e2", TASK, steps(19, 2)))
        await a.write(Chunk("r1", "e2", TASK, steps(21, 2)))
        for c in clients:
            await c.aclose()

    asyncio.run(run())
    reader = BufferReader(redis_client)
    assert [(s.seq, s.index) for s in reader.steps("r1", "e1", SCHEMA)] == [(i, i - 1) for i in range(1, 19)]
    assert [(s.seq, s.index) for s in reader.steps("r1", "e2", SCHEMA)] == [(i, i - 19) for i in range(19, 23)]
    from cloud.buffer.reader import parse_label_runs

    runs = [(number, start, end) for raw in redis_client.lrange(RobotKeys("r1").labeled, 0, -1)
            for number, pairs in [parse_label_runs(raw)] for start, end in pairs]
    e1 = [(start, end) for number, start, end in runs if number == 0]
    assert e1 == [(i, i + 1) for k in range(6) for i in (3 * k, 3 * k + 2)]  # steps 0 and 2 of every chunk
    assert sorted(start for number, start, _ in runs if number == 1) == [0, 2]
    assert redis_client.lrange(RobotKeys("r1").episode_ids, 0, -1) == [f"e1|{TASK}".encode(), f"e2|{TASK}".encode()]
    assert redis_client.llen(RobotKeys("r1").episode("e1")) == 6  # nothing left over from a refused try


def test_ingested_bytes_are_each_messages_wire_size(client):
    """The gateway counts (and holds in flight, and rate-limits) each message by the size it arrived with,
    read from the wire as it is parsed, not recomputed: messages of different sizes on one stream each count
    their own."""
    from prometheus_client import REGISTRY

    def ingested():
        return REGISTRY.get_sample_value("fleet_gateway_bytes_ingested_total", {"robot": "r1", "task": TASK}) or 0.0

    client.register(info())
    chunks = [Chunk("r1", "e1", TASK, steps(1, 3)), Chunk("r1", "e1", TASK, steps(4, 40)),
              Chunk("r1", "e1", TASK, steps(44, 1))]
    before = ingested()
    assert [a.acked_seq for a in send(client, *chunks)] == [3, 43, 44]
    assert ingested() - before == sum(chunk_to_pb(c, SCHEMA).ByteSize() for c in chunks)


def test_a_messages_chunks_are_stored_in_one_transaction_and_a_refused_one_stops_the_batch(redis_proc, redis_client):
    """Ingest.store_many writes a message's chunks in one MULTI/EXEC; a chunk after the first is stored only if
    the one before it was. Here the first is refused (another replica wrote its episode meanwhile), so the
    others must not be stored in that transaction: the second declares a spool gap, and stored right after
    the refused chunk it would have declared that chunk's steps dropped too (and the refused chunk, resent,
    would count as a duplicate: lost). They go one by one instead, exactly once."""
    import asyncio

    import redis.asyncio as aioredis

    from cloud.ingest import Ingest
    from fleet.columns import from_chunk

    def execs():
        return redis_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)

    batch = [Chunk("r1", "e1", TASK, steps(7, 3)), Chunk("r1", "e1", TASK, steps(12, 2), gap_declared=True),
             Chunk("r1", "e2", TASK, steps(14, 2))]

    async def run():
        clients = [aioredis.Redis.from_url(redis_proc.url) for _ in range(2)]
        a, b = (Ingest(c) for c in clients)
        await a.register(info())
        await a.write(Chunk("r1", "e1", TASK, steps(1, 3)))
        await b.write(Chunk("r1", "e1", TASK, steps(4, 3)))  # a's idea of e1 is stale now
        results, error = await a.store_many([(from_chunk(c, SCHEMA), info()) for c in batch])
        assert error is None
        assert [(r.stored_steps, r.acked_seq) for r in results] == [(3, 9), (2, 13), (2, 15)]
        again, error = await a.store_many([(from_chunk(c, SCHEMA), info()) for c in batch])  # a resend
        assert error is None
        assert [(r.stored_steps, r.duplicate_steps, r.acked_seq) for r in again] == [(0, 3, 15), (0, 2, 15),
                                                                                      (0, 2, 15)]
        before = execs()
        fresh = [Chunk("r1", "e3", TASK, steps(16, 3)), Chunk("r1", "e3", TASK, steps(19, 3)),
                 Chunk("r1", "e4", TASK, steps(22, 2))]
        results, error = await a.store_many([(from_chunk(c, SCHEMA), info()) for c in fresh])
        assert error is None and [r.acked_seq for r in results] == [18, 21, 23]
        assert execs() - before == 1  # all three in one transaction
        for c in clients:
            await c.aclose()

    asyncio.run(run())
    reader = BufferReader(redis_client)
    e1 = [*range(1, 10), 12, 13]
    assert [(s.seq, s.index) for s in reader.steps("r1", "e1", SCHEMA)] == [(seq, i) for i, seq in enumerate(e1)]
    assert [(s.seq, s.index) for s in reader.steps("r1", "e2", SCHEMA)] == [(14, 0), (15, 1)]
    assert [(s.seq, s.index) for s in reader.steps("r1", "e3", SCHEMA)] == [(i, i - 16) for i in range(16, 22)]
    assert int(redis_client.hget(RobotKeys("r1").stats, "dropped_steps")) == 2  # seqs 10 and 11, nothing more
    assert redis_client.llen(RobotKeys("r1").episode("e1")) == 4  # nothing left over from the refused try
    assert redis_client.lrange(RobotKeys("r1").episode_ids, 0, -1) == [
        f"e{i}|{TASK}".encode() for i in range(1, 5)]
