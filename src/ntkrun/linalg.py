"""Kernel least squares at large N, in place: (K + r I) alpha = Y with no second N x N matrix.

A Gram matrix of 60000 points is 14.4 GB in float32; LAPACK's potrf through scipy (32-bit
indices) fails past 2^31 entries and `torch.linalg.cholesky_ex(K, out=...)` still copies K. Here
a right-looking blocked Cholesky overwrites only the LOWER triangle (diagonal included) of K with
the factor L; the factorization never reads nor writes the strict upper triangle, so that keeps
the original matrix. Together with a saved (N,) diagonal this makes a failed factorization
undoable (`restore_lower_`), and a too-small ridge can be raised and retried without a pristine
copy (`kernel_solve_`). Extra memory is O(N m + block^2) (`solve_bytes`), never N x N nor N x block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ntkrun.errors import NumericalError, ResourceError
from ntkrun.memory import available, gib

Progress = Callable[[int, int], None]
DTYPES = (torch.float32, torch.float64)
TILE = 512  # column tile of the trailing update


def empty_checked(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device | str, what: str
) -> list[torch.Tensor]:
    """torch.empty for each shape, refused before anything is allocated when together they exceed
    what the device has available (ntkrun.memory.available, which $NTKRUN_MEMORY_LIMIT overrides),
    or when the allocator refuses them: ResourceError, a MemoryError too, naming the estimate and
    the limit."""
    device = torch.device(device)
    need = sum(math.prod(s) for s in shapes) * torch.empty((), dtype=dtype).element_size()
    found = available(device)
    shown = ", ".join(str(tuple(s)) for s in shapes)
    if found is not None and need > found[0]:
        raise ResourceError(
            f"{what}: {shown} {dtype} need {gib(need)}, more than the {gib(found[0])} available "
            f"({found[1]}); use out_dtype=torch.float32, fewer points, or row ranges"
        )
    try:
        return [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    except RuntimeError as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        message = f"{what}: {shown} {dtype} ({gib(need)}) could not be allocated: {reason}"
        raise ResourceError(message) from err


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [(j, min(j + block, n)) for j in range(0, n, block)]


def _tril_mask(w: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(w, w, dtype=torch.bool, device=device).tril(diagonal)


def _check_kernel(K: torch.Tensor) -> None:
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel must be a square 2-D matrix, got shape {tuple(K.shape)}")
    if K.dtype not in DTYPES:
        raise ValueError(f"kernel dtype must be float32 or float64, got {K.dtype}")


def _view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view of the front of a flat workspace."""
    return flat[: rows * cols].view(rows, cols)


def cholesky_inplace_(K: torch.Tensor, *, block: int = 2048, progress: Progress | None = None) -> bool:
    """Overwrite the lower triangle of K (N, N) with L, K = L L^T; True on success.

    Reads and writes only the lower triangle incl. the diagonal (float32 or float64, any strides
    with a unit column stride work; row-major contiguous is the intended layout); the strict upper
    triangle is left bit-for-bit as it was. Returns False, without raising, when a diagonal block
    is not positive definite (K's lower triangle is then partly overwritten: `restore_lower_`).
    Extra memory: two block x block workspaces. `progress(done, total)`: total is the number of
    diagonal blocks and done counts them weighted by their work (early blocks carry most of the
    trailing updates): one call each time done grows by one, ending at (total, total); so a caller
    that advances by 1 / total per call, or shows done / total, tracks the work, not the blocks.
    """
    _check_kernel(K)
    n = K.shape[0]
    spans = _blocks(n, block)
    work = [  # multiply-adds of the block's factor, panel solve and trailing update (+ 1: never 0)
        1 + (j1 - j0) ** 3 // 3 + (n - j1) * (j1 - j0) ** 2 + (n - j1) ** 2 * (j1 - j0) // 2
        for j0, j1 in spans
    ]
    total, done, called = sum(work), 0, 0
    mask = _tril_mask(min(block, n), K.device) if n else None
    # two block x block workspaces, reused: no allocator churn (the factor's is column-major,
    # the layout LAPACK writes, so cholesky_ex makes no copy of its own)
    flat, flat_L = K.new_empty(min(block, n) ** 2), K.new_empty(min(block, n) ** 2)
    info = torch.zeros((), dtype=torch.int32, device=K.device)
    tile = min(TILE, block)
    for b, (j0, j1) in enumerate(spans):
        w = j1 - j0
        m = mask[:w, :w]
        diag = K[j0:j1, j0:j1]
        sym = torch.where(m, diag, diag.mT, out=_view(flat, w, w))  # symmetric, from the lower
        L, info = torch.linalg.cholesky_ex(sym, out=(_view(flat_L, w, w).mT, info))
        if int(info) != 0:
            return False
        torch.where(m, L, diag, out=diag)
        # panel below the diagonal block: P = K[j1:, j] L_jj^-T, in chunks of rows
        for r0, r1 in _blocks(n - j1, tile):
            P = K[j1 + r0 : j1 + r1, j0:j1]
            P.copy_(
                torch.linalg.solve_triangular(L.mT, P, upper=True, left=False, out=_view(flat, r1 - r0, w))
            )
        # trailing update, lower triangle only: K[c:, c] -= P[c:] P[c]^T per column tile c, the
        # tile's own diagonal piece through a mask (narrow tiles keep the wasted upper half small)
        for c0, c1 in _blocks(n - j1, tile):
            c0, c1 = c0 + j1, c1 + j1
            Pc, d = K[c0:c1, j0:j1], K[c0:c1, c0:c1]
            t = torch.addmm(d, Pc, Pc.mT, alpha=-1, out=_view(flat, c1 - c0, c1 - c0))
            torch.where(mask[: c1 - c0, : c1 - c0], t, d, out=d)
            if c1 < n:
                K[c1:n, c0:c1].addmm_(K[c1:n, j0:j1], Pc.mT, alpha=-1)
        done += work[b]
        while progress is not None and called < len(spans) * done // total:
            called += 1
            progress(called, len(spans))
    return True


def restore_lower_(K: torch.Tensor, diag: torch.Tensor, *, block: int = 2048) -> torch.Tensor:
    """Undo `cholesky_inplace_`: copy K's strict upper triangle (the untouched original) onto
    the lower one, transposed, and the original diagonal diag (N,) back; returns K (N, N).

    Works in block x block pieces, so no N x N temporary."""
    if diag.shape != (K.shape[0],):
        raise ValueError(f"diag must have shape ({K.shape[0]},), got {tuple(diag.shape)}")
    mirror_(K, to_lower=True, block=block)
    K.diagonal().copy_(diag)
    return K


def mirror_(K: torch.Tensor, *, to_lower: bool, block: int = 2048) -> None:
    """Copy one strict triangle of K (N, N) onto the other, transposed, in block x block pieces
    (to_lower: the upper onto the lower), so no N x N temporary."""
    n = K.shape[0]
    spans = _blocks(n, block)
    mask = _tril_mask(min(block, n), K.device, -1) if n else None
    flat = K.new_empty(min(block, n) ** 2)
    for r0, r1 in spans:
        for c0, c1 in spans:
            if c0 >= r0:
                break
            if to_lower:
                K[r0:r1, c0:c1].copy_(K[c0:c1, r0:r1].mT)
            else:
                K[c0:c1, r0:r1].copy_(K[r0:r1, c0:c1].mT)
        d, m, w = K[r0:r1, r0:r1], mask[: r1 - r0, : r1 - r0], r1 - r0
        d.copy_(torch.where(m if to_lower else m.mT, d.mT, d, out=_view(flat, w, w)))


def cho_solve_inplace_(L: torch.Tensor, B: torch.Tensor, *, block: int = 2048) -> torch.Tensor:
    """Solve (L L^T) Z = B for L (N, N) (its lower triangle only is read: the upper may hold
    anything, e.g. the original K) and B (N, m) or (N,) of L's dtype; B is overwritten with Z and
    returned. Blocked forward then back substitution on views; extra memory O(block^2 + block m)."""
    n = L.shape[0]
    if B.shape[0] != n or B.dtype != L.dtype:
        raise ValueError(f"B {tuple(B.shape)} {B.dtype} does not match L {tuple(L.shape)} {L.dtype}")
    Z = B.unsqueeze(1) if B.dim() == 1 else B
    spans = _blocks(n, block)
    flat = L.new_empty(min(block, n) ** 2)
    for j0, j1 in spans:  # forward: L y = b
        Ljj = torch.tril(L[j0:j1, j0:j1], out=_view(flat, j1 - j0, j1 - j0))
        Z[j0:j1].copy_(torch.linalg.solve_triangular(Ljj, Z[j0:j1], upper=False))
        if j1 < n:
            Z[j1:n].addmm_(L[j1:n, j0:j1], Z[j0:j1], alpha=-1)
    for j0, j1 in reversed(spans):  # back: L^T z = y, with L^T[i, j] = L[j, i]^T
        Ljj = torch.tril(L[j0:j1, j0:j1], out=_view(flat, j1 - j0, j1 - j0))
        Z[j0:j1].copy_(torch.linalg.solve_triangular(Ljj.mT, Z[j0:j1], upper=True))
        if j0 > 0:
            Z[0:j0].addmm_(L[j0:j1, 0:j0].mT, Z[j0:j1], alpha=-1)
    return B


def kernel_solve_(
    K: torch.Tensor,
    Y: torch.Tensor,
    *,
    ridge: float = 0.0,
    relative: bool = True,
    max_tries: int = 8,
    block: int = 2048,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, float, list[str]]:
    """Solve (K + r I) alpha = Y in place: K (N, N) float32/float64, Y (N, m) or (N,).

    -> (alpha, like Y's shape, in K's dtype; r, the absolute ridge used; notes, one line per
    raise of the ridge). r = ridge * s if relative else ridge, with s = mean |diag K| (1 if 0).
    Only K's lower triangle (incl. diagonal) is read: it is first mirrored onto the strict upper
    triangle (one pass over K, a few % of the factorization time), the copy a retry restores from.
    K IS DESTROYED: on return its lower triangle holds the Cholesky factor of K + r I, its strict
    upper triangle the original (lower) K transposed. Y is not modified. When the factorization
    fails, K is restored (`restore_lower_`) and r raised: first to max(10 r, max(1e-10, eps) s)
    (eps of K's dtype: a smaller ridge would round away on the diagonal in float32), then x10,
    for at most max_tries factorizations in all; then NumericalError. `progress` as in
    `cholesky_inplace_`, starting over at each try. Extra memory: `solve_bytes`.
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _check_kernel(K)
    if Y.dim() not in (1, 2) or Y.shape[0] != K.shape[0]:
        raise ValueError(f"targets of shape {tuple(Y.shape)} do not match a kernel of shape {tuple(K.shape)}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    mirror_(K, to_lower=False, block=block)  # the upper triangle: the copy a retry restores from
    diag = K.diagonal().clone()
    scale = diag.abs().double().mean().item() if diag.numel() else 1.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    r = ridge * scale if relative else float(ridge)
    floor = max(1e-10, torch.finfo(K.dtype).eps) * scale
    notes: list[str] = []
    for attempt in range(max_tries):
        if r > 0:
            K.diagonal().add_(r)
        if cholesky_inplace_(K, block=block, progress=progress):
            break
        restore_lower_(K, diag, block=block)
        if attempt == max_tries - 1:
            raise NumericalError(
                f"kernel is not positive definite even with ridge {r:.3g} (relative {r / scale:.3g}) "
                f"after {max_tries} Cholesky tries; raise the ridge (or check the kernel for NaN/inf)"
            )
        raised = max(10 * r, floor)
        notes.append(
            f"Cholesky failed at ridge {r:.3g} (relative {r / scale:.3g}); "
            f"raised to {raised:.3g} (relative {raised / scale:.3g})"
        )
        r = raised
    alpha = cho_solve_inplace_(K, Y.to(K.dtype, copy=True), block=block)
    if not torch.isfinite(alpha).all():
        raise NumericalError(f"kernel solve at ridge {r:.3g} gave NaN or inf; raise the ridge")
    return alpha, r, notes


def solve_bytes(n: int, m: int, itemsize: int, block: int = 2048) -> int:
    """Estimated peak memory of `kernel_solve_` beyond K itself, in bytes, for K (n, n) and Y
    (n, m) of `itemsize`-byte floats: the saved diagonal (n), the solution and its finiteness
    mask (n m), three block x block workspaces, a boolean block mask, a (block, m) solve block,
    and 64 MiB for BLAS buffers and the allocator. Nothing grows like n^2 or n block.

    Measured (peak RSS, /proc VmHWM, block 2048, torch 2.13 CPU/MKL): the extra over K is 0.4-0.85
    of this estimate at n = 8000-12000, m = 10-1000, float32 and float64, retries included.
    """
    b = min(block, n)
    return n * itemsize + n * m * (itemsize + 1) + (3 * b + m) * b * itemsize + b * b + 64 * 2**20
