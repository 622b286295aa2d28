"""Infinite-width kernels Sigma(L) and Theta(L) (docs/science.md §3).

    Sigma(1) = x.x'/n0 + beta^2,   Sigma(l+1) = E[sigma(u) sigma(v)] + beta^2,
    Sdot(l+1) = E[sigma_dot(u) sigma_dot(v)],   Theta(1) = Sigma(1),
    Theta(l+1) = Theta(l) * Sdot(l+1) + Sigma(l+1),
    (u, v) ~ N(0, [[Sigma(l)(x,x), Sigma(l)(x,x')], [Sigma(l)(x,x'), Sigma(l)(x',x')]]).

ReLU and erf use closed forms; every other nonlinearity uses 2-D Gauss-Hermite quadrature.
Computed in float64, in row blocks: each entry's recursion needs only its own covariance and
the two diagonals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ntkrun.nonlinearities import NONLINEARITIES, Nonlinearity, get_nonlinearity

Progress = Callable[[int, int], None]
Expectations = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def relu_expectations(
    sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[relu(u) relu(v)], E[relu'(u) relu'(v)]) for (u, v) ~ N(0, [[sxx, sxy], [sxy, syy]]).

    Arguments broadcast against each other. Where a variance is 0, u = 0 a.s. and relu'(0) = 0.
    """
    s = torch.sqrt(sxx * syy)
    positive = s > 0
    rho = torch.where(positive, sxy / torch.where(positive, s, 1.0), 1.0).clamp_(-1.0, 1.0)
    pi_minus_th = math.pi - torch.arccos(rho)
    # sin th = sqrt(1 - rho^2), cos th = rho
    e_ss = s * (torch.sqrt(1 - rho * rho) + pi_minus_th * rho) / (2 * math.pi)
    e_dd = torch.where(positive, pi_minus_th / (2 * math.pi), 0.0)
    return e_ss, e_dd


def erf_expectations(
    sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[erf(u) erf(v)], E[erf'(u) erf'(v)]) for (u, v) ~ N(0, [[sxx, sxy], [sxy, syy]])."""
    q = (1 + 2 * sxx) * (1 + 2 * syy)
    e_ss = (2 / math.pi) * torch.arcsin((2 * sxy / torch.sqrt(q)).clamp(-1.0, 1.0))
    e_dd = (4 / math.pi) / torch.sqrt(q - 4 * sxy**2)
    return e_ss, e_dd


CLOSED_FORMS: dict[str, Expectations] = {"relu": relu_expectations, "erf": erf_expectations}


def quadrature_expectations(nl: Nonlinearity, order: int = 64, chunk_elems: int = 2**24) -> Expectations:
    """E[sigma(u) sigma(v)] and E[sigma_dot(u) sigma_dot(v)] by order x order Gauss-Hermite.

    With z1, z2 iid N(0, 1): u = sqrt(sxx) z1, v = sqrt(syy) (rho z1 + sqrt(1 - rho^2) z2).
    """
    nodes, weights = np.polynomial.hermite.hermgauss(order)

    def expectations(
        sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sxx, sxy, syy = torch.broadcast_tensors(sxx, sxy, syy)
        z = torch.as_tensor(nodes * math.sqrt(2.0), dtype=sxy.dtype, device=sxy.device)
        w = torch.as_tensor(weights / math.sqrt(math.pi), dtype=sxy.dtype, device=sxy.device)
        shape = sxy.shape
        sxx, sxy, syy = sxx.reshape(-1), sxy.reshape(-1), syy.reshape(-1)
        e_ss, e_dd = torch.empty_like(sxy), torch.empty_like(sxy)
        step = max(1, chunk_elems // order)
        for c in range(0, sxy.numel(), step):
            a, cxy, b = sxx[c : c + step], sxy[c : c + step], syy[c : c + step]
            s = torch.sqrt(a * b)
            rho = torch.where(s > 0, cxy / torch.where(s > 0, s, 1.0), 1.0).clamp(-1.0, 1.0)
            ra, rb = torch.sqrt(a)[:, None], torch.sqrt(b)[:, None]
            u = ra * z  # (chunk, order): u at node i
            tot_ss = torch.zeros_like(a)
            tot_dd = torch.zeros_like(a)
            perp = torch.sqrt(1 - rho**2)[:, None]
            for i in range(order):
                v = rb * (rho[:, None] * z[i] + perp * z)  # (chunk, order): v at nodes (i, j)
                tot_ss += w[i] * nl.sigma(u[:, i]) * (nl.sigma(v) @ w)
                tot_dd += w[i] * nl.sigma_dot(u[:, i]) * (nl.sigma_dot(v) @ w)
            e_ss[c : c + step], e_dd[c : c + step] = tot_ss, tot_dd
        return e_ss.reshape(shape), e_dd.reshape(shape)

    return expectations


def _as_float64(X: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    X = torch.as_tensor(X).to(torch.float64)
    if X.dim() != 2:
        raise ValueError(f"{name} must have shape (N, n0), got {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one point (N = 0)")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


MIRROR_BLOCK = 1024  # block edge of the copy of a symmetric Gram's upper triangle onto the lower


def block_rows_for(n2: int, depth: int, all_layers: bool = False, memory_budget: int = 2**30) -> int:
    """Rows per block: as many as keep each (rows, N2) float64 intermediate near the cache (2 MB;
    64 rows at N2 = 4096, measured 0.67 s there against 0.91-3.3 s for blocks of 16 rows or of
    1 GiB), and never more than `memory_budget` for the ~16 of them (more with all_layers)."""
    per_row = 8 * n2 * (16 + (2 * depth if all_layers else 0))
    return max(1, min(memory_budget // per_row, max(8, 2**18 // n2)))


def analytic_kernels(
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    depth: int = 4,
    nonlinearity: str | Nonlinearity = "relu",
    beta: float = 0.1,
    *,
    quadrature_order: int = 64,
    closed_form: bool = True,
    all_layers: bool = False,
    block_rows: int | None = None,
    memory_budget: int = 2**30,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Limiting kernels: X (N1, n0), X2 (N2, n0) or None (= X) -> (Sigma(L), Theta(L)), (N1, N2).

    With all_layers=True returns (L, N1, N2) stacks of Sigma(1..L) and Theta(1..L). float64.
    `closed_form=False` forces quadrature (used to check the closed forms). Rows are processed
    in blocks of `block_rows` (default: `block_rows_for`, cache-sized and within `memory_budget`
    bytes besides the output); `progress(done, total)` is called per block. With X2 = None only
    the upper triangle is computed (the result is exactly symmetric) and the diagonal is exact.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    nl = get_nonlinearity(nonlinearity)
    X = _as_float64(X, "X")
    X2 = X if X2 is None else _as_float64(X2, "X2")
    if X2.shape[1] != X.shape[1]:
        raise ValueError(f"X has {X.shape[1]} input dimensions but X2 has {X2.shape[1]}")
    registered = NONLINEARITIES.get(nl.name) is nl  # a user's own Nonlinearity gets quadrature
    expect = CLOSED_FORMS.get(nl.name) if closed_form and registered else None
    expect = expect or quadrature_expectations(nl, quadrature_order)
    n0, beta2 = X.shape[1], beta**2

    # Sigma(l)(x, x) and Theta(l)(x, x) for every layer, for both input sets, with the correlation
    # exactly 1 (passing sxy = sqrt(sxx * syy), the very value the expectations divide by).
    def diagonals(Z: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        d = [(Z * Z).sum(1) / n0 + beta2]
        t = [d[0]]
        for _ in range(depth - 1):
            e_ss, e_dd = expect(d[-1], torch.sqrt(d[-1] * d[-1]), d[-1])
            d.append(e_ss + beta2)
            t.append(t[-1] * e_dd + d[-1])
        return d, t

    symmetric = X2 is X
    d1, t1 = diagonals(X)
    d2 = d1 if symmetric else diagonals(X2)[0]
    n1, n2 = X.shape[0], X2.shape[0]
    rows = block_rows or block_rows_for(n2, depth, all_layers, memory_budget)
    shape = (depth, n1, n2) if all_layers else (n1, n2)
    sigma_out, theta_out = X.new_empty(shape), X.new_empty(shape)
    nblocks = math.ceil(n1 / rows)
    for k, r0 in enumerate(range(0, n1, rows), start=1):
        r = slice(r0, min(r0 + rows, n1))
        c = slice(r0 if symmetric else 0, n2)  # symmetric: the upper triangle only, mirrored below
        sigma = X[r] @ X2[c].t() / n0 + beta2
        theta = sigma.clone()
        layers = [(sigma, theta)]
        for l in range(1, depth):
            sxx, syy = d1[l - 1][r, None], d2[l - 1][None, c]
            e_ss, e_dd = expect(sxx, sigma, syy)
            sigma = e_ss + beta2
            theta = theta * e_dd + sigma
            layers.append((sigma, theta))
        if all_layers:
            sigma_out[:, r, c] = torch.stack([s for s, _ in layers])
            theta_out[:, r, c] = torch.stack([t for _, t in layers])
        else:
            sigma_out[r, c], theta_out[r, c] = sigma, theta
        if progress is not None:
            progress(k, nblocks)
    if symmetric:
        for out, diag in ((sigma_out, d1), (theta_out, t1)):
            _mirror_upper_(out)
            index = torch.arange(n1)
            if all_layers:
                out[:, index, index] = torch.stack(diag)
            else:
                out[index, index] = diag[-1]
    return sigma_out, theta_out


def _mirror_upper_(K: torch.Tensor, block: int = MIRROR_BLOCK) -> None:
    """Copy the upper triangle of K (over its last two dims) onto the lower one, in place."""
    n = K.shape[-1]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper = K[..., i : i + block, j : j + block]
            if i == j:
                lower = torch.tril(torch.ones(upper.shape[-2:], dtype=torch.bool), -1)
                K[..., i : i + block, j : j + block] = torch.where(lower, upper.transpose(-1, -2), upper)
            else:
                K[..., j : j + block, i : i + block] = upper.transpose(-1, -2)
