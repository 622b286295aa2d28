"""The example models of examples/models.py pass every check a user model must pass, and the
standard-parametrized CNN runs through `scaling` on Gaussian images end to end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ntkrun.architectures.module import ModuleArchitecture, check_module
from ntkrun.cli import app

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.mark.parametrize(
    ("factory", "shape"),
    [("residual_mlp", (5,)), ("ntk_mlp", (5,)), ("small_cnn", (1, 4, 4)), ("residual_mlp", (1, 4, 4))],
)
@pytest.mark.parametrize("n_out", [1, 3])
def test_every_example_passes_the_checks(factory, shape, n_out, examples_on_path):
    description = ModuleArchitecture(shape, 3, module=f"models:{factory}")
    check_module(description, [4, 8], n_out, {"width", "depth"})  # raises on any problem
    flops, params, numbers = description.probe(8, n_out)
    assert flops > 0 and params > 0 and numbers > 0


def test_the_standard_parametrized_cnn_runs_through_scaling(examples_on_path, tmp_path):
    args = ["scaling", "--preset", "quick", "--set", "network.module=models:small_cnn", "--set",
            "data.inputs=gaussian", "--set", "data.image=[1, 4, 4]", "--set", "data.n_points=4", "--set",
            "network.width=[4, 8, 16]", "--set", "network.depth=[2]", "--seeds", "2", "--steps", "2",
            "--set", "training.n_train=8", "--set", "training.lr=0.01", "--set", "kernels.mc_samples=4",
            "--set", "n_boot=20", "--quiet", "-o", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "scaling" / "latest" / "scaling.csv")
    assert len(table) == 3 * 2 and table[["spread_init", "change_T"]].notna().all().all()


def pca_args(digits: Path, tmp_path: Path) -> list[str]:
    return ["pca", "--preset", "quick", "--data-dir", str(digits), "--set", "data.split=test", "--set",
            "data.n_points=24", "--set", "network.module=models:residual_mlp", "--set", "kernel=analytic",
            "--set", "kernels.mc_samples=4", "--width", "16", "--seeds", "1", "--steps", "8", "--set",
            "training.record_every=4", "--quiet", "-o", str(tmp_path)]  # fmt: skip


def test_a_user_model_runs_through_pca_on_its_monte_carlo_kernel(examples_on_path, digits, tmp_path):
    result = CliRunner().invoke(app, pca_args(digits, tmp_path))
    assert result.exit_code == 0, result.output
    eig = pd.read_csv(tmp_path / "pca" / "latest" / "eigenvalues.csv")
    assert (eig["rel_diff"] < 1e-8).all() and eig["lambda_power"].is_monotonic_decreasing
    # the limit in 2 shares of 2 networks: each eigenvalue's jackknife standard error, and lambda_k's
    assert (eig["lambda_se"] > 0).all() and eig["lambda_se"].notna().all()
    metrics = pd.read_csv(tmp_path / "pca" / "latest" / "metrics.csv")
    assert (metrics["lambda_k_se"] == eig["lambda_se"][1]).all()  # component 2 (the preset's)


def test_a_monte_carlo_reference_is_shared_only_where_its_width_is_fixed(examples_on_path, digits, tmp_path):
    """pca's reference ignores the networks' widths, except a module's Monte-Carlo limit, whose
    width defaults to the largest of them: a sweep over network.width shares it only once
    kernels.limit_width fixes it; a sweep over training.lr always does."""

    def shared(*sweep: str) -> bool:
        args = pca_args(digits, tmp_path)
        if "network.width" in sweep[1]:  # the width is swept, not given
            del args[args.index("--width") : args.index("--width") + 2]
        listed = CliRunner().invoke(app, [*args, *sweep, "--list-units"])
        assert listed.exit_code == 0, listed.output
        return "p00.reference" in listed.output and "p01.reference" not in listed.output

    assert not shared("--sweep", "network.width=[16],[32]")
    assert shared("--sweep", "network.width=[16],[32]", "--set", "kernels.limit_width=64")
    assert shared("--sweep", "training.lr=0.5,1.0")


def test_a_user_model_runs_through_generalization_beside_the_mlp(examples_on_path, images, tmp_path):
    """The residual MLP's Monte-Carlo NTK and NNGP (one unit per N_train: one pass gives both), the
    MLP's analytic NTK on the same points, and trained residual networks with 10 outputs."""
    args = ["generalization", "--preset", "quick", "--data-dir", str(images), "--set", "device=cpu",
            "--set", "network.module=models:residual_mlp", "--set", "network.width=[16]", "--seeds", "2",
            "--set", "predictors=[ntk, nngp, mlp_ntk, net]", "--set", "data.n_train=[40]", "--set",
            "data.n_test=30", "--set", "training.n_train=40", "--set", "training.steps=3", "--set",
            "training.lr=1.0", "--set", "kernels.mc_samples=4", "--quiet", "-o", str(tmp_path)]  # fmt: skip
    listed = CliRunner().invoke(app, [*args, "--list-units"])
    assert listed.exit_code == 0 and "ntk+nngp_n40" in listed.output, listed.output
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    acc = pd.read_csv(tmp_path / "generalization" / "latest" / "accuracy.csv")
    assert {"ntk", "nngp", "mlp_ntk", "net", "ntk_t"} <= set(acc["predictor"])
    assert acc["test_accuracy"].between(0, 1).all()
    # the module's kernels (4 networks in 2 shares): each score with its jackknife standard error
    assert (
        "limit_n40_1" in listed.output
        and len(list((tmp_path / "generalization" / "latest" / "units").glob("limit_n40_*.pt"))) == 2
    )
    own = acc[acc["predictor"].isin(["ntk", "nngp"])]
    assert (own["test_mse_se"] > 0).all() and (own["test_accuracy_se"] >= 0).all()
    assert (
        acc[~acc["predictor"].isin(["ntk", "nngp"])][["test_accuracy_se", "test_mse_se"]].isna().all().all()
    )
