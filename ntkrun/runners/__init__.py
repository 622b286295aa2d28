"""Experiment runners: each turns a validated spec into the files of a run directory."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Collection
from typing import Protocol

import pandas as pd
import torch

from ntkrun.network import MLP, gd_step, mse_cost
from ntkrun.runs import RunDir
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


Runner = Callable[[RunSpec, RunDir, Progress], pd.DataFrame]
EXPERIMENT_MODULES = {
    name: f"ntkrun.runners.{name}" for name in ("convergence", "regression", "scaling", "pca")
}


def get_runner(experiment: str) -> Runner:
    """The `execute(spec, run, progress) -> results table` function of an experiment."""
    return importlib.import_module(EXPERIMENT_MODULES[experiment]).execute


def preflight(experiment: str, spec: RunSpec) -> None:
    """An experiment's checks that need more than the spec (e.g. data files), run before any
    run directory exists. Raises ValueError."""
    check = getattr(importlib.import_module(EXPERIMENT_MODULES[experiment]), "check", None)
    if check is not None:
        check(spec)
