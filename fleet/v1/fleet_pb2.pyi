from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoding", "height", "width", "channels", "data")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    height: int
    width: int
    channels: int
    data: bytes
    def __init__(self, encoding: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FeatureSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "is_image", "allow_nonfinite")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    IS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    is_image: bool
    allow_nonfinite: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., is_image: _Optional[bool] = ..., allow_nonfinite: _Optional[bool] = ...) -> None: ...

class Schema(_message.Message):
    __slots__ = ("observation", "action")
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    observation: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    action: FeatureSpec
    def __init__(self, observation: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., action: _Optional[_Union[FeatureSpec, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("robot_id", "embodiment", "schema", "tasks", "protocol_version", "software_version", "control_hz")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    EMBODIMENT_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTROL_HZ_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    embodiment: str
    schema: Schema
    tasks: _containers.RepeatedScalarFieldContainer[str]
    protocol_version: str
    software_version: str
    control_hz: float
    def __init__(self, robot_id: _Optional[str] = ..., embodiment: _Optional[str] = ..., schema: _Optional[_Union[Schema, _Mapping]] = ..., tasks: _Optional[_Iterable[str]] = ..., protocol_version: _Optional[str] = ..., software_version: _Optional[str] = ..., control_hz: _Optional[float] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("last_acked_seq", "latest_policy_version", "gateway_id", "max_chunks_per_message")
    LAST_ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    LATEST_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    last_acked_seq: int
    latest_policy_version: int
    gateway_id: str
    max_chunks_per_message: int
    def __init__(self, last_acked_seq: _Optional[int] = ..., latest_policy_version: _Optional[int] = ..., gateway_id: _Optional[str] = ..., max_chunks_per_message: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("seq", "index", "observation", "images", "policy_action", "action", "is_intervention", "reward", "success", "done", "policy_version", "timestamp_s")
    class ObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class ImagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Image
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    IS_INTERVENTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    seq: int
    index: int
    observation: _containers.MessageMap[str, Tensor]
    images: _containers.MessageMap[str, Image]
    policy_action: Tensor
    action: Tensor
    is_intervention: bool
    reward: float
    success: bool
    done: bool
    policy_version: int
    timestamp_s: float
    def __init__(self, seq: _Optional[int] = ..., index: _Optional[int] = ..., observation: _Optional[_Mapping[str, Tensor]] = ..., images: _Optional[_Mapping[str, Image]] = ..., policy_action: _Optional[_Union[Tensor, _Mapping]] = ..., action: _Optional[_Union[Tensor, _Mapping]] = ..., is_intervention: _Optional[bool] = ..., reward: _Optional[float] = ..., success: _Optional[bool] = ..., done: _Optional[bool] = ..., policy_version: _Optional[int] = ..., timestamp_s: _Optional[float] = ...) -> None: ...

class EpisodeEnd(_message.Message):
    __slots__ = ("success", "num_steps", "intervention_steps", "interventions", "evaluation", "policy_version")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    num_steps: int
    intervention_steps: int
    interventions: int
    evaluation: bool
    policy_version: int
    def __init__(self, success: _Optional[bool] = ..., num_steps: _Optional[int] = ..., intervention_steps: _Optional[int] = ..., interventions: _Optional[int] = ..., evaluation: _Optional[bool] = ..., policy_version: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("robot_id", "episode_id", "task", "steps", "gap_declared", "episode_end", "evaluation")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GAP_DECLARED_FIELD_NUMBER: _ClassVar[int]
    EPISODE_END_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    episode_id: str
    task: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    gap_declared: bool
    episode_end: EpisodeEnd
    evaluation: bool
    def __init__(self, robot_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., task: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., gap_declared: _Optional[bool] = ..., episode_end: _Optional[_Union[EpisodeEnd, _Mapping]] = ..., evaluation: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("acked_seq", "duplicate_steps")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    duplicate_steps: int
    def __init__(self, acked_seq: _Optional[int] = ..., duplicate_steps: _Optional[int] = ...) -> None: ...

class CameraFrames(_message.Message):
    __slots__ = ("encoding", "frames")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, encoding: _Optional[str] = ..., frames: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ColumnChunk(_message.Message):
    __slots__ = ("robot_id", "episode_id", "task", "schema_hash", "first_seq", "n", "observation", "action", "policy_action", "reward", "timestamp_s", "policy_version", "flags", "cameras", "gap_declared", "episode_end", "evaluation", "more", "help")
    class ObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class CamerasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: CameraFrames
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[CameraFrames, _Mapping]] = ...) -> None: ...
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ACTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    GAP_DECLARED_FIELD_NUMBER: _ClassVar[int]
    EPISODE_END_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    episode_id: str
    task: str
    schema_hash: bytes
    first_seq: int
    n: int
    observation: _containers.ScalarMap[str, bytes]
    action: bytes
    policy_action: bytes
    reward: bytes
    timestamp_s: bytes
    policy_version: bytes
    flags: bytes
    cameras: _containers.MessageMap[str, CameraFrames]
    gap_declared: bool
    episode_end: EpisodeEnd
    evaluation: bool
    more: _containers.RepeatedCompositeFieldContainer[ColumnChunk]
    help: bytes
    def __init__(self, robot_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., task: _Optional[str] = ..., schema_hash: _Optional[bytes] = ..., first_seq: _Optional[int] = ..., n: _Optional[int] = ..., observation: _Optional[_Mapping[str, bytes]] = ..., action: _Optional[bytes] = ..., policy_action: _Optional[bytes] = ..., reward: _Optional[bytes] = ..., timestamp_s: _Optional[bytes] = ..., policy_version: _Optional[bytes] = ..., flags: _Optional[bytes] = ..., cameras: _Optional[_Mapping[str, CameraFrames]] = ..., gap_declared: _Optional[bool] = ..., episode_end: _Optional[_Union[EpisodeEnd, _Mapping]] = ..., evaluation: _Optional[bool] = ..., more: _Optional[_Iterable[_Union[ColumnChunk, _Mapping]]] = ..., help: _Optional[bytes] = ...) -> None: ...

class WatchPolicyRequest(_message.Message):
    __slots__ = ("robot_id", "have_version", "want_full", "rejected_version", "side_channel")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WANT_FULL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    have_version: int
    want_full: bool
    rejected_version: int
    side_channel: bool
    def __init__(self, robot_id: _Optional[str] = ..., have_version: _Optional[int] = ..., want_full: _Optional[bool] = ..., rejected_version: _Optional[int] = ..., side_channel: _Optional[bool] = ...) -> None: ...

class PolicyHeader(_message.Message):
    __slots__ = ("version", "base_version", "manifest_json", "payload_bytes", "ticket", "side_channel_address")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    version: int
    base_version: int
    manifest_json: str
    payload_bytes: int
    ticket: bytes
    side_channel_address: str
    def __init__(self, version: _Optional[int] = ..., base_version: _Optional[int] = ..., manifest_json: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., ticket: _Optional[bytes] = ..., side_channel_address: _Optional[str] = ...) -> None: ...

class TensorPiece(_message.Message):
    __slots__ = ("name", "offset", "data", "encoding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    encoding: str
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., encoding: _Optional[str] = ...) -> None: ...

class PolicyTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("header", "piece", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: PolicyHeader
    piece: TensorPiece
    trailer: PolicyTrailer
    def __init__(self, header: _Optional[_Union[PolicyHeader, _Mapping]] = ..., piece: _Optional[_Union[TensorPiece, _Mapping]] = ..., trailer: _Optional[_Union[PolicyTrailer, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("robot_id", "policy_version", "spool_steps", "spool_bytes", "state", "task", "steps_per_s", "intervention_rate", "help", "thumbnail", "operator_id")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPOOL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_RATE_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    policy_version: int
    spool_steps: int
    spool_bytes: int
    state: str
    task: str
    steps_per_s: float
    intervention_rate: float
    help: HelpSignal
    thumbnail: bytes
    operator_id: str
    def __init__(self, robot_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., spool_steps: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., state: _Optional[str] = ..., task: _Optional[str] = ..., steps_per_s: _Optional[float] = ..., intervention_rate: _Optional[float] = ..., help: _Optional[_Union[HelpSignal, _Mapping]] = ..., thumbnail: _Optional[bytes] = ..., operator_id: _Optional[str] = ...) -> None: ...

class HelpSignal(_message.Message):
    __slots__ = ("score", "uncertainty", "stall", "risk", "wanted", "holding", "intervening", "wanted_for_s")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    STALL_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    HOLDING_FIELD_NUMBER: _ClassVar[int]
    INTERVENING_FIELD_NUMBER: _ClassVar[int]
    WANTED_FOR_S_FIELD_NUMBER: _ClassVar[int]
    score: float
    uncertainty: float
    stall: float
    risk: float
    wanted: bool
    holding: bool
    intervening: bool
    wanted_for_s: float
    def __init__(self, score: _Optional[float] = ..., uncertainty: _Optional[float] = ..., stall: _Optional[float] = ..., risk: _Optional[float] = ..., wanted: _Optional[bool] = ..., holding: _Optional[bool] = ..., intervening: _Optional[bool] = ..., wanted_for_s: _Optional[float] = ...) -> None: ...

class OperatorAssignment(_message.Message):
    __slots__ = ("operator_id", "manual", "since_s")
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_S_FIELD_NUMBER: _ClassVar[int]
    operator_id: str
    manual: bool
    since_s: float
    def __init__(self, operator_id: _Optional[str] = ..., manual: _Optional[bool] = ..., since_s: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("latest_policy_version", "server_time_s", "assignment")
    LATEST_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    latest_policy_version: int
    server_time_s: float
    assignment: OperatorAssignment
    def __init__(self, latest_policy_version: _Optional[int] = ..., server_time_s: _Optional[float] = ..., assignment: _Optional[_Union[OperatorAssignment, _Mapping]] = ...) -> None: ...
