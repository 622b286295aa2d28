"""The one contract between an experiment's runner and the rest of ntkrun.

Each runner module ends with `RUNNER = Runner(...)`: its spec model, its results version, what
networks it runs, and five functions (units, run_unit, aggregate, memory, and optionally check,
data_files, shared). The record is checked when the module is imported (`Runner.__post_init__`):
a missing function, one of the wrong arity, an unknown architecture or a spec model of another
experiment is a TypeError naming the runner, not a silent default found at run time.

    units(spec) -> list[Unit]                     independent pieces of work (ntkrun.work)
    run_unit(spec, unit, ctx, progress) -> dict   one unit's result: tensors, lists and numbers,
                                                  a TypedDict of the runner's own per kind of work
    aggregate(spec, run, results) -> DataFrame    CSVs and figures from the saved results
                                                  (ntkrun.work.Results: by each unit's work)
    memory(spec, unit) -> bytes                   the unit's estimated peak memory
    check(spec)                                   preflight beyond the schema (data files, models)
    data_files(spec) -> [Path]                    the files whose content is part of the identity
    shared(spec) -> {work type: spec keys}        units a sweep's points share (ntkrun.sweep)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ntkrun.spec import ARCH_NAMES, RunSpec
from ntkrun.work import Progress, Results, Unit, UnitContext

if TYPE_CHECKING:
    import pandas as pd

    from ntkrun.rundir import RunDir


def no_check(spec: Any) -> None:
    """A runner with nothing to check beyond its spec's schema."""


def no_data_files(spec: Any) -> list[Path]:
    """A runner that reads no data files (its inputs are drawn from the seed)."""
    return []


def nothing_shared(spec: Any) -> dict[type, tuple[str, ...]]:
    """A runner none of whose units a sweep's points share."""
    return {}


# the positional parameters each function takes, checked at import
_ARITY = {
    "units": 1,
    "run_unit": 4,
    "aggregate": 3,
    "memory": 2,
    "check": 1,
    "data_files": 1,
    "shared": 1,
}


@dataclass(frozen=True)
class Runner:
    """What ntkrun.units, ntkrun.sweep and the CLI need of one experiment."""

    Spec: type[RunSpec]  # its spec model, whose `experiment` field names it
    results_version: int  # bumped by a change that alters its results (docs/architecture.md)
    inputs: str  # what its networks take, for the error that refuses another architecture
    units: Callable[[Any], list[Unit]]
    run_unit: Callable[[Any, Unit, UnitContext, Progress], dict[str, Any]]
    aggregate: Callable[[Any, RunDir, Results], pd.DataFrame]
    memory: Callable[[Any, Unit], int]
    archs: tuple[str, ...] = ("mlp",)  # the network.arch values it runs
    modules: bool = False  # runs a network.module (the user's model: its limit by Monte Carlo)
    layers: bool = False  # runs a network.layers composition (ntkrun.layers: its exact limit)
    check: Callable[[Any], None] = no_check
    data_files: Callable[[Any], list[Path]] = no_data_files
    shared: Callable[[Any], dict[type, tuple[str, ...]]] = nothing_shared

    @property
    def experiment(self) -> str:
        return str(self.Spec.model_fields["experiment"].default)

    def __post_init__(self) -> None:
        where = f"runner of {self.Spec.__name__ if isinstance(self.Spec, type) else self.Spec!r}"
        if not (isinstance(self.Spec, type) and issubclass(self.Spec, RunSpec)):
            raise TypeError(f"{where}: Spec must be a RunSpec model")
        if not isinstance(self.Spec.model_fields["experiment"].default, str):
            raise TypeError(f"{where}: Spec.experiment must default to the experiment's name")
        where = f"runner {self.experiment!r}"
        if not (isinstance(self.results_version, int) and self.results_version >= 1):
            raise TypeError(f"{where}: results_version must be an int >= 1, got {self.results_version!r}")
        unknown = [a for a in self.archs if a not in ARCH_NAMES] or (not self.archs and ["none"])
        if unknown:
            raise TypeError(
                f"{where}: archs: unknown architecture {unknown[0]!r} (known: {', '.join(ARCH_NAMES)})"
            )
        for field in fields(self):
            if field.name in _ARITY:
                _check_arity(where, field.name, getattr(self, field.name), _ARITY[field.name])


def _check_arity(where: str, name: str, fn: Any, n: int) -> None:
    """TypeError unless `fn` is a callable that takes `n` positional arguments."""
    if not callable(fn):
        raise TypeError(f"{where}: {name} is not a function")
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        raise TypeError(
            f"{where}: {name}{inspect.signature(fn)} does not take {n} positional arguments"
        ) from None
