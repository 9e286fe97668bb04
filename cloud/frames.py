"""Camera frames decoded straight into the sampler's batch buffer, on threads that do not hold the GIL.

JPEG frames are decoded by simplejpeg (libjpeg-turbo in the wheel) *into* the caller's array: no
intermediate image, no copy. simplejpeg releases the GIL while it decodes, so ``workers`` threads
decode ``workers`` frames at once. bench/jpeg_decode.py chose it over Pillow, PyTurboJPEG and
torchvision.io on the numbers (docs/experience-path.md, "Camera frames"). PNG frames (lossless cameras,
offline demonstrations) take the existing path, :func:`fleet.codec.decode_image`, then are copied in.

Every frame is checked before its pixels are decoded: its header must declare exactly the ``(H, W, C)``
of its slot in ``out`` (a lying header never makes us allocate or write past the slot), and a
grayscale frame is not silently widened to RGB (nor RGB narrowed). A frame that is truncated,
garbage, of another size or another format becomes a :class:`FrameError` naming its index; the other
frames are still decoded, then :class:`CorruptFrames` (an ``InvalidInput``) lists every bad one, so
the sampler can quarantine the episodes they came from (its ``corrupt_image`` reason) and redraw.

:class:`FrameArena` holds decoded frames of the sampler's cached episodes (``cloud/episode_cache.py``).

Usage (the sampler's collate step)::

    decoder = FrameDecoder(workers=2)               # once; close() (or ``with``) at shutdown
    batch = np.empty((B, H, W, 3), np.uint8)         # or torch.empty(..., pin_memory=True).numpy()
    try:
        decoder.decode_into(blobs, batch)            # blobs[i] -> batch[i]
    except CorruptFrames as exc:
        for err in exc.errors:                       # err.index: which blob; err.detail: why
            quarantine(owner_of[err.index], "corrupt_image", err.detail)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import simplejpeg

from fleet.codec import decode_image
from fleet.errors import ConfigError, InvalidInput
from fleet.types import EncodedImage, Schema

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_COLORSPACES = {1: ("Gray",), 3: ("YCbCr", "RGB")}
"""Header colorspaces a JPEG may have to fill a slot with C channels (no silent gray <-> RGB)."""
_DECODE_AS = {1: "GRAY", 3: "RGB"}


class FrameError(InvalidInput):
    """Frame ``index`` of a batch cannot fill its slot; ``detail`` says why."""

    def __init__(self, index: int, detail: str):
        super().__init__(f"frame {index}: {detail}")
        self.index, self.detail = index, detail


class CorruptFrames(InvalidInput):
    """Some frames of a batch could not be decoded (``errors``, by index); all the others were."""

    def __init__(self, errors: list[FrameError]):
        shown = "; ".join(str(e) for e in errors[:3])
        super().__init__(f"{len(errors)} frame(s) cannot be decoded: {shown}" + ("; ..." if len(errors) > 3 else ""))
        self.errors = errors


def decode_frame(data: bytes | memoryview, out: np.ndarray, index: int = 0) -> None:
    """Decode one JPEG or PNG frame into ``out`` (a writable uint8 ``(H, W, C)`` array, C 1 or 3 for JPEG).

    Raises :class:`FrameError` (nothing else) for bytes that are not a frame of exactly that shape."""
    height, width, channels = out.shape
    head = bytes(data[:8])
    if head.startswith(PNG_MAGIC):
        try:
            pixels = decode_image(EncodedImage("png", height, width, channels, bytes(data)), "PNG")
        except InvalidInput as exc:
            raise FrameError(index, str(exc)) from None
        out[...] = pixels
        return
    if not head.startswith(JPEG_MAGIC):
        raise FrameError(index, f"{len(data)} bytes are neither JPEG nor PNG (they start with {head!r})")
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception as exc:  # noqa: BLE001 - ValueError is documented; bytes from a robot may find others
        raise FrameError(index, f"unreadable JPEG header ({len(data)} bytes): {exc}") from None
    if (h, w) != (height, width) or colorspace not in _JPEG_COLORSPACES.get(channels, ()):
        raise FrameError(index, f"JPEG is {h}x{w} {colorspace}, the slot is {height}x{width}x{channels}")
    target = out if out.flags.c_contiguous else np.empty(out.shape, np.uint8)
    try:
        simplejpeg.decode_jpeg(data, colorspace=_DECODE_AS[channels], buffer=target, strict=True)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt entropy data (strict: libjpeg warnings too)
        raise FrameError(index, f"cannot decode JPEG ({len(data)} bytes): {exc}") from None
    if target is not out:
        out[...] = target


class FrameDecoder:
    """Decodes batches of frames on ``workers`` threads (0: on the calling thread)."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ConfigError(f"frame decoder workers ({workers}) must be >= 0")
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="frames") if workers else None
        self._lock = threading.Lock()
        self._closed = False

    def decode_into(self, frames: Sequence[bytes], out: np.ndarray) -> None:
        """Decode ``frames[i]`` into ``out[i]`` for every i; ``out`` is a writable uint8 ``[N, H, W, C]`` view.

        Raises :class:`CorruptFrames` after decoding all the good frames if any frame is bad (its slot then
        holds garbage); ``InvalidInput`` if ``out`` cannot take the frames at all."""
        if out.dtype != np.uint8 or out.ndim != 4 or not out.flags.writeable:
            raise InvalidInput(f"out must be a writable uint8 [N, H, W, C] array, got {out.dtype} {out.shape}")
        if len(frames) != len(out):
            raise InvalidInput(f"{len(frames)} frames for {len(out)} slots")
        n = len(frames)
        if self._closed:
            raise RuntimeError("frame decoder is closed")
        if self._pool is None or n < 2:
            errors = _decode_range(frames, out, 0, n)
        else:
            parts = min(self.workers, n)  # one contiguous range per worker: one task each, not one per frame
            bounds = [n * k // parts for k in range(parts + 1)]
            with self._lock:
                if self._closed:
                    raise RuntimeError("frame decoder is closed")
                futures = [self._pool.submit(_decode_range, frames, out, a, b) for a, b in zip(bounds, bounds[1:])]
            errors = [e for f in futures for e in f.result()]
        if errors:
            raise CorruptFrames(errors)

    def close(self) -> None:
        """Stop the worker threads (after the batches in progress)."""
        with self._lock:
            self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> FrameDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FrameArena:
    """The decoded camera frames of cached episodes: one uint8 ``[rows, H, W, C]`` array per camera, grown
    by doubling up to ``max_bytes`` (RAM: ``rows * sum(H * W * C)`` bytes; 150,528 per 224x224 RGB camera
    and step). An episode owns a run of rows (``frame_base``); freed rows are reclaimed by compaction."""

    def __init__(self, schema: Schema, max_bytes: int):
        shapes = {f.name: tuple(f.shape) for f in schema.observation if f.is_image}
        self.row_bytes = sum(int(np.prod(shape)) for shape in shapes.values())
        self.max_rows = max_bytes // self.row_bytes if self.row_bytes else 0
        self.frames = {name: np.empty((0, *shape), np.uint8) for name, shape in shapes.items()}
        self.used = 0
        self.garbage = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.frames.values())

    def alloc(self, rows: int) -> int | None:
        """The first of ``rows`` new rows, or None when they would exceed ``max_bytes``."""
        if self.used + rows > self.max_rows:
            return None
        capacity = len(next(iter(self.frames.values())))
        if self.used + rows > capacity:
            grown = min(self.max_rows, max(2 * capacity, self.used + rows, 256))
            for name, a in self.frames.items():
                out = np.empty((grown, *a.shape[1:]), np.uint8)
                out[:self.used] = a[:self.used]
                self.frames[name] = out
        base, self.used = self.used, self.used + rows
        return base

    def compact(self, entries) -> None:
        """Pack the live entries' frames to the front (call with no batch being gathered)."""
        pos = 0
        for entry in sorted((e for e in entries if e.frame_base >= 0), key=lambda e: e.frame_base):
            if entry.frame_base != pos:
                for a in self.frames.values():
                    a[pos:pos + entry.frames_ready] = a[entry.frame_base:entry.frame_base + entry.frames_ready]
            entry.frame_base, entry.frame_rows = pos, entry.frames_ready
            pos += entry.frames_ready
        self.used, self.garbage = pos, 0


def _decode_range(frames: Sequence[bytes], out: np.ndarray, first: int, end: int) -> list[FrameError]:
    errors = []
    for i in range(first, end):
        try:
            decode_frame(frames[i], out[i], i)
        except FrameError as exc:
            errors.append(exc)
    return errors
