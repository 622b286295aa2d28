"""The fixed tile grid every limiting-kernel Gram is computed on.

BLAS and torch's vectorized loops pick their kernels, their scalar tails and their thread chunks
by an operation's shape (and the CPU: AVX2 and AVX-512 differ): the same entry computed inside a
block of another shape can come out with other last bits. So a Gram is computed tile by tile, on
a grid fixed by the Gram's size alone: tiles start at multiples of their edges, and each tile is
computed whole, with the same shapes, whatever range of rows was asked for (a unit's block, a
checkpoint part, `rows=`). An entry then comes out of the same arithmetic however the Gram's rows
were split, and a row block is bit for bit that block of the whole Gram (given the same machine
and number of threads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """One tile of the grid: its rows and columns in the Gram, and which of its rows (`keep`,
    tile-local) fall inside the asked range (`out`, the same rows in the Gram)."""

    rows: slice
    cols: slice
    keep: slice
    out: slice

    @property
    def whole(self) -> bool:
        """Every row of the tile was asked for."""
        return self.keep == slice(0, self.rows.stop - self.rows.start)


def grid(
    n1: int, n2: int, tile_rows: int, tile_cols: int, symmetric: bool, rows: tuple[int, int] | None = None
) -> list[Tile]:
    """The tiles of an (n1, n2) Gram meeting rows r0 .. r1 (all rows by default), row-major.

    Tiles are tile_rows x tile_cols at multiples of them (the last ones in a row or a column are
    cut by the Gram's edge). A symmetric Gram (X2 = X) has only the tiles on and above the
    diagonal: a row tile's columns start at its first row."""
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile edges must be >= 1, got {tile_rows} x {tile_cols}")
    r0, r1 = rows if rows is not None else (0, n1)
    if not 0 <= r0 <= r1 <= n1:
        raise ValueError(f"rows must satisfy 0 <= r0 <= r1 <= {n1}, got {rows}")
    tiles = []
    for t0 in range((r0 // tile_rows) * tile_rows, r1, tile_rows):
        t1 = min(t0 + tile_rows, n1)
        a, b = max(r0, t0), min(r1, t1)
        for c0 in range(t0 if symmetric else 0, n2, tile_cols):
            cols = slice(c0, min(c0 + tile_cols, n2))
            tiles.append(Tile(slice(t0, t1), cols, slice(a - t0, b - t0), slice(a, b)))
    return tiles


def block_rows(
    out: torch.Tensor, shape: tuple[int, int], rows: tuple[int, int] | None, dtype: torch.dtype
) -> int:
    """Where a Gram (N1, N2) = `shape`'s rows go in `out`: the whole Gram's (N1, N2) (-> 0), or,
    with rows=(r0, r1), that block alone, (r1 - r0, N2) (-> r0: Gram row i is out's row i - r0),
    so a unit computing a row block never holds the whole Gram. Raises ValueError otherwise."""
    n1, n2 = shape
    block = (rows[1] - rows[0], n2) if rows is not None else shape
    if out.dtype != dtype or tuple(out.shape) not in (shape, block):
        wanted = f"({n1}, {n2})" + (f" or ({block[0]}, {n2})" if block != shape else "")
        raise ValueError(f"out must be a {wanted} {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    return 0 if tuple(out.shape) == shape else rows[0]  # type: ignore[index]
