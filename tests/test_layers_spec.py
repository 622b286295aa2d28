"""`network.layers`: a composition of ntkrun.layers in a spec, through the experiments.

The named `mlp` and `cnn` compositions give the hand-written MLP's and CNN's kernels; a composition
reaches each experiment's limit (convergence's Theta_inf against arch mlp's, regression's limiting
Gaussian against arch mlp's, pca's eigenvalues against the composition's kernel, generalization's
predictors against a direct solve on the composition's kernels); a sweep runs two lists; every bad
list is one line at --check naming its position, before a run directory exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import ntkrun.layers as nl
from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.architectures.mlp import MLPArchitecture
from ntkrun.cli import app
from ntkrun.layers.parse import NAMED, caption, depth, parse

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args: str | Path) -> object:
    return CliRunner().invoke(app, [*map(str, args), "--quiet"])


def test_the_named_mlp_and_cnn_are_the_hand_written_ones():
    """`mlp` is arch mlp of depth 4 (relu, beta 0.1), `cnn` arch cnn of depth 4 (3x3 same,
    flatten): the same kernels to 1e-13 (two recursions written apart)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64)
    X2 = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)
    flat, flat2 = X.reshape(12, -1), X2.reshape(5, -1)
    for name, description in (("mlp", MLPArchitecture((36,), 4)), ("cnn", CNNArchitecture((1, 6, 6), 4))):
        inputs = (flat, flat2) if name == "mlp" else (X, X2)
        sigma, theta = parse(name).kernels(*inputs)
        want = description.kernels(flat, flat2, kinds=("nngp", "ntk"))
        torch.testing.assert_close(sigma, want[0], rtol=1e-13, atol=0)
        torch.testing.assert_close(theta, want[1], rtol=1e-13, atol=0)
    assert depth("mlp") == 4 and depth("cnn") == 4 and depth("resmlp") == 4
    assert set(NAMED) >= {"mlp", "resmlp", "lnmlp", "cnn", "myrtle5"}


def test_a_list_parses_to_the_composition_it_names():
    items = ["dense", {"residual": ["relu", "dense"]}, {"leaky_relu": 0.2}, "dense",
             {"concat": [["relu", "dense"], ["erf", "dense"]]}, "dense"]  # fmt: skip
    branches = nl.serial(nl.Relu(), nl.Dense()), nl.serial(nl.Erf(), nl.Dense())
    built = nl.serial(nl.Dense(), nl.residual(nl.Relu(), nl.Dense()), nl.LeakyRelu(0.2), nl.Dense(),
                      nl.concat(*branches), nl.Dense())  # fmt: skip
    X = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(parse(items).kernels(X), built.kernels(X), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert caption(items).startswith("dense, residual(relu, dense), leaky_relu(0.2), dense, concat(")
    conv = parse([{"conv": {"kernel_size": 5, "padding": "valid"}}, "relu", "flatten", "dense"])
    assert (conv.layers[0].k, conv.layers[0].padding) == (5, "valid")


def test_convergence_runs_a_composition_against_its_own_limit(tmp_path):
    """network.layers=mlp reaches convergence's limit column: summary.csv's theta_inf equals that of
    arch mlp (depth 4) to 1e-12, and the networks, drawn by the composition, converge to it."""
    tiny = ["convergence", "--preset", "quick", "--set", "network.width=[32, 256]", "--seeds", "2",
            "--steps", "5", "--set", "grid.n_angles=12", "--set", "training.n_train=8"]  # fmt: skip
    assert cli(*tiny, "-o", tmp_path / "a").exit_code == 0
    result = cli(*tiny, "--set", "network.layers=mlp", "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    a, b = (pd.read_csv(tmp_path / d / "convergence" / "latest" / "summary.csv") for d in "ab")
    np.testing.assert_allclose(b["theta_inf"], a["theta_inf"], rtol=1e-12)
    metrics = pd.read_csv(tmp_path / "b" / "convergence" / "latest" / "metrics.csv")
    first = metrics[metrics["step"] == 0].set_index("width")["rel_dist_to_limit"]
    assert first[256] < first[32]


def test_regression_takes_its_limiting_gaussian_from_the_composition(tmp_path):
    """network.layers=mlp gives regression's limit.csv (the Gaussian's mean, std and percentiles
    at t = T and t = inf) of arch mlp to 1e-10 (the kernels agree to 1e-13; the solve conditions
    them); a composition's empirical kernel is refused in one line."""
    tiny = ["regression", "--preset", "quick", "--set", "network.width=[64]", "--seeds", "1",
            "--steps", "5", "--set", "grid.n_angles=16"]  # fmt: skip
    assert cli(*tiny, "-o", tmp_path / "a").exit_code == 0
    result = cli(*tiny, "--set", "network.layers=mlp", "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    a, b = (pd.read_csv(tmp_path / d / "regression" / "latest" / "limit.csv") for d in "ab")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 2 * 16
    numbers = [c for c in a.columns if c != "kernel"]
    np.testing.assert_allclose(b[numbers].to_numpy(), a[numbers].to_numpy(), rtol=1e-10, atol=1e-12)
    refused = cli(*tiny, "--set", "network.layers=mlp", "--set", "kernel=empirical", "--check")
    assert refused.exit_code == 2 and "kernel: empirical" in refused.output, refused.output


def test_generalization_solves_on_the_compositions_kernels(images, tmp_path):
    """A residual MLP's NTK and NNGP predictors (one joint kernel unit) give accuracy.csv's test MSE
    of a direct solve on the composition's own kernels of the same points."""
    result = cli("generalization", "--preset", "quick", "--data-dir", images, "-o", tmp_path,
                 "--set", "network.layers=resmlp", "--set", "predictors=[ntk, nngp]",
                 "--set", "data.n_train=[40]", "--set", "data.n_test=30")  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "generalization" / "latest" / "accuracy.csv")
    from ntkrun.data import choose_points, load_split

    X, y = choose_points(*load_split(images, "train"), 40, 0, nested=True)
    Xt, yt = choose_points(*load_split(images, "test"), 30, 0)
    Y, Yt = np.full((40, 10), -0.1), np.full((30, 10), -0.1)
    Y[np.arange(40), y.numpy()] = 0.9
    Yt[np.arange(30), yt.numpy()] = 0.9
    model = parse("resmlp")
    (S, T), (St, Tt) = model.kernels(X.double()), model.kernels(Xt.double(), X.double())
    for kind, K, Kt in (("ntk", T.numpy(), Tt.numpy()), ("nngp", S.numpy(), St.numpy())):
        row = table[table["predictor"] == kind].iloc[0]
        noise = 1e-5 * np.diag(K).mean() if kind == "nngp" else 0.0
        pred = Kt @ np.linalg.solve(K + noise * np.eye(40), Y)
        assert row["test_mse"] == pytest.approx(((pred - Yt) ** 2).mean(), rel=1e-9)


def test_pca_takes_the_compositions_kernel_as_its_reference(images, tmp_path):
    """pca with a LayerNorm MLP: eigenvalues.csv's top eigenvalues are those of Theta/N of the
    composition on the same points (dynamics.kernel_pca_dense of its kernel, to 1e-10), and the
    networks train."""
    result = cli("pca", "--preset", "quick", "--data-dir", images, "-o", tmp_path,
                 "--set", "network.layers=lnmlp", "--set", "data.n_points=40", "--steps", "4",
                 "--set", "training.checkpoint_every=2")  # fmt: skip
    assert result.exit_code == 0, result.output
    from ntkrun.data import choose_points, load_split

    X, _ = choose_points(*load_split(images, "train"), 40, 0)
    theta = parse("lnmlp").kernels(X.double())[1]
    want = torch.linalg.eigvalsh(theta / 40).flip(0)[:3]
    table = pd.read_csv(tmp_path / "pca" / "latest" / "eigenvalues.csv")
    np.testing.assert_allclose(table["lambda_dense"], want.numpy(), rtol=1e-10)
    assert np.isfinite(pd.read_csv(tmp_path / "pca" / "latest" / "metrics.csv")["final_loss"]).all()


def test_features_runs_a_composition_over_widths_and_output_scales(tmp_path):
    """features with a residual MLP (NTK parametrization and muP): arms (a) and (b) run on the
    composition's networks (their unit names carry its depth, 4 weight layers) against its NTK
    predictor; depth_width must be empty (a composition has one depth), said in one line."""
    tiny = ["features", "--preset", "layers", "--set", "network.width=[16, 32]", "--seeds", "2",
            "--steps", "3", "--set", "training.output_scales=[1, 2]",
            "--set", "training.output_scale_width=16",
            "--set", "data.n_train=8", "--set", "data.n_test=16", "--set", "n_boot=20"]  # fmt: skip
    result = cli(*tiny, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "features" / "latest" / "features.csv")
    assert set(table["depth"]) == {4} and set(table["parametrization"]) == {"ntk", "mup"}
    assert np.isfinite(table["change_T"]).all() and (table["change_T"] > 0).all()
    refused = cli(*tiny, "--set", "depth_width=[[2, 16]]", "--check")
    assert refused.exit_code == 2 and "depth_width: a composition has one depth" in refused.output


def test_a_sweep_over_two_compositions_and_pooling_on_images(tmp_path):
    """scaling swept over two named lists runs both (their depth column: their weight layers); a
    pooling CNN (the full spatial covariance) on Gaussian 6x6 images runs too."""
    tiny = ["scaling", "--preset", "quick", "--set", "network.width=[16, 32]", "--seeds", "2",
            "--steps", "3", "--set", "training.n_train=6", "--set", "data.n_points=4"]  # fmt: skip
    result = cli(*tiny, "--sweep", "network.layers=resmlp,lnmlp", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "a" / "scaling" / "latest" / "scaling.csv")
    assert sorted(set(table["network.layers"])) == ["lnmlp", "resmlp"]
    assert set(table["depth"]) == {4}
    pooled = "network.layers=[conv, relu, avg_pool, conv, relu, global_avg_pool, dense]"
    result = cli(*tiny, "--set", pooled, "--set", "data.inputs=gaussian", "--set", "data.image=[2, 6, 6]",
                 "-o", tmp_path / "b")  # fmt: skip
    assert result.exit_code == 0, result.output
    fits = pd.read_csv(tmp_path / "b" / "scaling" / "latest" / "fits.csv")
    assert np.isfinite(fits["slope"]).all()


def test_attention_on_gaussian_sequences_through_scaling(tmp_path):
    """data.sequence [T, d]: Gaussian sequences, into a composition with attention; the table's
    depth counts its weight layers (Dense, Attention, Dense)."""
    layers = "network.layers=[dense, relu, {attention: {heads: 2}}, relu, global_avg_pool, dense]"
    result = cli("scaling", "--preset", "quick", "--set", "network.width=[16, 32]", "--seeds", "2",
                 "--steps", "3", "--set", "training.n_train=6", "--set", "data.n_points=4", "--set", layers,
                 "--set", "data.inputs=gaussian", "--set", "data.sequence=[5, 3]",
                 "-o", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "scaling" / "latest" / "scaling.csv")
    assert set(table["depth"]) == {3} and np.isfinite(table["dist_init"]).all()


@pytest.mark.parametrize(
    ("experiment", "layers", "message"),
    [
        ("convergence", "[dense, relu, relu, dense]", "network.layers: layer 3 (relu): its input is not"),
        ("convergence", "[dense, relu, foo, dense]", "network.layers: layer 3: unknown layer 'foo'"),
        ("convergence", "[dense, {conv: {kernel: 3}}, dense]", "layer 2 (conv): unknown option 'kernel'"),
        ("convergence", "[dense, {residual: [relu]}, dense]", "layer 2 (residual): a branch is not Gaussian"),
        ("convergence", "[conv, relu, flatten, dense]", "network.layers: conv needs images (C, H, W)"),
        ("convergence", "[dense, attention, flatten, dense]", "attention needs positions (images, sequen"),
        ("convergence", "[dense, {attention: {mechanism: softmax, linear_scaling: false}}, dense]",
         "softmax weights have a closed-form limit only with linear_scaling"),
        ("convergence", "[dense, relu]", "ends on relu: end it with a dense readout"),
        ("convergence", "resnet", "'resnet' names no composition"),
        ("scaling", "[conv, relu, avg_pool, avg_pool, avg_pool, flatten, dense]",
         "layer 5 (avg_pool): a 2x2 window on 1x1 images"),
        ("scaling", "[conv, relu, dense]", "the composition ends on images"),
        ("regression", "[conv, relu, flatten, dense]", "network.layers: conv needs images (C, H, W)"),
        ("features", "mlp", "depth_width: a composition has one depth"),
    ],
)  # fmt: skip
def test_a_bad_list_is_one_line_at_check_before_any_run_directory(tmp_path, experiment, layers, message):
    images = ["--set", "data.inputs=gaussian", "--set", "data.image=[1, 4, 4]"]
    extra = images if experiment == "scaling" else []
    result = cli(experiment, "--preset", "quick", "--set", f"network.layers={layers}", *extra, "--check",
                 "-o", tmp_path)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not any(tmp_path.iterdir())
