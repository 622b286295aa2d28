from __future__ import annotations

import json

import pandas as pd
import pytest

from ntkrun.runs import RunDir, is_complete, latest_run, open_run
from ntkrun.spec import ConvergenceSpec


def test_a_run_is_hidden_until_finalized(tmp_path):
    spec = ConvergenceSpec()
    run = RunDir(tmp_path, spec)
    assert run.path.name.startswith(".") and run.path.name.endswith(".partial")
    run.write_csv("x.csv", pd.DataFrame({"a": [1]}))
    assert latest_run(tmp_path) is None
    final = run.finalize("cpu")
    assert not final.name.startswith(".") and is_complete(final)
    assert (tmp_path / "convergence" / "latest").resolve() == final
    assert latest_run(tmp_path) == final
    meta = json.loads((final / "meta.json").read_text())
    assert meta["device"] == "cpu" and meta["seeds"] == list(range(10)) and meta["wall_time_s"] >= 0
    assert (final / "spec.yaml").read_text().startswith("experiment: convergence")


def test_failure_is_recorded_and_reraised(tmp_path):
    with pytest.raises(RuntimeError), open_run(tmp_path, ConvergenceSpec()) as run:
        raise RuntimeError("boom")
    assert run.path.name.endswith(".failed")
    assert (run.path / "ERROR").read_text() == "RuntimeError: boom\n"
    assert not is_complete(run.path) and latest_run(tmp_path) is None


def test_same_second_same_spec_gets_a_second_name(tmp_path):
    a, b = RunDir(tmp_path, ConvergenceSpec()), RunDir(tmp_path, ConvergenceSpec())
    b.start, b.name = a.start, a.name  # force the collision
    fa, fb = a.finalize("cpu"), b.finalize("cpu")
    assert fa != fb and fb.name == f"{fa.name}-2"
