"""Commands on run directories and presets: status, aggregate, show, presets."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Annotated

import typer

from ntkrun.cli.experiments import report
from ntkrun.cli.report import WIDE, frame_table, heavy, out, reported, say
from ntkrun.errors import IncompleteRunError, NtkrunError, SpecError
from ntkrun.experiments import EXPERIMENTS, experiment_of
from ntkrun.presets import preset_description

RunDirArg = Annotated[Path, typer.Argument(help="A run directory.")]


@reported
def status(run_dir: RunDirArg) -> None:
    """Per unit: done / running / pending / failed / not started, with SLURM job ids."""
    print_status(run_dir)


def print_status(run_dir: Path) -> None:
    found = heavy("ntkrun.orchestrate").status(run_dir)
    out.print(frame_table(found.table, f"units of {run_dir}"))
    if found.points is not None:
        out.print(frame_table(found.points, f"points of the sweep ({len(found.points)})"))
    counts = found.table["state"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in counts.index)
    state = (
        "complete (aggregated)"
        if found.complete
        else f"being aggregated by {found.aggregator}"
        if found.aggregator
        else "not aggregated"
    )
    say(f"{len(found.table)} units: {summary}; run {state}")
    if found.blocks is not None:
        say(f"Gram blocks (kernels.rows_per_unit): {found.blocks[0]} of {found.blocks[1]} done")
    if found.mixed:
        say(found.mixed)
    if found.runner:
        say(f"being run by {found.runner}")
    if found.error is not None and not found.complete:
        say(f"run FAILED: {found.error} ({Path(run_dir) / 'ERROR'}); resume with: ntkrun resume {run_dir}")


@reported
def aggregate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory whose units are all done.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table.")] = False,
) -> None:
    """Build the CSVs and figures from the finished units and mark the run complete."""
    orchestrate = heavy("ntkrun.orchestrate")
    spec, run = orchestrate.open_for_aggregation(run_dir)
    try:
        outcome = orchestrate.aggregate_run(spec, run)
    except IncompleteRunError as e:
        print_status(run.path)
        raise NtkrunError(f"{run.path}: {e}; compute them with: ntkrun resume {run.path}", 1) from None
    report(spec.experiment, outcome, quiet)


@reported
def presets() -> None:
    """List the presets of every experiment, one line each (wrapped on a terminal, whole when piped)."""
    rows = [(r.name, name, preset_description(path))
            for r in EXPERIMENTS.values() for name, path in r.presets.items()]  # fmt: skip
    w1, w2 = (max(len(row[i]) for row in rows) for i in (0, 1))
    columns = shutil.get_terminal_size().columns if WIDE is None else None
    for experiment, name, text in rows:
        line = f"{experiment:<{w1}}  {name:<{w2}}  {text}"
        if columns is not None and w1 + w2 + 24 < columns:
            line = textwrap.fill(line, columns - 1, subsequent_indent=" " * (w1 + w2 + 4))
        say(line)


@reported
def show(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory (default: the latest run).")] = None,
    output_root: Annotated[
        Path | None, typer.Option("--output-root", "-o", help="Root of run directories.")
    ] = None,
) -> None:
    """Summarize a run directory (default: the latest complete run)."""
    rundir, pd = heavy("ntkrun.rundir"), heavy("pandas")
    if run_dir is None:
        root = output_root or Path("outputs")
        run_dir = rundir.latest_run(root)
        if run_dir is None:
            raise SpecError(
                f"no complete run under {root}/ (run an experiment first, or name a run directory)"
            )
    if not run_dir.is_dir() or not (run_dir / "spec.yaml").is_file():
        raise SpecError(f"{run_dir}: not a run directory (no spec.yaml)")
    error = run_dir / "ERROR"
    state = "complete" if rundir.is_complete(run_dir) else "FAILED" if error.exists() else "incomplete"
    say(f"run:    {run_dir.resolve()}")
    say(f"status: {state}")
    if error.exists():
        say(f"error:  {error.read_text().strip()}")
    meta_path = run_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        say(
            f"experiment {meta['experiment']}, spec {meta['spec_hash']}, device {meta['device']}, "
            f"{meta['threads']} threads, wall time {meta['wall_time_s']:.1f} s, finished {meta['end_time']}"
        )
    tables: tuple[str, ...] = ("metrics.csv", "fits.csv")
    if (run_dir / "spec.yaml").is_file():
        say((run_dir / "spec.yaml").read_text().rstrip())
        tables = experiment_of(run_dir).summary_tables
    for name in tables:
        if (run_dir / name).is_file():
            out.print(frame_table(pd.read_csv(run_dir / name), name))
    say(f"files: {', '.join(sorted(p.name for p in run_dir.iterdir()))}")


def register(app: typer.Typer) -> None:
    for command in (status, aggregate, presets, show):
        app.command()(command)
