"""Delta codec for policy tensors: send only what changed between two versions.

A tensor travels in one of three encodings (the ``encoding`` of its pieces):

``raw``
    Its bytes as they are.
``diff``
    The element-wise difference of the raw bit patterns, target minus base,
    modulo 2^bits (bf16/fp16 as uint16, fp32 as uint32, ...), zigzag-mapped so
    that small steps of either sign become small unsigned numbers, split into
    byte planes and zstd-compressed. A fine-tuning step moves most weights by a
    few units in the last place, so the high planes are almost all zero.
``sparse``
    The indices of the elements that changed (as gaps from the previous index)
    and their zigzag differences, each split into byte planes and compressed.
    Wins when few elements changed (e.g. bf16 weights at a small learning rate,
    where most updates round away).

The encoder tries the candidates that can win and keeps the smallest (falling
back to ``raw`` when nothing is smaller). Decoding is exact: applying a delta to
the base bytes gives the target bytes bit for bit, which the receiver checks
against the manifest's sha256 anyway.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from fleet.errors import IntegrityError

RAW = "raw"
DIFF = "diff"
SPARSE = "sparse"
ENCODINGS = (RAW, DIFF, SPARSE)
ZSTD_LEVEL = 1  # level 3+ buys ~1% here at 2-3x the CPU
SPARSE_MAX_DENSITY = 0.3  # above this share of changed elements, sparse cannot beat diff
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SPARSE_HEADER = struct.Struct("<QQ")  # number of changed elements, compressed index bytes


@dataclass(frozen=True)
class Encoded:
    """One tensor as it goes on the wire."""

    encoding: str
    data: bytes | memoryview


def _words(buf, itemsize: int) -> np.ndarray:
    try:
        word = _WORDS[itemsize]
    except KeyError:
        raise ValueError(f"no delta encoding for {itemsize}-byte elements") from None
    if len(buf) % itemsize:
        raise IntegrityError(f"{len(buf)} bytes is not a whole number of {itemsize}-byte elements")
    return np.frombuffer(buf, dtype=word)


def _zigzag(diff: np.ndarray) -> np.ndarray:
    """Unsigned wrap-around differences -> zigzag (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...)."""
    bits = diff.dtype.itemsize * 8
    signed = diff.view(np.dtype(f"i{diff.dtype.itemsize}"))
    return ((signed << 1) ^ (signed >> (bits - 1))).view(diff.dtype)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return (z >> 1) ^ (np.zeros_like(z) - (z & 1))


def _planes(words: np.ndarray) -> bytes:
    """Byte-plane shuffle: all lowest bytes, then all next bytes... (compresses far better)."""
    size = words.dtype.itemsize
    if size == 1:
        return words.tobytes()
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, size).T).tobytes()


def _unplanes(data: bytes, dtype: type, count: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if len(data) != count * size:
        raise IntegrityError(f"delta holds {len(data)} bytes, expected {count} x {size}")
    if size == 1:
        return np.frombuffer(data, dtype=dtype).copy()
    return np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8).reshape(size, count).T).view(dtype).reshape(-1)


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def _decompress(data, expected_bytes: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=expected_bytes)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"corrupt compressed delta: {exc}") from None
    if len(out) != expected_bytes:
        raise IntegrityError(f"delta decompressed to {len(out)} bytes, expected {expected_bytes}")
    return out


def encode(base, target, itemsize: int) -> Encoded:
    """The smallest encoding of ``target`` given ``base`` (same size, elements of ``itemsize`` bytes)."""
    if len(base) != len(target):
        raise ValueError(f"base has {len(base)} bytes, target {len(target)}: not the same tensor layout")
    a, b = _words(base, itemsize), _words(target, itemsize)
    diff = b - a  # wraps modulo 2^bits
    changed = np.flatnonzero(diff)
    best = Encoded(RAW, target)
    if changed.size / max(diff.size, 1) <= SPARSE_MAX_DENSITY and diff.size < 2**32:
        gaps = np.diff(changed, prepend=-1).astype(np.uint32)
        index = _compress(_planes(gaps))
        values = _compress(_planes(_zigzag(diff[changed])))
        data = _SPARSE_HEADER.pack(changed.size, len(index)) + index + values
        if len(data) < len(best.data):
            best = Encoded(SPARSE, data)
    if changed.size / max(diff.size, 1) >= SPARSE_MAX_DENSITY / 3 or best.encoding == RAW:
        data = _compress(_planes(_zigzag(diff)))
        if len(data) < len(best.data):
            best = Encoded(DIFF, data)
    return best


def decode(base, encoding: str, data, itemsize: int, nbytes: int, out=None) -> bytearray | memoryview:
    """Target bytes from ``base`` and an encoded delta; IntegrityError if it does not fit. With ``out`` (a
    writable ``nbytes`` buffer, which may be ``base`` itself) the result is written there and returned."""
    if out is not None and len(out) != nbytes:
        raise ValueError(f"out has {len(out)} bytes, expected {nbytes}")
    if encoding == RAW:
        if len(data) != nbytes:
            raise IntegrityError(f"raw tensor has {len(data)} bytes, expected {nbytes}")
        if out is None:
            return bytearray(data)
        out[:] = data
        return out
    if base is None or len(base) != nbytes:
        raise IntegrityError(f"{encoding} delta needs a {nbytes}-byte base, got "
                             f"{'none' if base is None else len(base)}")
    a = _words(base, itemsize)
    word = a.dtype.type
    if encoding == DIFF:
        diff = _unzigzag(_unplanes(_decompress(data, nbytes), word, a.size))
        out = bytearray(nbytes) if out is None else out
        np.add(a, diff, out=np.frombuffer(out, dtype=word))
        return out
    if encoding == SPARSE:
        if len(data) < _SPARSE_HEADER.size:
            raise IntegrityError("sparse delta shorter than its header")
        count, index_bytes = _SPARSE_HEADER.unpack_from(data)
        if count > a.size:
            raise IntegrityError(f"sparse delta changes {count} elements of a {a.size}-element tensor")
        body = memoryview(data)[_SPARSE_HEADER.size:]
        gaps = _unplanes(_decompress(body[:index_bytes], 4 * count), np.uint32, count)
        values = _unzigzag(_unplanes(_decompress(body[index_bytes:], itemsize * count), word, count))
        index = np.cumsum(gaps.astype(np.int64)) - 1
        if count and (index[0] < 0 or index[-1] >= a.size or np.any(gaps == 0)):
            raise IntegrityError("sparse delta indices out of range")
        if out is None:
            out = bytearray(base)
        elif out is not base:
            out[:] = base
        view = np.frombuffer(out, dtype=word)
        view[index] += values
        return out
    raise IntegrityError(f"unknown tensor encoding {encoding!r} (this edge knows {ENCODINGS})")
