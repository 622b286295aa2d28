"""Kernel engine: empirical NTK (docs/science.md §2) and the infinite-width limits (docs/science.md §3)."""

from ntkrun.kernels.analytic import analytic_kernel, analytic_kernels
from ntkrun.kernels.empirical import empirical_nngp, empirical_ntk

__all__ = ["analytic_kernel", "analytic_kernels", "empirical_nngp", "empirical_ntk"]
