"""Inputs of the experiments: points on the unit circle and Gaussian training sets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for `stream` of `seed`, independent of the network init stream (seed alone)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))


def circle(gammas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(G,) angles -> (G, 2) points (cos g, sin g), float64."""
    g = torch.as_tensor(gammas, dtype=torch.float64)
    return torch.stack([torch.cos(g), torch.sin(g)], dim=1)


def grid_angles(n: int) -> torch.Tensor:
    """n angles evenly spaced in [-pi, pi), float64."""
    return -math.pi + 2 * math.pi * torch.arange(n, dtype=torch.float64) / n


def gaussian_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) inputs x ~ N(0, I), float64, drawn from the data stream of `seed`."""
    return torch.randn(n, dim, generator=seeded_generator(seed, 1), dtype=torch.float64)


def product_target(X: torch.Tensor) -> torch.Tensor:
    """f*(x) = x1 x2: (N, >=2) -> (N,)."""
    return X[:, 0] * X[:, 1]
