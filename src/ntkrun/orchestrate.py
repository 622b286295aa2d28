"""From a request to a finished (or submitted) run: resolve the spec, check it before anything
is written (preflight: data, numerical range, memory), open the run directory, hand the units
to an executor, aggregate, and return what to report. Nothing here prints or parses arguments;
every failure is an NtkrunError whose message says what was kept and how to continue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ntkrun import experiments, memory
from ntkrun.costs import rates
from ntkrun.errors import (
    DataError,
    ExecutorError,
    IncompleteRunError,
    NtkrunError,
    SpecError,
    Stop,
    UnitSpecMismatchError,
    signal_code,
    stopped,
)
from ntkrun.executors import make_executor
from ntkrun.executors.local import sharing
from ntkrun.executors.slurm import queue_states, recorded_jobs, slurm_available, unit_status
from ntkrun.identity import MODEL_SOURCE, RESULTS_VERSION, Identity, recorded
from ntkrun.locks import AGGREGATE_LOCK, RUNNING, STALE_LOCK_S, lock_holder
from ntkrun.rundir import RunDir, is_complete, open_run
from ntkrun.runners.common import resolve_device
from ntkrun.spec import Override, RunSpec, spec_hash
from ntkrun.sweep import MAX_POINTS, check_size
from ntkrun.units import (
    aggregate_once,
    check_memory,
    compute_unit,
    describe_mixed,
    done_units,
    find_unit,
    finish,
    identity,
    maybe_finish,
    mixed_provenance,
    preflight,
    runner,
    unit_threads,
    units,
)
from ntkrun.work import GramBlock, PointWork, Progress, Unit


@dataclass
class Request:
    """What the user asked for, before any of it is checked."""

    experiment: str
    preset: str | None = None
    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)  # from flags
    sweeps: list[str] = field(default_factory=list)  # --sweep KEY=V1,V2: a grid over spec keys
    max_points: int = MAX_POINTS  # refuse a larger grid (a typo in --sweep should not submit 10^4 jobs)
    output_root: Path | None = None
    unit_keys: list[str] = field(default_factory=list)  # --unit: compute only these into run_dir
    run_dir: Path | None = None  # a shared run directory
    resume: Path | None = None  # an interrupted, failed or shared run to finish
    wait: bool = False  # slurm: block until the jobs end
    force: bool = False  # run even if the memory estimate says it will not fit


@dataclass
class Plan:
    """A request that passed every check: nothing has been written yet."""

    request: Request
    spec: RunSpec
    units: list[Unit]
    chosen: list[Unit]  # --unit selection (empty: all of them)
    memory: str  # the memory estimate and the limit it was checked against
    identity: Identity | None = None  # of the results: spec hash and data digests (after the checks)


@dataclass
class Outcome:
    path: Path
    table: pd.DataFrame | None = None  # the summary table of a complete run
    note: str | None = None  # what happened, when the run is not (yet) complete


def resolve(req: Request) -> RunSpec:
    """The validated spec of the request. For a resume, the run's spec.yaml, where only the
    executor block may change. Raises SpecError."""
    if req.resume is None:
        spec = experiments.spec_of(
            req.experiment,
            preset=req.preset,
            config=req.config,
            sets=req.sets,
            overrides=req.overrides,
            sweeps=req.sweeps,
        )
        check_size(spec, req.max_points)
        return with_threads(spec)
    if is_complete(req.resume):
        raise SpecError(f"{req.resume}: run is complete, nothing to resume")
    saved = experiments.load_run_spec(req.resume)
    spec = experiments.spec_of(
        req.experiment, config=req.resume / "spec.yaml", sets=req.sets, overrides=req.overrides
    )
    if spec_hash(spec) != spec_hash(saved):
        raise SpecError(
            f"{req.resume}: on resume only executor.* and data.dir may change (the other keys would "
            "change the results of the run); start a new run with the changed spec instead"
        )
    return with_threads(spec)


def with_threads(spec: RunSpec) -> RunSpec:
    """The spec with executor.threads fixed where it was left to the machine: this machine's torch
    threads, or slurm.cpus for SLURM (each unit then computes with that many, whichever executor
    runs it, and a resume keeps it: spec.yaml records it)."""
    ex = spec.executor
    if ex.threads is not None:
        return spec
    threads = ex.slurm.cpus if ex.kind == "slurm" else torch.get_num_threads()
    return spec.model_copy(update={"executor": ex.model_copy(update={"threads": threads})})


def plan(req: Request, *, checks: bool = True) -> Plan:
    """Resolve and check everything that can be checked before a run directory exists: the spec,
    the units asked for, the scheduler, the data and numerical range (preflight), the memory."""
    spec = resolve(req)
    resolve_device(spec.device)
    found = units(spec)
    chosen = [find_unit(spec, key) for key in req.unit_keys]
    if not checks:
        return Plan(req, spec, found, chosen, "not checked")
    if chosen and req.run_dir is None:
        raise SpecError("--unit: needs --run-dir, the directory every unit of the run writes into")
    if spec.executor.kind == "slurm" and not chosen and not slurm_available():
        raise SpecError("executor slurm: sbatch and squeue are not on PATH (is this a SLURM login node?)")
    preflight(spec)
    ident = identity(spec)
    note = "not checked (--force)"
    if not req.force:
        parallel = spec.executor.jobs if spec.executor.kind == "local" and not chosen else 1
        need, limit = check_memory(spec, chosen or found, parallel)
        note = f"about {memory.gib(need)} at peak; {limit}"
    return Plan(req, spec, found, chosen, note, ident)


def unit_table(p: Plan) -> pd.DataFrame:
    """Index, name, stage, GFLOP and the seconds estimated at this machine's rates, per unit (the
    timed probes of ntkrun.costs run here, at the executor's threads per unit), as the unit runs
    under the run's executor: in a local pool whose workers' threads outnumber the cores, slower
    by their ratio (`attrs["sharing"]`; "alone" holds the seconds of the unit running alone)."""
    readers = runner(p.spec).grid(p.spec).readers if p.spec.sweep else {}
    ex = p.spec.executor
    threads = ex.threads or torch.get_num_threads()
    share = sharing(ex.jobs, threads, len(p.units)) if ex.kind == "local" else 1.0
    with unit_threads(ex.threads):
        speed = rates()
        rows = [
            {"index": i, "unit": u.name, "stage": u.stage, "gflop": u.flops / 1e9,
             "alone": speed.seconds(u.cost), "shared": ", ".join(readers.get(u.name, [])[1:])}
            for i, u in enumerate(p.units)
        ]  # fmt: skip
    table = pd.DataFrame(rows)
    table["seconds"] = table["alone"] * share
    table.attrs["gflops"] = speed.gemm / 1e9
    table.attrs["sharing"] = share
    return table


# ---------------------------------------------------------------- running


def execute(p: Plan, progress: Progress, notify: Callable[[str], None] = lambda _: None) -> Outcome:
    """Run the plan: chosen units into a shared directory, the whole run on SLURM, or the whole
    run here (inline or in a pool) into a new, shared or resumed directory."""
    if p.chosen:
        return _units_here(p, progress)
    if p.spec.executor.kind == "slurm":
        return _slurm(p, progress, notify)
    return _here(p, progress)


def _root(p: Plan) -> Path:
    req = p.request
    if req.resume is not None:
        return req.resume.parent.parent
    return req.output_root if req.output_root is not None else Path(p.spec.output)


def _kept(run: RunDir | None) -> str:
    if run is None:
        return ""
    if run.finalized:  # the signal came just after the run completed
        return f" after the run completed: {run.path}"
    return f"; partial files kept in {run.path}"


def _write_error(where: object, err: OSError, run: RunDir | None) -> NtkrunError:
    """An unusable output location is bad input (2); a write failing mid-run (disk full) is not (1)."""
    return NtkrunError(
        f"cannot write the run directory {where}: {err.strerror or err}{_kept(run)}", 2 if run is None else 1
    )


def _refuse_queued_jobs(path: Path) -> None:
    """A shared run runs here only once its SLURM jobs, if any, have ended."""
    recorded = recorded_jobs(path)
    active = queue_states(recorded.values())
    if active is None and recorded and slurm_available():
        raise ExecutorError(f"{path}: squeue cannot say whether its SLURM jobs have ended; try again")
    if active:
        raise ExecutorError(
            f"{path}: {len(active)} unit(s) still queued or running as SLURM jobs "
            f"({', '.join(sorted(active))}); wait for them (ntkrun status) or scancel them"
        )


def _here(p: Plan, progress: Progress) -> Outcome:
    spec, req = p.spec, p.request
    shared = req.resume or req.run_dir
    if shared is not None:
        _refuse_queued_jobs(shared)
    run = locked = table = None
    executor = make_executor(spec.executor.kind, jobs=spec.executor.jobs)
    try:
        with open_run(_root(p), spec, req.resume, at=req.run_dir, identity=p.identity) as run:
            run.meta["executor"] = spec.executor.kind
            todo = [u for u in p.units if run.load_unit(u.name) is None]
            executor.run(spec, run, todo, progress)
            if run.fixed:  # a shared directory: other processes may aggregate too
                try:
                    table = aggregate_once(spec, run)
                except ExecutorError as e:  # another process is aggregating: not a failure
                    locked = e
            else:
                table = finish(spec, run)
    except UnitSpecMismatchError:
        raise
    except OSError as e:
        raise _write_error(req.run_dir or f"under {_root(p)}", e, run) from e
    except NtkrunError as e:  # trouble inside the run: its own exit code, and where the files are
        raise NtkrunError(f"{e}{_kept(run)}", e.exit_code) from e
    except (KeyboardInterrupt, Stop) as e:
        hint = f"; continue with: ntkrun resume {run.path}" if run is not None and not run.finalized else ""
        raise NtkrunError(f"{stopped(e)}{_kept(run)}{hint}", signal_code(e)) from None
    if locked is not None:
        raise ExecutorError(f"{locked}; its units are all done here")
    return Outcome(run.path, table if table is not None else summary(run.path, spec))


def _units_here(p: Plan, progress: Progress) -> Outcome:
    """`--unit K --run-dir DIR`: compute those units of the shared run in DIR, in this process;
    aggregate if that completes the run."""
    spec, run_dir = p.spec, p.request.run_dir
    run = None
    try:
        run = RunDir.shared(run_dir, spec, p.identity)
        progress.start(sum(u.flops for u in p.chosen) or float(len(p.chosen)))
        for unit in p.chosen:
            compute_unit(spec, run, unit, progress)
        maybe_finish(spec, run)
    except UnitSpecMismatchError:
        raise
    except OSError as e:
        raise _write_error(run_dir, e, run) from e
    except NtkrunError as e:
        raise NtkrunError(f"{e} (unit results so far are kept in {run_dir})", e.exit_code) from e
    except (KeyboardInterrupt, Stop) as e:
        message = f"{stopped(e)} (finished units and checkpoints are kept in {run_dir})"
        raise NtkrunError(message, signal_code(e)) from None
    names = ", ".join(u.name for u in p.chosen)
    done = len(done_units(spec, run))
    state = "run aggregated: complete" if is_complete(run.path) else f"{done}/{len(p.units)} units done"
    return Outcome(run.path, note=f"unit(s) {names} done in {run_dir}; {state}")


def _slurm(p: Plan, progress: Progress, notify: Callable[[str], None]) -> Outcome:
    """Submit the units that are neither done nor queued as SLURM arrays; with --wait, block
    until they end and aggregate. A resume with nothing left to submit aggregates."""
    spec, req = p.spec, p.request
    run = None
    try:
        if req.resume is not None:
            run = RunDir.reopen(req.resume, spec, p.identity)
            run.make_visible()  # the jobs need a path that stays put
            run.release()  # the jobs, not this process, run it from here on
        elif req.run_dir is not None:
            holder = lock_holder(req.run_dir / RUNNING)
            if holder is not None:
                raise ExecutorError(f"{req.run_dir}: being run by {holder}")
            run = RunDir.shared(req.run_dir, spec, p.identity)
        else:
            run = RunDir.create(_root(p), spec, visible=True, identity=p.identity)
        todo = [u for u in p.units if run.load_unit(u.name) is None]
        dispatch = make_executor("slurm", wait=req.wait, notify=notify).run(spec, run, todo, progress)
    except OSError as e:
        raise _write_error(req.run_dir or f"under {_root(p)}", e, run) from e
    except (KeyboardInterrupt, Stop) as e:
        where = f" (ntkrun status {run.path})" if run is not None else ""
        raise NtkrunError(f"stopped waiting; the jobs go on{where}", signal_code(e)) from None
    if not dispatch.finished:
        return Outcome(run.path, note="submitted")
    return aggregate_run(spec, run)


def aggregate_run(spec: RunSpec, run: RunDir) -> Outcome:
    """Aggregate a run whose units are all done, once (unless a job already did)."""
    try:
        table = aggregate_once(spec, run)
    except IncompleteRunError as e:
        if not run.fixed:
            run.fail(str(e))
        raise
    except ExecutorError:  # another process is aggregating it
        raise
    except (NtkrunError, OSError) as e:
        if not run.fixed:
            run.fail(str(e))
        raise NtkrunError(f"{run.path}: aggregation failed: {e}", 1) from e
    except (KeyboardInterrupt, Stop) as e:
        if not run.fixed and not run.finalized:
            run.fail(stopped(e))
        raise NtkrunError(f"{stopped(e)} while aggregating {run.path}", signal_code(e)) from None
    return Outcome(run.path, table if table is not None else summary(run.path, spec))


def open_for_aggregation(run_dir: Path) -> tuple[RunSpec, RunDir]:
    """The spec and run of `ntkrun aggregate RUN_DIR` (reopened unless it is complete)."""
    spec = experiments.load_run_spec(run_dir)
    try:
        ident = identity(spec)
    except DataError:  # aggregation reads the units alone: the data's digests, as the run recorded
        ident = data_as_recorded(spec, run_dir)  # them, when the files are not here to digest
    run = RunDir.shared(run_dir, spec, ident) if is_complete(run_dir) else RunDir.reopen(run_dir, spec, ident)
    return spec, run


def data_as_recorded(spec: RunSpec, run_dir: Path) -> Identity:
    """The spec's identity with the data digests its run directory recorded (the units were checked
    against them as they were computed), when the data files are not here to digest."""
    ours = (MODEL_SOURCE, RESULTS_VERSION)
    data = {k: v for k, v in recorded(run_dir, spec).data.items() if not k.startswith(ours)}
    return identity(spec, data)


def summary(path: Path, spec: RunSpec) -> pd.DataFrame:
    """The summary table of a complete run, read back (it was completed by another process)."""
    for name in experiments.get(spec.experiment).summary_tables:
        if (path / name).is_file():
            return pd.read_csv(path / name)
    raise NtkrunError(f"{path}: complete, but none of its summary tables is there", 1)


# ---------------------------------------------------------------- status


@dataclass
class Status:
    table: pd.DataFrame  # per unit: index, unit, state, job, detail
    complete: bool
    aggregator: str | None  # who holds the aggregation lock
    runner: str | None  # who holds the RUNNING lock
    points: pd.DataFrame | None = None  # a sweep's points: point, values, units done of the units it reads
    mixed: str | None = None  # the units came from different devices or thread counts (one line)
    error: str | None = None  # the run's ERROR: why it failed (its first line)
    blocks: tuple[int, int] | None = None  # Gram-block units (kernels.rows_per_unit): (done, all)


def status(run_dir: Path) -> Status:
    """Per unit: done / running / pending / failed / not started, with SLURM job ids; for a sweep,
    per point too (points x units)."""
    spec = experiments.load_run_spec(run_dir)
    run = RunDir.shared(run_dir, spec, recorded(run_dir, spec))
    complete = is_complete(run.path)
    aggregator = None if complete else lock_holder(run.path / AGGREGATE_LOCK, STALE_LOCK_S, remove=False)
    holder = None if complete else lock_holder(run.path / RUNNING, remove=False)
    table = unit_status(spec, run)
    points = point_status(spec, table) if spec.sweep else None
    mixed = mixed_provenance(spec, run)
    error = None
    if (run.path / "ERROR").is_file():
        error = ((run.path / "ERROR").read_text().strip().splitlines() or ["failed"])[0]
    mixed_line = describe_mixed(mixed) if mixed else None
    block = {u.name for u in units(spec) if isinstance(inner(u).work, GramBlock)}
    states = [state for name, state in zip(table["unit"], table["state"], strict=True) if name in block]
    blocks = (states.count("done"), len(states)) if states else None
    return Status(table, complete, aggregator, holder, points, mixed_line, error, blocks)


def inner(unit: Unit) -> Unit:
    """A sweep's unit's own unit (that of its point), else the unit."""
    return unit.work.unit if isinstance(unit.work, PointWork) else unit


def point_status(spec: RunSpec, table: pd.DataFrame) -> pd.DataFrame:
    """Per point of a sweep: its swept values and how many of the units it reads are done."""
    grid = runner(spec).grid(spec)
    state = dict(zip(table["unit"], table["state"], strict=True))
    rows = []
    for point in grid.points:
        reads = [name for (index, _), name in grid.owner.items() if index == point.index]
        done = sum(state.get(name) == "done" for name in reads)
        rows.append({"point": point.name, "values": point.label, "done": f"{done}/{len(reads)}"})
    return pd.DataFrame(rows)
