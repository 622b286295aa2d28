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
