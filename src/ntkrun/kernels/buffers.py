"""Reused tile buffers for the limiting kernels' recursions (MLP and CNN)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

LIVE_COPIES = 12  # intermediates of one tile alive at once (maps, expectations, patch sums)


class BufferPool:
    """Reused buffers by shape: a fresh MB-sized tensor is mapped anew and page-faulted on every
    allocation (measured: 40% of the time of a CNN Gram with fresh intermediates)."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def get(self, like: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """An uninitialized tensor of like's dtype and device, of like's shape or `shape`."""
        shape = tuple(like.shape if shape is None else shape)
        key = (shape, like.dtype, like.device)
        stack = self.free.get(key)
        return stack.pop() if stack else torch.empty(shape, dtype=like.dtype, device=like.device)

    def put(self, *ts: torch.Tensor | None) -> None:
        """Keep tensors for reuse, at most LIVE_COPIES in all (of every shape): tensors made outside
        the pool (a tile's input Gram, the expectations) are put back too, and without the bound
        every tile would leave one more behind (the pool grew by a tile's maps per tile); a bound
        per shape would let "valid" padding, whose maps shrink layer by layer, keep that many of
        each layer's shape."""
        for t in ts:
            if t is not None and t.is_contiguous() and sum(map(len, self.free.values())) < LIVE_COPIES:
                self.free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
