"""SIGINT and SIGTERM as exceptions (ntkrun.errors.Stop), and holding them around work that
must happen whole (renames that go together, heavy C-extension imports)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ntkrun.errors import Interrupted, Terminated

HELD = (signal.SIGINT, signal.SIGTERM)


def _raise(signum: int, frame: object) -> None:
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def install() -> None:
    """SIGINT raises Interrupted, SIGTERM raises Terminated."""
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends; the first one that came meanwhile is then
    handled as it would have been (its handler runs, or its default action is taken).

    The handlers are swapped for ones that only take note, rather than the signals being masked:
    a mask holds a signal for the calling thread only, and the kernel hands a process-directed
    signal to any thread that does not mask it (torch's worker threads), after which Python runs
    its handler in the main thread all the same. Outside the main thread (where handlers cannot
    be set) the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])
