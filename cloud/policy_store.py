"""Versioned policy store: a directory of versions plus a pointer in Redis.

Each version is a directory ``v00000042/`` holding ``manifest.json`` (per-tensor
dtype/shape/sha256, which tensors are trainable, the policy's LeRobot config) and
``model.safetensors``. A version is written into a temp directory, fsynced, and
renamed into place, so a reader never sees half a version. The newest version
number lives in Redis (``fleet:policy:latest``) so every gateway replica sees it;
version numbers come from a Redis counter and the directory, whichever is
higher, so they stay monotonic across learner restarts.

The directory is the default backend (local disk or a shared volume); an object
store implements the same four methods (``put``, ``manifest``, ``payload``,
``versions``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cloud.buffer import POLICY_CHANNEL, POLICY_LATEST_KEY
from fleet.weights import Manifest, build_manifest, tensor_bytes

log = logging.getLogger(__name__)

VERSION_COUNTER_KEY = "fleet:policy:counter"
_SET_IF_GREATER = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]); return 1 end
return 0
"""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PolicyStore:
    """Directory-backed versions; ``redis`` is a sync redis.Redis (None = directory only)."""

    def __init__(self, root: str | os.PathLike, redis=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._redis = redis

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def versions(self) -> list[int]:
        out = []
        for p in self.root.glob("v*"):
            if p.is_dir() and (p / "manifest.json").exists():
                try:
                    out.append(int(p.name[1:]))
                except ValueError:
                    continue
        return sorted(out)

    def next_version(self) -> int:
        local = max(self.versions(), default=0)
        if self._redis is None:
            return local + 1
        counter = int(self._redis.incr(VERSION_COUNTER_KEY))
        latest = int(self._redis.get(POLICY_LATEST_KEY) or 0)
        version = max(counter, local + 1, latest + 1)
        if version > counter:
            self._redis.set(VERSION_COUNTER_KEY, version)
        return version

    def publish(self, tensors: dict[str, torch.Tensor], config: dict, trainable: set[str] | None = None,
                parent_version: int | None = None) -> Manifest:
        """Write a new version atomically and point Redis at it."""
        version = self.next_version()
        parent = parent_version if parent_version is not None else self.latest_version()
        manifest, _ = build_manifest(version, parent, tensors, config, trainable, created_s=time.time())
        self.put(manifest, tensors)
        if self._redis is not None:
            self._redis.eval(_SET_IF_GREATER, 1, POLICY_LATEST_KEY, version)
            self._redis.publish(POLICY_CHANNEL, str(version))
        log.info("published policy v%d (%.1f MB)", version, manifest.total_bytes / 1e6)
        return manifest

    def put(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        final = self._dir(manifest.version)
        if final.exists():
            raise FileExistsError(f"policy version {manifest.version} already exists at {final}")
        tmp = self.root / f".tmp-v{manifest.version:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"version": str(manifest.version)})
        (tmp / "manifest.json").write_text(manifest.to_json())
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.root)

    def latest_version(self) -> int:
        if self._redis is not None:
            return int(self._redis.get(POLICY_LATEST_KEY) or 0)
        return max(self.versions(), default=0)

    def manifest(self, version: int) -> Manifest:
        return Manifest.from_json((self._dir(version) / "manifest.json").read_text())

    def tensors(self, version: int) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(self._dir(version) / "model.safetensors"), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
        return out

    def payload(self, version: int) -> dict[str, bytes]:
        """Raw bytes of each tensor, as the manifest's checksums cover them."""
        return {name: tensor_bytes(t) for name, t in self.tensors(version).items()}
