"""The convolutional network (`ntkrun.architectures.cnn.CNN`) as an architecture description:
its finite network, its limiting kernels (`ntkrun.kernels.cnn`, docs/science.md §9) and its cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch

from ntkrun.architectures.base import Architecture
from ntkrun.architectures.cnn import CNN, check_geometry, forward_flops, image_sizes
from ntkrun.kernels.cnn import TILE_NUMBERS, cnn_kernels
from ntkrun.kernels.generic import DEFAULT_MEMORY_BUDGET
from ntkrun.linalg import empty_checked
from ntkrun.network import hidden_widths

TRAINING_COPIES = 3  # per activation number in a forward/backward pass through autograd (measured)
# tile-sized intermediates at the kernels' peak: the pool's buffers, the patch sums' 0/1 masks,
# rolls and expectations in flight. Measured (VmHWM, benchmarks-style, 7 geometries: same/valid/
# circular, flatten/gap, depths 3-4): 10-21 copies; 24 keeps the estimate above every one of them
PEAK_COPIES = 24
PAIR_FLOPS = 60  # per pixel pair and layer besides the patch sums: expectations, square roots, products


@dataclass(frozen=True)
class CNNArchitecture(Architecture):
    """`ntkrun.architectures.CNN` on images of input_shape (C0, H, W)."""

    kernel_size: int = 3
    padding: str = "same"
    readout: str = "flatten"
    name: ClassVar[str] = "cnn"
    JOINT_KERNELS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_geometry(self.kernel_size, self.padding, self.readout, self.depth)
        if len(self.input_shape) != 3:
            raise ValueError(f"a CNN takes images (C, H, W), got inputs of shape {self.input_shape}")
        image_sizes(self.input_shape[1:], self.kernel_size, self.padding, self.depth)

    @property
    def layer_list(self) -> list[Any]:
        """The CNN as a list of ntkrun.layers (network.layers): depth - 1 convolutions of b_std =
        beta, the nonlinearity after each, the readout (flatten, or global average pooling), then
        the dense layer; its exact kernels are this description's."""
        conv = {"conv": {"kernel_size": self.kernel_size, "padding": self.padding, "b_std": self.beta}}
        readout = "flatten" if self.readout == "flatten" else "global_avg_pool"
        return [*[conv, self.nonlinearity] * (self.depth - 1), readout, {"dense": {"b_std": self.beta}}]

    def channels(self, width: int) -> list[int]:
        return [self.input_shape[0], *hidden_widths(width, self.depth)]

    def sizes(self) -> list[tuple[int, int]]:
        return image_sizes(self.input_shape[1:], self.kernel_size, self.padding, self.depth)

    def net(
        self, width: int, seed: int, *, dtype: torch.dtype, device: torch.device | str, n_out: int = 1
    ) -> CNN:
        return CNN(
            self.input_shape[0], width, self.depth, self.kernel_size, self.padding, self.readout,
            self.nonlinearity, self.beta, n_out, self.parametrization, seed, self.input_shape[1:],
            dtype, device,
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
        return self.kernels(X, X2, kinds=(kind,), out_dtype=out_dtype, outs=(out,), rows=rows)[0]

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
        """Sigma and Theta come out of one recursion (`cnn_kernels`): asking for both costs one."""
        for kind in kinds:
            self.check_kernel(kind)
        X = self.inputs(X)
        X2 = None if X2 is None else self.inputs(X2)
        outs = list(outs) if outs is not None else [None] * len(kinds)
        pair: list[torch.Tensor | None] = [None, None]  # (sigma, theta) outputs where asked for
        for kind, out in zip(kinds, outs, strict=True):
            pair[kind == "ntk"] = out
        n2 = X.shape[0] if X2 is None else X2.shape[0]
        n1 = X.shape[0] if rows is None else rows[1] - rows[0]  # rows without outs: that block alone
        for kind, out in zip(kinds, outs, strict=True):
            if out is None:
                (pair[kind == "ntk"],) = empty_checked([(n1, n2)], out_dtype, "cpu", "the CNN kernel")
        sigma, theta = cnn_kernels(
            X, X2, self.depth, self.nonlinearity, self.beta, kernel_size=self.kernel_size,
            padding=self.padding, readout=self.readout, out_dtype=out_dtype, outs=pair, rows=rows,
        )  # fmt: skip
        return [theta if kind == "ntk" else sigma for kind in kinds]

    def forward_flops(self, width: int, n_out: int = 1) -> float:
        c, k = self.channels(width), self.kernel_size
        return float(sum(forward_flops(c, k, self.sizes(), self.readout, n_out)))

    def ntk_flops(self, n1: int, n2: int, width: int, n_out: int = 1) -> float:
        """Forward and backward passes of both sets (per output), then the Gram of the features."""
        params = self._params(width, n_out)
        return (n1 + n2) * n_out * 3.0 * self.forward_flops(width, n_out) + 2.0 * n1 * n2 * n_out * params

    def _params(self, width: int, n_out: int) -> int:
        c = self.channels(width)
        h, w = self.sizes()[-1]
        conv = sum(co * ci * self.kernel_size**2 + co for ci, co in pairwise(c))
        fan_in = c[-1] * (h * w if self.readout == "flatten" else 1)
        return conv + n_out * (fan_in + 1)

    def _pairs(self) -> int:
        """Pixel pairs per input pair and layer: same-position pairs ("flatten") or all ("gap")."""
        h, w = self.input_shape[1:]
        return h * w * (h * w if self.readout == "gap" else 1)

    def kernel_flops(self, n1: int, n2: int) -> float:
        per_layer = self._pairs() * (4 * self.kernel_size**2 + PAIR_FLOPS)
        return n1 * n2 * (2.0 * self.input_shape[0] * self._pairs() + self.depth * per_layer)

    def kernel_bytes(self, n1: int, n2: int) -> int:
        """Sigma and Theta (and the output they are copied into), the per-layer variances of both
        sets of inputs, and PEAK_COPIES tile intermediates."""
        variances = (n1 + n2) * sum(h * w for h, w in self.sizes()[1:])
        return 8 * (3 * n1 * n2 + variances + PEAK_COPIES * max(TILE_NUMBERS, self._pairs()))

    def network_bytes(self, width: int, n_out: int, b: int) -> int:
        c = self.channels(width)
        largest = max([co * ci * self.kernel_size**2 for ci, co in pairwise(c)] + [0])
        return self._params(width, n_out) * b + max(largest, self._params(width, n_out) // self.depth) * 8

    def training_bytes(self, n: int, width: int, n_out: int, b: int) -> int:
        """TRAINING_COPIES copies of every layer's activations (h and alpha kept by autograd, their
        gradients in the backward pass) and the padded input of each convolution, which autograd
        keeps too (tests/robustness/test_resources.py measures it)."""
        c, sizes = self.channels(width), self.sizes()
        numbers = sum(ch * h * w for ch, (h, w) in zip(c, sizes, strict=True)) + n_out
        pad = 0 if self.padding == "valid" else 2 * (self.kernel_size // 2)
        padded = sum(ch * (h + pad) * (w + pad) for ch, (h, w) in zip(c[:-1], sizes[:-1], strict=True))
        return int((TRAINING_COPIES * numbers + padded) * n * b)  # + each conv's padded input, kept

    def empirical_ntk_bytes(self, n1: int, n2: int, width: int, n_out: int, b: int) -> int:
        features = min(2 * n_out * self._params(width, n_out) * (n1 + n2) * b, DEFAULT_MEMORY_BUDGET)
        passes = self.training_bytes(min(n1 + n2, 64), width, n_out, b)  # a block's forward/backward
        return int(1.1 * features) + passes + n1 * n2 * (2 * b + 8)
