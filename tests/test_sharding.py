"""Units run anywhere, aggregate the same: process pool, one unit per process (--unit), resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_data import write_split
from typer.testing import CliRunner

from ntkrun.cli import app

DATA = Path(tempfile.gettempdir()) / f"ntkrun-sharding-data-{os.getpid()}"
TINY = {
    "convergence": [
        "convergence", "--preset", "quick", "--set", "network.width=[8, 32]", "--seeds", "2", "--steps", "6",
        "--set", "grid.n_angles=16", "--set", "training.n_train=10", "--quiet",
    ],
    "regression": [
        "regression", "--preset", "quick", "--set", "network.width=[16]", "--seeds", "3", "--steps", "20",
        "--set", "grid.n_angles=24", "--quiet",
    ],
    "scaling": [
        "scaling", "--preset", "quick", "--set", "network.width=[16, 64]", "--set", "network.depth=[2, 3]",
        "--seeds", "2", "--steps", "5", "--set", "n_boot=50", "--quiet",
    ],
    "pca": [
        "pca", "--preset", "quick", "--data-dir", DATA, "--set", "data.split=test",
        "--set", "data.n_points=24", "--set", "network.width=[16, 32]", "--seeds", "1", "--steps", "8",
        "--set", "training.record_every=4", "--set", "training.checkpoint_every=4", "--quiet",
    ],
    "generalization": [
        "generalization", "--preset", "quick", "--data-dir", DATA, "--set", "data.n_train=[40, 80]",
        "--set", "data.n_test=30", "--set", "training.n_train=40", "--set", "network.width=[16, 32]",
        "--seeds", "2", "--steps", "5", "--set", "n_boot=50", "--set", "device=cpu", "--quiet",
    ],
    "features": [  # muP at this learning rate amplifies BLAS's last bits (docs/science.md §11.6)
        "features", "--preset", "quick", "--set", "network.width=[64, 512]", "--seeds", "2", "--steps", "60",
        "--set", "training.output_scales=[1.0, 4.0]", "--set", "depth_width=[[2, 64], [3, 128]]",
        "--set", "n_boot=50", "--quiet",
    ],
}  # fmt: skip
CSVS = {
    "convergence": ["kernels.csv", "losses.csv", "summary.csv", "metrics.csv"],
    "regression": ["functions.csv", "limit.csv", "losses.csv", "training.csv", "metrics.csv"],
    "scaling": ["scaling.csv", "fits.csv"],
    "pca": ["eigenvalues.csv", "components.csv", "trajectories.csv", "metrics.csv"],
    "generalization": ["accuracy.csv", "distance.csv", "fits.csv"],
    "features": ["features.csv", "fits.csv"],
}


@pytest.fixture(scope="module", autouse=True)
def _data():
    """The IDX splits the data experiments read (random digits: train and test)."""
    DATA.mkdir()
    write_split(DATA, n=100, split="train")
    write_split(DATA, n=40, split="t10k")
    yield
    shutil.rmtree(DATA, ignore_errors=True)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def complete_run(root: Path, experiment: str) -> Path:
    (run,) = [p for p in (root / experiment).iterdir() if p.name != "latest" and not p.name.startswith(".")]
    assert (run / "meta.json").is_file()
    return run


def assert_same_csvs(a: Path, b: Path, experiment: str) -> None:
    for name in CSVS[experiment]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def inline_runs(tmp_path_factory) -> dict[str, Path]:
    """Each experiment's tiny spec run the ordinary way, in one process."""
    root = tmp_path_factory.mktemp("inline")
    runs = {}
    for experiment, args in TINY.items():
        result = invoke(*args, "--output-root", root)
        assert result.exit_code == 0, result.output
        runs[experiment] = complete_run(root, experiment)
    return runs


@pytest.mark.parametrize("experiment", list(TINY))
def test_one_process_per_unit_aggregates_to_the_same_csvs(experiment, inline_runs, tmp_path):
    """Every unit in its own invocation (as an sbatch array task would), in reverse order; the one
    that completes the set aggregates (a unit that needs a stage-0 reference computes it first),
    and the CSVs equal the one-process run byte for byte."""
    listing = invoke(*TINY[experiment], "--list-units")
    assert listing.exit_code == 0, listing.output
    n = int(listing.stdout.split()[0])
    assert n >= 2 and f"--array=0-{n - 1}" in listing.stdout
    shared = tmp_path / "shared-run"
    order = list(range(n))[::-1]
    for index in order:
        result = invoke(*TINY[experiment], "--unit", str(index), "--run-dir", shared)
        assert result.exit_code == 0, result.output
        done = len([p for p in (shared / "units").glob("*.pt") if ".ckpt" not in p.name])
        assert (shared / "meta.json").is_file() == (done == n)  # complete once every unit is done
    assert done == n
    assert "run aggregated: complete" in result.stdout
    assert_same_csvs(shared, inline_runs[experiment], experiment)


def test_local_pool_gives_the_same_csvs(inline_runs, tmp_path):
    result = invoke(*TINY["convergence"], "--executor", "local", "--jobs", "2", "--output-root", tmp_path)
    assert result.exit_code == 0, result.output
    run = complete_run(tmp_path, "convergence")
    assert_same_csvs(run, inline_runs["convergence"], "convergence")
    assert sorted(p.name for p in (run / "units").glob("*.pt")) == [
        "w32_s0.pt", "w32_s1.pt", "w8_s0.pt", "w8_s1.pt"
    ]  # fmt: skip


def test_a_pool_computes_each_unit_with_the_runs_threads_and_gives_the_inline_bytes(inline_runs, tmp_path):
    """A unit's arithmetic does not depend on the executor: each unit computes with the run's
    executor.threads (this machine's, recorded in spec.yaml), in a pool as inline. The muP networks
    of `features` turn any difference in BLAS's last bits into other networks (with 1 thread a
    worker, as the pool once gave them, change_T moved by up to 51% in the quick preset)."""
    result = invoke(*TINY["features"], "--executor", "local", "--jobs", "2", "--output-root", tmp_path)
    assert result.exit_code == 0, result.output
    run = complete_run(tmp_path, "features")
    assert_same_csvs(run, inline_runs["features"], "features")
    infos = [torch.load(p, weights_only=False)["info"] for p in (run / "units").glob("*.pt")]
    assert {info["threads"] for info in infos} == {torch.get_num_threads()}


def test_status_aggregate_and_resume_of_a_sharded_run(inline_runs, tmp_path):
    shared = tmp_path / "run"
    assert invoke(*TINY["convergence"], "--unit", "w8_s1", "--run-dir", shared).exit_code == 0
    status = invoke("status", shared)
    assert status.exit_code == 0, status.output
    assert "4 units: 3 not started, 1 done; run not aggregated" in status.stdout
    early = invoke("aggregate", shared)
    assert early.exit_code == 1 and "3 unit(s) not done: w8_s0, w32_s0, w32_s1" in early.stderr
    assert not (shared / "meta.json").exists() and not (shared / "metrics.csv").exists()
    result = invoke("resume", shared, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_csvs(shared, inline_runs["convergence"], "convergence")
    assert "4 units: 4 done; run complete" in invoke("status", shared).stdout


def test_a_corrupt_or_truncated_unit_file_is_computed_again(inline_runs, tmp_path):
    shared = tmp_path / "run"
    for unit in ("0", "1", "2", "3"):
        assert invoke(*TINY["convergence"], "--unit", unit, "--run-dir", shared).exit_code == 0
    (shared / "meta.json").unlink()
    good = (shared / "units" / "w8_s0.pt").read_bytes()
    before = torch.load(shared / "units" / "w8_s0.pt", weights_only=True)
    (shared / "units" / "w8_s0.pt").write_bytes(good[: len(good) // 2])  # truncated
    (shared / "units" / "w32_s1.pt").write_bytes(b"\x00garbage")  # corrupt
    result = invoke("resume", shared, "--quiet")
    assert result.exit_code == 0, result.output
    after = torch.load(shared / "units" / "w8_s0.pt", weights_only=True)  # recomputed: same result
    assert after["result"] == before["result"] and after["info"]["pid"] == os.getpid()
    assert_same_csvs(shared, inline_runs["convergence"], "convergence")


def test_sharded_run_input_errors(tmp_path):
    no_dir = invoke(*TINY["convergence"], "--unit", "0")
    assert no_dir.exit_code == 2 and "--unit: needs --run-dir" in no_dir.stderr
    bad_unit = invoke(*TINY["convergence"], "--unit", "99", "--run-dir", tmp_path / "r")
    assert bad_unit.exit_code == 2 and "--unit 99: no such unit (this spec has 4" in bad_unit.stderr
    assert not (tmp_path / "r").exists()
    assert invoke(*TINY["convergence"], "--unit", "0", "--run-dir", tmp_path / "r").exit_code == 0
    other = invoke(*TINY["convergence"], "--steps", "7", "--unit", "1", "--run-dir", tmp_path / "r")
    assert other.exit_code == 2 and "holds a run of another spec" in other.stderr
    assert "Traceback" not in no_dir.output + bad_unit.output + other.output
    missing = invoke("status", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "not a run directory" in missing.stderr


def test_resume_may_change_only_the_executor(tmp_path):
    diverging = [*TINY["convergence"], "--set", "training.lr=1e8", "--output-root", tmp_path]
    assert invoke(*diverging).exit_code == 1
    (failed,) = (tmp_path / "convergence").iterdir()
    before = (failed / "spec.yaml").read_text()
    changed = invoke("resume", failed, "--set", "training.lr=0.5")
    assert changed.exit_code == 2 and "on resume only executor.* and data.dir may change" in changed.stderr
    assert failed.is_dir() and (failed / "spec.yaml").read_text() == before  # untouched, not moved
    same = invoke("resume", failed, "--executor", "local", "--jobs", "2")
    assert same.exit_code == 1 and "training diverged" in same.stderr  # the same spec, run elsewhere


def test_a_stale_aggregation_lock_does_not_block_the_run(tmp_path):
    shared = tmp_path / "run"
    for unit in ("0", "1", "2"):
        assert invoke(*TINY["convergence"], "--unit", unit, "--run-dir", shared).exit_code == 0
    (shared / "aggregate.lock").write_text(f"{os.uname().nodename} {2**22 + 12345}\n")  # no such pid
    result = invoke(*TINY["convergence"], "--unit", "3", "--run-dir", shared)
    assert result.exit_code == 0 and "run aggregated: complete" in result.stdout
    assert not (shared / "aggregate.lock").exists() and (shared / "meta.json").is_file()


def test_a_live_aggregation_lock_is_respected(tmp_path):
    shared = tmp_path / "run"
    for unit in ("0", "1", "2", "3"):
        assert invoke(*TINY["convergence"], "--unit", unit, "--run-dir", shared).exit_code == 0
    (shared / "meta.json").unlink()
    (shared / "aggregate.lock").write_text(f"{os.uname().nodename} {os.getpid()}\n")  # alive: us
    assert "being aggregated by" in invoke("status", shared).stdout
    blocked = invoke("aggregate", shared)
    assert (
        blocked.exit_code == 1
        and f"being aggregated by {os.uname().nodename} {os.getpid()}" in blocked.stderr
    )
    (shared / "aggregate.lock").unlink()
    assert invoke("aggregate", shared).exit_code == 0 and (shared / "meta.json").is_file()


def test_an_interrupted_shared_run_completes_without_its_old_error(tmp_path, monkeypatch):
    import ntkrun.runners.convergence as convergence

    shared = tmp_path / "run"
    original, calls = convergence.RUNNER.run_unit, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(convergence, "RUNNER", replace(convergence.RUNNER, run_unit=interrupted))
    assert invoke(*TINY["convergence"], "--run-dir", shared).exit_code == 130
    monkeypatch.undo()
    assert (shared / "ERROR").is_file() and not (shared / "meta.json").exists()
    for unit in ("1", "2", "3"):
        result = invoke(*TINY["convergence"], "--unit", unit, "--run-dir", shared)
        assert result.exit_code == 0, result.output
    assert "run aggregated: complete" in result.stdout and not (shared / "ERROR").exists()
    assert "run complete" in invoke("status", shared).stdout


def test_a_signal_just_after_completion_leaves_the_run_complete(tmp_path, monkeypatch):
    """A real SIGINT sent to this process while finalize writes meta.json (signals held until the
    rename and `latest` are done): the run completes, then the interrupt is reported."""
    from ntkrun.rundir import COMPLETE_MARKER, RunDir

    original = RunDir.write_text

    def write_then_signal(self, name, text):
        path = original(self, name, text)
        if name == COMPLETE_MARKER:
            os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(RunDir, "write_text", write_then_signal)
    # Ctrl-C raises KeyboardInterrupt here whatever this process inherited: a test runner started
    # in the background (as CI may be) has SIGINT ignored, and then the signal would do nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = invoke(*TINY["convergence"], "--output-root", tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert result.exit_code == 130 and "after the run completed" in result.stderr
    run = complete_run(tmp_path, "convergence")
    assert not (run / "ERROR").exists() and (tmp_path / "convergence" / "latest").resolve() == run.resolve()


def test_resume_of_the_current_directory(tmp_path, monkeypatch):
    assert invoke(*TINY["convergence"], "--set", "training.lr=1e8", "--output-root", tmp_path).exit_code == 1
    (failed,) = (tmp_path / "convergence").iterdir()
    monkeypatch.chdir(failed)
    result = invoke("resume", ".")
    assert result.exit_code == 1 and "training diverged" in result.stderr  # resumed, not "complete"


def test_units_of_different_thread_counts_are_reported_by_status_and_aggregate(tmp_path):
    """The thread count (and the device) a unit ran with is recorded; a run whose units disagree
    says so in `status` and in meta.json, since their last bits differ."""
    shared = tmp_path / "run"
    args = [*TINY["convergence"], "--run-dir", shared]
    assert invoke(*args, "--unit", "w8_s0", "--set", "executor.threads=1").exit_code == 0
    for unit in ("w8_s1", "w32_s0"):
        assert invoke(*args, "--unit", unit, "--set", "executor.threads=2").exit_code == 0
    status = invoke("status", shared)
    assert status.exit_code == 0, status.output
    assert "units computed on different thread counts: 1 (1 units), 2 (2 units)" in status.stdout
    assert invoke(*args, "--unit", "w32_s1").exit_code == 0  # the last one aggregates
    meta = json.loads((shared / "meta.json").read_text())
    expected = Counter(["1", "2", "2", str(torch.get_num_threads())])  # the last: this machine's
    assert meta["mixed_units"]["threads"] == dict(expected)
    info = torch.load(shared / "units" / "w8_s0.pt", weights_only=False)["info"]
    assert info["threads"] == 1 and info["device_name"].startswith("cpu: ")


def test_resolving_the_device_turns_tf32_off():
    """cuDNN's convolutions round float32 to a 10-bit mantissa (TF32) unless told not to."""
    from ntkrun.runners.common import resolve_device

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    resolve_device("cpu")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_a_pool_computes_each_monte_carlo_share_of_pcas_reference_once(tmp_path, monkeypatch):
    """Units say what they read (`needs`) and run after it: pca's reference reads the Monte-Carlo
    shares of a module's limit, so it runs in the stage after them, and the networks after it. With
    both in stage 0, a worker that took the reference recomputed the shares inline, serially."""
    from faults import unit_main_counting

    import ntkrun.executors.local

    (tmp_path / "poolmodel.py").write_text(
        "import math\n\nimport torch\nfrom torch import nn\n\n\ndef net(width, in_shape):\n    return "
        "nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.Tanh(), nn.Linear(width, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    counts = tmp_path / "counts"
    monkeypatch.setenv("COUNT_FILE", str(counts))
    monkeypatch.setattr(ntkrun.executors.local, "unit_main", unit_main_counting)
    args = [*TINY["pca"], "--set", "network.module=poolmodel:net", "--set", "kernels.mc_samples=8",
            "--set", "training.lr=0.05", "--executor", "local", "--jobs", "2",
            "--output-root", tmp_path / "out"]  # fmt: skip
    listed = invoke(*args, "--list-units")
    assert listed.exit_code == 0, listed.output
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    starts = counts.read_text().split()
    assert sorted(starts) == sorted(set(starts)) and len(starts) == 4, starts  # 4 shares, once each
    # the reference starts once every share has ended, the networks once it has (a stage barrier:
    # with the reference among the shares, it started while the other worker's share was running)
    events = (tmp_path / "counts.events").read_text().splitlines()
    shares_end = max(events.index(f"end limit_{i}") for i in range(4))
    assert events.index("start reference") > shares_end, events
    assert min(i for i, e in enumerate(events) if e.startswith("start w")) > events.index("end reference")
