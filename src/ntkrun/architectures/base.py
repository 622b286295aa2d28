"""One architecture description: the finite network, its limiting kernels and its cost.

An experiment never asks which network it runs: it asks the description, built from the spec's
`network` block and the shape of one input (from the data), for

    net(width, seed, ...)            the finite nn.Module, (N, *input_shape) -> (N,) or (N, k)
    kernel(X, X2, kind, ...)         Sigma(L) ("nngp") or Theta(L) ("ntk") of the limit, row-blockable
    kernels(X, X2, kinds, ...)       several of them, in one recursion where JOINT_KERNELS
    forward_flops / ntk_flops /      what --list-units, the progress bars and the memory refusals use
    kernel_flops / *_bytes

Data reach the description as the runners hold them, one flattened row per point (N, n0); `inputs`
gives them the shape the network takes. A new network is a composition of ntkrun.layers
(`network.layers`, described by architectures.layers), and a new layer one module of its own
(docs/architecture.md, "Adding a layer").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ntkrun.costs import Cost, Probe


def place_rows(
    blocks: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor | None] | None,
    rows: tuple[int, int] | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Kernels computed as blocks (r1 - r0, N2) of rows=(r0, r1) (the whole (N1, N2) without rows)
    into `outs` where given, a whole Gram's or that block's shape, else returned in out_dtype."""
    found = []
    for block, out in zip(blocks, outs if outs is not None else [None] * len(blocks), strict=True):
        if out is None:
            found.append(block.to(out_dtype))
            continue
        r0 = 0 if rows is None or out.shape[0] == block.shape[0] else rows[0]  # a block's out, or the whole's
        out[r0 : r0 + block.shape[0]] = block
        found.append(out)
    return found


@dataclass(frozen=True)
class Architecture(ABC):
    """The shared fields of every description (those of the spec's `network` block) and the
    shape of one input, e.g. (784,) for the MLP on MNIST or (1, 28, 28) for a CNN."""

    input_shape: tuple[int, ...]
    depth: int
    nonlinearity: str = "relu"
    beta: float = 0.1
    parametrization: str = "ntk"

    name: ClassVar[str]
    EXACT: ClassVar[bool] = True
    """True where `kernel` is the exact infinite-width limit; False where it is a Monte-Carlo
    estimate over finite networks (a user's model), which runners compute in shares (units)."""
    JOINT_KERNELS: ClassVar[bool] = False
    """True where one recursion gives Sigma and Theta together and costs what one of them costs, so
    a run that wants both asks `kernels` once (the CNN, whose pixel-pair recursion is the cost);
    False where each is cheap next to its solve and two Grams would not fit beside each other
    (the MLP, on all 60000 points)."""

    @property
    def n0(self) -> int:
        """Numbers per input."""
        return math.prod(self.input_shape)

    def inputs(self, X: torch.Tensor) -> torch.Tensor:
        """(N, n0) flattened points (or already shaped ones) -> (N, *input_shape)."""
        return X.reshape(X.shape[0], *self.input_shape)

    def check_kernel(self, kind: str) -> None:
        """ValueError unless `kind` names a limit this description gives: "ntk" or "nngp", in the
        NTK parametrization (the standard parametrization's limit grows with the width: its
        kernels are `ntkrun.analytic_kernels(..., parametrization="standard", widths=...)`)."""
        if kind not in ("ntk", "nngp"):
            raise ValueError(f"kind must be one of ntk, nngp, got {kind!r}")
        if self.parametrization != "ntk":
            raise ValueError(f"the {self.parametrization} parametrization has no width-independent limit")

    def gd_flops(self, n: int, width: int, n_out: int = 1) -> float:
        """One full-batch GD step on n inputs: the forward pass, then the backward pass (about
        twice its FLOPs: the deltas and the weight gradients)."""
        return 3.0 * n * self.forward_flops(width, n_out)

    def gd_cost(self, n: int, width: int, n_out: int = 1) -> Cost:
        """One GD step on n inputs, as this machine runs it (timed: ntkrun.costs.Probe)."""
        return Cost(probes=((Probe("gd", n, width=width, n_out=n_out, description=self), 1.0),))

    def kernel_cost(self, n1: int, n2: int) -> Cost:
        """One limiting kernel on (n1, n2) input pairs, as this machine computes it (timed)."""
        return Cost(probes=((Probe("kernel", n1, n2=n2, description=self), 1.0),))

    @abstractmethod
    def net(
        self, width: int, seed: int, *, dtype: torch.dtype, device: torch.device | str, n_out: int = 1
    ) -> nn.Module:
        """The finite network of `width` hidden units (channels) drawn from `seed`."""

    @abstractmethod
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
        """Theta(L) (kind "ntk") or Sigma(L) ("nngp") on (N1, n0) x (N2, n0) points -> (N1, N2),
        as `ntkrun.kernels.analytic.analytic_kernel` (rows=(r0, r1) of a symmetric Gram fills the
        upper triangle and the diagonal of those rows; `ntkrun.linalg.mirror_` completes it)."""

    def kernels(
        self,
        X: torch.Tensor,
        X2: torch.Tensor | None = None,
        *,
        kinds: Sequence[str],
        out_dtype: torch.dtype = torch.float64,
        outs: Sequence[torch.Tensor | None] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> list[torch.Tensor]:
        """`kernel` of each of `kinds`, into the matching `outs` where given (one recursion for all of
        them where JOINT_KERNELS; here, one call each)."""
        outs = outs if outs is not None else [None] * len(kinds)
        return [
            self.kernel(X, X2, kind=kind, out_dtype=out_dtype, out=out, rows=rows)
            for kind, out in zip(kinds, outs, strict=True)
        ]

    def range_values(self, q0: float) -> torch.Tensor:
        """The limit's Sigma and Theta on the diagonal of one input with |x|^2 / n0 = q0 (constant
        pixels), float64 -> (values,): the size of the activations and of the empirical NTK. Here
        the output layer's; a description whose recursion gives every layer's returns them all."""
        x = torch.full((1, self.n0), math.sqrt(q0), dtype=torch.float64)
        return torch.cat([k.flatten() for k in self.kernels(x, kinds=("nngp", "ntk"))])

    @abstractmethod
    def forward_flops(self, width: int, n_out: int = 1) -> float:
        """FLOPs of one input's forward pass (2 per multiply-add)."""

    @abstractmethod
    def ntk_flops(self, n1: int, n2: int, width: int, n_out: int = 1) -> float:
        """FLOPs of an empirical NTK Gram (n1, n2) of the finite network."""

    @abstractmethod
    def kernel_flops(self, n1: int, n2: int) -> float:
        """FLOPs of one limiting kernel on (n1, n2) input pairs."""

    @abstractmethod
    def kernel_bytes(self, n1: int, n2: int) -> int:
        """Peak bytes of `kernel` on (n1, n2) pairs: its output and intermediates."""

    @abstractmethod
    def network_bytes(self, width: int, n_out: int, b: int) -> int:
        """The network's parameters in a dtype of b bytes, and what drawing them holds."""

    @abstractmethod
    def training_bytes(self, n: int, width: int, n_out: int, b: int) -> int:
        """One GD step (or forward pass) on n inputs: activations, deltas and temporaries."""

    @abstractmethod
    def empirical_ntk_bytes(self, n1: int, n2: int, width: int, n_out: int, b: int) -> int:
        """`ntkrun.empirical_ntk` on (n1, n2) inputs: live features, its output and a float64 copy."""
