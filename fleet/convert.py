"""Protobuf <-> domain conversion. The only module (with the gateway servicer and
the edge client) that touches generated ``*_pb2`` objects."""

from __future__ import annotations

import numpy as np

from fleet.codec import decode_tensor, dtype_from_pb, dtype_to_pb, encode_tensor
from fleet.errors import InvalidInput
from fleet.types import Chunk, EncodedImage, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step
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


def chunk_to_pb(chunk: Chunk, schema: Schema | None = None) -> pb.Chunk:
    msg = pb.Chunk(
        robot_id=chunk.robot_id,
        episode_id=chunk.episode_id,
        task=chunk.task,
        steps=[step_to_pb(s, schema) for s in chunk.steps],
        gap_declared=chunk.gap_declared,
        evaluation=chunk.evaluation,
    )
    if chunk.episode_end is not None:
        msg.episode_end.CopyFrom(summary_to_pb(chunk.episode_end))
    return msg


def chunk_from_pb(msg: pb.Chunk) -> Chunk:
    if not msg.robot_id:
        raise InvalidInput("chunk without robot_id")
    if not msg.episode_id:
        raise InvalidInput("chunk without episode_id")
    if not msg.steps:
        raise InvalidInput("chunk without steps")
    return Chunk(
        robot_id=msg.robot_id,
        episode_id=msg.episode_id,
        task=msg.task,
        steps=[step_from_pb(s) for s in msg.steps],
        gap_declared=msg.gap_declared,
        episode_end=summary_from_pb(msg.episode_end) if msg.HasField("episode_end") else None,
        evaluation=msg.evaluation,
    )


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


def chunk_message(robot_id: str, episode_id: str, task: str, step_blobs: list[bytes], evaluation: bool,
                  gap_declared: bool, end_blob: bytes | None) -> pb.Chunk:
    """Assemble a wire chunk from already-encoded steps, without decoding them."""
    msg = pb.Chunk(robot_id=robot_id, episode_id=episode_id, task=task, evaluation=evaluation,
                   gap_declared=gap_declared)
    for blob in step_blobs:
        msg.steps.add().MergeFromString(blob)
    if end_blob is not None:
        msg.episode_end.MergeFromString(end_blob)
    return msg
