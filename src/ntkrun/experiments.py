"""One record per experiment: everything the rest of ntkrun needs to know about it.

Adding an experiment = a runner module under ntkrun/runners/ that ends with its `RUNNER` record
(ntkrun.runners.contract: its spec model, units, run_unit, aggregate, memory, ...), its presets
under configs/<name>/, and one record below. The CLI command, its flags, `resume`, `status` and
`show` are made from the record. Runner modules are imported only when a spec is resolved, so
`ntkrun --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ntkrun.errors import SpecError
from ntkrun.presets import presets_of
from ntkrun.spec import RunSpec, load_spec, read_yaml

if TYPE_CHECKING:
    from ntkrun.runners.contract import Runner


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one spec key."""

    name: str  # --width
    path: tuple[str, ...]  # the spec key it sets: ("network", "width")
    type: Any  # its Python type for the CLI, e.g. list[int]
    help: str
    on_resume: bool = False  # may be given to `ntkrun resume` (it changes no result: executor.*, data.dir)


@dataclass(frozen=True)
class Experiment:
    name: str
    module: str  # the runner module, whose RUNNER record (ntkrun.runners.contract) runs it
    help: str
    summary_tables: tuple[str, ...] = ("metrics.csv",)  # printed after a run and by `show`
    flags: tuple[Flag, ...] = ()  # flags of this experiment only, besides SHORTCUTS

    @property
    def runner(self) -> Runner:
        """The runner's record, checked when its module was imported; TypeError if it has none or
        if it runs another experiment."""
        record = getattr(importlib.import_module(self.module), "RUNNER", None)
        if record is None or record.experiment != self.name:
            raise TypeError(f"{self.module}: no RUNNER record of experiment {self.name!r}")
        return record

    @property
    def model(self) -> type[RunSpec]:
        return self.runner.Spec

    @property
    def presets(self) -> dict[str, Path]:
        return presets_of(self.name)

    @property
    def all_flags(self) -> tuple[Flag, ...]:
        return (*SHORTCUTS, *self.flags, *EXECUTOR_FLAGS)


SHORTCUTS = (
    Flag("--width", ("network", "width"), list[int], "Hidden width, repeatable (network.width)."),
    Flag("--seeds", ("seeds",), int, "Number of seeds (trials per width for pca)."),
    Flag("--steps", ("training", "steps"), int, "GD steps (training.steps)."),
)
EXECUTOR_FLAGS = (
    Flag("--executor", ("executor", "kind"), str, "Where units run: inline (default), local or slurm.", True),
    Flag("--jobs", ("executor", "jobs"), int, "Worker processes of --executor local.", True),
    Flag("--slurm-partition", ("executor", "slurm", "partition"), str, "slurm: partition.", True),
    Flag("--slurm-gpus", ("executor", "slurm", "gpus"), int, "slurm: GPUs per unit.", True),
    Flag("--slurm-time", ("executor", "slurm", "time"), int, "slurm: time limit per unit, minutes.", True),
    Flag(
        "--slurm-array-parallelism",
        ("executor", "slurm", "array_parallelism"),
        int,
        "slurm: array tasks running at once.",
        True,
    ),
)

# Where the IDX files are: not part of a run's identity (data are identified by their content), so a
# resume may point at a moved copy of the same files.
DATA_DIR_FLAG = Flag("--data-dir", ("data", "dir"), Path, "Folder of the IDX files: data.dir.", True)

EXPERIMENTS = {
    record.name: record
    for record in (
        Experiment(
            "convergence",
            "ntkrun.runners.convergence",
            "NTK convergence with width and during training (paper Figure 1). Default preset: paper.",
        ),
        Experiment(
            "regression",
            "ntkrun.runners.regression",
            "Trained networks vs the limiting Gaussian process (paper Figure 2). Default preset: paper.",
            flags=(Flag("--kernel", ("kernel",), str, "Limit kernel: analytic or empirical."),),
        ),
        Experiment(
            "scaling",
            "ntkrun.runners.scaling",
            "Convergence rates in width: NTK at init, its change in training, distance to the linear model.",
            summary_tables=("fits.csv",),
        ),
        Experiment(
            "pca",
            "ntkrun.runners.pca",
            "MNIST kernel principal components and convergence along them (paper Figure 3).",
            flags=(DATA_DIR_FLAG,),
        ),
        Experiment(
            "generalization",
            "ntkrun.runners.generalization",
            "Test accuracy of NTK/NNGP predictors vs trained nets on a whole dataset. Default preset: full.",
            summary_tables=("accuracy.csv", "fits.csv"),
            flags=(DATA_DIR_FLAG,),
        ),
        Experiment(
            "features",
            "ntkrun.runners.features",
            "Where the kernel regime ends: kernel change vs width (NTK, muP), output scale, depth/width.",
            summary_tables=("fits.csv",),
            flags=(DATA_DIR_FLAG,),
        ),
    )
}


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise SpecError(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
    return EXPERIMENTS[name]


def experiment_of(run_dir: Path) -> Experiment:
    """The record of the experiment named in a run directory's spec.yaml. Raises SpecError."""
    path = Path(run_dir) / "spec.yaml"
    if not path.is_file():
        raise SpecError(f"{run_dir}: not a run directory (no spec.yaml)")
    name = read_yaml(path).get("experiment")
    if name not in EXPERIMENTS:
        raise SpecError(f"{path}: experiment: unknown experiment {name!r}")
    return EXPERIMENTS[name]


def load_run_spec(run_dir: Path, sets: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """The spec a run directory was made with (its spec.yaml), with optional --set overrides
    (for the executor block). Raises SpecError."""
    return load_spec(experiment_of(run_dir).model, config=Path(run_dir) / "spec.yaml", sets=sets)


def spec_of(name: str, **sources: Any) -> RunSpec:
    """The validated spec of experiment `name` from preset / config / sets / overrides (see
    ntkrun.spec.load_spec). Raises SpecError."""
    return load_spec(get(name).model, **sources)
