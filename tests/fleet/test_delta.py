"""The delta codec: exact round trips on the raw bit patterns, the smallest encoding wins, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import delta
from fleet.errors import IntegrityError
from fleet.weights import tensor_bytes

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8, torch.int64, torch.bool)


def _pair(dtype: torch.dtype, n: int, changed_fraction: float, seed: int) -> tuple[bytes, bytes]:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        base = torch.rand(n, generator=gen) > 0.5
    else:
        base = (torch.randn(n, generator=gen, dtype=torch.float64) * 5).to(dtype)
    target = base.clone()
    mask = torch.rand(n, generator=gen) < changed_fraction
    if dtype == torch.bool:
        target[mask] = ~target[mask]
    else:  # a small step, like an optimizer update (integers: +1)
        step = torch.randn(int(mask.sum()), generator=gen, dtype=torch.float64) * 0.01 + (
            0 if dtype.is_floating_point else 1)
        target[mask] = (target[mask].double() + step).to(dtype)
    return tensor_bytes(base), tensor_bytes(target)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(0, 3000), changed=st.sampled_from([0.0, 0.01, 0.2, 0.6, 1.0]),
       seed=st.integers(0, 2**16))
def test_round_trip_is_bit_exact(dtype: torch.dtype, n: int, changed: float, seed: int) -> None:
    base, target = _pair(dtype, n, changed, seed)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    encoded = delta.encode(base, target, itemsize)
    assert encoded.encoding in delta.ENCODINGS
    assert len(encoded.data) <= len(target)
    assert bytes(delta.decode(base, encoded.encoding, encoded.data, itemsize, len(target))) == target


def test_sparse_updates_are_small_and_dense_bf16_steps_compress() -> None:
    base, target = _pair(torch.bfloat16, 200_000, 0.01, seed=1)
    sparse = delta.encode(base, target, 2)
    assert sparse.encoding == delta.SPARSE and len(sparse.data) < 0.03 * len(target)
    base, target = _pair(torch.bfloat16, 200_000, 1.0, seed=2)
    dense = delta.encode(base, target, 2)
    assert dense.encoding == delta.DIFF and len(dense.data) < 0.5 * len(target)
    noise = np.random.default_rng(0).integers(0, 2**16, 100_000, dtype=np.uint16).tobytes()
    assert delta.encode(bytes(len(noise)), noise, 2).encoding == delta.RAW  # incompressible: sent as is


@pytest.mark.parametrize("encoding", [delta.DIFF, delta.SPARSE])
def test_corrupt_or_mismatched_deltas_are_integrity_errors(encoding: str) -> None:
    base, target = _pair(torch.float32, 5000, 0.05 if encoding == delta.SPARSE else 1.0, seed=3)
    encoded = delta.encode(base, target, 4)
    assert encoded.encoding == encoding
    corrupt = bytearray(encoded.data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    try:
        out = delta.decode(base, encoding, corrupt, 4, len(target))
    except IntegrityError:
        pass
    else:  # a flip that still decompresses must at least change the result (the sha256 check catches it)
        assert bytes(out) != target
    with pytest.raises(IntegrityError, match="corrupt compressed delta|decompressed|out of range|header"):
        delta.decode(base, encoding, encoded.data[: len(encoded.data) // 3], 4, len(target))
    with pytest.raises(IntegrityError, match="needs a 20000-byte base, got 8"):
        delta.decode(base[:8], encoding, encoded.data, 4, len(target))
    with pytest.raises(IntegrityError, match="unknown tensor encoding 'xor-lz9'"):
        delta.decode(base, "xor-lz9", encoded.data, 4, len(target))


def test_layout_errors_name_the_sizes() -> None:
    with pytest.raises(ValueError, match="base has 4 bytes, target 8"):
        delta.encode(b"\0" * 4, b"\0" * 8, 4)
    with pytest.raises(ValueError, match="no delta encoding for 3-byte elements"):
        delta.encode(b"\0" * 6, b"\1" * 6, 3)
