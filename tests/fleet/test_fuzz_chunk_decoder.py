"""Property/fuzz tests of what the gateway does with a received columnar chunk: parse the protobuf,
decode its columns against the registered schema (``fleet.convert.columns_from_pb``: byte lengths),
then the one validator (``cloud.validator.check_columns``: finite values, flags, names, image
headers); and what the buffer then stores (``fleet.columns`` element round trip).

Whatever the bytes, the only outcomes are: a protobuf DecodeError (the gateway answers
INVALID_ARGUMENT), InvalidInput (INVALID_ARGUMENT), or a chunk that really fits the schema.
Never another exception, never a column with a wrong dtype/shape or a NaN where none is allowed,
and an accepted chunk comes back from its buffer element unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.validator import check_columns
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.columns import ColumnChunk, decode_element, encode_element, schema_hash
from fleet.convert import chunk_to_pb, columns_from_pb
from fleet.errors import InvalidInput
from fleet.types import Chunk, FeatureSpec, RobotInfo, Schema, Step
from fleet.v1 import fleet_pb2 as pb

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (3,)), FeatureSpec("cam", "uint8", (4, 4, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))
INFO = RobotInfo("r1", "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION)
# A second schema: several observation features, one allowing NaN.
SCHEMA2 = Schema((*SCHEMA.observation, FeatureSpec("gripper", "float32", (1,), allow_nonfinite=True)), SCHEMA.action)
INFO2 = RobotInfo("r1", "test-arm", SCHEMA2, (TASK,), PROTOCOL_VERSION)
IMAGE = encode_image(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "png")
JPEG = encode_image(np.zeros((4, 4, 3), np.uint8), "jpeg").data
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def valid_chunk(n: int = 2, info: RobotInfo = INFO) -> pb.ColumnChunk:
    extra = {"gripper": np.array([np.nan], np.float32)} if info is INFO2 else {}
    steps = [Step(seq=1 + i, index=i, observation={"state": np.arange(3, dtype=np.float32) + i, **extra},
                  policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=i == 0,
                  reward=0.5, success=False, done=False, policy_version=1, timestamp_s=1.0, images={"cam": IMAGE})
             for i in range(n)]
    return chunk_to_pb(Chunk("r1", "e1", TASK, steps), info.schema)


VALID = valid_chunk().SerializeToString()


def gateway_decode(data: bytes, info: RobotInfo = INFO) -> ColumnChunk | None:
    """What the gateway does with received bytes; None when it refuses them."""
    try:
        msg = pb.ColumnChunk.FromString(data)
    except DecodeError:
        return None
    return gateway_check(msg, info)


def gateway_check(msg: pb.ColumnChunk, info: RobotInfo = INFO) -> ColumnChunk | None:
    if msg.schema_hash != schema_hash(info.schema):
        return None  # FAILED_PRECONDITION: register again
    try:
        cc = columns_from_pb(msg, info.schema)
        check_columns(cc, info)
    except InvalidInput as exc:
        assert str(exc), "an error without a message"
        return None
    return cc


def assert_fits_schema(cc: ColumnChunk, info: RobotInfo = INFO) -> None:
    cols = cc.columns
    n = cols.n
    assert cc.robot_id and cc.episode_id and cc.task == TASK and 1 <= n <= 1024 and cols.first_seq >= 1
    state = cols.observation["state"]
    assert state.dtype == np.float32 and state.shape == (n, 3) and np.isfinite(state).all()
    assert cols.action.dtype == np.float32 and cols.action.shape == (n, 2) and np.isfinite(cols.action).all()
    assert cols.policy_action.shape == (n, 2) and np.isfinite(cols.reward).all()
    assert set(cols.observation) == {f.name for f in info.schema.observation if not f.is_image}
    assert set(cols.frames) == {"cam"} and len(cols.frames["cam"]) == n
    assert not cols.done[:-1].any()
    assert cols.help is None or (cols.help.shape == (n,) and ((cols.help >= 0) & (cols.help <= 1)).all())
    # What the buffer stores comes back unchanged.
    back = decode_element(encode_element(cols, info.schema), info.schema).columns
    for name in cols.observation:
        np.testing.assert_array_equal(back.observation[name], cols.observation[name])
    np.testing.assert_array_equal(back.action, cols.action)
    np.testing.assert_array_equal(back.intervention, cols.intervention)
    assert back.frames == cols.frames and back.first_seq == cols.first_seq
    assert (back.help is None) == (cols.help is None)
    if cols.help is not None:
        np.testing.assert_array_equal(back.help, cols.help)


def test_the_valid_chunk_passes():
    cc = gateway_decode(VALID)
    assert cc is not None
    assert_fits_schema(cc)
    assert gateway_check(valid_chunk(3, INFO2), INFO2) is not None


@settings(max_examples=1500, **FUZZ)
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data):
    cc = gateway_decode(data)
    if cc is not None:
        assert_fits_schema(cc)


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
    cc = gateway_decode(bytes(raw))
    if cc is not None:
        assert_fits_schema(cc)


# Near-valid chunks: a valid chunk with up to two targeted edits, each aimed at one check.


def _set_value(field: str):
    def edit(m: pb.ColumnChunk, i: int, x: int, v: float) -> None:
        data = m.observation["state"] if field == "obs" else getattr(m, field)
        if not data or len(data) % 4:
            return
        values = np.frombuffer(data, np.float32).copy()
        values[x % len(values)] = v
        if field == "obs":
            m.observation["state"] = values.tobytes()
        else:
            setattr(m, field, values.tobytes())
    return edit


def _frames(m: pb.ColumnChunk) -> pb.CameraFrames:
    return m.cameras["cam"]


def _set_frame(m: pb.ColumnChunk, i: int, data: bytes) -> None:
    frames = _frames(m).frames
    if frames:
        frames[i % len(frames)] = data


EDITS = {
    "obs bytes cut": lambda m, i, x, v: m.observation.__setitem__("state", m.observation["state"][: x % 12]),
    "obs value": _set_value("obs"),
    "action value": _set_value("action"),
    "policy_action value": _set_value("policy_action"),  # NaN allowed here: stays valid
    "reward value": _set_value("reward"),
    "action cut": lambda m, i, x, v: setattr(m, "action", m.action[: x % 8]),
    "no action": lambda m, i, x, v: m.ClearField("action"),
    "extra obs": lambda m, i, x, v: m.observation.__setitem__("extra", m.observation["state"]),
    "no obs": lambda m, i, x, v: m.observation.clear(),
    "no camera": lambda m, i, x, v: m.cameras.clear(),
    "extra camera": lambda m, i, x, v: m.cameras["cam2"].CopyFrom(_frames(m)),
    "image cut": lambda m, i, x, v: _set_frame(m, i, IMAGE.data[: x % len(IMAGE.data)]),
    "image is jpeg": lambda m, i, x, v: _set_frame(m, i, JPEG),
    "image encoding": lambda m, i, x, v: setattr(_frames(m), "encoding", ["jpeg", "gif", ""][x % 3]),
    "a frame more": lambda m, i, x, v: _frames(m).frames.append(IMAGE.data),
    "n": lambda m, i, x, v: setattr(m, "n", x % 5),
    "first seq": lambda m, i, x, v: setattr(m, "first_seq", x % 3),
    "flags": lambda m, i, x, v: setattr(m, "flags", bytes([x % 256]) * (1 + x % 4)),
    "timestamps cut": lambda m, i, x, v: setattr(m, "timestamp_s", m.timestamp_s[: x % 8]),
    "versions cut": lambda m, i, x, v: setattr(m, "policy_version", m.policy_version[: x % 8]),
    "task": lambda m, i, x, v: setattr(m, "task", "juggle"),
    "robot": lambda m, i, x, v: setattr(m, "robot_id", ""),
    "episode": lambda m, i, x, v: setattr(m, "episode_id", ""),
    "episode end": lambda m, i, x, v: setattr(m.episode_end, "num_steps", x % 4),
}
ANY_FLOAT = st.one_of(st.floats(-10, 10, width=32), st.floats(allow_nan=True, allow_infinity=True, width=32))
NEAR_VALID = st.tuples(st.integers(1, 3), st.lists(st.tuples(st.sampled_from(sorted(EDITS)), st.integers(0, 2),
                                                             st.integers(0, 1000), ANY_FLOAT), max_size=2))


@pytest.mark.parametrize("info", [INFO, INFO2], ids=["one-feature", "two-features"])
@settings(max_examples=400, **FUZZ)
@given(case=NEAR_VALID)
def test_near_valid_chunks(info, case):
    """Valid chunks with up to two targeted edits: each check is hit on its own."""
    n, edits = case
    msg = valid_chunk(n, info)
    for name, i, x, v in edits:
        EDITS[name](msg, i, x, v)
    cc = gateway_check(msg, info)
    if cc is not None:
        assert_fits_schema(cc, info)
    # The same message through the wire bytes gives the same verdict.
    again = gateway_decode(msg.SerializeToString(), info)
    assert (again is None) == (cc is None)


@settings(max_examples=300, **FUZZ)
@given(st.one_of(st.text(max_size=210), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,205}", fullmatch=True)))
def test_episode_ids_follow_the_name_rule(episode_id):
    from fleet.names import MAX_EPISODE_ID_CHARS, is_id

    msg = valid_chunk()
    msg.episode_id = episode_id
    assert (gateway_check(msg) is not None) == is_id(episode_id, MAX_EPISODE_ID_CHARS)


def test_finite_values_whose_sum_overflows_pass_and_one_inf_or_bad_help_score_is_blamed_on_its_step():
    """The validator's quick pass sums each column (NaN or Inf anywhere makes the sum so); a sum that overflows
    with finite values only sends it to the exact check, which accepts them."""
    big = valid_chunk(4)
    big.observation["state"] = np.full((4, 3), 3e38, np.float32).tobytes()  # finite; their sum is inf in float32
    check_columns(columns_from_pb(big, SCHEMA), INFO)
    bad = valid_chunk(4)
    state = np.zeros((4, 3), np.float32)
    state[2, 1] = np.inf
    bad.observation["state"] = state.tobytes()
    with pytest.raises(InvalidInput, match="contains NaN or Inf") as err:
        check_columns(columns_from_pb(bad, SCHEMA), INFO)
    assert err.value.step_seq == 3
    for score in (np.nan, 1.5, -0.1):
        bad = valid_chunk(4)
        bad.help = np.array([0.0, score, 0.5, 1.0], np.float32).tobytes()
        with pytest.raises(InvalidInput, match="help score") as err:
            check_columns(columns_from_pb(bad, SCHEMA), INFO)
        assert err.value.step_seq == 2


def test_elements_encoded_and_decoded_on_several_threads_at_once_round_trip():
    """The zstd contexts are kept per thread (fleet/columns.py): threads encoding and decoding at the same time
    (the gateway's event loop, the sampler's decode workers) each get their own, and every element comes back."""
    from concurrent.futures import ThreadPoolExecutor

    schema = Schema((FeatureSpec("state", "float32", (39,)),), FeatureSpec("action", "float32", (4,)))
    rng = np.random.default_rng(0)

    def chunk(k: int):
        steps = [Step(seq=1 + i, index=i, observation={"state": np.full(39, k + i % 7, np.float32)},
                      policy_action=np.zeros(4, np.float32), action=rng.standard_normal(4).astype(np.float32),
                      is_intervention=i % 5 == 0, reward=0.0, success=False, done=False, policy_version=1,
                      timestamp_s=1.0 + i) for i in range(200)]
        return columns_from_pb(chunk_to_pb(Chunk("r1", "e1", TASK, steps), schema), schema).columns

    chunks = [chunk(k) for k in range(16)]

    def round_trip(k: int) -> bool:
        for _ in range(20):
            element = encode_element(chunks[k], schema)
            assert element[7] == 1  # zstd paid: the body is compressed
            back = decode_element(element, schema).columns
            if not (np.array_equal(back.observation["state"], chunks[k].observation["state"])
                    and np.array_equal(back.action, chunks[k].action)):
                return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(16)))
