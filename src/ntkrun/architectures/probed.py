"""Costs of a description whose network is measured rather than counted: one network of the
width is built and run once (torch's FLOP counter, its parameters, what autograd saves per input).
The user's own model (ntkrun.architectures.module) and the compositions of ntkrun.layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ntkrun.architectures.base import Architecture
from ntkrun.kernels.generic import DEFAULT_MEMORY_BUDGET

TRAINING_COPIES = 3  # per activation number in a forward/backward pass through autograd


@dataclass(frozen=True)
class ProbedArchitecture(Architecture):
    """An Architecture whose network's FLOPs and bytes come from `probe`."""

    @lru_cache(maxsize=64)  # noqa: B019 (a frozen description: the cache lives as long as it does)
    def probe(self, width: int, n_out: int) -> tuple[float, int, int]:
        """(FLOPs of one input's forward pass, parameters, numbers autograd saves per input for the
        backward pass) of one float32 network of `width`; NaN and zeros for a model that cannot be
        built or run here (units are listed before the checks, which then name the problem)."""
        try:
            net = self.net(width, 0, dtype=torch.float32, device="cpu", n_out=n_out)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(self.inputs(torch.zeros(1, self.n0)))

            def saved(n: int) -> int:  # what a forward pass on n inputs keeps for the backward pass
                total = [0]

                def pack(t: torch.Tensor) -> torch.Tensor:
                    total[0] += t.numel()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    net(self.inputs(torch.zeros(n, self.n0)))
                return total[0]

            numbers = max(saved(2) - saved(1), 1)  # the difference leaves out the saved weights
        except Exception:
            return math.nan, 0, 0
        return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters()), numbers

    def forward_flops(self, width: int, n_out: int = 1) -> float:
        return self.probe(width, n_out)[0]

    def ntk_flops(self, n1: int, n2: int, width: int, n_out: int = 1) -> float:
        """Jacobians of both sets (about 3 forward passes an output) and their contraction."""
        flops, params, _ = self.probe(width, n_out)
        return 3.0 * (n1 + n2) * n_out * flops + 2.0 * n1 * n2 * n_out * params

    def network_bytes(self, width: int, n_out: int, b: int) -> int:
        return 2 * self.probe(width, n_out)[1] * b  # the parameters and their float64 draw

    def training_bytes(self, n: int, width: int, n_out: int, b: int) -> int:
        _, params, numbers = self.probe(width, n_out)
        return TRAINING_COPIES * n * numbers * b + 2 * params * b

    def empirical_ntk_bytes(self, n1: int, n2: int, width: int, n_out: int, b: int) -> int:
        """The generic engine's output, a float64 copy, and its Jacobian blocks (within its budget)."""
        params = self.probe(width, n_out)[1]
        return n1 * n2 * (b + 8) + min(DEFAULT_MEMORY_BUDGET, (n1 + n2) * n_out * params * b)
