"""`ntkrun pca`: end to end on synthetic IDX digits, resume after a real SIGKILL, real MNIST."""

from __future__ import annotations

import gzip
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from faults import launch
from test_data import REAL_MNIST, idx_bytes, needs_mnist, write_split
from typer.testing import CliRunner

from ntkrun.cli import app

OUTPUTS = ["eigenvalues.csv", "components.csv", "trajectories.csv", "metrics.csv"]


def tiny(data: Path, root: Path, steps: int = 40) -> list[str]:
    return ["pca", "--preset", "quick", "--data-dir", str(data), "--set", "data.split=test",
            "--set", "data.n_points=32", "--width", "48", "--seeds", "1", "--steps", str(steps),
            "--set", "training.record_every=4", "--set", "training.checkpoint_every=8",
            "--quiet", "--output-root", str(root)]  # fmt: skip


def runs(root: Path) -> list[Path]:
    folder = root / "pca"
    return sorted(p for p in folder.iterdir() if p.name != "latest") if folder.exists() else []


def test_tiny_run_outputs(digits, tmp_path):
    result = CliRunner().invoke(app, tiny(digits, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    (run,) = runs(tmp_path / "out")
    eig = pd.read_csv(run / "eigenvalues.csv")
    assert (eig["rel_diff"] < 1e-8).all()  # power iteration agrees with the dense solver
    assert eig["lambda_power"].is_monotonic_decreasing
    comps = pd.read_csv(run / "components.csv")
    assert list(comps.columns) == ["index", "label", "f1", "f2", "f3"] and len(comps) == 32
    assert ((comps[["f1", "f2", "f3"]] ** 2).mean() - 1).abs().max() < 1e-10  # pin-normalized
    traj = pd.read_csv(run / "trajectories.csv")
    assert traj["step"].tolist() == list(range(0, 41, 4))
    first = traj.iloc[0]
    assert first["g_coef"] == pytest.approx(-0.5, abs=1e-6) and first["h_norm"] < 1e-6  # Delta_0 = -0.5 f(2)
    assert (run / "figure.png").exists()


def test_missing_data_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, tiny(tmp_path / "nothing", tmp_path / "out"))
    assert result.exit_code == 2 and "ntkrun data download mnist" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()  # checked before the run


def test_killed_run_resumes_to_the_same_csvs(digits, tmp_path):
    """SIGKILL a real run right after its first checkpoint is saved, `ntkrun resume` it, and
    compare every CSV with an uninterrupted run of the same spec."""
    args = tiny(digits, tmp_path / "killed", steps=400)
    proc = launch("checkpoint", 1, "SIGKILL", tmp_path / "killed.marker", args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert list((tmp_path / "killed" / "pca").glob(".*.partial/units/w48_s0.ckpt.pt"))
    (partial,) = runs(tmp_path / "killed")
    assert partial.name.endswith(".partial") and not (partial / "meta.json").exists()
    assert not (tmp_path / "killed" / "pca" / "latest").exists()

    result = CliRunner().invoke(app, ["resume", str(partial), "--quiet"])
    assert result.exit_code == 0, result.output
    (resumed,) = runs(tmp_path / "killed")
    assert not resumed.name.startswith(".") and (resumed / "meta.json").exists()
    assert "resuming at step" in (resumed / "run.log").read_text()

    assert CliRunner().invoke(app, tiny(digits, tmp_path / "whole", steps=400)).exit_code == 0
    (whole,) = runs(tmp_path / "whole")
    for name in OUTPUTS:
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_resume_refuses_a_complete_run(digits, tmp_path):
    assert CliRunner().invoke(app, tiny(digits, tmp_path)).exit_code == 0
    (run,) = runs(tmp_path)
    result = CliRunner().invoke(app, ["resume", str(run)])
    assert result.exit_code == 2 and "run is complete" in result.stderr


@needs_mnist
def test_quick_preset_on_real_mnist(tmp_path):
    args = ["pca", "--preset", "quick", "--data-dir", REAL_MNIST, "--set", "data.split=test", "--steps", "20",
            "--quiet", "--output-root", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = runs(tmp_path)
    comps = pd.read_csv(run / "components.csv")
    assert len(comps) == 128 and set(comps["label"]) <= set(range(10))
    eig = pd.read_csv(run / "eigenvalues.csv")
    assert (eig["rel_diff"] < 1e-8).all() and eig["lambda_power"].iloc[0] > 10 * eig["lambda_power"].iloc[1]


def test_a_request_the_data_cannot_satisfy_is_refused_before_anything_is_written(digits, tmp_path):
    """More digits than the split holds (also when the memory estimate would refuse it first), and
    a label file that disagrees with its images: one line naming the key or file and both numbers,
    exit 2, from --check as from a run, and no run directory."""
    out = tmp_path / "out"
    for n in ("81", "100000"):
        args = [*tiny(digits, out), "--set", f"data.n_points={n}", "--set", "kernel=analytic"]
        for extra in (["--check"], []):
            result = CliRunner().invoke(app, [*args, *extra])
            assert result.exit_code == 2, result.output
            assert f"data.n_points: {n} points asked for, but the test split" in result.stderr
            assert "holds 80" in result.stderr and result.stderr.count("\n") == 1
            assert "memory" not in result.stderr
    labels = digits / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(79, dtype=np.uint8))))
    result = CliRunner().invoke(app, [*tiny(digits, out), "--check"])
    assert (
        result.exit_code == 2 and "holds (79,) labels but t10k-images-idx3-ubyte.gz holds 80" in result.stderr
    )
    assert not out.exists()


@pytest.mark.parametrize("kernel", ["analytic", "empirical"])
def test_a_cnn_runs_through_pca(digits, tmp_path, kernel):
    """network.arch=cnn: the reference kernel is the CNN's (its limit, or the empirical NTK of a
    wide CNN), the networks are CNNs trained through autograd; Delta_0 = -c f(2) as for the MLP."""
    args = [*tiny(digits, tmp_path / "out", steps=8), "--set", "network.arch=cnn", "--set", "network.depth=3",
            "--width", "8", "--set", f"kernel={kernel}", "--set", "kernel_width=16"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = runs(tmp_path / "out")
    assert (pd.read_csv(run / "eigenvalues.csv")["rel_diff"] < 1e-8).all()
    first = pd.read_csv(run / "trajectories.csv").iloc[0]
    assert first["g_coef"] == pytest.approx(-0.5, abs=1e-6) and first["h_norm"] < 1e-6
    eig = pd.read_csv(run / "eigenvalues.csv")
    from ntkrun.data import choose_points, load_split
    from ntkrun.kernels import analytic_kernels

    if kernel == "analytic":  # lambda_1 of K/N is the CNN limit's, not the MLP's
        X, _ = choose_points(*load_split(digits, "test"), 32, 0)
        K = analytic_kernels(X.reshape(32, 1, 28, 28), depth=3, arch="cnn")[1]
        top = float(np.linalg.eigvalsh(K.numpy() / 32)[-1])
        assert eig["lambda_dense"][0] == pytest.approx(top, rel=1e-10)


def test_units_are_listed_without_the_data_their_costs_unknown(tmp_path):
    """The costs need the images' shape (the IDX header): without the data the units are still
    listed, their cost 'unknown', never a guessed 784 pixels; with the data they are FLOP counts."""
    listing = CliRunner().invoke(app, [*tiny(tmp_path / "nothing", tmp_path / "out"), "--list-units"])
    assert listing.exit_code == 0, listing.output
    assert "reference                unknown" in listing.stdout
    assert "2 unit(s) of unknown cost (their data were not found" in listing.stdout
    data = tmp_path / "digits"
    data.mkdir()
    write_split(data, n=80)
    listing = CliRunner().invoke(app, [*tiny(data, tmp_path / "out"), "--list-units"])
    assert listing.exit_code == 0 and "unknown" not in listing.stdout and "GFLOP" in listing.stdout
