"""The kernel state a composition maps layer by layer (docs/science.md §12).

For inputs x (N1 of them) and x' (N2): Sigma (N1, N2), the covariance of the layer's outputs
(one feature, at infinite width), Theta (N1, N2), their neural tangent kernel, and each input's own
variance q = Sigma(x, x), kept separately so that an activation or a normalization sees the
diagonal of both sides. `gaussian`: the features are a Gaussian process (what an activation and
LayerNorm need: the output of a weight layer, or a sum of such); `inputs`: they are still the
raw inputs (no weight layer yet); `source`: a token of the weight layer they last came out of
(branches from distinct ones are independent, so FanInSum may add their kernels). Branches
(FanOut, parallel) carry a tuple of states.

Images (N, C, H, W) carry the full spatial covariance: Sigma (N1, N2, H, W, H, W) over pairs of
positions (p of x, p' of x'), and each input's own q (N, H, W, H, W) over its pairs of positions,
whose diagonal is the per-position variance an activation needs (`var1`, `var2`). Vectors are
the case of no positions: Sigma (N1, N2), q (N,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Kernel:
    """sigma, theta: (N1, N2, *P, *P) float64; q1: (N1, *P, *P); q2: (N2, *P, *P); P the spatial
    shape (none for vectors)."""

    sigma: torch.Tensor
    theta: torch.Tensor
    q1: torch.Tensor
    q2: torch.Tensor
    gaussian: bool = False
    inputs: bool = False
    source: int = 0

    def replace(self, **changes: object) -> Kernel:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def spatial(self) -> tuple[int, ...]:
        """The spatial shape P: () for vectors, (H, W) for images."""
        return tuple(self.sigma.shape[2 : 2 + (self.sigma.dim() - 2) // 2])

    @property
    def var1(self) -> torch.Tensor:
        """(N1, *P): each input's variance at each position (the diagonal of q1)."""
        return diagonal(self.q1, len(self.spatial))

    @property
    def var2(self) -> torch.Tensor:
        return diagonal(self.q2, len(self.spatial))


def diagonal(q: torch.Tensor, d: int) -> torch.Tensor:
    """(N, *P, *P) -> (N, *P): the entries at p = p' (d spatial dims)."""
    if d == 0:
        return q
    n, P = q.shape[0], q.shape[1 : 1 + d]
    size = math.prod(P)
    return q.reshape(n, size, size).diagonal(0, 1, 2).reshape(n, *P)


def outer(a: torch.Tensor, b: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N1, *P), (N2, *P) -> views broadcasting against a (N1, N2, *P, *P) Gram."""
    return a.reshape(a.shape[0], 1, *a.shape[1:], *[1] * d), b.reshape(1, b.shape[0], *[1] * d, *b.shape[1:])


def self_outer(a: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, *P) -> views broadcasting against (N, *P, *P)."""
    return a.reshape(*a.shape, *[1] * d), a.reshape(a.shape[0], *[1] * d, *a.shape[1:])


State = Kernel | tuple["State", ...]


def input_kernel(X: torch.Tensor, X2: torch.Tensor | None = None) -> Kernel:
    """(N1, n0) vectors or (N1, C, H, W) images, and X2 likewise -> the inputs' kernel: Sigma =
    x.x' / n0 (images: over the channels at each pair of positions, / C), Theta = 0 (no
    parameters yet)."""
    symmetric, X2 = X2 is None, X if X2 is None else X2
    if X.dim() == 2:
        sigma = X @ X2.T / X.shape[1]
        own = [(Z * Z).sum(1) / Z.shape[1] for Z in (X, X2)]
    else:
        sigma = torch.einsum("nchw,mcij->nmhwij", X, X2) / X.shape[1]
        own = [torch.einsum("nchw,ncij->nhwij", Z, Z) / Z.shape[1] for Z in (X, X2)]
    if symmetric:  # q is the Gram's own diagonal, so that every layer sees correlation exactly 1 there
        own = [torch.diagonal(sigma, 0, 0, 1).movedim(-1, 0).clone()] * 2
    return Kernel(sigma, torch.zeros_like(sigma), own[0], own[1], gaussian=False, inputs=True)
