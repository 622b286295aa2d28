"""Models of your own for ntkrun (`network.module`): put this folder on PYTHONPATH, then e.g.

    PYTHONPATH=examples ntkrun scaling --preset quick --set network.module=models:residual_mlp

ntkrun calls a factory with those of the keywords width, depth, in_shape (one input's shape),
n_out and seed that it accepts, under torch.manual_seed(seed), and takes any nn.Module mapping
(N, *in_shape) to (N,) or (N, n_out). Their limits are Monte-Carlo means (docs/science.md §10).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

import ntkrun


class NTKLinear(nn.Module):
    """y = W x / sqrt(fan_in) + beta b with W, b standard normal: the NTK parametrization."""

    def __init__(self, fan_in: int, fan_out: int, beta: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.randn(fan_out))
        self.scale, self.beta = 1 / math.sqrt(fan_in), beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T * self.scale + self.beta * self.bias


class ResidualMLP(nn.Module):
    """h_1 = relu(A x); h_{l+1} = h_l + relu(W_l h_l) / sqrt(blocks); f = V h_L: depth weight layers
    in all (input, depth - 2 residual blocks, readout), NTK parametrization, so its kernel has a
    width-independent limit."""

    def __init__(self, n0: int, width: int, depth: int, n_out: int) -> None:
        super().__init__()
        self.inp = NTKLinear(n0, width)
        self.blocks = nn.ModuleList(NTKLinear(width, width) for _ in range(max(depth - 2, 0)))
        self.out = NTKLinear(width, n_out)
        self.n_out = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        for block in self.blocks:
            h = h + torch.relu(block(h)) / math.sqrt(len(self.blocks))
        y = self.out(h)
        return y[:, 0] if self.n_out == 1 else y


def residual_mlp(width: int, depth: int, in_shape: tuple[int, ...], n_out: int) -> nn.Module:
    return ResidualMLP(math.prod(in_shape), width, depth, n_out)


class SmallCNN(nn.Module):
    """depth - 1 3x3 convolutions of `width` channels (padding 1) with ReLU, then a dense readout;
    plain nn.Conv2d and nn.Linear with torch's default initialization (the standard
    parametrization: its NTK grows with the width)."""

    def __init__(self, in_shape: tuple[int, int, int], width: int, depth: int, n_out: int) -> None:
        super().__init__()
        channels = [in_shape[0]] + [width] * (depth - 1)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in pairwise(channels))
        self.out = nn.Linear(channels[-1] * in_shape[1] * in_shape[2], n_out)
        self.n_out = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        y = self.out(x.flatten(1))
        return y[:, 0] if self.n_out == 1 else y


def small_cnn(width: int, depth: int, in_shape: tuple[int, ...], n_out: int) -> nn.Module:
    if len(in_shape) != 3:
        raise ValueError(f"small_cnn takes images (C, H, W), got inputs of shape {tuple(in_shape)}")
    return SmallCNN(tuple(in_shape), width, depth, n_out)


def ntk_mlp(width: int, depth: int, in_shape: tuple[int, ...], n_out: int, seed: int) -> nn.Module:
    """ntkrun's own MLP as a module: its Monte-Carlo limit beside a user model's, in one sweep."""
    return ntkrun.MLP(math.prod(in_shape), width, depth, seed=seed, n_out=n_out)
