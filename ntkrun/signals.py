"""SIGINT and SIGTERM as exceptions (ntkrun.errors.Stop), and holding them around work that
must happen whole (renames that go together, heavy C-extension imports)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from ntkrun.errors import Interrupted, Terminated

HELD = {signal.SIGINT, signal.SIGTERM}


def _raise(signum: int, frame: object) -> None:
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def install() -> None:
    """SIGINT raises Interrupted, SIGTERM raises Terminated."""
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends; one that came meanwhile is delivered then."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
