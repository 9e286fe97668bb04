"""ROS 2 messages <-> numpy, for rclpy messages and rosbags messages alike.

Incoming messages are read by attribute (``msg.header.stamp.sec``, ``msg.position``,
``msg.data``), which rclpy and rosbags message classes share. Outgoing messages are
built through a :class:`MessageTypes` (``new(msgtype, **fields)`` plus how a float64[] and
a uint8[] field is given), implemented by ``RosbagsTypes`` here and by the rclpy transport
in ``node.py``. Every field is given, so the same call builds either kind.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from fleet.errors import InvalidInput

TIME = "builtin_interfaces/msg/Time"
DURATION = "builtin_interfaces/msg/Duration"
HEADER = "std_msgs/msg/Header"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
JOINT_STATE = "sensor_msgs/msg/JointState"
FLOAT64_MULTI_ARRAY = "std_msgs/msg/Float64MultiArray"
FLOAT32_MULTI_ARRAY = "std_msgs/msg/Float32MultiArray"
MULTI_ARRAY_LAYOUT = "std_msgs/msg/MultiArrayLayout"
MULTI_ARRAY_DIMENSION = "std_msgs/msg/MultiArrayDimension"
JOINT_TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
JOINT_TRAJECTORY_POINT = "trajectory_msgs/msg/JointTrajectoryPoint"
BOOL = "std_msgs/msg/Bool"
STRING = "std_msgs/msg/String"

ACTION_MSGTYPES = {"joint_state": JOINT_STATE, "float64_multi_array": FLOAT64_MULTI_ARRAY,
                   "joint_trajectory": JOINT_TRAJECTORY}
TELEOP_MSGTYPES = {"joint_state": JOINT_STATE, "float64_multi_array": FLOAT64_MULTI_ARRAY}

# sensor_msgs/Image encodings we read: channels and how to get RGB(A) order.
_ENCODINGS = {"rgb8": (3, None), "bgr8": (3, [2, 1, 0]), "rgba8": (4, [0, 1, 2]), "bgra8": (4, [2, 1, 0]),
              "mono8": (1, None), "8UC1": (1, None), "8UC3": (3, None)}


class MessageTypes(Protocol):
    """Builds ROS messages of one implementation (rclpy or rosbags)."""

    def new(self, msgtype: str, **fields: Any) -> Any:
        """A message of ``msgtype`` (e.g. "sensor_msgs/msg/JointState") with these fields."""
        ...

    def floats(self, values: Sequence[float] | np.ndarray, dtype: str = "float64") -> Any:
        """The value of a float64[] (or float32[]) field."""
        ...

    def octets(self, data: bytes) -> Any:
        """The value of a uint8[] field."""
        ...


class RosbagsTypes:
    """MessageTypes backed by a rosbags typestore (default: ROS 2 Humble's message definitions)."""

    def __init__(self, typestore: Any = None):
        if typestore is None:
            from rosbags.typesys import Stores, get_typestore

            typestore = get_typestore(Stores.ROS2_HUMBLE)
        self.typestore = typestore

    def new(self, msgtype: str, **fields: Any) -> Any:
        return self.typestore.types[msgtype](**fields)

    def floats(self, values: Sequence[float] | np.ndarray, dtype: str = "float64") -> np.ndarray:
        return np.asarray(values, dtype=dtype).reshape(-1)

    def octets(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)


# ----------------------------------------------------------------------- time


def stamp_ns(msg: Any) -> int:
    """A stamped message's header stamp in nanoseconds."""
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def time_msg(types: MessageTypes, ns: int) -> Any:
    """builtin_interfaces/Time of ``ns`` nanoseconds."""
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return types.new(TIME, sec=sec, nanosec=nanosec)


def header(types: MessageTypes, ns: int, frame_id: str = "") -> Any:
    """std_msgs/Header stamped ``ns``."""
    return types.new(HEADER, stamp=time_msg(types, ns), frame_id=frame_id)


def duration_msg(types: MessageTypes, seconds: float) -> Any:
    """builtin_interfaces/Duration of ``seconds``."""
    frac, whole = math.modf(max(0.0, seconds))
    return types.new(DURATION, sec=int(whole), nanosec=int(round(frac * 1e9)))


# --------------------------------------------------------------------- images


def image_array(msg: Any, what: str = "image") -> np.ndarray:
    """sensor_msgs/Image (8-bit encodings) -> (H, W, 3) RGB uint8 (mono is repeated to 3 channels)."""
    encoding = str(msg.encoding)
    if encoding not in _ENCODINGS:
        raise InvalidInput(f"{what}: encoding {encoding!r} is not one of {sorted(_ENCODINGS)}")
    channels, order = _ENCODINGS[encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    if step < w * channels or data.size < h * step:
        raise InvalidInput(f"{what}: {data.size} bytes do not hold {h}x{w} {encoding} with step {step}")
    pixels = data[: h * step].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if order is not None:
        pixels = pixels[..., order]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def compressed_array(msg: Any, what: str = "image") -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG/PNG) -> (H, W, 3) RGB uint8."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(memoryview(msg.data).tobytes())) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # Pillow raises several unrelated types for bad bytes
        raise InvalidInput(f"{what}: cannot decode compressed image ({msg.format!r}): {e}") from None


def image_msg(types: MessageTypes, pixels: np.ndarray, ns: int, frame_id: str = "") -> Any:
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image rgb8."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w, c = pixels.shape
    if c != 3:
        raise InvalidInput(f"image_msg wants (H, W, 3) RGB, got {pixels.shape}")
    return types.new(IMAGE, header=header(types, ns, frame_id), height=h, width=w, encoding="rgb8",
                     is_bigendian=0, step=w * 3, data=types.octets(pixels.tobytes()))


def compressed_image_msg(types: MessageTypes, data: bytes, fmt: str, ns: int, frame_id: str = "") -> Any:
    """Encoded bytes (``fmt`` "jpeg" or "png") -> sensor_msgs/CompressedImage."""
    return types.new(COMPRESSED_IMAGE, header=header(types, ns, frame_id), format=fmt, data=types.octets(data))


# --------------------------------------------------------------------- joints


def joint_vector(msg: Any, names: Sequence[str], fields: Sequence[str] = ("position",),
                 what: str = "joint state") -> np.ndarray:
    """sensor_msgs/JointState -> float32 values of ``names``, field after field, in that order."""
    index = {str(n): i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise InvalidInput(f"{what} lacks joints {missing} (it has {list(index)})")
    parts = []
    for field in fields:
        values = np.asarray(getattr(msg, field), dtype=np.float64)
        if values.size != len(index):
            raise InvalidInput(f"{what}: {field} has {values.size} values for {len(index)} joints")
        parts.append(values[[index[n] for n in names]])
    return np.concatenate(parts).astype(np.float32)


def joint_state_msg(types: MessageTypes, names: Sequence[str], positions: np.ndarray, ns: int) -> Any:
    """A sensor_msgs/JointState command (positions; velocity and effort empty)."""
    return types.new(JOINT_STATE, header=header(types, ns), name=list(names), position=types.floats(positions),
                     velocity=types.floats([]), effort=types.floats([]))


def multi_array_msg(types: MessageTypes, values: np.ndarray, msgtype: str = FLOAT64_MULTI_ARRAY,
                    label: str = "") -> Any:
    """std_msgs/Float64MultiArray (or Float32MultiArray) holding a 1-D vector."""
    values = np.asarray(values).reshape(-1)
    dim = types.new(MULTI_ARRAY_DIMENSION, label=label, size=int(values.size), stride=int(values.size))
    layout = types.new(MULTI_ARRAY_LAYOUT, dim=[dim], data_offset=0)
    dtype = "float32" if msgtype == FLOAT32_MULTI_ARRAY else "float64"
    return types.new(msgtype, layout=layout, data=types.floats(values, dtype))


def joint_trajectory_msg(types: MessageTypes, names: Sequence[str], positions: np.ndarray, ns: int,
                         time_from_start_s: float) -> Any:
    """A one-point trajectory_msgs/JointTrajectory reaching ``positions`` after ``time_from_start_s``."""
    point = types.new(JOINT_TRAJECTORY_POINT, positions=types.floats(positions), velocities=types.floats([]),
                      accelerations=types.floats([]), effort=types.floats([]),
                      time_from_start=duration_msg(types, time_from_start_s))
    return types.new(JOINT_TRAJECTORY, header=header(types, ns), joint_names=list(names), points=[point])


def action_msg(kind: str, types: MessageTypes, names: Sequence[str], action: np.ndarray, ns: int,
               time_from_start_s: float = 0.1) -> Any:
    """The action vector as the configured message kind (see config.ACTION_TYPES)."""
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.size != len(names):
        raise InvalidInput(f"action has {action.size} values for {len(names)} joints {list(names)}")
    if kind == "joint_state":
        return joint_state_msg(types, names, action, ns)
    if kind == "float64_multi_array":
        return multi_array_msg(types, action)
    if kind == "joint_trajectory":
        return joint_trajectory_msg(types, names, action, ns, time_from_start_s)
    raise InvalidInput(f"unknown action message kind {kind!r}; known: {sorted(ACTION_MSGTYPES)}")


def teleop_vector(msg: Any, kind: str, names: Sequence[str]) -> np.ndarray:
    """A teleop command (JointState by name, or Float64MultiArray in action order) -> action vector."""
    if kind == "joint_state":
        return joint_vector(msg, names, ("position",), "teleop command")
    values = np.asarray(msg.data, dtype=np.float32).reshape(-1)
    if values.size != len(names):
        raise InvalidInput(f"teleop command has {values.size} values for {len(names)} joints {list(names)}")
    return values
