"""`ntkrun convergence` (docs/science.md §5.1, Figure 1): the NTK converges and stays put as width grows.

Per (width, seed): draw the training set and the network, record Theta(x0, x) on the circle at
each recorded step, train by full-batch GD on f*(x) = x1 x2. Also the analytic limit Theta(L).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ntkrun import resources
from ntkrun.data import circle, gaussian_inputs, grid_angles, product_target
from ntkrun.errors import DivergenceError
from ntkrun.kernels import analytic_kernels, empirical_ntk
from ntkrun.network import layer_sizes
from ntkrun.plots import convergence_figure
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    build_net,
    gd_flops,
    network_caption,
    pack,
    resolve_device,
    resolve_dtype,
    train,
    unpack,
)
from ntkrun.spec import GridSpec, NetworkSpec, RunSpec, TrainingSpec
from ntkrun.work import Progress, TrainNet, Unit, UnitContext

LOG = logging.getLogger("ntkrun")
INPUTS = "points on the unit circle (2-D)"  # no architecture but the MLP takes them (preflight)


class ConvergenceSpec(RunSpec):
    experiment: Literal["convergence"] = "convergence"
    network: NetworkSpec = NetworkSpec()
    training: TrainingSpec = TrainingSpec()
    grid: GridSpec = GridSpec()


Spec = ConvergenceSpec


def train_unit(
    spec: ConvergenceSpec, width: int, seed: int, device: torch.device, progress: Progress, cost: float
) -> tuple[list[dict], list[dict]]:
    """Train one network, recording Theta(x0, .) on the grid; -> (kernel rows, loss rows)."""
    dtype = resolve_dtype(spec.dtype)
    tr = spec.training
    X = gaussian_inputs(tr.n_train, 2, seed)
    X, y = X.to(device, dtype), product_target(X).to(device, dtype)
    gammas = grid_angles(spec.grid.n_angles)
    Xg, x0 = circle(gammas).to(device, dtype), circle([spec.grid.x0_angle]).to(device, dtype)
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


def step_cost(spec: ConvergenceSpec, width: int) -> float:
    """FLOPs of one GD step on the training set."""
    return gd_flops(spec.training.n_train, 2, width, spec.network.depth)


def units(spec: ConvergenceSpec) -> list[Unit]:
    seeds = spec.seed_values
    return [
        Unit(f"w{w}_s{s}", step_cost(spec, w) * spec.training.steps, TrainNet(w, s))
        for w in spec.network.width
        for s in seeds
    ]


def memory(spec: ConvergenceSpec, unit: Unit) -> int:
    """Peak bytes of one unit: network, a GD step on the training set, Theta(x0, grid)."""
    sizes = layer_sizes(2, unit.work.width, spec.network.depth)
    b = resources.dtype_bytes(spec.dtype)
    return (
        resources.network_bytes(sizes, b)
        + resources.training_bytes(spec.training.n_train, sizes, b)
        + resources.empirical_ntk_bytes(1, spec.grid.n_angles, sizes, b)
    )


def run_unit(spec: ConvergenceSpec, unit: Unit, ctx: UnitContext, progress: Progress) -> dict:
    width, seed = unit.work.width, unit.work.seed
    device = resolve_device(spec.device)
    kernel_rows, loss_rows = train_unit(spec, width, seed, device, progress, step_cost(spec, width))
    return {"kernels": pack(kernel_rows), "losses": pack(loss_rows)}


def aggregate(spec: ConvergenceSpec, run: RunDir, results: dict[str, dict]) -> pd.DataFrame:
    """kernels.csv, losses.csv, summary.csv, metrics.csv and Figure 1; -> metrics."""
    kernels = unpack(*(r["kernels"] for r in results.values()))
    losses = unpack(*(r["losses"] for r in results.values()))
    gammas = grid_angles(spec.grid.n_angles)
    net = spec.network
    _, theta = analytic_kernels(
        circle([spec.grid.x0_angle]), circle(gammas), net.depth, net.nonlinearity, net.beta
    )
    theta_inf = pd.Series(theta[0].numpy(), index=gammas.numpy())
    summary = summarize(kernels, theta_inf)
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
