"""One step as one row of raw column bytes: the edge spool's record format.

A row holds the step's low-dim observation features in the registered schema's order and
dtypes (little-endian, C order), then action, policy action (the action's dtype), reward
``<f4``, timestamp ``<f8``, policy version ``<u8``, the step's index in its episode ``<i8``
(kept for inspection; the gateway assigns indexes), the help score ``<f4`` (row format 3) and
a flags byte (bit 0 intervention, bit 1 success, bit 2 done), always the prefix's last byte. This fixed-size prefix is followed, per camera in schema order,
by ``u8 encoding length, encoding, u32 frame length, frame bytes``.

All rows of one schema share the prefix size, so ``n`` rows become a chunk's ``[n, ...]``
columns with one join and one ``frombuffer`` through a numpy structured dtype: no per-step
parsing on the streamer (it used to parse one protobuf message per step). A step that does
not fit the schema (a missing feature, a wrong element count, a value of the wrong kind) is
refused when it is encoded (:class:`RowMismatch`), and rows that do not fit (a spool written
under another schema) are named by index when they are joined.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from fleet.codec import numpy_dtype
from fleet.types import EncodedImage, Schema, Step

ROW_FORMAT = 3
"""The spool's ``meta.row_format`` for rows in this layout (1, implicit: one ``fleet.v1.Step`` per row; 2: this
layout without the help score)."""

_TAIL = struct.Struct("<fdQqfB")  # reward, timestamp, policy version, index, help score, flags
HELP_BYTES = 4
_U32 = struct.Struct("<I")


class RowMismatch(ValueError):
    """A step or a row that does not fit the schema; ``index`` names the row within a batch."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


class RowLayout:
    """The row format of one schema: encode a step, join rows into columns, decode a row back."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.low_dim = [f for f in schema.observation if not f.is_image]
        self.cameras = [f for f in schema.observation if f.is_image]
        adt = numpy_dtype(schema.action.dtype)
        self._low = [(f.name, numpy_dtype(f.dtype), math.prod(f.shape)) for f in self.low_dim]
        self._act = (adt, math.prod(schema.action.shape))
        fields = [(f"o{i}", numpy_dtype(f.dtype), f.shape) for i, f in enumerate(self.low_dim)]
        fields += [("action", adt, schema.action.shape), ("policy_action", adt, schema.action.shape),
                   ("reward", "<f4"), ("timestamp_s", "<f8"), ("policy_version", "<u8"), ("index", "<i8"),
                   ("help", "<f4"), ("flags", "u1")]
        self.dtype = np.dtype(fields)  # packed: no alignment padding, so itemsize is the prefix size
        self.fixed = self.dtype.itemsize

    # --- the control thread ------------------------------------------------------------

    def encode(self, step: Step) -> bytes:
        """The step as one row (RowMismatch naming the feature if it does not fit the schema)."""
        parts = [self._array(step.observation.get(name), dt, size, f"observation {name!r}")
                 for name, dt, size in self._low]
        dt, size = self._act
        parts.append(self._array(step.action, dt, size, "action"))
        policy = step.policy_action if step.policy_action is not None else step.action
        parts.append(self._array(policy, dt, size, "policy_action"))
        try:
            parts.append(_TAIL.pack(step.reward, step.timestamp_s, step.policy_version, step.index, step.help_score,
                                    bool(step.is_intervention) | bool(step.success) << 1 | bool(step.done) << 2))
        except (struct.error, TypeError) as exc:
            raise RowMismatch(f"reward/timestamp/policy version do not fit: {exc}") from None
        for cam in self.cameras:
            image = step.images.get(cam.name)
            if image is None:
                raise RowMismatch(f"camera {cam.name!r}: no frame")
            enc = image.encoding.encode()
            parts += [bytes((len(enc),)), enc, _U32.pack(len(image.data)), image.data]
        return b"".join(parts)

    @staticmethod
    def _array(value, dtype: np.dtype, size: int, what: str) -> bytes:
        if value is None:
            raise RowMismatch(f"{what}: missing")
        try:
            array = np.asarray(value, dtype)
        except (TypeError, ValueError) as exc:
            raise RowMismatch(f"{what}: cannot be stored as {dtype}: {exc}") from None
        if array.size != size:
            raise RowMismatch(f"{what}: {array.size} elements, the schema has {size}")
        return array.tobytes()

    # --- the streamer ------------------------------------------------------------------

    @property
    def fixed_rows(self) -> bool:
        """Every row has the same size (no cameras): rows may be stored and joined back to back."""
        return not self.cameras

    def join(self, rows: list[bytes]) -> tuple[np.ndarray, dict[str, tuple[str, list[bytes]]]]:
        """``n`` rows -> (structured ``[n]`` array of the fixed columns, {camera: (encoding, frames)}).

        Without cameras a part may hold several rows back to back (a spool chunk row)."""
        if not self.cameras:
            steps = 0
            for row in rows:
                if not row or len(row) % self.fixed:
                    raise RowMismatch(f"row of {len(row)} bytes, the schema's rows have {self.fixed}", steps)
                steps += len(row) // self.fixed
            return np.frombuffer(rows[0] if len(rows) == 1 else b"".join(rows), self.dtype), {}
        frames: dict[str, tuple[str, list[bytes]]] = {}
        for i, row in enumerate(rows):
            for name, (enc, data) in self._frames(row, i).items():
                frames.setdefault(name, (enc, []))[1].append(data)
        return np.frombuffer(b"".join([row[:self.fixed] for row in rows]), self.dtype), frames

    def _frames(self, row: bytes, index: int = 0) -> dict[str, tuple[str, bytes]]:
        pos, out = self.fixed, {}
        for cam in self.cameras:
            if pos + 1 > len(row):
                raise RowMismatch(f"camera {cam.name!r}: frame missing from the row", index)
            elen = row[pos]
            enc = row[pos + 1:pos + 1 + elen].decode(errors="replace")
            pos += 1 + elen
            if pos + 4 > len(row):
                raise RowMismatch(f"camera {cam.name!r}: frame truncated", index)
            (flen,) = _U32.unpack_from(row, pos)
            out[cam.name] = (enc, row[pos + 4:pos + 4 + flen])
            pos += 4 + flen
        if pos != len(row):
            raise RowMismatch(f"row of {len(row)} bytes, its columns take {pos}", index)
        return out

    def columns(self, rec: np.ndarray) -> dict[str, np.ndarray]:
        """The fixed columns of a joined batch by name: observation features, action, ... flags."""
        out = {f.name: rec[f"o{i}"] for i, f in enumerate(self.low_dim)}
        return out | {name: rec[name] for name in ("action", "policy_action", "reward", "timestamp_s",
                                                   "policy_version", "index", "help", "flags")}

    def decode(self, row: bytes, seq: int = 0) -> Step:
        """A row back as a Step (tests, tools; never on a hot path)."""
        rec, frames = self.join([row])
        cols = self.columns(rec)
        flags = int(cols["flags"][0])
        images = {cam.name: EncodedImage(frames[cam.name][0], cam.shape[0], cam.shape[1], cam.shape[2],
                                         frames[cam.name][1][0]) for cam in self.cameras}
        return Step(seq=seq, index=int(cols["index"][0]), observation={f.name: cols[f.name][0].copy() for f in self.low_dim},
                    policy_action=cols["policy_action"][0].copy(), action=cols["action"][0].copy(),
                    is_intervention=bool(flags & 1), reward=float(cols["reward"][0]), success=bool(flags & 2),
                    done=bool(flags & 4), policy_version=int(cols["policy_version"][0]),
                    timestamp_s=float(cols["timestamp_s"][0]), images=images, help_score=float(cols["help"][0]))

    def upgrade_v2(self, blob: bytes, n: int) -> bytes:
        """A row (``n`` steps) of row format 2 (no help score) in this format, help score 0; RowMismatch if its
        size does not fit the schema."""
        old = self.fixed - HELP_BYTES
        if self.fixed_rows:
            if not blob or len(blob) != n * old:
                raise RowMismatch(f"format-2 row of {len(blob)} bytes for {n} steps of {old} bytes")
            rows = np.frombuffer(blob, np.uint8).reshape(n, old)
            return np.concatenate([rows[:, :-1], np.zeros((n, HELP_BYTES), np.uint8), rows[:, -1:]], axis=1).tobytes()
        if n != 1 or len(blob) < old:
            raise RowMismatch(f"format-2 row of {len(blob)} bytes for {n} steps of at least {old} bytes")
        return blob[:old - 1] + bytes(HELP_BYTES) + blob[old - 1:]
