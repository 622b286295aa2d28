"""Dense: the fully connected weight layer, NTK parametrization (docs/science.md §12.1).

z = W_std / sqrt(n) W x + b_std b, W and b N(0, 1), n the fan-in. On the kernel state:
Sigma' = W_std^2 Sigma + b_std^2, Theta' = Sigma' + W_std^2 Theta, q' = W_std^2 q + b_std^2
(neural-tangents' stax.Dense, parameterization "ntk").
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ntkrun.layers.base import Built, Features, Layer, LayerError
from ntkrun.layers.state import Kernel, State, second

_SOURCES = itertools.count(1)  # a token per weight layer applied (see state.Kernel.source)


def next_source() -> int:
    return next(_SOURCES)


class DenseModule(nn.Module):
    def __init__(self, n_in: int, n_out: int, W_std: float, b_std: float, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=gen))
        self.bias = nn.Parameter(torch.randn(n_out, generator=gen)) if b_std else None
        self.w_scale, self.b_std = W_std / math.sqrt(n_in), b_std
        self.lr_w = self.lr_b = 1.0  # learning-rate factors of weight and bias (muP: maximal_update_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.dim() == 4  # images: the same weights at every position, on the channels
        out = nn.functional.linear(x.movedim(1, -1) if image else x, self.weight) * self.w_scale
        out = out if self.bias is None else out + self.b_std * self.bias
        return out.movedim(-1, 1) if image else out


class Dense(Layer):
    """A fully connected layer of `width` features (the readout: n_out)."""

    name = "dense"
    weights = True

    def __init__(self, W_std: float = 1.0, b_std: float = 0.1) -> None:
        self.W_std, self.b_std = float(W_std), float(b_std)

    def kernel(self, k: State) -> State:
        if not isinstance(k, Kernel):
            raise LayerError("dense: its input is several branches; join them first (FanInSum, FanInConcat)")
        w2, b2 = self.W_std**2, self.b_std**2
        sigma = w2 * k.sigma + b2
        q1 = w2 * k.q1 + b2
        q2 = q1 if k.q2 is k.q1 else second(self, lambda q: w2 * q + b2, k.q2)
        theta = sigma + w2 * k.theta
        return k.replace(
            sigma=sigma, theta=theta, q1=q1, q2=q2, gaussian=True, inputs=False, source=next_source()
        )

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        if isinstance(n_in, list):
            raise LayerError("dense: its input is several branches; join them first (FanInSum, FanInConcat)")
        out = n_out or width
        if isinstance(n_in, tuple) and len(n_in) == 3:  # images: on the channels at each position
            return DenseModule(n_in[0], out, self.W_std, self.b_std, gen), (out, *n_in[1:])
        if isinstance(n_in, tuple):  # sequences (T, d): on the features at each position
            return DenseModule(n_in[1], out, self.W_std, self.b_std, gen), (n_in[0], out)
        return DenseModule(n_in, out, self.W_std, self.b_std, gen), out
