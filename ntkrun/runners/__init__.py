"""Experiment runners: each turns a validated spec into the files of a run directory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import pandas as pd
import torch

from ntkrun.runs import RunDir
from ntkrun.spec import RunSpec


class Progress(Protocol):
    """What a runner reports to: total work up front, then advances with a description."""

    def start(self, total: float) -> None: ...

    def advance(self, description: str, amount: float) -> None: ...


class NoProgress:
    def start(self, total: float) -> None:
        pass

    def advance(self, description: str, amount: float) -> None:
        pass


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or kernel."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


Runner = Callable[[RunSpec, RunDir, Progress], pd.DataFrame]


def get_runner(experiment: str) -> Runner:
    """The `execute(spec, run, progress) -> metrics` function of an experiment."""
    if experiment == "convergence":
        from ntkrun.runners.convergence import execute

        return execute  # type: ignore[return-value]
    raise ValueError(f"no runner for experiment {experiment!r}")
