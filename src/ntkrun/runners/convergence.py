"""`ntkrun convergence` (docs/science.md §5.1, Figure 1): the NTK converges and stays put as width grows.

Per (width, seed): draw the training set and the network, record Theta(x0, x) on the circle at
each recorded step, train by full-batch GD on f*(x) = x1 x2. Also the analytic limit Theta(L).
"""

from __future__ import annotations

import logging
from typing import Literal, TypedDict

import numpy as np
import pandas as pd
import torch

from ntkrun import resources
from ntkrun.architectures.base import Architecture
from ntkrun.costs import Cost
from ntkrun.data import circle, gaussian_inputs, grid_angles, product_target
from ntkrun.errors import DivergenceError
from ntkrun.kernels import empirical_ntk
from ntkrun.plots import convergence_figure
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    LimitShare,
    Table,
    architecture,
    build_net,
    check_user_model,
    exact_limit,
    limit_estimate,
    limit_share,
    limit_units,
    network_caption,
    pack,
    priced,
    resolve_device,
    resolve_dtype,
    train,
    unpack,
)
from ntkrun.runners.contract import Runner
from ntkrun.spec import GridSpec, MonteCarloSpec, NetworkSpec, RunSpec, TrainingSpec
from ntkrun.work import MonteCarloLimit, Progress, Results, TrainNet, Unit, UnitContext

LOG = logging.getLogger("ntkrun")


class ConvergenceSpec(RunSpec):
    experiment: Literal["convergence"] = "convergence"
    network: NetworkSpec = NetworkSpec()
    training: TrainingSpec = TrainingSpec()
    grid: GridSpec = GridSpec()
    kernels: MonteCarloSpec = MonteCarloSpec()  # the limit of a network.module


class NetResult(TypedDict):
    """A TrainNet unit's result: Theta(x0, grid) at the recorded steps, and the training losses."""

    kernels: Table
    losses: Table


def arch(spec: ConvergenceSpec) -> Architecture:
    """The description of spec.network on points of the circle."""
    return architecture(spec, (2,))


def grid_points(spec: ConvergenceSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gammas (n_angles,), x0 (1, 2), the circle points (n_angles, 2)), float64."""
    gammas = grid_angles(spec.grid.n_angles)
    return gammas, circle([spec.grid.x0_angle]), circle(gammas)


def train_unit(
    spec: ConvergenceSpec, width: int, seed: int, device: torch.device, progress: Progress, cost: float
) -> tuple[list[dict], list[dict]]:
    """Train one network, recording Theta(x0, .) on the grid; -> (kernel rows, loss rows)."""
    dtype = resolve_dtype(spec.dtype)
    tr = spec.training
    X = gaussian_inputs(tr.n_train, 2, seed)
    X, y = X.to(device, dtype), product_target(X).to(device, dtype)
    gammas, x0, Xg = grid_points(spec)
    Xg, x0 = Xg.to(device, dtype), x0.to(device, dtype)
    net = build_net(spec, 2, width, seed, device)
    label = f"width {width}, seed {seed}"
    kernel_rows: list[dict] = []

    def record(step: int) -> None:
        theta = empirical_ntk(net, x0, Xg)[0].double().cpu()
        if not torch.isfinite(theta).all():
            raise DivergenceError(f"{label}: non-finite NTK at step {step}; lower training.lr")
        kernel_rows.extend(
            {"width": width, "seed": seed, "step": step, "gamma": g, "theta": t}
            for g, t in zip(gammas.tolist(), theta.tolist(), strict=True)
        )

    losses = train(
        net,
        X,
        y,
        lr=tr.lr,
        steps=tr.steps,
        label=label,
        progress=progress,
        step_cost=cost,
        record_at=set(tr.recorded),
        record=record,
    )
    LOG.info("%s: loss %.4g -> %.4g", label, losses[0], losses[-1])
    loss_rows = [{"width": width, "seed": seed, "step": s, "loss": v} for s, v in enumerate(losses)]
    return kernel_rows, loss_rows


def summarize(kernels: pd.DataFrame, theta_inf: pd.Series) -> pd.DataFrame:
    """Per (width, step, gamma): mean and std over seeds, and the limit theta_inf."""
    summary = (
        kernels.groupby(["width", "step", "gamma"], sort=True)["theta"].agg(["mean", "std"]).reset_index()
    )
    summary["theta_inf"] = summary["gamma"].map(theta_inf)
    return summary


def metrics(kernels: pd.DataFrame, summary: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    """Per (width, step): seed spread, distance of the seed mean to theta_inf, change since the first step."""
    first = kernels["step"].min()
    base = kernels[kernels["step"] == first].set_index(["width", "seed", "gamma"])["theta"]
    rows = []
    for (width, step), group in summary.groupby(["width", "step"], sort=True):
        units = kernels[(kernels["width"] == width) & (kernels["step"] == step)]
        changes = [
            np.linalg.norm(g["theta"].to_numpy() - base.loc[(width, seed)].to_numpy())
            / np.linalg.norm(base.loc[(width, seed)].to_numpy())
            for seed, g in units.groupby("seed", sort=True)
        ]
        loss = losses[(losses["width"] == width) & (losses["step"] == step)]["loss"]
        rows.append(
            {
                "width": width,
                "step": step,
                "seed_spread": group["std"].mean(),
                "rel_dist_to_limit": np.linalg.norm(group["mean"] - group["theta_inf"])
                / np.linalg.norm(group["theta_inf"]),
                "rel_change_from_first": float(np.mean(changes)),
                "loss": loss.mean() if len(loss) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def check(spec: ConvergenceSpec) -> None:
    """The network on 2-D points (a composition is tried on one); a user's model's networks tried
    before anything is written (check_user_model)."""
    check_user_model(arch(spec), spec.network.width)


def step_cost(spec: ConvergenceSpec, width: int) -> Cost:
    """One GD step on the training set (NaN for a network this experiment refuses at its preflight:
    the units are listed before it)."""
    return priced(lambda: arch(spec)).gd_cost(spec.training.n_train, width)


def units(spec: ConvergenceSpec) -> list[Unit]:
    """One unit per (width, seed); for a network.module also the shares of its Monte-Carlo limit."""
    seeds = spec.seed_values
    nets = [
        Unit(f"w{w}_s{s}", step_cost(spec, w) * spec.training.steps, TrainNet(w, s))
        for w in spec.network.width
        for s in seeds
    ]
    if exact_limit(spec):
        return nets
    return nets + limit_units(
        "limit", spec.kernels.mc_samples, arch(spec).kernel_flops(1, spec.grid.n_angles)
    )


def memory(spec: ConvergenceSpec, unit: Unit) -> int:
    """Peak bytes of one unit: network, a GD step on the training set, Theta(x0, grid); or a share of
    the Monte-Carlo limit."""
    description, n = arch(spec), spec.grid.n_angles
    if isinstance(unit.work, MonteCarloLimit):
        return description.kernel_bytes(1, n)
    w, b = unit.work.width, resources.dtype_bytes(spec.dtype)
    return (
        description.network_bytes(w, 1, b)
        + description.training_bytes(spec.training.n_train, w, 1, b)
        + description.empirical_ntk_bytes(1, n, w, 1, b)
    )


def run_unit(
    spec: ConvergenceSpec, unit: Unit, ctx: UnitContext, progress: Progress
) -> NetResult | LimitShare:
    if isinstance(unit.work, MonteCarloLimit):
        _, x0, Xg = grid_points(spec)  # a share of the Monte-Carlo limit Theta(x0, grid)
        return limit_share(arch(spec), unit.work, x0, Xg)
    width, seed = unit.work.width, unit.work.seed
    device = resolve_device(spec.device)
    kernel_rows, loss_rows = train_unit(spec, width, seed, device, progress, step_cost(spec, width).flops)
    return NetResult(kernels=pack(kernel_rows), losses=pack(loss_rows))


def aggregate(spec: ConvergenceSpec, run: RunDir, results: Results) -> pd.DataFrame:
    """kernels.csv, losses.csv, summary.csv, metrics.csv and Figure 1; -> metrics."""
    trained = [r for _, r in results.of(TrainNet)]
    kernels = unpack(*(r["kernels"] for r in trained))
    losses = unpack(*(r["losses"] for r in trained))
    gammas, x0, Xg = grid_points(spec)
    if exact_limit(spec):
        theta = arch(spec).kernel(x0, Xg, kind="ntk")
        summary = summarize(kernels, pd.Series(theta[0].numpy(), index=gammas.numpy()))
    else:  # the Monte-Carlo limit: its mean, and its standard error beside it
        limit, _ = limit_estimate(results.__getitem__, spec.kernels.mc_samples)
        summary = summarize(kernels, pd.Series(limit.ntk[0].numpy(), index=gammas.numpy()))
        summary["theta_inf_se"] = summary["gamma"].map(
            pd.Series(limit.ntk_stderr[0].numpy(), index=gammas.numpy())
        )
    table = metrics(kernels, summary, losses)
    run.write_csv("kernels.csv", kernels)
    run.write_csv("losses.csv", losses)
    run.write_csv("summary.csv", summary)
    run.write_csv("metrics.csv", table)
    title = f"NTK convergence: {network_caption(spec.network)}"
    convergence_figure(
        summary, kernels, run.path / "figure", lr=spec.training.lr, seeds=spec.seeds, title=title
    )
    return table


RUNNER = Runner(
    ConvergenceSpec,
    # bumped by a change that alters this runner's results (docs/architecture.md, "Run identity"):
    # a run of an older version is then not resumed into mixed results
    results_version=1,
    inputs="points on the unit circle (2-D)",  # no architecture but the MLP takes them
    units=units,
    run_unit=run_unit,
    aggregate=aggregate,
    memory=memory,
    modules=True,  # a network.module, its limit by Monte Carlo (docs/science.md §10)
    layers=True,  # a network.layers composition of vectors (ntkrun.layers), its exact limit
    check=check,
)
