"""`ntkrun convergence` (SPEC §5.1, paper Figure 1): the NTK converges and stays put as width grows.

Per (width, seed): draw the training set and the network, record Theta(x0, x) on the circle at
each recorded step, train by full-batch GD on f*(x) = x1 x2. Also the analytic limit Theta(L).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch

from ntkrun.kernels import analytic_kernels, empirical_ntk
from ntkrun.network import MLP, gd_step
from ntkrun.plots import convergence_figure
from ntkrun.runners import DivergenceError, Progress, resolve_device, resolve_dtype
from ntkrun.runs import RunDir
from ntkrun.spec import ConvergenceSpec

LOG = logging.getLogger("ntkrun")


def data_generator(seed: int) -> torch.Generator:
    """A generator for a unit's data, independent of the network's init stream of the same seed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))


def circle(gammas: torch.Tensor) -> torch.Tensor:
    """(G,) angles -> (G, 2) points (cos g, sin g)."""
    return torch.stack([torch.cos(gammas), torch.sin(gammas)], dim=1)


def grid_angles(n: int) -> torch.Tensor:
    """n angles evenly spaced in [-pi, pi), float64."""
    return -math.pi + 2 * math.pi * torch.arange(n, dtype=torch.float64) / n


def training_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X ~ N(0, I_2) of shape (n, 2) and y = x1 x2 of shape (n,), float64."""
    X = torch.randn(n, 2, generator=data_generator(seed), dtype=torch.float64)
    return X, X[:, 0] * X[:, 1]


def train_unit(
    spec: ConvergenceSpec, width: int, seed: int, device: torch.device, progress: Progress, cost: float
) -> tuple[list[dict], list[dict]]:
    """Train one network; -> (kernel rows, loss rows). Raises DivergenceError on a non-finite loss."""
    dtype = resolve_dtype(spec.dtype)
    net_spec, tr = spec.network, spec.training
    X, y = (t.to(device=device, dtype=dtype) for t in training_set(tr.n_train, seed))
    gammas = grid_angles(spec.grid.n_angles)
    x0 = circle(torch.tensor([spec.grid.x0_angle], dtype=torch.float64))
    Xg, x0 = circle(gammas).to(device, dtype), x0.to(device, dtype)
    net = MLP(
        2, width, net_spec.depth, net_spec.nonlinearity, net_spec.beta, seed=seed, dtype=dtype, device=device
    )
    recorded = set(tr.recorded)
    kernel_rows: list[dict] = []
    loss_rows: list[dict] = []
    label = f"width {width}, seed {seed}"
    for step in range(tr.steps + 1):
        if step in recorded:
            theta = empirical_ntk(net, x0, Xg)[0].double().cpu()
            if not torch.isfinite(theta).all():
                raise DivergenceError(f"{label}: non-finite NTK at step {step}; lower training.lr")
            kernel_rows += [
                {"width": width, "seed": seed, "step": step, "gamma": g, "theta": t}
                for g, t in zip(gammas.tolist(), theta.tolist(), strict=True)
            ]
        if step == tr.steps:
            break
        loss = float(gd_step(net, X, y, tr.lr))
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{label}: training diverged at step {step} (loss {loss}); lower training.lr (now {tr.lr})"
            )
        loss_rows.append({"width": width, "seed": seed, "step": step, "loss": loss})
        progress.advance(label, cost)
    with torch.no_grad():
        final = float(0.5 * torch.mean((net(X) - y) ** 2))
    loss_rows.append({"width": width, "seed": seed, "step": tr.steps, "loss": final})
    LOG.info("%s: loss %.4g -> %.4g", label, loss_rows[0]["loss"], final)
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


def execute(spec: ConvergenceSpec, run: RunDir, progress: Progress) -> pd.DataFrame:
    """Run every (width, seed) unit, write the CSVs and the figure into `run`; -> metrics."""
    device = resolve_device(spec.device)
    widths, seeds = spec.network.width, range(spec.base_seed, spec.base_seed + spec.seeds)
    # Progress is weighted by each step's multiply-adds, so the ETA is right across widths.
    step_cost = {w: float(2 * w + (spec.network.depth - 2) * w * w) for w in widths}
    progress.start(sum(step_cost[w] * spec.training.steps for w in widths) * len(seeds))
    kernel_rows: list[dict] = []
    loss_rows: list[dict] = []
    for width in widths:
        for seed in seeds:
            k, losses = train_unit(spec, width, seed, device, progress, step_cost[width])
            kernel_rows += k
            loss_rows += losses
    kernels = pd.DataFrame(kernel_rows)
    losses = pd.DataFrame(loss_rows)
    gammas = grid_angles(spec.grid.n_angles)
    x0 = circle(torch.tensor([spec.grid.x0_angle], dtype=torch.float64))
    net = spec.network
    _, theta = analytic_kernels(x0, circle(gammas), net.depth, net.nonlinearity, net.beta)
    theta_inf = pd.Series(theta[0].numpy(), index=gammas.numpy())
    summary = summarize(kernels, theta_inf)
    table = metrics(kernels, summary, losses)
    run.write_csv("kernels.csv", kernels)
    run.write_csv("losses.csv", losses)
    run.write_csv("summary.csv", summary)
    run.write_csv("metrics.csv", table)
    convergence_figure(summary, kernels, spec, run.path / "figure")
    return table
