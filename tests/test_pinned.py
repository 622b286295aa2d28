"""What every command computes is pinned: the quick presets' CSVs against tests/pinned/."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import REAL_MNIST
from typer.testing import CliRunner

from ntkrun.cli import app

PINNED = Path(__file__).parent / "pinned"
EXTRA = {"pca": ["--data-dir", str(REAL_MNIST), "--set", "data.split=test"]}


def this_machine() -> dict:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),  # the kernels BLAS picks (AVX2, AVX512)
    }


@pytest.mark.parametrize("experiment", ["convergence", "regression", "scaling", "pca"])
def test_quick_preset_csvs_are_pinned(experiment, tmp_path):
    if experiment == "pca" and not REAL_MNIST:
        pytest.skip("set NTKRUN_TEST_MNIST to a folder with MNIST (.ci/run does)")
    args = [experiment, "--preset", "quick", "--set", "device=cpu", "--quiet", "-o", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, *EXTRA.get(experiment, [])])
    assert result.exit_code == 0, result.output
    run = tmp_path / experiment / "latest"
    pinned = sorted((PINNED / experiment).glob("*.csv"))
    assert sorted(p.name for p in run.glob("*.csv")) == [p.name for p in pinned]
    same_machine = json.loads((PINNED / "environment.json").read_text()) == this_machine()
    for path in pinned:
        if same_machine:  # same spec, seed and machine: byte-identical (docs/guides/run-directories.md)
            assert (run / path.name).read_bytes() == path.read_bytes(), path.name
            continue
        # Another BLAS or thread count sums in another order: float32 networks differ in the last
        # bits (~1e-7 relative) and a few dozen GD steps of a contracting map keep that far below
        # 1e-4; any change to what is computed moves values by far more.
        ours, theirs = pd.read_csv(run / path.name), pd.read_csv(path)
        assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs), path.name
        for column in theirs.columns:
            if theirs[column].dtype.kind == "f":
                np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-4, atol=1e-6, err_msg=column)
            else:
                assert (ours[column] == theirs[column]).all(), (path.name, column)
