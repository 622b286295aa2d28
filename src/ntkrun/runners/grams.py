"""Grams of an architecture's limiting kernels on one set of points, row block by row block, and
their rows against test points, chunk by chunk. A block is a checkpoint part of the unit that
solves with the Gram: saved there by that unit as it goes (a killed unit resumes at its last
block) or, with kernels.rows_per_unit, by a unit of its own (`gram_block`, `test_block`: a pool's
worker or a SLURM task), and read back memory-mapped. Every number is the same however the rows
are split (ntkrun.kernels.tiles; test chunks start at multiples of TEST_CHUNK)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ntkrun.architectures.base import Architecture
from ntkrun.errors import RunError
from ntkrun.iterative import UpperStrips
from ntkrun.linalg import empty_checked, mirror_
from ntkrun.work import Progress, UnitContext

LOG = logging.getLogger("ntkrun")
TEST_CHUNK = 1000  # test points per kernel call and per product with alpha


def spans(n: int, rows: int) -> list[tuple[int, int]]:
    """(r0, r1) of each block of `rows` rows of n."""
    return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]


def test_rows(rows: int) -> int:
    """Rows of a test block: `rows` rounded up to whole TEST_CHUNKs, so a block's chunks are the
    one-unit run's."""
    return math.ceil(rows / TEST_CHUNK) * TEST_CHUNK


def gram_block(
    description: Architecture, kinds: Sequence[str], X: torch.Tensor, dtype: torch.dtype, r0: int, r1: int
) -> dict[str, torch.Tensor]:
    """Rows r0 .. r1 of each kind's Gram on X (N, n0), their upper triangle: {kind: (r1 - r0, N - r0)}
    in `dtype` (left of the diagonal, inside the block, is not meaningful)."""
    blocks = description.kernels(X, None, kinds=kinds, out_dtype=dtype, rows=(r0, r1))
    return {kind: block[:, r0:].clone() for kind, block in zip(kinds, blocks, strict=True)}


def test_block(
    description: Architecture, kinds: Sequence[str], Xt: torch.Tensor, X: torch.Tensor, t0: int, t1: int
) -> dict[str, torch.Tensor]:
    """Each kind's kernel between test points t0 .. t1 (t0 a multiple of TEST_CHUNK) and X (N, n0):
    {kind: (t1 - t0, N)} in float64, computed TEST_CHUNK rows at a time."""
    shape = [(t1 - t0, X.shape[0])] * len(kinds)
    out = dict(zip(kinds, empty_checked(shape, torch.float64, "cpu", "a test block"), strict=True))
    for c0, c1 in spans(t1 - t0, TEST_CHUNK):
        found = description.kernels(Xt[t0 + c0 : t0 + c1], X, kinds=kinds)
        for kind, k in zip(kinds, found, strict=True):
            out[kind][c0:c1] = k
    return out


def _saved(
    ctx: UnitContext, name: str, part: str, kinds: Sequence[str], shape: tuple[int, int]
) -> list[torch.Tensor] | None:
    """The part's block of each kind if it is there, of this run, whole and of this shape; else None
    (it is computed again: never read)."""
    saved = ctx.load_checkpoint(name, part)
    if saved is not None and len(kinds) == 1 and "block" in saved:  # written before kinds were keys
        saved = {kinds[0]: saved["block"]}
    blocks = [saved.get(kind) for kind in kinds] if saved is not None else []
    if blocks and all(isinstance(b, torch.Tensor) and tuple(b.shape) == shape for b in blocks):
        return blocks
    return None


def checkpointed_grams(
    description: Architecture,
    kinds: Sequence[str],
    X: torch.Tensor,
    dtype: torch.dtype,
    rows: int,
    ctx: UnitContext,
    name: str,
    progress: Progress,
    saved_counts: bool = True,
    lower: bool = True,
) -> list[torch.Tensor]:
    """The Gram of each of `kinds` ("ntk", "nngp") on X (N, n0) -> (N, N) in `dtype`, by blocks of
    `rows` rows (their upper triangle, one `description.kernels` call for all kinds, then mirrored).
    A Gram of more than one block saves each block, of every kind, as checkpoint part rows<r0> of
    unit `name`; a saved part of the right shape is read instead of computed (memory-mapped, copied
    into the one Gram). saved_counts: a read block advances `progress` by its cost (False where
    block units computed it: their cost is theirs). lower: the upper triangle mirrored onto the lower
    one at the end (the Cholesky's input; conjugate gradients read the upper one only)."""
    n = X.shape[0]
    Ks = empty_checked([(n, n)] * len(kinds), dtype, "cpu", f"{name}: the Gram")
    for r0, r1 in spans(n, rows):
        blocks = _saved(ctx, name, f"rows{r0}", kinds, (r1 - r0, n - r0)) if n > rows else None
        cost = description.kernel_flops(r1 - r0, n - (r0 + r1) / 2)  # the upper triangle
        if blocks is not None:
            for K, block in zip(Ks, blocks, strict=True):
                K[r0:r1, r0:] = block
            LOG.info("%s: Gram rows %d-%d from their checkpoint", name, r0, r1)
            cost = cost if saved_counts else 0.0
        else:
            description.kernels(X, None, kinds=kinds, out_dtype=dtype, outs=Ks, rows=(r0, r1))
            if n > rows:
                state = {kind: K[r0:r1, r0:].clone() for kind, K in zip(kinds, Ks, strict=True)}
                ctx.save_checkpoint(name, state, f"rows{r0}")
        progress.advance(f"{name}: Gram rows {r1}/{n}", cost)
    for K in Ks if lower else []:
        mirror_(K, to_lower=True)
    return Ks


def strip_grams(
    description: Architecture,
    kinds: Sequence[str],
    X: torch.Tensor,
    dtype: torch.dtype,
    rows: int,
    ctx: UnitContext,
    name: str,
) -> list[UpperStrips]:
    """Each kind's Gram on X (N, n0) as its upper-triangle row strips of `rows` rows, never
    assembled: the parts rows<r0> of unit `name` memory-mapped, a part that is not there (or not
    whole) computed and saved first. For conjugate gradients out of core (docs/science.md §5.7)."""
    n, strips = X.shape[0], [[] for _ in kinds]
    for r0, r1 in spans(n, rows):
        blocks = _saved(ctx, name, f"rows{r0}", kinds, (r1 - r0, n - r0))
        if blocks is None:
            ctx.save_checkpoint(name, gram_block(description, kinds, X, dtype, r0, r1), f"rows{r0}")
            blocks = _saved(ctx, name, f"rows{r0}", kinds, (r1 - r0, n - r0))
        if blocks is None:  # (only where the checkpoint could not be read back: a full or failing disk)
            raise RunError(
                f"{name}: Gram rows {r0}-{r1} could not be read back after being saved; check the disk"
            )
        for strip, block in zip(strips, blocks, strict=True):
            strip.append((r0, block))
    LOG.info("%s: the Gram out of core: %d row strips of %d rows, memory-mapped", name, len(strips[0]), rows)
    return [UpperStrips(tuple(strip), n) for strip in strips]


def predictions(
    description: Architecture,
    kinds: Sequence[str],
    Xt: torch.Tensor,
    X: torch.Tensor,
    alphas: Sequence[torch.Tensor],
    ctx: UnitContext,
    name: str,
    rows: int | None,
) -> list[torch.Tensor]:
    """k(Xt, X) @ alpha for each kind: Xt (M, n0), X (N, n0), alphas (N, m) float64 -> (M, m),
    TEST_CHUNK test points at a time. With `rows` (kernels.rows_per_unit), the test blocks of
    `test_rows(rows)` rows saved by test-block units (checkpoint parts test<t0> of unit `name`) are
    read where whole; any other chunk is computed here."""
    m, n = Xt.shape[0], X.shape[0]
    block = test_rows(rows) if rows is not None and m > test_rows(rows) else m
    preds: list[list[torch.Tensor]] = [[] for _ in kinds]
    for t0, t1 in spans(m, block):
        saved = _saved(ctx, name, f"test{t0}", kinds, (t1 - t0, n)) if block < m else None
        if saved is not None:
            LOG.info("%s: test rows %d-%d from their block", name, t0, t1)
        for c0, c1 in spans(t1 - t0, TEST_CHUNK):
            if saved is not None:  # a fresh copy: the product's arithmetic is that of a computed chunk
                found = [b[c0:c1].clone() for b in saved]
            else:
                found = description.kernels(Xt[t0 + c0 : t0 + c1], X, kinds=kinds)
            for pred, k, alpha in zip(preds, found, alphas, strict=True):
                pred.append(k @ alpha)
    return [torch.cat(pred) for pred in preds]
