"""One policy transfer (header, pieces, trailer) assembled and verified: raw pieces checked against the
manifest's piece digests as they arrive, deltas applied to the held bytes, written into a standby model's
weights when there is one (``edge.standby``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edge.admission import Admission
from edge.client import PolicyHeaderEvent, PolicyPieceEvent, PolicyTrailerEvent
from fleet import delta
from fleet.errors import IntegrityError
from fleet.signing import PinnedKeys
from fleet.weights import DTYPE_SIZES, Manifest, TensorEntry, piece_digest, verify

MAX_DELTA_OVERHEAD = 4096
"""Bytes an encoded delta may exceed its tensor's raw size by (headers); the encoder keeps the smallest."""


@dataclass(frozen=True)
class Held:
    """A verified version this edge has: its manifest and each tensor's raw bytes (never mutated)."""

    manifest: Manifest
    payload: dict[str, bytearray | memoryview]


class Assembler:
    """Collects one transfer (header, pieces, trailer), applies deltas to ``held``, verifies the result.

    A raw piece is checked against the manifest's digest of that piece as it arrives and only then kept, so
    a corrupt transfer is refused at its first bad piece. The check runs on the receiving thread: gRPC core
    keeps receiving into the stream's window meanwhile and BLAKE3 releases the GIL (a worker thread cost
    more CPU and time on the 2-core bench machine than it overlapped). With
    ``dest`` (writable views of a standby model's tensors, by name), verified bytes go straight into that
    memory, and ``dest_digests`` (what those views hold now) lets unchanged tensors stay where they are;
    without, they are appended to buffers that grow with the bytes actually received, never with what the
    manifest claims. With ``pinned_keys``, the manifest's publisher signature is verified first (it covers
    every digest, which then check the bytes); with an ``admission``, the manifest is checked against this
    robot's memory bound and pinned architecture. Both before anything is kept."""

    def __init__(self, header: PolicyHeaderEvent, held: Held | None,
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
        self._dest: dict[str, memoryview] = {}
        self.dest_digests: dict[str, str] = {}
        """Digest of what each ``dest`` view holds (entries are dropped while a tensor is rewritten)."""
        self._raw: dict[str, bytearray | memoryview] = {}
        self._raw_received: dict[str, int] = {}
        self._encoded: dict[str, tuple[str, bytearray]] = {}
        self.payload_bytes = 0

    def write_into(self, dest: Mapping[str, memoryview], dest_digests: dict[str, str]) -> None:
        """Before any piece: keep tensors in ``dest`` (a standby model's weights), which holds ``dest_digests``."""
        self._dest = {name: view for name, view in dest.items()
                      if name in self._entries and len(view) == self._entries[name].nbytes}
        self.dest_digests = dest_digests

    def entry(self, name: str) -> TensorEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise IntegrityError(f"piece for unknown tensor {name!r}")
        return entry

    def raw_into(self, name: str, nbytes: int) -> memoryview | None:
        """Tensor ``name`` comes raw, all ``nbytes`` of it (the side channel): the standby model's memory to
        receive it into, each piece then checked there with ``check_in_place``; None without a standby
        tensor (its pieces then go through ``add``)."""
        entry = self.entry(name)
        if nbytes != entry.nbytes:
            raise IntegrityError(f"raw tensor {name!r} comes with {nbytes} bytes, manifest says {entry.nbytes}")
        if name in self._encoded or name in self._raw:
            raise IntegrityError(f"tensor {name!r} arrives twice")
        if name not in self._dest:
            return None
        self.dest_digests.pop(name, None)  # being rewritten: holds no known version until verified
        self._raw[name], self._raw_received[name] = self._dest[name], 0
        return self._dest[name]

    def check_in_place(self, name: str, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) of ``name`` were received into ``raw_into``'s memory: check them
        (in order, right after each piece arrives)."""
        entry, received = self._entries[name], self._raw_received[name]
        step = self.manifest.piece_bytes
        if offset != received or (step and length != min(step, entry.nbytes - offset)):
            raise IntegrityError(f"raw piece of {name!r} at byte {offset} (+{length}) is not the next of the "
                                 f"manifest's pieces")
        self._check_piece(entry, offset, self._raw[name][offset:offset + length])
        self._raw_received[name] = offset + length
        self.payload_bytes += length

    def add(self, piece: PolicyPieceEvent) -> None:
        entry = self.entry(piece.name)
        if piece.encoding == delta.RAW:
            self._add_raw(entry, piece)
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

    def _add_raw(self, entry: TensorEntry, piece: PolicyPieceEvent) -> None:
        name, offset, data = entry.name, piece.offset, piece.data
        if name in self._encoded:
            raise IntegrityError(f"tensor {name!r} arrives both raw and {self._encoded[name][0]}")
        end = offset + len(data)
        if end > entry.nbytes:
            raise IntegrityError(f"piece of {name!r} ends at byte {end}, beyond its {entry.nbytes} bytes")
        received = self._raw_received.get(name, 0)
        if offset != received:
            raise IntegrityError(f"raw piece of {name!r} out of order (at byte {offset}, expected {received})")
        step = self.manifest.piece_bytes
        if step and len(data) != min(step, entry.nbytes - offset):
            raise IntegrityError(f"raw piece of {name!r} at byte {offset} has {len(data)} bytes, not one of the "
                                 f"manifest's {step}-byte pieces")
        if name not in self._raw:
            self.dest_digests.pop(name, None)  # being rewritten: holds no known version until verified
            self._raw[name] = self._dest[name] if name in self._dest else bytearray()
        self._raw_received[name] = end
        self._take(entry, offset, data)

    def _check_piece(self, entry: TensorEntry, offset: int, data) -> None:
        if self.manifest.piece_bytes and entry.nbytes:  # (an empty tensor is one empty piece, no digest)
            digest = piece_digest(self.manifest.hash, data)
            if digest != entry.pieces[offset // self.manifest.piece_bytes]:
                raise IntegrityError(f"policy v{self.manifest.version}: tensor {entry.name!r} piece at byte {offset} "
                                     f"{self.manifest.hash} {digest[:12]} != manifest (corrupt transfer)")

    def _take(self, entry: TensorEntry, offset: int, data) -> None:
        """Check one raw piece against the manifest (with piece hashes), then keep it."""
        self._check_piece(entry, offset, data)
        buf = self._raw[entry.name]
        if isinstance(buf, bytearray):
            buf += data  # grows with what arrived: a manifest's claim allocates nothing
        else:
            buf[offset:offset + len(data)] = data

    def finish(self, trailer: PolicyTrailerEvent) -> tuple[Held, dict[str, torch.Tensor]]:
        """The new version, verified; IntegrityError if anything is missing, corrupt or does not apply."""
        if trailer.sha256 != self.manifest.total_sha256:
            raise IntegrityError("trailer checksum differs from the manifest's")
        kept = {t.name: t for t in self._held.manifest.tensors} if self._held else {}
        payload: dict[str, bytearray | memoryview] = {}
        verified = set()  # names whose bytes already matched this manifest's digest
        for entry in self.manifest.tensors:
            name = entry.name
            if name in self._raw:
                if self._raw_received[name] != entry.nbytes:
                    raise IntegrityError(f"transfer truncated: tensor {name!r} has {self._raw_received[name]} of "
                                         f"{entry.nbytes} bytes")
                payload[name] = self._raw[name]
                if self.manifest.piece_bytes:
                    verified.add(name)  # every piece matched as it arrived
            elif name in self._encoded:
                encoding, data = self._encoded[name]
                self.dest_digests.pop(name, None)
                payload[name] = delta.decode(self._held.payload.get(name), encoding, data,
                                             DTYPE_SIZES[entry.dtype], entry.nbytes, out=self._dest.get(name))
            elif name in kept and (kept[name].digest, kept[name].dtype, kept[name].shape) == (
                    entry.digest, entry.dtype, entry.shape):
                payload[name] = self._keep(name, entry)  # unchanged: verified when it arrived
                verified.add(name)
            else:
                raise IntegrityError(f"transfer truncated: tensor {name!r} missing")
        tensors = verify(self.manifest, payload, frozenset(verified))
        for name in self._dest:
            self.dest_digests[name] = self._entries[name].digest
        return Held(self.manifest, payload), tensors

    def _keep(self, name: str, entry: TensorEntry) -> bytearray | memoryview:
        """An unchanged tensor: the held bytes, copied into ``dest`` unless it holds them already."""
        held = self._held.payload[name]
        out = self._dest.get(name)
        if out is None:
            return held
        if self.dest_digests.get(name) != entry.digest:
            self.dest_digests.pop(name, None)
            out[:] = held
        return out
