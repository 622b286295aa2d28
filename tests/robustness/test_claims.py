"""README claims about failures, each made to happen: a pool worker that dies, squeue that
cannot be asked, an interrupted `--unit` process, and the permissions of what ntkrun writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ntkrun.executors.local
import ntkrun.runners.convergence
from ntkrun.cli import app
from ntkrun.errors import ExecutorError
from ntkrun.executors.slurm import wait_slurm
from ntkrun.experiments import load_run_spec
from ntkrun.rundir import RunDir
from ntkrun.work import NoProgress

sys.path.insert(0, str(Path(__file__).parents[1]))
from faults import unit_main_or_die

TINY = [
    "convergence", "--preset", "quick", "--set", "network.width=[8, 32]", "--seeds", "2", "--steps", "6",
    "--set", "grid.n_angles=16", "--set", "training.n_train=10", "--quiet",
]  # fmt: skip
CSVS = ["kernels.csv", "losses.csv", "summary.csv", "metrics.csv"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_dying_pool_worker_stops_the_run_without_losing_work(tmp_path, monkeypatch):
    """A worker of --executor local killed outright (SIGKILL) while computing unit w32_s1: the run
    stops with exit 1 naming the cause (no hang), is marked failed with the finished units kept,
    and `ntkrun resume` completes it with the CSVs of a run that never failed."""
    assert invoke(*TINY, "--output-root", tmp_path / "whole").exit_code == 0
    monkeypatch.setenv("FAULT_DIE_UNIT", "w32_s1")
    monkeypatch.setattr(ntkrun.executors.local, "unit_main", unit_main_or_die)
    result = invoke(*TINY, "--executor", "local", "--jobs", "2", "--output-root", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert "a worker process died" in result.stderr and result.stderr.count("\n") == 1
    (failed,) = (tmp_path / "runs" / "convergence").glob("*.failed")
    assert "worker process died" in (failed / "ERROR").read_text()
    assert not (failed / "units" / "w32_s1.pt").exists()
    monkeypatch.undo()
    assert invoke("resume", failed, "--quiet").exit_code == 0
    done = tmp_path / "runs" / "convergence" / "latest"
    for name in CSVS:
        assert (done / name).read_bytes() == (
            tmp_path / "whole" / "convergence" / "latest" / name
        ).read_bytes()


def _workers_of(parent: int) -> list[int]:
    """The pids of the spawned pool workers whose parent is `parent` (from /proc)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat_file.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat_file.parent.name))
    return found


def test_ctrl_c_stops_every_worker_of_a_local_run(tmp_path):
    """SIGINT to a two-worker --executor local run once both workers are computing a unit: the
    command exits 130 with the run marked failed and a resume hint, and both worker processes are
    gone (ended through Process.terminate and joined): none is left computing."""
    args = [*TINY[:-1], "--set", "network.width=[1500]", "--seeds", "4", "--steps", "5000",
            "--set", "training.n_train=128", "--executor", "local", "--jobs", "2", "--quiet",
            "--output-root", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "ntkrun", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("convergence/.*.partial/units/*.log"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = _workers_of(proc.pid)
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "ntkrun resume" in err
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
    (failed,) = (tmp_path / "convergence").glob("*.failed")
    assert "interrupted" in (failed / "ERROR").read_text()


@pytest.fixture
def failing_squeue(tmp_path, monkeypatch) -> Path:
    """sbatch and squeue on PATH, squeue failing as when the controller is down."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    down = "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1"
    for name, body in (("squeue", down), ("sbatch", "exit 1")):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_squeue_that_cannot_be_asked(failing_squeue, tmp_path):
    """A shared run whose other units were submitted as SLURM jobs, while squeue fails: `status`
    shows those units as unknown, a local resume refuses (it cannot tell whether the jobs ended),
    and waiting gives up after its retries with exit 1, the jobs left alone."""
    shared = tmp_path / "run"
    assert invoke(*TINY, "--unit", "0", "--run-dir", shared).exit_code == 0
    (shared / "slurm").mkdir()
    with open(shared / "slurm" / "jobs.jsonl", "w") as fh:
        for k, unit in enumerate(["w8_s1", "w32_s0", "w32_s1"]):
            fh.write(json.dumps({"unit": unit, "job_id": f"77_{k}", "submitted": 0}) + "\n")
    status = invoke("status", shared)
    assert status.exit_code == 0, status.output
    assert "3 unknown" in status.stdout and "1 done" in status.stdout
    assert "squeue could not be asked" in status.stdout
    refused = invoke("resume", shared, "--quiet")
    assert refused.exit_code == 1 and "squeue cannot say whether its SLURM jobs have ended" in refused.stderr
    spec = load_run_spec(shared)
    with pytest.raises(ExecutorError, match="squeue kept failing; the jobs may go on"):
        wait_slurm(spec, RunDir.shared(shared, spec), ["77_1"], NoProgress(), poll=0, patience=3)


def test_an_interrupted_unit_process_keeps_only_finished_units(tmp_path, monkeypatch):
    """`--unit 0 --unit 1 --run-dir DIR` stopped by Ctrl-C in its second unit: exit 130, the first
    unit's result kept, and nothing else written: no ERROR, no meta.json (the directory is shared
    with other processes, which go on)."""
    original, calls = ntkrun.runners.convergence.RUNNER.run_unit, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    record = ntkrun.runners.convergence.RUNNER
    monkeypatch.setattr(ntkrun.runners.convergence, "RUNNER", replace(record, run_unit=interrupted))
    shared = tmp_path / "run"
    result = invoke(*TINY, "--unit", "0", "--unit", "1", "--run-dir", shared)
    assert result.exit_code == 130, result.output
    assert "finished units and checkpoints are kept in" in result.stderr
    assert sorted(p.name for p in (shared / "units").iterdir()) == ["w8_s0.pt"]
    assert not (shared / "ERROR").exists() and not (shared / "meta.json").exists()


def test_files_get_the_users_umask(tmp_path):
    """Run directories and files are created with the umask's permissions (not mkstemp's 0600 or
    mkdtemp's 0700), so a group can read each other's runs on a shared filesystem."""
    old = os.umask(0o027)
    try:
        assert invoke(*TINY, "--output-root", tmp_path).exit_code == 0
    finally:
        os.umask(old)
    run = (tmp_path / "convergence" / "latest").resolve()
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")]}
    assert modes[Path(".")] == 0o750
    for path, mode in modes.items():
        assert mode == (0o750 if (run / path).is_dir() else 0o640), (path, oct(mode))


def test_a_local_resume_is_refused_while_slurm_jobs_run(tmp_path, monkeypatch):
    """A shared run with a unit still RUNNING as a SLURM job (as squeue says): a local resume is
    refused, exit 1, naming the job, and computes nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", "echo '77_1|RUNNING'"), ("sbatch", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    shared = tmp_path / "run"
    assert invoke(*TINY, "--unit", "0", "--run-dir", shared).exit_code == 0
    (shared / "slurm").mkdir()
    (shared / "slurm" / "jobs.jsonl").write_text(json.dumps({"unit": "w8_s1", "job_id": "77_1"}) + "\n")
    refused = invoke("resume", shared, "--quiet")
    assert (
        refused.exit_code == 1 and "1 unit(s) still queued or running as SLURM jobs (77_1)" in refused.stderr
    )
    assert sorted(p.name for p in (shared / "units").glob("*.pt")) == ["w8_s0.pt"]
