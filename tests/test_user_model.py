"""The user's own torch model (`network.module: "pkg.mod:factory"`): a residual MLP written with
plain nn.Linear runs through `convergence` from a folder on PYTHONPATH, its limit by Monte Carlo
with a standard error; its source file is part of the run's identity (an edited model is refused on
resume, naming the file); every way a factory can be wrong is one line at --check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ntkrun.cli import app

RESIDUAL = '''
import torch
from torch import nn


class Residual(nn.Module):
    """x -> x + W2 tanh(W1 x) blocks between an input and a readout layer, torch's default init."""

    def __init__(self, n0, width, depth, n_out):
        super().__init__()
        self.inp = nn.Linear(n0, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(max(depth - 2, 0)))
        self.out = nn.Linear(width, n_out)
        self.n_out = n_out

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h)) / len(self.blocks)
        y = self.out(h)
        return y[:, 0] if self.n_out == 1 else y


def residual(width, depth, in_shape, n_out):
    return Residual(in_shape[0], width, depth, n_out)
'''
TINY = ["convergence", "--preset", "quick", "--set", "network.width=[16, 64]", "--seeds", "2", "--steps", "5",
        "--set", "grid.n_angles=16", "--set", "training.n_train=10", "--set", "training.lr=0.05",
        "--set", "kernels.mc_samples=10", "--quiet"]  # fmt: skip


def ntkrun(cwd: Path, models: Path, *args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(models)}
    command = [sys.executable, "-m", "ntkrun", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    models, work = tmp_path / "models", tmp_path / "work"
    models.mkdir()
    work.mkdir()
    (models / "usermodel.py").write_text(RESIDUAL)
    return models, work


def test_a_user_model_runs_through_convergence_with_a_monte_carlo_limit(folders):
    models, work = folders
    result = ntkrun(
        work, models, *TINY, "--set", "network.module=usermodel:residual", "--set", "network.depth=3"
    )
    assert result.returncode == 0, result.stderr
    run = (work / "outputs" / "convergence" / "latest").resolve()
    summary = pd.read_csv(run / "summary.csv")
    assert (summary["theta_inf_se"] > 0).all() and summary["theta_inf"].notna().all()
    assert sorted(p.name for p in (run / "units").glob("limit_*.pt")) == [f"limit_{i}.pt" for i in range(4)]
    source = str((models / "usermodel.py").resolve())
    meta = json.loads((run / "meta.json").read_text())
    assert list(meta["model_sources"]) == [source]
    assert (
        json.loads((run / "identity.json").read_text())["data"][f"model source {source}"]
        == meta["model_sources"][source]
    )
    # the networks trained (torch's default initialization: the standard parametrization, whose
    # stable learning rate shrinks with the width) and their kernels moved by a little
    metrics = pd.read_csv(run / "metrics.csv").set_index(["width", "step"])
    for width in (16, 64):
        assert metrics.loc[(width, 5), "loss"] < metrics.loc[(width, 0), "loss"]
        assert 0 < metrics.loc[(width, 5), "rel_change_from_first"] < 0.5
    assert (run / "figure.png").is_file()


def test_an_edited_model_is_refused_on_resume_naming_its_file(folders):
    models, work = folders
    shared = work / "shared-run"
    first = ntkrun(
        work, models, *TINY, "--set", "network.module=usermodel:residual", "--unit", "0", "--run-dir", shared
    )
    assert first.returncode == 0, first.stderr
    with open(models / "usermodel.py", "a") as fh:
        fh.write("\n# edited\n")
    resumed = ntkrun(work, models, "resume", shared, "--quiet")
    assert resumed.returncode == 2, resumed.stderr
    assert "was computed by another version of the model: " in resumed.stderr
    assert (
        str((models / "usermodel.py").resolve()) in resumed.stderr
        and "(the file was edited since)" in resumed.stderr
    )
    assert "Traceback" not in resumed.stderr


def test_an_edited_helper_of_a_model_package_is_refused_on_resume_naming_it(tmp_path):
    """The model's identity covers the files it imports from its package, not only the factory's."""
    models, work = tmp_path / "models", tmp_path / "work"
    (models / "mypkg").mkdir(parents=True)
    work.mkdir()
    (models / "mypkg" / "__init__.py").write_text("")
    (models / "mypkg" / "blocks.py").write_text("import torch\nSCALE = 1.0\n")
    (models / "mypkg" / "nets.py").write_text(
        "import torch\nfrom mypkg.blocks import SCALE\n\n\ndef net(width, in_shape):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(in_shape[0], width), torch.nn.Tanh(),"
        " torch.nn.Linear(width, 1))\n"
    )
    shared = work / "shared-run"
    args = [*TINY, "--set", "network.module=mypkg.nets:net"]
    first = ntkrun(work, models, *args, "--unit", "0", "--run-dir", shared)
    assert first.returncode == 0, first.stderr
    sources = json.loads((shared / "identity.json").read_text())["data"]
    helper = str((models / "mypkg" / "blocks.py").resolve())
    assert f"model source {helper}" in sources
    (models / "mypkg" / "blocks.py").write_text("import torch\nSCALE = 2.0\n")
    resumed = ntkrun(work, models, "resume", shared, "--quiet")
    assert resumed.returncode == 2, resumed.stderr
    assert f"another version of the model: {helper} had digest" in resumed.stderr
    assert "(the file was edited since)" in resumed.stderr


BAD = {  # (the factory's source, network.module, the error's words)
    "missing": ("", "nosuchmodel_{u}:f", "cannot import 'nosuchmodel_{u}' (ModuleNotFoundError"),
    "no attribute": ("x = 1\n", "{m}:factory", "has no 'factory'"),
    "not callable": ("factory = 3\n", "{m}:factory", "usermodel_bad_{u}:factory is a int, not a function"),
    "not a module": ("def factory(width):\n    return [width]\n", "{m}:factory",
                     "returned list, not a torch.nn.Module"),
    "output shape": ("import torch\ndef factory(width, in_shape):\n"
                     "    return torch.nn.Linear(in_shape[0], 3)\n", "{m}:factory",
                     "returns outputs of shape (3, 3) on 3 inputs, not (3,) or (3, 1)"),
    "input shape": ("import torch\ndef factory(width):\n    return torch.nn.Linear(5, 1)\n", "{m}:factory",
                    "rejects inputs of shape (3, 2): mat1 and mat2 shapes cannot be multiplied"),
    "batch-dependent": ("import torch\nfrom torch import nn\ndef factory(width, in_shape):\n"
                        "    return nn.Sequential(nn.Linear(in_shape[0], width), nn.BatchNorm1d(width),"
                        " nn.Linear(width, 1), nn.Flatten(0))\n", "{m}:factory",
                        "the output of a sample changes with its batch"),
    "frozen": ("import torch\ndef factory(width, in_shape):\n    net = torch.nn.Linear(in_shape[0], 1)\n"
               "    net.requires_grad_(False)\n    return net\n", "{m}:factory",
               "without trainable parameters"),
    "width ignored": ("import torch\ndef factory(in_shape):\n    return torch.nn.Linear(in_shape[0], 1)\n",
                      "{m}:factory", "the spec varies width, but usermodel_bad_{u}:factory takes no 'width'"),
    "form": ("", "usermodel.factory", "network: module: 'usermodel.factory' is not of the form"),
    "images on points": ("import torch\ndef factory(width, in_shape):\n    c, h, w = in_shape\n"
                         "    return torch.nn.Conv2d(c, 1, 3)\n", "{m}:factory",
                         "failed to build a network of width 16 for in_shape (2,) (ValueError: not enough "
                         "values to unpack"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_model_is_one_line_at_check(case, tmp_path, monkeypatch):
    source, path, message = BAD[case]
    u = uuid.uuid4().hex[:8]  # a module name of its own: imports are cached per process
    name = f"usermodel_bad_{u}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)  # importable from the working directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = path.format(m=name, u=u)
    result = CliRunner().invoke(
        app, [*TINY, "--set", f"network.module={spec}", "--check", "-o", tmp_path / "out"]
    )
    assert result.exit_code == 2, result.output
    assert message.format(u=u) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_experiment_without_user_models_refuses_one(tmp_path):
    result = CliRunner().invoke(
        app, ["regression", "--preset", "quick", "--set", "network.module=a.b:c", "--check"]
    )
    message = "network.module: regression does not run a user's model yet (convergence, scaling, pca and"
    assert result.exit_code == 2 and message in result.stderr


def test_a_user_model_runs_through_scaling_with_rates_that_need_no_limit(folders):
    """`scaling --preset quick` on the residual MLP (two depths, so the factory's depth parameter is
    used): its Monte-Carlo limit is shares of units per (depth, seed) that the seed's networks read, and
    the seed spread of the NTK at init is fitted beside the distance to that limit."""
    models, work = folders
    args = ["scaling", "--preset", "quick", "--set", "network.module=usermodel:residual", "--set",
            "network.width=[16, 32, 64]", "--seeds", "3", "--steps", "3", "--set", "training.lr=0.05",
            "--set", "kernels.mc_samples=4", "--set", "n_boot=50", "--quiet"]  # fmt: skip
    listed = ntkrun(work, models, *args, "--list-units")
    assert listed.returncode == 0, listed.stderr
    assert "limit_d2_s0_1" in listed.stdout and "(stage 0: before the others)" in listed.stdout
    result = ntkrun(work, models, *args)
    assert result.returncode == 0, result.stderr
    run = (work / "outputs" / "scaling" / "latest").resolve()
    table = pd.read_csv(run / "scaling.csv")
    assert len(table) == 2 * 3 * 3 and (table[["dist_init", "spread_init", "change_T"]] > 0).all().all()
    fits = pd.read_csv(run / "fits.csv")
    assert set(fits["metric"]) == {"dist_init", "spread_init", "change_T", "func_dist_T"}
    assert len(list((run / "units").glob("limit_d*_s*_*.pt"))) == 2 * 3 * 2  # 4 networks: 2 shares
    # the metrics that read the limit carry its jackknife standard error over the 2 shares
    assert (table[["dist_init_se", "func_dist_T_se"]] > 0).all().all()
    assert table[["dist_init_se", "func_dist_T_se"]].notna().all().all()


HEAD = '''
import math

import torch
from torch import nn

import ntkrun


def plain(width, in_shape, n_out):
    """The usual torch model: nn.Linear(width, 1) as its head, outputs (N, 1)."""
    n0 = math.prod(in_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(n0, width), nn.Tanh(), nn.Linear(width, n_out))


class Column(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[:, None]


def mlp_column(width, depth, in_shape, n_out, seed):
    """ntkrun's own MLP (the same weights as network.arch mlp draws), its one output as (N, 1)."""
    net = ntkrun.MLP(in_shape[0], width, depth, seed=seed, n_out=n_out)
    return Column(net) if n_out == 1 else net
'''


@pytest.fixture
def head_model(tmp_path, monkeypatch) -> str:
    (tmp_path / "headmodel.py").write_text(HEAD)
    monkeypatch.chdir(tmp_path)  # importable from the working directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    return "headmodel"


def test_a_model_with_an_n_by_1_head_trains_through_every_experiment_that_takes_modules(
    head_model, digits, images, tmp_path
):
    """nn.Linear(width, 1) returns (N, 1): one output, squeezed once at the description (it used to
    pass --check and then fail mid-run: an (N, N, 1, 1) NTK, pca's target broadcast to (N, N))."""
    runs = {
        "convergence": [*TINY],
        "scaling": ["scaling", "--preset", "quick", "--set", "network.width=[16, 32]", "--set",
                    "network.depth=[2]", "--seeds", "2", "--steps", "3", "--set", "kernels.mc_samples=4",
                    "--set", "training.lr=0.05",
                    "--set", "n_boot=20", "--quiet"],
        "pca": ["pca", "--preset", "quick", "--data-dir", str(digits), "--set", "data.split=test", "--set",
                "data.n_points=24", "--set", "kernels.mc_samples=4", "--width", "16", "--seeds", "1",
                "--steps", "8", "--set", "training.record_every=4", "--set", "training.lr=0.05", "--quiet"],
        "generalization": ["generalization", "--preset", "quick", "--data-dir", str(images), "--set",
                           "device=cpu", "--set", "network.width=[16]", "--seeds", "2", "--set",
                           "predictors=[ntk, net]", "--set", "data.n_train=[40]", "--set", "data.n_test=30",
                           "--set", "training.n_train=40", "--set", "training.steps=3", "--set",
                           "kernels.mc_samples=4", "--set", "training.lr=0.002", "--quiet"],
    }  # fmt: skip
    for experiment, args in runs.items():
        out = tmp_path / "out"
        result = CliRunner().invoke(app, [*args, "--set", f"network.module={head_model}:plain", "-o", out])
        assert result.exit_code == 0, (experiment, result.output)
        assert (out / experiment / "latest" / "meta.json").is_file()


def test_a_user_models_distance_to_its_limit_is_the_mlps_within_its_standard_error(head_model, tmp_path):
    """ntkrun's MLP as a user model (with an (N, 1) output): its networks are the built-in MLP's, so
    its dist_init differs from the built-in run's only by the Monte-Carlo limit's error, which the
    run reports (dist_init_se), plus that limit's finite-width bias (1/limit_width = 0.4%). A
    factor-2 error in a module's dist_init fails this."""
    args = ["scaling", "--preset", "quick", "--set", "network.width=[16, 64]", "--set", "network.depth=[3]",
            "--seeds", "3", "--steps", "3", "--set", "n_boot=20", "--quiet"]  # fmt: skip
    tables = []
    for extra in (
        ["--set", f"network.module={head_model}:mlp_column", "--set", "kernels.mc_samples=32",
         "--set", "kernels.limit_width=256"],
        [],
    ):  # fmt: skip
        out = tmp_path / f"out{len(tables)}"
        result = CliRunner().invoke(app, [*args, *extra, "-o", out])
        assert result.exit_code == 0, result.output
        tables.append(pd.read_csv(out / "scaling" / "latest" / "scaling.csv").set_index(["width", "seed"]))
    module, mlp = tables
    assert (module["spread_init"] - mlp["spread_init"]).abs().max() < 1e-4 * mlp["spread_init"].max()
    gap = (module["dist_init"] - mlp["dist_init"]).abs()
    assert (gap <= 4 * module["dist_init_se"] + 0.004 * mlp["dist_init"]).all(), pd.concat(
        [module["dist_init"], mlp["dist_init"], module["dist_init_se"]], axis=1
    )
    assert (module["dist_init_se"] < 0.25 * module["dist_init"]).all()  # a test with teeth


def test_a_factory_without_depth_is_told_the_fix_and_captioned_without_one(tmp_path, monkeypatch):
    """scaling's several depths on a factory that takes none: refused naming the key to set; and a
    figure's caption names no depth for it (it said "(depth 4)" of a 2-layer model)."""
    from ntkrun.runners.common import network_caption

    u = uuid.uuid4().hex[:8]
    (tmp_path / f"nodepth_{u}.py").write_text(
        "import torch\ndef factory(width, in_shape):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(in_shape[0], width), torch.nn.Tanh(),"
        " torch.nn.Linear(width, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    args = ["scaling", "--preset", "quick", "--set", f"network.module=nodepth_{u}:factory", "--check"]
    result = CliRunner().invoke(app, [*args, "--set", "network.depth=[2, 3]"])
    assert result.exit_code == 2, result.output
    assert "give network.depth one value (--set network.depth=...)" in result.stderr
    assert "or add 'depth' to the factory's parameters" in result.stderr
    network = types.SimpleNamespace(module=f"nodepth_{u}:factory", depth=4)
    assert network_caption(network) == f"nodepth_{u}:factory"
    (tmp_path / f"withdepth_{u}.py").write_text("def factory(width, depth):\n    pass\n")
    network = types.SimpleNamespace(module=f"withdepth_{u}:factory", depth=4)
    assert network_caption(network) == f"withdepth_{u}:factory (depth 4)"
