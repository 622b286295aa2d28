"""Where units run: this process (inline), a local process pool (local), or SLURM job arrays
(slurm), behind one interface (ntkrun.executors.base.Executor) chosen by `make_executor`."""

from __future__ import annotations

from collections.abc import Callable

from ntkrun.executors.base import Dispatch, Executor
from ntkrun.executors.inline import InlineExecutor
from ntkrun.executors.local import LocalExecutor
from ntkrun.executors.slurm import SlurmExecutor

__all__ = ["Dispatch", "Executor", "make_executor"]


def make_executor(
    kind: str, *, jobs: int = 1, wait: bool = False, notify: Callable[[str], None] = lambda _: None
) -> Executor:
    """The executor of the spec's executor.kind."""
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "slurm":
        return SlurmExecutor(wait, notify)
    return InlineExecutor()
