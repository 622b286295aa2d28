"""Where units run: this process, a local process pool, or SLURM job arrays through submitit.

Every executor ends the same way: each unit's result is saved in the shared run directory
(ntkrun.runs), and `finish` aggregates them once all are there.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ntkrun import runners
from ntkrun.runners import Progress, Unit
from ntkrun.runs import RunDir, is_complete
from ntkrun.spec import RunSpec, load_run_spec

LOG = logging.getLogger("ntkrun")
AGGREGATE_LOCK = "aggregate.lock"
JOBS_FILE = "slurm/jobs.jsonl"


# ---------------------------------------------------------------- a unit in another process


def unit_main(run_dir: str, name: str, threads: int | None = None) -> str:
    """Compute one unit of the run at run_dir (entry point of pool workers and SLURM jobs)."""
    if threads:
        torch.set_num_threads(threads)
    path = Path(run_dir)
    spec = load_run_spec(path)
    run = RunDir.at(path, spec)
    handler = logging.FileHandler(path / "units" / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        runners.compute_unit(spec, run, runners.find_unit(spec, name), runners.NoProgress())
    finally:
        handler.close()
        LOG.removeHandler(handler)
    return name


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us


def _pool_task(args: tuple[str, str, int]) -> str:
    return unit_main(*args)


def run_pool(spec: RunSpec, run: RunDir, progress: Progress, todo: list[Unit], jobs: int) -> None:
    """Compute `todo` in `jobs` worker processes (spawned: no forked BLAS state), stage by stage.
    Each worker gets an equal share of this machine's torch threads."""
    threads = max(1, torch.get_num_threads() // jobs)
    progress.start(sum(u.cost for u in todo) or float(len(todo)))
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_sigint)
    try:
        for stage in sorted({u.stage for u in todo}):
            batch = [u for u in todo if u.stage == stage]
            by_name = {u.name: u for u in batch}
            tasks = [(str(run.path), u.name, threads) for u in batch]
            for name in pool.imap_unordered(_pool_task, tasks):
                progress.advance(name, by_name[name].cost or 1.0)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# ---------------------------------------------------------------- aggregation, once


def finish(spec: RunSpec, run: RunDir, device: str) -> pd.DataFrame:
    """Aggregate the units into CSVs and figures and mark the run complete (meta.json last)."""
    table = runners.aggregate(spec, run)
    run.meta.setdefault("units", len(runners.units(spec)))
    run.meta.setdefault("executor", spec.executor.kind)
    run.finalize(device)
    return table


def maybe_finish(spec: RunSpec, run: RunDir) -> bool:
    """After a sharded unit: if every unit is done, aggregate, in one process only (an
    O_EXCL lock file). -> whether this process aggregated."""
    if is_complete(run.path) or runners.done_units(spec, run) != {u.name for u in runners.units(spec)}:
        return False
    lock = run.path / AGGREGATE_LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
    os.close(fd)
    try:
        finish(spec, run, str(runners.resolve_device(spec.device)))
    finally:
        lock.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------- SLURM


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


class SlurmUnit:
    """The callable a SLURM array task runs: one unit, then aggregation if it was the last.

    On preemption or timeout submitit calls `checkpoint` and requeues the same call; the unit
    continues from its own last checkpoint file.
    """

    def __call__(self, run_dir: str, name: str) -> str:
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
        unit_main(run_dir, name, threads)
        path = Path(run_dir)
        spec = load_run_spec(path)
        maybe_finish(spec, RunDir.at(path, spec))
        return name

    def checkpoint(self, run_dir: str, name: str) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmUnit(), run_dir, name)


def slurm_parameters(spec: RunSpec) -> dict[str, Any]:
    s = spec.executor.slurm
    params: dict[str, Any] = {
        "slurm_job_name": f"ntkrun-{spec.experiment}",
        "timeout_min": s.time,
        "cpus_per_task": s.cpus,
        "slurm_array_parallelism": s.array_parallelism,
        "slurm_additional_parameters": dict(s.additional),
    }
    if s.gpus:
        params["gpus_per_node"] = s.gpus
    for key, value in (("slurm_partition", s.partition), ("slurm_account", s.account), ("slurm_qos", s.qos)):
        if value is not None:
            params[key] = value
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    return params


def submit_slurm(spec: RunSpec, run: RunDir, todo: list[Unit]) -> list[tuple[str, str]]:
    """Submit `todo` as job arrays (stage-0 units first; the others start after them, and compute
    a missing stage-0 result themselves). -> [(unit, job id)], also appended to slurm/jobs.jsonl."""
    import submitit

    folder = run.path / "slurm"
    folder.mkdir(exist_ok=True)
    submitted: list[tuple[str, str]] = []
    after: list[str] = []
    for stage in sorted({u.stage for u in todo}):
        batch = [u for u in todo if u.stage == stage]
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = slurm_parameters(spec)
        if after:
            params["slurm_additional_parameters"]["dependency"] = "afterany:" + ":".join(after)
        executor.update_parameters(**params)
        jobs = executor.map_array(SlurmUnit(), [str(run.path)] * len(batch), [u.name for u in batch])
        submitted += [(u.name, job.job_id) for u, job in zip(batch, jobs, strict=True)]
        after = sorted({job.job_id.split("_")[0] for job in jobs})
    with open(run.path / JOBS_FILE, "a") as fh:  # only the submitting process writes it
        for name, job_id in submitted:
            fh.write(json.dumps({"unit": name, "job_id": job_id, "submitted": time.time()}) + "\n")
    return submitted


def recorded_jobs(run: RunDir) -> dict[str, str]:
    """{unit: its latest job id} from slurm/jobs.jsonl."""
    jobs: dict[str, str] = {}
    path = run.path / JOBS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                jobs[entry["unit"]] = entry["job_id"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a crash of the submitter
    return jobs


FINAL_STATES = {
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


def queue_states(job_ids: Iterable[str], active_only: bool = True) -> dict[str, str]:
    """{job id: SLURM state} of the given jobs as squeue knows them (jobs that ended stay known
    for the cluster's MinJobAge). active_only: only jobs pending, running or requeued."""
    wanted = set(job_ids)
    if not wanted or not slurm_available():
        return {}
    proc = subprocess.run(
        ["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"squeue failed: {proc.stderr.strip() or proc.returncode}")
    states = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        state = state.split()[0] if state else state  # "CANCELLED by 0" -> CANCELLED
        if job in wanted and not (active_only and state in FINAL_STATES):
            states[job] = state
    return states


def wait_slurm(spec: RunSpec, run: RunDir, job_ids: list[str], progress: Progress, poll: float = 5.0) -> None:
    """Block until none of `job_ids` is queued or running, advancing the bar as units finish."""
    todo = {u.name: u for u in runners.units(spec)}
    progress.start(sum(u.cost or 1.0 for u in todo.values()))
    seen: set[str] = set()
    while True:
        active = queue_states(job_ids)
        for name in runners.done_units(spec, run) - seen:
            seen.add(name)
            progress.advance(name, todo[name].cost or 1.0)
        if not active:
            return
        time.sleep(poll)


def unit_status(spec: RunSpec, run: RunDir) -> pd.DataFrame:
    """Per unit: state (done, running, pending, failed, not started), job id, detail."""
    jobs = recorded_jobs(run)
    states = queue_states(jobs.values(), active_only=False)
    rows = []
    for index, unit in enumerate(runners.units(spec)):
        job = jobs.get(unit.name, "")
        info = run.unit_info(unit.name)
        ckpt = run.load_checkpoint(unit.name) if info is None else None
        detail = ""
        if info is not None:
            state = "done"
            where = info["host"]
            if info.get("slurm_job"):
                task = f"_{info['slurm_task']}" if info.get("slurm_task") else ""
                where = f"job {info['slurm_job']}{task} on {info['host']}"
            detail = f"{info['wall_time_s']:.1f} s, {where}"
        elif job in states and states[job] not in ("COMPLETED",):
            state = states[job].lower()  # pending, running, cancelled, timeout, failed, ...
            if states[job] in FINAL_STATES:
                detail = f"no result; see {_job_log(run, job)}"
        elif job:
            state = "failed"
            detail = f"job ended without a result; see {_job_log(run, job)}"
        else:
            state = "not started"
        if ckpt is not None and "step" in ckpt:
            detail = f"checkpoint at step {ckpt['step']}" + (f"; {detail}" if detail else "")
        rows.append({"index": index, "unit": unit.name, "state": state, "job": job, "detail": detail})
    return pd.DataFrame(rows)


def _job_log(run: RunDir, job_id: str) -> str:
    """submitit's stderr file of the job, relative to the run directory."""
    return f"slurm/{job_id}_0_log.err"
