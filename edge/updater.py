"""Receive new policy versions in the background, verify them, hand them to hot-swap.

The updater watches the gateway for versions newer than the one it holds,
telling it that version so that the gateway can send a delta: only the tensors
that changed (frozen ones never travel again), each raw or as an element delta
(``fleet.delta``) against the bytes this edge holds (the acting model's weights).
It writes the transfer into the standby model (``edge.standby``; a model is built
only for the first version or a new architecture), raw pieces checked one by one
against the manifest's digests as they arrive, deltas applied to the held bytes,
checks every tensor's digest and the total against the new manifest, checks the
policy produces finite actions (off the control thread), offers it to the
PolicySlot (swapped in at the next episode boundary) and stores it on local disk
as the *last good* policy (atomically; the one before is kept until the new one
has acted without a rollback, and is what a rollback reloads once the previous
model's memory holds a newer version).

With pinned publisher keys, a version whose manifest is not signed by one of them is refused from its
header, before a byte of its tensors is kept (the signature covers every piece's digest). A version not
newer than the one held is refused too: a gateway never sends one, so it can only be a replay of an
older (validly signed) version.

When the gateway runs the weight side channel (``edge.weight_channel``) and this robot's gRPC channel is
plaintext, the header brings a ticket and the tensors come over it, received into the standby model's
memory and checked piece by piece just the same; if it cannot be reached (or refuses the ticket) the
same version is fetched over gRPC at once, and gRPC is used for ``SIDE_CHANNEL_RETRY_S``.

A corrupt or truncated transfer is rejected, the old policy keeps running and
the watch is retried (a failed delta is retried as a full transfer). A version
that fails to build, acts with NaN, or is rolled back by the control loop is
refused: the gateway is told and sends only newer versions. On restart with the
cloud down, the edge starts from the last good policy on disk after verifying
its checksums.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from edge import weight_channel
from edge.admission import Admission
from edge.assembler import MAX_DELTA_OVERHEAD, Assembler, Held
from edge.client import FleetClient, PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent
from edge.hotswap import PolicySlot
from edge.last_good import LastGood
from edge.standby import Standby
from edge.streamer import Backoff
from fleet import metrics
from fleet.errors import IntegrityError, PolicyRefused, PolicyUnusable
from fleet.signing import PinnedKeys
from fleet.types import Schema
from fleet.weights import Manifest, tensor_from_bytes, verify
from fleet.worker import Worker

__all__ = ["MAX_DELTA_OVERHEAD", "Assembler", "Held", "LastGood", "TransferStats", "Updater", "check_finite"]

log = logging.getLogger(__name__)

SIDE_CHANNEL_RETRY_S = 300.0
"""After the weight side channel failed (unreachable, ticket refused), how long to take versions over gRPC."""

PolicyBuilder = Callable[[Manifest, dict[str, torch.Tensor]], object]


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
        self.standby = Standby(slot, build)
        """The model new versions are written into (at most two models resident with the acting one)."""
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
        self._held_policy = None
        """The model whose weights back ``_held``'s bytes (None: they are the held payload's own)."""
        self._want_full = False
        self._side_channel_off_until = 0.0
        """Until then (monotonic s) the weights come over gRPC: the side channel failed."""
        self._rolled_back: list[int] = []
        self._worker = Worker(f"updater-{self.robot_id}", self._run)
        self._call = None
        slot.add_rollback_listener(self._on_rollback)

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._worker.stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._worker.stop(timeout_s)

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

    def _wait_swap(self) -> bool:
        """Until the control loop swaps (True), or the updater stops or must handle a rollback (False)."""
        while not self._worker.stopping.is_set() and not self._rolled_back:
            if self.slot.wait_swap(0.25):
                return True
        return False

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
        """At start: the held version is the acting model's weights (the file's mapped bytes where not)."""
        if self.have_version:
            held = self.last_good.load_views()
            if held is None or held.manifest.version != self.have_version:
                self._want_full = True  # nothing to apply a delta to
                return
            current = self.slot.current
            if current.version == held.manifest.version and self.standby.views(current):
                self.standby.record(current, held.manifest)
                held = Held(held.manifest, self.standby.payload(current, held.manifest, held.payload))
                self._held_policy = current
            self._held = held

    def _restore(self, bad_version: int) -> None:
        """A rollback the slot could not do in memory: load the version now on disk into the standby model
        and have it swapped in at the next episode boundary."""
        pending = self.slot.pending_version
        if pending is not None and pending > bad_version:
            log.warning("robot %s: v%d replaces v%d at the next episode", self.robot_id, pending, bad_version)
            return
        held = self.last_good.load_views()
        if held is None or held.manifest.version >= bad_version:
            log.error("robot %s: cannot roll back v%d: no older good policy on disk", self.robot_id, bad_version)
            return
        manifest = held.manifest
        policy = self.standby.claim(manifest)
        if policy is None:
            policy = self.standby.build_new(manifest, verify(manifest, {k: bytearray(v) for k, v in
                                                                        held.payload.items()}))
        else:
            self.standby.fill(policy, manifest, held.payload)
        self.standby.policy = None
        self.slot.offer_restore(policy)
        log.warning("robot %s: rolled back v%d -> v%d from disk; swapped in at the next episode", self.robot_id,
                    bad_version, manifest.version)
        with self.received:
            self._held = Held(manifest, self.standby.payload(policy, manifest, held.payload))
            self._held_policy, self.have_version, self._want_full = policy, manifest.version, False
            self.received.notify_all()

    def _run(self) -> None:
        self._load_held()
        backoff = Backoff()
        while not self._worker.stopping.is_set():
            while self._rolled_back:
                bad = self._rolled_back.pop(0)
                self._refuse(bad, "rolled back by the control loop")
                if self.slot.current.version == bad:  # not rolled back in memory: from disk
                    self._restore(bad)
            error = None  # the gateway went away (client.gateway_gone): watch again as soon as it is back
            try:
                self._watch(backoff)
            except weight_channel.SideChannelUnavailable as exc:
                self._side_channel_off_until = time.monotonic() + SIDE_CHANNEL_RETRY_S
                log.warning("robot %s: %s; policies over gRPC for %.0f s", self.robot_id, exc,
                            SIDE_CHANNEL_RETRY_S)
                continue  # the same version, over gRPC, right away
            except grpc.RpcError as exc:
                error = exc
                if not self._worker.stopping.is_set() and not self._rolled_back:
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
            if self.client.wait_retry(backoff.next_delay(), self._worker.stopping, error):
                break

    def _watch(self, backoff: Backoff) -> None:
        call = self.client.watch_policy(self.robot_id, self.have_version, want_full=self._want_full,
                                        rejected_version=self.refused_version,
                                        side_channel=time.monotonic() >= self._side_channel_off_until)
        self._call = call
        if self._worker.stopping.is_set() or self._rolled_back:  # raced with stop() / a rollback
            call.cancel()
        assembler: Assembler | None = None
        target = None  # the standby model this transfer writes into
        started = 0.0
        try:
            for event in call:
                if isinstance(event, PolicyHeaderEvent):
                    assembler, started = (Assembler(event, self._held, self.admission,
                                                     self.pinned_keys), time.perf_counter())
                    if assembler.manifest.version <= self.have_version:  # a replayed older (signed) version
                        raise PolicyRefused(f"policy v{assembler.manifest.version} is not newer than v"
                                            f"{self.have_version}, which this robot holds (a gateway sends only "
                                            "newer versions)", assembler.manifest.version, "downgrade")
                    target = self.standby.claim(assembler.manifest, self._wait_swap)
                    if target is not None:
                        assembler.write_into(self.standby.views(target), self.standby.digests(target))
                    if event.ticket:  # the tensors come over the side channel; the trailer on this stream
                        weight_channel.receive(self.client.side_channel_address(event.side_channel_address),
                                               event.ticket, self.robot_id, assembler)
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
                    self._accept(held, tensors, stats, target)
                    target = None
                    backoff.reset()
            if assembler is not None:
                raise IntegrityError(f"stream ended in the middle of v{assembler.manifest.version}")
        except weight_channel.SideChannelUnavailable:
            raise  # before any byte was written: the held version is intact, the delta comes over gRPC
        except BaseException:
            if target is not None and target is self._held_policy:  # its weights were the base: no longer
                self._held, self._held_policy, self._want_full = None, None, True
            raise
        finally:
            self._call = None
            call.cancel()  # after an error mid-stream, tell the gateway (no-op once the stream ended)

    def _accept(self, held: Held, tensors: dict[str, torch.Tensor], stats: TransferStats, target) -> None:
        """``target``: the standby model the bytes were written into (None: build one from ``tensors``)."""
        manifest = held.manifest
        try:
            if target is not None:
                self.standby.finish(target, manifest, tensors)
                policy = target
            else:
                policy = self.standby.build_new(manifest, tensors)
                held = Held(manifest, self.standby.payload(policy, manifest, held.payload))
                tensors = {name: tensor_from_bytes(held.payload[e.name], e.dtype, e.shape) if
                           name in self.standby.views(policy) else tensors[name]
                           for e in manifest.tensors for name in (e.name,)}
        except Exception as exc:  # noqa: BLE001 - whatever a broken version raises, refuse that version
            raise PolicyUnusable(f"policy v{manifest.version} does not load: {type(exc).__name__}: {exc}",
                                 manifest.version) from exc
        self.standby.policy = policy  # until offered: a refused version's model is the next standby
        check_finite(policy, self.schema, self.probe_task)
        if self.admission is not None:
            self.admission.accepted(manifest)  # the first accepted version pins the architecture
        if self.slot.offer(policy):  # swap-ready now; the disk copy follows
            self.standby.policy = None
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
            self._held_policy = policy
            self.last_transfer = stats
            self.received.notify_all()
