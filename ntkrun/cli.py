"""Command-line interface: parses arguments and hands them to spec, runners and runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import pandas as pd
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ntkrun.data import MNIST_MIRRORS, DataError, check_mnist, download_mnist, resolve_data_dir
from ntkrun.runners import DivergenceError, get_runner, preflight, resolve_device
from ntkrun.runs import RunDir, is_complete, latest_run, open_run
from ntkrun.spec import EXPERIMENTS, SpecError, list_presets, load_spec, preset_description, read_yaml

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


def run_experiment(
    experiment: str,
    preset: str | None,
    config: Path | None,
    sets: list[str] | None,
    overrides: dict[tuple[str, ...], Any],
    output_root: Path | None,
    quiet: bool,
    resume: Path | None = None,
) -> None:
    """Validate everything, then run in a fresh run directory (or `resume` one) and print the metrics."""
    try:
        if resume is not None:
            if not (resume / "spec.yaml").is_file():
                raise SpecError(f"{resume}: not a run directory (no spec.yaml)")
            if is_complete(resume):
                raise SpecError(f"{resume}: run is complete, nothing to resume")
            config, preset, sets, overrides = resume / "spec.yaml", None, [], {}
        spec = load_spec(experiment, preset=preset, config=config, sets=sets or [], overrides=overrides)
        device = resolve_device(spec.device)
        preflight(experiment, spec)
    except (SpecError, ValueError) as e:
        fail(str(e))
    if resume is not None:
        output_root = resume.parent.parent
    root = output_root if output_root is not None else Path(spec.output)
    runner = get_runner(experiment)
    progress = RichProgress(enabled=not quiet)
    run = None
    try:
        with progress.bar, open_run(root, spec, resume) as run:
            metrics = runner(spec, run, progress)
            final = run.finalize(str(device))
    except OSError as e:
        fail(f"cannot write the run directory under {root}: {e.strerror or e}")
    except (DivergenceError, ValueError) as e:  # numerical trouble inside a run: say what and where
        fail(f"{e}{kept(run)}", code=1)
    except KeyboardInterrupt:
        fail(f"interrupted{kept(run)}", code=130)
    if not quiet:
        out.print(frame_table(metrics, f"{experiment} results"))
    out.print(f"run directory: {final}", markup=False, highlight=False, soft_wrap=True)


def kept(run: RunDir | None) -> str:
    return f"; partial files kept in {run.path}" if run is not None else ""


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
) -> None:
    """NTK convergence with width and during training (paper Figure 1). Default preset: paper."""
    overrides = shortcuts(width=width, seeds=seeds, steps=steps)
    run_experiment("convergence", preset, config, set_, overrides, output_root, quiet)


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
) -> None:
    """Trained networks vs the limiting Gaussian process (paper Figure 2). Default preset: paper."""
    overrides = shortcuts(width=width, seeds=seeds, steps=steps)
    if kernel is not None:
        overrides["kernel",] = kernel
    run_experiment("regression", preset, config, set_, overrides, output_root, quiet)


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
) -> None:
    """Convergence rates in width: NTK at init, its change in training, distance to the linear model."""
    run_experiment("scaling", preset, config, set_, shortcuts(width, seeds, steps), output_root, quiet)


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
) -> None:
    """MNIST kernel principal components and convergence along them (paper Figure 3)."""
    overrides = shortcuts(width=width, seeds=seeds, steps=steps)
    if data_dir is not None:
        overrides["data", "dir"] = str(data_dir)
    run_experiment("pca", preset, config, set_, overrides, output_root, quiet, resume=resume)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="An interrupted or failed run directory.")],
    quiet: QuietOpt = False,
) -> None:
    """Finish an interrupted run from its spec.yaml; checkpointed units continue where they stopped."""
    try:
        experiment = read_yaml(run_dir / "spec.yaml").get("experiment")
    except SpecError as e:
        fail(str(e))
    if experiment not in EXPERIMENTS:
        fail(f"{run_dir / 'spec.yaml'}: experiment: unknown experiment {experiment!r}")
    run_experiment(experiment, None, None, None, {}, None, quiet, resume=run_dir)


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
