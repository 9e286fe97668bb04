"""Protobuf <-> domain conversion. The only module (with the gateway servicer and
the edge client) that touches generated ``*_pb2`` objects."""

from __future__ import annotations

import math

import numpy as np

from fleet import columns
from fleet.codec import decode_tensor, dtype_from_pb, dtype_to_pb, encode_tensor, numpy_dtype
from fleet.errors import InvalidInput, SchemaMismatch
from fleet.rows import RowLayout
from fleet.types import (Chunk, EncodedImage, EpisodeSummary, FeatureSpec, HelpSignal, OperatorAssignment, RobotInfo,
                         Schema, Step)
from fleet.v1 import fleet_pb2 as pb


def feature_to_pb(spec: FeatureSpec) -> pb.FeatureSpec:
    return pb.FeatureSpec(
        name=spec.name,
        dtype=dtype_to_pb(spec.dtype),
        shape=list(spec.shape),
        is_image=spec.is_image,
        allow_nonfinite=spec.allow_nonfinite,
    )


def feature_from_pb(msg: pb.FeatureSpec) -> FeatureSpec:
    if not msg.name:
        raise InvalidInput("feature spec without a name")
    try:
        return FeatureSpec(
            name=msg.name,
            dtype=dtype_from_pb(msg.dtype),
            shape=tuple(msg.shape),
            is_image=msg.is_image,
            allow_nonfinite=msg.allow_nonfinite,
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def schema_to_pb(schema: Schema) -> pb.Schema:
    return pb.Schema(observation=[feature_to_pb(f) for f in schema.observation], action=feature_to_pb(schema.action))


def schema_from_pb(msg: pb.Schema) -> Schema:
    if not msg.HasField("action"):
        raise InvalidInput("schema has no action feature")
    obs = tuple(feature_from_pb(f) for f in msg.observation)
    if not obs:
        raise InvalidInput("schema has no observation features")
    names = [f.name for f in obs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"schema has duplicate observation feature names: {names}")
    return Schema(observation=obs, action=feature_from_pb(msg.action))


def schema_to_dict(schema: Schema) -> dict:
    """JSON-able form (for Redis and manifests)."""

    def one(f: FeatureSpec) -> dict:
        return {"name": f.name, "dtype": f.dtype, "shape": list(f.shape), "is_image": f.is_image,
                "allow_nonfinite": f.allow_nonfinite}

    return {"observation": [one(f) for f in schema.observation], "action": one(schema.action)}


def schema_from_dict(data: dict) -> Schema:
    def one(d: dict) -> FeatureSpec:
        return FeatureSpec(d["name"], d["dtype"], tuple(d["shape"]), d.get("is_image", False),
                           d.get("allow_nonfinite", False))

    return Schema(observation=tuple(one(d) for d in data["observation"]), action=one(data["action"]))


def robot_info_to_pb(info: RobotInfo) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        robot_id=info.robot_id,
        embodiment=info.embodiment,
        schema=schema_to_pb(info.schema),
        tasks=list(info.tasks),
        protocol_version=info.protocol_version,
        software_version=info.software_version,
        control_hz=info.control_hz,
    )


def robot_info_from_pb(msg: pb.RegisterRequest) -> RobotInfo:
    if not msg.robot_id:
        raise InvalidInput("RegisterRequest.robot_id is empty")
    return RobotInfo(
        robot_id=msg.robot_id,
        embodiment=msg.embodiment,
        schema=schema_from_pb(msg.schema),
        tasks=tuple(msg.tasks),
        protocol_version=msg.protocol_version,
        software_version=msg.software_version,
        control_hz=msg.control_hz,
    )


MAX_THUMBNAIL_BYTES = 64 * 1024
"""Largest camera thumbnail a heartbeat may carry."""
JPEG_MAGIC = b"\xff\xd8\xff"


def help_to_pb(h: HelpSignal) -> pb.HelpSignal:
    return pb.HelpSignal(score=h.score, uncertainty=h.uncertainty, stall=h.stall, risk=h.risk, wanted=h.wanted,
                         holding=h.holding, intervening=h.intervening, wanted_for_s=h.wanted_for_s)


def help_from_pb(msg: pb.HelpSignal, where: str = "heartbeat") -> HelpSignal:
    """Decode a help signal; InvalidInput naming the field if a score is not a finite number in [0, 1] or
    ``wanted_for_s`` is negative or not finite."""
    for name in ("score", "uncertainty", "stall", "risk"):
        value = getattr(msg, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidInput(f"{where} help.{name} ({value}) must be a finite number in [0, 1]")
    if not (math.isfinite(msg.wanted_for_s) and msg.wanted_for_s >= 0):
        raise InvalidInput(f"{where} help.wanted_for_s ({msg.wanted_for_s}) must be a finite number >= 0")
    return HelpSignal(score=msg.score, uncertainty=msg.uncertainty, stall=msg.stall, risk=msg.risk,
                      wanted=msg.wanted, holding=msg.holding, intervening=msg.intervening,
                      wanted_for_s=msg.wanted_for_s)


def check_thumbnail(data: bytes, where: str = "heartbeat") -> bytes:
    """The thumbnail, if it is a JPEG of at most :data:`MAX_THUMBNAIL_BYTES` (or empty: none); else InvalidInput."""
    if data and len(data) > MAX_THUMBNAIL_BYTES:
        raise InvalidInput(f"{where} thumbnail is {len(data)} bytes; at most {MAX_THUMBNAIL_BYTES} allowed")
    if data and not data.startswith(JPEG_MAGIC):
        raise InvalidInput(f"{where} thumbnail is not a JPEG (starts with {bytes(data[:4])!r})")
    return data


def assignment_to_pb(a: OperatorAssignment) -> pb.OperatorAssignment:
    return pb.OperatorAssignment(operator_id=a.operator_id, manual=a.manual, since_s=a.since_s)


def assignment_from_pb(msg: pb.OperatorAssignment) -> OperatorAssignment:
    return OperatorAssignment(operator_id=msg.operator_id, manual=msg.manual, since_s=msg.since_s)


def image_to_pb(img: EncodedImage) -> pb.Image:
    return pb.Image(encoding=img.encoding, height=img.height, width=img.width, channels=img.channels, data=img.data)


def image_from_pb(msg: pb.Image) -> EncodedImage:
    return EncodedImage(encoding=msg.encoding, height=msg.height, width=msg.width, channels=msg.channels,
                        data=msg.data)


def step_to_pb(step: Step, schema: Schema | None = None) -> pb.Step:
    """Encode a step. With a schema, tensors take the schema's dtypes."""
    obs_dtypes = {f.name: f.dtype for f in schema.observation} if schema else {}
    act_dtype = schema.action.dtype if schema else None
    return pb.Step(
        seq=step.seq,
        index=step.index,
        observation={k: encode_tensor(np.asarray(v, dtype=obs_dtypes.get(k)) if k in obs_dtypes else v)
                     for k, v in step.observation.items()},
        images={k: image_to_pb(v) for k, v in step.images.items()},
        policy_action=encode_tensor(np.asarray(step.policy_action, dtype=act_dtype)),
        action=encode_tensor(np.asarray(step.action, dtype=act_dtype)),
        is_intervention=step.is_intervention,
        reward=float(step.reward),
        success=step.success,
        done=step.done,
        policy_version=step.policy_version,
        timestamp_s=step.timestamp_s,
    )


def step_from_pb(msg: pb.Step) -> Step:
    """Decode a step; raises InvalidInput on malformed tensors (images stay encoded)."""
    where = f"step seq={msg.seq}"
    if not msg.HasField("action"):
        raise InvalidInput(f"{where}: no executed action")
    return Step(
        seq=msg.seq,
        index=msg.index,
        observation={k: decode_tensor(v, f"{where} observation[{k!r}]") for k, v in msg.observation.items()},
        images={k: image_from_pb(v) for k, v in msg.images.items()},
        policy_action=(decode_tensor(msg.policy_action, f"{where} policy_action")
                       if msg.HasField("policy_action") else decode_tensor(msg.action, f"{where} action")),
        action=decode_tensor(msg.action, f"{where} action"),
        is_intervention=msg.is_intervention,
        reward=msg.reward,
        success=msg.success,
        done=msg.done,
        policy_version=msg.policy_version,
        timestamp_s=msg.timestamp_s,
    )


def summary_to_pb(s: EpisodeSummary) -> pb.EpisodeEnd:
    return pb.EpisodeEnd(success=s.success, num_steps=s.num_steps, intervention_steps=s.intervention_steps,
                         interventions=s.interventions, evaluation=s.evaluation, policy_version=s.policy_version)


def summary_from_pb(m: pb.EpisodeEnd) -> EpisodeSummary:
    return EpisodeSummary(success=m.success, num_steps=m.num_steps, intervention_steps=m.intervention_steps,
                          interventions=m.interventions, evaluation=m.evaluation, policy_version=m.policy_version)


def chunk_to_pb(chunk: Chunk, schema: Schema | None = None) -> pb.ColumnChunk:
    """A per-step chunk as the protocol-2 columnar message (``schema``: the registered one; without it,
    the schema its first step implies)."""
    return columns_to_pb(columns.from_chunk(chunk, schema or schema_of_step(chunk.steps[0])))


def legacy_chunk_to_pb(chunk: Chunk, schema: Schema | None = None) -> pb.Chunk:
    """Protocol 1's per-step chunk (what an old edge sends; the gateway refuses it)."""
    msg = pb.Chunk(robot_id=chunk.robot_id, episode_id=chunk.episode_id, task=chunk.task,
                   steps=[step_to_pb(s, schema) for s in chunk.steps], gap_declared=chunk.gap_declared,
                   evaluation=chunk.evaluation)
    if chunk.episode_end is not None:
        msg.episode_end.CopyFrom(summary_to_pb(chunk.episode_end))
    return msg


def schema_of_step(step: Step) -> Schema:
    """The schema a step's arrays and images imply (tests and tools that do not pass one)."""
    obs = [FeatureSpec(k, np.asarray(v).dtype.name, np.asarray(v).shape) for k, v in step.observation.items()]
    obs += [FeatureSpec(k, "uint8", (v.height, v.width, v.channels), is_image=True) for k, v in step.images.items()]
    act = np.asarray(step.action)
    return Schema(tuple(obs), FeatureSpec("action", act.dtype.name, act.shape))


def columns_to_pb(cc: columns.ColumnChunk) -> pb.ColumnChunk:
    cols = cc.columns
    msg = pb.ColumnChunk(
        robot_id=cc.robot_id, episode_id=cc.episode_id, task=cc.task, schema_hash=cc.schema_hash,
        first_seq=cols.first_seq, n=cols.n,
        observation={k: np.ascontiguousarray(v).tobytes() for k, v in cols.observation.items()},
        action=np.ascontiguousarray(cols.action).tobytes(),
        policy_action=np.ascontiguousarray(cols.policy_action).tobytes(),
        reward=cols.reward.astype("<f4").tobytes(), timestamp_s=cols.timestamp_s.astype("<f8").tobytes(),
        policy_version=cols.policy_version.astype("<u8").tobytes(), flags=columns.pack_flags(cols),
        cameras={k: pb.CameraFrames(encoding=cols.encodings.get(k, "jpeg"), frames=v) for k, v in cols.frames.items()},
        gap_declared=cc.gap_declared, evaluation=cc.evaluation,
        help=cols.help.astype("<f4").tobytes() if cols.help is not None else b"")
    if cc.episode_end is not None:
        msg.episode_end.CopyFrom(summary_to_pb(cc.episode_end))
    return msg


def _column(data: bytes, dtype: str, shape: tuple[int, ...], n: int, what: str) -> np.ndarray:
    dt = numpy_dtype(dtype)
    per = math.prod(shape) * dt.itemsize
    if len(data) != n * per:
        raise SchemaMismatch(f"{what}: {len(data)} bytes for {n} steps; registered {dtype} {list(shape)} takes "
                             f"{per} bytes a step ({n * per} for {n})")
    return np.frombuffer(data, dt).reshape((n, *shape))


def columns_from_pb(msg: pb.ColumnChunk, schema: Schema) -> columns.ColumnChunk:
    """Decode a columnar chunk against the registered ``schema``: every column's byte length checked
    (SchemaMismatch naming the feature), nothing copied. Values are checked by ``cloud.ingest``."""
    n = msg.n
    where = f"robot {msg.robot_id!r} chunk at seq {msg.first_seq}"
    if not 0 < n <= columns.MAX_STEPS_PER_CHUNK:
        raise InvalidInput(f"{where}: n={n}; a chunk holds 1 to {columns.MAX_STEPS_PER_CHUNK} steps")
    low = [f for f in schema.observation if not f.is_image]
    cams = [f for f in schema.observation if f.is_image]
    if set(msg.observation) != {f.name for f in low}:
        raise SchemaMismatch(f"{where}: observation features {sorted(msg.observation)[:16]} != registered "
                             f"{sorted(f.name for f in low)}")
    if set(msg.cameras) != {f.name for f in cams}:
        raise SchemaMismatch(f"{where}: cameras {sorted(msg.cameras)[:16]} != registered {sorted(f.name for f in cams)}")
    obs = {f.name: _column(msg.observation[f.name], f.dtype, f.shape, n, f"{where} observation {f.name!r}")
           for f in low}
    act = schema.action
    frames, encodings = {}, {}
    for f in cams:
        cam = msg.cameras[f.name]
        if len(cam.frames) != n:
            raise SchemaMismatch(f"{where}: camera {f.name!r} carries {len(cam.frames)} frames for {n} steps")
        frames[f.name], encodings[f.name] = list(cam.frames), cam.encoding
    inter, success, done = columns.unpack_flags(msg.flags, n)
    cols = columns.Columns(
        first_seq=msg.first_seq, observation=obs,
        action=_column(msg.action, act.dtype, act.shape, n, f"{where} action"),
        policy_action=_column(msg.policy_action, act.dtype, act.shape, n, f"{where} policy_action"),
        reward=_column(msg.reward, "float32", (), n, f"{where} reward"),
        timestamp_s=_column(msg.timestamp_s, "float64", (), n, f"{where} timestamp_s"),
        policy_version=_column(msg.policy_version, "int64", (), n, f"{where} policy_version").view(np.uint64),
        intervention=inter, success=success, done=done, frames=frames, encodings=encodings,
        help=_column(msg.help, "float32", (), n, f"{where} help") if msg.help else None)
    return columns.ColumnChunk(msg.robot_id, msg.episode_id, msg.task, msg.schema_hash, cols, msg.gap_declared,
                               msg.evaluation, summary_from_pb(msg.episode_end) if msg.HasField("episode_end")
                               else None)


# --- raw encodings used by the edge spool and the client ----------------------------


def encode_step(step: Step, schema: Schema | None = None) -> bytes:
    """A step as ``fleet.v1.Step`` bytes (what the spool stores and Redis keeps)."""
    return step_to_pb(step, schema).SerializeToString()


def decode_step(data: bytes) -> Step:
    """Bytes stored by the buffer or spool -> Step (raises InvalidInput if malformed)."""
    msg = pb.Step()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise InvalidInput(f"malformed step bytes: {exc}") from None
    return step_from_pb(msg)


def encode_summary(summary: EpisodeSummary) -> bytes:
    return summary_to_pb(summary).SerializeToString()


def columns_message(robot_id: str, episode_id: str, task: str, layout: RowLayout, digest: bytes,
                    rows: list[bytes], first_seq: int, evaluation: bool, gap_declared: bool,
                    end_blob: bytes | None) -> pb.ColumnChunk:
    """:func:`columns_wire` as a message (tests, tools; the streamer sends the wire bytes)."""
    return pb.ColumnChunk.FromString(message_wire([columns_wire(robot_id, episode_id, task, layout, digest, rows,
                                                                first_seq, evaluation, gap_declared, end_blob)]))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_CHUNK = {f.name: f.number for f in pb.ColumnChunk.DESCRIPTOR.fields}
_FRAMES = {f.name: f.number for f in pb.CameraFrames.DESCRIPTOR.fields}
"""Field numbers, from the generated schema (protos/ stays the one place they are written)."""


def _scalar(number: int, value: int) -> list:
    """A varint field (integers, bools): tag, value."""
    return [_varint(number << 3), _varint(value)]


def _field(number: int, data) -> list:
    """A length-delimited field (bytes, string, message): tag, length, the bytes (not copied here)."""
    return [_varint(number << 3 | 2), _varint(len(data)), data]


def _message_field(number: int, parts: list) -> list:
    """A length-delimited field whose value is ``parts`` (a nested message's wire parts), not joined here."""
    return [_varint(number << 3 | 2), _varint(_wire_len(parts)), *parts]


def _wire_len(parts: list) -> int:
    return sum(len(p) for p in parts)


def columns_wire(robot_id: str, episode_id: str, task: str, layout: RowLayout, digest: bytes,
                 rows: list[bytes], first_seq: int, evaluation: bool, gap_declared: bool,
                 end_blob: bytes | None) -> list:
    """Spooled rows (``fleet.rows`` layout) -> one ``fleet.v1.ColumnChunk`` in protobuf's wire format, as parts
    to join (:func:`message_wire`): one join and one ``frombuffer`` for the fixed columns, no per-step parsing
    (RowMismatch, with the row's index, if a row does not fit).

    Written field by field rather than built as a message: a column is copied once, from its contiguous array
    into the message's bytes, where building one copied it four times (``tobytes``, into the message, into the
    message holding ``more`` chunks, ``SerializeToString``): ~60 of a 500-step chunk's ~90 us on the edge. The
    wire format is protobuf's, with the field numbers read from the generated schema (fields in number order;
    empty ones left out, as proto3 writes them), so the
    gateway parses it like any other message, and ``columns_message`` is this, parsed."""
    rec, frames = layout.join(rows)
    # A field of the structured rows is strided: ndarray.tobytes copies such an array element by element
    # (~90 us for 500 x 39 floats), ascontiguousarray by rows (~8 us), so make each column contiguous first.
    cols = {name: memoryview(np.ascontiguousarray(col)).cast("B") for name, col in layout.columns(rec).items()}
    flags = np.frombuffer(cols["flags"], np.uint8)
    planes = np.stack([(flags & 1).astype(bool), (flags & 2).astype(bool), (flags & 4).astype(bool)])
    parts: list = []
    for name, text in (("robot_id", robot_id), ("episode_id", episode_id), ("task", task)):
        if text:
            parts += _field(_CHUNK[name], text.encode())
    if digest:
        parts += _field(_CHUNK["schema_hash"], digest)
    if first_seq:
        parts += _scalar(_CHUNK["first_seq"], first_seq)
    parts += _scalar(_CHUNK["n"], len(rec))
    for f in layout.low_dim:  # observation: a map entry {1: name, 2: column} per feature
        parts += _message_field(_CHUNK["observation"], [*_field(1, f.name.encode()), *_field(2, cols[f.name])])
    for name in ("action", "policy_action", "reward", "timestamp_s", "policy_version"):
        parts += _field(_CHUNK[name], cols[name])
    parts += _field(_CHUNK["flags"], np.packbits(planes, axis=1).tobytes())
    for cam in layout.cameras:  # cameras: a map entry {1: name, 2: CameraFrames} per camera
        encoding, data = frames[cam.name]
        value = _field(_FRAMES["encoding"], encoding.encode()) if encoding else []
        for frame in data:
            value += _field(_FRAMES["frames"], frame)
        parts += _message_field(_CHUNK["cameras"], [*_field(1, cam.name.encode()), *_message_field(2, value)])
    if gap_declared:
        parts += _scalar(_CHUNK["gap_declared"], 1)
    if end_blob is not None:
        parts += _field(_CHUNK["episode_end"], end_blob)  # the spool keeps the EpisodeEnd message's bytes
    if evaluation:
        parts += _scalar(_CHUNK["evaluation"], 1)
    parts += _field(_CHUNK["help"], cols["help"])
    return parts


def message_wire(chunks: list[list]) -> bytes:
    """Chunks from :func:`columns_wire` -> one message's bytes: the first chunk, the others in its ``more`` (18)."""
    parts = list(chunks[0])
    for more in chunks[1:]:
        parts += _message_field(_CHUNK["more"], more)
    return b"".join(parts)
