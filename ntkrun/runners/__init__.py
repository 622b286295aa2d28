"""Experiment runners. Each experiment is a list of independent units (one per width x seed,
plus reference kernels) and an aggregation of their results into CSVs and figures:

    units(spec) -> list[Unit]
    run_unit(spec, unit, run, progress) -> result   (a dict of tensors, lists and numbers)
    aggregate(spec, run, results: {unit name: result}) -> the summary table

Units run here (`run_inline`), in a process pool or as SLURM jobs (ntkrun.executors); each
result is saved in the run directory, so a finished unit is never computed again, and the
aggregate reads only the saved results: however the units ran, the CSVs are the same.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import pandas as pd
import torch

from ntkrun import resources
from ntkrun.kernels import analytic_kernels
from ntkrun.network import MLP, gd_step, mse_cost
from ntkrun.runs import RunDir, UnitSpecMismatchError
from ntkrun.spec import RunSpec


class Progress(Protocol):
    """What a runner reports to: total work up front, then advances with a description."""

    def start(self, total: float) -> None: ...

    def advance(self, description: str, amount: float) -> None: ...


class NoProgress:
    def start(self, total: float) -> None:
        pass

    def advance(self, description: str, amount: float) -> None:
        pass


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or kernel."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def train(
    net: MLP,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    steps: int,
    label: str,
    progress: Progress,
    step_cost: float = 1.0,
    record_at: Collection[int] = (),
    record: Callable[[int], None] | None = None,
    start: int = 0,
) -> list[float]:
    """Full-batch GD from step `start` to `steps`; -> the cost before each step and after the last.

    `record(step)` is called before the step at each step in `record_at` (and at `steps`).
    Raises DivergenceError naming `label` and the step on a non-finite cost.
    """
    losses = []
    for step in range(start, steps + 1):
        if record is not None and step in record_at:
            record(step)
        if step == steps:
            break
        loss = float(gd_step(net, X, y, lr))
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{label}: training diverged at step {step} (loss {loss}); lower training.lr (now {lr})"
            )
        losses.append(loss)
        progress.advance(label, step_cost)
    with torch.no_grad():
        losses.append(float(mse_cost(net(X), y)))
    if not math.isfinite(losses[-1]):
        raise DivergenceError(f"{label}: training diverged at step {steps}; lower training.lr (now {lr})")
    return losses


def build_net(
    spec: RunSpec, n0: int, width: int, seed: int, device: torch.device, depth: int | None = None
) -> MLP:
    """The experiment's network of one width and seed: depth (default spec.network.depth),
    nonlinearity and beta from spec.network, dtype from spec.dtype."""
    net = spec.network  # type: ignore[attr-defined]
    depth = net.depth if depth is None else depth
    dtype = resolve_dtype(spec.dtype)
    return MLP(n0, width, depth, net.nonlinearity, net.beta, seed=seed, dtype=dtype, device=device)


EXPERIMENT_MODULES = {
    name: f"ntkrun.runners.{name}" for name in ("convergence", "regression", "scaling", "pca")
}


@dataclass(frozen=True)
class Unit:
    """One independent piece of an experiment."""

    name: str  # file name in units/, e.g. w500_s3
    cost: float  # progress weight: multiply-adds of its GD steps (0 for cheap units)
    args: dict[str, Any] = field(default_factory=dict)  # what run_unit needs: width, seed, ...
    stage: int = 1  # stage-0 units (reference kernels) run before the others, which read them


class IncompleteRunError(RuntimeError):
    """Aggregation was asked for while units are missing."""

    def __init__(self, missing: list[str]) -> None:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        super().__init__(f"{len(missing)} unit(s) not done: {shown}")
        self.missing = missing


def experiment_module(experiment: str) -> ModuleType:
    return importlib.import_module(EXPERIMENT_MODULES[experiment])


class NumericalRangeError(ValueError):
    """The network's kernels would underflow or overflow in the spec's dtype."""


def check_range(spec: RunSpec, q0: float = 0.1) -> None:
    """Refuse depth/nonlinearity/beta/dtype combinations whose kernels leave the dtype's range.

    The limiting Sigma(l)(x, x) and Theta(l)(x, x) of an input with |x|^2 / n0 = q0 (0.1: about
    the smallest input scale of the experiments) tell the size of the activations and of the
    empirical NTK; e.g. ReLU with beta = 0 halves Sigma at every layer, so a depth-300 network
    computes an NTK of exactly 0 in float32.
    """
    net = spec.network  # type: ignore[attr-defined]
    depth = max(net.depth) if isinstance(net.depth, list) else net.depth
    info = torch.finfo(resolve_dtype(spec.dtype))
    low, high = info.tiny * 1e4, info.max / 1e4
    x = torch.tensor([[math.sqrt(q0)]], dtype=torch.float64)
    sigma, theta = analytic_kernels(
        x, depth=depth, nonlinearity=net.nonlinearity, beta=net.beta, all_layers=True
    )
    values = torch.cat([sigma.flatten(), theta.flatten()])
    smallest, largest = float(values.min()), float(values.max())
    if smallest < low or largest > high or not math.isfinite(largest):
        what = "underflow" if smallest < low else "overflow"
        value = smallest if smallest < low else largest
        raise NumericalRangeError(
            f"network: depth {depth} with {net.nonlinearity} and beta {net.beta} drives the kernels to "
            f"{value:.3g} (Sigma/Theta of the limit): {spec.dtype} would {what} (normal range "
            f"{info.tiny:.3g} to {info.max:.3g}); use dtype: float64, a smaller depth, or beta > 0"
        )


def preflight(experiment: str, spec: RunSpec) -> None:
    """Checks that need more than the spec's schema, run before any run directory exists: the
    kernels' numerical range, and the experiment's own (e.g. data files). Raises ValueError."""
    check_range(spec)
    check = getattr(experiment_module(experiment), "check", None)
    if check is not None:
        check(spec)


def units(spec: RunSpec) -> list[Unit]:
    """The spec's units in their canonical order (stage 0 first)."""
    found = experiment_module(spec.experiment).units(spec)
    return sorted(found, key=lambda u: u.stage)


def find_unit(spec: RunSpec, key: str) -> Unit:
    """A unit by name or by its index in units(spec). Raises ValueError."""
    found = units(spec)
    if key.isdigit() and int(key) < len(found):
        return found[int(key)]
    for unit in found:
        if unit.name == key:
            return unit
    raise ValueError(
        f"--unit {key}: no such unit (this spec has {len(found)}: indices 0-{len(found) - 1}, "
        f"names {found[0].name} ... {found[-1].name}; list them with --list-units)"
    )


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
        self.progress.advance(self.unit.name, max(self.unit.cost - self.done, 0.0))


def compute_unit(spec: RunSpec, run: RunDir, unit: Unit, progress: Progress) -> dict[str, Any]:
    """The unit's saved result, or run it now and save it."""
    result = run.load_unit(unit.name)
    if result is None:
        t0 = time.time()
        try:
            result = experiment_module(spec.experiment).run_unit(spec, unit, run, progress)
        except (DivergenceError, UnitSpecMismatchError):
            raise  # the message names the network or the file already
        except ValueError as err:  # numerical trouble: say which unit
            raise ValueError(f"unit {unit.name}: {err}") from err
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(resolve_device(spec.device)),
            "threads": torch.get_num_threads(),
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "")),
            "slurm_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
            "wall_time_s": round(time.time() - t0, 3),
        }
        run.save_unit(unit.name, result, info)
    return result


def require(spec: RunSpec, run: RunDir, name: str) -> dict[str, Any]:
    """Another unit's result (a stage-0 unit): loaded, or computed here if it is not there yet."""
    return compute_unit(spec, run, find_unit(spec, name), NoProgress())


def done_units(spec: RunSpec, run: RunDir) -> set[str]:
    return {u.name for u in units(spec) if run.load_unit(u.name) is not None}


def run_inline(spec: RunSpec, run: RunDir, progress: Progress, only: list[Unit] | None = None) -> None:
    """Compute the units (all of the spec's, or `only`) that have no result yet, in this process."""
    todo = units(spec) if only is None else only
    progress.start(sum(u.cost for u in todo) or float(len(todo)))
    for unit in todo:
        tracker = _UnitProgress(progress, unit)
        compute_unit(spec, run, unit, tracker)
        tracker.finish()


def aggregate(spec: RunSpec, run: RunDir) -> pd.DataFrame:
    """Build the experiment's CSVs and figures from the saved unit results; -> summary table.
    Raises IncompleteRunError when a unit has no result."""
    results = {u.name: run.load_unit(u.name) for u in units(spec)}
    missing = [name for name, r in results.items() if r is None]
    if missing:
        raise IncompleteRunError(missing)
    return experiment_module(spec.experiment).aggregate(spec, run, results)


# ---------------------------------------------------------------- unit results as plain data


def pack(rows: list[dict[str, Any]] | pd.DataFrame) -> dict[str, list]:
    """Rows (or a DataFrame) -> {column: list of Python scalars}, storable by torch.save."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return {str(c): frame[c].tolist() for c in frame.columns}


def unpack(*tables: dict[str, list]) -> pd.DataFrame:
    """The inverse of pack, concatenating several tables in order."""
    return pd.concat([pd.DataFrame(t) for t in tables], ignore_index=True)


# ---------------------------------------------------------------- memory


def memory_estimate(spec: RunSpec, unit: Unit) -> int:
    """Estimated peak bytes of one unit (the experiment's `memory`)."""
    return int(experiment_module(spec.experiment).memory(spec, unit))


def check_memory(spec: RunSpec, todo: list[Unit], parallel: int = 1) -> tuple[int, str]:
    """Refuse (ResourceError) a spec whose largest unit, times the units running at once, would
    not fit in the memory available to this process's device. -> (estimate, limit description)."""
    biggest = max(todo, key=lambda u: memory_estimate(spec, u))
    need = memory_estimate(spec, biggest) * parallel
    if spec.executor.kind == "slurm":
        mem_gb = spec.executor.slurm.mem_gb
        if mem_gb is None:
            return need, "no limit known (set executor.slurm.mem_gb)"
        have, where = int(mem_gb * resources.GiB), "executor.slurm.mem_gb"
    else:
        found = resources.available_bytes(resolve_device(spec.device))
        if found is None:
            return need, "unknown on this machine"
        have, where = found
    times = f" x {parallel} units at once" if parallel > 1 else ""
    if need > have:
        raise resources.ResourceError(
            f"memory: unit {biggest.name}{times} needs about {resources.gib(need)} but "
            f"{resources.gib(have)} is available ({where}); reduce the width or the number of "
            "points, or pass --force to run anyway"
        )
    return need, f"{resources.gib(have)} available ({where})"
