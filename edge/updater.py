"""Receive new policy versions in the background, verify them, hand them to hot-swap.

The updater watches the gateway for versions newer than the one it holds,
telling it that version so that the gateway can send a delta: only the tensors
that changed (frozen ones never travel again), each raw or as an element delta
(``fleet.delta``) against the bytes this edge holds. It assembles the transfer
in memory, applies deltas to its own copy of the previous version, checks every
tensor's sha256 and the total against the new manifest, builds the policy off
the control thread, checks it produces finite actions, offers it to the
PolicySlot (swapped in at the next episode boundary) and stores it on local disk
as the *last good* policy (atomically; the one before is kept until the new one
has acted without a rollback).

With pinned publisher keys, a version whose manifest is not signed by one of them is refused from its
header, before a byte of its tensors is kept (the signature covers every tensor's sha256). A version not
newer than the one held is refused too: a gateway never sends one, so it can only be a replay of an
older (validly signed) version.

A corrupt or truncated transfer is rejected, the old policy keeps running and
the watch is retried (a failed delta is retried as a full transfer). A version
that fails to build, acts with NaN, or is rolled back by the control loop is
refused: the gateway is told and sends only newer versions. On restart with the
cloud down, the edge starts from the last good policy on disk after verifying
its checksums.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from safetensors.torch import save_file

from edge.admission import Admission
from edge.client import FleetClient, PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent
from edge.hotswap import PolicySlot
from edge.streamer import Backoff
from fleet import delta, metrics
from fleet.atomic import commit_dir, fresh_dir
from fleet.errors import IntegrityError, PolicyRefused, PolicyUnusable
from fleet.signing import PinnedKeys
from fleet.types import Schema
from fleet.weights import DTYPE_SIZES, Manifest, read_safetensors_raw, verify

log = logging.getLogger(__name__)

MAX_DELTA_OVERHEAD = 4096
"""Bytes an encoded delta may exceed its tensor's raw size by (headers); the encoder keeps the smallest."""

PolicyBuilder = Callable[[Manifest, dict[str, torch.Tensor]], object]


@dataclass(frozen=True)
class Held:
    """A verified version this edge has: its manifest and each tensor's raw bytes (never mutated)."""

    manifest: Manifest
    payload: dict[str, bytearray]


@dataclass(frozen=True)
class TransferStats:
    """One accepted transfer."""

    version: int
    base_version: int
    """0 = full transfer."""
    payload_bytes: int
    """Tensor data bytes received (encoded)."""
    full_bytes: int
    seconds: float
    """Header received -> tensors verified."""


class Assembler:
    """Collects one transfer (header, pieces, trailer), applies deltas to ``held``, verifies the result.

    With a ``hasher`` (one worker thread), each raw tensor is hashed as soon as its last piece is in, while
    the next ones still arrive. With ``pinned_keys``, the manifest's publisher signature is verified first (it
    covers every tensor's sha256, which then check the bytes); with an ``admission``, the manifest is checked
    against this robot's memory bound and pinned architecture. Both before anything is kept. Memory grows with the bytes actually received
    (pieces of a tensor arrive in order and are appended), never with what the manifest claims."""

    def __init__(self, header: PolicyHeaderEvent, held: Held | None, hasher: Executor | None = None,
                 admission: Admission | None = None, pinned_keys: PinnedKeys | None = None):
        self.manifest = Manifest.from_json(header.manifest_json)
        if self.manifest.version != header.version:
            raise IntegrityError(f"header says v{header.version} but its manifest says v{self.manifest.version}")
        if pinned_keys is not None:
            pinned_keys.verify(self.manifest)  # PolicyRefused("signature"): nothing of this version is kept
        if admission is not None:
            admission.check(self.manifest)
        self.base_version = header.base_version
        if self.base_version and (held is None or held.manifest.version != self.base_version):
            raise IntegrityError(f"delta against v{self.base_version}, but this edge holds "
                                 f"{'nothing' if held is None else f'v{held.manifest.version}'}")
        self._held = held if self.base_version else None
        self._entries = {t.name: t for t in self.manifest.tensors}
        self._raw: dict[str, bytearray] = {}
        self._raw_received: dict[str, int] = {}
        self._encoded: dict[str, tuple[str, bytearray]] = {}
        self._digests: dict[str, Future] = {}
        self._hasher = hasher
        self.payload_bytes = 0

    def add(self, piece: PolicyPieceEvent) -> None:
        entry = self._entries.get(piece.name)
        if entry is None:
            raise IntegrityError(f"piece for unknown tensor {piece.name!r}")
        if piece.encoding == delta.RAW:
            if piece.name in self._encoded:
                raise IntegrityError(f"tensor {piece.name!r} arrives both raw and {self._encoded[piece.name][0]}")
            end = piece.offset + len(piece.data)
            if end > entry.nbytes:
                raise IntegrityError(f"piece of {piece.name!r} ends at byte {end}, beyond its {entry.nbytes} bytes")
            buf = self._raw.setdefault(piece.name, bytearray())
            if piece.offset != len(buf):
                raise IntegrityError(f"raw piece of {piece.name!r} out of order (at byte {piece.offset}, "
                                     f"expected {len(buf)})")
            buf += piece.data  # grows with what arrived: a manifest's claim allocates nothing
            received = self._raw_received[piece.name] = len(buf)
            if received == entry.nbytes and self._hasher is not None:
                self._digests[piece.name] = self._hasher.submit(lambda b=buf: hashlib.sha256(b).hexdigest())
        else:
            if not self.base_version:
                raise IntegrityError(f"{piece.encoding!r} piece of {piece.name!r} in a full transfer")
            if piece.name in self._raw:
                raise IntegrityError(f"tensor {piece.name!r} arrives both raw and {piece.encoding}")
            encoding, buf = self._encoded.setdefault(piece.name, (piece.encoding, bytearray()))
            if encoding != piece.encoding or piece.offset != len(buf):
                raise IntegrityError(f"piece of {piece.name!r} out of order ({piece.encoding} at byte "
                                     f"{piece.offset}, expected {encoding} at {len(buf)})")
            if len(buf) + len(piece.data) > entry.nbytes + MAX_DELTA_OVERHEAD:
                raise IntegrityError(f"{encoding} delta of {piece.name!r} is larger than the tensor's "
                                     f"{entry.nbytes} bytes (the encoder never sends a delta larger than raw)")
            buf += piece.data
        self.payload_bytes += len(piece.data)

    def finish(self, trailer: PolicyTrailerEvent) -> tuple[Held, dict[str, torch.Tensor]]:
        """The new version, verified; IntegrityError if anything is missing, corrupt or does not apply."""
        if trailer.sha256 != self.manifest.total_sha256:
            raise IntegrityError("trailer checksum differs from the manifest's")
        kept = {t.name: t for t in self._held.manifest.tensors} if self._held else {}
        payload: dict[str, bytearray] = {}
        verified = set()  # names whose bytes already matched this manifest's sha256
        for name, digest in self._digests.items():  # raw tensors hashed while the transfer went on
            if digest.result() == self._entries[name].sha256:
                verified.add(name)  # (a mismatch is left to verify(), which raises naming the tensor)
        for entry in self.manifest.tensors:
            name = entry.name
            if name in self._raw:
                if self._raw_received[name] != entry.nbytes:
                    raise IntegrityError(f"transfer truncated: tensor {name!r} has {self._raw_received[name]} of "
                                         f"{entry.nbytes} bytes")
                payload[name] = self._raw[name]
            elif name in self._encoded:
                encoding, data = self._encoded[name]
                payload[name] = delta.decode(self._held.payload.get(name), encoding, data,
                                             DTYPE_SIZES[entry.dtype], entry.nbytes)
            elif name in kept and (kept[name].sha256, kept[name].dtype, kept[name].shape) == (
                    entry.sha256, entry.dtype, entry.shape):
                payload[name] = self._held.payload[name]  # unchanged: verified when it arrived
                verified.add(name)
            else:
                raise IntegrityError(f"transfer truncated: tensor {name!r} missing")
        tensors = verify(self.manifest, payload, frozenset(verified))
        return Held(self.manifest, payload), tensors


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

    def load_held(self) -> Held | None:
        """The saved version with its raw bytes, verified; None if absent or corrupt (with a warning)."""
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.exists():
            return None
        try:
            manifest = Manifest.from_json(manifest_path.read_text())
            if self.pinned_keys is not None:
                self.pinned_keys.verify(manifest)
            payload = {name: bytearray(view) for name, view in
                       read_safetensors_raw(self.dir / "model.safetensors").items()}
            verify(manifest, payload)
            return Held(manifest, payload)
        except (IntegrityError, PolicyRefused, OSError, ValueError) as exc:
            log.warning("last good policy in %s is unusable (%s); ignoring it", self.dir, exc)
            return None

    def load(self) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
        """Verified (manifest, tensors), or None if absent or corrupt (with a warning)."""
        held = self.load_held()
        if held is None:
            return None
        return held.manifest, verify(held.manifest, held.payload, frozenset(held.payload))


def check_finite(policy, schema: Schema, task: str) -> None:
    """Run one inference on a zero observation (images included); raise PolicyUnusable on NaN/Inf."""
    obs = {f.name: np.zeros(f.shape, dtype=np.uint8 if f.is_image else np.float32) for f in schema.observation}
    try:
        action = policy.select_action(obs, task)
        policy.reset()
    except Exception as exc:  # noqa: BLE001 - a policy that cannot act is refused, whatever it raised
        raise PolicyUnusable(f"policy v{policy.version} fails to act: {type(exc).__name__}: {exc}",
                             policy.version) from exc
    if not np.isfinite(np.asarray(action)).all():
        raise PolicyUnusable(f"policy v{policy.version} produces non-finite actions", policy.version)


class Updater:
    """Background thread: watch -> assemble -> verify -> build -> check -> offer -> save."""

    def __init__(self, robot_id: str, client: FleetClient, slot: PolicySlot, build: PolicyBuilder,
                 last_good: LastGood, schema: Schema, probe_task: str, have_version: int = 0,
                 admission: Admission | None = None, pinned_keys: PinnedKeys | None = None):
        self.robot_id = robot_id
        self.admission = admission
        self.pinned_keys = pinned_keys
        """Publisher keys a version's manifest must be signed by (None = not checked: development only)."""
        self.client = client
        self.slot = slot
        self.build = build
        self.last_good = last_good
        self.schema = schema
        self.probe_task = probe_task
        self.have_version = have_version
        self.rejected = 0
        """Transfers or versions refused so far."""
        self.refused_version = 0
        """Newest version refused as unusable (the gateway is told; it sends only newer ones)."""
        self.last_transfer: TransferStats | None = None
        self.received = threading.Condition()
        self._held: Held | None = None
        self._want_full = False
        self._rolled_back: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call = None
        self._hasher: ThreadPoolExecutor | None = None
        slot.add_rollback_listener(self._on_rollback)

    def start(self) -> None:
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sha256-{self.robot_id}")
        self._thread = threading.Thread(target=self._run, name=f"updater-{self.robot_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread:
            self._thread.join(timeout_s)
        if self._hasher is not None:
            self._hasher.shutdown(wait=False)

    @property
    def held(self) -> Held | None:
        """The newest verified version this edge has (the base of the next delta)."""
        return self._held

    def wait_version(self, version: int, timeout_s: float) -> bool:
        return self.wait(lambda u: u.have_version >= version, timeout_s)

    def wait(self, predicate: Callable[[Updater], bool], timeout_s: float) -> bool:
        """Block until ``predicate(self)`` holds (checked after every accepted or refused transfer)."""
        with self.received:
            return self.received.wait_for(lambda: predicate(self), timeout_s)

    def _rejected_one(self, reason: str) -> None:
        metrics.EDGE_POLICY_REJECTED.labels(robot=self.robot_id, reason=reason).inc()
        with self.received:
            self.rejected += 1
            self.received.notify_all()

    def _on_rollback(self, bad_version: int) -> None:
        """Control thread: note it and end the watch; the updater thread does the rest."""
        self._rolled_back.append(bad_version)
        call = self._call
        if call is not None:
            call.cancel()

    def _refuse(self, version: int, reason: str, label: str = "unusable", revert: bool = True) -> None:
        """Refuse ``version``; ``revert``: it may be the one saved on disk (it was accepted, then failed), so put
        the previous one back. Never for a refusal from the manifest alone: an unauthenticated header naming
        the saved version must not touch the disk."""
        log.warning("robot %s: refusing policy v%d: %s (keeping v%d)", self.robot_id, version, reason,
                    self.slot.current.version)
        with self.received:  # observers (wait) see the refusal only with the disk already reverted
            reverted = revert and self.last_good.revert(version)
            self.refused_version = max(self.refused_version, version)
        if reverted:
            log.info("robot %s: last good policy on disk reverted from v%d", self.robot_id, version)
        self._rejected_one(label)

    def _load_held(self) -> None:
        if self.have_version:
            held = self.last_good.load_held()
            if held is not None and held.manifest.version == self.have_version:
                self._held = held
            else:  # nothing to apply a delta to
                self._want_full = True

    def _run(self) -> None:
        self._load_held()
        backoff = Backoff()
        while not self._stop.is_set():
            while self._rolled_back:
                self._refuse(self._rolled_back.pop(0), "rolled back by the control loop")
            try:
                self._watch(backoff)
            except grpc.RpcError as exc:
                if not self._stop.is_set() and not self._rolled_back:
                    log.info("robot %s: policy watch ended (%s)", self.robot_id,
                             exc.code() if hasattr(exc, "code") else exc)
            except IntegrityError as exc:
                self._want_full = True  # if our base is what is wrong, a full transfer fixes it
                log.warning("robot %s: rejected policy transfer: %s (keeping v%d)", self.robot_id, exc,
                            self.slot.current.version)
                self._rejected_one("corrupt")
            except PolicyRefused as exc:  # from the manifest alone: bad signature, too large, another architecture
                self._refuse(exc.version, str(exc), exc.reason, revert=False)
            except PolicyUnusable as exc:
                self._refuse(exc.version, str(exc))
            except Exception:
                log.exception("robot %s: updater error", self.robot_id)
            if self._rolled_back:
                continue  # tell the gateway right away
            if self._stop.wait(backoff.next_delay()):
                break

    def _watch(self, backoff: Backoff) -> None:
        call = self.client.watch_policy(self.robot_id, self.have_version, want_full=self._want_full,
                                        rejected_version=self.refused_version)
        self._call = call
        if self._stop.is_set() or self._rolled_back:  # raced with stop() / a rollback
            call.cancel()
        assembler: Assembler | None = None
        started = 0.0
        try:
            for event in call:
                if isinstance(event, PolicyHeaderEvent):
                    assembler, started = (Assembler(event, self._held, self._hasher, self.admission,
                                                     self.pinned_keys), time.perf_counter())
                    if assembler.manifest.version <= self.have_version:  # a replayed older (signed) version
                        raise PolicyRefused(f"policy v{assembler.manifest.version} is not newer than v"
                                            f"{self.have_version}, which this robot holds (a gateway sends only "
                                            "newer versions)", assembler.manifest.version, "downgrade")
                elif isinstance(event, PolicyPieceEvent):
                    if assembler is None:
                        raise IntegrityError("policy piece before its header")
                    assembler.add(event)
                elif isinstance(event, PolicyTrailerEvent):
                    if assembler is None:
                        raise IntegrityError("policy trailer before its header")
                    held, tensors = assembler.finish(event)
                    stats = TransferStats(held.manifest.version, assembler.base_version, assembler.payload_bytes,
                                          held.manifest.total_bytes, time.perf_counter() - started)
                    assembler = None
                    self._accept(held, tensors, stats)
                    backoff.reset()
            if assembler is not None:
                raise IntegrityError(f"stream ended in the middle of v{assembler.manifest.version}")
        finally:
            self._call = None
            call.cancel()  # after an error mid-stream, tell the gateway (no-op once the stream ended)

    def _accept(self, held: Held, tensors: dict[str, torch.Tensor], stats: TransferStats) -> None:
        manifest = held.manifest
        try:
            policy = self.build(manifest, tensors)
        except Exception as exc:  # noqa: BLE001 - whatever a broken version raises, refuse that version
            raise PolicyUnusable(f"policy v{manifest.version} does not load: {type(exc).__name__}: {exc}",
                                 manifest.version) from exc
        check_finite(policy, self.schema, self.probe_task)
        if self.admission is not None:
            self.admission.accepted(manifest)  # the first accepted version pins the architecture
        self.slot.offer(policy)  # swap-ready now; the disk copy follows
        kind = "delta" if stats.base_version else "full"
        metrics.EDGE_POLICY_BYTES.labels(robot=self.robot_id, kind=kind).inc(stats.payload_bytes)
        log.info("robot %s: policy v%d verified and ready to swap (%s from v%d, %.1f of %.1f MB, %.2fs)",
                 self.robot_id, manifest.version, kind, stats.base_version, stats.payload_bytes / 1e6,
                 stats.full_bytes / 1e6, stats.seconds)
        try:
            self.last_good.save(manifest, tensors)
        except OSError as exc:  # the new policy still runs; only a restart would start from an older one
            log.warning("robot %s: could not save policy v%d to disk: %s", self.robot_id, manifest.version, exc)
        with self.received:
            self._held, self.have_version, self._want_full = held, manifest.version, False
            self.last_transfer = stats
            self.received.notify_all()
