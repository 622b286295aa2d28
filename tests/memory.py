"""Live tensor bytes: a deterministic measure of what a computation holds at once.

The resident set (VmHWM) also counts the allocator's and BLAS's working sets, which differ from
CPU to CPU: a 240-input Gram measured 1.38x its budget on an AMD EPYC and 1.78x on another CI
machine, for the same code. What the memory_budget promises is the tensors held, and those are
counted here exactly: every storage an aten op creates under the mode, from its creation until
the last tensor viewing it is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """`peak`: the most bytes of storage created under the mode and alive at one time."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address -> tensors viewing it
        self.live = 0
        self.peak = 0

    def _drop(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(
        self, func: Callable, types: object, args: tuple = (), kw: dict | None = None
    ) -> object:
        out = func(*args, **(kw or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key, nbytes)
        return out
