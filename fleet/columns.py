"""A chunk of steps in columns: one array per feature, the form experience has on the wire,
in the buffer and in the sampler (Reverb's chunked trajectory columns).

:class:`Columns` holds ``n`` consecutive steps of one episode: each low-dim feature as one
``[n, *shape]`` array of its registered dtype, action / policy action ``[n, A]``, reward
(float32), timestamp (float64), policy version (uint64), the intervention/success/done flags
as bool arrays, every camera's ``n`` encoded frames, and the robot's help score (float32; None
for chunks of edges that do not record it).

Two byte formats live here (both little-endian, both read only after their lengths are checked):

* the buffer element (:func:`encode_element` / :func:`decode_element`), one Redis list element
  per chunk; its layout is written down in ``cloud/buffer/layout.py``;
* the frames container (:func:`pack_frames` / :func:`unpack_frames`): ``n`` encoded frames of
  one camera as one object (``u32 n, u32 end offset x n, frame bytes``), what the blob store
  keeps per (chunk, camera).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from fleet.codec import numpy_dtype
from fleet.errors import InvalidInput
from fleet.types import Chunk, EncodedImage, EpisodeSummary, Schema, Step

CODEC_RAW, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2
CODECS = {"raw": CODEC_RAW, "zstd": CODEC_ZSTD, "lz4": CODEC_LZ4}
FRAMES_NONE, FRAMES_INLINE, FRAMES_BLOB = 0, 1, 2
ELEMENT_MAGIC = b"FC2"
ELEMENT_MAGIC_HELP = b"FC3"
"""An element whose body carries the help score column (after policy version, before the flags)."""
_HEAD = struct.Struct("<I3sBBIQI")  # first_index (set by the Lua write), magic, codec, frames, n, first_seq, raw_len
HEAD_BYTES = _HEAD.size
MAX_FRAMES = 1 << 16
MAX_STEPS_PER_CHUNK = 1024


def schema_hash(schema: Schema) -> bytes:
    """16 bytes naming a schema: Register sends the schema once, each chunk names it by this hash."""
    from fleet.convert import schema_to_dict

    canon = json.dumps(schema_to_dict(schema), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canon.encode(), digest_size=16).digest()


@dataclass
class Columns:
    """``n`` consecutive steps of one episode, column by column."""

    first_seq: int
    observation: dict[str, np.ndarray]
    action: np.ndarray
    policy_action: np.ndarray
    reward: np.ndarray
    timestamp_s: np.ndarray
    policy_version: np.ndarray
    intervention: np.ndarray
    success: np.ndarray
    done: np.ndarray
    frames: dict[str, list[bytes]] = field(default_factory=dict)
    encodings: dict[str, str] = field(default_factory=dict)
    help: np.ndarray | None = None
    """The robot's need-for-help score per step (float32 [n], edge/help.py); None: not recorded."""

    @property
    def n(self) -> int:
        return len(self.reward)

    def tail(self, skip: int) -> Columns:
        """The steps after the first ``skip`` (views, no copy)."""
        return replace(self, first_seq=self.first_seq + skip,
                       observation={k: v[skip:] for k, v in self.observation.items()},
                       action=self.action[skip:], policy_action=self.policy_action[skip:], reward=self.reward[skip:],
                       timestamp_s=self.timestamp_s[skip:], policy_version=self.policy_version[skip:],
                       intervention=self.intervention[skip:], success=self.success[skip:], done=self.done[skip:],
                       frames={k: v[skip:] for k, v in self.frames.items()},
                       help=self.help[skip:] if self.help is not None else None)

    def steps(self, first_index: int, schema: Schema) -> list[Step]:
        """Back to per-step records (export, tools; never on a hot path)."""
        cams = {f.name: f for f in schema.observation if f.is_image}
        out = []
        for i in range(self.n):
            images = {name: EncodedImage(self.encodings.get(name, "jpeg"), spec.shape[0], spec.shape[1],
                                         spec.shape[2], self.frames[name][i])
                      for name, spec in cams.items() if name in self.frames}
            out.append(Step(seq=self.first_seq + i, index=first_index + i,
                            observation={k: v[i] for k, v in self.observation.items()},
                            policy_action=self.policy_action[i], action=self.action[i],
                            is_intervention=bool(self.intervention[i]), reward=float(self.reward[i]),
                            success=bool(self.success[i]), done=bool(self.done[i]),
                            policy_version=int(self.policy_version[i]), timestamp_s=float(self.timestamp_s[i]),
                            images=images, help_score=float(self.help[i]) if self.help is not None else 0.0))
        return out


@dataclass
class ColumnChunk:
    """A chunk as the gateway receives it: which robot/episode/task, which schema, and its columns."""

    robot_id: str
    episode_id: str
    task: str
    schema_hash: bytes
    columns: Columns
    gap_declared: bool = False
    evaluation: bool = False
    episode_end: EpisodeSummary | None = None


def from_chunk(chunk: Chunk, schema: Schema) -> ColumnChunk:
    """A per-step chunk (tests, offline import) as a columnar one."""
    return ColumnChunk(chunk.robot_id, chunk.episode_id, chunk.task, schema_hash(schema),
                       from_steps(chunk.steps, schema), chunk.gap_declared, chunk.evaluation, chunk.episode_end)


def from_steps(steps: list[Step], schema: Schema) -> Columns:
    """Stack per-step records into columns of the schema's dtypes (ValueError if they do not stack)."""
    if not steps:
        raise ValueError("no steps")
    obs = {f.name: np.stack([np.asarray(s.observation[f.name]) for s in steps]).astype(numpy_dtype(f.dtype), copy=False)
           for f in schema.observation if not f.is_image}
    act = numpy_dtype(schema.action.dtype)
    frames = {f.name: [s.images[f.name].data for s in steps] for f in schema.observation if f.is_image}
    encodings = {f.name: steps[0].images[f.name].encoding for f in schema.observation if f.is_image}
    return Columns(
        first_seq=steps[0].seq, observation=obs,
        action=np.stack([np.asarray(s.action) for s in steps]).astype(act, copy=False),
        policy_action=np.stack([np.asarray(s.policy_action) for s in steps]).astype(act, copy=False),
        reward=np.array([s.reward for s in steps], np.float32),
        timestamp_s=np.array([s.timestamp_s for s in steps], np.float64),
        policy_version=np.array([s.policy_version for s in steps], np.uint64),
        intervention=np.array([s.is_intervention for s in steps], bool),
        success=np.array([s.success for s in steps], bool), done=np.array([s.done for s in steps], bool),
        frames=frames, encodings=encodings, help=np.array([s.help_score for s in steps], np.float32))


def pack_flags(cols: Columns) -> bytes:
    """intervention, success, done: three bit planes of ceil(n/8) bytes each."""
    return np.packbits(np.stack([cols.intervention, cols.success, cols.done]), axis=1).tobytes()


def unpack_flags(data: bytes, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = (n + 7) // 8
    if len(data) != 3 * width:
        raise InvalidInput(f"flags: {len(data)} bytes for {n} steps, expected {3 * width} (3 bit planes)")
    planes = np.unpackbits(np.frombuffer(data, np.uint8).reshape(3, width), axis=1, count=n).astype(bool)
    return planes[0], planes[1], planes[2]


# --- frames container -----------------------------------------------------------------------------------------


def pack_frames(frames: list[bytes]) -> bytes:
    ends = np.cumsum([len(f) for f in frames], dtype=np.uint64) if frames else np.zeros(0, np.uint64)
    if len(ends) and ends[-1] >= 1 << 32:
        raise InvalidInput("a chunk's frames of one camera exceed 4 GiB")
    return b"".join([struct.pack("<I", len(frames)), ends.astype("<u4").tobytes(), *frames])


def unpack_frames(data: bytes | memoryview, what: str = "frames") -> list[bytes]:
    view = memoryview(data)
    if len(view) < 4:
        raise InvalidInput(f"{what}: {len(view)} bytes, too short for a frames container")
    (n,) = struct.unpack_from("<I", view)
    if n > MAX_FRAMES or len(view) < 4 + 4 * n:
        raise InvalidInput(f"{what}: container claims {n} frames in {len(view)} bytes")
    ends = np.frombuffer(view, "<u4", n, 4).astype(np.int64)
    base = 4 + 4 * n
    if n and (np.any(np.diff(ends) < 0) or base + ends[-1] != len(view)):
        raise InvalidInput(f"{what}: frame offsets do not fit the {len(view)} bytes")
    starts = np.concatenate([[0], ends[:-1]]) + base
    return [bytes(view[s:base + e]) for s, e in zip(starts.tolist(), ends.tolist())]


# --- the buffer element ---------------------------------------------------------------------------------------


def _low_dim(schema: Schema):
    return [f for f in schema.observation if not f.is_image]


def cameras(schema: Schema) -> list[str]:
    return [f.name for f in schema.observation if f.is_image]


def step_bytes(schema: Schema, help: bool = False) -> int:
    """Bytes one step's columns take in an element body (before compression), with or without the help score."""
    per = sum(math.prod(f.shape) * numpy_dtype(f.dtype).itemsize for f in _low_dim(schema))
    per += 2 * math.prod(schema.action.shape) * numpy_dtype(schema.action.dtype).itemsize + 4 + 8 + 8
    return per + 4 * help


def encode_element(cols: Columns, schema: Schema, codec: str = "zstd", frames_inline: bool = True,
                   min_gain: float = 0.9) -> bytes:
    """One chunk as its buffer element, first_index left 0 (the Lua write sets it). The low-dim body is
    compressed with ``codec`` only if that makes it smaller than ``min_gain`` x raw ("if it pays")."""
    parts = [np.ascontiguousarray(cols.observation[f.name]).tobytes() for f in _low_dim(schema)]
    parts += [np.ascontiguousarray(a).tobytes() for a in (cols.action, cols.policy_action)]
    parts += [cols.reward.astype("<f4").tobytes(), cols.timestamp_s.astype("<f8").tobytes(),
              cols.policy_version.astype("<u8").tobytes()]
    if cols.help is not None:
        parts.append(cols.help.astype("<f4").tobytes())
    parts.append(pack_flags(cols))
    body = b"".join(parts)
    raw_len, used = len(body), CODEC_RAW
    if codec != "raw" and len(body) > 256:
        packed = _compress(codec, body)
        if len(packed) < min_gain * len(body):
            body, used = packed, CODECS[codec]
    names = cameras(schema)
    where = FRAMES_NONE if not names else (FRAMES_INLINE if frames_inline else FRAMES_BLOB)
    magic = ELEMENT_MAGIC if cols.help is None else ELEMENT_MAGIC_HELP
    head = _HEAD.pack(0, magic, used, where, cols.n, cols.first_seq, raw_len)
    out = [head, struct.pack("<I", len(body)), body]
    if where == FRAMES_INLINE:
        for name in names:
            enc = cols.encodings.get(name, "jpeg").encode()
            packed = pack_frames(cols.frames[name])
            out += [struct.pack("<B", len(enc)), enc, struct.pack("<I", len(packed)), packed]
    return b"".join(out)


def set_first_index(element: bytes, first_index: int) -> bytes:
    """The element with its first_index field set (a copy only when it changes)."""
    if struct.unpack_from("<I", element)[0] == first_index:
        return element
    return struct.pack("<I", first_index) + element[4:]


@dataclass
class Element:
    """A decoded buffer element: where it sits in its episode, its columns, where its frames are."""

    first_index: int
    columns: Columns
    frames_where: int
    nbytes: int


def decode_element(data: bytes, schema: Schema, what: str = "element") -> Element:
    """Buffer element -> columns (InvalidInput on any length or format mismatch)."""
    if len(data) < HEAD_BYTES + 4:
        raise InvalidInput(f"{what}: {len(data)} bytes, too short")
    first_index, magic, codec, where, n, first_seq, raw_len = _HEAD.unpack_from(data)
    if magic not in (ELEMENT_MAGIC, ELEMENT_MAGIC_HELP):
        raise InvalidInput(f"{what}: not a chunk element (magic {magic!r})")
    has_help = magic == ELEMENT_MAGIC_HELP
    (blen,) = struct.unpack_from("<I", data, HEAD_BYTES)
    pos = HEAD_BYTES + 4
    body = data[pos:pos + blen]
    pos += blen
    if len(body) != blen:
        raise InvalidInput(f"{what}: body truncated")
    if codec != CODEC_RAW:
        body = _decompress(codec, body, raw_len, what)
    expected = n * step_bytes(schema, has_help) + 3 * ((n + 7) // 8)
    if len(body) != expected or raw_len != expected:
        raise InvalidInput(f"{what}: {len(body)} body bytes for {n} steps; the schema needs {expected}")
    off = 0

    def take(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal off
        count = n * math.prod(shape)
        arr = np.frombuffer(body, dtype, count, off).reshape((n, *shape))
        off += count * dtype.itemsize
        return arr

    obs = {f.name: take(numpy_dtype(f.dtype), f.shape) for f in _low_dim(schema)}
    adt = numpy_dtype(schema.action.dtype)
    action, policy_action = take(adt, schema.action.shape), take(adt, schema.action.shape)
    reward, ts, version = take(np.dtype("<f4"), ()), take(np.dtype("<f8"), ()), take(np.dtype("<u8"), ())
    help = take(np.dtype("<f4"), ()) if has_help else None
    inter, success, done = unpack_flags(body[off:], n)
    frames, encodings = {}, {}
    if where == FRAMES_INLINE:
        for name in cameras(schema):
            if pos + 1 > len(data):
                raise InvalidInput(f"{what}: frames of camera {name!r} missing")
            elen = data[pos]
            encodings[name] = data[pos + 1:pos + 1 + elen].decode(errors="replace")
            pos += 1 + elen
            (flen,) = struct.unpack_from("<I", data, pos) if pos + 4 <= len(data) else (-1,)
            if flen < 0 or pos + 4 + flen > len(data):
                raise InvalidInput(f"{what}: frames of camera {name!r} truncated")
            frames[name] = unpack_frames(memoryview(data)[pos + 4:pos + 4 + flen], f"{what} camera {name!r}")
            pos += 4 + flen
            if len(frames[name]) != n:
                raise InvalidInput(f"{what}: camera {name!r} holds {len(frames[name])} frames for {n} steps")
    cols = Columns(first_seq, obs, action, policy_action, reward, ts, version, inter, success, done, frames, encodings,
                   help)
    return Element(first_index, cols, where, len(data))


_zstd = threading.local()
"""This thread's zstd compressor and decompressor: a context is made once per thread, not per element (making
one, ~20 us, cost a low-dim chunk a fifth of its compression). A context serves one thread at a time."""


def _zstd_compressor():
    ctx = getattr(_zstd, "compressor", None)
    if ctx is None:
        import zstandard

        ctx = _zstd.compressor = zstandard.ZstdCompressor(level=1)
    return ctx


def _zstd_decompressor():
    ctx = getattr(_zstd, "decompressor", None)
    if ctx is None:
        import zstandard

        ctx = _zstd.decompressor = zstandard.ZstdDecompressor()
    return ctx


def _compress(codec: str, body: bytes) -> bytes:
    if codec == "zstd":
        return _zstd_compressor().compress(body)
    if codec == "lz4":
        import lz4.block

        return lz4.block.compress(body, store_size=False)
    raise InvalidInput(f"unknown buffer codec {codec!r}; use one of {sorted(CODECS)}")


def _decompress(codec: int, body: bytes, raw_len: int, what: str) -> bytes:
    try:
        if codec == CODEC_ZSTD:
            return _zstd_decompressor().decompress(body, max_output_size=raw_len)
        if codec == CODEC_LZ4:
            import lz4.block

            return lz4.block.decompress(body, uncompressed_size=raw_len)
    except Exception as exc:  # zstandard.ZstdError, lz4's LZ4BlockError
        raise InvalidInput(f"{what}: body cannot be decompressed ({exc})") from None
    raise InvalidInput(f"{what}: unknown codec {codec}")
