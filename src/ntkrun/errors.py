"""Every error ntkrun reports, under one base class that carries the process exit code.

User errors (a bad spec, missing data, a spec that would not fit) exit 2; trouble inside a run
(divergence, a dead worker, a held lock) exits 1; signals exit 128 + the signal number. The CLI
maps these in one place; anything else is a bug and is reported as one. Imports nothing of ntkrun.
"""

from __future__ import annotations


class NtkrunError(Exception):
    """An error with a one-line message meant for the user, and the exit code to leave with."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


# ---------------------------------------------------------------- bad input: exit 2


class SpecError(NtkrunError):
    """A spec could not be read or is invalid; the message names source, key and reason."""


class DataError(NtkrunError):
    """Data missing, corrupt, or unable to satisfy the spec; the message says how to fix it."""


class ResourceError(NtkrunError, MemoryError):
    """A spec, or one allocation, needs more memory than is available (ntkrun.memory): refused
    before anything is allocated. Also a MemoryError, for library callers that catch that."""


class NumericalRangeError(NtkrunError):
    """The network's kernels would underflow or overflow in the spec's dtype."""


class UnitSpecMismatchError(NtkrunError):
    """A run directory or unit file belongs to another spec."""


# ---------------------------------------------------------------- trouble inside a run: exit 1


class RunError(NtkrunError):
    """Something went wrong while running; the run's partial results are kept."""

    exit_code = 1


class DivergenceError(RunError):
    """Training produced a non-finite loss or kernel."""


class NumericalError(RunError):
    """A computation has no finite answer (a singular kernel at t = inf, a diverging GD rate,
    a power iteration that does not converge)."""


class ExecutorError(RunError):
    """Units could not be run: a worker died, the scheduler failed, aggregation is locked."""


class LockedError(RunError):
    """A lock file is held by a live process."""


class IncompleteRunError(RunError):
    """Aggregation was asked for while units are missing."""

    def __init__(self, missing: list[str]) -> None:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        super().__init__(f"{len(missing)} unit(s) not done: {shown}")
        self.missing = missing


class DownloadError(RunError):
    """A dataset could not be downloaded from any mirror."""


# ---------------------------------------------------------------- signals


class Stop(BaseException):
    """A signal asked the command to stop. Not a KeyboardInterrupt, so that the CLI framework
    does not swallow it: ntkrun marks the run failed, keeps its partial files and says how to
    resume."""

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
    """What stopped the command, in words."""
    return e.reason if isinstance(e, Stop) else "interrupted"


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
