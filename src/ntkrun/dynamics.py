"""Least-squares dynamics in function space (docs/science.md §4) and kernel principal components.

With K = Theta(X, X) (N, N), k(x) = Theta(x, X) and the decay operator
D_t = exp(-t K / N) (gradient flow) or (I - eta K / N)^(t / eta) (GD with step eta),

    f_t(x)    = f_0(x) + A_t(x) (y - f_0(X)),        A_t(x) = k(x) K^-1 (I - D_t)
    mean_t(x) = A_t(x) y
    var_t(x)  = Sigma(x, x) - 2 A_t(x) Sigma(X, x) + A_t(x) Sigma(X, X) A_t(x)^T

All through one eigendecomposition K = V diag(lambda) V^T: A_t(x) = k(x) V diag(g_t(lambda)) V^T
with g_t(lambda) = (1 - d_t(lambda)) / lambda, never an explicit inverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ntkrun.errors import NumericalError


@dataclass(frozen=True)
class KernelEigen:
    """Eigendecomposition of a training Gram matrix K (N, N) = vectors diag(values) vectors^T."""

    values: torch.Tensor  # (N,) ascending, ridge included
    vectors: torch.Tensor  # (N, N) orthonormal columns
    ridge: float

    @property
    def n(self) -> int:
        return self.values.shape[0]

    @property
    def condition_number(self) -> float:
        """lambda_max / lambda_min (inf when K is singular to working precision)."""
        lo, hi = self.values[0].item(), self.values[-1].item()
        return hi / lo if lo > 0 else math.inf


def eigen(K: torch.Tensor, ridge: float = 0.0) -> KernelEigen:
    """(N, N) symmetric kernel -> KernelEigen of K + ridge I, in float64."""
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"kernel must be a non-empty square matrix, got shape {tuple(K.shape)}")
    if not torch.isfinite(K).all():
        raise NumericalError("kernel contains NaN or inf")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    K = K.to(torch.float64)
    K = (K + K.T) / 2 + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    values, vectors = torch.linalg.eigh(K)
    return KernelEigen(values, vectors, ridge)


def decay(eig: KernelEigen, t: float, lr: float | None = None) -> torch.Tensor:
    """(N,) eigenvalues d_t(lambda) of D_t: exp(-t lambda / N), or (1 - lr lambda / N)^(t / lr) for GD.

    With lr given, t must be a whole number of steps times lr. t = inf gives 0 (where lambda > 0).
    """
    lam = eig.values / eig.n
    if math.isinf(t):
        return torch.zeros_like(lam)
    if lr is None:
        return torch.exp(-t * lam)
    steps = round(t / lr)
    if not math.isclose(steps * lr, t, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"t = {t} is not a whole number of GD steps of lr = {lr}")
    return (1 - lr * lam) ** steps


def gain(eig: KernelEigen, t: float, lr: float | None = None) -> torch.Tensor:
    """(N,) g_t(lambda) = (1 - d_t(lambda)) / lambda, the spectrum of K^-1 (I - D_t).

    Finite t is well defined for any lambda (g -> t/N as lambda -> 0). t = inf needs K to be
    positive definite: raises NumericalError naming the condition number and the ridge remedy.
    """
    lam = eig.values
    if lr is not None and (lr * lam / eig.n).max() >= 2:
        raise NumericalError(
            f"GD with lr = {lr} diverges on this kernel: lr * lambda_max / N = "
            f"{(lr * lam.max() / eig.n).item():.3g} >= 2"
        )
    if math.isinf(t):
        floor = 1e3 * torch.finfo(lam.dtype).eps * lam.abs().max().item()
        if lam.min() <= floor:
            raise NumericalError(
                f"kernel matrix is singular (condition number {eig.condition_number:.3g}, e.g. duplicate "
                "training points): the t = inf limit is undefined; use a ridge or a finite t"
            )
        return 1 / lam
    tiny = lam.abs() < 1e-12 * lam.abs().max()
    safe = torch.where(tiny, 1.0, lam)
    if lr is None:
        g = -torch.expm1(-t * lam / eig.n) / safe  # accurate where t lambda / N is small
    else:
        g = (1 - decay(eig, t, lr)) / safe
    return torch.where(tiny, t / eig.n, g)


def predictor(eig: KernelEigen, k_test: torch.Tensor, t: float, lr: float | None = None) -> torch.Tensor:
    """A_t = k(x) K^-1 (I - D_t): k_test (M, N) -> (M, N)."""
    V = eig.vectors
    return ((k_test.to(torch.float64) @ V) * gain(eig, t, lr)) @ V.T


def gaussian_process(
    eig: KernelEigen,
    k_test: torch.Tensor,
    y: torch.Tensor,
    sigma_train: torch.Tensor,
    sigma_cross: torch.Tensor,
    sigma_test_diag: torch.Tensor,
    t: float,
    lr: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of f_t at M test points when f_0 ~ GP(0, Sigma).

    k_test (M, N) = Theta(x, X); y (N,); sigma_train (N, N) = Sigma(X, X);
    sigma_cross (M, N) = Sigma(x, X); sigma_test_diag (M,) = Sigma(x, x) -> ((M,), (M,)).
    """
    A = predictor(eig, k_test, t, lr)
    mean = A @ y.to(torch.float64)
    var = (
        sigma_test_diag.to(torch.float64)
        - 2 * (A * sigma_cross.to(torch.float64)).sum(1)
        + ((A @ sigma_train.to(torch.float64)) * A).sum(1)
    )
    return mean, var.clamp_min(0.0)


def linearized(
    eig: KernelEigen,
    k_test: torch.Tensor,
    y: torch.Tensor,
    f0_train: torch.Tensor,
    f0_test: torch.Tensor,
    t: float,
    lr: float | None = None,
) -> torch.Tensor:
    """f_t(x) = f_0(x) + A_t(x) (y - f_0(X)) for one given initial function: -> (M,)."""
    A = predictor(eig, k_test, t, lr)
    return f0_test.to(torch.float64) + A @ (y.to(torch.float64) - f0_train.to(torch.float64))


def percentiles(mean: torch.Tensor, var: torch.Tensor, ps: Sequence[float] = (10, 50, 90)) -> torch.Tensor:
    """Gaussian percentiles: mean (M,), var (M,) -> (len(ps), M), p in (0, 100)."""
    if any(not 0 < p < 100 for p in ps):
        raise ValueError(f"percentiles must lie strictly between 0 and 100, got {list(ps)}")
    z = torch.special.ndtri(torch.tensor([p / 100 for p in ps], dtype=torch.float64))
    return mean[None, :] + z[:, None] * var.sqrt()[None, :]


# --------------------------------------------------------------------------- kernel PCA


def _pin_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Scale columns to (1/N) sum f^2 = 1 and fix the sign so the largest-|.| entry is positive."""
    n = vectors.shape[0]
    f = vectors * math.sqrt(n) / vectors.norm(dim=0, keepdim=True)
    idx = f.abs().argmax(0)
    return f * torch.sign(f[idx, torch.arange(f.shape[1])])


def kernel_pca_dense(K: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of K/N by a dense symmetric solver: -> (lambda (k,), f (N, k) pin-normalized)."""
    n = K.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    values, vectors = torch.linalg.eigh((K.to(torch.float64) + K.to(torch.float64).T) / (2 * n))
    order = torch.argsort(values, descending=True)[:k]
    return values[order], _pin_normalize(vectors[:, order])


def kernel_pca_power(
    K: torch.Tensor, k: int = 3, *, tol: float = 1e-12, max_iter: int = 100_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Top-k eigenpairs of K/N by power iteration with deflation (as in the paper).

    -> (lambda (k,), f (N, k) pin-normalized, iterations used per eigenpair). Converged when the
    eigenvector moves less than `tol` in norm; raises NumericalError if max_iter is reached.
    """
    n = K.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    M = K.to(torch.float64) / n
    gen = torch.Generator().manual_seed(seed)
    values, vectors, iters = [], [], []
    for i in range(k):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(M.device)
        v /= v.norm()
        for step in range(1, max_iter + 1):
            w = M @ v
            for lam, u in zip(values, vectors, strict=True):
                w -= lam * (u @ v) * u
            w_norm = w.norm()
            w = w / w_norm
            w *= torch.sign(w @ v)
            moved = (w - v).norm().item()
            v = w
            if moved < tol:
                iters.append(step)
                break
        else:
            raise NumericalError(
                f"power iteration for eigenpair {i + 1} did not converge in {max_iter} steps"
            )
        values.append((v @ (M @ v)).item())
        vectors.append(v)
    return torch.tensor(values, dtype=torch.float64), _pin_normalize(torch.stack(vectors, 1)), iters
