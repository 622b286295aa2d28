"""Infinite-width kernels Sigma(L) and Theta(L) of the CNN of ntkrun/architectures/cnn.py
(docs/science.md §9): the layer recursion on pixel-pair covariances of Novak et al. 2019,
Garriga-Alonso et al. 2019 and Arora et al. 2019 (CNTK).

With A(l)_{p,p'}(x, x') = E[alpha(l)_p(x) . alpha(l)_p'(x')] / C_l (A(0) = x_p . x'_p' / C0) and
TA(l) = Theta(l) * Sdot(l) (TA(0) = 0), a conv layer is a patch average along the pixel pair's
common offset d (zeros outside a "same" image, periodic for "circular"):

    Sigma(l+1)_{p,p'} = (1/k^2) sum_d A(l)_{p+d,p'+d} + beta^2
    Theta(l+1)_{p,p'} = (1/k^2) sum_d [TA(l) + A(l)]_{p+d,p'+d} + beta^2
    A(l+1) = E[sigma(u) sigma(v)],  Sdot(l+1) = E[sigma'(u) sigma'(v)],
        (u, v) ~ N(0, [[Sigma_pp(x,x), Sigma_pp'(x,x')], [Sigma_pp'(x,x'), Sigma_p'p'(x',x')]])

and the readout + dense layer gives Sigma = R(A(L-1)) + beta^2, Theta = R(TA(L-1) + A(L-1)) + beta^2
with R the mean over same-position pairs p = p' ("flatten") or over all pairs ("gap"). The patch
average keeps p - p' fixed, so "flatten" needs only the same-position pairs through the whole
recursion: N1 N2 H W k^2 numbers per layer, against N1 N2 (H W)^2 k^2 for "gap".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ntkrun.architectures.cnn import check_geometry, image_sizes
from ntkrun.kernels.analytic import (
    CLOSED_FORMS,
    OUT_DTYPES,
    PARAMETRIZATIONS,
    TWO_PI,
    Expectations,
    _as_float64,
    quadrature_expectations,
    relu_expectations_,
)
from ntkrun.kernels.buffers import LIVE_COPIES, BufferPool
from ntkrun.kernels.tiles import block_rows, grid
from ntkrun.linalg import empty_checked
from ntkrun.nonlinearities import NONLINEARITIES, Nonlinearity, get_nonlinearity

Progress = Callable[[int, int], None]

TILE_NUMBERS = 2**17  # numbers per tile intermediate: 1 MB in float64, cache sized (see tile_shape)


class _Pool(BufferPool):
    """The tile buffers, and the 0/1 masks of patch_sum."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: dict[tuple, torch.Tensor] = {}

    def mask(
        self, spatial: tuple[int, ...], dims: tuple[int, ...], o: int, like: torch.Tensor
    ) -> torch.Tensor:
        """(prod(spatial),) 0/1: 1 where every index i_d (d in dims, negative) has 0 <= i_d + o < n_d."""
        key = (spatial, dims, o, like.dtype, like.device)
        if key not in self.masks:
            mask = torch.ones(spatial, dtype=like.dtype, device=like.device)
            for d in dims:
                n = spatial[d]
                idx = torch.arange(n, device=like.device) + o
                shape = [1] * len(spatial)
                shape[d] = n
                mask = mask * ((idx >= 0) & (idx < n)).to(like.dtype).reshape(shape)
            self.masks[key] = mask.reshape(-1)
        return self.masks[key]


def _narrow(t: torch.Tensor, dims: Sequence[int], start: int, length: int) -> torch.Tensor:
    for d in dims:
        t = t.narrow(d, start, length)
    return t


def patch_sum(t: torch.Tensor, groups: Sequence[Sequence[int]], k: int, padding: str) -> torch.Tensor:
    """sum over the k x k offsets d of t at (p + d, p' + d): one shift-sum per group of dims.

    groups: ((-2,), (-1,)) for same-position maps (..., H, W); ((-4, -2), (-3, -1)) for pixel-pair
    maps (..., H, W, H, W), each group shifted by the same offset on all its dims (the pair keeps
    p - p'). "same": terms outside the image are 0; "valid": the output shrinks by k - 1;
    "circular": indices wrap. t is left unchanged.
    """
    return _patch_sum_(t.clone(memory_format=torch.contiguous_format), groups, k, padding, _Pool())


def _patch_sum_(
    t: torch.Tensor, groups: Sequence[Sequence[int]], k: int, padding: str, pool: _Pool
) -> torch.Tensor:
    """patch_sum of a contiguous t, overwriting it (the result is t itself unless "valid" shrank it).

    A shift along a group is a constant shift of the flat index of a contiguous map (the sum of
    the group's strides), so each offset is one pass over memory: a multiply-add by the 0/1 mask
    of the in-image terms ("same"), or unmasked and then cropped ("valid"); "circular" rolls.
    Two buffers alternate, t and one from the pool.
    """
    r = k // 2
    nsp = len(groups) * len(groups[0])  # spatial dims: the last nsp
    for dims in groups:
        spatial = tuple(t.shape[-nsp:])
        flat_len = math.prod(spatial)
        stride = sum(t.stride(d) for d in dims)
        n = t.shape[dims[0]]
        if padding == "valid":
            m = n - k + 1
            shape = [*t.shape]
            for d in dims:
                shape[d] = m
            out = pool.get(t, shape).copy_(_narrow(t, dims, 0, m))
            for o in range(1, k):
                out += _narrow(t, dims, o, m)
            pool.put(t)
            t = out
            continue
        src = t.view(-1, flat_len)
        out = pool.get(t).copy_(t)
        if padding == "circular":
            for o in range(1, r + 1):
                for shift in (o, -o):
                    out += torch.roll(t, shifts=(-shift,) * len(dims), dims=tuple(dims))
        else:
            dst = out.view(-1, flat_len)
            for o in range(1, min(r, n - 1) + 1):
                for shift in (o, -o):
                    s = shift * stride
                    mask = pool.mask(spatial, tuple(dims), shift, t)
                    if s > 0:
                        dst[:, : flat_len - s].addcmul_(src[:, s:], mask[: flat_len - s])
                    else:
                        dst[:, -s:].addcmul_(src[:, : flat_len + s], mask[-s:])
        pool.put(t)
        t = out
    return t


class _Recursion:
    """The recursion of the module docstring on the maps of a batch of input pairs.

    Activation maps travel with a scale c: the true A(l), TA(l) are c A, c TA (c = 1 / 2 pi for the
    in-place ReLU, folded into the next patch mean). The maps handed to conv, act and readout are
    consumed (overwritten or returned to the pool)."""

    def __init__(
        self, expect: Expectations, depth: int, beta: float, k: int, padding: str, readout: str,
        factors: list[float] | None,
    ) -> None:  # fmt: skip
        self.expect, self.depth, self.beta2, self.k, self.padding = expect, depth, beta**2, k, padding
        self.fast_relu = expect is relu_expectations_
        self.pairs = readout == "gap"
        # standard parametrization: layer l's own term fan_in * (patch mean of A) + 1 (widths given)
        self.factors = factors
        self.b2 = 1.0 if factors else self.beta2
        self.pool = _Pool()

    def conv(
        self, l: int, A: torch.Tensor, TA: torch.Tensor | None, c: float, pairs: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer l + 1's (Sigma, Theta) from c A(l), c TA(l) (TA None for l = 0)."""
        scale = c / self.k**2
        groups = ((-4, -2), (-3, -1)) if pairs else ((-2,), (-1,))
        if self.factors is None and TA is None:
            U = None
        elif self.factors is None:
            U = TA.add_(A)
        elif TA is None:
            U = self.pool.get(A).copy_(A).mul_(self.factors[l])
        else:
            U = TA.add_(A, alpha=self.factors[l])
        sigma = _patch_sum_(A, groups, self.k, self.padding, self.pool).mul_(scale).add_(self.beta2)
        if U is None:
            return sigma, self.pool.get(sigma).copy_(sigma)
        theta = _patch_sum_(U, groups, self.k, self.padding, self.pool).mul_(scale).add_(self.b2)
        return sigma, theta

    def act(
        self, sigma: torch.Tensor, theta: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, pairs: bool,
        roots: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
        """(Sigma, Theta) of layer l -> (A(l), TA(l)) / c and c; v1, v2 the variances
        (broadcastable, same-position shape; expanded here for pixel-pair maps)."""
        if pairs:  # (..., H, W) -> (..., H, W, 1, 1) and (..., 1, 1, H, W)
            v1, v2 = v1[..., None, None], v2[..., None, None, :, :]
            if roots is not None:
                roots = (roots[0][..., None, None], roots[1][..., None, None, :, :])
        if self.fast_relu:
            e_ss, e_dd = relu_expectations_(v1, sigma, v2, roots, self.pool)
            TA = theta.mul_(e_dd)
            self.pool.put(e_dd)
            return e_ss, TA, 1 / TWO_PI
        e_ss, e_dd = self.expect(v1, sigma, v2)
        self.pool.put(sigma)
        return e_ss.contiguous(), theta.mul_(e_dd), 1.0

    def readout(
        self, A: torch.Tensor, TA: torch.Tensor | None, c: float, pairs: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (Sigma(L), Theta(L)) over the batch of pairs."""
        dims = tuple(range(-4 if pairs else -2, 0))
        a = A.mean(dims) * c
        sigma = a + self.beta2
        factor = 1.0 if self.factors is None else self.factors[-1]
        theta = a * factor + self.b2
        if TA is not None:
            theta += TA.mean(dims) * c
        self.pool.put(A, TA)
        return sigma, theta

    def run(
        self, A0: torch.Tensor, v1: list[torch.Tensor], v2: list[torch.Tensor], pairs: bool,
        exact: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A(0) of a batch of pairs (consumed) and the variances of each layer -> (Sigma(L), Theta(L)).

        exact=False (tiles of the Gram): the ReLU's s is the product of precomputed roots.
        exact=True (self pairs): s = sqrt(sxx syy), and for pixel-pair maps the same-pixel entries
        are set to the variances themselves, so that their correlation is exactly 1."""
        A, TA, c = A0.contiguous(), None, 1.0
        for l in range(self.depth - 1):
            sigma, theta = self.conv(l, A, TA, c, pairs)
            roots = None
            if exact and pairs:
                flat = sigma.flatten(-4, -3).flatten(-2, -1)
                flat.diagonal(dim1=-2, dim2=-1).copy_(v1[l].flatten(-2, -1))
            elif not exact and self.fast_relu:
                roots = (v1[l].sqrt(), v2[l].sqrt())
            A, TA, c = self.act(sigma, theta, v1[l], v2[l], pairs, roots)
        return self.readout(A, TA, c, pairs)

    def variances(self, X: torch.Tensor) -> list[torch.Tensor]:
        """Sigma(l)_pp(x, x) for l = 1 .. L-1: (N, H_l, W_l) each, by the same-position recursion
        with correlation exactly 1 (sxy = sxx = syy, s = sqrt(sxx syy))."""
        step = max(1, TILE_NUMBERS // math.prod(X.shape[2:]))  # inputs per chunk, as the Gram's tiles
        out: list[torch.Tensor] = []
        for i, x in zip(range(0, X.shape[0], step), X.split(step), strict=True):
            A, TA, c = (x * x).sum(1) / X.shape[1], None, 1.0
            for l in range(self.depth - 1):
                sigma, theta = self.conv(l, A, TA, c, False)
                if i == 0:
                    out.append(sigma.new_empty((X.shape[0], *sigma.shape[1:])))
                v = out[l][i : i + len(x)]
                v.copy_(sigma)
                A, TA, c = self.act(sigma, theta, v, v, False)  # sigma consumed; its copy v only read
            self.pool.put(A, TA)
        self.pool.free.clear()  # buffers of the chunks' shape: the tiles' come next
        return out

    def self_kernels(self, X: torch.Tensor, v: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Sigma(L)(x, x), Theta(L)(x, x)) per input (N,), exactly (correlation 1 on same pixels)."""
        c0 = X.shape[1]
        if not self.pairs:  # chunks of about TILE_NUMBERS numbers per map, as the Gram's tiles
            step = max(1, TILE_NUMBERS // math.prod(X.shape[2:]))
            parts = [
                self.run((x * x).sum(1) / c0, [u[i : i + step] for u in v], [u[i : i + step] for u in v],
                         False, exact=True)
                for i, x in zip(range(0, X.shape[0], step), X.split(step), strict=True)
            ]  # fmt: skip
            return torch.cat([s for s, _ in parts]), torch.cat([t for _, t in parts])
        parts: list[list[torch.Tensor]] = [[], []]
        for i in range(X.shape[0]):  # one self pair at a time: (H W)^2 numbers each
            A0 = torch.einsum("chw,cab->hwab", X[i], X[i])[None] / c0
            vi = [u[i : i + 1] for u in v]
            s, t = self.run(A0, vi, vi, True, exact=True)
            parts[0].append(s)
            parts[1].append(t)
        return torch.cat(parts[0]), torch.cat(parts[1])


def _as_images(X: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    return _as_float64(X, name, "(N, C, H, W)")


def _factors(
    parametrization: str, widths: int | Sequence[int] | None, depth: int, c0: int, k: int,
    readout: str, last: tuple[int, int],
) -> list[float] | None:  # fmt: skip
    """Standard parametrization: the fan-ins C_l k^2 (l = 0 .. L-2) and of the dense layer."""
    if parametrization not in PARAMETRIZATIONS:
        names = ", ".join(PARAMETRIZATIONS)
        raise ValueError(f"parametrization must be one of {names}, got {parametrization!r}")
    if parametrization == "ntk":
        return None
    if widths is None:
        raise ValueError("widths: the standard parametrization's NTK grows with the width; give the channels")
    ws = [int(widths)] * (depth - 1) if isinstance(widths, int) else [int(w) for w in widths]
    if len(ws) != depth - 1 or any(w < 1 for w in ws):
        raise ValueError(f"widths: depth {depth} needs {depth - 1} channel counts >= 1, got {widths}")
    channels = [c0, *ws]
    dense = channels[-1] * (last[0] * last[1] if readout == "flatten" else 1)
    return [float(c * k * k) for c in channels[:-1]] + [float(dense)]


def tile_shape(n2: int, per_pair: int, memory_budget: int = 2**30) -> tuple[int, int]:
    """(rows, cols) of a tile of input pairs (`ntkrun.kernels.tiles`): about TILE_NUMBERS numbers per
    intermediate (cache sized; benchmarks/bench_cnn.py), LIVE_COPIES of them within memory_budget.
    Fixed by N2 and the pair's size alone, never by the rows asked for; square where N2 allows."""
    pairs = max(1, min(TILE_NUMBERS, memory_budget // (8 * LIVE_COPIES)) // per_pair)
    edge = max(1, math.isqrt(pairs))
    cols = min(n2, edge)
    return max(1, pairs // cols) if cols < edge else edge, cols


def cnn_kernels(
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    depth: int = 4,
    nonlinearity: str | Nonlinearity = "relu",
    beta: float = 0.1,
    *,
    kernel_size: int = 3,
    padding: str = "same",
    readout: str = "flatten",
    parametrization: str = "ntk",
    widths: int | Sequence[int] | None = None,
    out_dtype: torch.dtype = torch.float64,
    outs: Sequence[torch.Tensor | None] | None = None,
    rows: tuple[int, int] | None = None,
    quadrature_order: int = 64,
    closed_form: bool = True,
    memory_budget: int = 2**30,
    progress: Progress | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Limiting kernels of `ntkrun.architectures.CNN`: X (N1, C, H, W), X2 (N2, C, H, W) or None
    (= X) -> (Sigma(L), Theta(L)), each (N1, N2), computed in float64 and stored in out_dtype
    (into `outs` where given: a pair of (N1, N2) tensors, None for a kernel not wanted, which
    then comes back as None).

    depth, kernel_size, padding, readout, nonlinearity, beta as for the CNN (docs/science.md §9).
    ReLU and erf use closed forms, other nonlinearities quadrature (closed_form=False forces it).
    parametrization="standard" needs the hidden channel counts `widths` (an int or L - 1 ints).
    Pairs are computed in tiles of `tile_shape` at fixed offsets (`progress(done, total)` per tile);
    with X2 = None those on and above the diagonal, mirrored, and an exact diagonal. `rows=(r0, r1)`
    computes those rows only, as `ntkrun.analytic_kernel` does (into (N1, N2) `outs` or (r1 - r0, N2)
    blocks), each entry the whole Gram's bit for bit.
    """
    check_geometry(kernel_size, padding, readout, depth)
    X = _as_images(X, "X")
    symmetric = X2 is None
    X2 = X if symmetric else _as_images(X2, "X2")
    if X2.shape[1:] != X.shape[1:]:
        raise ValueError(f"X2 has images of shape {tuple(X2.shape[1:])} but X has {tuple(X.shape[1:])}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    c0, h, w = X.shape[1:]
    sizes = image_sizes((h, w), kernel_size, padding, depth)
    factors = _factors(parametrization, widths, depth, c0, kernel_size, readout, sizes[-1])
    nl = get_nonlinearity(nonlinearity)
    registered = NONLINEARITIES.get(nl.name) is nl  # a user's own Nonlinearity gets quadrature
    expect = CLOSED_FORMS.get(nl.name) if closed_form and registered else None
    if expect is CLOSED_FORMS.get("relu"):
        expect = relu_expectations_
    expect = expect or quadrature_expectations(nl, quadrature_order)
    rec = _Recursion(expect, depth, beta, kernel_size, padding, readout, factors)

    n1, n2 = X.shape[0], X2.shape[0]
    per_pair = h * w * (h * w if readout == "gap" else 1)
    tile_rows, tile_cols = tile_shape(n2, per_pair, memory_budget)
    if symmetric:
        tile_rows = tile_cols  # square tiles, on and above the diagonal
    tiles = grid(n1, n2, tile_rows, tile_cols, symmetric, rows)  # checks rows
    r0, r1 = rows if rows is not None else (0, n1)
    if outs is None:
        outs = empty_checked([(r1 - r0 if rows else n1, n2)] * 2, out_dtype, X.device, "cnn_kernels")
    targets = [(i, out, block_rows(out, (n1, n2), rows, out_dtype))
               for i, out in enumerate(outs) if out is not None]  # fmt: skip
    v1 = rec.variances(X)  # of every input, whatever rows are asked for
    v2 = v1 if symmetric else rec.variances(X2)
    for done, tile in enumerate(tiles, start=1):
        r, c = tile.rows, tile.cols
        xa, xb = X[r], X2[c]
        if readout == "gap":
            A0 = torch.einsum("ichw,jcab->ijhwab", xa, xb) / c0
        else:
            A0 = torch.einsum("ichw,jchw->ijhw", xa, xb) / c0
        s, t = rec.run(A0, [u[r, None] for u in v1], [u[None, c] for u in v2], readout == "gap")
        if symmetric and r.start == c.start:  # a diagonal tile: its upper triangle, mirrored
            s, t = s.triu() + s.triu(1).t(), t.triu() + t.triu(1).t()
        for i, out, shift in targets:
            out[tile.out.start - shift : tile.out.stop - shift, c] = (s, t)[i][tile.keep]
            if symmetric and r.start != c.start and rows is None:
                out[c, r] = (s, t)[i].t()
        if progress is not None:
            progress(done, len(tiles))
    if symmetric:
        rec.pool.free.clear()  # the tiles' buffers go before the self pairs' (of another shape) come
        s, t = rec.self_kernels(X, v1)  # of every input, chunked as always
        index = torch.arange(r0, r1, device=X.device)
        for i, out, shift in targets:
            out[index - shift, index] = (s, t)[i][r0:r1].to(out_dtype)
    return outs[0], outs[1]
