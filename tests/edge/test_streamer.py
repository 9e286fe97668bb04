"""The streamer's error policy against a real gateway and redis-server: poisoned steps are
quarantined (not resent forever), NOT_FOUND re-registers, a gap resumes after the
trailing-metadata seq, RESOURCE_EXHAUSTED honours the retry hint, oversize chunks shrink."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.buffer import RobotKeys
from cloud.buffer.reader import BufferReader
from edge.client import FleetClient
from edge.spool import Spool
from edge.streamer import Backoff, Streamer
from fleet import PROTOCOL_VERSION
from fleet.columns import schema_hash
from fleet.convert import chunk_to_pb, columns_message, encode_summary
from fleet.rows import RowLayout
from fleet.types import EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step
from fleet.v1 import fleet_pb2 as pb

TASK = "reach the goal"
pytestmark = pytest.mark.timeout(60)


def schema(dim: int = 6) -> Schema:
    return Schema((FeatureSpec("state", "float32", (dim,)),), FeatureSpec("action", "float32", (2,)))


def make_step(i: int, dim: int = 6, value: float | None = None) -> Step:
    return Step(seq=0, index=i, observation={"state": np.full(dim, i if value is None else value, np.float32)},
                policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=i % 3 == 0,
                reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0)


class Edge:
    """A Spool + Streamer + FleetClient for one robot (what EdgeAgent wires, without the robot)."""

    def __init__(self, tmp_path, target: str, robot_id: str = "r1", dim: int = 6, **streamer_kwargs):
        self.schema = schema(dim)
        self.dim = dim
        self.info = RobotInfo(robot_id, "test-arm", self.schema, (TASK,), PROTOCOL_VERSION)
        self.spool = Spool(tmp_path / f"{robot_id}.db", self.schema)
        self.client = FleetClient(target, rpc_timeout_s=5.0)
        streamer_kwargs.setdefault("flush_interval_s", 0.01)
        streamer_kwargs.setdefault("backoff", Backoff(base_s=0.05, max_s=0.5, seed=0))
        self.streamer = Streamer(self.info, self.spool, self.client, **streamer_kwargs)
        self.recorded: list[int] = []

    def record(self, n: int, episode: str = "e1", value: float | None = None, end: bool = False,
               noise: bool = False) -> list[int]:
        seqs = []
        rng = np.random.default_rng(len(self.recorded))
        for i in range(n):
            summary = EpisodeSummary(False, n, 0, 0, False, 1) if end and i == n - 1 else None
            st = make_step(len(self.recorded), self.dim, value)
            if noise:
                st.observation["state"] = rng.normal(size=self.dim).astype(np.float32)
            st.done = summary is not None
            seqs.append(self.spool.record(episode, TASK, False, st, summary))
        self.recorded += seqs
        return seqs

    def close(self) -> None:
        self.streamer.stop()
        self.client.close()
        self.spool.close()


@pytest.fixture
def make_edge(tmp_path, gateway):
    edges = []

    def make(**kwargs) -> Edge:
        edge = Edge(tmp_path, gateway.target, **kwargs)
        edges.append(edge)
        return edge

    yield make
    for edge in edges:
        edge.close()


def stored_seqs(redis_client, robot_id: str) -> list[int]:
    reader = BufferReader(redis_client)
    out = []
    for info in reader.episodes([robot_id]):
        out += [s.seq for s in reader.steps(robot_id, info.episode_id, reader.schema(robot_id))]
    return sorted(out)


def test_poisoned_step_is_quarantined_and_everything_else_delivered(make_edge, redis_client):
    edge = make_edge()
    edge.record(5)
    bad = edge.record(1, value=float("nan"))[0]  # the robot recorded NaN where its schema forbids it
    edge.record(5)
    edge.streamer.start()
    assert edge.streamer.wait_acked(edge.recorded[-1], timeout_s=20)
    assert stored_seqs(redis_client, "r1") == [s for s in edge.recorded if s != bad]
    held = edge.spool.quarantined()
    assert [q.seq for q in held] == [bad] and held[0].code == "INVALID_ARGUMENT" and "NaN" in held[0].reason
    assert int(redis_client.hget(RobotKeys("r1").stats, "dropped_steps")) == 1  # the declared gap
    assert edge.spool.backlog() == (0, 0)


def test_chunk_level_rejection_quarantines_the_whole_chunk(make_edge, redis_client):
    edge = make_edge()
    edge.record(3)
    for i in range(4):  # a task the robot never registered: every step of the chunk is to blame
        edge.spool.record("e2", "juggle", False, make_step(10 + i), None)
    edge.record(3, episode="e3")
    last = edge.spool.assigned_seq()
    edge.streamer.start()
    assert edge.streamer.wait_acked(last, timeout_s=20)
    assert [q.seq for q in edge.spool.quarantined()] == [4, 5, 6, 7]
    assert stored_seqs(redis_client, "r1") == [1, 2, 3, 8, 9, 10]


def test_a_backlog_of_short_episodes_goes_several_chunks_a_message_and_a_bad_one_is_told_apart(make_edge,
                                                                                             redis_client):
    """Whole chunks of a backlog share a message (ColumnChunk.more); the gateway acks the chunks it stored
    before a refused one, so only the refused chunk is quarantined."""
    edge = make_edge(chunks_per_message=4)
    messages = []
    requests = edge.streamer._requests

    def counted(start, session):
        for wire in requests(start, session):  # the message's protobuf bytes, as the streamer wrote them
            msg = pb.ColumnChunk.FromString(wire)
            messages.append([msg.first_seq] + [m.first_seq for m in msg.more])
            yield wire

    edge.streamer._requests = counted
    for k in range(6):
        if k == 2:  # a task the robot never registered: the whole chunk is to blame
            for i in range(3):
                edge.spool.record("bad", "juggle", False, make_step(i), None if i < 2 else
                                  EpisodeSummary(False, 3, 0, 0, False, 1))
        else:
            edge.record(3, episode=f"e{k}", end=True)
    last = edge.spool.assigned_seq()
    edge.streamer.start()
    assert edge.streamer.wait_acked(last, timeout_s=20)
    assert [q.seq for q in edge.spool.quarantined()] == [7, 8, 9]
    assert stored_seqs(redis_client, "r1") == [s for s in range(1, 19) if s not in (7, 8, 9)]
    assert messages[0] == [1, 4, 7, 10]  # one message, four chunks; after the refusal the rest is resent
    assert edge.spool.backlog() == (0, 0)


def test_not_found_after_redis_wipe_registers_again(make_edge, redis_client):
    edge = make_edge()
    edge.record(4)
    edge.streamer.start()
    assert edge.streamer.wait_acked(4, timeout_s=20)
    sessions = edge.streamer.sessions
    redis_client.flushall()  # the cloud lost everything, including the robot's registration
    edge.record(3, episode="e2")
    assert edge.streamer.wait_acked(7, timeout_s=20)
    assert redis_client.hexists("fleet:robots", "r1"), "the robot did not register again"
    assert stored_seqs(redis_client, "r1") == [5, 6, 7]
    assert edge.streamer.sessions > sessions and edge.spool.quarantined() == []


def test_gap_resumes_after_the_trailing_metadata_seq(make_edge, redis_client):
    edge = make_edge()
    edge.record(10)
    edge.streamer.start()
    assert edge.streamer.wait_acked(10, timeout_s=20)
    redis_client.set(RobotKeys("r1").seq, 6)  # Redis lost acked steps 7..10 (e.g. a power loss with everysec)
    edge.record(3, episode="e2")
    assert edge.streamer.wait_acked(13, timeout_s=20)
    assert int(redis_client.get(RobotKeys("r1").seq)) == 13
    assert int(redis_client.hget(RobotKeys("r1").stats, "dropped_steps")) == 4


@pytest.fixture
def full_redis_gateway(redis_proc, tmp_path):
    from fleet.gateway_config import GatewayConfig
    from tests.conftest import GatewayThread

    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies"), redis_full_retry_after_s=0.4))
    yield gw
    gw.stop()


def test_redis_at_maxmemory_slows_the_robot_down_and_loses_nothing(full_redis_gateway, redis_client, tmp_path):
    edge = Edge(tmp_path, full_redis_gateway.target, dim=2000)
    try:
        edge.record(20)
        edge.streamer.start()
        assert edge.streamer.wait_acked(20, timeout_s=20)
        used = int(redis_client.info("memory")["used_memory"])
        redis_client.config_set("maxmemory-policy", "noeviction")
        redis_client.config_set("maxmemory", used + 50_000)
        edge.record(200, episode="e2", noise=True)  # ~1.6 MB that does not compress: far more than fits
        assert not edge.streamer.wait_acked(220, timeout_s=2.0)
        sessions = edge.streamer.sessions
        assert sessions <= 2 + 2.0 / 0.4, f"{sessions} sessions in 2s: the retry hint was not honoured"
        redis_client.config_set("maxmemory", 0)
        assert edge.streamer.wait_acked(220, timeout_s=20)
        assert stored_seqs(redis_client, "r1") == list(range(1, 221))
    finally:
        edge.close()


def test_oversize_chunks_shrink_and_a_step_too_large_is_quarantined(redis_proc, redis_client, tmp_path):
    from fleet.gateway_config import GatewayConfig
    from tests.conftest import GatewayThread

    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies"), max_message_bytes=1 << 20))
    fits = Edge(tmp_path, gw.target, robot_id="fits", dim=100_000)  # 400 KB steps: two per message at most
    huge = Edge(tmp_path, gw.target, robot_id="huge", dim=300_000)  # 1.2 MB steps: never fit
    try:
        fits.record(6, end=True)
        huge.record(2)
        fits.streamer.start()
        huge.streamer.start()
        assert fits.streamer.wait_acked(6, timeout_s=30)
        assert stored_seqs(redis_client, "fits") == list(range(1, 7))
        with huge.spool.changed:
            assert huge.spool.changed.wait_for(lambda: huge.spool.backlog()[0] == 0, timeout=20)
        held = huge.spool.quarantined()
        assert [q.seq for q in held] == [1, 2] and all(q.code == "RESOURCE_EXHAUSTED" for q in held)
        assert "larger than max" in held[0].reason
    finally:
        fits.close()
        huge.close()
        gw.stop()


@pytest.mark.parametrize("with_end", [False, True])
def test_spooled_steps_become_the_columnar_chunk(with_end):
    """The streamer joins spooled step records into columns: the same message as stacking the steps."""
    from fleet.types import Chunk

    sch = schema(300)
    steps = [make_step(i, dim=300) for i in range(3)]
    for i, st in enumerate(steps):
        st.seq, st.reward, st.timestamp_s, st.done = 5 + i, 0.5 * i, 100.0 + i, with_end and i == 2
    summary = EpisodeSummary(True, 3, 1, 1, False, 2) if with_end else None
    layout = RowLayout(sch)
    rows = [layout.encode(st) for st in steps]
    msg = columns_message("r1", "e1", TASK, layout, schema_hash(sch), rows, 5, True, True,
                          encode_summary(summary) if summary else None)
    expected = chunk_to_pb(Chunk("r1", "e1", TASK, steps, gap_declared=True, episode_end=summary, evaluation=True), sch)
    assert msg == expected and msg.n == 3 and msg.first_seq == 5


def test_the_wire_bytes_parse_as_the_chunks_stacked_from_their_steps_cameras_and_more_included():
    """The streamer writes a message's protobuf bytes itself (fleet.convert.columns_wire): parsed, they are the
    message built from the steps, for a schema with a camera and help scores, with further chunks in ``more``."""
    from fleet.codec import encode_image
    from fleet.convert import columns_wire, message_wire
    from fleet.types import Chunk

    sch = Schema((FeatureSpec("state", "float32", (5,)), FeatureSpec("cam", "uint8", (4, 4, 3), is_image=True)),
                 FeatureSpec("action", "float32", (2,)))
    layout, digest = RowLayout(sch), schema_hash(sch)
    chunks, wire = [], []
    for c, (n, end) in enumerate([(3, True), (1, False), (4, True)]):
        steps = [make_step(i, dim=5) for i in range(n)]
        for i, st in enumerate(steps):
            st.seq, st.done, st.help_score = 10 * c + 1 + i, end and i == n - 1, 0.25 * (i % 4)
            st.images = {"cam": encode_image(np.full((4, 4, 3), 40 * i + c, np.uint8), "png")}
        summary = EpisodeSummary(c == 0, n, 1, 1, c == 2, 3) if end else None
        chunk = Chunk("robot-é", f"e{c}", TASK, steps, gap_declared=c == 1, episode_end=summary, evaluation=c == 2)
        chunks.append(chunk_to_pb(chunk, sch))
        wire.append(columns_wire("robot-é", f"e{c}", TASK, layout, digest, [layout.encode(st) for st in steps],
                                 steps[0].seq, c == 2, c == 1, encode_summary(summary) if summary else None))
    for chunk in chunks:
        chunk.schema_hash = digest
    expected = pb.ColumnChunk()
    expected.CopyFrom(chunks[0])
    expected.more.extend(chunks[1:])
    got = pb.ColumnChunk.FromString(message_wire(wire))
    assert got == expected and len(got.more) == 2 and got.HasField("episode_end") and not got.more[0].HasField(
        "episode_end") and got.more[1].episode_end.evaluation and len(got.cameras["cam"].frames) == 3 and got.help
    assert pb.ColumnChunk.FromString(message_wire(wire[1:2])) == chunks[1]


def test_rows_spooled_under_another_schema_are_quarantined_not_sent(make_edge, redis_client, tmp_path):
    old = Spool(tmp_path / "r1.db", schema(4))  # the robot's schema changed with steps still spooled
    for i in range(2):
        old.record("e0", TASK, False, make_step(i, dim=4), None)
    old.close()
    from fleet import metrics

    counted = metrics.EDGE_SPOOL_QUARANTINED.labels(robot="r1")
    before = counted._value.get()
    edge = make_edge()
    edge.record(3)
    bad = make_step(99)
    bad.observation = {}  # and one recorded now without its feature: quarantined when recorded
    edge.spool.record("e1", TASK, False, bad, None)
    edge.record(1)
    edge.streamer.start()
    assert edge.streamer.wait_acked(7, timeout_s=20)
    held = edge.spool.quarantined()
    assert [(q.seq, q.code) for q in held] == [(1, "SCHEMA_MISMATCH"), (2, "SCHEMA_MISMATCH"), (6, "SCHEMA_MISMATCH")]
    assert stored_seqs(redis_client, "r1") == [3, 4, 5, 7]
    assert counted._value.get() - before == 3


def test_a_restarted_gateway_is_streamed_to_at_once_not_after_the_backoff(redis_proc, redis_client, tmp_path):
    """The gateway dies and comes back on its port: the streamer waits on the channel, not on its backoff."""
    import random
    import threading

    from fleet.gateway_config import GatewayConfig
    from fleet.redis_server import free_port
    from tests.conftest import GatewayThread

    seed = next(s for s in range(100) if random.Random(s).uniform(0, 600) > 300)  # first backoff draw > 300 s
    cfg = GatewayConfig(listen=f"127.0.0.1:{free_port()}", redis_url=redis_proc.url,
                        policy_dir=str(tmp_path / "policies"))
    gw = GatewayThread(cfg)
    edge = Edge(tmp_path, gw.target, backoff=Backoff(base_s=600.0, max_s=600.0, seed=seed))
    try:
        edge.streamer.start()
        edge.record(5)
        assert edge.streamer.wait_acked(edge.recorded[-1], 30)
        gw.stop()
        edge.record(5)
        assert not edge.client.wait_connected(0.5, threading.Event()), "the gateway is down"
        gw = GatewayThread(cfg)
        assert edge.streamer.wait_acked(edge.recorded[-1], 30), "not streamed to the restarted gateway"
        assert stored_seqs(redis_client, "r1") == edge.recorded
        assert edge.client.wait_connected(5, threading.Event()) is None, "connected already: None, not True"
    finally:
        edge.close()
        gw.stop()


def test_wait_connected_returns_once_a_server_listens(tmp_path):
    import threading

    from fleet.redis_server import free_port
    from tests.conftest import serve_watch_policy

    port = free_port()
    client = FleetClient(f"127.0.0.1:{port}")
    stop = threading.Event()
    try:
        assert client.wait_connected(0.3, stop) is False
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(client.wait_connected(30, stop)))
        waiter.start()
        server, _ = serve_watch_policy(lambda request, context: iter(()), port=port)
        waiter.join(35)
        assert got == [True]
        server.stop(0)
        stop.set()
        assert client.wait_connected(30, stop) is False, "a set stop event ends the wait"
    finally:
        client.close()
