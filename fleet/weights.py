"""Policy versions as bytes: manifests, per-tensor checksums, torch <-> raw bytes.

Shared by the publisher (cloud), the gateway (serves the bytes) and the edge
updater (assembles and verifies them). Tensors are only ever rebuilt with
``torch.frombuffer`` from bytes whose sha256 matched the manifest, or loaded
from safetensors: never ``torch.load``/pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch

from fleet.errors import IntegrityError

TORCH_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


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
            tensors = tuple(TensorEntry(name=t["name"], dtype=t["dtype"], shape=tuple(t["shape"]),
                                        nbytes=int(t["nbytes"]), sha256=t["sha256"],
                                        trainable=bool(t.get("trainable", True))) for t in data["tensors"])
            return Manifest(version=int(data["version"]), parent_version=int(data["parent_version"]),
                            tensors=tensors, total_sha256=data["total_sha256"], config=data.get("config", {}),
                            created_s=float(data.get("created_s", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed policy manifest: {exc}") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a tensor from raw bytes (copied, writable)."""
    tdtype = TORCH_DTYPES[dtype]
    if len(data) == 0:
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(bytearray(data), dtype=tdtype).reshape(shape).clone()


def build_manifest(version: int, parent_version: int, tensors: dict[str, torch.Tensor], config: dict,
                   trainable: set[str] | None, created_s: float) -> tuple[Manifest, dict[str, bytes]]:
    """Manifest plus the raw bytes of each tensor, in sorted name order."""
    entries, payload = [], {}
    total = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        data = tensor_bytes(t)
        payload[name] = data
        total.update(data)
        entries.append(TensorEntry(name=name, dtype=DTYPE_NAMES[t.dtype], shape=tuple(t.shape), nbytes=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(),
                                   trainable=True if trainable is None else name in trainable))
    manifest = Manifest(version=version, parent_version=parent_version, tensors=tuple(entries),
                        total_sha256=total.hexdigest(), config=config, created_s=created_s)
    return manifest, payload


def verify(manifest: Manifest, payload: dict[str, bytes | bytearray]) -> dict[str, torch.Tensor]:
    """Check every tensor's sha256 and the total; return the tensors or raise IntegrityError."""
    total = hashlib.sha256()
    out = {}
    for entry in manifest.tensors:
        data = payload.get(entry.name)
        if data is None:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} missing from the transfer")
        if len(data) != entry.nbytes:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} has {len(data)} bytes, "
                                 f"manifest says {entry.nbytes} (truncated transfer?)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise IntegrityError(f"policy v{manifest.version}: tensor {entry.name!r} sha256 {digest[:12]} != "
                                 f"manifest {entry.sha256[:12]} (corrupt transfer)")
        total.update(data)
        out[entry.name] = tensor_from_bytes(data, entry.dtype, entry.shape)
    if total.hexdigest() != manifest.total_sha256:
        raise IntegrityError(f"policy v{manifest.version}: total sha256 mismatch")
    return out
