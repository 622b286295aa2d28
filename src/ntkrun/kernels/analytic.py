"""Infinite-width kernels Sigma(L) and Theta(L) (docs/science.md §3).

    Sigma(1) = x.x'/n0 + beta^2,   Sigma(l+1) = E[sigma(u) sigma(v)] + beta^2,
    Sdot(l+1) = E[sigma_dot(u) sigma_dot(v)],   Theta(1) = Sigma(1),
    Theta(l+1) = Theta(l) * Sdot(l+1) + Sigma(l+1),
    (u, v) ~ N(0, [[Sigma(l)(x,x), Sigma(l)(x,x')], [Sigma(l)(x,x'), Sigma(l)(x',x')]]).

ReLU and erf use closed forms; every other nonlinearity uses 2-D Gauss-Hermite quadrature.
Computed in float64, in tiles of rows at fixed offsets (`ntkrun.kernels.tiles`): each entry's
recursion needs only its own covariance and the two diagonals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ntkrun.kernels.buffers import BufferPool
from ntkrun.kernels.tiles import block_rows, grid
from ntkrun.linalg import empty_checked, mirror_
from ntkrun.network import hidden_widths
from ntkrun.nonlinearities import NONLINEARITIES, Nonlinearity, get_nonlinearity

Progress = Callable[[int, int], None]
TWO_PI = 2 * math.pi
Expectations = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def relu_expectations(
    sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[relu(u) relu(v)], E[relu'(u) relu'(v)]) for (u, v) ~ N(0, [[sxx, sxy], [sxy, syy]]).

    Arguments broadcast against each other. Where a variance is 0, u = 0 a.s. and relu'(0) = 0.
    In place on four temporaries of the output's size (the same operations, in the same order, as
    s = sqrt(sxx syy), rho = sxy / s, e_ss = s (sqrt(1 - rho^2) + (pi - arccos rho) rho) / 2 pi).
    """
    s = torch.mul(sxx, syy).sqrt_()
    zero = s == 0
    rho = torch.div(sxy, s.masked_fill(zero, 1.0)).masked_fill_(zero, 1.0).clamp_(-1.0, 1.0)
    pi_minus_th = torch.arccos(rho).neg_().add_(math.pi)
    # sin th = sqrt(1 - rho^2), cos th = rho
    e_ss = torch.mul(rho, rho).neg_().add_(1).sqrt_().add_(pi_minus_th * rho).mul_(s).div_(2 * math.pi)
    e_dd = pi_minus_th.div_(2 * math.pi).masked_fill_(zero, 0.0)
    return e_ss, e_dd


def erf_expectations(
    sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[erf(u) erf(v)], E[erf'(u) erf'(v)]) for (u, v) ~ N(0, [[sxx, sxy], [sxy, syy]])."""
    q = (1 + 2 * sxx) * (1 + 2 * syy)
    e_ss = (2 / math.pi) * torch.arcsin((2 * sxy / torch.sqrt(q)).clamp(-1.0, 1.0))
    e_dd = (4 / math.pi) / torch.sqrt(q - 4 * sxy**2)
    return e_ss, e_dd


def relu_expectations_(
    sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor,
    roots: tuple[torch.Tensor, torch.Tensor] | None = None, pool: BufferPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """2 pi (E[relu(u) relu(v)], E[relu'(u) relu'(v)]): relu_expectations
    times 2 pi (the caller folds 1 / 2 pi into its next scaling), in fewer passes; overwrites sxy
    (full size; sxx, syy broadcast against it).

    The same formulas: s = sqrt(sxx syy), rho = sxy / s clipped to [-1, 1], 2 pi e_ss = s (sin th
    + (pi - th) cos th), 2 pi e_dd = pi - th = arccos(-rho), both 0 where s = 0. Without `roots`
    s is sqrt(sxx syy), so where sxy = sxx = syy it is sxx exactly (sqrt of a rounded square) and
    rho exactly 1; with roots = (sqrt(sxx), sqrt(syy)) (small, precomputed) s is their product,
    one pass instead of two (the tiles of the Gram, whose diagonal is recomputed exactly).
    Agreement with relu_expectations to rounding is tested.
    """
    pool = pool or BufferPool()
    s = pool.get(sxy)
    if roots is None:
        torch.mul(sxx, syy, out=s).sqrt_()
    else:
        torch.mul(*roots, out=s)
    degenerate = bool((sxx <= 0).any() or (syy <= 0).any())  # small tensors: a cheap check
    if degenerate:
        zero = s <= 0
        s.masked_fill_(zero, 1.0)
    rho = sxy.div_(s)
    if degenerate:
        rho.masked_fill_(zero, 1.0)
    rho.clamp_(-1.0, 1.0)
    sin = torch.addcmul(torch.ones((), dtype=rho.dtype, device=rho.device), rho, rho, value=-1.0,
                        out=pool.get(rho)).sqrt_()  # fmt: skip
    j0 = torch.neg(rho, out=pool.get(rho)).arccos_()  # pi - th
    e_ss = sin.addcmul_(j0, rho).mul_(s)
    if degenerate:
        e_ss.masked_fill_(zero, 0.0)
        j0.masked_fill_(zero, 0.0)
    pool.put(s, rho)
    return e_ss, j0


CLOSED_FORMS: dict[str, Expectations] = {"relu": relu_expectations, "erf": erf_expectations}


QUADRATURE_ORDER = 64  # Gauss-Hermite nodes per dimension (the default quadrature_order)
QUADRATURE_CHUNK = 2**24  # numbers per (entries, order) array of one chunk of entries


def quadrature_expectations(
    nl: Nonlinearity, order: int = QUADRATURE_ORDER, chunk_elems: int = QUADRATURE_CHUNK
) -> Expectations:
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


def _as_float64(X: torch.Tensor | np.ndarray, name: str, shape: str = "(N, n0)") -> torch.Tensor:
    """X as float64, checked: as many dimensions as `shape` names, at least one point, finite."""
    X = torch.as_tensor(X).to(torch.float64)
    if X.dim() != shape.count(",") + 1:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one point (N = 0)")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


MIRROR_BLOCK = 1024  # block edge of the copy of a symmetric Gram's upper triangle onto the lower


TILE_COLS = 1024  # columns of a tile of a wide Gram
TILE_NUMBERS = 2**17  # entries of a tile: each float64 intermediate 1 MB, cache sized


def tile_shape_for(n2: int) -> tuple[int, int]:
    """(rows, cols) of a tile of a Gram with N2 columns (`ntkrun.kernels.tiles`): fixed by N2 alone,
    so an entry's arithmetic never depends on how the Gram's rows are split. Cache sized: 2^17
    entries, (128, 1024) from N2 = 1024 on (ReLU depth 4, rows 0-256 of a 60000-point Gram, AMD
    EPYC 2 cores: 47 ns per pair, against 83 for the former (8, 60000) row strips; 64 x 1024 and
    128 x 512 within 3%); about 8 intermediates live."""
    cols = min(max(1, n2), TILE_COLS)
    return max(8, TILE_NUMBERS // cols), cols


PARAMETRIZATIONS = ("ntk", "standard")
KINDS = ("nngp", "ntk")  # Sigma(L) and Theta(L)
OUT_DTYPES = (torch.float32, torch.float64)


def _widths(parametrization: str, widths: int | Sequence[int] | None, depth: int) -> list[int]:
    """The hidden widths n_1 .. n_{L-1} the standard parametrization's kernel depends on."""
    if parametrization not in PARAMETRIZATIONS:
        names = ", ".join(PARAMETRIZATIONS)
        raise ValueError(f"parametrization must be one of {names}, got {parametrization!r}")
    if parametrization == "ntk":
        return []
    if widths is None:
        raise ValueError(
            "widths: the standard parametrization's NTK grows with the width; give the hidden widths"
        )
    try:
        return hidden_widths(widths if isinstance(widths, int) else list(widths), depth)
    except ValueError as err:
        raise ValueError(f"widths: {err}") from None


class _Recursion:
    """The layer recursion of docs/science.md §3 (and §7.2 for the standard parametrization) on
    one (rows, cols) block: Sigma and Theta of every layer from the input Gram. The ReLU's closed
    form runs in place on reused buffers (`relu_expectations_`)."""

    def __init__(self, expect: Expectations, depth: int, beta: float, n0: int, widths: list[int]) -> None:
        self.expect, self.depth, self.beta2, self.n0, self.widths = expect, depth, beta**2, n0, widths
        self.fast_relu = expect is relu_expectations
        self.pool = BufferPool()

    def first(self, dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x.x' (consumed) -> (Sigma(1), Theta(1))."""
        theta = self.pool.get(dot).copy_(dot).add_(1) if self.widths else None
        sigma = dot.div_(self.n0).add_(self.beta2)
        return sigma, (theta if theta is not None else self.pool.get(sigma).copy_(sigma))

    def next(
        self, l: int, sxx: torch.Tensor, sigma: torch.Tensor, syy: torch.Tensor, theta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer l -> l + 1 (l = 1 .. L-1), consuming sigma and theta. Standard: Theta(l+1) =
        Theta(l) Sdot + n_l E[ss] + 1, i.e. the NTK parametrization's layer term [a.a'/n_l + beta^2]
        becomes [a.a' + 1]. The ReLU's s = sqrt(sxx syy) is computed per pair, not as a product of
        roots, so that rho = +-1 comes out exactly for x' = +-x (arccos amplifies an error of 1 ulp
        there to 1e-8; the pass costs 5% of a tile)."""
        if self.fast_relu:
            e_ss, e_dd = relu_expectations_(sxx, sigma, syy, pool=self.pool)
            e_ss.mul_(1 / TWO_PI)
            theta.mul_(e_dd).mul_(1 / TWO_PI)
            self.pool.put(e_dd)
        else:
            e_ss, e_dd = self.expect(sxx, sigma, syy)
            theta = theta * e_dd
        if self.widths:
            theta.add_(e_ss, alpha=self.widths[l - 1]).add_(1)
        sigma = e_ss.add_(self.beta2)
        if not self.widths:
            theta.add_(sigma)
        return sigma, theta

    def diagonals(self, Z: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sigma(l)(x, x) and Theta(l)(x, x), l = 1 .. L, with the correlation exactly 1 (passing
        sxy = sqrt(sxx * syy), the very value the expectations divide by)."""
        sigma, theta = self.first((Z * Z).sum(1))
        d, t = [sigma], [theta]
        for l in range(1, self.depth):
            sigma, theta = self.next(l, d[-1], torch.sqrt(d[-1] * d[-1]), d[-1], theta.clone())
            d.append(sigma)
            t.append(theta)
        self.pool.free.clear()  # buffers of the diagonals' shape: the tiles' come next
        return d, t

    def block(
        self, X: torch.Tensor, X2: torch.Tensor, sxx: list[torch.Tensor], syy: list[torch.Tensor],
        all_layers: bool = False,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(Sigma(l), Theta(l)), l = 1 .. L (the last alone unless all_layers), on the block X
        (rows, n0) x X2 (cols, n0), given the rows' and the columns' diagonals Sigma(l)(x, x)
        (lists of (rows,) and (cols,)). Hand the tensors back with `release` once read."""
        dot = self.pool.get(X, (X.shape[0], X2.shape[0]))
        layers = [self.first(torch.matmul(X, X2.t(), out=dot))]
        for l in range(1, self.depth):
            sigma, theta = layers[-1]
            if all_layers:
                sigma, theta = self.pool.get(sigma).copy_(sigma), self.pool.get(theta).copy_(theta)
            else:
                layers.pop()
            layers.append(self.next(l, sxx[l - 1][:, None], sigma, syy[l - 1][None, :], theta))
        return layers

    def release(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hand a block's tensors back to the pool for the next tile."""
        for sigma, theta in layers:
            self.pool.put(sigma, theta)


def _setup(
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None,
    depth: int,
    nonlinearity: str | Nonlinearity,
    beta: float,
    parametrization: str,
    widths: int | Sequence[int] | None,
    quadrature_order: int,
    closed_form: bool,
) -> tuple[torch.Tensor, torch.Tensor, _Recursion]:
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    ws = _widths(parametrization, widths, depth)
    nl = get_nonlinearity(nonlinearity)
    X = _as_float64(X, "X")
    X2 = X if X2 is None else _as_float64(X2, "X2")
    if X2.shape[1] != X.shape[1]:
        raise ValueError(f"X has {X.shape[1]} input dimensions but X2 has {X2.shape[1]}")
    registered = NONLINEARITIES.get(nl.name) is nl  # a user's own Nonlinearity gets quadrature
    expect = CLOSED_FORMS.get(nl.name) if closed_form and registered else None
    expect = expect or quadrature_expectations(nl, quadrature_order)
    return X, X2, _Recursion(expect, depth, beta, X.shape[1], ws)


def _out_dtype(out_dtype: torch.dtype) -> torch.dtype:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    return out_dtype


def analytic_kernels(
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    depth: int = 4,
    nonlinearity: str | Nonlinearity = "relu",
    beta: float = 0.1,
    *,
    parametrization: str = "ntk",
    widths: int | Sequence[int] | None = None,
    out_dtype: torch.dtype = torch.float64,
    quadrature_order: int = 64,
    closed_form: bool = True,
    all_layers: bool = False,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Limiting kernels: X (N1, n0), X2 (N2, n0) or None (= X) -> (Sigma(L), Theta(L)), (N1, N2).

    With all_layers=True returns (L, N1, N2) stacks of Sigma(1..L) and Theta(1..L). Computed in
    float64, stored in `out_dtype` (float32 halves the memory of a large Gram). For k outputs the
    limit is Theta(L) (x) I_k: each output is an independent copy (docs/science.md §7.1).
    parametrization="standard" gives the kernel of a standard-parametrized network of the given
    hidden `widths` (it grows with them; Sigma is the same in both). `closed_form=False` forces
    quadrature (used to check the closed forms). Computed in tiles of `tile_shape_for(N2)` at
    fixed offsets (`ntkrun.kernels.tiles`): `analytic_kernel`'s row ranges give the same numbers bit
    for bit. `progress(done, total)` is called per tile. With X2 = None only the upper triangle is
    computed (the result is exactly symmetric) and the diagonal is exact.
    """
    X, X2, rec = _setup(
        X, X2, depth, nonlinearity, beta, parametrization, widths, quadrature_order, closed_form
    )
    symmetric = X2 is X
    d1, t1 = rec.diagonals(X)
    d2 = d1 if symmetric else rec.diagonals(X2)[0]
    n1, n2 = X.shape[0], X2.shape[0]
    shape = (depth, n1, n2) if all_layers else (n1, n2)
    dtype = _out_dtype(out_dtype)
    sigma_out, theta_out = empty_checked([shape, shape], dtype, X.device, "analytic_kernels")
    tiles = grid(n1, n2, *tile_shape_for(n2), symmetric)
    for k, tile in enumerate(tiles, start=1):
        r, c = tile.rows, tile.cols
        layers = rec.block(X[r], X2[c], [d[r] for d in d1], [d[c] for d in d2], all_layers)
        if all_layers:
            sigma_out[:, r, c] = torch.stack([s for s, _ in layers])
            theta_out[:, r, c] = torch.stack([t for _, t in layers])
        else:
            sigma_out[r, c], theta_out[r, c] = layers[-1]
        rec.release(layers)
        if progress is not None:
            progress(k, len(tiles))
    if symmetric:
        for out, diag in ((sigma_out, d1), (theta_out, t1)):
            for square in out.view(-1, n1, n1):  # each layer's with all_layers
                mirror_(square, to_lower=True, block=MIRROR_BLOCK)
            index = torch.arange(n1)
            out[..., index, index] = (torch.stack(diag) if all_layers else diag[-1]).to(dtype)
    return sigma_out, theta_out


def analytic_kernel(
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    depth: int = 4,
    nonlinearity: str | Nonlinearity = "relu",
    beta: float = 0.1,
    *,
    kind: str = "ntk",
    parametrization: str = "ntk",
    widths: int | Sequence[int] | None = None,
    out_dtype: torch.dtype = torch.float64,
    out: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
    quadrature_order: int = 64,
    closed_form: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """One limiting kernel, Theta(L) (kind "ntk") or Sigma(L) ("nngp"): -> (N1, N2) in out_dtype.

    For Grams too large to hold twice (60000 points: 14.4 GB in float32). Fills `out` (N1, N2)
    if given, else a new tensor. `rows=(r0, r1)` computes those rows only, so a caller can
    checkpoint the Gram block by block, into an (N1, N2) `out` or an (r1 - r0, N2) block (returned
    alone without `out`: `tiles.block_rows`); with X2 = None only their upper-triangle part
    (columns >= row) and their exact diagonal are written, and `ntkrun.linalg.mirror_(out,
    to_lower=True)` completes the matrix once every row is done (without `rows`, the whole
    symmetric matrix is returned). Whatever the row ranges, every entry is that of
    `analytic_kernels`, bit for bit (the same tiles; a range that starts or ends inside a tile
    computes that tile whole).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    X, X2, rec = _setup(
        X, X2, depth, nonlinearity, beta, parametrization, widths, quadrature_order, closed_form
    )
    symmetric = X2 is X
    n1, n2 = X.shape[0], X2.shape[0]
    tiles = grid(n1, n2, *tile_shape_for(n2), symmetric, rows)  # checks rows
    r0, r1 = rows if rows is not None else (0, n1)
    dtype = _out_dtype(out_dtype)
    if out is None:
        (out,) = empty_checked([(r1 - r0 if rows else n1, n2)], dtype, X.device, "analytic_kernel")
    shift = block_rows(out, (n1, n2), rows, dtype)
    d1, t1 = rec.diagonals(X)  # of every point, as analytic_kernels computes them
    d2 = d1 if symmetric else rec.diagonals(X2)[0]
    for k, tile in enumerate(tiles, start=1):
        r, c = tile.rows, tile.cols
        layers = rec.block(X[r], X2[c], [d[r] for d in d1], [d[c] for d in d2])
        sigma, theta = layers[-1]
        block = (theta if kind == "ntk" else sigma)[tile.keep]
        out[tile.out.start - shift : tile.out.stop - shift, c] = block
        rec.release(layers)
        if progress is not None:
            progress(k, len(tiles))
    if symmetric:
        index = torch.arange(r0, r1)
        out[index - shift, index] = (t1[-1] if kind == "ntk" else d1[-1])[r0:r1].to(dtype)
        if rows is None:
            mirror_(out, to_lower=True, block=MIRROR_BLOCK)
    return out
