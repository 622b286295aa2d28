"""ntkrun: reproduce and extend the Neural Tangent Kernel experiments of Jacot et al. (2018).

The library face, for notebooks and scripts; each name is imported on first use, so that
`ntkrun --help` does not pay for torch:

    from ntkrun import MLP, CNN, empirical_ntk, analytic_kernels, load_run
"""

from __future__ import annotations

import importlib
from typing import Any

from ntkrun.version import __version__

_FACE = {
    "MLP": "ntkrun.network",
    "CNN": "ntkrun.architectures",
    "gd_step": "ntkrun.network",
    "mse_cost": "ntkrun.network",
    "Nonlinearity": "ntkrun.nonlinearities",
    "empirical_ntk": "ntkrun.kernels",
    "empirical_nngp": "ntkrun.kernels",
    "analytic_kernels": "ntkrun.kernels",
    "analytic_kernel": "ntkrun.kernels",
    "monte_carlo_kernels": "ntkrun.kernels",
    "MonteCarloKernels": "ntkrun.kernels",
    "eigen": "ntkrun.dynamics",
    "predictor": "ntkrun.dynamics",
    "gaussian_process": "ntkrun.dynamics",
    "linearized": "ntkrun.dynamics",
    "percentiles": "ntkrun.dynamics",
    "kernel_pca_dense": "ntkrun.dynamics",
    "kernel_pca_power": "ntkrun.dynamics",
    "load_run": "ntkrun.results",
    "Run": "ntkrun.results",
    "NtkrunError": "ntkrun.errors",
}
__all__ = ["__version__", *_FACE]


def __getattr__(name: str) -> Any:
    if name not in _FACE:
        raise AttributeError(f"module 'ntkrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(_FACE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
