"""The `ntkrun` command's entry point. Signal handling is set up before the heavy imports
(torch takes seconds), and signals are held during them, so Ctrl-C or SIGTERM at any moment ends
the command cleanly."""

from __future__ import annotations

import signal
import sys


class Stop(BaseException):
    """A signal asked the command to stop. Not a KeyboardInterrupt, so that the CLI framework
    does not swallow it: ntkrun's own handlers mark the run failed, keep its partial files and
    say how to resume."""

    code = 130
    reason = "interrupted"


class Interrupted(Stop):
    """SIGINT (Ctrl-C)."""


class Terminated(Stop):
    """SIGTERM (a scheduler, `kill`)."""

    code = 143
    reason = "terminated (SIGTERM)"


def signal_code(e: BaseException) -> int:
    """The shell's exit status for a command ended by the signal: 128 + signal number."""
    return e.code if isinstance(e, Stop) else 130


def stopped(e: BaseException) -> str:
    return e.reason if isinstance(e, Stop) else "interrupted"


def _raise(signum: int, frame: object) -> None:
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def signal_in(err: BaseException) -> BaseException | None:
    """The Stop or KeyboardInterrupt that caused `err`, if any: a signal arriving while a C
    extension initializes surfaces as, e.g., ImportError("initialization failed") raised from it."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, (Stop, KeyboardInterrupt)):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


def main() -> None:
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)
    try:
        # Signals are held while torch & co. load: an exception raised inside their C++ import
        # code aborts the interpreter (pybind11 -> std::terminate, seen in tests). A signal that
        # came meanwhile is delivered when the mask is restored, here, as a clean Stop.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            from ntkrun.cli import app
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        app()
    except SystemExit:
        raise
    except BaseException as err:  # outside a run (runs report themselves): e.g. start-up
        stop = signal_in(err)
        if stop is None:
            raise
        sys.stderr.write(f"ntkrun: {stopped(stop)}\n")
        sys.exit(signal_code(stop))
