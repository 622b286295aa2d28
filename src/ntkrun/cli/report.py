"""What the CLI shows: one-line errors (mapped from exceptions in one place), tables, progress."""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ntkrun import signals
from ntkrun.errors import NtkrunError, Stop, signal_code, stopped

if TYPE_CHECKING:
    import pandas as pd

# Piped or logged (a batch script), tables print whole: rich would otherwise cut them to 80 columns.
WIDE = None if sys.stdout.isatty() else 10_000
out = Console(soft_wrap=True, width=WIDE)
err = Console(stderr=True, soft_wrap=True)
DEBUG_ENV = "NTKRUN_DEBUG"  # =1: an unexpected exception shows its traceback


def heavy(module: str) -> ModuleType:
    """Import a module that loads torch & co. when a command first needs it (so `ntkrun --help`
    stays fast), with SIGINT/SIGTERM held meanwhile: a signal raised inside C++ import code
    aborts the interpreter."""
    with signals.deferred():
        return importlib.import_module(module)


def say(text: str) -> None:
    """One line on stdout, printed as is."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    lines = str(message).strip().splitlines() or [""]
    err.print(f"ntkrun: error: {lines[0]}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def internal_error(e: Exception) -> NoReturn:
    """A bug: one line naming the exception and where its traceback went; exit 1."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exc()
        raise typer.Exit(1)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    path = os.path.join(tempfile.gettempdir(), f"ntkrun-traceback-{stamp}-{os.getpid()}.txt")
    with open(path, "w") as fh:
        traceback.print_exc(file=fh)
    first = (str(e).strip().splitlines() or [""])[0]
    err.print(
        f"ntkrun: internal error (a bug in ntkrun): {type(e).__name__}: {first} "
        f"(traceback in {path}; {DEBUG_ENV}=1 shows it)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


F = TypeVar("F", bound=Callable[..., Any])


def reported(command: F) -> F:
    """Every command's errors, mapped in one place: an NtkrunError is its one-line message and
    exit code, a signal its 128 + n, anything else an internal error."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except NtkrunError as e:
            fail(str(e), e.exit_code)
        except (KeyboardInterrupt, Stop) as e:
            fail(stopped(e), signal_code(e))
        except Exception as e:
            internal_error(e)

    return wrapper  # type: ignore[return-value]


class RichProgress:
    """A progress bar on stderr, weighted by work, with ETA."""

    def __init__(self, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err,
            disable=not enabled,
        )
        self.task = self.bar.add_task("starting", total=None)

    def start(self, total: float) -> None:
        self.bar.update(self.task, total=total)

    def advance(self, description: str, amount: float) -> None:
        self.bar.update(self.task, description=description, advance=amount)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in frame.columns:
        table.add_column(str(col), justify="right")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else str(v) for v in row])
    return table
