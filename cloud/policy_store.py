"""Versioned policy store: a directory of versions plus a pointer in Redis.

Each version is a directory ``v00000042/`` holding ``manifest.json`` (per-tensor
dtype/shape/sha256, which tensors are trainable, the policy's LeRobot config) and
``model.safetensors``. A version is written into a temp directory, fsynced, and
renamed into place, so a reader never sees half a version. The newest version
number lives in Redis (``fleet:policy:latest``) so every gateway replica sees it;
version numbers come from a Redis counter, the directory and the newest version
a trainer checkpoint recorded (``ensure_above``), whichever is highest, so they
stay monotonic across learner restarts: a restarted learner never reuses a
number that edges already hold with other weights.

Where versions live is a :class:`PolicyBackend`; the one that exists is
:class:`DirectoryBackend` (local disk or a shared volume, e.g. a Kubernetes PVC). Another
backend would implement the same five methods (``put``, ``manifest``, ``payload``,
``tensors``, ``versions``) and make a version visible only once complete.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from safetensors import safe_open

from cloud.buffer import POLICY_COUNTER_KEY, policy_keys
from fleet.signing import ManifestSigner
from fleet.atomic import commit_dir, fresh_dir
from fleet.weights import (PIECE_BYTES, Manifest, build_manifest, read_safetensors_raw, safetensors_ranges,
                           write_safetensors)

if TYPE_CHECKING:  # the gateway serves raw bytes (read_safetensors_raw) and never imports torch
    import torch

log = logging.getLogger(__name__)

VERSION_COUNTER_KEY = POLICY_COUNTER_KEY
MANIFEST_CACHE = 8
"""Versions whose parsed files (manifest, safetensors header) a DirectoryBackend keeps, while unchanged."""
_SET_IF_GREATER = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]); return 1 end
return 0
"""


@runtime_checkable
class PolicyBackend(Protocol):
    """Storage of complete versions. Missing versions raise KeyError."""

    def put(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None: ...

    def manifest(self, version: int) -> Manifest: ...

    def payload(self, version: int) -> dict[str, memoryview]:
        """Each tensor's raw bytes (what the manifest's sha256 covers)."""

    def tensors(self, version: int) -> dict[str, torch.Tensor]: ...

    def versions(self) -> list[int]: ...


class DirectoryBackend:
    """``root/v00000042/{manifest.json,model.safetensors}``, each version renamed into place complete."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._parsed: dict[tuple[int, str], tuple[tuple[int, int, int], object]] = {}
        self._parse_lock = threading.Lock()

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def _file(self, version: int, name: str) -> Path:
        path = self._dir(version) / name
        if not path.exists():
            raise KeyError(f"policy version {version} is not in {self.root}")
        return path

    def versions(self) -> list[int]:
        out = []
        for p in self.root.glob("v*"):
            if p.is_dir() and (p / "manifest.json").exists():
                try:
                    out.append(int(p.name[1:]))
                except ValueError:
                    continue
        return sorted(out)

    def put(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        final = self._dir(manifest.version)
        if final.exists():
            raise FileExistsError(f"policy version {manifest.version} already exists at {final}")
        tmp = fresh_dir(self.root / f".tmp-v{manifest.version:08d}-{os.getpid()}")
        with open(tmp / "model.safetensors", "wb") as fh:  # straight from the tensors' memory
            write_safetensors(fh, {k: v.detach().cpu() for k, v in tensors.items()},
                              metadata={"version": str(manifest.version)})
        (tmp / "manifest.json").write_text(manifest.to_json())
        commit_dir(tmp, final)

    def _parse(self, version: int, name: str, parse):
        """``parse(path)`` of the version's file ``name``, once per file: kept while it is the same file (inode,
        mtime, size), for the last ``MANIFEST_CACHE`` versions. A gateway reads each new version's several
        times at once (the delta planned ahead, each transfer's plan): one parses while the others wait
        (~5-9 ms per manifest of a 450M-parameter VLA, ~1.5 ms per safetensors header)."""
        path = self._dir(version) / name
        try:
            st = path.stat()
        except OSError:  # as Path.exists() would say
            raise KeyError(f"policy version {version} is not in {self.root}") from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._parse_lock:
            cached = self._parsed.get((version, name))
            if cached is not None and cached[0] == key:
                return cached[1]
            value = parse(path)
            self._parsed[(version, name)] = (key, value)
            while len(self._parsed) > 2 * MANIFEST_CACHE:
                self._parsed.pop(next(iter(self._parsed)))
            return value

    def manifest(self, version: int) -> Manifest:
        """The version's manifest (parsed once per file)."""
        return self._parse(version, "manifest.json", lambda path: Manifest.from_json(path.read_text()))

    def tensors(self, version: int) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(self._file(version, "model.safetensors")), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
        return out

    def payload(self, version: int) -> dict[str, memoryview]:
        path, ranges = self.payload_file(version)
        return read_safetensors_raw(path, ranges)

    def payload_file(self, version: int) -> tuple[Path, dict[str, tuple[int, int]]]:
        """The file holding ``payload(version)`` and each tensor's (start, end) offsets in it (its header parsed
        once per file)."""
        path = self._dir(version) / "model.safetensors"
        return path, self._parse(version, "model.safetensors", safetensors_ranges)


class PolicyStore:
    """Versions in a backend (a directory path means DirectoryBackend) plus the pointer in Redis;
    ``redis`` is a sync redis.Redis (None = backend only). ``embodiment`` names the policy line
    (its own Redis pointer, counter and channel; "" = the shared line). With a ``signer`` (the
    publisher's key, ``fleet.signing``), every published manifest is signed before it is written."""

    def __init__(self, root: str | os.PathLike | PolicyBackend, redis=None, embodiment: str = "",
                 signer: ManifestSigner | None = None, piece_bytes: int = PIECE_BYTES):
        self.backend: PolicyBackend = root if isinstance(root, PolicyBackend) else DirectoryBackend(root)
        self.root = getattr(self.backend, "root", None)
        self._redis = redis
        self.keys = policy_keys(embodiment)
        self._floor = 0
        self.signer = signer
        self.piece_bytes = piece_bytes
        """Bytes per hashed piece of the tensors (the gateway sends raw tensors in these pieces)."""

    def versions(self) -> list[int]:
        return self.backend.versions()

    def ensure_above(self, version: int) -> None:
        """Make every later version number greater than ``version`` (e.g. one a checkpoint recorded)."""
        self._floor = max(self._floor, int(version))
        if self._redis is not None:
            self._redis.eval(_SET_IF_GREATER, 1, self.keys.counter, int(version))

    def next_version(self) -> int:
        local = max(self.versions(), default=0)
        if self._redis is None:
            return max(local, self._floor) + 1
        counter = int(self._redis.incr(self.keys.counter))
        latest = int(self._redis.get(self.keys.latest) or 0)
        version = max(counter, local + 1, latest + 1, self._floor + 1)
        if version > counter:
            self._redis.set(self.keys.counter, version)
        return version

    def publish(self, tensors: dict[str, torch.Tensor], config: dict, trainable: set[str] | None = None,
                parent_version: int | None = None, full_every_versions: int = 0) -> Manifest:
        """Write a new version atomically and point Redis at it.

        ``full_every_versions`` (N > 0): a version at least N after its parent's keyframe is a new keyframe,
        i.e. edges get it without element deltas (see Manifest.keyframe_version); 0 = never.
        """
        version = self.next_version()
        parent = parent_version if parent_version is not None else self.latest_version()
        manifest, _ = build_manifest(version, parent, tensors, config, trainable, created_s=time.time(),
                                     keyframe_version=self._keyframe(version, parent, full_every_versions),
                                     piece_bytes=self.piece_bytes)
        if self.signer is not None:
            manifest = self.signer.sign(manifest)
        self.put(manifest, tensors)
        if self._redis is not None:
            self._redis.eval(_SET_IF_GREATER, 1, self.keys.latest, version)
            self._redis.publish(self.keys.channel, str(version))
        log.info("published policy v%d (%.1f MB, %s)", version, manifest.total_bytes / 1e6,
                 f"signed by {self.signer.key_id}" if self.signer else "unsigned")
        return manifest

    def _keyframe(self, version: int, parent: int, full_every_versions: int) -> int:
        if full_every_versions < 0:
            raise ValueError(f"full_every_versions ({full_every_versions}) must be >= 0")
        try:
            parent_keyframe = self.backend.manifest(parent).keyframe_version if parent else 0
        except KeyError:
            parent_keyframe = 0
        if not parent_keyframe or (full_every_versions and version - parent_keyframe >= full_every_versions):
            return version
        return parent_keyframe

    def put(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        self.backend.put(manifest, tensors)

    def latest_version(self) -> int:
        if self._redis is not None:
            return int(self._redis.get(self.keys.latest) or 0)
        return max(self.versions(), default=0)

    def manifest(self, version: int) -> Manifest:
        return self.backend.manifest(version)

    def tensors(self, version: int) -> dict[str, torch.Tensor]:
        return self.backend.tensors(version)

    def payload(self, version: int) -> dict[str, memoryview]:
        """Raw bytes of each tensor, as the manifest's checksums cover them."""
        return self.backend.payload(version)

    def payload_file(self, version: int) -> tuple[Path, dict[str, tuple[int, int]]] | None:
        """Where ``payload(version)`` lies in a local file (what the weight side channel sendfile()s), or None
        for a backend without one."""
        payload_file = getattr(self.backend, "payload_file", None)
        return payload_file(version) if payload_file is not None else None
