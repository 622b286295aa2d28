"""`ntkrun data`: download MNIST, check a dataset folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ntkrun.cli.report import err, heavy, reported, say
from ntkrun.errors import DownloadError, SpecError

data_app = typer.Typer(help="Datasets: download MNIST, check a folder of IDX files.", no_args_is_help=True)
FolderOpt = Annotated[
    Path | None, typer.Option(help="Folder (default: $NTKRUN_DATA_DIR or ~/.cache/ntkrun).")
]


@data_app.command("download")
@reported
def download(
    dataset: Annotated[str, typer.Argument(help="Dataset name (mnist).")],
    mirror: Annotated[
        list[str] | None, typer.Option(help="Base URL to try (repeatable; default: known mirrors).")
    ] = None,
    data_dir: FolderOpt = None,
    split: Annotated[
        list[str] | None, typer.Option(help="train and/or test (repeatable; default both).")
    ] = None,
) -> None:
    """Download the MNIST files, verify their published MD5s, write them atomically."""
    if dataset != "mnist":
        raise SpecError(
            f"unknown dataset {dataset!r} (known: mnist; Fashion-MNIST: Debian's dataset-fashion-mnist)"
        )
    data = heavy("ntkrun.data")
    splits = split or ["train", "test"]
    if any(s not in ("train", "test") for s in splits):
        raise SpecError(f"--split: expected train or test, got {', '.join(splits)}")
    folder = data.resolve_data_dir(data_dir)
    try:
        data.download_mnist(
            folder, mirror or data.MNIST_MIRRORS, splits, log=lambda m: err.print(m, markup=False)
        )
    except OSError as e:
        raise DownloadError(f"cannot write {folder}: {e.strerror or e}") from e
    say(f"MNIST verified in {folder}")


@data_app.command("check")
@reported
def check(data_dir: FolderOpt = None) -> None:
    """Say which IDX files are present and valid (and which are the published MNIST files), or
    which arrays of an .npz, and which splits are usable."""
    data = heavy("ntkrun.data")
    folder = data.resolve_data_dir(data_dir)
    states, usable = data.check_files(folder)
    for name, state in states.items():
        say(f"{folder} ({name}): {state}" if folder.suffix == ".npz" else f"{folder / name}: {state}")
    say(f"usable splits: {', '.join(usable) or 'none'}")
    if not usable:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
