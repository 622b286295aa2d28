"""Sweeps (ntkrun.sweep): a grid over spec keys as one run. Each point's CSVs are byte for byte
those of a plain run of the same values; the run's tables concatenate them with the swept keys as
columns; units shared between points are computed once; bad grids are refused before anything is
written; an interrupted sweep resumes to the same bytes; every experiment and the pool run them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from faults import launch
from typer.testing import CliRunner

from ntkrun import load_run
from ntkrun.cli import app
from ntkrun.spec import parse_sweep, spec_hash

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERGENCE = [
    "convergence", "--preset", "quick", "--set", "network.width=[8, 32]", "--seeds", "2",
    "--steps", "6", "--set", "grid.n_angles=16", "--set", "training.n_train=10", "--quiet",
]  # fmt: skip
CONVERGENCE_CSVS = ["kernels.csv", "losses.csv", "summary.csv", "metrics.csv"]
GRID = ["--sweep", "network.depth=2,3", "--sweep", "training.lr=0.5,1.0"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def only_run(root: Path, experiment: str) -> Path:
    found = [p for p in (root / experiment).iterdir() if p.name != "latest"]
    assert len(found) == 1, found
    return found[0]


def test_sweep_values_are_parsed_as_set_parses_one():
    assert parse_sweep("network.depth=2,3,4") == ("network.depth", [2, 3, 4])
    assert parse_sweep("network.width=[10, 20],[30]") == ("network.width", [[10, 20], [30]])
    assert parse_sweep("network.nonlinearity=relu,erf") == ("network.nonlinearity", ["relu", "erf"])
    assert parse_sweep("training.lr=1e-3,0.5") == ("training.lr", [0.001, 0.5])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--sweep", "network.depthh=2,3"],
            "sweep point p00 (network.depthh=2): network.depthh: unknown key",
        ),
        (["--sweep", "network.depth="], "--sweep network.depth=: no values"),
        (
            ["--sweep", "network.depth=2,0"],
            "sweep point p01 (network.depth=0): network.depth: Input should be",
        ),
        (
            ["--sweep", "network.depth=2,3", "--set", "network.depth=3"],
            "--set network.depth=3: sets network.depth, which --sweep network.depth=2,3 sweeps",
        ),
        (
            ["--sweep", "network.depth=2,3", "--steps", "4", "--sweep", "training.steps=3,5"],
            "--steps: sets training.steps, which --sweep training.steps=3,5 sweeps",
        ),
        (
            ["--sweep", "training.lr=1,2,3,4,5,6", "--sweep", "network.depth=2,3", "--max-points", "10"],
            "6 (training.lr) x 2 (network.depth) = 12 points, more than --max-points 10",
        ),
        (["--sweep", "executor.jobs=1,2"], "sweep: executor.jobs: cannot be swept"),
        (["--sweep", "training.lr=0.5,nan"], "sweep point p01 (training.lr=nan): training.lr:"),
    ],
)
def test_a_bad_sweep_is_one_line_before_any_directory(args, message, tmp_path):
    result = invoke(*CONVERGENCE, *args, "--output-root", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_sweep_block_in_a_spec_file_is_the_same_run_as_the_flags(tmp_path):
    from ntkrun.experiments import spec_of

    config = tmp_path / "sweep.yaml"
    config.write_text("experiment: convergence\nsweep:\n  network.depth: [2, 3]\n  training.lr: [0.5, 1.0]\n")
    from_file = spec_of("convergence", preset="quick", config=config)
    from_flags = spec_of("convergence", preset="quick", sweeps=["network.depth=2,3", "training.lr=0.5,1.0"])
    assert from_file == from_flags and spec_hash(from_file) == spec_hash(from_flags)
    # a plain spec's identity is what it was before sweeps existed: no `sweep` key in it
    plain = spec_of("convergence", preset="quick")
    assert "sweep" not in plain.model_dump(exclude_defaults=True) and spec_hash(plain) != spec_hash(from_file)
    # a preset's sweep with a --set of the same key is ambiguous: refused
    with pytest.raises(Exception, match=r"--set network.depth=4: sets network.depth, which .*sweep.yaml"):
        spec_of("convergence", preset="quick", config=config, sets=["network.depth=4"])


def test_each_point_is_a_plain_run_byte_for_byte_and_the_tables_concatenate_them(tmp_path):
    """A 2 x 2 grid (depth x lr): every point's CSVs equal those of a plain `--set` run of its values;
    the run's CSVs are the points' rows with one column per swept key; load_run reads them."""
    result = invoke(*CONVERGENCE, *GRID, "--output-root", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "sweep", "convergence")
    points = pd.read_csv(run / "points.csv")
    assert points["point"].tolist() == ["p00", "p01", "p02", "p03"]
    assert points["network.depth"].tolist() == [2, 2, 3, 3] and points["training.lr"].tolist() == [
        0.5,
        1,
        0.5,
        1,
    ]
    for depth, lr, point in ((2, 1.0, "p01"), (3, 0.5, "p02")):
        root = tmp_path / f"plain_{point}"
        plain = invoke(*CONVERGENCE, "--set", f"network.depth={depth}", "--set", f"training.lr={lr}",
                       "--output-root", root)  # fmt: skip
        assert plain.exit_code == 0, plain.output
        reference = only_run(root, "convergence")
        for name in CONVERGENCE_CSVS:
            assert (run / "points" / point / name).read_bytes() == (reference / name).read_bytes(), name
        assert (run / "points" / point / "figure.png").is_file()
        # the point records its own spec, whose hash is the plain run's
        assert spec_hash(load_run(run / "points" / point).spec) == spec_hash(load_run(reference).spec)
        assert points.set_index("point").loc[point, "spec_hash"] == spec_hash(load_run(reference).spec)
        merged = load_run(run)["metrics"]
        rows = merged[(merged["network.depth"] == depth) & (merged["training.lr"] == lr)]
        own = pd.read_csv(reference / "metrics.csv")
        pd.testing.assert_frame_equal(
            rows.drop(columns=["network.depth", "training.lr"]).reset_index(drop=True), own, check_exact=True
        )
    tables = load_run(run)
    assert list(tables["kernels"].columns[:2]) == ["network.depth", "training.lr"]
    assert len(tables["kernels"]) == sum(
        len(pd.read_csv(p / "kernels.csv")) for p in (run / "points").iterdir()
    )
    meta = json.loads((run / "meta.json").read_text())
    assert meta["sweep"]["keys"] == ["network.depth", "training.lr"] and len(meta["sweep"]["points"]) == 4
    assert (run / "figure.png").is_file() and (run / "figure.pdf").is_file()


def test_units_that_do_not_read_the_swept_key_are_computed_once(images, tmp_path):
    """generalization swept over training.lr: the kernel units read no training key, so the grid
    computes them once (said in --list-units) and both points read them; the second point's
    tables still equal a plain run's byte for byte."""
    base = ["generalization", "--preset", "quick", "--data-dir", images, "--quiet", "--set", "device=cpu",
            "--set", "predictors=[ntk, net]", "--set", "data.n_train=[40, 80]", "--set", "data.n_test=30",
            "--set", "training.n_train=40", "--set", "training.steps=5", "--set", "network.width=[16]",
            "--seeds", "2"]  # fmt: skip
    listed = invoke(*base, "--sweep", "training.lr=0.5,1.0", "--list-units")
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if line.strip()[:1].isdigit()]
    names = [line.split()[1] for line in lines]
    assert names.count("p00.ntk_n40") == 1 and not any(n.startswith("p01.ntk") for n in names)
    assert all("shared: read by p01 too" in line for line in lines if ".ntk_n" in line)
    assert sum(n.startswith("p01.") for n in names) == 3  # its own reference and two nets
    result = invoke(*base, "--sweep", "training.lr=0.5,1.0", "--output-root", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "sweep", "generalization")
    assert sorted(p.name for p in (run / "units").glob("*ntk_n*.pt")) == ["p00.ntk_n40.pt", "p00.ntk_n80.pt"]
    plain = invoke(*base, "--set", "training.lr=1.0", "--output-root", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    reference = only_run(tmp_path / "plain", "generalization")
    for name in ("accuracy.csv", "distance.csv", "fits.csv"):
        assert (run / "points" / "p01" / name).read_bytes() == (reference / name).read_bytes(), name
    acc = load_run(run)["accuracy"]
    assert set(acc["training.lr"]) == {0.5, 1.0} and (run / "figure.png").is_file()


def test_an_interrupted_sweep_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL after 5 of the grid's 16 units: `ntkrun status` shows points x units, the finished
    units of every point are kept, and `ntkrun resume` completes the grid with the CSVs of an
    uninterrupted sweep."""
    whole = invoke(*CONVERGENCE, *GRID, "--output-root", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    reference = only_run(tmp_path / "whole", "convergence")
    root = tmp_path / "cut"
    args = [*CONVERGENCE, *GRID, "--output-root", str(root)]
    proc = launch("unit-saved", 5, "SIGKILL", tmp_path / "marker", args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9 and (tmp_path / "marker").exists(), err
    (partial,) = [p for p in (root / "convergence").iterdir() if p.name.endswith(".partial")]
    kept = {p.name: torch.load(p, weights_only=True)["result"] for p in (partial / "units").glob("*.pt")}
    assert len(kept) == 5
    status = invoke("status", partial)
    assert status.exit_code == 0, status.output
    assert "points of the sweep (4)" in status.output and "4/4" in status.output, status.output
    assert "network.depth=2, training.lr=0.5" in status.output
    resumed = invoke("resume", partial, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    final = only_run(root, "convergence")
    for name, result in kept.items():
        assert torch.load(final / "units" / name, weights_only=True)["result"] == result, name
    for name in [*CONVERGENCE_CSVS, "points.csv"]:
        assert (final / name).read_bytes() == (reference / name).read_bytes(), name
    for point in ("p00", "p03"):
        for name in CONVERGENCE_CSVS:
            assert (final / "points" / point / name).read_bytes() == (
                reference / "points" / point / name
            ).read_bytes()


def tiny_sweeps(digits: Path) -> dict[str, list[str]]:
    """A tiny sweep of every experiment besides convergence, whose tests are above."""
    return {
        "regression": ["regression", "--preset", "quick", "--set", "network.width=[16, 64]", "--seeds", "2",
                       "--steps", "5", "--sweep", "network.nonlinearity=relu,erf"],
        "scaling": ["scaling", "--preset", "quick", "--set", "network.width=[16, 32, 64]", "--seeds", "2",
                    "--steps", "3", "--set", "n_boot=50", "--sweep", "network.depth=2,3"],
        "pca": ["pca", "--preset", "quick", "--data-dir", str(digits), "--set", "data.split=test",
                "--set", "data.n_points=24", "--width", "16", "--width", "32", "--seeds", "1", "--steps", "8",
                "--set", "training.record_every=4", "--sweep", "training.lr=0.5,1.0"],
    }  # fmt: skip


@pytest.mark.parametrize("experiment", ["regression", "scaling", "pca"])
def test_every_experiment_sweeps_in_a_pool(experiment, digits, tmp_path):
    """Each experiment's tiny sweep through the local pool: complete, the swept key a column of
    every top-level table, the points' summary tables concatenated, the comparison figure."""
    args = tiny_sweeps(digits)[experiment]
    result = invoke(*args, "--quiet", "--executor", "local", "--jobs", "2", "--output-root", tmp_path)
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / experiment / "latest")
    assert run.complete and (run.path / "figure.png").is_file()
    key = args[args.index("--sweep") + 1].split("=")[0]
    for name, table in run.tables.items():
        assert table.columns[0] == ("point" if name == "points" else key), name
    for point in ("p00", "p01"):
        own = load_run(run.path / "points" / point)
        assert own.complete and own.tables.keys() == run.tables.keys() - {"points"}
    if experiment == "pca":  # the reference reads no training key: one unit for both points
        assert [p.name for p in (run.path / "units").glob("*reference.pt")] == ["p00.reference.pt"]


def test_curves_that_the_swept_key_does_not_change_are_drawn_once_and_said_so():
    """A sweep over training.lr leaves the kernel predictors' learning curves identical at every
    point: panel (a) draws such a curve once, in black, and its legend says so (it listed a colour
    per point over curves that hid each other); the nets' curves, which differ, keep a colour each."""
    import matplotlib.pyplot as plt

    from ntkrun.sweep_plots import _generalization_sweep

    rows = [{"training.lr": lr, "predictor": kind, "n_train": n, "width": float("nan"),
             "test_accuracy": 0.5 + n / 1000 + (lr / 10 if kind == "nngp" else 0.0)}
            for lr in (0.5, 1.0, 2.0) for kind in ("ntk", "nngp") for n in (40, 80)]  # fmt: skip
    fig = plt.figure()
    _generalization_sweep({"accuracy.csv": pd.DataFrame(rows)}, ["training.lr"], fig)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "the same at every point: NTK (t = inf)" in texts, texts
    assert len(ax.get_lines()) == 1 + 3  # the NTK's once, the NNGP's per point
    assert sum(line.get_color() == "black" for line in ax.get_lines()) == 1
    plt.close(fig)
