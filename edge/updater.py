"""Receive new policy versions in the background, verify them, hand them to hot-swap.

The updater watches the gateway for versions newer than the one it has,
assembles each transfer in memory, checks every tensor's sha256 and the total,
builds the policy off the control thread, checks it produces finite actions,
stores it on local disk as the *last good* policy (atomically) and offers it to
the PolicySlot, which swaps it in at the next episode boundary. A corrupt or
truncated transfer is rejected; the old policy keeps running and the watch is
retried. On restart with the cloud down, the edge starts from the last good
policy on disk after verifying its checksums.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edge.client import FleetClient, PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent
from edge.hotswap import PolicySlot
from edge.streamer import Backoff
from fleet.errors import IntegrityError
from fleet.types import Schema
from fleet.weights import Manifest, tensor_bytes, verify

log = logging.getLogger(__name__)

PolicyBuilder = Callable[[Manifest, dict[str, torch.Tensor]], object]


class Assembler:
    """Collects one transfer (header, pieces, trailer) and verifies it."""

    def __init__(self, header: PolicyHeaderEvent):
        if header.base_version != 0:
            raise IntegrityError(f"delta transfers (base v{header.base_version}) are not supported by this edge")
        self.manifest = Manifest.from_json(header.manifest_json)
        if self.manifest.version != header.version:
            raise IntegrityError(f"header says v{header.version} but its manifest says v{self.manifest.version}")
        self._sizes = {t.name: t.nbytes for t in self.manifest.tensors}
        self._buffers = {name: bytearray(size) for name, size in self._sizes.items()}
        self._received = {name: 0 for name in self._sizes}

    def add(self, piece: PolicyPieceEvent) -> None:
        size = self._sizes.get(piece.name)
        if size is None:
            raise IntegrityError(f"piece for unknown tensor {piece.name!r}")
        end = piece.offset + len(piece.data)
        if end > size:
            raise IntegrityError(f"piece of {piece.name!r} ends at byte {end}, beyond its {size} bytes")
        self._buffers[piece.name][piece.offset:end] = piece.data
        self._received[piece.name] += len(piece.data)

    def finish(self, trailer: PolicyTrailerEvent) -> dict[str, torch.Tensor]:
        if trailer.sha256 != self.manifest.total_sha256:
            raise IntegrityError("trailer checksum differs from the manifest's")
        short = [n for n, got in self._received.items() if got != self._sizes[n]]
        if short:
            raise IntegrityError(f"transfer truncated: {len(short)} tensors incomplete (e.g. {short[0]!r})")
        return verify(self.manifest, self._buffers)


class LastGood:
    """The last good policy on local disk: manifest.json + model.safetensors, swapped atomically."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def save(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / "manifest.json").write_text(manifest.to_json())
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = self.dir.with_name(self.dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.rename(self.dir, old)
        os.rename(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
        """Verified (manifest, tensors), or None if absent or corrupt (with a warning)."""
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.exists():
            return None
        try:
            manifest = Manifest.from_json(manifest_path.read_text())
            with safe_open(str(self.dir / "model.safetensors"), framework="pt") as f:
                payload = {name: tensor_bytes(f.get_tensor(name)) for name in f.keys()}
            return manifest, verify(manifest, payload)
        except (IntegrityError, OSError, ValueError) as exc:
            log.warning("last good policy in %s is unusable (%s); ignoring it", self.dir, exc)
            return None


def check_finite(policy, schema: Schema, task: str) -> None:
    """Run one inference on a zero observation; raise IntegrityError on NaN/Inf."""
    obs = {f.name: np.zeros(f.shape, dtype=np.float32) for f in schema.observation if not f.is_image}
    action = policy.select_action(obs, task)
    policy.reset()
    if not np.isfinite(np.asarray(action)).all():
        raise IntegrityError(f"policy v{policy.version} produces non-finite actions")


class Updater:
    """Background thread: watch -> assemble -> verify -> build -> check -> save -> offer."""

    def __init__(self, robot_id: str, client: FleetClient, slot: PolicySlot, build: PolicyBuilder,
                 last_good: LastGood, schema: Schema, probe_task: str, have_version: int = 0):
        self.robot_id = robot_id
        self.client = client
        self.slot = slot
        self.build = build
        self.last_good = last_good
        self.schema = schema
        self.probe_task = probe_task
        self.have_version = have_version
        self.rejected = 0
        self.received = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"updater-{self.robot_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        if self._thread:
            self._thread.join(timeout_s)

    def wait_version(self, version: int, timeout_s: float) -> bool:
        with self.received:
            return self.received.wait_for(lambda: self.have_version >= version, timeout_s)

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._watch(backoff)
            except grpc.RpcError as exc:
                if not self._stop.is_set():
                    log.info("robot %s: policy watch ended (%s)", self.robot_id,
                             exc.code() if hasattr(exc, "code") else exc)
            except IntegrityError as exc:
                self.rejected += 1
                log.warning("robot %s: rejected policy transfer: %s (keeping v%d)", self.robot_id, exc,
                            self.slot.current.version)
            except Exception:
                log.exception("robot %s: updater error", self.robot_id)
            if self._stop.wait(backoff.next_delay()):
                break

    def _watch(self, backoff: Backoff) -> None:
        call = self.client.watch_policy(self.robot_id, self.have_version)
        self._call = call
        assembler: Assembler | None = None
        try:
            for msg in call:
                event = FleetClient.policy_event(msg)
                if isinstance(event, PolicyHeaderEvent):
                    assembler = Assembler(event)
                elif isinstance(event, PolicyPieceEvent):
                    if assembler is None:
                        raise IntegrityError("policy piece before its header")
                    assembler.add(event)
                elif isinstance(event, PolicyTrailerEvent):
                    if assembler is None:
                        raise IntegrityError("policy trailer before its header")
                    tensors = assembler.finish(event)
                    self._accept(assembler.manifest, tensors)
                    assembler = None
                    backoff.reset()
        finally:
            self._call = None

    def _accept(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        policy = self.build(manifest, tensors)
        check_finite(policy, self.schema, self.probe_task)
        self.last_good.save(manifest, tensors)
        self.slot.offer(policy)
        with self.received:
            self.have_version = manifest.version
            self.received.notify_all()
        log.info("robot %s: policy v%d verified and ready to swap", self.robot_id, manifest.version)
