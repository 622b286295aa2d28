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
the case of no positions: Sigma (N1, N2), q (N,). Where no layer of the composition mixes
positions (no pooling: stax's economy), images carry only the pairs at the same position,
`diagonal_spatial`: Sigma (N1, N2, H, W), q (N, H, W); a convolution maps that diagonal to itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
    diagonal_spatial: bool = False

    def replace(self, **changes: object) -> Kernel:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def spatial(self) -> tuple[int, ...]:
        """The spatial shape P: () for vectors, (H, W) for images."""
        if self.diagonal_spatial:
            return tuple(self.sigma.shape[2:])
        return tuple(self.sigma.shape[2 : 2 + (self.sigma.dim() - 2) // 2])

    @property
    def d(self) -> int:
        """The spatial axes Sigma pairs (x's against x''s): len(P), or 0 on the diagonal."""
        return 0 if self.diagonal_spatial else len(self.spatial)

    @property
    def var1(self) -> torch.Tensor:
        """(N1, *P): each input's variance at each position (the diagonal of q1)."""
        return diagonal(self.q1, self.d)

    @property
    def var2(self) -> torch.Tensor:
        return diagonal(self.q2, self.d)


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

_MEMO: ContextVar[dict[tuple[int, ...], tuple[torch.Tensor, tuple[torch.Tensor, ...]]] | None] = ContextVar(
    "q2 memo", default=None
)


@contextmanager
def second_inputs_once() -> Iterator[None]:
    """Within it, `second` maps the second inputs' own covariances once per layer: every row block
    of a Gram passes the same q2 through the same layers."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def second(layer: object, fn: Callable[..., torch.Tensor], *qs: torch.Tensor) -> torch.Tensor:
    """fn(*qs): the second inputs' own covariances after `layer` (qs: those of its input states),
    remembered inside second_inputs_once by `layer` and the identity of qs (kept alive with the
    result, so that an identity is never reused)."""
    memo = _MEMO.get()
    if memo is None:
        return fn(*qs)
    key = (id(layer), *map(id, qs))
    if key not in memo:
        memo[key] = (fn(*qs), qs)
    return memo[key][0]


def own_covariance(X: torch.Tensor, diagonal_spatial: bool = False) -> torch.Tensor:
    """(N, n0) -> (N,) |x|^2 / n0; images (N, C, H, W) -> (N, H, W, H, W) over the channels, / C;
    sequences (N, T, d) -> (N, T, T) over the features, / d (diagonal_spatial: (N, H, W) or
    (N, T), each position with itself)."""
    if X.dim() == 2:
        return (X * X).sum(1) / X.shape[1]
    if X.dim() == 3:
        return (X * X).sum(2) / X.shape[2] if diagonal_spatial else X @ X.transpose(1, 2) / X.shape[2]
    if diagonal_spatial:
        return (X * X).sum(1) / X.shape[1]
    return torch.einsum("nchw,ncij->nhwij", X, X) / X.shape[1]


def input_kernel(
    X: torch.Tensor,
    X2: torch.Tensor,
    q1: torch.Tensor,
    q2: torch.Tensor,
    diagonal_at: int | None = None,
    diagonal_spatial: bool = False,
) -> Kernel:
    """Rows X (N1, n0) (images (N1, C, H, W), sequences (N1, T, d)) against X2 -> the inputs' kernel:
    Sigma = x.x' / n0 (images, sequences: over the features at each pair of positions, / C or d),
    Theta = 0 (no parameters yet);
    q1, q2 their own_covariance. diagonal_at: X and X2 are rows r0.. and c0.. of one set (a block
    of a Gram), diagonal_at = r0 - c0, and the pairs of an input with itself, (i, i + r0 - c0), are
    set to its q, so that every layer sees correlation exactly 1 there."""
    if X.dim() == 2:
        sigma = X @ X2.T / X.shape[1]
    elif X.dim() == 3:
        equation = "ntc,mtc->nmt" if diagonal_spatial else "ntc,msc->nmts"
        sigma = torch.einsum(equation, X, X2) / X.shape[2]
    elif diagonal_spatial:
        sigma = torch.einsum("nchw,mchw->nmhw", X, X2) / X.shape[1]
    else:
        sigma = torch.einsum("nchw,mcij->nmhwij", X, X2) / X.shape[1]
    if diagonal_at is not None:
        rows = torch.arange(X.shape[0])
        rows = rows[(rows + diagonal_at >= 0) & (rows + diagonal_at < X2.shape[0])]
        sigma[rows, rows + diagonal_at] = q1[rows]
    return Kernel(
        sigma, torch.zeros_like(sigma), q1, q2, gaussian=False, inputs=True, diagonal_spatial=diagonal_spatial
    )
