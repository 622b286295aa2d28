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
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ntkrun import runners
from ntkrun.runners import Progress, Unit
from ntkrun.runs import LockedError, RunDir, acquire, is_complete, release
from ntkrun.spec import RunSpec, load_run_spec

LOG = logging.getLogger("ntkrun")
AGGREGATE_LOCK = "aggregate.lock"
STALE_LOCK_S = 3600.0  # an aggregation lock older than this is from a killed process
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us


class ExecutorError(RuntimeError):
    """Units could not be run: a worker died, the scheduler failed, aggregation is locked."""


def run_pool(spec: RunSpec, run: RunDir, progress: Progress, todo: list[Unit], jobs: int) -> None:
    """Compute `todo` in `jobs` worker processes (spawned: no forked BLAS state), stage by stage.
    Each worker gets an equal share of this machine's torch threads. A unit's error is raised
    here; a worker that dies (killed, out of memory) is an ExecutorError, not a hang."""
    threads = max(1, torch.get_num_threads() // jobs)
    progress.start(sum(u.cost for u in todo) or float(len(todo)))
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_ignore_sigint)
    try:
        for stage in sorted({u.stage for u in todo}):
            futures = {
                pool.submit(unit_main, str(run.path), u.name, threads): u for u in todo if u.stage == stage
            }
            for future in as_completed(futures):
                future.result()
                progress.advance(futures[future].name, futures[future].cost or 1.0)
    except BrokenProcessPool as err:
        raise ExecutorError(
            f"a worker process died (killed, or out of memory?); finished units are kept in {run.path}"
        ) from err
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # no public way to stop them
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- aggregation, once


def finish(spec: RunSpec, run: RunDir, device: str) -> pd.DataFrame:
    """Aggregate the units into CSVs and figures and mark the run complete (meta.json last)."""
    table = runners.aggregate(spec, run)
    run.meta.setdefault("units", len(runners.units(spec)))
    run.meta.setdefault("executor", spec.executor.kind)
    run.finalize(device)
    return table


def aggregate_once(spec: RunSpec, run: RunDir) -> pd.DataFrame | None:
    """Aggregate under an O_EXCL lock file, so that of the processes sharing a run exactly one
    does it. -> the summary table, or None if the run was already complete (by another process).
    Raises ExecutorError while a live process holds the lock, IncompleteRunError if units are
    missing."""
    if is_complete(run.path):
        return None
    lock = run.path / AGGREGATE_LOCK
    try:
        acquire(lock, "being aggregated", STALE_LOCK_S)
    except LockedError as err:
        raise ExecutorError(str(err)) from None
    try:
        if is_complete(run.path):  # finished by another process between our check and the lock
            return None
        return finish(spec, run, str(runners.resolve_device(spec.device)))
    finally:
        release(run.path / AGGREGATE_LOCK)  # run.path: finish may have renamed the directory


def maybe_finish(spec: RunSpec, run: RunDir) -> bool:
    """After a sharded unit: if every unit is done, aggregate (once). -> whether this process did."""
    if is_complete(run.path) or runners.done_units(spec, run) != {u.name for u in runners.units(spec)}:
        return False
    try:
        return aggregate_once(spec, run) is not None
    except ExecutorError:  # someone else is at it
        return False


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


def submit_slurm(
    spec: RunSpec, run: RunDir, todo: list[Unit], after: list[str] = ()
) -> list[tuple[str, str]]:
    """Submit `todo` as job arrays, stage by stage: stage-1 units start after the stage-0 jobs
    (those submitted here, or `after`: ids of stage-0 jobs still queued from before) and compute a
    missing stage-0 result themselves. -> [(unit, job id)], each stage appended to
    slurm/jobs.jsonl as soon as it is submitted."""
    import submitit

    folder = run.path / "slurm"
    folder.mkdir(exist_ok=True)
    submitted: list[tuple[str, str]] = []
    after = sorted({job.split("_")[0] for job in after})
    for stage in sorted({u.stage for u in todo}):
        batch = [u for u in todo if u.stage == stage]
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = slurm_parameters(spec)
        if after:
            params["slurm_additional_parameters"]["dependency"] = "afterany:" + ":".join(after)
        executor.update_parameters(**params)
        jobs = executor.map_array(SlurmUnit(), [str(run.path)] * len(batch), [u.name for u in batch])
        pairs = [(u.name, job.job_id) for u, job in zip(batch, jobs, strict=True)]
        with open(run.path / JOBS_FILE, "a") as fh:  # only the submitting process writes it
            for name, job_id in pairs:
                fh.write(json.dumps({"unit": name, "job_id": job_id, "submitted": time.time()}) + "\n")
        submitted += pairs
        after = sorted({job.job_id.split("_")[0] for job in jobs})
    return submitted


def recorded_jobs(run: RunDir | Path) -> dict[str, str]:
    """{unit: its latest job id} from slurm/jobs.jsonl of a run (or run directory)."""
    jobs: dict[str, str] = {}
    path = (run.path if isinstance(run, RunDir) else Path(run)) / JOBS_FILE
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


def queue_states(job_ids: Iterable[str], active_only: bool = True) -> dict[str, str] | None:
    """{job id: SLURM state} of the given jobs as squeue knows them (jobs that ended stay known
    for the cluster's MinJobAge). active_only: only jobs pending, running or requeued.
    None when squeue cannot be asked (not installed, controller down, timeout)."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    if not slurm_available():
        return None
    try:
        proc = subprocess.run(
            ["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as err:
        LOG.warning("squeue failed: %s", err)
        return None
    if proc.returncode != 0:
        LOG.warning("squeue failed: %s", proc.stderr.strip() or proc.returncode)
        return None
    states = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        state = state.split()[0] if state else state  # "CANCELLED by 0" -> CANCELLED
        if job in wanted and not (active_only and state in FINAL_STATES):
            states[job] = state
    return states


def wait_slurm(
    spec: RunSpec, run: RunDir, job_ids: list[str], progress: Progress, poll: float = 5.0, patience: int = 60
) -> None:
    """Block until none of `job_ids` is queued or running, advancing the bar as units finish.
    squeue failing `patience` times in a row is an ExecutorError."""
    todo = {u.name: u for u in runners.units(spec)}
    progress.start(sum(u.cost or 1.0 for u in todo.values()))
    seen: set[str] = set()
    failures = 0
    while True:
        active = queue_states(job_ids)
        for name in runners.done_units(spec, run) - seen:
            seen.add(name)
            progress.advance(name, todo[name].cost or 1.0)
        failures = failures + 1 if active is None else 0
        if failures >= patience:
            raise ExecutorError(f"squeue kept failing; the jobs may go on (ntkrun status {run.path})")
        if active == {}:
            return
        time.sleep(poll)


def unit_status(spec: RunSpec, run: RunDir) -> pd.DataFrame:
    """Per unit: state (done, running, pending, failed, not started), job id, detail."""
    jobs = recorded_jobs(run)
    states = queue_states(jobs.values(), active_only=False)
    unknown = states is None
    states = states or {}
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
        elif job and unknown:
            state = "unknown"
            detail = "squeue could not be asked"
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
