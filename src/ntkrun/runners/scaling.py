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
import math
from typing import Annotated, Literal, NotRequired, TypedDict

import pandas as pd
import torch
from pydantic import BeforeValidator, Field, model_validator

from ntkrun import dynamics, resources
from ntkrun.architectures.base import Architecture
from ntkrun.costs import Cost
from ntkrun.data import circle, gaussian_inputs, grid_angles, product_target, seeded_generator
from ntkrun.fits import slope_table
from ntkrun.kernels import empirical_ntk
from ntkrun.kernels.monte_carlo import chunks, jackknife_se
from ntkrun.layers.parse import depth as layer_depth
from ntkrun.plots import scaling_figure
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    LimitShare,
    Table,
    architecture,
    check_user_model,
    eigen_cost,
    exact_limit,
    limit_estimate,
    limit_share,
    limit_units,
    network_caption,
    pack,
    placement,
    seed_spread,
    train,
    unpack,
)
from ntkrun.runners.contract import Runner
from ntkrun.spec import (
    Model,
    MonteCarloSpec,
    NetworkSpec,
    PositiveFloat,
    PositiveInt,
    RunSpec,
    as_list,
)
from ntkrun.work import MonteCarloLimit, Progress, Results, TrainNet, Unit, UnitContext

LOG = logging.getLogger("ntkrun")


class ScalingNetworkSpec(NetworkSpec):
    """The network block, over several depths and a log grid of widths."""

    depth: Annotated[list[PositiveInt], Field(min_length=1), BeforeValidator(as_list)] = [2, 3, 4]  # type: ignore[assignment]
    # a log grid: the slope needs at least two widths; a cnn runs on Gaussian images (data.image), a
    # composition of ntkrun.layers replaces depth (one depth: its weight layers)
    width: Annotated[list[PositiveInt], Field(min_length=2), BeforeValidator(as_list)] = [
        2**k for k in range(6, 14)
    ]


class ScalingDataSpec(Model):
    inputs: Literal["circle", "gaussian"] = "circle"  # the fixed set where Theta is compared
    n_points: PositiveInt = 16  # circle: evenly spaced angles; gaussian: x ~ N(0, I_dim)
    dim: PositiveInt = 2  # gaussian inputs only (circle points are 2-D)
    # gaussian images (channels, rows, cols), every pixel N(0, 1): the inputs of a cnn (dim unused)
    image: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)] | None = None
    # gaussian sequences (positions, features), every number N(0, 1): for network.layers with attention
    sequence: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None


class ScalingTrainingSpec(Model):
    lr: PositiveFloat = 1.0  # GD learning rate
    steps: PositiveInt = 200  # full-batch GD steps
    n_train: PositiveInt = 128  # training inputs x ~ N(0, I), target x1 x2, drawn once per seed


class ScalingSpec(RunSpec):
    experiment: Literal["scaling"] = "scaling"
    seeds: Annotated[int, Field(ge=2)] = 8  # a bootstrap over seeds needs at least two
    network: ScalingNetworkSpec = ScalingNetworkSpec()
    training: ScalingTrainingSpec = ScalingTrainingSpec()  # the regression task of §5.1
    data: ScalingDataSpec = ScalingDataSpec()
    n_boot: PositiveInt = 2000  # bootstrap resamples for the slope intervals
    kernels: MonteCarloSpec = MonteCarloSpec()  # the limit of a network.module

    @model_validator(mode="after")
    def _inputs(self) -> ScalingSpec:
        if self.data.inputs == "circle" and self.data.dim != 2:
            raise ValueError("data.dim applies to gaussian inputs only: circle points are 2-D")
        if self.data.image is not None and self.data.inputs != "gaussian":
            raise ValueError("data.image: images are Gaussian; set data.inputs: gaussian")
        if self.data.sequence is not None and (self.data.inputs != "gaussian" or self.data.image is not None):
            raise ValueError("data.sequence: Gaussian sequences, not images; set data.inputs: gaussian")
        if self.network.arch == "cnn" and self.data.image is None:
            raise ValueError(
                "network.arch: a cnn takes images; set data.inputs: gaussian, data.image: [C, H, W]"
            )
        return self


# reference slopes (docs/experiments/scaling.md); spread_init needs no limit:
# ||Theta_s(0) - mean_s Theta_s(0)|| / ||mean|| over the seeds of one width (Theorem 1's fluctuation,
# fair to a model whose kernel grows with width)
METRICS = {"dist_init": -0.5, "spread_init": -0.5, "change_T": -0.5, "func_dist_T": -0.5}


class NetResult(TypedDict):
    """A TrainNet unit's result: its row of distances, and its Theta on Z at init (for the seed
    spread; absent in the unit files of a run begun before spread_init existed)."""

    rows: Table
    theta_0: NotRequired[torch.Tensor]


def depths(spec: ScalingSpec) -> list[int]:
    """network.depth; for a composition, its one depth (its weight layers)."""
    return spec.network.depth if spec.network.layers is None else [layer_depth(spec.network.layers)]


def fixed_inputs(spec: ScalingSpec) -> torch.Tensor:
    """Z (n_points, n0): evenly spaced circle points, or Gaussian points (images, flattened) from a
    fixed stream."""
    data = spec.data
    if data.inputs == "circle":
        return circle(grid_angles(data.n_points))
    return torch.randn(data.n_points, input_dim(spec), generator=seeded_generator(0, 3), dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float((a - b).norm() / b.norm())


def input_shape(spec: ScalingSpec) -> tuple[int, ...]:
    """One input's shape: (2,) on the circle, (dim,) Gaussian, the Gaussian image (C, H, W) or
    sequence (T, d)."""
    if spec.data.image is not None:
        return tuple(spec.data.image)
    if spec.data.sequence is not None:
        return tuple(spec.data.sequence)
    return (2,) if spec.data.inputs == "circle" else (spec.data.dim,)


def input_dim(spec: ScalingSpec) -> int:
    return math.prod(input_shape(spec))


def arch(spec: ScalingSpec, depth: int) -> Architecture:
    """The description of spec.network at one of its depths, on the spec's inputs."""
    return architecture(spec, input_shape(spec), depth)


def check(spec: ScalingSpec) -> None:
    """Before a run directory is made: every depth's geometry on the images (a 'valid' CNN may
    shrink them away); a user's model's networks tried (check_user_model)."""
    net = spec.network
    for depth in depths(spec):
        arch(spec, depth)
    check_user_model(arch(spec, depths(spec)[0]), net.width, 1, net.depth)


def step_cost(spec: ScalingSpec, depth: int, width: int) -> Cost:
    """One GD step on the training set."""
    return arch(spec, depth).gd_cost(spec.training.n_train, width)


def unit_cost(spec: ScalingSpec, depth: int, width: int) -> Cost:
    """One unit: its GD steps, Theta on Z twice, and the limit on X and Z (a network.module's
    Monte-Carlo limit is a unit of its own)."""
    n, z, description = spec.training.n_train, spec.data.n_points, arch(spec, depth)
    limit = eigen_cost(n) + (description.kernel_cost(n + z, n + z) if exact_limit(spec) else Cost())
    kernels = Cost(gemm=2 * description.ntk_flops(z, z, width))
    return step_cost(spec, depth, width) * spec.training.steps + kernels + limit


def units(spec: ScalingSpec) -> list[Unit]:
    """One unit per (depth, width, seed); for a network.module first its Monte-Carlo limit on Z and
    each seed's training set, one unit per (depth, seed), which that seed's networks read."""
    net, n, z = spec.network, spec.training.n_train, spec.data.n_points
    nets = [
        Unit(f"d{d}_w{w}_s{s}", unit_cost(spec, d, w), TrainNet(w, s, depth=d))
        for d in depths(spec)
        for w in net.width
        for s in spec.seed_values
    ]
    if exact_limit(spec):
        return nets
    samples = spec.kernels.mc_samples
    limits = [
        unit
        for d in depths(spec)
        for s in spec.seed_values
        for unit in limit_units(
            limit_name(d, s), samples, arch(spec, d).kernel_flops(n + z, n + z), depth=d, seed=s
        )
    ]
    return limits + nets


def limit_name(depth: int, seed: int) -> str:
    return f"limit_d{depth}_s{seed}"


def limit_kernels(
    spec: ScalingSpec, depth: int, seed: int, Z: torch.Tensor, X: torch.Tensor, ctx: UnitContext
) -> list[dict]:
    """Theta_inf on Z x Z, Z x X and the eigen-decomposition of Theta_inf(X, X): analytic, or from
    the Monte-Carlo limit's shares (a network.module) on Z and X together, then the same from each
    leave-one-share-out estimate (the jackknife's replicates, docs/science.md §10)."""
    description = arch(spec, depth)
    if exact_limit(spec):
        return [
            {
                "eig": dynamics.eigen(description.kernel(X)),
                "theta_zx": description.kernel(Z, X),
                "theta_zz": description.kernel(Z),
            }
        ]
    z = Z.shape[0]
    whole, replicates = limit_estimate(ctx.require, spec.kernels.mc_samples, depth=depth, seed=seed)
    return [
        {"eig": dynamics.eigen(K[z:, z:]), "theta_zx": K[:z, z:], "theta_zz": K[:z, :z]}
        for K in (e.ntk for e in [whole, *replicates])
    ]


def memory(spec: ScalingSpec, unit: Unit) -> int:
    """Peak bytes of one unit: network, GD step, Theta on Z, the analytic limit on X and Z; or the
    Monte-Carlo limit of a network.module."""
    description = arch(spec, unit.work.depth)
    b, n, z = resources.dtype_bytes(spec.dtype), spec.training.n_train, spec.data.n_points
    if isinstance(unit.work, MonteCarloLimit):
        return description.kernel_bytes(n + z, n + z)
    w = unit.work.width
    shares = len(chunks(spec.kernels.mc_samples)) if not exact_limit(spec) else 0
    return shares * 4 * (n + z) ** 2 * 8 + (
        description.network_bytes(w, 1, b)
        + description.training_bytes(max(n, z), w, 1, b)
        + description.empirical_ntk_bytes(z, z, w, 1, b)
        + description.kernel_bytes(n, n)
        + description.kernel_bytes(z, n + z)
        + resources.eigen_bytes(n)
    )


def run_unit(spec: ScalingSpec, unit: Unit, ctx: UnitContext, progress: Progress) -> NetResult | LimitShare:
    """The distances of one (depth, width, seed) network (its Theta on Z at init kept for the seed
    spread), or the Monte-Carlo limit of a network.module on Z and one seed's training set."""
    depth, seed = unit.work.depth, unit.work.seed
    device, dtype = placement(spec)
    tr = spec.training
    Z64 = fixed_inputs(spec)
    X = gaussian_inputs(tr.n_train, Z64.shape[1], seed)
    if isinstance(unit.work, MonteCarloLimit):
        return limit_share(arch(spec, depth), unit.work, torch.cat([Z64, X]))
    width, y = unit.work.width, product_target(X)
    limits = limit_kernels(spec, depth, seed, Z64, X, ctx)
    description = arch(spec, depth)
    Z, Xd = description.inputs(Z64).to(device, dtype), description.inputs(X).to(device, dtype)
    net = description.net(width, seed, dtype=dtype, device=device)
    theta_0 = empirical_ntk(net, Z).double().cpu()
    with torch.no_grad():
        f0_Z, f0_X = net(Z).double().cpu(), net(Xd).double().cpu()
    label = f"depth {depth}, width {width}, seed {seed}"
    cost = step_cost(spec, depth, width)
    train(
        net,
        Xd,
        y.to(device, dtype),
        lr=tr.lr,
        steps=tr.steps,
        label=label,
        progress=progress,
        step_cost=cost.flops,
    )
    theta_T = empirical_ntk(net, Z).double().cpu()
    with torch.no_grad():
        f_T = net(Z).double().cpu()

    def against(limit: dict) -> dict[str, float]:  # the metrics that read the limit
        t = tr.steps * tr.lr
        f_lin = dynamics.linearized(limit["eig"], limit["theta_zx"], y, f0_X, f0_Z, t, lr=tr.lr)
        return {
            "dist_init": rel(theta_0, limit["theta_zz"]),
            "func_dist_T": float((f_T - f_lin).norm() / (f_lin - f0_Z).norm()),
        }

    measured = against(limits[0])
    row = {"depth": depth, "width": width, "seed": seed, "dist_init": measured["dist_init"],
           "change_T": rel(theta_T, theta_0), "func_dist_T": measured["func_dist_T"]}  # fmt: skip
    if len(limits) > 1:  # a Monte-Carlo limit: the jackknife standard error of what reads it
        replicates = [against(limit) for limit in limits[1:]]
        for key in measured:
            row[f"{key}_se"] = jackknife_se([r[key] for r in replicates])
    LOG.info("%s", row)
    return NetResult(rows=pack([row]), theta_0=theta_0)


def spread_init(table: pd.DataFrame, results: list[NetResult]) -> list[float]:
    """Per row (network): ||Theta_s(0) - mean|| / ||mean||, the mean over the seeds of its depth and
    width: a fluctuation measured without a limit."""
    thetas = [r.get("theta_0") for r in results]
    if any(theta is None for theta in thetas):  # unit files of a run begun before it existed
        return [math.nan] * len(table)
    keys = list(zip(table["depth"], table["width"], strict=True))
    return seed_spread(keys, thetas)  # type: ignore[arg-type]


def fits(table: pd.DataFrame, spec: ScalingSpec) -> pd.DataFrame:
    """Per depth and metric: the slope in width with its interval, beside the reference slope."""
    return slope_table(table, METRICS, n_boot=spec.n_boot, seed=spec.base_seed, by="depth")


def aggregate(spec: ScalingSpec, run: RunDir, results: Results) -> pd.DataFrame:
    """scaling.csv, fits.csv and the figure; -> fits."""
    trained: list[NetResult] = [r for _, r in results.of(TrainNet)]  # type: ignore[misc]
    table = unpack(*(r["rows"] for r in trained))
    table.insert(table.columns.get_loc("dist_init") + 1, "spread_init", spread_init(table, trained))
    fit_table = fits(table, spec)
    run.write_csv("scaling.csv", table)
    run.write_csv("fits.csv", fit_table)
    shape = "x".join(str(s) for s in spec.data.image or spec.data.sequence or ())
    on = f"{shape} {'images' if spec.data.image else 'sequences'}" if shape else ""
    which = network_caption(spec.network, depth=False, on=on)
    title = f"{which}, {spec.seeds} seeds, T = {spec.training.steps} GD steps (lr {spec.training.lr:g})"
    scaling_figure(table, fit_table, run.path / "figure", title=title)
    return fit_table


RUNNER = Runner(
    ScalingSpec,
    # bumped by a change that alters its results (docs/architecture.md, "Run identity"); 2: a
    # network.layers composition of the CNN's shape takes the CNN's kernel recursion (equal to 1e-13)
    results_version=2,
    inputs="Gaussian vectors, images (data.image) or sequences (data.sequence)",
    units=units,
    run_unit=run_unit,
    aggregate=aggregate,
    memory=memory,
    archs=("mlp", "cnn"),
    modules=True,  # a network.module, its limit by Monte Carlo (docs/science.md §10)
    layers=True,  # a network.layers composition (ntkrun.layers), its exact limit
    check=check,
)
