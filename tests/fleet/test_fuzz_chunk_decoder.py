"""Property/fuzz tests of what the gateway does with a received chunk: parse the protobuf,
``chunk_from_pb``, then validate against the registered schema (``cloud.ingest.check_chunk``);
and its fast path (``WireCheck.certifies``, straight on the protobuf).

Whatever the bytes, the only outcomes are: a protobuf DecodeError (the gateway answers
INVALID_ARGUMENT), InvalidInput (INVALID_ARGUMENT), or a chunk that really fits the schema.
Never another exception, never a chunk with a wrong dtype/shape or a NaN where none is allowed,
and the fast path never certifies a chunk the full path refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.gateway.servicer import WireCheck
from cloud.ingest import check_chunk
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.convert import chunk_from_pb, chunk_to_pb
from fleet.errors import InvalidInput
from fleet.types import Chunk, FeatureSpec, RobotInfo, Schema, Step
from fleet.v1 import fleet_pb2 as pb

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (3,)), FeatureSpec("cam", "uint8", (4, 4, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
INFO = RobotInfo("r1", "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION)
# A second schema takes the fast path's general branch (several observation features, one allowing NaN).
SCHEMA2 = Schema((*SCHEMA.observation, FeatureSpec("gripper", "float32", (1,), allow_nonfinite=True)), SCHEMA.action)
INFO2 = RobotInfo("r1", "test-arm", SCHEMA2, (TASK,), PROTOCOL_VERSION)
IMAGE = encode_image(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "png")
# ~3500 inputs in all; the structured ones cost the most to generate (about 80 draws each).
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def valid_chunk(n: int = 2, info: RobotInfo = INFO) -> pb.Chunk:
    extra = {"gripper": np.array([np.nan], np.float32)} if info is INFO2 else {}
    steps = [Step(seq=1 + i, index=i, observation={"state": np.arange(3, dtype=np.float32) + i, **extra},
                  policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=i == 0,
                  reward=0.5, success=False, done=False, policy_version=1, timestamp_s=1.0, images={"cam": IMAGE})
             for i in range(n)]
    return chunk_to_pb(Chunk("r1", "e1", TASK, steps))


VALID = valid_chunk().SerializeToString()


WIRE_CHECKS = {INFO: WireCheck(INFO), INFO2: WireCheck(INFO2)}


def gateway_decode(data: bytes, info: RobotInfo = INFO) -> Chunk | None:
    """What the gateway does with received bytes; None when it refuses them with INVALID_ARGUMENT."""
    try:
        msg = pb.Chunk.FromString(data)
    except DecodeError:
        return None
    return gateway_check(msg, info)


def gateway_check(msg: pb.Chunk, info: RobotInfo = INFO) -> Chunk | None:
    certified = WIRE_CHECKS[info].certifies(msg)
    try:
        chunk = chunk_from_pb(msg)
        check_chunk(chunk, info)
    except InvalidInput as exc:
        assert str(exc), "an error without a message"
        assert not certified, f"the fast path certified a chunk the full path refuses: {exc}"
        return None
    return chunk


def assert_fits_schema(chunk: Chunk, info: RobotInfo = INFO) -> None:
    assert chunk.robot_id and chunk.episode_id and chunk.task == TASK and chunk.steps
    first = chunk.steps[0].seq
    for i, step in enumerate(chunk.steps):
        assert step.seq == first + i >= 1
        state = step.observation["state"]
        assert state.dtype == np.float32 and state.shape == (3,) and np.isfinite(state).all()
        assert step.action.dtype == np.float32 and step.action.shape == (2,) and np.isfinite(step.action).all()
        assert set(step.observation) == {f.name for f in info.schema.observation if not f.is_image}
        assert set(step.images) == {"cam"}
        img = step.images["cam"]
        assert (img.height, img.width, img.channels) == (4, 4, 3)
        assert math.isfinite(step.reward)


def test_the_valid_chunk_passes_both_paths():
    chunk = gateway_decode(VALID)
    assert chunk is not None
    assert_fits_schema(chunk)
    assert WIRE_CHECKS[INFO].certifies(pb.Chunk.FromString(VALID))
    assert WIRE_CHECKS[INFO2].certifies(valid_chunk(3, INFO2))


@settings(max_examples=2000, **FUZZ)
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data):
    chunk = gateway_decode(data)
    if chunk is not None:
        assert_fits_schema(chunk)


@settings(max_examples=900, **FUZZ)
@given(st.data())
def test_mutated_valid_chunks(data):
    """Bit flips, byte substitutions, truncations and splices of a valid chunk's bytes."""
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            raw = raw[:pos]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    chunk = gateway_decode(bytes(raw))
    if chunk is not None:
        assert_fits_schema(chunk)


# Near-valid chunks: a valid chunk with up to two targeted edits, each aimed at one check.


def _tensor(m: pb.Chunk, i: int, field: str) -> pb.Tensor:
    step = m.steps[i % len(m.steps)]
    return step.observation["state"] if field == "obs" else getattr(step, field)


def _set_value(field: str):
    def edit(m: pb.Chunk, i: int, x: int, v: float) -> None:
        t = _tensor(m, i, field)
        if not t.data or len(t.data) % 4:
            return
        values = np.frombuffer(t.data, np.float32).copy()
        values[x % len(values)] = v
        t.data = values.tobytes()
    return edit


def _step(m: pb.Chunk, i: int) -> pb.Step:
    return m.steps[i % len(m.steps)]


EDITS = {
    "obs dtype": lambda m, i, x, v: setattr(_tensor(m, i, "obs"), "dtype", x % 12),
    "obs shape": lambda m, i, x, v: _tensor(m, i, "obs").shape.extend([x % 3]),
    "obs bytes cut": lambda m, i, x, v: setattr(_tensor(m, i, "obs"), "data", _tensor(m, i, "obs").data[: x % 12]),
    "obs value": _set_value("obs"),
    "action value": _set_value("action"),
    "policy_action value": _set_value("policy_action"),  # NaN allowed here: stays valid
    "action dtype": lambda m, i, x, v: setattr(_tensor(m, i, "action"), "dtype", x % 12),
    "no action": lambda m, i, x, v: _step(m, i).ClearField("action"),
    "no policy_action": lambda m, i, x, v: _step(m, i).ClearField("policy_action"),  # stays valid
    "extra obs": lambda m, i, x, v: _step(m, i).observation["extra"].CopyFrom(_tensor(m, i, "obs")),
    "no obs": lambda m, i, x, v: _step(m, i).observation.clear(),
    "no image": lambda m, i, x, v: _step(m, i).images.clear(),
    "image cut": lambda m, i, x, v: setattr(_step(m, i).images["cam"], "data",
                                            _step(m, i).images["cam"].data[: x % len(IMAGE.data)]),
    "image height": lambda m, i, x, v: setattr(_step(m, i).images["cam"], "height", x % 6),
    "image encoding": lambda m, i, x, v: setattr(_step(m, i).images["cam"], "encoding", ["jpeg", "gif", ""][x % 3]),
    "image is jpeg": lambda m, i, x, v: setattr(_step(m, i).images["cam"], "data", JPEG),
    "seq": lambda m, i, x, v: setattr(_step(m, i), "seq", x % 5),
    "done": lambda m, i, x, v: setattr(_step(m, i), "done", True),
    "reward": lambda m, i, x, v: setattr(_step(m, i), "reward", v),
    "task": lambda m, i, x, v: setattr(m, "task", "juggle"),
    "robot": lambda m, i, x, v: setattr(m, "robot_id", ""),
    "episode": lambda m, i, x, v: setattr(m, "episode_id", ""),
    "episode end": lambda m, i, x, v: setattr(m.episode_end, "num_steps", x % 4),
    "repeat a step": lambda m, i, x, v: m.steps.append(_step(m, i)),
    "no steps": lambda m, i, x, v: m.ClearField("steps"),
}
JPEG = encode_image(np.zeros((4, 4, 3), np.uint8), "jpeg").data
ANY_FLOAT = st.one_of(st.floats(-10, 10, width=32), st.floats(allow_nan=True, allow_infinity=True, width=32))
NEAR_VALID = st.tuples(st.integers(1, 3), st.lists(st.tuples(st.sampled_from(sorted(EDITS)), st.integers(0, 2),
                                                             st.integers(0, 1000), ANY_FLOAT), max_size=2))


accepted: list[int] = []


@pytest.mark.parametrize("info", [INFO, INFO2], ids=["one-feature", "two-features"])
@settings(max_examples=500, **FUZZ)
@given(case=NEAR_VALID)
def test_near_valid_chunks(info, case):
    """Valid chunks with up to two targeted edits: each check of both paths is hit on its own."""
    n, edits = case
    msg = valid_chunk(n, info)
    for name, i, x, v in edits:
        if msg.steps:
            EDITS[name](msg, i, x, v)
    chunk = gateway_check(msg, info)
    if chunk is not None:
        assert_fits_schema(chunk, info)
        accepted.append(len(edits))
    # The same message through the wire bytes gives the same verdict.
    again = gateway_decode(msg.SerializeToString(), info)
    assert (again is None) == (chunk is None)


@settings(max_examples=400, **FUZZ)
@given(st.one_of(st.text(max_size=210), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,205}", fullmatch=True)))
def test_episode_ids_follow_the_name_rule_on_both_paths(episode_id):
    from fleet.names import MAX_EPISODE_ID_CHARS, is_id

    msg = valid_chunk()
    msg.episode_id = episode_id
    valid = is_id(episode_id, MAX_EPISODE_ID_CHARS)
    assert (gateway_check(msg) is not None) == valid
    assert WIRE_CHECKS[INFO].certifies(msg) == valid  # the fast path certifies exactly the valid ones
