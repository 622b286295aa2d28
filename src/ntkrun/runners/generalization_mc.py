"""The kernel predictors of a network.module in `ntkrun generalization`: its Monte-Carlo NTK and NNGP
(docs/science.md §10) on the first N_train training points and the test points, computed in shares
(units limit_n{N}_0, limit_n{N}_1, ...: one pass over each share's networks gives both kinds on the
training and test points), then fitted like any kernel predictor, with the delete-a-share jackknife
standard error of each score (test_accuracy_se, test_mse_se in accuracy.csv): how much the
predictor's score would move with another draw of the Monte-Carlo networks."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ntkrun.architectures.base import Architecture
from ntkrun.costs import Cost
from ntkrun.kernels.monte_carlo import MonteCarloKernels, chunks, jackknife_se
from ntkrun.linalg import kernel_solve_, solve_bytes
from ntkrun.runners.common import LimitShare, cholesky_cost, limit_estimate, limit_share, limit_units, pack
from ntkrun.runners.labelled import CLASSES, FitResult, dataset, scores, targets
from ntkrun.work import MonteCarloLimit, Progress, Unit, UnitContext

LOG = logging.getLogger("ntkrun")


def limit_prefix(n: int) -> str:
    return f"limit_n{n}"


def share_units(spec: Any, description: Architecture, n: int, m: int) -> list[Unit]:
    """The shares of the Monte-Carlo kernels on the first n training points and the m test points."""
    return limit_units(limit_prefix(n), spec.kernels.mc_samples, description.kernel_cost(n + m, n), n_train=n)


def fit_cost(spec: Any, predictors: tuple[str, ...], n: int, m: int) -> Cost:
    """A fit: per kind, a solve and a test prediction for the estimate and each replicate."""
    solves = len(chunks(spec.kernels.mc_samples)) + 1
    return (cholesky_cost(n) + Cost(gemm=2.0 * m * n * CLASSES)) * (len(predictors) * solves)


def share_bytes(description: Architecture, n: int, m: int) -> int:
    return description.kernel_bytes(n + m, n)


def fit_bytes(spec: Any, n: int, m: int) -> int:
    """The shares' four (n + m, n) tensors each, the estimate's and a replicate's two, and a solve."""
    shares = len(chunks(spec.kernels.mc_samples))
    return (4 * shares + 6) * (n + m) * n * 8 + solve_bytes(n, CLASSES, 8)


def share(spec: Any, description: Architecture, work: MonteCarloLimit) -> LimitShare:
    """One share's kernels of [X; X_test] against X, the first work.n_train training points."""
    X, _, Xt, _ = dataset(spec, work.n_train)
    return limit_share(description, work, torch.cat([X, Xt]), X)


def predict(
    spec: Any, kind: str, K: torch.Tensor, n: int, Y: torch.Tensor
) -> tuple[torch.Tensor, float, list[str]]:
    """K (n + m, n) of one kind -> (test predictions (m, 10), the ridge used, the solve's notes)."""
    relative = spec.kernels.ridge + (spec.kernels.nngp_noise if kind == "nngp" else 0.0)
    alpha, ridge, notes = kernel_solve_(K[:n].clone(), Y, ridge=relative)
    return K[n:] @ alpha.double(), ridge, notes


def fit(spec: Any, unit: Unit, ctx: UnitContext, progress: Progress) -> FitResult:
    """Each predictor (ntk, nngp) from the shares' estimate, scored on the test points; each score's
    jackknife standard error from the leave-one-share-out estimates."""
    predictors, n = unit.work.predictors, unit.work.n_train
    _, labels, _, labels_t = dataset(spec, n)
    Y = targets(spec, labels)
    whole, replicates = limit_estimate(ctx.require, spec.kernels.mc_samples, n_train=n)

    def kernel(estimate: MonteCarloKernels, kind: str) -> torch.Tensor:
        return estimate.ntk if kind == "ntk" else estimate.nngp

    rows, all_notes = [], []
    for predictor in predictors:
        pred, ridge, notes = predict(spec, predictor, kernel(whole, predictor), n, Y)
        row = {
            "predictor": predictor,
            "n_train": n,
            "width": math.nan,
            "seed": -1,
            **scores(spec, pred, labels_t),
        }
        row.update(ridge=ridge, gram_dtype="float64")
        again = [
            scores(spec, predict(spec, predictor, kernel(e, predictor), n, Y)[0], labels_t)
            for e in replicates
        ]
        for key in ("test_accuracy", "test_mse"):
            row[f"{key}_se"] = jackknife_se([s[key] for s in again]) if again else math.nan
        progress.advance(f"{unit.name}: {predictor}", unit.flops / len(predictors))
        all_notes.extend(f"{predictor}: {note}" for note in notes)
        LOG.info("%s", row)
        rows.append(row)
    for note in all_notes:
        LOG.warning("%s: %s", unit.name, note)
    return FitResult(rows=pack(rows), notes=all_notes)
