"""`ntkrun features` (docs/science.md §11): the output scale's GD against its definition and its
closed form at alpha -> infinity, and the experiment end to end (units, tables, fits, figure, bad
input). The muP table itself is tests/test_mup.py."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from ntkrun import dynamics
from ntkrun.cli import app
from ntkrun.kernels import empirical_ntk
from ntkrun.network import MLP, gd_step, mse_cost
from ntkrun.runners.features import alignment

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def task(n: int = 16, m: int = 64) -> tuple[torch.Tensor, ...]:
    X = torch.randn(n + m, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.sign(X[:, 0] * X[:, 1])
    return X[:n], y[:n], X[n:], y[n:]


def test_gd_on_the_scaled_model_is_gd_towards_f0_plus_y_over_alpha():
    """d/dtheta [C(alpha (f - f_0), y) / alpha^2] = d/dtheta C(f, f_0 + y / alpha) (§11.2), by autograd."""
    X, y, _, _ = task()
    net = MLP(3, 32, 3, "tanh", seed=1, dtype=F64)
    with torch.no_grad():
        f0 = net(X)
    for alpha in (0.5, 3.0, 40.0):
        scaled = mse_cost(alpha * (net(X) - f0), y) / alpha**2
        plain = mse_cost(net(X), f0 + y / alpha)
        for a, b in zip(torch.autograd.grad(scaled, list(net.parameters())),
                        torch.autograd.grad(plain, list(net.parameters())), strict=True):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def lazy_distance(alpha: float) -> float:
    """||f_alpha - f_lin|| / ||f_lin|| on test points after 50 GD steps: f_lin the network's own
    linearization (kernel regression with its Theta_0 from g_0 = 0, the alpha -> infinity limit)."""
    X, y, Xt, _ = task()
    net = MLP(3, 128, 3, "tanh", seed=2, dtype=F64)
    theta_0, theta_test = empirical_ntk(net, X), empirical_ntk(net, Xt, X)
    with torch.no_grad():
        f0, f0_test = net(X), net(Xt)
    for _ in range(50):
        gd_step(net, X, f0 + y / alpha, lr=1.0)
    with torch.no_grad():
        f = alpha * (net(Xt) - f0_test)
    zeros = torch.zeros(len(y), dtype=F64), torch.zeros(len(Xt), dtype=F64)
    f_lin = dynamics.linearized(dynamics.eigen(theta_0), theta_test, y, *zeros, 50.0, lr=1.0)
    return float((f - f_lin).norm() / f_lin.norm())


def test_the_scaled_model_meets_its_linearization_like_one_over_alpha():
    """Chizat et al.: the distance to the closed form at alpha = infinity is O(1/alpha) for a smooth
    model: doubling alpha from 32 to 64 to 128 halves it (measured 0.503, 0.502; bounds +-10%), and at
    alpha 128 it is below 1e-3 (measured 2.3e-4)."""
    d32, d64, d128 = lazy_distance(32.0), lazy_distance(64.0), lazy_distance(128.0)
    assert 0.45 < d64 / d32 < 0.55 and 0.45 < d128 / d64 < 0.55
    assert d128 < 1e-3


def test_alignment_is_one_for_the_label_kernel_and_scale_free():
    y = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=F64)
    assert alignment(torch.outer(y, y), y) == pytest.approx(1.0)
    K = torch.eye(4, dtype=F64) + 0.3
    assert alignment(7 * K, y) == pytest.approx(alignment(K, y))


TINY = ["features", "--preset", "quick", "--width", "16", "--width", "32", "--seeds", "2", "--steps", "5",
        "--set", "training.output_scales=[1, 4]", "--set", "training.output_scale_width=16",
        "--set", "depth_width=[[2, 8], [3, 16], [2, 16], [3, 32]]", "--set", "data.n_train=8",
        "--set", "data.n_test=16", "--set", "n_boot=20", "--quiet"]  # fmt: skip


def check_against_the_units(run, table: pd.DataFrame) -> None:
    """features.csv recomputed by other code from what the units saved and the task's definition:
    the NTK predictor by GD iterated on the analytic kernel (f <- f - lr/N Theta (f - y) from f = 0,
    as the paper's dynamics for the MSE cost 1/2N sum (f - y)^2) scored on the test labels; each
    network's seed spread over the networks that differ only by their seed; the alignments."""
    from ntkrun.experiments import spec_of
    from ntkrun.kernels import analytic_kernels
    from ntkrun.runners.features import task as features_task

    spec = spec_of("features", config=run / "spec.yaml")
    X, y, Xt, yt = features_task(spec)
    for depth, rows in table.groupby("depth"):
        _, K = analytic_kernels(torch.cat([X, Xt]), X, depth, spec.network.nonlinearity, spec.network.beta)
        f, lr = torch.zeros(len(X) + len(Xt), dtype=F64), spec.training.lr
        for _ in range(spec.training.steps):
            f = f - lr / len(X) * K @ (f[: len(X)] - y)
        saved = torch.load(run / "units" / f"limit_d{depth}.pt", weights_only=False)["result"]["f_test"]
        # the runner goes through an eigendecomposition: float64 agreement to 1e-8 relative measured;
        # a wrong time, rate or initial function (1b669c1's bug) moves the values by order one
        torch.testing.assert_close(saved, f[len(X) :], rtol=1e-6, atol=1e-9)
        assert (rows["acc_ntk"] == float((torch.sign(f[len(X) :]) == yt).double().mean())).all()
    thetas = {}
    for row in table.itertuples():
        name = f"{row.parametrization}_d{row.depth}_w{row.width}_a{row.alpha:g}_s{row.seed}"
        thetas[row.Index] = torch.load(run / "units" / f"{name}.pt", weights_only=False)["result"]["theta_0"]
        theta = thetas[row.Index]
        assert row.align_0 == pytest.approx(float(y @ theta @ y) / float(theta.norm() * (y @ y)), rel=1e-12)
    for _, rows in table.groupby(["parametrization", "alpha", "depth", "width"]):
        mean = sum(thetas[i] for i in rows.index) / len(rows)
        for i in rows.index:
            assert rows.loc[i, "spread_0"] == pytest.approx(float((thetas[i] - mean).norm() / mean.norm()))


def test_features_runs_its_three_arms_with_fits_and_figure(tmp_path):
    listed = CliRunner().invoke(app, [*TINY, "-o", str(tmp_path), "--list-units"])
    assert listed.exit_code == 0, listed.output
    assert "limit_d3" in listed.output and "mup_d3_w32_a1_s1" in listed.output
    result = CliRunner().invoke(app, [*TINY, "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "features" / "latest"
    table = pd.read_csv(run / "features.csv")
    # arm (a) 2 x 2 widths, (b) alpha 4 (alpha 1 at width 16 is arm (a)'s), (c) 2 new pairs; 2 seeds
    assert len(table) == (4 + 1 + 2) * 2
    assert set(table["parametrization"]) == {"ntk", "mup"}
    assert (table[["change_T", "spread_0", "lin_dist_T"]] > 0).all().all()
    check_against_the_units(run, table)
    fits = pd.read_csv(run / "fits.csv")
    assert set(zip(fits["arm"], fits["group"], fits["metric"], strict=True)) == {
        ("width", "ntk", "change_T"), ("width", "mup", "change_T"), ("alpha", "ntk", "change_T"),
        ("alpha", "ntk", "lin_dist_T"), ("ratio", "depth 2", "spread_0"), ("ratio", "depth 2", "change_T"),
        ("ratio", "depth 3", "spread_0"), ("ratio", "depth 3", "change_T"),
    }  # fmt: skip
    assert (run / "figure.png").is_file()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["depth_width=[[1, 8]]"], "depth_width: a depth must be at least 2"),
        (["network.parametrizations=[ntk, sp]"], "network.parametrizations"),
        (["training.output_scales=[0]"], "training.output_scales"),
        (["network.parametrization=mup"], "network.parametrization"),
        (
            ["training.output_scales=[1.0, 1.0000001]"],
            "training.output_scales: 1.0 and 1.0000001 are both 1 in unit names (a{alpha})",
        ),
    ],
)
def test_bad_features_specs_are_refused_in_one_line(tmp_path, sets, message):
    args = [*TINY, "-o", str(tmp_path)]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, [*args, "--check"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "features").exists()


def test_a_features_sweep_compares_its_points_slopes(tmp_path):
    result = CliRunner().invoke(app, [*TINY, "-o", str(tmp_path), "--sweep", "training.lr=0.5,1.0"])
    assert result.exit_code == 0, result.output
    fits = pd.read_csv(tmp_path / "features" / "latest" / "fits.csv")
    assert list(fits.columns[:2]) == ["training.lr", "arm"] and set(fits["training.lr"]) == {0.5, 1.0}
    assert (tmp_path / "features" / "latest" / "figure.png").is_file()


def test_features_runs_a_cnn_in_both_parametrizations_on_gaussian_images(tmp_path):
    args = [*TINY, "-o", str(tmp_path), "--set", "network.arch=cnn", "--set", "data.image=[1, 3, 3]",
            "--set", "network.nonlinearity=relu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "features" / "latest" / "features.csv")
    assert set(table["parametrization"]) == {"ntk", "mup"} and (table["change_T"] > 0).all()
    refused = CliRunner().invoke(app, [*TINY, "-o", str(tmp_path), "--set", "network.arch=cnn", "--check"])
    assert refused.exit_code == 2 and "a cnn takes images" in refused.output
