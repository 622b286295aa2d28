"""Command-line interface: parses arguments and hands them to spec, runners and runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, NoReturn

import pandas as pd
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ntkrun import executors, resources, runners
from ntkrun.data import MNIST_MIRRORS, DataError, check_mnist, download_mnist, resolve_data_dir
from ntkrun.entry import Stop, signal_code, stopped
from ntkrun.runners import DivergenceError, Unit, preflight, resolve_device
from ntkrun.runs import (
    RUNNING,
    LockedError,
    RunDir,
    UnitSpecMismatchError,
    is_complete,
    latest_run,
    lock_holder,
    open_run,
)
from ntkrun.spec import (
    EXPERIMENTS,
    RunSpec,
    SpecError,
    list_presets,
    load_run_spec,
    load_spec,
    preset_description,
    read_yaml,
    spec_hash,
)

app = typer.Typer(
    help="Experiment runner for the Neural Tangent Kernel (Jacot, Gabriel & Hongler 2018).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain usage errors: "Error: Invalid value for '--width': ..."
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


SUMMARY_TABLES = ("metrics.csv", "fits.csv")  # what `show` and a finished run print


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"ntkrun: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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


@dataclass
class RunOptions:
    """The options every experiment command has, beyond its spec shortcuts."""

    preset: str | None = None
    config: Path | None = None
    set_: list[str] | None = None
    output_root: Path | None = None
    quiet: bool = False
    executor: str | None = None
    jobs: int | None = None
    unit: list[str] | None = None
    run_dir: Path | None = None
    wait: bool = False
    list_units: bool = False
    check: bool = False
    force: bool = False
    slurm_partition: str | None = None
    slurm_gpus: int | None = None
    slurm_time: int | None = None
    slurm_array_parallelism: int | None = None

    @classmethod
    def take(cls, values: dict[str, Any]) -> RunOptions:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def overrides(self) -> dict[tuple[str, ...], Any]:
        """Spec overrides from the executor flags."""
        found: dict[tuple[str, ...], Any] = {}
        for path, value in (
            (("executor", "kind"), self.executor),
            (("executor", "jobs"), self.jobs),
            (("executor", "slurm", "partition"), self.slurm_partition),
            (("executor", "slurm", "gpus"), self.slurm_gpus),
            (("executor", "slurm", "time"), self.slurm_time),
            (("executor", "slurm", "array_parallelism"), self.slurm_array_parallelism),
        ):
            if value is not None:
                found[path] = value
        return found


def run_experiment(
    experiment: str,
    opts: RunOptions,
    overrides: dict[tuple[str, ...], Any],
    resume: Path | None = None,
) -> None:
    """Validate everything, then run the experiment's units (here, in a pool, or on SLURM) in a
    fresh run directory, in --run-dir, or in `resume`; aggregate and print the metrics."""
    overrides = {**overrides, **opts.overrides()}
    try:
        if resume is not None:
            if is_complete(resume):
                raise SpecError(f"{resume}: run is complete, nothing to resume")
            if not (resume / "spec.yaml").is_file():
                raise SpecError(f"{resume}: not a run directory (no spec.yaml)")
            spec = load_spec(
                experiment, config=resume / "spec.yaml", sets=opts.set_ or [], overrides=overrides
            )
            if spec_hash(spec) != spec_hash(load_run_spec(resume)):
                raise SpecError(
                    f"{resume}: on resume only executor.* may change (the other keys would change the "
                    "results of the run); start a new run with the changed spec instead"
                )
        else:
            spec = load_spec(
                experiment, preset=opts.preset, config=opts.config, sets=opts.set_ or [], overrides=overrides
            )
        device = resolve_device(spec.device)
        chosen = [runners.find_unit(spec, key) for key in opts.unit or []]
        if opts.list_units:
            list_units(spec)
            return
        if chosen and opts.run_dir is None:
            raise SpecError("--unit: needs --run-dir, the directory every unit of the run writes into")
        if spec.executor.kind == "slurm" and not chosen and not executors.slurm_available():
            raise SpecError("executor slurm: sbatch and squeue are not on PATH (is this a SLURM login node?)")
        preflight(experiment, spec)
        parallel = spec.executor.jobs if spec.executor.kind == "local" and not chosen else 1
        if not opts.force:
            need, limit = runners.check_memory(spec, chosen or runners.units(spec), parallel)
    except (SpecError, ValueError) as e:
        fail(str(e))
    if opts.check:
        found = runners.units(spec)
        memory = "not checked (--force)" if opts.force else f"about {resources.gib(need)} at peak; {limit}"
        out.print(
            f"spec ok: {experiment}, hash {spec_hash(spec)}, {len(found)} units, executor "
            f"{spec.executor.kind}; memory {memory}",
            markup=False,
            highlight=False,
        )
        return
    root = output_root_of(spec, opts, resume)
    progress = RichProgress(enabled=not opts.quiet)
    if chosen:
        return run_units_here(spec, opts.run_dir, chosen, progress, opts.quiet)  # type: ignore[arg-type]
    if spec.executor.kind == "slurm":
        return run_slurm(spec, root, opts, progress, resume)
    shared = resume or opts.run_dir
    if shared is not None:  # its SLURM jobs, if any, must have ended before it runs here
        recorded = executors.recorded_jobs(shared)
        active = executors.queue_states(recorded.values())
        if active is None and recorded and executors.slurm_available():
            fail(f"{shared}: squeue cannot say whether its SLURM jobs have ended; try again", code=1)
        if active:
            fail(
                f"{shared}: {len(active)} unit(s) still queued or running as SLURM jobs "
                f"({', '.join(sorted(active))}); wait for them (ntkrun status) or scancel them",
                code=1,
            )
    run = None
    try:
        with progress.bar, open_run(root, spec, resume, at=opts.run_dir) as run:
            run.meta["executor"] = spec.executor.kind
            todo = [u for u in runners.units(spec) if run.load_unit(u.name) is None]
            if spec.executor.kind == "local":
                executors.run_pool(spec, run, progress, todo, spec.executor.jobs)
            else:
                runners.run_inline(spec, run, progress, todo)
            locked = None
            if run.fixed:  # a shared directory: other processes may aggregate too
                try:
                    metrics = executors.aggregate_once(spec, run)
                except executors.ExecutorError as e:  # another process is aggregating: not a failure
                    locked = e
            else:
                metrics = executors.finish(spec, run, str(device))
    except UnitSpecMismatchError as e:
        fail(str(e))
    except OSError as e:
        # an unusable output root is bad input (2); a write failing mid-run (disk full) is not (1)
        code = 2 if run is None else 1
        where = opts.run_dir or f"under {root}"
        fail(f"cannot write the run directory {where}: {e.strerror or e}{kept(run)}", code)
    except (DivergenceError, ValueError, executors.ExecutorError) as e:  # trouble inside a run
        fail(f"{e}{kept(run)}", code=1)
    except (KeyboardInterrupt, Stop) as e:
        hint = f"; continue with: ntkrun resume {run.path}" if run is not None and not run.finalized else ""
        fail(f"{stopped(e)}{kept(run)}{hint}", code=signal_code(e))
    if locked is not None:
        fail(f"{locked}; its units are all done here", code=1)
    if metrics is None:  # completed by another process sharing the directory
        metrics = pd.read_csv(run.path / summary_table(run.path))
    report(experiment, metrics, run.path, opts.quiet)


def output_root_of(spec: RunSpec, opts: RunOptions, resume: Path | None) -> Path:
    if resume is not None:
        return resume.parent.parent
    return opts.output_root if opts.output_root is not None else Path(spec.output)


def report(experiment: str, metrics: pd.DataFrame, path: Path, quiet: bool) -> None:
    if not quiet:
        out.print(frame_table(metrics, f"{experiment} results"))
    out.print(f"run directory: {path}", markup=False, highlight=False, soft_wrap=True)


def list_units(spec: RunSpec) -> None:
    """Index, name and relative cost of every unit (for an sbatch --array range)."""
    found = runners.units(spec)
    out.print(f"{len(found)} units (sbatch --array=0-{len(found) - 1}):", markup=False, highlight=False)
    for index, unit in enumerate(found):
        stage = " (stage 0: before the others)" if unit.stage == 0 else ""
        out.print(f"{index:>5}  {unit.name:<24} cost {unit.cost:.3g}{stage}", markup=False, highlight=False)


def run_units_here(
    spec: RunSpec, run_dir: Path, chosen: list[Unit], progress: RichProgress, quiet: bool
) -> None:
    """`--unit K --run-dir DIR`: compute those units of the sharded run in DIR, in this process;
    aggregate if that completes the run."""
    run = None
    try:
        run = RunDir.at(run_dir, spec)
        with progress.bar:
            runners.run_inline(spec, run, progress, chosen)
        executors.maybe_finish(spec, run)
    except UnitSpecMismatchError as e:
        fail(str(e))
    except OSError as e:  # an unusable --run-dir is bad input (2); a failing write later is not (1)
        fail(f"cannot write the run directory {run_dir}: {e.strerror or e}", code=2 if run is None else 1)
    except (DivergenceError, ValueError) as e:
        fail(f"{e} (unit results so far are kept in {run_dir})", code=1)
    except (KeyboardInterrupt, Stop) as e:
        fail(f"{stopped(e)} (finished units and checkpoints are kept in {run_dir})", code=signal_code(e))
    done = runners.done_units(spec, run)
    total = len(runners.units(spec))
    names = ", ".join(u.name for u in chosen)
    state = "run aggregated: complete" if is_complete(run.path) else f"{len(done)}/{total} units done"
    out.print(f"unit(s) {names} done in {run_dir}; {state}", markup=False, highlight=False, soft_wrap=True)


def run_slurm(
    spec: RunSpec, root: Path, opts: RunOptions, progress: RichProgress, resume: Path | None
) -> None:
    """Submit the units that are neither done nor queued as SLURM arrays; print the job ids; with
    --wait, block until they end and aggregate. A resume with nothing left to submit aggregates."""
    run = None
    try:
        if resume is not None:
            run = RunDir.reopen(resume, spec)
            run.make_visible()  # the jobs need a path that stays put
            run.release()  # the jobs, not this process, run it from here on
        elif opts.run_dir is not None:
            holder = lock_holder(opts.run_dir / RUNNING)
            if holder is not None:
                raise LockedError(f"{opts.run_dir}: being run by {holder}")
            run = RunDir.at(opts.run_dir, spec)
        else:
            run = RunDir(root, spec, visible=True)
        jobs = executors.recorded_jobs(run)
        queued = executors.queue_states(jobs.values())
        if queued is None:
            raise executors.ExecutorError("squeue cannot be asked which jobs are still queued; try again")
        found = runners.units(spec)
        todo = [u for u in found if run.load_unit(u.name) is None and jobs.get(u.name) not in queued]
        stage0 = {u.name for u in found if u.stage == 0}
        after = [job for name, job in jobs.items() if name in stage0 and job in queued]
        submitted = executors.submit_slurm(spec, run, todo, after) if todo else []
    except UnitSpecMismatchError as e:
        fail(str(e))
    except OSError as e:
        where = opts.run_dir or f"under {root}"
        fail(f"cannot write the run directory {where}: {e.strerror or e}", code=2 if run is None else 1)
    except (executors.ExecutorError, LockedError) as e:
        fail(str(e), code=1)
    except Exception as e:  # submitit raises its own errors for a refused sbatch
        lines = str(e).strip().splitlines()
        fail(f"SLURM submission failed: {lines[-1] if lines else type(e).__name__}", code=1)
    arrays = sorted({job.split("_")[0] for _, job in submitted})
    ids = ", ".join(arrays) or "(none: every unit is done or queued)"
    out.print(f"submitted {len(submitted)} unit(s) as SLURM job(s) {ids}", markup=False, highlight=False)
    out.print(f"run directory: {run.path}", markup=False, highlight=False, soft_wrap=True)
    if not submitted and not queued:  # everything is done: aggregate now
        return finish_sharded(spec, run, opts.quiet)
    out.print(f"follow with: ntkrun status {run.path}", markup=False, highlight=False, soft_wrap=True)
    if not opts.wait:
        return
    try:
        with progress.bar:
            executors.wait_slurm(spec, run, [job for _, job in submitted] + list(queued), progress)
    except executors.ExecutorError as e:
        fail(str(e), code=1)
    except (KeyboardInterrupt, Stop) as e:
        fail(f"stopped waiting; the jobs go on (ntkrun status {run.path})", code=signal_code(e))
    finish_sharded(spec, run, opts.quiet)


def finish_sharded(spec: RunSpec, run: RunDir, quiet: bool) -> None:
    """Aggregate a sharded run whose units are all done, once (unless a job already did)."""
    try:
        metrics = executors.aggregate_once(spec, run)
    except runners.IncompleteRunError as e:
        if not run.fixed:
            run.fail(str(e))
        print_status(spec, run)
        fail(f"{run.path}: {e}; compute them with: ntkrun resume {run.path}", code=1)
    except executors.ExecutorError as e:  # another process is aggregating it
        fail(str(e), code=1)
    except (DivergenceError, ValueError, OSError) as e:
        if not run.fixed:
            run.fail(str(e))
        fail(f"{run.path}: aggregation failed: {e}", code=1)
    except (KeyboardInterrupt, Stop) as e:
        if not run.fixed and not run.finalized:
            run.fail(stopped(e))
        fail(f"{stopped(e)} while aggregating {run.path}", code=signal_code(e))
    if metrics is None:
        metrics = pd.read_csv(run.path / summary_table(run.path))
    report(spec.experiment, metrics, run.path, quiet)


def summary_table(path: Path) -> str:
    return next((name for name in SUMMARY_TABLES if (path / name).is_file()), "metrics.csv")


def print_status(spec: RunSpec, run: RunDir) -> pd.DataFrame:
    table = executors.unit_status(spec, run)
    out.print(frame_table(table, f"units of {run.path}"))
    counts = table["state"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in counts.index)
    holder = (
        None
        if is_complete(run.path)
        else lock_holder(run.path / executors.AGGREGATE_LOCK, executors.STALE_LOCK_S)
    )
    complete = (
        "complete (aggregated)"
        if is_complete(run.path)
        else f"being aggregated by {holder}"
        if holder
        else "not aggregated"
    )
    out.print(f"{len(table)} units: {summary}; run {complete}", markup=False, highlight=False)
    runner = None if is_complete(run.path) else lock_holder(run.path / RUNNING, remove=False)
    if runner:
        out.print(f"being run by {runner}", markup=False, highlight=False)
    return table


def kept(run: RunDir | None) -> str:
    if run is None:
        return ""
    if run.finalized:  # the signal came just after the run completed
        return f" after the run completed: {run.path}"
    return f"; partial files kept in {run.path}"


def shortcuts(width: list[int] | None, seeds: int | None, steps: int | None) -> dict[tuple[str, ...], Any]:
    """Spec overrides from the shortcut flags every experiment has."""
    overrides: dict[tuple[str, ...], Any] = {}
    if width:
        overrides["network", "width"] = list(width)
    if seeds is not None:
        overrides["seeds",] = seeds
    if steps is not None:
        overrides["training", "steps"] = steps
    return overrides


PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="Preset name (see `ntkrun presets`).")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML spec file (overlays the preset).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override: KEY.PATH=VALUE (repeatable).")
]
RootOpt = Annotated[Path | None, typer.Option("--output-root", "-o", help="Root of run directories.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")]
WidthOpt = Annotated[list[int] | None, typer.Option(help="Hidden width, repeatable (network.width).")]
SeedsOpt = Annotated[int | None, typer.Option(help="Number of seeds (trials per width for pca).")]
StepsOpt = Annotated[int | None, typer.Option(help="GD steps (training.steps).")]
ExecutorOpt = Annotated[
    str | None, typer.Option(help="Where units run: inline (default), local (process pool) or slurm.")
]
JobsOpt = Annotated[int | None, typer.Option(help="Worker processes of --executor local.")]
UnitOpt = Annotated[
    list[str] | None,
    typer.Option(help="Compute only this unit (index or name, repeatable) into --run-dir; see --list-units."),
]
RunDirOpt = Annotated[
    Path | None, typer.Option(help="Run directory shared by the units of a sharded run (created if absent).")
]
WaitOpt = Annotated[bool, typer.Option(help="slurm: block until the jobs end, then aggregate.")]
ListUnitsOpt = Annotated[
    bool, typer.Option(help="Print the units of this spec (index, name, cost) and exit.")
]
PartitionOpt = Annotated[str | None, typer.Option(help="slurm: partition.")]
GpusOpt = Annotated[int | None, typer.Option(help="slurm: GPUs per unit.")]
TimeOpt = Annotated[int | None, typer.Option(help="slurm: time limit per unit, minutes.")]
ArrayOpt = Annotated[int | None, typer.Option(help="slurm: array tasks running at once.")]
CheckOpt = Annotated[
    bool, typer.Option(help="Validate the spec, data and memory estimate, print a summary, run nothing.")
]
ForceOpt = Annotated[bool, typer.Option(help="Run even if the memory estimate exceeds what is available.")]


@app.command()
def convergence(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    width: WidthOpt = None,
    seeds: SeedsOpt = None,
    steps: StepsOpt = None,
    output_root: RootOpt = None,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    jobs: JobsOpt = None,
    unit: UnitOpt = None,
    run_dir: RunDirOpt = None,
    wait: WaitOpt = False,
    list_units: ListUnitsOpt = False,
    check: CheckOpt = False,
    force: ForceOpt = False,
    slurm_partition: PartitionOpt = None,
    slurm_gpus: GpusOpt = None,
    slurm_time: TimeOpt = None,
    slurm_array_parallelism: ArrayOpt = None,
) -> None:
    """NTK convergence with width and during training (paper Figure 1). Default preset: paper."""
    run_experiment("convergence", RunOptions.take(locals()), shortcuts(width, seeds, steps))


@app.command()
def regression(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    width: WidthOpt = None,
    seeds: SeedsOpt = None,
    steps: StepsOpt = None,
    kernel: Annotated[str | None, typer.Option(help="Limit kernel: analytic or empirical.")] = None,
    output_root: RootOpt = None,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    jobs: JobsOpt = None,
    unit: UnitOpt = None,
    run_dir: RunDirOpt = None,
    wait: WaitOpt = False,
    list_units: ListUnitsOpt = False,
    check: CheckOpt = False,
    force: ForceOpt = False,
    slurm_partition: PartitionOpt = None,
    slurm_gpus: GpusOpt = None,
    slurm_time: TimeOpt = None,
    slurm_array_parallelism: ArrayOpt = None,
) -> None:
    """Trained networks vs the limiting Gaussian process (paper Figure 2). Default preset: paper."""
    overrides = shortcuts(width, seeds, steps)
    if kernel is not None:
        overrides["kernel",] = kernel
    run_experiment("regression", RunOptions.take(locals()), overrides)


@app.command()
def scaling(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    width: WidthOpt = None,
    seeds: SeedsOpt = None,
    steps: StepsOpt = None,
    output_root: RootOpt = None,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    jobs: JobsOpt = None,
    unit: UnitOpt = None,
    run_dir: RunDirOpt = None,
    wait: WaitOpt = False,
    list_units: ListUnitsOpt = False,
    check: CheckOpt = False,
    force: ForceOpt = False,
    slurm_partition: PartitionOpt = None,
    slurm_gpus: GpusOpt = None,
    slurm_time: TimeOpt = None,
    slurm_array_parallelism: ArrayOpt = None,
) -> None:
    """Convergence rates in width: NTK at init, its change in training, distance to the linear model."""
    run_experiment("scaling", RunOptions.take(locals()), shortcuts(width, seeds, steps))


@app.command()
def pca(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    width: WidthOpt = None,
    seeds: SeedsOpt = None,
    steps: StepsOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder of the MNIST IDX files: data.dir.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this interrupted run directory.")] = None,
    output_root: RootOpt = None,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    jobs: JobsOpt = None,
    unit: UnitOpt = None,
    run_dir: RunDirOpt = None,
    wait: WaitOpt = False,
    list_units: ListUnitsOpt = False,
    check: CheckOpt = False,
    force: ForceOpt = False,
    slurm_partition: PartitionOpt = None,
    slurm_gpus: GpusOpt = None,
    slurm_time: TimeOpt = None,
    slurm_array_parallelism: ArrayOpt = None,
) -> None:
    """MNIST kernel principal components and convergence along them (paper Figure 3)."""
    overrides = shortcuts(width, seeds, steps)
    if data_dir is not None:
        overrides["data", "dir"] = str(data_dir)
    run_experiment("pca", RunOptions.take(locals()), overrides, resume=resume)


def experiment_of(run_dir: Path) -> str:
    """The experiment named in a run directory's spec.yaml (exit 2 if it is not a run directory)."""
    path = run_dir / "spec.yaml"
    if not path.is_file():
        fail(f"{run_dir}: not a run directory (no spec.yaml)")
    try:
        experiment = read_yaml(path).get("experiment")
    except SpecError as e:
        fail(str(e))
    if experiment not in EXPERIMENTS:
        fail(f"{path}: experiment: unknown experiment {experiment!r}")
    return experiment


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="An interrupted, failed or sharded run directory.")],
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    executor: ExecutorOpt = None,
    jobs: JobsOpt = None,
    wait: WaitOpt = False,
    force: ForceOpt = False,
    slurm_partition: PartitionOpt = None,
    slurm_gpus: GpusOpt = None,
    slurm_time: TimeOpt = None,
    slurm_array_parallelism: ArrayOpt = None,
) -> None:
    """Finish a run from its spec.yaml: only units without a result run (or are re-submitted),
    checkpointed units continue where they stopped. --set executor.* may change where."""
    run_experiment(experiment_of(run_dir), RunOptions.take(locals()), {}, resume=run_dir)


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Per unit: done / running / pending / failed / not started, with SLURM job ids."""
    try:
        spec = load_run_spec(run_dir)
    except SpecError as e:
        fail(str(e))
    print_status(spec, RunDir.at(run_dir, spec))


@app.command()
def aggregate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory whose units are all done.")],
    quiet: QuietOpt = False,
) -> None:
    """Build the CSVs and figures from the finished units and mark the run complete."""
    try:
        spec = load_run_spec(run_dir)
        run = RunDir.reopen(run_dir, spec) if not is_complete(run_dir) else RunDir.at(run_dir, spec)
    except LockedError as e:  # a live process is running it: not bad input, a conflict
        fail(str(e), code=1)
    except (SpecError, ValueError) as e:
        fail(str(e))
    finish_sharded(spec, run, quiet)


data_app = typer.Typer(help="Datasets: download and check MNIST.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="Dataset name (mnist).")],
    mirror: Annotated[
        list[str] | None, typer.Option(help="Base URL to try (repeatable; default: known mirrors).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Target folder (default: $NTKRUN_DATA_DIR or ~/.cache/ntkrun).")
    ] = None,
    split: Annotated[
        list[str] | None, typer.Option(help="train and/or test (repeatable; default both).")
    ] = None,
) -> None:
    """Download the MNIST files, verify their published MD5s, write them atomically."""
    if dataset != "mnist":
        fail(f"unknown dataset {dataset!r} (known: mnist; Fashion-MNIST: Debian's dataset-fashion-mnist)")
    splits = split or ["train", "test"]
    if any(s not in ("train", "test") for s in splits):
        fail(f"--split: expected train or test, got {', '.join(splits)}")
    folder = resolve_data_dir(data_dir)
    try:
        download_mnist(folder, mirror or MNIST_MIRRORS, splits, log=lambda m: err.print(m, markup=False))
    except (DataError, OSError) as e:
        fail(str(e), code=1)
    out.print(f"MNIST verified in {folder}", markup=False, highlight=False)


@data_app.command("check")
def data_check(
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder (default: $NTKRUN_DATA_DIR or ~/.cache/ntkrun).")
    ] = None,
) -> None:
    """Say which MNIST files are present and verified."""
    folder = resolve_data_dir(data_dir)
    status = check_mnist(folder)
    for name, state in status.items():
        out.print(f"{state:<13} {folder / name}", markup=False, highlight=False)
    splits = {
        "train": status["train-images-idx3-ubyte.gz"] == status["train-labels-idx1-ubyte.gz"] == "ok",
        "test": status["t10k-images-idx3-ubyte.gz"] == status["t10k-labels-idx1-ubyte.gz"] == "ok",
    }
    ready = [s for s, ok in splits.items() if ok]
    out.print(f"usable splits: {', '.join(ready) or 'none'}", markup=False, highlight=False)
    if not ready:
        raise typer.Exit(1)


@app.command()
def presets() -> None:
    """List the presets of every experiment, one line each."""
    for experiment, found in list_presets().items():
        for name, path in found.items():
            out.print(
                f"{experiment:<12} {name:<12} {preset_description(path)}", markup=False, highlight=False
            )


@app.command()
def show(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory (default: the latest run).")] = None,
    output_root: RootOpt = None,
) -> None:
    """Summarize a run directory (default: the latest complete run)."""
    if run_dir is None:
        root = output_root or Path("outputs")
        run_dir = latest_run(root)
        if run_dir is None:
            fail(f"no complete run under {root}/ (run an experiment first, or name a run directory)")
    if not run_dir.is_dir():
        fail(f"{run_dir}: not a run directory")
    status = (
        "complete" if is_complete(run_dir) else "FAILED" if (run_dir / "ERROR").exists() else "incomplete"
    )
    out.print(f"run:    {run_dir.resolve()}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"status: {status}", markup=False, highlight=False)
    if (run_dir / "ERROR").exists():
        out.print(f"error:  {(run_dir / 'ERROR').read_text().strip()}", markup=False, highlight=False)
    meta_path = run_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        out.print(
            f"experiment {meta['experiment']}, spec {meta['spec_hash']}, device {meta['device']}, "
            f"{meta['threads']} threads, wall time {meta['wall_time_s']:.1f} s, finished {meta['end_time']}",
            markup=False,
            highlight=False,
        )
    if (run_dir / "spec.yaml").is_file():
        out.print((run_dir / "spec.yaml").read_text().rstrip(), markup=False, highlight=False)
    for name in SUMMARY_TABLES:
        if (run_dir / name).is_file():
            out.print(frame_table(pd.read_csv(run_dir / name), name))
    files = ", ".join(sorted(p.name for p in run_dir.iterdir()))
    out.print(f"files: {files}", markup=False, highlight=False, soft_wrap=True)
