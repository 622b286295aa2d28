"""`ntkrun regression`: end to end, against the limiting Gaussian, and its bad specs."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from ntkrun.cli import app
from ntkrun.data import circle
from ntkrun.experiments import spec_of
from ntkrun.runners.regression import limit_kernels, limit_table, training_data

TINY = [
    "regression", "--preset", "quick", "--set", "network.width=[16, 64]", "--seeds", "2", "--steps", "50",
    "--set", "grid.n_angles=32", "--quiet",
]  # fmt: skip


def run(args: list[str], root) -> tuple[object, object]:
    result = CliRunner().invoke(app, [*args, "--output-root", str(root)])
    folder = root / "regression"
    runs = [p for p in folder.iterdir() if p.name != "latest"] if folder.exists() else []
    return result, runs


def test_tiny_run_writes_every_output(tmp_path):
    result, (run_dir,) = run(TINY, tmp_path)
    assert result.exit_code == 0, result.output
    names = {p.name for p in run_dir.iterdir()}
    assert {"functions.csv", "limit.csv", "metrics.csv", "losses.csv", "training.csv", "figure.png",
            "figure.pdf", "spec.yaml", "meta.json", "run.log"} <= names  # fmt: skip
    functions = pd.read_csv(run_dir / "functions.csv")
    assert list(functions.columns) == ["width", "seed", "gamma", "f_T"] and len(functions) == 2 * 2 * 32
    limit = pd.read_csv(run_dir / "limit.csv")
    assert list(limit.columns) == ["kernel", "t", "gamma", "mean", "std", "p10", "p50", "p90"]
    assert sorted(limit["t"].unique()) == [50.0, math.inf]
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("width")
    assert list(metrics.index) == [16, 64]
    losses = pd.read_csv(run_dir / "losses.csv")
    for width, g in functions.groupby("width"):  # each metric from its definition, on the CSVs
        for t, name in ((math.inf, "in_band_inf"), (50.0, "in_band_T")):
            band = limit[limit["t"] == t].set_index("gamma")
            f = g.join(band[["p10", "p90"]], on="gamma")
            inside = ((f["f_T"] >= f["p10"]) & (f["f_T"] <= f["p90"])).mean()
            assert metrics.loc[width, name] == pytest.approx(inside, abs=1e-12), (width, name)
        at_inf = limit[limit["t"] == math.inf].set_index("gamma")
        diff = g.groupby("gamma")["f_T"].mean() - at_inf["mean"]
        rms = math.sqrt((diff**2).mean() / (at_inf["std"] ** 2).mean())
        assert metrics.loc[width, "mean_dist_in_std"] == pytest.approx(rms, rel=1e-9)
        loss_T = losses[losses["width"] == width]["loss_T"].mean()
        assert metrics.loc[width, "train_loss_T"] == pytest.approx(loss_T)
    assert (metrics["expected_in_band"] == 0.8).all()


def test_empirical_limit_kernel(tmp_path):
    result, (run_dir,) = run([*TINY, "--kernel", "empirical", "--set", "kernel_width=512"], tmp_path)
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(run_dir / "limit.csv")["kernel"]) == {"empirical"}


def test_band_collapses_onto_the_targets_at_the_training_points():
    spec = spec_of("regression", sets=["grid.n_angles=8"])
    angles, y = training_data(spec)
    limit = limit_table(spec, limit_kernels(spec, circle(angles), circle(angles), "cpu"), y, angles)
    at_inf = limit[limit["t"] == math.inf]
    assert at_inf["std"].max() < 1e-5  # var ~ 1e-11: rounding of a singular-free 4 x 4 solve
    assert (at_inf["mean"] - y.numpy()).abs().max() < 1e-8
    at_T = limit[limit["t"] == 1000.0]
    assert at_T["std"].max() < 1e-4  # 1000 steps of GD nearly converged too


def test_wide_networks_match_the_limiting_gaussian_in_band_and_variance(tmp_path):
    """256 networks of width 2048 (one hidden layer, depth 2) trained for 400 steps, on 32
    points of the circle, against the t = inf limiting Gaussian.

    in_band_inf: each curve's fraction inside the 10-90% band varies a lot from seed to seed (its
    points are strongly correlated), so the band is two-sided, 0.8 +- 3 standard errors of the
    mean over seeds (SE measured from the per-seed fractions, about 0.016). A variance off by
    1.3x moves the fraction by only about 0.05 (0.87 or 0.77 here), so the band cannot see that;
    the variance itself can: the sample variance over 256 seeds, divided by the predicted one and
    averaged over the circle, has a relative SD of at most sqrt(2/255) = 0.089 (less, averaged
    over points); [1/1.2, 1.2] holds the right variance (0.95 here) and refuses a predicted
    variance 1.3x too large (0.73) or too small (1.24), as checked below on the same runs."""
    args = ["regression", "--width", "2048", "--seeds", "256", "--steps", "400", "--set", "network.depth=2",
            "--set", "grid.n_angles=32", "--set", "device=cpu", "--quiet"]  # fmt: skip
    result, (run_dir,) = run(args, tmp_path)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(run_dir / "metrics.csv")
    functions, limit = pd.read_csv(run_dir / "functions.csv"), pd.read_csv(run_dir / "limit.csv")
    at_inf = limit[limit["t"] == math.inf].set_index("gamma")
    f_T = functions.pivot(index="seed", columns="gamma", values="f_T")
    mean, std = at_inf.loc[f_T.columns, "mean"], at_inf.loc[f_T.columns, "std"]
    per_seed = ((f_T - mean).abs() < 1.2815515655446004 * std).mean(axis=1)
    assert per_seed.mean() == pytest.approx(metrics["in_band_inf"].item(), abs=1e-12)  # same metric
    se = per_seed.std(ddof=1) / math.sqrt(len(per_seed))
    assert se < 0.02 and abs(metrics["in_band_inf"].item() - 0.8) < 3 * se
    ratio = lambda scale: float((f_T.var(ddof=1) / (scale * std**2)).mean())  # noqa: E731
    assert 1 / 1.2 < ratio(1.0) < 1.2
    assert not 1 / 1.2 < ratio(1.3) < 1.2 and not 1 / 1.2 < ratio(1 / 1.3) < 1.2
    assert metrics["train_loss_T"].item() < 1e-4
    assert metrics["mean_dist_in_std"].item() < 0.3  # the seed mean is near the limit mean


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "data.train_angles=[0.5, 0.5, 1.0]"], "repeat a point of the circle"),
        (["--set", f"data.train_angles=[0.5, {0.5 + 2 * math.pi}]"], "repeat a point of the circle"),
        (["--set", "data.train_angles=[]"], "data.train_angles: List should have at least 1 item"),
        (["--steps", "0"], "--steps: training.steps: Input should be greater than 0"),
        (["--kernel", "exact"], "kernel: Input should be 'analytic' or 'empirical'"),
        (["--set", "percentiles=[10, 100]"], "percentiles.1: Input should be less than 100"),
        (["--set", "data.target=values"], "needs target_values"),
        (
            ["--set", "percentiles=[10, 50, 50.0000001, 90]"],
            "percentiles: 50.0 and 50.0000001 are both 50 in the column names of functions.csv",
        ),
    ],
)
def test_bad_specs_exit_2(tmp_path, extra, expected):
    result, runs = run([*TINY, *extra], tmp_path)
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.output
    assert runs == []


def test_random_angles_and_other_targets():
    spec = spec_of("regression", sets=["data.train_angles=null", "data.n_train=6", "data.target=sin",
                                         "data.target_k=3"])  # fmt: skip
    angles, y = training_data(spec)
    assert angles.shape == (6,) and ((angles >= -math.pi) & (angles < math.pi)).all()
    assert (y - (3 * angles).sin()).abs().max() < 1e-15
    spec = spec_of("regression", sets=["data.target=values", "data.target_values=[1, 2, 3, 4]"])
    assert training_data(spec)[1].tolist() == [1.0, 2.0, 3.0, 4.0]
