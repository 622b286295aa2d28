"""`ntkrun regression` (docs/science.md §5.2, paper Figure 2): trained networks vs the limiting Gaussian.

Per (width, seed): train a network by GD on a few points of the unit circle and record f_T on
the circle. The limit: f_t is Gaussian with the mean and variance of docs/science.md §4, from the exact
kernels (`kernel: analytic`) or from one wide network at init (`kernel: empirical`), at t = T
(the actual training time, discrete GD) and t = infinity.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal, TypedDict

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from ntkrun import dynamics, resources
from ntkrun.architectures.base import Architecture
from ntkrun.costs import Cost
from ntkrun.data import circle, grid_angles, product_target, seeded_generator
from ntkrun.errors import NumericalError, SpecError
from ntkrun.kernels import empirical_nngp, empirical_ntk
from ntkrun.plots import regression_figure
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    Table,
    UnknownCost,
    architecture,
    build_net,
    distinct_names,
    network_caption,
    ntk_flops,
    pack,
    placement,
    priced,
    train,
    unpack,
)
from ntkrun.runners.contract import Runner
from ntkrun.spec import (
    CircleGridSpec,
    Model,
    NetworkSpec,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RunSpec,
)
from ntkrun.work import Progress, Reference, Results, TrainNet, Unit, UnitContext

LOG = logging.getLogger("ntkrun")


class RegressionTrainingSpec(Model):
    lr: PositiveFloat = 1.0  # GD learning rate
    steps: PositiveInt = 1000  # full-batch GD steps (training time T = lr x steps)


class RegressionDataSpec(Model):
    # (choice) training inputs on the unit circle; null = n_train random angles
    train_angles: (
        Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1)] | None
    ) = [-2.5, -0.9, 0.6, 2.2]
    n_train: PositiveInt | None = None  # random angles, uniform on [-pi, pi), seeded by data_seed
    data_seed: NonNegativeInt = 0  # the seed of the random angles (n_train)
    target: Literal["x1*x2", "sin", "values"] = "x1*x2"  # (choice) f*(x) = x1 x2
    target_k: PositiveInt = 1  # target sin: f* = sin(k gamma)
    target_values: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None  # target values

    @model_validator(mode="after")
    def _consistent(self) -> RegressionDataSpec:
        if (self.train_angles is None) == (self.n_train is None):
            raise ValueError(
                "give exactly one of train_angles and n_train (for random angles also set train_angles: null)"
            )
        n = len(self.train_angles) if self.train_angles is not None else self.n_train
        if self.train_angles is not None:
            wrapped = sorted(round(math.remainder(a, 2 * math.pi), 12) for a in self.train_angles)
            if len(set(wrapped)) < len(wrapped):
                raise ValueError(
                    f"train_angles {self.train_angles} repeat a point of the circle: the kernel matrix "
                    "would be singular"
                )
        if self.target == "values":
            if self.target_values is None or len(self.target_values) != n:
                raise ValueError(
                    f"target 'values' needs target_values with one value per training point ({n})"
                )
        elif self.target_values is not None:
            raise ValueError(f"target_values is only read with target: values (target is {self.target!r})")
        return self


class RegressionSpec(RunSpec):
    experiment: Literal["regression"] = "regression"
    network: NetworkSpec = NetworkSpec(width=[50, 1000])
    training: RegressionTrainingSpec = RegressionTrainingSpec()
    data: RegressionDataSpec = RegressionDataSpec()
    kernel: Literal["analytic", "empirical"] = "analytic"  # the limit's Theta and Sigma
    kernel_width: PositiveInt = 10000  # kernel: empirical, one network of this width at init
    kernel_seed: NonNegativeInt = 0  # that network's seed
    # the band of network values
    percentiles: Annotated[list[Annotated[float, Field(gt=0, lt=100)]], Field(min_length=2)] = [10, 50, 90]
    grid: CircleGridSpec = CircleGridSpec()

    @model_validator(mode="after")
    def _named_percentiles(self) -> RegressionSpec:
        distinct_names("percentiles", self.percentiles, "the column names of functions.csv (p{p})")
        return self


class LimitResult(TypedDict):
    """The Reference unit's result: the limiting Gaussian's mean and percentiles on the grid."""

    limit: Table


class NetResult(TypedDict):
    """A TrainNet unit's result: f_T on the grid, and the loss before and after training."""

    functions: Table
    losses: Table


def check(spec: RegressionSpec) -> None:
    """The network on 2-D points (a composition is tried on one); kernel: empirical reads the MLP's
    readout (empirical_nngp): SpecError for a composition."""
    arch(spec)
    if spec.network.layers is not None and spec.kernel == "empirical":
        raise SpecError(
            "kernel: empirical estimates Sigma from an MLP's readout; a network.layers composition has "
            "its exact limit (kernel: analytic)"
        )


def training_data(spec: RegressionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(angles (N,), targets (N,)) in float64, from the data section of the spec."""
    data = spec.data
    if data.train_angles is not None:
        angles = torch.tensor(data.train_angles, dtype=torch.float64)
    else:
        u = torch.rand(data.n_train, generator=seeded_generator(data.data_seed, 2), dtype=torch.float64)
        angles = -math.pi + 2 * math.pi * u
    if data.target == "x1*x2":
        y = product_target(circle(angles))
    elif data.target == "sin":
        y = torch.sin(data.target_k * angles)
    else:
        y = torch.tensor(data.target_values, dtype=torch.float64)
    return angles, y


def limit_kernels(
    spec: RegressionSpec, X: torch.Tensor, Xg: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """Theta and Sigma on train x train, grid x train, and Sigma on the grid diagonal (float64, CPU)."""
    if spec.kernel == "analytic":
        description = arch(spec)

        def kernels(A: torch.Tensor, B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            sigma, theta = description.kernels(A, B, kinds=["nngp", "ntk"])
            return sigma, theta
    else:
        wide = build_net(spec, 2, spec.kernel_width, spec.kernel_seed, device)

        def kernels(A: torch.Tensor, B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            A, B = A.to(device), None if B is None else B.to(device)
            return empirical_nngp(wide, A, B), empirical_ntk(wide, A, B)

    sigma, theta = kernels(X)
    sigma_x, theta_x = kernels(Xg, X)
    sigma_grid, _ = kernels(Xg)
    out = {
        "sigma": sigma,
        "theta": theta,
        "sigma_x": sigma_x,
        "theta_x": theta_x,
        "sigma_xx": sigma_grid.diag(),
    }
    return {name: value.detach().double().cpu() for name, value in out.items()}


def limit_table(spec: RegressionSpec, k: dict, y: torch.Tensor, gammas: torch.Tensor) -> pd.DataFrame:
    """Rows (kernel, t, gamma, mean, std, p..) for t = T (discrete GD) and t = inf."""
    eig = dynamics.eigen(k["theta"])
    LOG.info("limit kernel (%s): condition number %.3g", spec.kernel, eig.condition_number)
    lr, T = spec.training.lr, spec.training.steps * spec.training.lr
    rows = []
    for t in (T, math.inf):
        mean, var = dynamics.gaussian_process(
            eig, k["theta_x"], y, k["sigma"], k["sigma_x"], k["sigma_xx"], t, lr=None if math.isinf(t) else lr
        )
        q = dynamics.percentiles(mean, var, spec.percentiles)
        frame = pd.DataFrame(
            {
                "kernel": spec.kernel,
                "t": t,
                "gamma": gammas.numpy(),
                "mean": mean.numpy(),
                "std": var.sqrt().numpy(),
            }
        )
        for p, values in zip(spec.percentiles, q, strict=True):
            frame[f"p{p:g}"] = values.numpy()
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def metrics(
    functions: pd.DataFrame, limit: pd.DataFrame, losses: pd.DataFrame, spec: RegressionSpec
) -> pd.DataFrame:
    """Per width: fraction inside the outer percentile band (at t = inf and t = T), final loss,
    and rms(seed mean - limit mean) / rms(limit std) at t = inf."""
    lo, hi = f"p{min(spec.percentiles):g}", f"p{max(spec.percentiles):g}"
    T = spec.training.steps * spec.training.lr
    rows = []
    for width, g in functions.groupby("width", sort=True):
        row: dict = {"width": width}
        for t, name in ((math.inf, "in_band_inf"), (T, "in_band_T")):
            band = limit[limit["t"] == t].set_index("gamma")
            f = g.join(band[[lo, hi]], on="gamma")
            row[name] = float(((f["f_T"] >= f[lo]) & (f["f_T"] <= f[hi])).mean())
        row["expected_in_band"] = (max(spec.percentiles) - min(spec.percentiles)) / 100
        row["train_loss_T"] = float(losses[losses["width"] == width]["loss_T"].mean())
        band = limit[limit["t"] == math.inf].set_index("gamma")
        seed_mean = g.groupby("gamma")["f_T"].mean()
        diff = seed_mean - band["mean"].reindex(seed_mean.index)
        row["mean_dist_in_std"] = float(np.sqrt((diff**2).mean() / (band["std"] ** 2).mean()))
        rows.append(row)
    return pd.DataFrame(rows)


def n_train(spec: RegressionSpec) -> int:
    data = spec.data
    return len(data.train_angles) if data.train_angles is not None else data.n_train or 1


def step_cost(spec: RegressionSpec, width: int) -> Cost:
    """One GD step on the training points."""
    return cost_model(spec).gd_cost(n_train(spec), width)


def arch(spec: RegressionSpec) -> Architecture:
    """The description of spec.network on the circle's points."""
    return architecture(spec, (2,))


def cost_model(spec: RegressionSpec) -> Architecture | UnknownCost:
    """The description the units' costs come from (NaN costs for a network the preflight refuses
    on 2-D points: the units are listed before it; common.priced)."""
    return priced(lambda: arch(spec))


def units(spec: RegressionSpec) -> list[Unit]:
    """`limit` (the limiting Gaussian; a wide network at init for kernel: empirical), then one
    unit per (width, seed)."""
    seeds = spec.seed_values
    n, g, depth = n_train(spec), spec.grid.n_angles, spec.network.depth
    pairs = [(n, n), (g, n), (g, g)]
    if spec.kernel == "empirical":
        limit_cost = sum(ntk_flops(*p, 2, spec.kernel_width, depth) for p in pairs)
    else:
        limit_cost = sum((cost_model(spec).kernel_cost(*p) for p in pairs), Cost())
    return [Unit("limit", limit_cost, Reference())] + [
        Unit(f"w{w}_s{s}", step_cost(spec, w) * spec.training.steps, TrainNet(w, s))
        for w in spec.network.width
        for s in seeds
    ]


def memory(spec: RegressionSpec, unit: Unit) -> int:
    """Peak bytes of one unit, the description's account: the limit's kernels (train, grid x train,
    grid x grid) with the eigendecomposition, or for kernel: empirical one wide network's NTK; or a
    network with a GD step and its outputs on the grid."""
    b, n, g, description = resources.dtype_bytes(spec.dtype), n_train(spec), spec.grid.n_angles, arch(spec)
    pairs = [(n, n), (g, n), (g, g)]
    if isinstance(unit.work, Reference) and spec.kernel == "empirical":
        w = spec.kernel_width
        return (
            description.network_bytes(w, 1, b)
            + sum(description.empirical_ntk_bytes(*p, w, 1, b) for p in pairs)
            + description.training_bytes(g, w, 1, b)
        )
    if isinstance(unit.work, Reference):
        return sum(description.kernel_bytes(*p) for p in pairs) + resources.eigen_bytes(n) + 4 * g * n * 8
    width = unit.work.width
    return description.network_bytes(width, 1, b) + description.training_bytes(max(n, g), width, 1, b)


def run_unit(
    spec: RegressionSpec, unit: Unit, ctx: UnitContext, progress: Progress
) -> LimitResult | NetResult:
    device, dtype = placement(spec)
    angles, y = training_data(spec)
    gammas = grid_angles(spec.grid.n_angles)
    X, Xg = circle(angles), circle(gammas)
    if isinstance(unit.work, Reference):
        try:
            limit = limit_table(spec, limit_kernels(spec, X, Xg, device), y, gammas)
        except NumericalError as err:
            if spec.kernel != "empirical":
                raise
            hint = f"here: kernel_width {spec.kernel_width} is too narrow (or use kernel: analytic)"
            raise NumericalError(f"{err}; {hint}") from err
        return LimitResult(limit=pack(limit))
    width, seed = unit.work.width, unit.work.seed
    net = build_net(spec, 2, width, seed, device)
    label = f"width {width}, seed {seed}"
    losses = train(
        net,
        X.to(device, dtype),
        y.to(device, dtype),
        lr=spec.training.lr,
        steps=spec.training.steps,
        label=label,
        progress=progress,
        step_cost=step_cost(spec, width).flops,
    )
    with torch.no_grad():
        f_T = net(Xg.to(device, dtype)).double().cpu()
    LOG.info("%s: loss %.4g -> %.4g", label, losses[0], losses[-1])
    functions = {"width": width, "seed": seed, "gamma": gammas.tolist(), "f_T": f_T.tolist()}
    return NetResult(
        functions=pack(pd.DataFrame(functions)),
        losses=pack([{"width": width, "seed": seed, "loss_0": losses[0], "loss_T": losses[-1]}]),
    )


def aggregate(spec: RegressionSpec, run: RunDir, results: Results) -> pd.DataFrame:
    """functions.csv, limit.csv, losses.csv, training.csv, metrics.csv and Figure 2; -> metrics."""
    trained = [r for _, r in results.of(TrainNet)]
    functions = unpack(*(r["functions"] for r in trained))
    losses = unpack(*(r["losses"] for r in trained))
    limit = unpack(results[Reference()]["limit"])
    angles, y = training_data(spec)
    table = metrics(functions, limit, losses, spec)
    training = pd.DataFrame({"gamma": angles.numpy(), "y": y.numpy()})
    run.write_csv("functions.csv", functions)
    run.write_csv("limit.csv", limit)
    run.write_csv("losses.csv", losses)
    run.write_csv("training.csv", training)
    run.write_csv("metrics.csv", table)
    title = f"{network_caption(spec.network)}, {spec.training.steps} GD steps, {spec.kernel} limit"
    band = (min(spec.percentiles), max(spec.percentiles))
    figure = run.path / "figure"
    regression_figure(functions, limit, training, figure, band=band, seeds=spec.seeds, title=title)
    return table


RUNNER = Runner(
    RegressionSpec,
    results_version=1,  # bumped by a change that alters its results (docs/architecture.md, "Run identity")
    inputs="points on the unit circle (2-D)",  # no architecture but the MLP takes them
    units=units,
    run_unit=run_unit,
    aggregate=aggregate,
    memory=memory,
    layers=True,  # a network.layers composition of vectors (ntkrun.layers), its exact limit
    check=check,
)
