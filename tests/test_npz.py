"""Bring your own data as one .npz (x_train, y_train, x_test, y_test), any channel count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.test_data import write_split
from typer.testing import CliRunner

from ntkrun.cli import app
from ntkrun.data import load_split, split_info


def save_npz(path: Path, x_train, y_train, x_test, y_test) -> Path:
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def generalization(data: Path, out: Path, *sets: str) -> pd.DataFrame:
    args = ["generalization", "--preset", "quick", "--data-dir", str(data), "-o", str(out), "--quiet",
            "--set", "predictors=[ntk, nngp, net]", "--set", "data.n_train=[40]", "--set", "data.n_test=30",
            "--set", "training.n_train=40", "--set", "training.steps=5", "--set", "network.width=[32]",
            "--set", "seeds=1", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "generalization" / "latest" / "accuracy.csv")


def test_an_npz_of_the_same_images_gives_the_idx_folders_results_byte_for_byte(images, tmp_path):
    """One channel: the .npz path is the IDX path, from the arrays to accuracy.csv."""
    (X, y), (Xt, yt) = load_split(images, "train"), load_split(images, "test")
    npz = save_npz(tmp_path / "same.npz", X, y, Xt, yt)
    from_idx = generalization(images, tmp_path / "idx")
    from_npz = generalization(npz, tmp_path / "npz")
    assert from_npz.to_csv() == from_idx.to_csv()


def test_three_channels_first_or_last_are_one_dataset_for_the_mlp_and_the_cnn(tmp_path):
    rng = np.random.default_rng(0)
    X, Xt = (
        rng.integers(0, 256, (60, 3, 8, 8), dtype=np.uint8),
        rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8),
    )
    y, yt = rng.integers(0, 10, 60), rng.integers(0, 10, 30)
    first = save_npz(tmp_path / "first.npz", X, y, Xt, yt)
    last = save_npz(tmp_path / "last.npz", X.transpose(0, 2, 3, 1), y, Xt.transpose(0, 2, 3, 1), yt)
    info = split_info(last, "train")
    assert (info.count, info.shape, info.pixels, info.size) == (60, (3, 8, 8), 192, "3x8x8")
    assert np.array_equal(load_split(last, "test")[0], Xt)
    for arch in (["network.arch=mlp"], ["network.arch=cnn", "network.depth=2", "training.lr=1.0"]):
        a = generalization(first, tmp_path / f"first_{arch[0]}", *arch)
        b = generalization(last, tmp_path / f"last_{arch[0]}", *arch)
        assert a.to_csv() == b.to_csv()
        assert {"ntk", "nngp", "net"} <= set(a["predictor"])


def test_floating_point_images_are_taken_as_they_are(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (50, 6, 6), dtype=np.uint8)
    labels = rng.integers(0, 10, 50)
    as_bytes = save_npz(tmp_path / "bytes.npz", X, labels, X[:20], labels[:20])
    as_floats = save_npz(tmp_path / "floats.npz", X / 255.0, labels, X[:20] / 255.0, labels[:20])
    sets = ("data.n_test=20", "predictors=[ntk]")
    a = generalization(as_bytes, tmp_path / "bytes", *sets)
    b = generalization(as_floats, tmp_path / "floats", *sets)
    assert a.to_csv() == b.to_csv()


def test_data_check_reads_an_npz(tmp_path):
    rng = np.random.default_rng(2)
    npz = save_npz(
        tmp_path / "d.npz", rng.random((10, 4, 5)), np.arange(10), rng.random((3, 4, 5)), np.arange(3)
    )
    result = CliRunner().invoke(app, ["data", "check", "--data-dir", str(npz)])
    assert result.exit_code == 0, result.output
    assert "ok: 10 images of 4x5" in result.output and "ok: 3 images of 4x5" in result.output


def bad(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (20, 5, 5), dtype=np.uint8)
    y = np.arange(20) % 10
    no_test = tmp_path / "no_test.npz"
    np.savez(no_test, x_train=x, y_train=y)
    cases = {
        "no_test": (no_test, "has no x_test or y_test (it holds x_train, y_train)"),
        "labels_11": (
            save_npz(tmp_path / "l.npz", x, y + 5, x, y),
            "y_train holds labels 5..14; they must be 0..9",
        ),
        "few_labels": (save_npz(tmp_path / "f.npz", x, y[:7], x, y), "y_train has shape (7,)"),
        "vector_images": (
            save_npz(tmp_path / "v.npz", x.reshape(20, 25), y, x, y),
            "x_train has shape (20, 25)",
        ),
        "not_npz": (tmp_path / "text.npz", "not a readable .npz archive"),
        "absent": (tmp_path / "absent.npz", "absent.npz: not found"),
    }
    (tmp_path / "text.npz").write_text("hello")
    return cases


@pytest.mark.parametrize("case", ["no_test", "labels_11", "few_labels", "vector_images", "not_npz", "absent"])
def test_a_bad_npz_is_one_line_naming_the_file_and_the_array(tmp_path, case):
    path, message = bad(tmp_path)[case]
    result = CliRunner().invoke(app, ["generalization", "--preset", "quick", "--data-dir", str(path),
                                      "-o", str(tmp_path / "out"), "--set", "data.n_train=[10]",
                                      "--set", "data.n_test=5", "--set", "training.n_train=10"])  # fmt: skip
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and str(path) in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_an_idx_folder_is_still_one_channel(tmp_path):
    write_split(tmp_path, n=12, split="train")
    assert split_info(tmp_path, "train").shape == (1, 28, 28)
