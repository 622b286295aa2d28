"""ntkrun on a real SLURM: a single-node cluster (slurmctld + slurmd + munged) started by
slurm_cluster.sh for this module. Needs root and Debian's slurm-wlm and munge (installed when
missing); deselect with `-m "not cluster"` where that is impossible."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ntkrun.cli import app

pytestmark = pytest.mark.cluster
SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
TINY = [
    "convergence", "--preset", "quick", "--set", "network.width=[8, 32]", "--seeds", "2", "--steps", "6",
    "--set", "grid.n_angles=16", "--set", "training.n_train=10", "--quiet",
]  # fmt: skip
SLURM = [
    "--executor",
    "slurm",
    "--slurm-partition",
    "debug",
    "--slurm-time",
    "10",
    "--set",
    "executor.slurm.cpus=1",
]
CSVS = ["kernels.csv", "losses.csv", "summary.csv", "metrics.csv"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Start the cluster; -> the environment its clients need (SLURM_CONF, PATH)."""
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM tests start slurmctld/slurmd as root; run as root or deselect -m 'not cluster'"
        )
    install = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    folder = tempfile.mkdtemp(prefix="ntks", dir="/tmp")  # short: unix socket paths are limited
    start = subprocess.run(["bash", str(SCRIPT), "start", folder], capture_output=True, text=True)
    assert start.returncode == 0, start.stderr[-3000:]
    env = dict(os.environ)
    for line in start.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.replace("$PATH", os.environ["PATH"])
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update({k: env[k] for k in saved})  # for squeue calls made in this process
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, text=True)


def holding(cluster: dict[str, str], task: str, point: str, marker: Path) -> dict[str, str]:
    """The cluster's environment plus a fault that holds array task `task` (or "any" job) at the
    first `point` of tests/faults.py until it is cancelled or requeued (fault_site/)."""
    fault = {"FAULT_TASK": task, "FAULT_POINT": point, "FAULT_N": "1", "FAULT_ACTION": "HOLD"}
    site = {"PYTHONPATH": str(SCRIPT.with_name("fault_site")), "FAULT_MARKER": str(marker)}
    return {**cluster, **fault, **site}


def ntkrun(env: dict[str, str], *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ntkrun", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dir_of(stdout: str) -> Path:
    match = re.search(r"run directory: (\S+)", stdout)
    assert match, stdout
    return Path(match.group(1))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local")
    result = CliRunner().invoke(app, [*TINY, "--output-root", str(root)])
    assert result.exit_code == 0, result.output
    return run_dir_of(result.stdout.replace("\n", ""))


def test_sweep_through_slurm_equals_a_local_run(cluster, local_run, tmp_path):
    result = ntkrun(cluster, *TINY, *SLURM, "--wait", "--output-root", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "submitted 4 unit(s) as SLURM job(s)" in result.stdout
    run = run_dir_of(result.stdout)
    assert (run / "meta.json").is_file()
    for name in CSVS:
        assert (run / name).read_bytes() == (local_run / name).read_bytes(), name
    status = ntkrun(cluster, "status", run)
    assert "4 units: 4 done; run complete" in status.stdout, status.stdout
    assert status.stdout.count("job ") >= 4  # every unit ran as an array task


def test_a_sweep_through_slurm_equals_the_same_sweep_run_here(cluster, tmp_path):
    """A 2-point sweep (depth 2, 3) is one submission of all its 8 units as one array; the last job
    aggregates every point and the run's tables, byte for byte those of the sweep run inline."""
    sweep = ["--sweep", "network.depth=2,3"]
    here = CliRunner().invoke(app, [*TINY, *sweep, "--output-root", str(tmp_path / "here")])
    assert here.exit_code == 0, here.output
    reference = run_dir_of(here.stdout.replace("\n", ""))
    result = ntkrun(cluster, *TINY, *sweep, *SLURM, "--wait", "--output-root", tmp_path / "slurm")
    assert result.returncode == 0, result.stderr
    assert "submitted 8 unit(s) as SLURM job(s)" in result.stdout
    run = run_dir_of(result.stdout)
    for name in [*CSVS, "points.csv"]:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    for point in ("p00", "p01"):
        for name in CSVS:
            ours, theirs = run / "points" / point / name, reference / "points" / point / name
            assert ours.read_bytes() == theirs.read_bytes(), (point, name)
    status = ntkrun(cluster, "status", run)
    assert "8 units: 8 done; run complete" in status.stdout and "points of the sweep (2)" in status.stdout


def test_a_cancelled_job_is_resubmitted_by_resume(cluster, local_run, tmp_path):
    """Unit w32_s0 (array task 2) is held inside its first GD step (tests/faults.py, armed in that
    task only through fault_site/sitecustomize.py) until the test has cancelled it: whatever the
    machine's speed, the job is cancelled while it runs, never after it finished."""
    marker = tmp_path / "held"
    held = holding(cluster, "2", "gd-step", marker)
    submitted = ntkrun(held, *TINY, *SLURM, "--output-root", tmp_path / "slurm")
    assert submitted.returncode == 0, submitted.stderr
    run = run_dir_of(submitted.stdout)
    from ntkrun.executors import slurm as executors
    from ntkrun.experiments import load_run_spec
    from ntkrun.rundir import RunDir

    spec = load_run_spec(run)
    jobs = executors.recorded_jobs(RunDir.shared(run, spec))
    victim = jobs["w32_s0"]
    assert victim.endswith("_2")
    deadline = time.time() + 300  # only against a hang: the verdict does not depend on it
    while not marker.exists():
        assert time.time() < deadline, "unit w32_s0 never reached its first GD step"
        time.sleep(0.1)
    assert executors.queue_states([victim]) == {victim: "RUNNING"}  # held there, not finished
    subprocess.run(["scancel", victim], check=True, env=cluster)
    while executors.queue_states(jobs.values()):  # the other units finish, the victim ends
        assert time.time() < deadline
        time.sleep(0.5)
    status = ntkrun(cluster, "status", run)
    print(status.stdout)  # shown in the closing note of issue 6
    row = re.search(r"w32_s0\W+cancelled\W+" + re.escape(victim) + r"\b", status.stdout)
    assert row is not None, status.stdout  # the row of the cancelled unit, with its job id
    assert "4 units: 3 done, 1 cancelled; run not aggregated" in status.stdout
    assert not (run / "meta.json").exists()

    resumed = ntkrun(cluster, "resume", run, "--wait", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "submitted 1 unit(s)" in resumed.stdout
    status = ntkrun(cluster, "status", run)
    print(status.stdout)
    assert "4 units: 4 done; run complete" in status.stdout
    for name in CSVS:
        assert (run / name).read_bytes() == (local_run / name).read_bytes(), name


def test_a_requeued_job_continues_from_its_checkpoint(cluster, tmp_path):
    """Preemption: a pca training unit is held right after its first checkpoint (step 8), then
    `scontrol requeue`d. The job starts again from its beginning; the unit continues from the
    checkpoint (its log says so), the last job aggregates, and the CSVs are byte for byte those
    of the same spec run through SLURM without interruption."""
    from test_data import write_split

    digits = tmp_path / "digits"
    digits.mkdir()
    write_split(digits, n=80)
    args = ["pca", "--preset", "quick", "--data-dir", digits, "--set", "data.split=test", "--set",
            "data.n_points=32", "--width", "48", "--seeds", "1", "--steps", "400", "--set",
            "training.record_every=4", "--set", "training.checkpoint_every=8", "--quiet"]  # fmt: skip
    plain = ntkrun(cluster, *args, *SLURM, "--wait", "--output-root", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    whole = run_dir_of(plain.stdout)
    marker = tmp_path / "held"
    held = holding(cluster, "any", "checkpoint", marker)
    submitted = ntkrun(held, *args, *SLURM, "--output-root", tmp_path / "slurm")
    assert submitted.returncode == 0, submitted.stderr
    run = run_dir_of(submitted.stdout)
    from ntkrun.executors import slurm as executors

    victim = executors.recorded_jobs(run)["w48_s0"]
    deadline = time.time() + 300  # only against a hang
    while not marker.exists():
        assert time.time() < deadline, "the unit never saved its first checkpoint"
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", victim], check=True, env=cluster)
    while executors.queue_states([victim]).get(victim) != "PENDING":  # killed, back in the queue
        assert time.time() < deadline
        time.sleep(0.2)
    # a requeued job is held back by a BeginTime about two minutes ahead: the test moves it to now
    subprocess.run(["scontrol", "update", f"jobid={victim}", "StartTime=now"], env=cluster, check=True)
    while executors.queue_states([victim]):
        assert time.time() < deadline, "the requeued job never ended"
        time.sleep(0.5)
    assert "resuming at step 8" in (run / "units" / "w48_s0.log").read_text()
    assert "4 units" not in (status := ntkrun(cluster, "status", run).stdout) and "run complete" in status
    for name in ["eigenvalues.csv", "components.csv", "trajectories.csv", "metrics.csv"]:
        assert (run / name).read_bytes() == (whole / name).read_bytes(), name


def test_gram_blocks_as_array_tasks_give_the_one_unit_runs_bytes(cluster, tmp_path):
    """kernels.rows_per_unit: a CNTK fit's training and test Gram blocks are array tasks of their own
    (stage 0), the fit another (stage 1) that reads them memory-mapped; accuracy.csv is byte for
    byte that of the same spec run here as one unit per fit."""
    from test_data import write_split

    data = tmp_path / "data"
    data.mkdir()
    write_split(data, n=80, split="train")
    write_split(data, n=1200, split="t10k")
    spec = ["generalization", "--preset", "quick", "--data-dir", str(data), "--quiet"]
    for item in ("device=cpu", "network.arch=cnn", "network.depth=2", "predictors=[ntk, nngp]",
                 "data.n_train=[70]", "data.n_test=1200"):  # fmt: skip
        spec += ["--set", item]
    here = CliRunner().invoke(app, [*spec, "--output-root", str(tmp_path / "here")])
    assert here.exit_code == 0, here.output
    reference = run_dir_of(here.stdout.replace("\n", ""))
    blocks = [*spec, "--set", "kernels.rows_per_unit=32"]
    result = ntkrun(cluster, *blocks, *SLURM, "--wait", "--output-root", tmp_path / "slurm")
    assert result.returncode == 0, result.stderr
    assert "submitted 6 unit(s) as SLURM job(s)" in result.stdout  # 3 + 2 blocks, then the fit
    run = run_dir_of(result.stdout)
    for name in ("accuracy.csv", "distance.csv", "fits.csv"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list((run / "units").glob("*.ckpt*"))
