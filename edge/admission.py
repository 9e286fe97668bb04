"""What a robot accepts as a policy version, decided from the manifest alone, before any allocation.

A manifest comes from the network: it may lie. ``Admission.check`` runs on the header of every
transfer, before a byte of tensor data is kept:

* **memory bound**: the version's size (every tensor's dtype size x element count; the manifest
  parser already refuses an ``nbytes`` that disagrees with them) must fit ``max_bytes``, a local
  limit (``EdgeConfig.policy_max_bytes``);
* **pinned architecture**: the policy type, the robot schema and every tensor's name, dtype and
  shape must equal the pinned ones. The pin is local: a file named by the robot's config
  (``policy_architecture_file``, never written), or else ``<state_dir>/policy_architecture.json``,
  written from the first version this robot accepted (or from the last good policy on disk). A new
  version can change weights, never the model's shape; changing it is a local decision (point the
  config at another pin, or delete the written one).

A refused version raises :class:`PolicyRefused` with a bounded ``reason`` ("too_large",
"architecture"): the updater counts and logs it, tells the gateway (it sends only newer versions)
and the robot keeps acting with its current policy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fleet.convert import schema_from_dict, schema_to_dict
from fleet.errors import ConfigError, PolicyRefused
from fleet.weights import Manifest

log = logging.getLogger(__name__)

ARCHITECTURE_FILE = "policy_architecture.json"
REFUSAL_REASONS = ("too_large", "architecture", "signature", "downgrade")
"""Every reason a version is refused from its manifest alone (``signature``: ``fleet.signing``; ``downgrade``:
not newer than the held version, ``edge.updater``)."""


def architecture(manifest: Manifest) -> dict:
    """The part of a version that fixes the model's shape (JSON-able): policy type, schema, tensor layout."""
    config = manifest.config if isinstance(manifest.config, dict) else {}
    policy_config = config.get("policy_config")
    return {"policy_type": policy_config.get("type", "") if isinstance(policy_config, dict) else "",
            "schema": _schema(config.get("schema")),
            "tensors": [[t.name, t.dtype, list(t.shape)] for t in manifest.tensors]}


def _schema(data):
    """A schema in its one JSON form (fleet.convert), so that a pin written before a field was added
    (allow_nonfinite) still matches; anything unreadable is kept as it is (and will not match)."""
    try:
        return schema_to_dict(schema_from_dict(data))
    except (KeyError, TypeError, ValueError):
        return data


def _differences(pinned: dict, got: dict, limit: int = 3) -> str:
    """A short description of how ``got`` differs from ``pinned``."""
    out = [f"{key}: {pinned.get(key)!r} -> {got.get(key)!r}" for key in ("policy_type", "schema")
           if pinned.get(key) != got.get(key)]
    mine = {t[0]: t[1:] for t in pinned.get("tensors", [])}
    theirs = {t[0]: t[1:] for t in got.get("tensors", [])}
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            out.append(f"tensor {name!r}: {mine.get(name)} -> {theirs.get(name)}")
    shown = "; ".join(out[:limit]) if out else "tensor order"
    return shown + (f" (+{len(out) - limit} more)" if len(out) > limit else "")


class Admission:
    """The memory bound and the architecture pin of one robot (see the module docstring)."""

    def __init__(self, max_bytes: int, state_dir: str | os.PathLike, pin_file: str = ""):
        if max_bytes <= 0:
            raise ConfigError(f"policy_max_bytes ({max_bytes}) must be > 0")
        self.max_bytes = max_bytes
        self._fixed = bool(pin_file)
        self.path = Path(pin_file) if pin_file else Path(state_dir) / ARCHITECTURE_FILE
        self.pinned: dict | None = None
        if self.path.exists():
            try:
                self.pinned = json.loads(self.path.read_text())
                if isinstance(self.pinned, dict) and "schema" in self.pinned:
                    self.pinned["schema"] = _schema(self.pinned["schema"])
            except (OSError, ValueError) as exc:
                raise ConfigError(f"policy architecture pin {str(self.path)!r} is unreadable: {exc}") from None
            if not isinstance(self.pinned, dict) or not isinstance(self.pinned.get("tensors"), list):
                raise ConfigError(f"policy architecture pin {str(self.path)!r} must be a JSON object with "
                                  f'"tensors" (as written by the edge: docs/policy-distribution.md)')
        elif self._fixed:
            raise ConfigError(f"policy_architecture_file {pin_file!r} does not exist")

    def check(self, manifest: Manifest) -> None:
        """Raise PolicyRefused if ``manifest`` is too large for this robot or has another architecture."""
        total = manifest.total_bytes
        if total > self.max_bytes:
            raise PolicyRefused(f"policy v{manifest.version} needs {total} bytes, more than this robot's "
                                f"policy_max_bytes ({self.max_bytes})", manifest.version, "too_large")
        if self.pinned is not None:
            got = architecture(manifest)
            if got != self.pinned:
                raise PolicyRefused(f"policy v{manifest.version} has another architecture than the one pinned in "
                                    f"{self.path} ({_differences(self.pinned, got)})", manifest.version,
                                    "architecture")

    def accepted(self, manifest: Manifest) -> None:
        """After a version was verified, built and probed: pin its architecture if nothing is pinned yet."""
        if self.pinned is not None:
            return
        pin = architecture(manifest)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(pin, sort_keys=True))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # still pinned in memory for this run
            log.warning("could not write the policy architecture pin %s: %s", self.path, exc)
        self.pinned = pin
        log.info("policy architecture pinned from v%d (%d tensors) in %s", manifest.version,
                 len(manifest.tensors), self.path)
