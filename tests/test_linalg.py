"""In-place blocked Cholesky and kernel least squares (ntkrun.linalg), against torch's dense
Cholesky and numpy's dense solve as independent references. Small N with small blocks, so that
many blocks, several column tiles and a ragged last block are all exercised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntkrun.errors import NumericalError
from ntkrun.kernels import analytic_kernels
from ntkrun.linalg import cho_solve_inplace_, cholesky_inplace_, kernel_solve_, restore_lower_, solve_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def gram(n: int, rank: int, seed: int, shift: float = 1.0) -> torch.Tensor:
    """An exactly symmetric float64 (n, n) G G^T / rank + shift I (singular PSD for shift 0)."""
    G = torch.randn(n, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    K = G @ G.T / rank
    K = K.triu() + K.triu(1).T  # BLAS's G G^T need not be bit-symmetric
    K.diagonal().add_(shift)
    return K


def ntk(n: int, seed: int = 0, n0: int = 20) -> torch.Tensor:
    """Theta of a depth-3 ReLU network on n Gaussian points in n0 dimensions, float64 (n, n)."""
    X = torch.randn(n, n0, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _, theta = analytic_kernels(X, depth=3)
    return theta


def garbage_upper(K: torch.Tensor, seed: int) -> torch.Tensor:
    """K's lower triangle with random garbage (and a NaN) in the strict upper one."""
    noise = torch.randn(K.shape, dtype=K.dtype, generator=torch.Generator().manual_seed(seed)) * 1e3
    A = K.tril() + noise.triu(1)
    A[0, -1] = float("nan")
    return A


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factor_is_torch_cholesky_and_the_upper_triangle_is_never_touched(dtype):
    n, block = 700, 64  # 10 full blocks and a ragged 60, 2 tiles of 64 per block
    K = gram(n, 30, seed=1)
    reference = torch.linalg.cholesky(K).to(dtype)
    A = garbage_upper(K.to(dtype), seed=2)
    upper = A.triu(1).clone()
    calls: list[tuple[int, int]] = []
    assert cholesky_inplace_(A, block=block, progress=lambda d, t: calls.append((d, t)))
    # Both factorizations are backward stable and K has condition number 34, so the two factors
    # differ by rounding only, ~ eps cond (1e-14 in float64, 4e-6 in float32); seen: 1.3e-15 and
    # 1.7e-7. A wrong block, tile or ragged edge would be off by O(1).
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (A.tril() - reference).abs().max() <= tol * reference.abs().max()
    assert torch.equal(A.triu(1).view(-1).view(torch.int8), upper.view(-1).view(torch.int8))  # bitwise
    # one call per block's worth of work: the first blocks (most of the trailing update) call twice
    assert calls == [(k, 11) for k in range(1, 12)]
    early: list[tuple[int, int]] = []
    F = garbage_upper(K.to(dtype), seed=2)
    F[block + 1, block + 1] = -1.0  # the second diagonal block fails: the first block's calls only
    assert not cholesky_inplace_(F, block=block, progress=lambda d, t: early.append((d, t)))
    assert early == [(1, 11), (2, 11)]  # the first of 11 blocks does 24% of the work
    # the solve reads the lower triangle only, too: garbage and NaN above it change nothing
    B = torch.randn(n, 3, dtype=dtype, generator=torch.Generator().manual_seed(3))
    Z = cho_solve_inplace_(A, B.clone(), block=block)
    expected = torch.cholesky_solve(B.double(), reference.double())
    assert (Z.double() - expected).norm() <= (1e-11 if dtype == torch.float64 else 1e-4) * expected.norm()


def test_kernel_solve_is_numpy_solve_on_a_real_kernel():
    n, ridge = 600, 1e-3
    theta = ntk(n)
    Y = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = ridge * theta.diagonal().mean().item()
    expected = np.linalg.solve(theta.numpy() + r * np.eye(n), Y.numpy())
    Y_before = Y.clone()
    alpha, used, notes = kernel_solve_(theta.clone(), Y, ridge=ridge, block=64)
    assert used == pytest.approx(r, rel=1e-14) and notes == []
    assert torch.equal(Y, Y_before)
    assert np.linalg.norm(alpha.numpy() - expected) <= 1e-9 * np.linalg.norm(expected)
    lower_only, _, _ = kernel_solve_(theta.tril(), Y, ridge=ridge, block=64)  # the upper is never read
    assert torch.equal(lower_only, alpha)
    # an absolute ridge, a single target vector, a block larger than N
    one, used, _ = kernel_solve_(theta.clone(), Y[:, 0], ridge=r, relative=False, block=4096)
    assert one.shape == (n,) and used == r
    assert np.linalg.norm(one.numpy() - expected[:, 0]) <= 1e-9 * np.linalg.norm(expected[:, 0])


def test_a_singular_kernel_gets_a_raised_ridge_and_a_note():
    n = 300
    K = gram(n, 20, seed=5, shift=0.0)  # rank 20: no Cholesky at ridge 0
    Y = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert not cholesky_inplace_(K.clone(), block=64)
    alpha, used, notes = kernel_solve_(K.clone(), Y, ridge=0.0, block=64)
    assert used > 0 and notes
    assert notes[0].startswith("Cholesky failed at ridge 0 (relative 0); raised to ")
    assert notes[0].endswith("(relative 1e-10)")  # float64's first raise: 1e-10 of the mean diagonal
    assert f"{used:.3g}" in notes[-1]
    A = K + used * torch.eye(n, dtype=K.dtype)
    # a backward-stable solve of a matrix this ill-conditioned (~1e11): small normwise backward error
    backward_error = (A @ alpha - Y).norm() / (torch.linalg.matrix_norm(A, 2) * alpha.norm() + Y.norm())
    assert backward_error < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_restore_lower_undoes_a_failed_and_a_finished_factorization_exactly(dtype):
    n, block = 250, 64
    K = gram(n, 40, seed=7).to(dtype)
    K[-1, -1] = -5.0  # indefinite in the last (ragged) block only: fails after all else is written
    saved, diag = K.clone(), K.diagonal().clone()
    assert not cholesky_inplace_(K, block=block)
    assert not torch.equal(K, saved)  # the lower triangle was partly overwritten
    assert torch.equal(restore_lower_(K, diag, block=block), saved)
    K = gram(n, 40, seed=8).to(dtype)
    saved, diag = K.clone(), K.diagonal().clone()
    assert cholesky_inplace_(K, block=block)
    assert torch.equal(restore_lower_(K, diag, block=37), saved)  # any block size restores


def test_a_kernel_that_cannot_be_made_positive_definite_raises_naming_the_ridge():
    K = -torch.eye(130, dtype=torch.float64)
    with pytest.raises(NumericalError, match=r"ridge 0\.0001 \(relative 0\.0001\).*raise the ridge"):
        kernel_solve_(K, torch.ones(130, 1, dtype=torch.float64), max_tries=8, block=64)
    assert torch.equal(K, -torch.eye(130, dtype=torch.float64))  # restored after the last try
    with pytest.raises(NumericalError, match="ridge 0 "):
        kernel_solve_(-torch.eye(5), torch.ones(5), max_tries=1)


def test_bad_input():
    K, Y = torch.eye(4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="ridge must be >= 0, got -1"):
        kernel_solve_(K, Y, ridge=-1.0)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        kernel_solve_(torch.ones(3, 4, dtype=torch.float64), Y)
    with pytest.raises(ValueError, match=r"\(5, 2\).*\(4, 4\)"):
        kernel_solve_(K, torch.ones(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 or float64"):
        kernel_solve_(K.half(), Y)
    with pytest.raises(ValueError, match="block must be >= 1"):
        kernel_solve_(K, Y, block=0)
    with pytest.raises(ValueError, match="diag must have shape"):
        restore_lower_(K, torch.ones(3, dtype=torch.float64))


def test_float32_is_close_to_float64_when_well_conditioned_and_drifts_when_not():
    n = 500
    theta = ntk(n, seed=9, n0=2)  # points in the plane: condition number ~ 4e5 without a ridge
    Y = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def rel_diff(ridge: float) -> float:
        a64, _, _ = kernel_solve_(theta.clone(), Y, ridge=ridge, block=64)
        a32, _, _ = kernel_solve_(theta.float(), Y, ridge=ridge, block=64)
        return ((a32.double() - a64).norm() / a64.norm()).item()

    well, ill = rel_diff(1e-1), rel_diff(0.0)  # measured: 1.4e-5 and 2.7e-4
    assert well < 1e-4
    assert ill > 10 * well


def test_solve_bytes_grows_with_n_m_not_n_squared():
    assert solve_bytes(60000, 10, 4) < 2**30  # vs 14.4 GB for K itself
    assert solve_bytes(60000, 10, 8) > solve_bytes(60000, 10, 4)
    assert solve_bytes(60000, 100, 4) - solve_bytes(60000, 10, 4) == 90 * (60000 * 5 + 2048 * 4)
