"""The last good policy on the edge's disk: what a robot restarts from, and what a rollback reloads."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from edge.assembler import Held
from fleet.atomic import commit_dir, fresh_dir
from fleet.errors import IntegrityError, PolicyRefused
from fleet.signing import PinnedKeys
from fleet.weights import Manifest, check_digest, check_total, read_safetensors_raw, verify

log = logging.getLogger(__name__)


class LastGood:
    """The last good policy on local disk: manifest.json + model.safetensors, swapped atomically.

    The previous one stays in ``<dir>.prev`` so that a version rolled back after the swap can be reverted.
    The manifest is stored with its publisher signature; with ``pinned_keys`` a saved policy is used only if
    that signature verifies again (a key unpinned since, or a file edited on disk, leaves the robot without it).
    """

    def __init__(self, directory: str | Path, pinned_keys: PinnedKeys | None = None):
        self.dir = Path(directory)
        self.prev = self.dir.with_name(self.dir.name + ".prev")
        self.pinned_keys = pinned_keys

    def save(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_dir(self.dir.with_name(self.dir.name + ".tmp"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / "manifest.json").write_text(manifest.to_json())
        commit_dir(tmp, self.dir, previous=self.prev)  # the parent is fsynced too: the swap survives a power loss

    def version(self) -> int:
        """Version of the saved policy (0 = none or unreadable)."""
        try:
            return Manifest.from_json((self.dir / "manifest.json").read_text()).version
        except (OSError, IntegrityError):
            return 0

    def revert(self, bad_version: int) -> bool:
        """If the saved policy is ``bad_version``, put the previous one back. Returns True if it did."""
        if self.version() != bad_version or not (self.prev / "manifest.json").exists():
            return False
        bad = self.dir.with_name(self.dir.name + ".bad")
        shutil.rmtree(bad, ignore_errors=True)
        os.rename(self.dir, bad)
        os.rename(self.prev, self.dir)
        shutil.rmtree(bad, ignore_errors=True)
        return True

    def load_views(self) -> Held | None:
        """The saved version, verified, its bytes read-only views of the memory-mapped file (no copy); None
        if absent or corrupt (with a warning)."""
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.exists():
            return None
        try:
            manifest = Manifest.from_json(manifest_path.read_text())
            if self.pinned_keys is not None:
                self.pinned_keys.verify(manifest)
            payload = read_safetensors_raw(self.dir / "model.safetensors")
            check_total(manifest)
            for entry in manifest.tensors:
                data = payload.get(entry.name)
                if data is None or len(data) != entry.nbytes:
                    raise IntegrityError(f"tensor {entry.name!r} missing or of the wrong size")
                check_digest(manifest, entry, data)
            return Held(manifest, payload)
        except (IntegrityError, PolicyRefused, OSError, ValueError) as exc:
            log.warning("last good policy in %s is unusable (%s); ignoring it", self.dir, exc)
            return None

    def load_held(self) -> Held | None:
        """:meth:`load_views` with the bytes copied into memory."""
        held = self.load_views()
        return None if held is None else Held(held.manifest, {k: bytearray(v) for k, v in held.payload.items()})

    def load(self) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
        """Verified (manifest, tensors), or None if absent or corrupt (with a warning)."""
        held = self.load_held()
        if held is None:
            return None
        return held.manifest, verify(held.manifest, held.payload, frozenset(held.payload))
