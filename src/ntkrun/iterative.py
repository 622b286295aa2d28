"""Kernel least squares by preconditioned conjugate gradients: (K + r I) alpha = Y without
factoring K (docs/science.md §5.7).

The Cholesky factorization costs N^3 / 3 flops whatever the data; conjugate gradients cost one
product of K with the (N, m) iterate per iteration, 2 N^2 m flops, and converge in a number of
iterations set by the condition number of the preconditioned system. The preconditioner is the
randomized Nystrom approximation of rank l (Frangella, Tropp & Udell 2023): K ~ U diag(lam) U^T
from one product K Omega with l random directions, and

    P^-1 = U diag((lam_l + r) / (lam + r)) U^T + (I - U U^T),

which maps the top l eigenvalues of K + r I onto lam_l + r: the iterations then depend on
(lam_l + r) / (lam_min + r), not on lam_max / lam_min. The Nystrom product K Omega runs in K's
dtype (float32 at large N, the GEMM rate); CG's products of K accumulate in float64, and the
preconditioner, the iterates, inner products and recurrences are float64. The relative residual
reported is recomputed from K at the end, not the recurrence's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ntkrun.errors import NumericalError

Progress = Callable[[int, int], None]
# K's rows x columns per float64 copy in a product (8 MB): the fastest tile measured at N = 20000 and
# 40000 (2-core AMD EPYC, MKL: 41 GFLOP/s, against 29 for whole rows of 2^22 numbers)
TILE = (128, 8192)


def nystrom_bytes(n: int, m: int = 10) -> int:
    """CG's memory besides K and the Nystrom factors (4 N l float64): its workspace and seven
    (N, m) float64 iterates."""
    return TILE[0] * TILE[1] * 8 + 7 * n * m * 8


@dataclass(frozen=True)
class UpperStrips:
    """A symmetric Gram (N, N) held as the upper-triangle row strips a Gram-block unit saves:
    (r0, block (r1 - r0, N - r0)), rows r0 .. r1 from column r0 on, the diagonal square's lower
    part not meaningful; e.g. memory-mapped from their files, so the Gram is never assembled (CG
    out of core: each product reads every strip once)."""

    strips: tuple[tuple[int, torch.Tensor], ...]
    n: int

    @property
    def dtype(self) -> torch.dtype:
        return self.strips[0][1].dtype

    def chunks(self, step: int) -> list[tuple[int, int, torch.Tensor]]:
        """(i0, i1, rows i0 .. i1 of the Gram from column i0 on), at most `step` rows each."""
        out = []
        for r0, block in self.strips:
            for a in range(0, block.shape[0], step):
                b = min(a + step, block.shape[0])
                out.append((r0 + a, r0 + b, block[a:b, a:]))
        return out

    def diagonal(self) -> torch.Tensor:
        """(N,) float64."""
        return torch.cat([c[:, : i1 - i0].diagonal().double() for i0, i1, c in self.chunks(TILE[0])])

    def matmul_t_(self, outT: torch.Tensor, PT: torch.Tensor, work: torch.Tensor) -> None:
        """outT += (K P)^T: PT = P^T (m, N) float64, each (rows, columns) tile of the upper triangle
        copied into the float64 `work` (R, C), R <= C, and used twice (for K and for K^T)."""
        rows, cols = work.shape
        for i0, i1, chunk in self.chunks(rows):
            h = i1 - i0
            square = work[:h, :h]
            square.copy_(chunk[:, :h]).triu_()
            outT[:, i0:i1].addmm_(PT[:, i0:i1], square.T)  # the diagonal square's upper triangle ...
            square.diagonal().zero_()
            outT[:, i0:i1].addmm_(PT[:, i0:i1], square)  # ... and its strict part's transpose
            for c0 in range(h, chunk.shape[1], cols):
                c1 = min(c0 + cols, chunk.shape[1])
                tile = work[:h, : c1 - c0]
                tile.copy_(chunk[:, c0:c1])
                j0, j1 = i0 + c0, i0 + c1
                outT[:, i0:i1].addmm_(PT[:, j0:j1], tile.T)
                outT[:, j0:j1].addmm_(PT[:, i0:i1], tile)


Gram = torch.Tensor | UpperStrips


@dataclass(frozen=True)
class Nystrom:
    """K ~ U diag(lam) U^T: U (N, l) orthonormal columns, lam (l,) descending, >= 0; float64."""

    U: torch.Tensor
    lam: torch.Tensor


@dataclass(frozen=True)
class CGSolution:
    """alpha (N, m) float64; iterations run; residual: max over columns of ||Y - (K + r I) alpha||
    / ||Y||, recomputed from K."""

    alpha: torch.Tensor
    iterations: int
    residual: float


def kernel_matmul(
    K: Gram, P: torch.Tensor, ridge: float = 0.0, work: torch.Tensor | None = None
) -> torch.Tensor:
    """(K + ridge I) P: K (N, N) float32/float64 (both triangles) or an UpperStrips (its upper
    triangle: out of core, or a whole K read only above its diagonal), P (N, m) -> (N, m) in P's
    dtype, K's entries (as stored) times P accumulated in P's dtype (float64 for CG): (R, C) tiles
    of K copied into the workspace `work` (R <= C, P's dtype; TILE when not given; reuse one across
    calls: a fresh one costs its page faults every time). Computed as (K P)^T = P^T K^T, the layout
    in which MKL runs these skinny float64 products fastest."""
    if work is None:
        work = workspace(K, P.dtype)
    if work.shape[0] > work.shape[1]:
        raise ValueError(f"the workspace needs at most as many rows as columns, got {tuple(work.shape)}")
    PT = P.T.contiguous()
    outT = torch.zeros_like(PT)
    if isinstance(K, UpperStrips):
        K.matmul_t_(outT, PT, work)
    else:
        rows, cols = work.shape
        for r0 in range(0, K.shape[0], rows):
            r1 = min(r0 + rows, K.shape[0])
            for c0 in range(0, K.shape[1], cols):
                c1 = min(c0 + cols, K.shape[1])
                tile = work[: r1 - r0, : c1 - c0]
                tile.copy_(K[r0:r1, c0:c1])
                outT[:, r0:r1].addmm_(PT[:, c0:c1], tile.T)
    out = outT.T.contiguous()
    return out.add_(P, alpha=ridge) if ridge else out


def workspace(K: Gram, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The tile `kernel_matmul` copies K's entries into: TILE, or less for a small K."""
    n = K.n if isinstance(K, UpperStrips) else K.shape[1]
    return torch.empty(min(TILE[0], n), min(TILE[1], n), dtype=dtype)


def nystrom(K: Gram, rank: int, seed: int = 0) -> Nystrom:
    """The randomized Nystrom approximation of the PSD K (N, N) of rank l = rank <= N: Omega (N, l)
    orthonormalized Gaussian, Y = K Omega, shifted by nu = sqrt(N) eps ||Y||_2 for stability (eps
    of K's dtype; Frangella, Tropp & Udell's Algorithm 2.1), B = Y C^-T with C C^T = Omega^T Y,
    then U S V^T = B and lam = max(S^2 - nu, 0).
    Cost: 2 N^2 l flops for Y (a GEMM), O(N l^2) for the rest."""
    n = K.n if isinstance(K, UpperStrips) else K.shape[0]
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in 1 .. {n}, got {rank}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    Y = kernel_matmul(K, omega.to(K.dtype)).double()  # in K's dtype: its rounding does not matter here
    nu = math.sqrt(n) * torch.finfo(K.dtype).eps * float(torch.linalg.matrix_norm(Y, ord=2))
    Y.add_(omega, alpha=nu)
    small = omega.T @ Y
    small = (small + small.T) / 2
    C, info = torch.linalg.cholesky_ex(small)
    if int(info) != 0:  # rounding made Omega^T Y indefinite: a larger shift, once
        shift = 1e-8 * float(small.diagonal().abs().max())
        C, info = torch.linalg.cholesky_ex(small + shift * torch.eye(rank, dtype=torch.float64))
    if int(info) != 0:
        raise NumericalError(
            "the Nystrom preconditioner's core matrix is not positive definite (a kernel with NaN, or "
            "far from positive semi-definite); raise kernels.ridge or use kernels.solver: cholesky"
        )
    B = torch.linalg.solve_triangular(C, Y.T, upper=False).T  # Y C^-T
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return Nystrom(U, (S**2 - nu).clamp_(min=0.0))


def precondition(pre: Nystrom, ridge: float, R: torch.Tensor) -> torch.Tensor:
    """P^-1 R for the Nystrom preconditioner of K + ridge I: R (N, m) float64 -> (N, m)."""
    floor = max(float(pre.lam[-1]) + ridge, torch.finfo(torch.float64).tiny)
    scale = floor / (pre.lam + ridge).clamp(min=floor)
    coef = pre.U.T @ R
    return R + pre.U @ (coef * (scale[:, None] - 1.0))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per column, 0 where den is 0 (a column whose residual is exactly 0)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def cg_solve(
    K: Gram,
    Y: torch.Tensor,
    *,
    ridge: float = 0.0,
    rank: int = 1000,
    tol: float = 1e-5,
    max_iter: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> CGSolution:
    """Solve (K + ridge I) alpha = Y, K (N, N) float32/float64 (not modified; only its upper
    triangle, diagonal included, is read) or an UpperStrips (out of core), Y (N, m) or (N,), by
    conjugate gradients on each column at once, Nystrom-preconditioned at rank min(rank, N), until
    every column's relative residual is at most tol. Raises NumericalError naming the residual
    reached when max_iter iterations do not get there. progress(iteration, max_iter) after each
    iteration."""
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if not isinstance(K, UpperStrips):  # each product reads the upper triangle's tiles, used twice
        K = UpperStrips(((0, K),), K.shape[0])
    n = K.n
    B = (Y.unsqueeze(1) if Y.dim() == 1 else Y).double()
    pre, work = nystrom(K, min(rank, n), seed), workspace(K)
    norms = B.norm(dim=0).clamp(min=torch.finfo(torch.float64).tiny)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = precondition(pre, ridge, R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    iterations, converged = 0, False
    for iterations in range(1, max_iter + 1):
        AP = kernel_matmul(K, P, ridge, work)
        a = _ratio(rz, (P * AP).sum(0))  # a column already solved (R = 0, e.g. Y's) stays put
        X.addcmul_(P, a)
        R.addcmul_(AP, a, value=-1.0)
        if progress is not None:
            progress(iterations, max_iter)
        relative = float((R.norm(dim=0) / norms).max())
        if relative <= tol:
            converged = True
            break
        if not math.isfinite(relative):  # (no use iterating on)
            break
        Z = precondition(pre, ridge, R)
        rz_next = (R * Z).sum(0)
        P = Z.add_(P * _ratio(rz_next, rz))
        rz = rz_next
    residual = float(((B - kernel_matmul(K, X, ridge, work)).norm(dim=0) / norms).max())
    if not converged or not math.isfinite(residual):
        raise NumericalError(
            f"conjugate gradients did not converge: relative residual {residual:.3g} after {iterations} "
            f"iterations (kernels.tol {tol:g}, kernels.max_iter {max_iter}); raise kernels.precond_rank, "
            "kernels.max_iter or kernels.ridge, or use kernels.solver: cholesky"
        )
    return CGSolution(X if Y.dim() == 2 else X[:, 0], iterations, residual)
