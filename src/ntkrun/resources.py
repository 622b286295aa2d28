"""Memory estimates of the units of a spec (the check against what the machine has is in ntkrun.units).

The estimates count the large tensors each computation holds at its peak (weights, the
activations and deltas of a forward/backward pass, kernel matrices and their blocks, eigen
decompositions); tests/robustness compare them with the measured peak of real runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from ntkrun.kernels.analytic import MIRROR_BLOCK, QUADRATURE_CHUNK, QUADRATURE_ORDER, tile_shape_for
from ntkrun.kernels.buffers import LIVE_COPIES
from ntkrun.kernels.empirical import DEFAULT_MEMORY_BUDGET, FEATURE_COPIES


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float64": 8}[dtype]


def network_bytes(sizes: Sequence[int], b: int) -> int:
    """Weights and biases, plus the largest layer drawn in float64 before its cast."""
    params = sum(m * n + n for m, n in pairwise(sizes))
    largest = max(m * n for m, n in pairwise(sizes))
    return params * b + largest * 8


def training_bytes(n: int, sizes: Sequence[int], b: int) -> int:
    """One GD step on n inputs: activations a(l), pre-activations z(l), deltas and their
    temporaries, about six (n, n_l) tensors per layer (five live at once, plus what the
    allocator holds on to: measured peaks reach 1.06 x the five-tensor count)."""
    return 6 * n * sum(sizes) * b


def empirical_ntk_bytes(n1: int, n2: int, sizes: Sequence[int], b: int) -> int:
    """The live features (all inputs', or two row blocks' within the engine's memory budget;
    10% above the count for the allocator, as measured), the output, and the float64 copy the
    runners make of it."""
    features = min(FEATURE_COPIES * (n1 + n2) * sum(sizes) * b, DEFAULT_MEMORY_BUDGET)
    return int(1.1 * features) + n1 * n2 * (2 * b + 8)


QUADRATURE_COPIES = 5  # (chunk, order) float64 arrays of the quadrature alive at once (measured 3.7-4.9)


def analytic_bytes(n1: int, n2: int, depth: int = 4, closed_form: bool = True) -> int:
    """Sigma and Theta (float64), one tile's LIVE_COPIES reused float64 intermediates, and the
    temporaries of mirroring a symmetric Gram's upper triangle (three blocks); without a closed
    form, the Gauss-Hermite quadrature's chunk of (entries, order) arrays (a nonlinearity such as
    tanh: hundreds of MB where the closed forms need a few)."""
    rows, cols = tile_shape_for(n2)
    quadrature = 0 if closed_form else quadrature_bytes(n1, n2, depth)
    tile = LIVE_COPIES * 8 * min(n1, rows) * cols
    return 2 * n1 * n2 * 8 + tile + 3 * 8 * min(n1, MIRROR_BLOCK) ** 2 + quadrature


def quadrature_bytes(n1: int, n2: int, depth: int = 4) -> int:
    """The quadrature's working set while it computes one tile's expectations (transient: one
    kernel computation at a time holds it)."""
    rows, cols = tile_shape_for(n2)
    return QUADRATURE_COPIES * 8 * min(QUADRATURE_CHUNK, min(n1, rows) * cols * QUADRATURE_ORDER)


def eigen_bytes(n: int) -> int:
    """A symmetric eigendecomposition of an (n, n) float64 matrix: input copy, vectors, work."""
    return 4 * n * n * 8
