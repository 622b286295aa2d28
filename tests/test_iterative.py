"""Preconditioned conjugate gradients (ntkrun.iterative) against dense solves and eigendecompositions."""

from __future__ import annotations

import re

import pytest
import torch

from ntkrun.errors import NumericalError
from ntkrun.iterative import UpperStrips, cg_solve, kernel_matmul, nystrom, precondition
from ntkrun.kernels import analytic_kernels


def gram(n: int = 300, d: int = 20, seed: int = 0) -> torch.Tensor:
    """An MLP NTK Gram (depth 4 ReLU) on n Gaussian points: PSD, condition number ~1e3-1e4."""
    X = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return analytic_kernels(X, depth=4)[1]


def targets(n: int, m: int = 3) -> torch.Tensor:
    return torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def residual(K: torch.Tensor, Y: torch.Tensor, alpha: torch.Tensor, ridge: float) -> float:
    """Independently of the solver: max over columns of ||Y - (K + r I) alpha|| / ||Y||, in float64."""
    A = K.double() + ridge * torch.eye(K.shape[0], dtype=torch.float64)
    return float(((Y - A @ alpha).norm(dim=0) / Y.norm(dim=0)).max())


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_cg_reaches_its_tolerance_and_the_dense_solution(ridge):
    """Every column's residual is at most tol; the error in alpha is then at most cond(A) x tol
    (||e|| / ||alpha|| <= cond ||r|| / ||Y||), checked against torch.linalg.solve."""
    K, Y = gram(), targets(300)
    r = ridge * K.diagonal().mean().item()
    found = cg_solve(K, Y, ridge=r, rank=40, tol=1e-9, max_iter=2000)
    assert residual(K, Y, found.alpha, r) <= 1e-9
    assert found.residual == pytest.approx(residual(K, Y, found.alpha, r), rel=1e-6)
    A = K + r * torch.eye(300, dtype=torch.float64)
    exact = torch.linalg.solve(A, Y)
    cond = float(torch.linalg.cond(A))
    assert float((found.alpha - exact).norm() / exact.norm()) <= cond * 1e-9 * 3  # x3: one bound per column


def test_a_float32_gram_is_multiplied_in_float64():
    """K stored in float32: its products accumulate in float64, so the residual against the stored
    K reaches a tolerance far below float32's precision (a float32 GEMM stalls near 1e-6 and above)."""
    K, Y = gram().float(), targets(300)
    found = cg_solve(K, Y, rank=40, tol=1e-10, max_iter=3000)
    assert residual(K, Y, found.alpha, 0.0) <= 1e-10
    P = targets(300, 5)
    # float64 dot products of 300 terms, each side within gamma_300 |K| |P| of the exact value
    # (Higham's bound, gamma_n ~ n eps64 = 3e-14 relative): a float32 accumulation misses it by 10^6
    bound = 2 * 300 * torch.finfo(torch.float64).eps * (K.double().abs() @ P.abs())
    for shape in ((7, 300), (7, 64), (128, 128)):  # tiles that do not divide N, rows and columns
        found = kernel_matmul(K, P, 0.5, torch.empty(shape, dtype=torch.float64))
        assert ((found - (K.double() @ P + 0.5 * P)).abs() <= bound + 1e-15).all()
    with pytest.raises(ValueError, match="at most as many rows as columns"):
        kernel_matmul(K, P, 0.5, torch.empty(64, 7, dtype=torch.float64))


def test_nystrom_at_full_rank_is_the_kernel_and_below_it_never_exceeds_it():
    """At rank N the approximation is K itself; at rank l its eigenvalues lie below K's (a Nystrom
    approximation is dominated by K: K - U diag(lam) U^T is PSD), up to the stabilizing shift."""
    K = gram(120)
    full = nystrom(K, 120)
    approx = full.U @ torch.diag(full.lam) @ full.U.T
    assert float((approx - K).norm() / K.norm()) < 1e-9
    low = nystrom(K, 20, seed=3)
    eig = torch.linalg.eigvalsh(K).flip(0)
    assert (low.lam <= eig[:20] + 1e-9 * eig[0]).all()
    gap = torch.linalg.eigvalsh(K - low.U @ torch.diag(low.lam) @ low.U.T)
    assert gap.min() >= -1e-9 * eig[0]
    assert torch.allclose(low.U.T @ low.U, torch.eye(20, dtype=torch.float64), atol=1e-10)


def test_the_preconditioner_flattens_the_top_of_the_spectrum():
    """P^-1 (K + r I) has its top l eigenvalues mapped near lam_l + r: its condition number is far
    below K + r I's, and CG needs far fewer iterations for it than with a rank-1 preconditioner."""
    K, r = gram(), 1e-4
    pre = nystrom(K, 60)
    A = K + r * torch.eye(300, dtype=torch.float64)
    PA = precondition(pre, r, A)
    ev = torch.linalg.eigvals(PA).real
    assert float(ev.max() / ev.min()) < float(torch.linalg.cond(A)) / 20
    Y = targets(300)
    few = cg_solve(K, Y, ridge=r, rank=60, tol=1e-8, max_iter=3000).iterations
    many = cg_solve(K, Y, ridge=r, rank=1, tol=1e-8, max_iter=3000).iterations
    assert few < 0.7 * many, (few, many)  # 29 against 51 here


def test_a_solve_that_does_not_converge_says_so_with_the_remedy():
    K, Y = gram(), targets(300)
    with pytest.raises(NumericalError, match=r"did not converge: relative residual .* after 2 iterations"):
        cg_solve(K, Y, rank=2, tol=1e-12, max_iter=2)
    remedy = "raise kernels.precond_rank, kernels.max_iter or kernels.ridge, or use kernels.solver: cholesky"
    with pytest.raises(NumericalError, match=re.escape(remedy)):
        cg_solve(K, Y, rank=2, tol=1e-12, max_iter=2)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="tol must be in"):
            cg_solve(K, Y, tol=bad)
    with pytest.raises(ValueError, match=re.escape("rank must be in 1 .. 300")):
        nystrom(K, 301)


def test_out_of_core_strips_multiply_and_solve_as_the_whole_gram():
    """The Gram as the upper-triangle row strips block units save (their diagonal squares' lower
    part garbage): products equal the whole Gram's (float64, to rounding), and CG on the strips
    reaches its tolerance with alpha the in-memory CG's to within cond x tol."""
    K, Y = gram(), targets(300)
    strips = []
    for r0 in range(0, 300, 70):  # 70-row strips, the last one 20 rows
        block = K[r0 : r0 + 70, r0:].clone()
        block[:, : block.shape[0]] += torch.tril(torch.full((block.shape[0],) * 2, float("nan")), -1)
        strips.append((r0, block))
    upper = UpperStrips(tuple(strips), 300)
    P = targets(300, 4)
    for rows in (1, 13, 300):  # workspaces that cut the strips into chunks of various heights
        work = torch.empty(rows, 300, dtype=torch.float64)
        found = kernel_matmul(upper, P, 0.1, work)  # the NaNs below the diagonal are never read
        torch.testing.assert_close(
            found, K @ P + 0.1 * P, rtol=1e-12, atol=1e-12 * float((K @ P).abs().max())
        )
    assert torch.equal(upper.diagonal(), K.diagonal())
    whole = cg_solve(K, Y, rank=40, tol=1e-9, max_iter=2000)
    out_of_core = cg_solve(upper, Y, rank=40, tol=1e-9, max_iter=2000)
    assert residual(K, Y, out_of_core.alpha, 0.0) <= 1e-9
    cond = float(torch.linalg.cond(K))
    assert float((out_of_core.alpha - whole.alpha).norm() / whole.alpha.norm()) <= 2 * cond * 1e-9 * 3


def test_a_column_solved_exactly_stays_put_and_the_rest_converge():
    """A zero target column (a class absent from a small training set, with target_off 0) has a zero
    residual from the start: its step is 0, not 0 / 0 = NaN that would spoil every column."""
    K, Y = gram(), targets(300)
    Y[:, 1] = 0.0
    found = cg_solve(K, Y, rank=40, tol=1e-9, max_iter=2000)
    assert torch.equal(found.alpha[:, 1], torch.zeros(300, dtype=torch.float64))
    assert residual(K, Y[:, [0, 2]], found.alpha[:, [0, 2]], 0.0) <= 1e-9


def test_a_whole_gram_is_read_above_its_diagonal_only():
    """The fit hands CG its Gram unmirrored (rows computed above the diagonal only): NaN below the
    diagonal changes nothing, to the last bit, and the solve still reaches its tolerance on K."""
    K, Y = gram(), targets(300)
    upper = K.clone()
    upper[torch.ones(300, 300, dtype=torch.bool).tril(-1)] = float("nan")
    whole, half = cg_solve(K, Y, rank=40, tol=1e-9), cg_solve(upper, Y, rank=40, tol=1e-9)
    assert torch.equal(whole.alpha, half.alpha) and whole.iterations == half.iterations
    assert residual(K, Y, half.alpha, 0.0) <= 1e-9
