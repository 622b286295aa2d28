"""The fully connected network of the paper (`ntkrun.MLP`) as an architecture description.

Its costs are the ones ntkrun has always used; its kernels are `ntkrun.kernels.analytic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch

from ntkrun import resources
from ntkrun.architectures.base import Architecture
from ntkrun.kernels.analytic import CLOSED_FORMS, QUADRATURE_ORDER, analytic_kernel, analytic_kernels
from ntkrun.network import MLP, layer_sizes


def mlp_macs(n0: int, width: int, depth: int) -> float:
    """Multiply-adds of one input's forward pass through the scalar-output MLP."""
    return float(sum(a * b for a, b in pairwise(layer_sizes(n0, width, depth))))


def gd_flops(n: int, n0: int, width: int, depth: int) -> float:
    """One full-batch GD step on n inputs: forward (2 FLOPs a multiply-add), then the deltas and
    the weight update (4)."""
    return 6.0 * n * mlp_macs(n0, width, depth)


def ntk_flops(n1: int, n2: int, n0: int, width: int, depth: int) -> float:
    """An empirical NTK Gram (n1, n2): forward and delta passes of both sets, then per layer the
    two (n1, n_l) x (n_l, n2) products of the factorization."""
    return 4.0 * (n1 + n2) * mlp_macs(n0, width, depth) + 4.0 * n1 * n2 * (n0 + (depth - 1) * width)


def analytic_flops(n1: int, n2: int, n0: int, depth: int) -> float:
    """Sigma and Theta of the limit on (n1, n2) pairs: the input Gram, then about 50 FLOPs per
    entry and layer (arccos, square roots, the recursion)."""
    return 2.0 * n1 * n2 * n0 + 50.0 * depth * n1 * n2


@dataclass(frozen=True)
class MLPArchitecture(Architecture):
    """`ntkrun.MLP` on inputs of n0 = input_shape[0] numbers."""

    name: ClassVar[str] = "mlp"

    def inputs(self, X: torch.Tensor) -> torch.Tensor:
        return X.reshape(X.shape[0], -1)

    @property
    def layer_list(self) -> list[Any]:
        """The MLP as a list of ntkrun.layers (network.layers): depth Dense layers of b_std = beta,
        the nonlinearity between them; its exact kernels are this description's."""
        dense = {"dense": {"b_std": self.beta}}
        return [*[dense, self.nonlinearity] * (self.depth - 1), dense]

    def sizes(self, width: int, n_out: int = 1) -> list[int]:
        return layer_sizes(self.n0, width, self.depth, n_out)

    def net(
        self, width: int, seed: int, *, dtype: torch.dtype, device: torch.device | str, n_out: int = 1
    ) -> MLP:
        return MLP(
            self.n0, width, self.depth, self.nonlinearity, self.beta, seed=seed, dtype=dtype,
            device=device, n_out=n_out, parametrization=self.parametrization,
        )  # fmt: skip

    def kernel(
        self,
        X: torch.Tensor,
        X2: torch.Tensor | None = None,
        *,
        kind: str = "ntk",
        out_dtype: torch.dtype = torch.float64,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        self.check_kernel(kind)
        return analytic_kernel(
            self.inputs(X), None if X2 is None else self.inputs(X2), self.depth, self.nonlinearity,
            self.beta, kind=kind, out_dtype=out_dtype, out=out, rows=rows,
        )  # fmt: skip

    def range_values(self, q0: float) -> torch.Tensor:
        x = torch.tensor([[math.sqrt(q0)]], dtype=torch.float64)  # |x|^2 / n0 is all that matters
        sigma, theta = analytic_kernels(
            x, depth=self.depth, nonlinearity=self.nonlinearity, beta=self.beta, all_layers=True
        )
        return torch.cat([sigma.flatten(), theta.flatten()])

    def forward_flops(self, width: int, n_out: int = 1) -> float:
        return 2.0 * mlp_macs(self.n0, width, self.depth)

    def gd_flops(self, n: int, width: int, n_out: int = 1) -> float:
        return gd_flops(n, self.n0, width, self.depth)

    def ntk_flops(self, n1: int, n2: int, width: int, n_out: int = 1) -> float:
        return ntk_flops(n1, n2, self.n0, width, self.depth)

    def kernel_flops(self, n1: int, n2: int) -> float:
        """analytic_flops; without a closed form, the quadrature's order^2 nodes for each of the two
        expectations, entry and layer (about 8 FLOPs a node: the nonlinearity, products, sums)."""
        quadrature = 0.0 if self.nonlinearity in CLOSED_FORMS else 16.0 * QUADRATURE_ORDER**2
        return analytic_flops(n1, n2, self.n0, self.depth) + quadrature * (self.depth - 1) * n1 * n2

    def kernel_bytes(self, n1: int, n2: int) -> int:
        return resources.analytic_bytes(n1, n2, self.depth, closed_form=self.nonlinearity in CLOSED_FORMS)

    def network_bytes(self, width: int, n_out: int, b: int) -> int:
        return resources.network_bytes(self.sizes(width, n_out), b)

    def training_bytes(self, n: int, width: int, n_out: int, b: int) -> int:
        return resources.training_bytes(n, self.sizes(width, n_out), b)

    def empirical_ntk_bytes(self, n1: int, n2: int, width: int, n_out: int, b: int) -> int:
        return resources.empirical_ntk_bytes(n1, n2, self.sizes(width, n_out), b)
