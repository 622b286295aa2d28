"""Files written whole or not at all: under a temporary name beside the target, renamed into
place (atomic on POSIX), so no reader ever sees a partial file under its final name. Imports
nothing of ntkrun."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """This process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: Path, write: Callable[[Path], object], *, exclusive: bool = False) -> Path:
    """write(tmp) into a temporary file beside `target`, then rename it over `target`; with
    `exclusive`, link it there instead, raising FileExistsError if `target` exists (of two
    processes creating it at once, exactly one succeeds, and readers only see it whole).

    A failure (a full disk, a signal) leaves `target` as it was and removes the temporary file.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~umask())  # mkstemp's 0600 would hide results from collaborators
        write(tmp)
        if exclusive:
            os.link(tmp, target)
            tmp.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


SETTLE_BYTES = 2**26  # files from this size on are written through (a Gram block is ~1 GB)


def settle(path: Path, min_bytes: int = SETTLE_BYTES) -> Path:
    """A large file's pages written to disk now and dropped from the page cache. Left to the
    kernel's writeback, the 7.4 GB of a 60000-point Gram's checkpoint blocks were flushed while
    the solve ran and slowed it: CG's 167 iterations took 461.7 s after them, 347.8 s without them
    (benchmarks/bench_floor.py). Smaller files are left as they are."""
    if path.stat().st_size >= min_bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):  # (Linux; not on macOS)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return path
