"""Every kind of bad input gets a precise gRPC status naming the problem, and leaves Redis exactly
as it was (a DUMP of every key of the robot before and after); other robots' streams carry on.
Also the gateway's backpressure: in-flight bounds, stream cap and a Redis at maxmemory answer
RESOURCE_EXHAUSTED with a retry hint, and acked data stays."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from cloud.buffer import ROBOTS_KEY, RobotKeys
from cloud.buffer.reader import BufferReader
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.gateway_config import GatewayConfig
from fleet.convert import chunk_to_pb
from fleet.types import Chunk, EncodedImage, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step
from fleet.v1 import fleet_pb2 as pb
from tests.conftest import GatewayThread

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (6,)), FeatureSpec("cam", "uint8", (16, 16, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
IMAGE = encode_image(np.full((16, 16, 3), 7, np.uint8), "jpeg")
pytestmark = pytest.mark.timeout(60)


def steps(first_seq: int, n: int, dim: int = 6, dtype=np.float32, image: EncodedImage = IMAGE) -> list[Step]:
    return [Step(seq=first_seq + i, index=first_seq + i - 1, observation={"state": np.full(dim, i, dtype)},
                 policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=False,
                 reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0, images={"cam": image})
            for i in range(n)]


def chunk(first_seq: int, n: int = 2, robot: str = "r1", schema: Schema | None = None, **kwargs) -> pb.ColumnChunk:
    """A columnar chunk; its schema hash is that of ``schema``, or of the schema its steps imply."""
    return chunk_to_pb(Chunk(robot, "e1", TASK, steps(first_seq, n, **kwargs)), schema)


def snapshot(redis_client, robot_id: str) -> dict[bytes, bytes]:
    """Every key of the robot, DUMPed (type, value and encoding), plus its registration."""
    keys = sorted(redis_client.scan_iter(match=f"{RobotKeys(robot_id).prefix}:*"))
    dump = {k: redis_client.dump(k) for k in keys if not k.endswith(b":status")}
    dump[b"registration"] = redis_client.hget(ROBOTS_KEY, robot_id)
    return dump


def refused(call_fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call_fn()
    return err.value


@pytest.fixture
def gw(redis_proc, tmp_path):
    gateway = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                          policy_dir=str(tmp_path / "policies"), max_message_bytes=1 << 20,
                                          robot_max_inflight_bytes=1 << 20, max_inflight_bytes=2 << 20,
                                          max_experience_streams=8, inflight_wait_s=0.3, retry_after_s=0.7,
                                          redis_full_retry_after_s=3.0))
    yield gateway
    gateway.stop()


@pytest.fixture
def client(gw):
    c = FleetClient(gw.target, rpc_timeout_s=5.0)
    for rid in ("r1", "r2"):
        c.register(RobotInfo(rid, "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION))
    yield c
    c.close()


def send(client: FleetClient, *chunks: pb.Chunk) -> list[tuple[int, int]]:
    return [(a.acked_seq, a.duplicate_steps) for a in client.stream_experience(iter(chunks))]


def _with_bad_image(data: bytes, encoding: str = "jpeg") -> pb.ColumnChunk:
    return chunk(3, image=EncodedImage(encoding, 16, 16, 3, data))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose header (IHDR, CRC fixed up) claims another size: a decompression bomb's shape."""
    data = bytearray(encode_image(np.zeros((16, 16, 3), np.uint8), "png").data)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_of_many_chunks(n: int) -> bytes:
    """A valid 16x16 PNG with ``n`` empty ancillary chunks (correct CRCs) after its header."""
    data = encode_image(np.zeros((16, 16, 3), np.uint8), "png").data
    return data[:33] + _png_chunk(b"zzZz", b"") * n + data[33:]


def _png_with_non_zlib_data() -> bytes:
    """A 16x16 PNG whose chunks and CRCs are valid but whose IDAT is not a zlib stream."""
    data = encode_image(np.zeros((16, 16, 3), np.uint8), "png").data
    return data[:33] + _png_chunk(b"IDAT", b"\xff" * 40) + _png_chunk(b"IEND", b"")


def _with_bad_column() -> pb.ColumnChunk:
    msg = chunk(3)
    msg.observation["state"] = msg.observation["state"][:-4]
    return msg


def _with(**fields) -> pb.ColumnChunk:
    msg = chunk(3)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def _missing_frame() -> pb.ColumnChunk:
    msg = chunk(3)
    del msg.cameras["cam"].frames[-1]
    return msg


def _done_early() -> pb.ColumnChunk:
    out = steps(3, 2)
    out[0].done = True
    return chunk_to_pb(Chunk("r1", "e1", TASK, out))


def _nonfinite(where: str, value: float) -> pb.ColumnChunk:
    out = steps(3, 2)
    if where == "obs":
        out[1].observation["state"][0] = value
    elif where == "action":
        out[1].action[1] = value
    else:
        out[1].reward = value
    return chunk_to_pb(Chunk("r1", "e1", TASK, out))


def _named(episode: str = "e1", task: str = TASK) -> pb.ColumnChunk:
    return chunk_to_pb(Chunk("r1", episode, task, steps(3, 1)))


BAD_CHUNKS = {
    # name: (message, code, words in the details, the step named in fleet-bad-step-seq)
    "unknown robot": (lambda: chunk(3, robot="nobody"), grpc.StatusCode.NOT_FOUND, "'nobody' has not registered",
                      None),
    "another schema (dtype)": (lambda: chunk(3, dtype=np.float64), grpc.StatusCode.FAILED_PRECONDITION,
                               "register again with the schema it records", None),
    "shape": (lambda: chunk(3, dim=7, schema=SCHEMA), grpc.StatusCode.INVALID_ARGUMENT,
              "observation 'state': 56 bytes for 2 steps; registered float32 [6] takes 24 bytes a step", None),
    "NaN observation": (lambda: _nonfinite("obs", np.nan), grpc.StatusCode.INVALID_ARGUMENT,
                        "observation 'state' contains NaN or Inf", 4),
    "Inf action": (lambda: _nonfinite("action", np.inf), grpc.StatusCode.INVALID_ARGUMENT,
                   "action contains NaN or Inf", 4),
    "NaN reward": (lambda: _nonfinite("reward", np.nan), grpc.StatusCode.INVALID_ARGUMENT,
                   "reward contains NaN or Inf", 4),
    "truncated image": (lambda: _with_bad_image(IMAGE.data[:-40]), grpc.StatusCode.INVALID_ARGUMENT,
                        "image 'cam': the jpeg is truncated", 3),
    "jpeg without its header": (lambda: _with_bad_image(IMAGE.data[:2] + b"\x00" * 40), grpc.StatusCode.INVALID_ARGUMENT,
                                "image 'cam': cannot read the jpeg bytes", 3),
    "jpeg without its end": (lambda: _with_bad_image(IMAGE.data[:-2]), grpc.StatusCode.INVALID_ARGUMENT,
                             "the jpeg is truncated", 3),
    "image not what it says": (lambda: _with_bad_image(encode_image(np.zeros((16, 16, 3), np.uint8), "png").data),
                               grpc.StatusCode.INVALID_ARGUMENT, "declared jpeg but the bytes are png", 3),
    "image larger than declared": (lambda: _with_bad_image(encode_image(np.zeros((64, 64, 3), np.uint8), "jpeg").data),
                                   grpc.StatusCode.INVALID_ARGUMENT, "the bytes hold a 64x64 image, declared 16x16", 3),
    "decompression bomb": (lambda: _with_bad_image(_png_claiming(100_000, 100_000), "png"),
                           grpc.StatusCode.INVALID_ARGUMENT, "cannot read the png bytes", 3),
    "png of 5000 empty chunks": (lambda: _with_bad_image(_png_of_many_chunks(5000), "png"),
                                 grpc.StatusCode.INVALID_ARGUMENT, "the png has more than 4096 chunks", 3),
    "png whose data is not zlib": (lambda: _with_bad_image(_png_with_non_zlib_data(), "png"),
                                   grpc.StatusCode.INVALID_ARGUMENT, "the png's image data is not a zlib stream", 3),
    "truncated column": (_with_bad_column, grpc.StatusCode.INVALID_ARGUMENT,
                         "observation 'state': 44 bytes for 2 steps", None),
    "short reward column": (lambda: _with(reward=b"\x00" * 4), grpc.StatusCode.INVALID_ARGUMENT,
                            "reward: 4 bytes for 2 steps", None),
    "flags of the wrong length": (lambda: _with(flags=b"\x00"), grpc.StatusCode.INVALID_ARGUMENT,
                                  "flags: 1 bytes for 2 steps", None),
    "a frame missing": (_missing_frame, grpc.StatusCode.INVALID_ARGUMENT, "camera 'cam' carries 1 frames for 2 steps",
                        None),
    "done before the chunk's end": (_done_early, grpc.StatusCode.INVALID_ARGUMENT,
                                    "step seq=3 is done but is not the chunk's last step", 3),
    "seq gap": (lambda: chunk(10), grpc.StatusCode.FAILED_PRECONDITION, "resend from seq 3", None),
    "seq 0": (lambda: chunk(0), grpc.StatusCode.INVALID_ARGUMENT, "step sequence numbers start at 1", None),
    "unregistered task": (lambda: chunk_to_pb(Chunk("r1", "e1", "juggle", steps(3, 1))),
                          grpc.StatusCode.INVALID_ARGUMENT, "'juggle' is not among the tasks", None),
    "episode id with '|'": (lambda: _named(episode="e|x|1"), grpc.StatusCode.INVALID_ARGUMENT,
                            "episode_id 'e|x|1' must be ASCII letters", None),
    "episode id with a newline": (lambda: _named(episode="e1\nrobot r2 ok"), grpc.StatusCode.INVALID_ARGUMENT,
                                  "episode_id 'e1\\nrobot r2 ok' must be ASCII letters", None),
    "empty episode id": (lambda: _named(episode=""), grpc.StatusCode.INVALID_ARGUMENT, "episode_id is empty", None),
    "episode id too long": (lambda: _named(episode="e" * 201), grpc.StatusCode.INVALID_ARGUMENT,
                            "episode_id has 201 characters; at most 200", None),
    "200 kB task": (lambda: _named(task="x" * 200_000), grpc.StatusCode.INVALID_ARGUMENT,
                    "... (200000 characters) is not among the tasks robot 'r1' registered", None),
    "no steps": (lambda: _with(n=0), grpc.StatusCode.INVALID_ARGUMENT, "n=0; a chunk holds 1 to 1024 steps", None),
    "a million steps claimed": (lambda: _with(n=1_000_000), grpc.StatusCode.INVALID_ARGUMENT,
                                "a chunk holds 1 to 1024 steps", None),
}


def test_each_bad_chunk_gets_its_status_and_leaves_redis_unchanged(client, redis_client):
    assert send(client, chunk(1)) == [(2, 0)]
    for name, (make, code, words, bad_seq) in BAD_CHUNKS.items():
        before = snapshot(redis_client, "r1")
        err = refused(lambda make=make: send(client, make()))
        assert err.code() == code, (name, err.code(), err.details())
        assert words in err.details(), (name, err.details())
        md = dict(err.trailing_metadata() or ())
        assert md.get("fleet-bad-step-seq") == (str(bad_seq) if bad_seq else None), (name, md)
        if name == "seq gap":
            assert md["fleet-last-acked-seq"] == "2"
        assert snapshot(redis_client, "r1") == before, f"{name}: Redis changed"
    assert list(redis_client.scan_iter(match=f"{RobotKeys('nobody').prefix}:*")) == []


def test_oversize_message_is_resource_exhausted(client, redis_client):
    big = Schema((FeatureSpec("state", "float32", (100_000,)), SCHEMA.observation[1]), SCHEMA.action)
    client.register(RobotInfo("big", "test-arm", big, (TASK,), PROTOCOL_VERSION))
    assert send(client, chunk(1, n=2, dim=100_000, robot="big")) == [(2, 0)]  # 800 KB: fits in 1 MiB
    before = snapshot(redis_client, "big")
    err = refused(lambda: send(client, chunk(3, n=3, dim=100_000, robot="big")))  # 1.2 MB
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details() and "1048576" in err.details()
    assert snapshot(redis_client, "big") == before


def test_a_replayed_chunk_is_acked_without_writing_anything(client, redis_client):
    assert send(client, chunk(1, n=4)) == [(4, 0)]
    before = snapshot(redis_client, "r1")
    assert send(client, chunk(1, n=4), chunk(2, n=2)) == [(4, 4), (4, 2)]
    assert snapshot(redis_client, "r1") == before


def test_malformed_protobuf_is_invalid_argument_on_every_method(gw, client, redis_client):
    send(client, chunk(1))
    before = snapshot(redis_client, "r1")
    channel = grpc.insecure_channel(gw.target)
    try:
        stream = channel.stream_stream("/fleet.v1.FleetService/StreamColumns")  # bytes in, bytes out
        good = chunk(3).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([good, b"\xff\xff\xff\xff garbage"]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "StreamColumns: request is not a valid protobuf message (12 bytes)" in err.value.details()
        for method in ("Register", "Heartbeat"):
            unary = channel.unary_unary(f"/fleet.v1.FleetService/{method}")
            with pytest.raises(grpc.RpcError) as err:
                unary(b"\x0a\xff\xff", timeout=10)  # a length that runs past the end
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"{method}: request is not a valid protobuf message" in err.value.details()
    finally:
        channel.close()
    after = snapshot(redis_client, "r1")
    assert int(redis_client.get(RobotKeys("r1").seq)) == 4  # the good chunk before the garbage was acked
    assert after != before and BufferReader(redis_client).episode_length("r1", "e1") == 4


def test_bad_robot_does_not_disturb_another_robots_stream(client, redis_client):
    """r2 streams chunk after chunk on one stream while r1's bad chunks are refused on theirs."""
    acks: list[tuple[int, int]] = []
    go = threading.Event()

    def r2_chunks():
        for i in range(10):
            yield chunk(1 + 2 * i, robot="r2")
            if i == 0:
                go.set()

    def r2_stream():
        acks.extend(send(client, *r2_chunks()))

    t = threading.Thread(target=r2_stream)
    t.start()
    assert go.wait(10)
    for make, *_ in list(BAD_CHUNKS.values())[:6]:
        refused(lambda make=make: send(client, make()))
    t.join(20)
    assert [a for a, _ in acks] == list(range(2, 21, 2))


def test_two_robots_on_one_stream_is_refused(client, redis_client):
    before = snapshot(redis_client, "r2")
    err = refused(lambda: send(client, chunk(1), chunk(1, robot="r2")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "one stream carries one robot" in err.details()
    assert snapshot(redis_client, "r2") == before


# --- backpressure -------------------------------------------------------------------------


def _pause_writes(redis_client, seconds: float) -> None:
    redis_client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "WRITE")


def _inflight_bytes() -> float:
    return REGISTRY.get_sample_value("fleet_gateway_inflight_bytes") or 0.0


def _idle_after(first: pb.ColumnChunk, gate: threading.Event):
    yield first
    gate.wait()


def test_inflight_bound_per_robot_slows_then_refuses_with_retry_hint(client, redis_client):
    """A robot with a stream stuck on a slow Redis, reconnecting: its second stream's chunk waits for room,
    then gets RESOURCE_EXHAUSTED + fleet-retry-after-s; the first chunk is acked once Redis is back."""
    big = Schema((FeatureSpec("state", "float32", (2200,)), SCHEMA.observation[1]), SCHEMA.action)
    client.register(RobotInfo("r3", "test-arm", big, (TASK,), PROTOCOL_VERSION))
    send(client, chunk(1, dim=2200, robot="r3"))
    first: list = []
    _pause_writes(redis_client, 1.5)
    # ~0.56 MB each: two exceed the robot's 1 MiB in-flight bound.
    t = threading.Thread(target=lambda: first.extend(send(client, chunk(3, n=60, dim=2200, robot="r3"))))
    t.start()
    deadline = time.monotonic() + 10
    while _inflight_bytes() < 500_000:  # the first chunk is held at the gateway, its write paused
        assert time.monotonic() < deadline, "the first chunk never reached the gateway"
        time.sleep(0.01)
    t0 = time.monotonic()
    err = refused(lambda: send(client, chunk(3, n=60, dim=2200, robot="r3")))
    assert time.monotonic() - t0 >= 0.3, "refused without first holding the sender for inflight_wait_s"
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "in flight for robot 'r3' (limit 1048576)" in err.details()
    assert dict(err.trailing_metadata())["fleet-retry-after-s"] == "0.700"
    t.join(20)
    assert first == [(62, 0)]


def test_stream_cap_refuses_more_streams(gw, client, redis_client):
    calls, gates = [], []
    try:
        for _ in range(8):  # eight open streams, each with one chunk acked and then idle
            gate = threading.Event()
            gates.append(gate)
            call = client.stream_experience(_idle_after(chunk(1), gate))
            calls.append(call)
            assert next(call).acked_seq == 2
        err = refused(lambda: send(client, chunk(1)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_experience_streams 8" in err.details()
    finally:
        for gate, call in zip(gates, calls):
            gate.set()
            call.cancel()


def test_redis_at_maxmemory_refuses_with_retry_hint_and_keeps_acked_data(client, redis_client):
    assert send(client, chunk(1, n=10)) == [(10, 0)]
    before = snapshot(redis_client, "r1")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)  # already above: every write is refused
    try:
        err = refused(lambda: send(client, chunk(11, n=5)))
    finally:
        redis_client.config_set("maxmemory", 0)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Redis is full (maxmemory with noeviction" in err.details()
    assert dict(err.trailing_metadata())["fleet-retry-after-s"] == "3.000"
    assert snapshot(redis_client, "r1") == before
    assert send(client, chunk(11, n=5)) == [(15, 0)]


def test_limiter_holds_a_chunk_until_room_frees_then_lets_it_through():
    """The slow-sender path: a chunk over the robot's bound waits (no error) while another is written."""
    from cloud.gateway.backpressure import InflightLimiter

    async def scenario() -> list[str]:
        limiter = InflightLimiter(max_bytes=1000, robot_max_bytes=100, max_streams=4, wait_s=5.0, retry_after_s=1.0)
        order: list[str] = []
        first_in = asyncio.Event()
        release = asyncio.Event()

        async def first() -> None:
            async with limiter.hold("r1", 80):
                first_in.set()
                await release.wait()
                order.append("first done")

        async def second() -> None:
            await first_in.wait()
            async with limiter.hold("r1", 50):
                order.append("second in")
                assert limiter.total_bytes == 50

        async def other_robot() -> None:
            await first_in.wait()
            async with limiter.hold("r2", 50):  # another robot's bound is its own
                order.append("other robot in")
            release.set()

        await asyncio.gather(first(), second(), other_robot())
        assert limiter.total_bytes == 0
        return order

    waited = REGISTRY.get_sample_value("fleet_gateway_backpressure_total",
                                       {"reason": "robot_bytes", "outcome": "waited"}) or 0.0
    assert asyncio.run(scenario()) == ["other robot in", "first done", "second in"]
    assert REGISTRY.get_sample_value("fleet_gateway_backpressure_total",
                                     {"reason": "robot_bytes", "outcome": "waited"}) == waited + 1


BAD_REGISTRATIONS = {
    # name: (robot id, embodiment, schema, tasks, words in the details)
    "robot id with '|'": ("r|1", "arm", SCHEMA, (TASK,), "robot_id 'r|1' must be ASCII letters"),
    "robot id with braces": ("r{1}", "arm", SCHEMA, (TASK,), "robot_id 'r{1}' must be ASCII letters"),
    "robot id with a space": ("r 1", "arm", SCHEMA, (TASK,), "robot_id 'r 1' must be ASCII letters"),
    "robot id too long": ("r" * 129, "arm", SCHEMA, (TASK,), "robot_id has 129 characters; at most 128"),
    "embodiment with a newline": ("r9", "arm\nx", SCHEMA, (TASK,), "robot 'r9' embodiment 'arm\\nx' must be"),
    "camera name with '/'": ("r9", "arm", Schema((SCHEMA.observation[0], FeatureSpec("cam/top", "uint8", (16, 16, 3),
                                                                                      is_image=True)), SCHEMA.action),
                             (TASK,), "robot 'r9' schema feature name 'cam/top' must be"),
    "12000x12000 camera": ("r9", "arm", Schema((SCHEMA.observation[0], FeatureSpec("cam", "uint8", (12000, 12000, 3),
                                                                                    is_image=True)), SCHEMA.action),
                           (TASK,), "robot 'r9' camera 'cam': uint8 [12000, 12000, 3] is not a uint8"),
    "no tasks": ("r9", "arm", SCHEMA, (), "robot 'r9' registered no tasks"),
    "65 tasks": ("r9", "arm", SCHEMA, tuple(f"t{i}" for i in range(65)), "robot 'r9' registered 65 tasks; at most 64"),
    "task with a newline": ("r9", "arm", SCHEMA, ("pick\nplace",), "robot 'r9' tasks[0] 'pick\\nplace' contains "
                                                                     "the control or format character U+000A"),
    "task with a bidi override": ("r9", "arm", SCHEMA, (TASK, "pick \u202eecalp"),
                                  "tasks[1] 'pick \\u202eecalp' contains the control or format character U+202E"),
    "200 kB task": ("r9", "arm", SCHEMA, ("x" * 200_000,), "robot 'r9' tasks[0] has 200000 bytes of UTF-8; at most 256"),
    "task with trailing space": ("r9", "arm", SCHEMA, (TASK + " ",), "has leading or trailing white space"),
}


def test_each_bad_registration_is_invalid_argument_naming_the_field_and_writes_nothing(client, redis_client):
    before = {k: redis_client.dump(k) for k in redis_client.scan_iter()}
    for name, (rid, embodiment, schema, tasks, words) in BAD_REGISTRATIONS.items():
        err = refused(lambda: client.register(RobotInfo(rid, embodiment, schema, tasks, PROTOCOL_VERSION)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
        assert words in err.details(), (name, err.details())
        assert len(err.details()) < 600, (name, len(err.details()))  # a huge value is cut, not echoed
    assert {k: redis_client.dump(k) for k in redis_client.scan_iter()} == before
    # What the rule admits: LeRobot feature names, the edge's episode ids, natural-language tasks.
    ok = Schema((FeatureSpec("observation.state", "float32", (6,)),
                 FeatureSpec("observation.images.wrist", "uint8", (16, 16, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
    client.register(RobotInfo("so101-arm_7:left", "so101", ok, ("Pick up the cube, place it in the box.", "ça va"),
                              PROTOCOL_VERSION))


def test_heartbeat_with_an_unregistered_task_or_bad_state_is_invalid_argument(client, redis_client):
    for kwargs, words in (({"task": "x" * 200_000}, "heartbeat task 'xxxx"), ({"state": "up\nhacked"},
                                                                              "heartbeat state 'up\\nhacked'")):
        args = {"policy_version": 1, "spool_steps": 0, "spool_bytes": 0, "state": "running", "task": TASK,
                "steps_per_s": 1.0, "intervention_rate": 0.0, **kwargs}
        err = refused(lambda args=args: client.heartbeat("r1", **args))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()
    assert not redis_client.exists(RobotKeys("r1").status)


def _episode_end(first_seq: int, n: int, claimed: int, gap: bool = False, episode: str = "e1") -> pb.ColumnChunk:
    out = steps(first_seq, n)
    out[-1].done = True
    return chunk_to_pb(Chunk("r1", episode, TASK, out, gap_declared=gap,
                             episode_end=EpisodeSummary(False, claimed, 0, 0, False, 1)))


def test_a_summary_that_disagrees_with_the_stored_length_is_refused(client, redis_client):
    assert send(client, chunk(1, n=2)) == [(2, 0)]
    before = snapshot(redis_client, "r1")
    for claimed in (1_000_000_000, 3, 5):  # 4 steps are stored once this chunk is in
        err = refused(lambda claimed=claimed: send(client, _episode_end(3, 2, claimed)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert f"claims {claimed} steps but 4 are stored" in err.details(), err.details()
        assert snapshot(redis_client, "r1") == before
    assert send(client, _episode_end(3, 2, 4)) == [(4, 0)]
    (_, fields), = redis_client.xrange(RobotKeys("r1").events)
    assert fields[b"len"] == b"4"
    # Steps the spool dropped (a declared gap) may be counted by the summary, no more.
    send(client, chunk_to_pb(Chunk("r1", "e2", TASK, steps(5, 1))))
    err = refused(lambda: send(client, _episode_end(9, 1, 6, gap=True, episode="e2")))
    assert "claims 6 steps but 2 are stored (3 declared dropped)" in err.details(), err.details()
    assert send(client, _episode_end(9, 1, 5, gap=True, episode="e2")) == [(9, 0)]  # 2 stored + 3 dropped (6-8)


def test_a_schema_change_on_register_needs_an_operator(client, redis_proc, redis_client):
    from fleet.cli import main

    other = Schema((FeatureSpec("state", "float32", (1,)), SCHEMA.observation[1]), SCHEMA.action)
    before = redis_client.hget(ROBOTS_KEY, "r1")
    err = refused(lambda: client.register(RobotInfo("r1", "test-arm", other, (TASK,), PROTOCOL_VERSION)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "registered before with another observation/action schema" in err.details()
    assert "fleet robots allow-schema-change r1" in err.details()
    assert redis_client.hget(ROBOTS_KEY, "r1") == before
    client.register(RobotInfo("r1", "test-arm", SCHEMA, (TASK, "a new task"), PROTOCOL_VERSION))  # same schema: fine

    assert main(["robots", "allow-schema-change", "r1", "--redis_url", redis_proc.url]) == 0
    assert 0 < redis_client.ttl(RobotKeys("r1").allow_schema_change) <= 3600
    client.register(RobotInfo("r1", "test-arm", other, (TASK,), PROTOCOL_VERSION))
    assert b'"shape": [1]' in redis_client.hget(ROBOTS_KEY, "r1")
    err = refused(lambda: client.register(RobotInfo("r1", "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # the allowance was used up
    with pytest.raises(SystemExit) as exc:
        main(["robots", "allow-schema-change", "nobody", "--redis_url", redis_proc.url])
    assert exc.value.code == 2
