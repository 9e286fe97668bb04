"""One reused host copy of the trainer's tensors: the only work publishing and checkpointing leave on the
training thread.

``HostSnapshot.copy_from`` is a single device-to-host copy into buffers allocated once (pinned when the
tensors live on a GPU, so the copy is a DMA; plain memory on a CPU trainer) and reused by every later
snapshot of the same layout. A publisher or checkpoint thread then hashes and writes the snapshot while
training goes on; the next snapshot waits until that thread is done with it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class HostSnapshot:
    """Reused host buffers, by name; the tensors ``copy_from`` returns are valid until its next call."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def copy_from(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, on_gpu = {}, False
        for name, src in tensors.items():
            src = src.detach()
            buf = self._buffers.get(name)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
            buf.copy_(src, non_blocking=src.is_cuda)
            on_gpu |= src.is_cuda
            out[name] = buf
        for stale in set(self._buffers) - set(out):
            del self._buffers[stale]
        if on_gpu:
            torch.cuda.synchronize()  # the copies above were queued without waiting
        return out
