"""Units as SLURM job arrays through submitit; job states from squeue (no accounting database).

Each array task computes one unit into the shared run directory; the last one to finish
aggregates. On preemption or timeout submitit requeues the task, which continues from the
unit's own checkpoint. Job ids are appended to slurm/jobs.jsonl as each stage is submitted.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ntkrun.errors import ExecutorError
from ntkrun.executors.base import Dispatch, Executor
from ntkrun.experiments import load_run_spec
from ntkrun.rundir import RunDir
from ntkrun.spec import RunSpec
from ntkrun.units import done_units, identity, maybe_finish, unit_main, units
from ntkrun.work import Progress, Unit

LOG = logging.getLogger("ntkrun")
JOBS_FILE = "slurm/jobs.jsonl"


class SlurmExecutor(Executor):
    """Submits the units that are neither done nor queued; with `wait`, blocks until the jobs end."""

    def __init__(self, wait: bool = False, notify: Callable[[str], None] = lambda _: None) -> None:
        self.wait, self.notify = wait, notify

    def run(self, spec: RunSpec, run: RunDir, todo: list[Unit], progress: Progress) -> Dispatch:
        jobs = recorded_jobs(run)
        queued = queue_states(jobs.values())
        if queued is None:
            raise ExecutorError("squeue cannot be asked which jobs are still queued; try again")
        todo = [u for u in todo if jobs.get(u.name) not in queued]
        last = max((u.stage for u in todo), default=0)
        earlier = {u.name for u in units(spec) if u.stage < last}  # what the todo units may read
        after = [job for name, job in jobs.items() if name in earlier and job in queued]
        try:
            submitted = submit_slurm(spec, run, todo, after) if todo else []
        except Exception as e:  # submitit raises its own errors for a refused sbatch
            lines = str(e).strip().splitlines()
            raise ExecutorError(f"SLURM submission failed: {lines[-1] if lines else type(e).__name__}") from e
        arrays = sorted({job.split("_")[0] for _, job in submitted})
        ids = ", ".join(arrays) or "(none: every unit is done or queued)"
        self.notify(f"submitted {len(submitted)} unit(s) as SLURM job(s) {ids}")
        self.notify(f"run directory: {run.path}")
        dispatch = Dispatch(finished=not submitted and not queued)
        if dispatch.finished:
            return dispatch
        self.notify(f"follow with: ntkrun status {run.path}")
        if self.wait:
            wait_slurm(spec, run, [job for _, job in submitted] + list(queued), progress)
            dispatch.finished = True
        return dispatch


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


class SlurmUnit:
    """The callable a SLURM array task runs: one unit, then aggregation if it was the last.

    On preemption or timeout submitit calls `checkpoint` and requeues the same call; the unit
    continues from its own last checkpoint file.
    """

    def __call__(self, run_dir: str, name: str) -> str:
        unit_main(run_dir, name)
        path = Path(run_dir)
        spec = load_run_spec(path)
        maybe_finish(spec, RunDir.shared(path, spec, identity(spec)))
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
    """Submit `todo` as job arrays, stage by stage: each stage starts after the previous one's jobs
    (those submitted here, or `after`: ids of earlier stages' jobs still queued from before) and
    computes a missing earlier result itself. -> [(unit, job id)], each stage appended to
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
    todo = {u.name: u for u in units(spec)}
    progress.start(sum(u.flops or 1.0 for u in todo.values()))
    seen: set[str] = set()
    failures = 0
    while True:
        active = queue_states(job_ids)
        for name in done_units(spec, run) - seen:
            seen.add(name)
            progress.advance(name, todo[name].flops or 1.0)
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
    for index, unit in enumerate(units(spec)):
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
        elif (failure := run.unit_failure(unit.name)) is not None:
            state, detail = "failed", failure
        else:
            state = "not started"
        if ckpt is not None and "step" in ckpt:
            detail = f"checkpoint at step {ckpt['step']}" + (f"; {detail}" if detail else "")
        rows.append({"index": index, "unit": unit.name, "state": state, "job": job, "detail": detail})
    return pd.DataFrame(rows)


def _job_log(run: RunDir, job_id: str) -> str:
    """submitit's stderr file of the job, relative to the run directory."""
    return f"slurm/{job_id}_0_log.err"
