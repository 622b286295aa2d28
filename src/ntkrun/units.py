"""The units of a run: listing them, computing one into its run directory, checking what a spec
needs before it runs (preflight and memory), and aggregating the saved results once.

Every experiment is a list of independent units (ntkrun.runners.common.Unit). However they ran
(here, in a pool, as SLURM jobs, in any order), each result is saved in the run directory and the
aggregate reads only the saved results, so the CSVs are the same.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ntkrun import experiments, memory
from ntkrun.architectures.module import accepted, load_factory, source_digest, source_files
from ntkrun.data import digests
from ntkrun.errors import (
    ExecutorError,
    IncompleteRunError,
    LockedError,
    NtkrunError,
    NumericalError,
    ResourceError,
    SpecError,
)
from ntkrun.identity import MODEL_SOURCE, RESULTS_VERSION, Identity
from ntkrun.locks import AGGREGATE_LOCK, STALE_LOCK_S, acquire, release
from ntkrun.rundir import RunDir, is_complete, log_to
from ntkrun.runners.common import check_range, resolve_device
from ntkrun.runners.contract import Runner
from ntkrun.spec import RunSpec, legacy_spec_hash, spec_hash
from ntkrun.sweep import Sweep
from ntkrun.work import NoProgress, Progress, Results, Unit, Work

LOG = logging.getLogger("ntkrun")


def runner(spec: RunSpec) -> Runner | Sweep:
    """The experiment's runner record, or for a sweep the Sweep over it (the same interface)."""
    record = experiments.get(spec.experiment).runner
    return Sweep(record) if spec.sweep else record


def units(spec: RunSpec) -> list[Unit]:
    """The spec's units in their canonical order (stage 0 first)."""
    return sorted(runner(spec).units(spec), key=lambda u: u.stage)


def find_unit(spec: RunSpec, key: str) -> Unit:
    """A unit by name or by its index in units(spec). Raises SpecError."""
    found = units(spec)
    if key.isdigit() and int(key) < len(found):
        return found[int(key)]
    for unit in found:
        if unit.name == key:
            return unit
    raise SpecError(
        f"--unit {key}: no such unit (this spec has {len(found)}: indices 0-{len(found) - 1}, "
        f"names {found[0].name} ... {found[-1].name}; list them with --list-units)"
    )


def unit_of(spec: RunSpec, work: Work) -> Unit:
    """The unit that does `work` (a unit's ctx.require); LookupError if the spec has none."""
    for unit in units(spec):
        if unit.work is work or unit.work == work:
            return unit
    raise LookupError(f"no unit of this {spec.experiment} spec does {work}")


def identity(spec: RunSpec, data: dict[str, str] | None = None) -> Identity:
    """The identity of the spec's results: its hash, the content of the data files it reads (the
    runner's `data_files(spec)`, if it reads any; or `data`, their digests as a run recorded them)
    and of a network.module's source file. Raises DataError if they cannot be read, SpecError if
    the module cannot be imported."""
    if data is None:
        data = digests(runner(spec).data_files(spec))
    version = experiments.get(spec.experiment).runner.results_version
    version = {f"{RESULTS_VERSION}{spec.experiment}": str(version)}
    return Identity(spec_hash(spec), {**data, **model_sources(spec), **version}, legacy_spec_hash(spec))


def model_sources(spec: RunSpec) -> dict[str, str]:
    """{"model source <file>": its digest} of every network.module the spec (or its sweep) runs:
    the factory's file and the files it imports from its package (`source_files`)."""
    found = {}
    for point in runner(spec).grid(spec).points if spec.sweep else []:
        found.update(model_sources(point.spec))
    module = getattr(getattr(spec, "network", None), "module", None)
    if module is not None:
        try:
            sources = source_files(module)
        except ValueError as err:
            raise SpecError(f"network.module: {err}") from None
        found.update({f"{MODEL_SOURCE}{source}": source_digest(source) for source in sources})
    return found


# ---------------------------------------------------------------- before anything runs


def preflight(spec: RunSpec) -> None:
    """Checks that need more than the spec's schema, run before any run directory exists: the
    kernels' numerical range, and the experiment's own (e.g. its data files against the spec); for a
    sweep, of every point (the error names the point)."""
    if spec.sweep:
        for point in runner(spec).grid(spec).points:
            try:
                preflight(point.spec)
            except NtkrunError as err:
                raise type(err)(f"sweep point {point.name} ({point.label}): {err}", err.exit_code) from None
        check_swept_module(spec)
        return
    record = experiments.get(spec.experiment).runner
    network = spec.network  # type: ignore[attr-defined]
    module = getattr(network, "module", None)  # (features' network block has none)
    if module is not None and not record.modules:
        raise SpecError(
            f"network.module: {spec.experiment} does not run a user's model yet "
            "(convergence, scaling, pca and generalization do)"
        )
    if network.layers is not None and not record.layers:
        raise SpecError(
            f"network.layers: {spec.experiment} does not run compositions of ntkrun.layers yet "
            "(convergence, regression, scaling, pca, generalization and features do)"
        )
    if module is None:
        check_range(spec)
    arch = getattr(network, "arch", "mlp")
    if arch not in record.archs and network.layers is None:
        raise SpecError(
            f"network.arch: {arch!r} is not supported by {spec.experiment}, whose inputs are "
            f"{record.inputs}, not images (it runs: {', '.join(record.archs)})"
        )
    record.check(spec)


def check_swept_module(spec: RunSpec) -> None:
    """A sweep over network.depth or network.width of a model whose factory takes no such keyword
    would run the same network at every point: refused."""
    module = getattr(spec.network, "module", None)  # type: ignore[attr-defined]
    swept = {key.split(".")[1] for key in spec.sweep if key in ("network.depth", "network.width")}
    if module is None or not swept:
        return
    missing = sorted(set(swept) - set(accepted(load_factory(module)[0])))
    if missing:
        raise SpecError(
            f"sweep: network.{missing[0]}: {module} takes no {missing[0]!r} parameter (it would build the "
            "same network at every point)"
        )


def memory_estimate(spec: RunSpec, unit: Unit) -> int:
    """Estimated peak bytes of one unit (the experiment's `memory`)."""
    return int(runner(spec).memory(spec, unit))


def check_memory(spec: RunSpec, todo: list[Unit], parallel: int = 1) -> tuple[int, str]:
    """Refuse (ResourceError) a spec whose largest unit, times the units running at once, would
    not fit in the memory available to this process's device. -> (estimate, limit description)."""
    biggest = max(todo, key=lambda u: memory_estimate(spec, u))
    need = memory_estimate(spec, biggest) * parallel
    if spec.executor.kind == "slurm":
        mem_gb = spec.executor.slurm.mem_gb
        if mem_gb is None:
            return need, "no limit known (set executor.slurm.mem_gb)"
        have, where = int(mem_gb * memory.GiB), "executor.slurm.mem_gb"
    else:
        found = memory.available(resolve_device(spec.device))
        if found is None:
            return need, "unknown on this machine"
        have, where = found
    times = f" x {parallel} units at once" if parallel > 1 else ""
    if need > have:
        raise ResourceError(
            f"memory: unit {biggest.name}{times} needs about {memory.gib(need)} but "
            f"{memory.gib(have)} is available ({where}); reduce the width or the number of "
            "points, or pass --force to run anyway"
        )
    return need, f"{memory.gib(have)} available ({where})"


# ---------------------------------------------------------------- computing units


class _Context:
    """What a running unit may ask of its run (ntkrun.runners.common.UnitContext)."""

    def __init__(self, spec: RunSpec, run: RunDir) -> None:
        self.spec, self.run = spec, run
        self.load_checkpoint, self.save_checkpoint = run.load_checkpoint, run.save_checkpoint

    def require(self, work: Work) -> dict[str, Any]:
        return compute_unit(self.spec, self.run, unit_of(self.spec, work), NoProgress())


class _UnitProgress:
    """Forwards a unit's progress and makes up the rest of its cost when it ends."""

    def __init__(self, progress: Progress, unit: Unit) -> None:
        self.progress, self.unit, self.done = progress, unit, 0.0

    def start(self, total: float) -> None:
        pass

    def advance(self, description: str, amount: float) -> None:
        self.done += amount
        self.progress.advance(description, amount)

    def finish(self) -> None:
        self.progress.advance(self.unit.name, max(self.unit.flops - self.done, 0.0))


@contextmanager
def unit_threads(threads: int | None) -> Iterator[None]:
    """torch computes with `threads` threads inside (None: as it is), then as before."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_unit(spec: RunSpec, run: RunDir, unit: Unit, progress: Progress) -> dict[str, Any]:
    """The unit's saved result, or run it now, with the run's executor.threads, and save it."""
    result = run.load_unit(unit.name)
    if result is None:
        t0 = time.time()
        tracker = _UnitProgress(progress, unit)
        try:
            with unit_threads(spec.executor.threads):
                threads = torch.get_num_threads()
                result = runner(spec).run_unit(spec, unit, _Context(spec, run), tracker)
        except NumericalError as err:
            run.save_failure(unit.name, f"{type(err).__name__}: {err}")
            raise NumericalError(f"unit {unit.name}: {err}") from err
        except Exception as err:  # (an interrupt is no failure of the unit's: it is "not started")
            run.save_failure(unit.name, f"{type(err).__name__}: {err}")
            raise
        device = resolve_device(spec.device)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(device),
            "device_name": device_name(device),
            "threads": threads,
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "")),
            "slurm_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
            "wall_time_s": round(time.time() - t0, 3),
        }
        run.save_unit(unit.name, result, info)
        tracker.finish()
    else:
        progress.advance(unit.name, unit.flops)
    return result


def device_name(device: torch.device) -> str:
    """The kind of device a unit ran on, as its last bits depend on it: the GPU's name, or the CPU
    and the kernels torch picks on it (AVX2, AVX512)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


@functools.cache
def cpu_model() -> str:
    """This machine's CPU model name (read once a process, not once a unit)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def mixed_provenance(spec: RunSpec, run: RunDir) -> dict[str, dict[str, int]]:
    """Where the done units of a run disagree on what moves their last bits: {"device_name" or
    "threads": {value: units}} for each of them that has more than one value (empty: none)."""
    seen: dict[str, dict[str, int]] = {"device_name": {}, "threads": {}}
    for unit in units(spec):
        info = run.unit_info(unit.name) or {}
        for key, counts in seen.items():
            if key in info:
                counts[str(info[key])] = counts.get(str(info[key]), 0) + 1
    return {key: counts for key, counts in seen.items() if len(counts) > 1}


def describe_mixed(mixed: dict[str, dict[str, int]]) -> str:
    """One line: the units came from different devices / thread counts, how many of each."""
    what = {"device_name": "devices", "threads": "thread counts"}
    parts = [
        f"{what[key]}: " + ", ".join(f"{value} ({n} units)" for value, n in counts.items())
        for key, counts in mixed.items()
    ]
    return "units computed on different " + "; ".join(parts) + " (their last bits differ)"


def done_units(spec: RunSpec, run: RunDir) -> set[str]:
    return {u.name for u in units(spec) if run.load_unit(u.name) is not None}


def unit_main(run_dir: str, name: str) -> str:
    """Compute one unit of the shared run at run_dir (entry point of pool workers and SLURM jobs),
    logging to units/<name>.log; with the threads its spec.yaml fixes (executor.threads)."""
    path = Path(run_dir)
    spec = experiments.load_run_spec(path)
    run = RunDir.shared(path, spec, identity(spec))  # refused if this machine's data are not the run's
    with log_to(path / "units" / f"{name}.log"):
        compute_unit(spec, run, find_unit(spec, name), NoProgress())
    return name


# ---------------------------------------------------------------- aggregation, once


def aggregate(spec: RunSpec, run: RunDir) -> pd.DataFrame:
    """Build the experiment's CSVs and figures from the saved unit results; -> summary table.
    Raises IncompleteRunError when a unit has no result."""
    results = [(u, run.load_unit(u.name)) for u in units(spec)]
    missing = [u.name for u, r in results if r is None]
    if missing:
        raise IncompleteRunError(missing)
    return runner(spec).aggregate(spec, run, Results(results))  # type: ignore[arg-type]


def finish(spec: RunSpec, run: RunDir) -> pd.DataFrame:
    """Aggregate the units into CSVs and figures and mark the run complete (meta.json last)."""
    table = aggregate(spec, run)
    mixed = mixed_provenance(spec, run)
    if mixed:
        run.meta["mixed_units"] = mixed
        LOG.warning("%s", describe_mixed(mixed))
    run.meta.setdefault("units", len(units(spec)))
    run.meta.setdefault("executor", spec.executor.kind)
    models = {
        k.removeprefix(MODEL_SOURCE): v for k, v in run.identity.data.items() if k.startswith(MODEL_SOURCE)
    }
    if models:  # provenance: which code made the run (network.module in spec.yaml, its file's digest here)
        run.meta.setdefault("model_sources", models)
    run.finalize(str(resolve_device(spec.device)))
    return table


def aggregate_once(spec: RunSpec, run: RunDir) -> pd.DataFrame | None:
    """Aggregate a shared run under an O_EXCL lock file, so that of the processes sharing it
    exactly one does. -> the summary table, or None if the run was already complete (by another
    process). Raises ExecutorError while a live process holds the lock, IncompleteRunError if
    units are missing."""
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
        return finish(spec, run)
    finally:
        release(run.path / AGGREGATE_LOCK)  # run.path: finish may have renamed the directory


def maybe_finish(spec: RunSpec, run: RunDir) -> bool:
    """After a shared unit: if every unit is done, aggregate (once). -> whether this process did."""
    if is_complete(run.path) or done_units(spec, run) != {u.name for u in units(spec)}:
        return False
    try:
        return aggregate_once(spec, run) is not None
    except ExecutorError:  # someone else is at it
        return False
