"""The kernel state a composition maps layer by layer (docs/science.md §12).

For inputs x (N1 of them) and x' (N2): Sigma (N1, N2), the covariance of the layer's outputs
(one feature, at infinite width), Theta (N1, N2), their neural tangent kernel, and each input's own
variance q = Sigma(x, x), kept separately so that an activation or a normalization sees the
diagonal of both sides. `gaussian`: the features are a Gaussian process (what an activation and
LayerNorm need: the output of a weight layer, or a sum of such); `inputs`: they are still the
raw inputs (no weight layer yet); `source`: a token of the weight layer they last came out of
(branches from distinct ones are independent, so FanInSum may add their kernels). Branches
(FanOut, parallel) carry a tuple of states.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Kernel:
    """sigma, theta: (N1, N2) float64; q1: (N1,); q2: (N2,)."""

    sigma: torch.Tensor
    theta: torch.Tensor
    q1: torch.Tensor
    q2: torch.Tensor
    gaussian: bool = False
    inputs: bool = False
    source: int = 0

    def replace(self, **changes: object) -> Kernel:
        return replace(self, **changes)  # type: ignore[arg-type]


State = Kernel | tuple["State", ...]


def input_kernel(X: torch.Tensor, X2: torch.Tensor | None = None) -> Kernel:
    """(N1, n0), (N2, n0) -> the inputs' kernel: Sigma = x.x' / n0, Theta = 0 (no parameters yet)."""
    n0 = X.shape[1]
    X2 = X if X2 is None else X2
    sigma = X @ X2.T / n0
    if X2 is X:  # q is the diagonal itself, so that every layer sees correlation exactly 1 there
        q1 = q2 = sigma.diagonal().clone()
    else:
        q1, q2 = (X * X).sum(1) / n0, (X2 * X2).sum(1) / n0
    return Kernel(sigma, torch.zeros_like(sigma), q1, q2, gaussian=False, inputs=True)
