"""Policy versions as bytes: manifests, per-piece checksums, torch <-> raw bytes.

Shared by the publisher (cloud), the gateway (serves the bytes) and the edge
updater (assembles and verifies them). Tensors are only ever rebuilt from bytes
whose digest matched the manifest, or loaded from safetensors: never
``torch.load``/pickle.

Each tensor's raw bytes are cut into pieces of ``piece_bytes`` (1 MiB); the
manifest lists every piece's BLAKE3 digest, and the tensor's ``digest`` is the
BLAKE3 of its piece digests (a hash list). A receiver checks each piece as it
arrives, against the manifest, without waiting for the whole tensor. BLAKE3,
not sha256, because it is what keeps up with the link on one core: 3.6 GB/s
against sha256's 1.6 GB/s (SHA-NI) on the 2-core bench machine, 1 MiB pieces.
Manifests written before (``hash`` "sha256", no pieces) still verify: the
digest is then the tensor's sha256.

The manifest's ``total_sha256`` covers every tensor's name, dtype, shape and
digest in manifest order (and the hash algorithm and piece size), so a receiver
that kept some tensors from the version it already had (a delta) checks the
whole version without re-hashing those.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from typing import TYPE_CHECKING

import blake3

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
HASH = "blake3"
"""What new manifests use (see the module docstring); "sha256" only in manifests written before."""
PIECE_BYTES = 1 << 20
"""Bytes per hashed piece in new manifests (the gateway sends raw tensors in the same pieces)."""
_HASHES = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
_MIN_PIECE_BYTES, _MAX_PIECE_BYTES = 1 << 12, 1 << 26


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str
    """With piece hashes: the manifest's hash over the piece digests (bytes); without: over the tensor bytes."""
    trainable: bool = True
    pieces: tuple[str, ...] = ()
    """Digest of each ``Manifest.piece_bytes`` slice of the raw bytes, in order (empty: no piece hashes)."""


_ENTRY_FIELDS = fields(TensorEntry)


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
    hash: str = "sha256"
    """Algorithm of every digest here: "blake3" (with piece hashes) or "sha256" (manifests written before)."""
    piece_bytes: int = 0
    """Bytes per hashed piece (0 = no piece hashes: each digest covers its whole tensor)."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> str:
        """The manifest as JSON (written once per instance and kept: a manifest is a value, never changed)."""
        text = self.__dict__.get("_json")
        if text is None:
            # The fields as they are (json.dumps writes tuples as lists), not dataclasses.asdict: that
            # deep-copies every tensor's piece digests first, ~4x the time for a 450M-parameter manifest.
            data = {f.name: getattr(self, f.name) for f in fields(self)}
            data["tensors"] = [{f.name: getattr(t, f.name) for f in _ENTRY_FIELDS} for t in self.tensors]
            text = self.__dict__["_json"] = json.dumps(data, sort_keys=True)
        return text

    @staticmethod
    def from_json(text: str | bytes) -> "Manifest":
        try:
            data = json.loads(text)
            algo, piece_bytes = str(data.get("hash", "sha256")), data.get("piece_bytes", 0)
            if algo not in _HASHES:
                raise ValueError(f"unknown hash {algo!r} (this build knows {sorted(_HASHES)})")
            if type(piece_bytes) is not int or (piece_bytes and not
                                                _MIN_PIECE_BYTES <= piece_bytes <= _MAX_PIECE_BYTES):
                raise ValueError(f"piece_bytes {piece_bytes!r} must be 0 or in [{_MIN_PIECE_BYTES}, "
                                 f"{_MAX_PIECE_BYTES}]")
            tensors = tuple(_entry(t, algo, piece_bytes) for t in data["tensors"])
            return Manifest(version=int(data["version"]), parent_version=int(data["parent_version"]),
                            tensors=tensors, total_sha256=data["total_sha256"], config=data.get("config", {}),
                            created_s=float(data.get("created_s", 0.0)),
                            keyframe_version=int(data.get("keyframe_version", 0)),
                            signature=_signature(data.get("signature", {})), hash=algo, piece_bytes=piece_bytes)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed policy manifest: {exc}") from None


def _signature(sig) -> dict:
    """A manifest's signature field: a JSON object of short strings (checked, not verified, here)."""
    if not isinstance(sig, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 256
                                            for k, v in sig.items()) or len(sig) > 4:
        raise ValueError("signature must be an object of at most 4 short strings")
    return dict(sig)


def _entry(t: dict, algo: str, piece_bytes: int) -> TensorEntry:
    """One manifest tensor, checked for consistency: a known dtype, non-negative integer dimensions,
    ``nbytes`` equal to dtype size x element count (a manifest cannot claim one size and ship another) and,
    with piece hashes, one piece digest per piece whose hash list is the tensor's digest."""
    name, dtype, shape, nbytes = str(t["name"]), t["dtype"], t["shape"], t["nbytes"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} shape {shape!r} must be a list of non-negative integers")
    if type(nbytes) is not int or nbytes != DTYPE_SIZES[dtype] * math.prod(shape):
        raise ValueError(f"tensor {name!r}: nbytes {nbytes!r} != {dtype} x {shape}")
    digest = str(t["digest"] if "digest" in t else t["sha256"])
    pieces = t.get("pieces", [])
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        raise ValueError(f"tensor {name!r}: pieces must be a list of hex digests")
    if piece_bytes:
        if len(pieces) != -(-nbytes // piece_bytes):
            raise ValueError(f"tensor {name!r}: {len(pieces)} piece digests for {nbytes} bytes in pieces of "
                             f"{piece_bytes}")
        if hash_list(algo, pieces) != digest:
            raise ValueError(f"tensor {name!r}: digest is not the hash of its piece digests")
    elif pieces:
        raise ValueError(f"tensor {name!r} lists piece digests but the manifest has no piece_bytes")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), nbytes=nbytes, digest=digest,
                       trainable=bool(t.get("trainable", True)), pieces=tuple(pieces))


def tensor_view(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (any dtype, bf16 included) without a copy when it is
    contiguous (the view shares the tensor's memory: writing it writes the tensor)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A copy of :func:`tensor_view`."""
    return bytes(tensor_view(t))


def piece_digest(algo: str, data) -> str:
    return _HASHES[algo](data).hexdigest()


def hash_list(algo: str, pieces: Iterable[str]) -> str:
    """A tensor's digest from its piece digests."""
    return _HASHES[algo](b"".join(bytes.fromhex(p) for p in pieces)).hexdigest()


def piece_digests(data, algo: str = HASH, piece_bytes: int = PIECE_BYTES) -> tuple[str, ...]:
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    return tuple(piece_digest(algo, view[o:o + piece_bytes]) for o in range(0, len(view), piece_bytes))


def digest_of(manifest: Manifest, data) -> str:
    """What ``data`` (a tensor's raw bytes) hashes to, as the manifest's ``digest`` of that tensor would."""
    if manifest.piece_bytes:
        return hash_list(manifest.hash, piece_digests(data, manifest.hash, manifest.piece_bytes))
    return piece_digest(manifest.hash, data)


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a tensor from raw bytes: shares memory with a ``bytearray`` or writable view (never mutate it
    afterwards), copies anything read-only once."""
    import torch

    tdtype = torch_dtype(dtype)
    if len(data) == 0:
        return torch.empty(shape, dtype=tdtype)
    writable = isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly)
    buf = data if writable else bytearray(data)
    return torch.frombuffer(buf, dtype=tdtype).reshape(shape)


def total_digest(entries: Iterable[TensorEntry], algo: str = "sha256", piece_bytes: int = 0) -> str:
    """sha256 over the hash algorithm and piece size (when not the old sha256 wholes) and every tensor's
    name, dtype, shape and digest, in order."""
    total = hashlib.sha256()
    if (algo, piece_bytes) != ("sha256", 0):
        total.update(f"hash\t{algo}\t{piece_bytes}\n".encode())
    for e in entries:
        total.update(f"{e.name}\t{e.dtype}\t{list(e.shape)}\t{e.digest}\n".encode())
    return total.hexdigest()


def manifest_total(manifest: Manifest) -> str:
    return total_digest(manifest.tensors, manifest.hash, manifest.piece_bytes)


def build_manifest(version: int, parent_version: int, tensors: dict[str, torch.Tensor], config: dict,
                   trainable: set[str] | None, created_s: float,
                   keyframe_version: int = 0, piece_bytes: int = PIECE_BYTES) -> tuple[Manifest, dict[str, memoryview]]:
    """Manifest plus the raw bytes of each tensor (views of CPU tensors, no copy), in sorted name order."""
    entries, payload = [], {}
    for name in sorted(tensors):
        t = tensors[name]
        data = tensor_view(t)
        payload[name] = data
        pieces = piece_digests(data, HASH, piece_bytes)
        entries.append(TensorEntry(name=name, dtype=dtype_name(t.dtype), shape=tuple(t.shape), nbytes=len(data),
                                   digest=hash_list(HASH, pieces), pieces=pieces,
                                   trainable=True if trainable is None else name in trainable))
    manifest = Manifest(version=version, parent_version=parent_version, tensors=tuple(entries),
                        total_sha256=total_digest(entries, HASH, piece_bytes), config=config, created_s=created_s,
                        keyframe_version=keyframe_version, hash=HASH, piece_bytes=piece_bytes)
    return manifest, payload


def verify(manifest: Manifest, payload: Mapping[str, bytes | bytearray | memoryview],
           verified: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Check every tensor's size and digest (except names in ``verified``: bytes the caller already checked
    against this same digest) and the total; return the tensors or raise IntegrityError."""
    check_total(manifest)
    out = {}
    for entry in manifest.tensors:
        data = payload.get(entry.name)
        if data is None:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} missing from the transfer")
        if len(data) != entry.nbytes:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} has {len(data)} bytes, "
                                 f"manifest says {entry.nbytes} (truncated transfer?)")
        if entry.name not in verified:
            check_digest(manifest, entry, data)
        out[entry.name] = tensor_from_bytes(data, entry.dtype, entry.shape)
    return out


def check_total(manifest: Manifest) -> None:
    if manifest_total(manifest) != manifest.total_sha256:
        raise IntegrityError(f"policy v{manifest.version}: total sha256 does not match its tensor list")


def check_digest(manifest: Manifest, entry: TensorEntry, data) -> None:
    """IntegrityError naming the tensor unless ``data`` hashes to its digest."""
    digest = digest_of(manifest, data)
    if digest != entry.digest:
        raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} {manifest.hash} {digest[:12]} != "
                             f"manifest {entry.digest[:12]} (corrupt transfer)")


_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I8": "int8",
                       "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _safetensors_ranges(path, data) -> dict[str, tuple[int, int]]:
    """Each tensor's (start, end) byte offsets within the safetensors file whose first bytes are ``data``
    (at least the header), checked against the file's ``size``."""
    if len(data) < 8:
        raise IntegrityError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8:8 + header_len])
    except ValueError as exc:
        raise IntegrityError(f"{path}: malformed safetensors header: {exc}") from None
    body, size = 8 + header_len, os.path.getsize(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise IntegrityError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= size - body:
            raise IntegrityError(f"{path}: tensor {name!r} lies outside the file ({start}..{end})")
        out[name] = (body + start, body + end)
    return out


def read_safetensors_raw(path: str | Path, ranges: dict[str, tuple[int, int]] | None = None
                         ) -> dict[str, memoryview]:
    """Each tensor's raw bytes in a safetensors file, as read-only views into the memory-mapped file (no
    torch, no copy; the mapping lives as long as a view does). ``ranges``: the file's
    :func:`safetensors_ranges`, when the caller has them already."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    if ranges is None:
        ranges = _safetensors_ranges(path, data)
    elif any(end > size for _, end in ranges.values()):
        raise IntegrityError(f"{path}: shorter ({size} bytes) than its header says")
    view = memoryview(data)
    return {name: view[start:end] for name, (start, end) in ranges.items()}


def safetensors_ranges(path: str | Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (start, end) byte offsets within a safetensors file (reads only its header): what
    ``os.sendfile`` serves."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            head += fh.read(min(struct.unpack_from("<Q", head)[0], 1 << 28))
    return _safetensors_ranges(path, head)


_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(fh, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU) as a safetensors file to the open binary file ``fh``, straight from their
    memory: no serialised copy of the whole state (``safetensors.torch.save_file`` makes one)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    views, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        view = tensor_view(t)
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype_name(t.dtype)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(view)]}
        views.append(view)
        offset += len(view)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    fh.write(struct.pack("<Q", len(encoded)))
    fh.write(encoded)
    for view in views:
        fh.write(view)
