"""Policy versions as bytes: manifests, per-tensor checksums, torch <-> raw bytes.

Shared by the publisher (cloud), the gateway (serves the bytes) and the edge
updater (assembles and verifies them). Tensors are only ever rebuilt with
``torch.frombuffer`` from bytes whose sha256 matched the manifest, or loaded
from safetensors: never ``torch.load``/pickle.

The manifest's ``total_sha256`` covers every tensor's name, dtype, shape and
sha256 in manifest order, so a receiver that kept some tensors from the version
it already had (a delta) checks the whole version without re-hashing those.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from fleet.errors import IntegrityError

if TYPE_CHECKING:  # torch is imported where tensors are made: the gateway serves bytes and never imports it
    import torch

DTYPE_SIZES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int16": 2,
               "int32": 4, "int64": 8, "bool": 1}
"""Bytes per element of every dtype a policy version may hold (the wire's dtype names)."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name."""
    import torch

    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (one of DTYPE_SIZES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return name


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    trainable: bool = True


@dataclass(frozen=True)
class Manifest:
    """What a policy version is: its tensors (in order) and the config to rebuild the policy."""

    version: int
    parent_version: int
    tensors: tuple[TensorEntry, ...]
    total_sha256: str
    config: dict = field(default_factory=dict)
    created_s: float = 0.0
    keyframe_version: int = 0
    """Newest full version at or before this one: deltas to this version are made only from bases at or
    after it (periodic full versions bound the chain of deltas an edge applies); 0 = any base."""
    signature: dict = field(default_factory=dict)
    """The publisher's signature over everything else here, ``{"key_id", "ed25519"}`` (``fleet.signing``);
    {} = unsigned (refused by a robot that pins a publisher key)."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> str:
        data = asdict(self)
        data["tensors"] = [asdict(t) for t in self.tensors]
        return json.dumps(data, sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> "Manifest":
        try:
            data = json.loads(text)
            tensors = tuple(_entry(t) for t in data["tensors"])
            return Manifest(version=int(data["version"]), parent_version=int(data["parent_version"]),
                            tensors=tensors, total_sha256=data["total_sha256"], config=data.get("config", {}),
                            created_s=float(data.get("created_s", 0.0)),
                            keyframe_version=int(data.get("keyframe_version", 0)),
                            signature=_signature(data.get("signature", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed policy manifest: {exc}") from None


def _signature(sig) -> dict:
    """A manifest's signature field: a JSON object of short strings (checked, not verified, here)."""
    if not isinstance(sig, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 256
                                            for k, v in sig.items()) or len(sig) > 4:
        raise ValueError("signature must be an object of at most 4 short strings")
    return dict(sig)


def _entry(t: dict) -> TensorEntry:
    """One manifest tensor, checked for consistency: a known dtype, non-negative integer dimensions and
    ``nbytes`` equal to dtype size x element count (a manifest cannot claim one size and ship another)."""
    name, dtype, shape, nbytes = str(t["name"]), t["dtype"], t["shape"], t["nbytes"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} shape {shape!r} must be a list of non-negative integers")
    if type(nbytes) is not int or nbytes != DTYPE_SIZES[dtype] * math.prod(shape):
        raise ValueError(f"tensor {name!r}: nbytes {nbytes!r} != {dtype} x {shape}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), nbytes=nbytes, sha256=str(t["sha256"]),
                       trainable=bool(t.get("trainable", True)))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a tensor from raw bytes: shares memory with a ``bytearray`` (never mutate it afterwards), copies
    anything read-only once."""
    import torch

    tdtype = torch_dtype(dtype)
    if len(data) == 0:
        return torch.empty(shape, dtype=tdtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=tdtype).reshape(shape)


def total_digest(entries: Iterable[TensorEntry]) -> str:
    """sha256 over every tensor's name, dtype, shape and sha256, in order."""
    total = hashlib.sha256()
    for e in entries:
        total.update(f"{e.name}\t{e.dtype}\t{list(e.shape)}\t{e.sha256}\n".encode())
    return total.hexdigest()


def build_manifest(version: int, parent_version: int, tensors: dict[str, torch.Tensor], config: dict,
                   trainable: set[str] | None, created_s: float,
                   keyframe_version: int = 0) -> tuple[Manifest, dict[str, bytes]]:
    """Manifest plus the raw bytes of each tensor, in sorted name order."""
    entries, payload = [], {}
    for name in sorted(tensors):
        t = tensors[name]
        data = tensor_bytes(t)
        payload[name] = data
        entries.append(TensorEntry(name=name, dtype=dtype_name(t.dtype), shape=tuple(t.shape), nbytes=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(),
                                   trainable=True if trainable is None else name in trainable))
    manifest = Manifest(version=version, parent_version=parent_version, tensors=tuple(entries),
                        total_sha256=total_digest(entries), config=config, created_s=created_s,
                        keyframe_version=keyframe_version)
    return manifest, payload


def verify(manifest: Manifest, payload: Mapping[str, bytes | bytearray | memoryview],
           verified: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Check every tensor's size and sha256 (except names in ``verified``: bytes the caller already checked
    against this same sha256) and the total; return the tensors or raise IntegrityError."""
    if total_digest(manifest.tensors) != manifest.total_sha256:
        raise IntegrityError(f"policy v{manifest.version}: total sha256 does not match its tensor list")
    out = {}
    for entry in manifest.tensors:
        data = payload.get(entry.name)
        if data is None:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} missing from the transfer")
        if len(data) != entry.nbytes:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} has {len(data)} bytes, "
                                 f"manifest says {entry.nbytes} (truncated transfer?)")
        if entry.name not in verified:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} sha256 {digest[:12]} != "
                                     f"manifest {entry.sha256[:12]} (corrupt transfer)")
        out[entry.name] = tensor_from_bytes(data, entry.dtype, entry.shape)
    return out


_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I8": "int8",
                       "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def read_safetensors_raw(path: str | Path) -> dict[str, memoryview]:
    """Each tensor's raw bytes in a safetensors file, as read-only views into the memory-mapped file (no
    torch, no copy; the mapping lives as long as a view does)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    if len(data) < 8:
        raise IntegrityError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8:8 + header_len])
    except ValueError as exc:
        raise IntegrityError(f"{path}: malformed safetensors header: {exc}") from None
    body = memoryview(data)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise IntegrityError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(body):
            raise IntegrityError(f"{path}: tensor {name!r} lies outside the file ({start}..{end})")
        out[name] = body[start:end]
    return out
