"""Kernel engine: empirical NTK (docs/science.md §2) and the infinite-width limits (docs/science.md
§3 for the MLP, §9 for the CNN)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ntkrun.kernels import analytic
from ntkrun.kernels.analytic import analytic_kernel
from ntkrun.kernels.cnn import cnn_kernels
from ntkrun.kernels.empirical import empirical_nngp, empirical_ntk
from ntkrun.kernels.monte_carlo import MonteCarloKernels, monte_carlo_kernels
from ntkrun.nonlinearities import Nonlinearity

ARCHS = ("mlp", "cnn")


def analytic_kernels(
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    depth: int = 4,
    nonlinearity: str | Nonlinearity = "relu",
    beta: float = 0.1,
    *,
    arch: str = "mlp",
    kernel_size: int = 3,
    padding: str = "same",
    readout: str = "flatten",
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Limiting kernels (Sigma(L), Theta(L)), each (N1, N2), of the MLP (arch "mlp": X (N1, n0),
    `ntkrun.kernels.analytic.analytic_kernels`) or of `ntkrun.CNN` (arch "cnn": images
    X (N1, C, H, W) with its kernel_size, padding and readout, `ntkrun.kernels.cnn.cnn_kernels`).
    The other keywords (parametrization, widths, out_dtype, closed_form, progress, ...)
    are those functions'; all_layers is the MLP's only."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "mlp":
        return analytic.analytic_kernels(X, X2, depth, nonlinearity, beta, **options)
    if options.get("all_layers"):
        raise ValueError("all_layers: the per-layer kernels are computed for arch='mlp' only")
    options.pop("all_layers", None)
    return cnn_kernels(
        X, X2, depth, nonlinearity, beta, kernel_size=kernel_size, padding=padding, readout=readout, **options
    )


__all__ = [
    "MonteCarloKernels",
    "analytic_kernel",
    "analytic_kernels",
    "cnn_kernels",
    "empirical_nngp",
    "empirical_ntk",
    "monte_carlo_kernels",
]
