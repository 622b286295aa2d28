"""`ntkrun scaling`: the paper's two theorems as measured rates.

Per (depth, width, seed), on a fixed input set Z:
- dist_init   = ||Theta_n(0) - Theta_inf|| / ||Theta_inf||           (Theorem 1; theory: n^-1/2)
- change_T    = ||Theta_n(T) - Theta_n(0)|| / ||Theta_n(0)||          (Theorem 2) after T GD steps
- func_dist_T = ||f_T - f_lin_T|| / ||f_lin_T - f_0|| on Z, where f_lin_T = f_0 + A_T (y - f_0(X)) is the
  kernel-regression prediction of docs/science.md §4 with Theta_inf for the same initial function f_0.
Then log-log slopes against width per depth, with bootstrap intervals over seeds.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import pandas as pd
import torch
from pydantic import BeforeValidator, Field, model_validator

from ntkrun import dynamics, resources
from ntkrun.data import circle, gaussian_inputs, grid_angles, product_target, seeded_generator
from ntkrun.fits import slope_table
from ntkrun.kernels import analytic_kernels, empirical_ntk
from ntkrun.network import layer_sizes
from ntkrun.plots import scaling_figure
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    Progress,
    Unit,
    UnitContext,
    analytic_flops,
    build_net,
    eigen_flops,
    gd_flops,
    ntk_flops,
    pack,
    resolve_device,
    resolve_dtype,
    train,
    unpack,
)
from ntkrun.spec import (
    Model,
    NonlinearityName,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    RunSpec,
    as_list,
)

LOG = logging.getLogger("ntkrun")


class ScalingNetworkSpec(Model):
    depth: Annotated[list[PositiveInt], Field(min_length=1), BeforeValidator(as_list)] = [2, 3, 4]
    width: Annotated[list[PositiveInt], Field(min_length=2), BeforeValidator(as_list)] = [
        2**k for k in range(6, 14)
    ]  # a log grid: the slope needs at least two widths
    nonlinearity: NonlinearityName = "relu"
    beta: NonNegativeFloat = 0.1
    parametrization: Literal["ntk", "standard"] = "ntk"  # docs/science.md §7.2


class ScalingDataSpec(Model):
    inputs: Literal["circle", "gaussian"] = "circle"  # the fixed set where Theta is compared
    n_points: PositiveInt = 16  # circle: evenly spaced angles; gaussian: x ~ N(0, I_dim)
    dim: PositiveInt = 2  # gaussian inputs only (circle points are 2-D)


class ScalingTrainingSpec(Model):
    lr: PositiveFloat = 1.0
    steps: PositiveInt = 200
    n_train: PositiveInt = 128  # training inputs x ~ N(0, I), target x1 x2, drawn once per seed


class ScalingSpec(RunSpec):
    experiment: Literal["scaling"] = "scaling"
    seeds: Annotated[int, Field(ge=2)] = 8  # a bootstrap over seeds needs at least two
    network: ScalingNetworkSpec = ScalingNetworkSpec()
    training: ScalingTrainingSpec = ScalingTrainingSpec()  # the regression task of §5.1
    data: ScalingDataSpec = ScalingDataSpec()
    n_boot: PositiveInt = 2000  # bootstrap resamples for the slope intervals

    @model_validator(mode="after")
    def _inputs(self) -> ScalingSpec:
        if self.data.inputs == "circle" and self.data.dim != 2:
            raise ValueError("data.dim applies to gaussian inputs only: circle points are 2-D")
        return self


Spec = ScalingSpec
METRICS = {"dist_init": -0.5, "change_T": -0.5, "func_dist_T": -0.5}  # reference slopes (see README)


def fixed_inputs(spec: ScalingSpec) -> torch.Tensor:
    """Z (n_points, n0): evenly spaced circle points, or Gaussian points from a fixed stream."""
    data = spec.data
    if data.inputs == "circle":
        return circle(grid_angles(data.n_points))
    return torch.randn(data.n_points, data.dim, generator=seeded_generator(0, 3), dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float((a - b).norm() / b.norm())


def input_dim(spec: ScalingSpec) -> int:
    return 2 if spec.data.inputs == "circle" else spec.data.dim


def step_cost(spec: ScalingSpec, depth: int, width: int) -> float:
    """FLOPs of one GD step on the training set."""
    return gd_flops(spec.training.n_train, input_dim(spec), width, depth)


def unit_cost(spec: ScalingSpec, depth: int, width: int) -> float:
    """FLOPs of one unit: its GD steps, Theta on Z twice, and the limit on X and Z."""
    n, z, dim = spec.training.n_train, spec.data.n_points, input_dim(spec)
    limit = analytic_flops(n + z, n + z, dim, depth) + eigen_flops(n)
    kernels = 2 * ntk_flops(z, z, dim, width, depth)
    return step_cost(spec, depth, width) * spec.training.steps + kernels + limit


def units(spec: ScalingSpec) -> list[Unit]:
    net = spec.network
    return [
        Unit(f"d{d}_w{w}_s{s}", unit_cost(spec, d, w), {"depth": d, "width": w, "seed": s})
        for d in net.depth
        for w in net.width
        for s in spec.seed_values
    ]


def limit_kernels(spec: ScalingSpec, depth: int, Z: torch.Tensor, X: torch.Tensor) -> dict:
    """Theta_inf on Z x Z, Z x X and the eigen-decomposition of Theta_inf(X, X)."""
    args = (depth, spec.network.nonlinearity, spec.network.beta)
    return {
        "eig": dynamics.eigen(analytic_kernels(X, None, *args)[1]),
        "theta_zx": analytic_kernels(Z, X, *args)[1],
        "theta_zz": analytic_kernels(Z, None, *args)[1],
    }


def memory(spec: ScalingSpec, unit: Unit) -> int:
    """Peak bytes of one unit: network, GD step, Theta on Z, the analytic limit on X and Z."""
    dim = input_dim(spec)
    sizes = layer_sizes(dim, unit.args["width"], unit.args["depth"])
    b, n, z = resources.dtype_bytes(spec.dtype), spec.training.n_train, spec.data.n_points
    return (
        resources.network_bytes(sizes, b)
        + resources.training_bytes(max(n, z), sizes, b)
        + resources.empirical_ntk_bytes(z, z, sizes, b)
        + resources.analytic_bytes(n, n)
        + resources.analytic_bytes(z, n + z)
        + resources.eigen_bytes(n)
    )


def run_unit(spec: ScalingSpec, unit: Unit, ctx: UnitContext, progress: Progress) -> dict:
    """The three distances of one (depth, width, seed) network."""
    depth, width, seed = unit.args["depth"], unit.args["width"], unit.args["seed"]
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    tr = spec.training
    Z64 = fixed_inputs(spec)
    X = gaussian_inputs(tr.n_train, Z64.shape[1], seed)
    y = product_target(X)
    limit = limit_kernels(spec, depth, Z64, X)
    Z = Z64.to(device, dtype)
    net = build_net(spec, Z.shape[1], width, seed, device, depth=depth)
    theta_0 = empirical_ntk(net, Z).double().cpu()
    with torch.no_grad():
        f0_Z, f0_X = net(Z).double().cpu(), net(X.to(device, dtype)).double().cpu()
    label = f"depth {depth}, width {width}, seed {seed}"
    cost = step_cost(spec, depth, width)
    train(
        net,
        X.to(device, dtype),
        y.to(device, dtype),
        lr=tr.lr,
        steps=tr.steps,
        label=label,
        progress=progress,
        step_cost=cost,
    )
    theta_T = empirical_ntk(net, Z).double().cpu()
    with torch.no_grad():
        f_T = net(Z).double().cpu()
    f_lin = dynamics.linearized(limit["eig"], limit["theta_zx"], y, f0_X, f0_Z, tr.steps * tr.lr, lr=tr.lr)
    row = {
        "depth": depth,
        "width": width,
        "seed": seed,
        "dist_init": rel(theta_0, limit["theta_zz"]),
        "change_T": rel(theta_T, theta_0),
        "func_dist_T": float((f_T - f_lin).norm() / (f_lin - f0_Z).norm()),
    }
    LOG.info("%s", row)
    return {"rows": pack([row])}


def fits(table: pd.DataFrame, spec: ScalingSpec) -> pd.DataFrame:
    """Per depth and metric: the slope in width with its interval, beside the reference slope."""
    return slope_table(table, METRICS, n_boot=spec.n_boot, seed=spec.base_seed, by="depth")


def aggregate(spec: ScalingSpec, run: RunDir, results: dict[str, dict]) -> pd.DataFrame:
    """scaling.csv, fits.csv and the figure; -> fits."""
    table = unpack(*(r["rows"] for r in results.values()))
    fit_table = fits(table, spec)
    run.write_csv("scaling.csv", table)
    run.write_csv("fits.csv", fit_table)
    title = (
        f"{spec.network.nonlinearity}, beta {spec.network.beta:g}, {spec.seeds} seeds, "
        f"T = {spec.training.steps} GD steps (lr {spec.training.lr:g})"
    )
    scaling_figure(table, fit_table, run.path / "figure", title=title)
    return fit_table
