"""Lock files: who runs a run (RUNNING) and who aggregates it (aggregate.lock).

A lock holds "host pid start-time", is written whole (temporary file, then a hard link to its
name) and is released only by its holder. On this host a lock whose process is gone is stale; from
another host, one older than the caller's `stale_after`.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

from ntkrun.errors import LockedError

LOG = logging.getLogger("ntkrun")
RUNNING = "RUNNING"  # the process running a run (inline or local executor)
AGGREGATE_LOCK = "aggregate.lock"  # the one process aggregating a shared run
STALE_LOCK_S = 3600.0  # an aggregation lock from another host older than this is from a dead process


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), so that a
    reused pid is not taken for the lock's holder; "" where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _start_time(pid) in ("", start)


def my_lock_text() -> str:
    pid = os.getpid()
    return f"{platform.node()} {pid} {_start_time(pid)}".strip()


def lock_holder(lock: Path, stale_after: float | None = None, remove: bool = True) -> str | None:
    """Who holds the lock file ("host pid"), or None if nobody does. On this host a lock is
    stale when its process is gone (pid and start time); from another host, when older than
    `stale_after` seconds (None: never, the message names the file to delete by hand). A stale
    lock is removed (unless remove=False, for read-only commands)."""
    try:
        text, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    host, pid, start = ([*text.split(), "", "", ""])[:3]
    if host == platform.node() and pid.isdigit():
        stale = not _alive(int(pid), start)
    else:
        stale = stale_after is not None and age > stale_after
    if not stale:
        return f"{host} {pid}".strip() or "unknown"
    if remove:
        _remove_stale(lock, text)
    return None


def _remove_stale(lock: Path, text: str) -> None:
    """Remove `lock` if it still holds `text`: moved aside first, so that a fresh lock another
    process took meanwhile is put back, never deleted."""
    aside = lock.with_name(f".{lock.name}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if aside.read_text().strip() == text:
        LOG.warning("%s: removed a stale lock (%s)", lock, text)
    else:
        try:
            os.link(aside, lock)  # not ours to remove: back under its name unless taken again
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def acquire(lock: Path, what: str, stale_after: float | None = None) -> None:
    """Create `lock` holding "host pid start" atomically (written to a temporary file, then
    hard-linked to the lock's name: the lock is never empty); LockedError if it is held."""
    text = my_lock_text()
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                return
            except FileExistsError:
                holder = lock_holder(lock, stale_after)
                if holder is not None:
                    raise LockedError(
                        f"{lock.parent}: {what} by {holder} (if that process is gone, delete {lock})"
                    ) from None
        raise LockedError(f"{lock}: cannot take the lock")
    finally:
        tmp.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove `lock` if this process holds it (never another process's)."""
    try:
        if lock.read_text().strip() == my_lock_text():
            lock.unlink(missing_ok=True)
    except (FileNotFoundError, NotADirectoryError):
        pass
