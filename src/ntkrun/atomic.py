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
