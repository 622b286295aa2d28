"""The `ntkrun` command's entry point. Signal handling is set up before the heavy imports
(torch takes seconds), and signals are held during them, so Ctrl-C or SIGTERM at any moment ends
the command cleanly."""

from __future__ import annotations

import sys

from ntkrun import signals
from ntkrun.errors import signal_code, signal_in, stopped


def main() -> None:
    signals.install()
    try:
        # Signals are held while torch & co. load: an exception raised inside their C++ import
        # code aborts the interpreter (pybind11 -> std::terminate, seen in tests). A signal that
        # came meanwhile is delivered when the mask is restored, here, as a clean Stop.
        with signals.deferred():
            from ntkrun.cli import app
        app()
    except SystemExit:
        raise
    except BaseException as err:  # outside a run (runs report themselves): e.g. start-up
        stop = signal_in(err)
        if stop is None:
            raise
        sys.stderr.write(f"ntkrun: {stopped(stop)}\n")
        sys.exit(signal_code(stop))
