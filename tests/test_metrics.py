"""The numbers in the summary CSVs: each recomputed here independently from the run's own tidy
CSVs (plain numpy loops, not the runners' pandas code) or from the math written out again, and
checked against what the theory says at the widths run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data import REAL_MNIST, needs_mnist
from typer.testing import CliRunner

from ntkrun.cli import app


def run(args: list[str], root: Path) -> Path:
    result = CliRunner().invoke(app, [*args, "--set", "device=cpu", "--quiet", "--output-root", str(root)])
    assert result.exit_code == 0, result.output
    return root / args[0] / "latest"


def relu_theta(x: np.ndarray, xp: np.ndarray, depth: int, beta: float) -> float:
    """Theta(L)(x, x') for ReLU, docs/science.md §3, one pair at a time."""
    n0 = len(x)
    sxx, syy, sxy = x @ x / n0 + beta**2, xp @ xp / n0 + beta**2, x @ xp / n0 + beta**2
    theta = sxy
    for _ in range(depth - 1):
        s = math.sqrt(sxx * syy)
        th = math.acos(max(-1.0, min(1.0, sxy / s)))
        sxy_next = s * (math.sin(th) + (math.pi - th) * math.cos(th)) / (2 * math.pi) + beta**2
        theta = theta * (math.pi - th) / (2 * math.pi) + sxy_next
        sxx, syy, sxy = sxx / 2 + beta**2, syy / 2 + beta**2, sxy_next
    return theta


def test_convergence_metrics_and_theta_inf(tmp_path):
    args = ["convergence", "--preset", "quick", "--width", "64", "--width", "1024", "--seeds", "4",
            "--steps", "10", "--set", "grid.n_angles=24", "--set", "grid.x0_angle=0.3"]  # fmt: skip
    path = run(args, tmp_path)
    kernels, summary = pd.read_csv(path / "kernels.csv"), pd.read_csv(path / "summary.csv")
    metrics, losses = pd.read_csv(path / "metrics.csv"), pd.read_csv(path / "losses.csv")
    x0 = np.array([math.cos(0.3), math.sin(0.3)])
    for gamma, theta_inf in summary.groupby("gamma")["theta_inf"].first().items():
        x = np.array([math.cos(gamma), math.sin(gamma)])
        assert theta_inf == pytest.approx(relu_theta(x0, x, 4, 0.1), rel=1e-12)
    for row in metrics.itertuples():
        at = {s: g.sort_values("gamma")["theta"].to_numpy() for s, g in
              kernels[(kernels.width == row.width) & (kernels.step == row.step)].groupby("seed")}  # fmt: skip
        first = {s: g.sort_values("gamma")["theta"].to_numpy() for s, g in
                 kernels[(kernels.width == row.width) & (kernels.step == 0)].groupby("seed")}  # fmt: skip
        stack = np.stack([at[s] for s in sorted(at)])
        limit = summary[(summary.width == row.width) & (summary.step == row.step)].sort_values("gamma")
        spread = stack.std(axis=0, ddof=1).mean()
        dist = np.linalg.norm(stack.mean(0) - limit["theta_inf"].to_numpy()) / np.linalg.norm(
            limit["theta_inf"]
        )
        change = np.mean([np.linalg.norm(at[s] - first[s]) / np.linalg.norm(first[s]) for s in sorted(at)])
        loss = losses[(losses.width == row.width) & (losses.step == row.step)]["loss"].mean()
        assert (row.seed_spread, row.rel_dist_to_limit, row.rel_change_from_first, row.loss) == pytest.approx(
            (spread, dist, change, loss), rel=1e-10
        )
    at_init = metrics[metrics.step == 0].set_index("width")
    # Theorem 1: the kernel's seed spread shrinks like n^-1/2, 16x wider -> about 4x smaller
    assert 2.5 < at_init.loc[64, "seed_spread"] / at_init.loc[1024, "seed_spread"] < 6.5
    # ... and the seed mean at width 1024 lies within a few of its standard errors of Theta(L)
    assert at_init.loc[1024, "rel_dist_to_limit"] < 0.05


@needs_mnist
def test_pca_metrics_and_the_limit_rate(tmp_path):
    """Width-1024 networks on 64 digits with the analytic kernel: Delta_t should move along f(2)
    at the rate lambda_2, and stay near the line (h_t small). At this width the kernel differs
    from its limit by a few percent (n^-1/2 ~ 0.03), so 10% on the rate and 0.1 on max ||h|| / c
    leave a factor of three; the width-64 nets of the quick preset are off by 17% and 0.085."""
    args = ["pca", "--preset", "quick", "--data-dir", str(REAL_MNIST), "--set", "data.split=test",
            "--set", "data.n_points=64", "--width", "1024", "--seeds", "2", "--steps", "200",
            "--set", "training.record_every=10"]  # fmt: skip
    path = run(args, tmp_path)
    traj, metrics = pd.read_csv(path / "trajectories.csv"), pd.read_csv(path / "metrics.csv")
    eigen = pd.read_csv(path / "eigenvalues.csv")
    c, row = 0.5, metrics.iloc[0]
    max_h, rates = [], []
    for _, g in traj.groupby("seed"):
        t, gn = g["t"].to_numpy(), g["g_norm"].to_numpy()
        keep = gn > 1e-3 * c
        slope = np.linalg.lstsq(np.stack([t[keep], np.ones(keep.sum())], 1), np.log(gn[keep]), rcond=None)[0][
            0
        ]
        rates.append(-slope)
        max_h.append(g["h_norm"].max() / c)
    assert row["lambda_k"] == eigen.loc[eigen["index"] == 2, "lambda_power"].item()
    assert (row["max_h_over_c"], row["g_decay_rate"]) == pytest.approx(
        (np.mean(max_h), np.mean(rates)), rel=1e-9
    )
    assert row["rate_over_lambda"] == pytest.approx(np.mean(rates) / row["lambda_k"], rel=1e-12)
    assert abs(row["rate_over_lambda"] - 1) < 0.1 and row["max_h_over_c"] < 0.1


def test_scaling_slopes_against_theory(tmp_path):
    """The quick preset (widths 2^5..2^9, depths 2 and 3, 4 seeds, 20 steps). Slopes recomputed
    from scaling.csv; then the theory: the kernel at init converges like n^-1/2 (the interval
    holds -0.5); its change in training and the distance to the linearized model vanish, at a
    rate between the known bound n^-1/2 and the n^-1 of finer analyses (docs/science.md §5.4)."""
    path = run(["scaling", "--preset", "quick"], tmp_path)
    table, fits = pd.read_csv(path / "scaling.csv"), pd.read_csv(path / "fits.csv")
    for row in fits.itertuples():
        g = table[table.depth == row.depth]
        widths = np.sort(g["width"].unique()).astype(float)
        means = np.array([g[g.width == w][row.metric].mean() for w in widths])
        slope, intercept = np.polyfit(np.log(widths), np.log(means), 1)
        assert (row.slope, row.intercept) == pytest.approx((slope, intercept), rel=1e-9, abs=1e-12)
        assert row.ci_low <= row.slope <= row.ci_high and row.ci_high < 0  # it does vanish
        if row.metric == "dist_init":
            assert row.ci_low <= -0.5 <= row.ci_high
        else:
            assert -1.2 < row.slope < -0.4, row
