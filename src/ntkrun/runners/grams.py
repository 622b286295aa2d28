"""Grams of an architecture's limiting kernels on one set of points, row block by row block, each
block checkpointed where there is more than one, so a killed unit resumes at its last block."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ntkrun.architectures.base import Architecture
from ntkrun.linalg import empty_checked, mirror_
from ntkrun.work import Progress, UnitContext

LOG = logging.getLogger("ntkrun")


def checkpointed_grams(
    description: Architecture,
    kinds: Sequence[str],
    X: torch.Tensor,
    dtype: torch.dtype,
    rows: int,
    ctx: UnitContext,
    name: str,
    progress: Progress,
) -> list[torch.Tensor]:
    """The Gram of each of `kinds` ("ntk", "nngp") on X (N, n0) -> (N, N) in `dtype`, by blocks of
    `rows` rows (their upper triangle, one `description.kernels` call for all kinds, then mirrored).
    A Gram of more than one block saves each block, of every kind, as checkpoint part rows<r0> of
    unit `name`; a saved part of the right shape is read instead of computed."""
    n = X.shape[0]
    Ks = empty_checked([(n, n)] * len(kinds), dtype, "cpu", f"{name}: the Gram")
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        part = f"rows{r0}"
        saved = ctx.load_checkpoint(name, part) if n > rows else None  # None if of another spec or data
        if saved is not None and len(kinds) == 1 and "block" in saved:  # written before kinds were keys
            saved = {kinds[0]: saved["block"]}
        blocks = [saved.get(kind) for kind in kinds] if saved is not None else []
        if blocks and all(b is not None and b.shape == (r1 - r0, n - r0) for b in blocks):
            for K, block in zip(Ks, blocks, strict=True):
                K[r0:r1, r0:] = block
            LOG.info("%s: Gram rows %d-%d from their checkpoint", name, r0, r1)
        else:
            description.kernels(X, None, kinds=kinds, out_dtype=dtype, outs=Ks, rows=(r0, r1))
            if n > rows:
                state = {kind: K[r0:r1, r0:].clone() for kind, K in zip(kinds, Ks, strict=True)}
                ctx.save_checkpoint(name, state, part)
        cost = description.kernel_flops(r1 - r0, n - (r0 + r1) / 2)  # the upper triangle
        progress.advance(f"{name}: Gram rows {r1}/{n}", cost)
    for K in Ks:
        mirror_(K, to_lower=True)
    return Ks
