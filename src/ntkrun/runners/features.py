"""`ntkrun features` (docs/science.md §11): where the kernel regime ends.

Per (parametrization, output scale alpha, depth, width, seed): a network trained by full-batch GD
on a +-1 labelled task, as the centered, scaled model f_alpha = alpha (f - f_0) on C / alpha^2 (GD
towards f_0 + y / alpha); on its training points its kernel Theta (learning-rate weighted: the
kernel of its GD, §11.1) before and after: the relative change, the kernel-label alignment; on
the test points its accuracy beside the NTK predictor's at the same time (the infinite-width NTK
regression from g_0 = 0). Three arms share the units: (a) each parametrization over the widths
(alpha 1), (b) NTK over the output scales at one width, (c) NTK over (depth, width) pairs of equal
depth-over-width ratios, where the seeds' spread of Theta(0) is the Hanin-Nica fluctuation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal, TypedDict

import numpy as np
import pandas as pd
import torch
from pydantic import BeforeValidator, Field, model_validator

from ntkrun import dynamics, resources
from ntkrun.architectures.base import Architecture
from ntkrun.costs import Cost
from ntkrun.data import (
    check_request,
    files_of,
    flat_pixels,
    gaussian_inputs,
    load_split,
    resolve_data_dir,
    split_info,
)
from ntkrun.errors import DataError, SpecError
from ntkrun.features_plots import features_figure
from ntkrun.fits import slope_table
from ntkrun.kernels import empirical_ntk
from ntkrun.layers.parse import depth as layer_depth
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    Table,
    architecture,
    distinct_names,
    eigen_cost,
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
    NetworkSpec,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RunSpec,
    as_list,
)
from ntkrun.work import FeatureNet, Progress, Reference, Results, Unit, UnitContext

LOG = logging.getLogger("ntkrun")
# the papers' slopes (docs/science.md §11): kernel change in width (NTK -1: Dyer & Gur-Ari 2020, within
# Theorem 2's bound n^-1/2; muP and mean-field 0: Yang & Hu 2021), in alpha (-1: Chizat et al. 2019),
# and in depth/width the fluctuation (+1/2) and the change (+1) of Hanin & Nica 2019
WIDTH_SLOPES = {"ntk": -1.0, "mup": 0.0, "meanfield": 0.0}
ALPHA_SLOPES = {"change_T": -1.0, "lin_dist_T": -1.0}
RATIO_SLOPES = {"spread_0": 0.5, "change_T": 1.0}

PositiveFloats = Annotated[list[PositiveFloat], Field(min_length=1), BeforeValidator(as_list)]


class FeaturesNetworkSpec(NetworkSpec):
    """The network block, with the parametrizations of arm (a); a cnn runs on images (data.image or
    data.inputs images)."""

    depth: PositiveInt = 3  # arms (a) and (b) (mean-field: 2)
    width: Annotated[list[PositiveInt], Field(min_length=2), BeforeValidator(as_list)] = [
        64,
        128,
        256,
        512,
        1024,
    ]
    # arm (a): each over the widths (docs/science.md §11.1)
    parametrizations: Annotated[list[Literal["ntk", "mup", "meanfield"]], Field(min_length=1)] = [
        "ntk",
        "mup",
    ]

    @model_validator(mode="after")
    def _arch(self) -> FeaturesNetworkSpec:
        if self.module is not None:  # (refused here, before its units' costs would build it)
            raise ValueError(
                "module: features does not run a user's model (its arms need the network in NTK, muP and "
                "mean-field parametrizations); use network.layers, or network.arch"
            )
        if self.arch == "cnn" and "meanfield" in self.parametrizations:
            raise ValueError("parametrizations: meanfield is the one-hidden-layer MLP's, not a cnn's")
        if self.layers is not None and "meanfield" in self.parametrizations:
            raise ValueError(
                "parametrizations: meanfield is the one-hidden-layer MLP's; a composition of ntkrun.layers "
                "runs in ntk and mup"
            )
        return self


class FeaturesTrainingSpec(Model):
    lr: PositiveFloat = 1.0  # muP: lr * n for its width-connected parameters (§11.1)
    steps: PositiveInt = 200  # full-batch GD steps
    output_scale: PositiveFloat = 1.0  # alpha of arms (a) and (c) (§11.2)
    output_scales: PositiveFloats = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]  # arm (b)
    output_scale_width: PositiveInt = 256  # arm (b)'s width


class FeaturesDataSpec(Model):
    inputs: Literal["gaussian", "images"] = "gaussian"  # images: two classes of an IDX dataset
    dim: PositiveInt = 4  # gaussian: x ~ N(0, I_dim), label sign(x1 x2)
    # gaussian images (channels, rows, cols) for a cnn, every pixel N(0, 1) (dim unused), label the
    # sign of the product of the first two pixels
    image: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)] | None = None
    n_train: PositiveInt = 64  # training points of the task
    n_test: PositiveInt = 512  # test points (alignment, distance to the NTK predictor)
    dir: str | None = None  # images: IDX folder with a train and a test split (Fashion-MNIST)
    classes: Annotated[list[NonNegativeInt], Field(min_length=2, max_length=2)] = [0, 6]  # label +1, -1
    seed: NonNegativeInt = 0  # the task's draw (the same for every network)


class FeaturesSpec(RunSpec):
    experiment: Literal["features"] = "features"
    seeds: Annotated[int, Field(ge=2)] = 8  # a spread and a bootstrap need two
    network: FeaturesNetworkSpec = FeaturesNetworkSpec()
    training: FeaturesTrainingSpec = FeaturesTrainingSpec()
    data: FeaturesDataSpec = FeaturesDataSpec()
    # arm (c): (depth, width) pairs; the ratio (depth - 1) / width is what the fluctuation follows
    depth_width: list[Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]] = [
        [2, 16], [3, 32], [5, 64], [2, 32], [3, 64], [5, 128], [2, 64], [3, 128], [5, 256],
    ]  # fmt: skip
    n_boot: PositiveInt = 2000  # bootstrap resamples of the fitted slopes' intervals

    @model_validator(mode="after")
    def _pairs(self) -> FeaturesSpec:
        scales = [*self.training.output_scales, self.training.output_scale]
        distinct_names("training.output_scales", scales, "unit names (a{alpha})")
        if any(depth < 2 for depth, _ in self.depth_width):
            raise ValueError("depth_width: a depth must be at least 2 (one hidden layer)")
        if self.network.layers is not None and self.depth_width:
            raise ValueError(
                "depth_width: a composition has one depth (its list), and arm (c) varies the depth; "
                "set depth_width=[] (the arms over widths and output scales run)"
            )
        if self.data.image is not None and self.data.inputs != "gaussian":
            raise ValueError("data.image: the images of data.inputs images come from the files")
        if self.network.arch == "cnn" and self.data.inputs == "gaussian" and self.data.image is None:
            raise ValueError(
                "network.arch: a cnn takes images; set data.image: [C, H, W] or data.inputs: images"
            )
        return self


def arm_units(spec: FeaturesSpec) -> dict[str, list[FeatureNet]]:
    """The networks of each arm: (a) widths x parametrizations, (b) output scales, (c) (L, n)."""
    net, tr, seeds = spec.network, spec.training, spec.seed_values
    depth = net.depth if net.layers is None else layer_depth(net.layers)  # a composition's weight layers
    return {
        "width": [
            FeatureNet(p, tr.output_scale, 2 if p == "meanfield" else depth, w, s)
            for p in net.parametrizations
            for w in net.width
            for s in seeds
        ],
        "alpha": [
            FeatureNet("ntk", a, depth, tr.output_scale_width, s) for a in tr.output_scales for s in seeds
        ],
        "ratio": [FeatureNet("ntk", tr.output_scale, d, w, s) for d, w in spec.depth_width for s in seeds],
    }


def unit_name(work: FeatureNet) -> str:
    return f"{work.parametrization}_d{work.depth}_w{work.width}_a{work.alpha:g}_s{work.seed}"


def input_shape(spec: FeaturesSpec) -> tuple[int, ...]:
    """One input's shape: (dim,), the Gaussian image, or (1, rows, cols) of the IDX files."""
    if spec.data.inputs == "images":
        info = split_info(resolve_data_dir(spec.data.dir), "train")
        return info.shape
    return tuple(spec.data.image) if spec.data.image is not None else (spec.data.dim,)


def limit(spec: FeaturesSpec, depth: int) -> Architecture:
    """The network of a depth in NTK parametrization: its limit is the NTK predictor's kernel (muP's
    at initialization is the same, §11.1). SpecError for a geometry that cannot work."""
    return architecture(spec, input_shape(spec), depth)


def description(spec: FeaturesSpec, work: FeatureNet) -> Architecture:
    return replace(limit(spec, work.depth), parametrization=work.parametrization)


def unit_cost(spec: FeaturesSpec, work: FeatureNet | Reference) -> Cost:
    """A network's GD steps, its Theta on the training points twice and on test x train, its own
    linearization; or a depth's limit on train and test with its predictor."""
    n, m = spec.data.n_train, spec.data.n_test
    try:
        if isinstance(work, Reference):
            return limit(spec, work.depth).kernel_cost(n + m, n) + eigen_cost(n)
        model = description(spec, work)
    except (DataError, ValueError):  # no data here, or refused at the preflight (check)
        return Cost(gemm=math.nan)
    ntks = model.ntk_flops(n + m, n, work.width) + model.ntk_flops(n, n, work.width)
    return model.gd_cost(n, work.width) * spec.training.steps + Cost(gemm=ntks) + eigen_cost(n)


def units(spec: FeaturesSpec) -> list[Unit]:
    """One `limit_d{depth}` per depth (the NTK predictor, stage 0), then one unit per distinct
    network of the three arms."""
    works = dict.fromkeys(work for arm in arm_units(spec).values() for work in arm)
    limits = [Reference(d) for d in sorted({w.depth for w in works})]
    return [Unit(f"limit_d{r.depth}", unit_cost(spec, r), r) for r in limits] + [
        Unit(unit_name(w), unit_cost(spec, w), w) for w in works
    ]


def memory(spec: FeaturesSpec, unit: Unit) -> int:
    work, n, m = unit.work, spec.data.n_train, spec.data.n_test
    if isinstance(work, Reference):
        return limit(spec, work.depth).kernel_bytes(n + m, n) + resources.eigen_bytes(n)
    model, b = description(spec, work), resources.dtype_bytes(spec.dtype)
    return (
        model.network_bytes(work.width, 1, b)
        + model.training_bytes(max(n, m), work.width, 1, b)
        + model.empirical_ntk_bytes(n + m, n, work.width, 1, b)
        + resources.eigen_bytes(n)
    )


def check(spec: FeaturesSpec) -> None:
    """Images: both splits there (IDX headers only); every depth's geometry on the inputs (a 'valid'
    CNN may shrink them away)."""
    if spec.data.inputs == "images":
        folder = resolve_data_dir(spec.data.dir)
        check_request(split_info(folder, "train"), "train", spec.data.n_train, "data.n_train")
        check_request(split_info(folder, "test"), "test", spec.data.n_test, "data.n_test")
    works = {w for arm in arm_units(spec).values() for w in arm}
    for depth in sorted({w.depth for w in works}):
        limit(spec, depth)
    for work in sorted({replace(w, alpha=1.0, width=2, seed=0) for w in works}, key=str):
        try:  # each parametrization's networks (muP: Dense and Conv weights only)
            description(spec, work)
        except ValueError as err:
            raise SpecError(f"network.parametrizations: {work.parametrization}: {err}") from None


def data_files(spec: FeaturesSpec) -> list[Path]:
    return files_of(spec.data.dir, ["train", "test"]) if spec.data.inputs == "images" else []


def task(spec: FeaturesSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X (n, n0), y (n,), X_test (m, n0), y_test (m,)) float64, labels +-1: sign(x1 x2) of Gaussian
    points, or the two classes' images (ntkrun.data.flat_pixels)."""
    d = spec.data
    if d.inputs == "gaussian":
        X = gaussian_inputs(d.n_train + d.n_test, math.prod(input_shape(spec)), d.seed)
        y = torch.sign(X[:, 0] * X[:, 1])
        return X[: d.n_train], y[: d.n_train], X[d.n_train :], y[d.n_train :]
    folder, out = resolve_data_dir(d.dir), []
    for split, count in (("train", d.n_train), ("test", d.n_test)):
        images, labels = load_split(folder, split)
        idx = np.flatnonzero(np.isin(labels, d.classes))
        if count > len(idx):
            raise DataError(
                f"data.n_{split}: {count} points, but the {split} split has {len(idx)} of {d.classes}"
            )
        idx = np.sort(np.random.default_rng(d.seed).choice(idx, size=count, replace=False))
        X = flat_pixels(images[idx])
        out += [X, torch.from_numpy(np.where(labels[idx] == d.classes[0], 1.0, -1.0))]
    return out[0], out[1], out[2], out[3]


def alignment(theta: torch.Tensor, y: torch.Tensor) -> float:
    """y^T Theta y / (||Theta||_F ||y||^2) (docs/science.md §11.4)."""
    return float(y @ theta @ y / (theta.norm() * (y @ y)))


class PredictorResult(TypedDict):
    """A Reference unit's result: the NTK predictor's outputs on the test points (M,)."""

    f_test: torch.Tensor


class NetResult(TypedDict):
    """A FeatureNet unit's result: its row of measures, and its Theta at init (for the seed spread)."""

    rows: Table
    theta_0: torch.Tensor


def predictor(spec: FeaturesSpec, depth: int) -> PredictorResult:
    """The NTK predictor on the test points at the nets' time, from g_0 = 0 (docs/science.md §4)."""
    X, y, Xt, _ = task(spec)
    tr, model = spec.training, limit(spec, depth)
    eig = dynamics.eigen(model.kernel(X))
    f = dynamics.predictor(eig, model.kernel(Xt, X), tr.steps * tr.lr, lr=tr.lr) @ y
    return PredictorResult(f_test=f)


def run_unit(
    spec: FeaturesSpec, unit: Unit, ctx: UnitContext, progress: Progress
) -> PredictorResult | NetResult:
    if isinstance(unit.work, Reference):
        return predictor(spec, unit.work.depth)
    work, tr = unit.work, spec.training
    device, dtype = placement(spec)
    X64, y, Xt64, yt = task(spec)
    model = description(spec, work)
    X, Xt = model.inputs(X64).to(device, dtype), model.inputs(Xt64).to(device, dtype)
    net = model.net(work.width, work.seed, dtype=dtype, device=device)
    theta_0 = empirical_ntk(net, X).double().cpu()
    theta_test = empirical_ntk(net, Xt, X).double().cpu()  # for the network's own linearization
    with torch.no_grad():
        f0, f0_test = net(X), net(Xt)
    goal = f0 + y.to(device, dtype) / work.alpha  # GD on C(f_alpha) / alpha^2 (§11.2)
    label = f"{work.parametrization}, alpha {work.alpha:g}, depth {work.depth}, width {work.width}"
    label += f", seed {work.seed}"
    cost = model.gd_flops(spec.data.n_train, work.width)
    train(net, X, goal, lr=tr.lr, steps=tr.steps, label=label, progress=progress, step_cost=cost)
    theta_T = empirical_ntk(net, X).double().cpu()
    with torch.no_grad():
        f_test = (work.alpha * (net(Xt) - f0_test)).double().cpu()
    f_ntk = ctx.require(Reference(depth=work.depth))["f_test"]
    # the alpha -> infinity limit of this network: its linearization, kernel regression with its Theta_0
    f_lin = dynamics.predictor(dynamics.eigen(theta_0), theta_test, tr.steps * tr.lr, lr=tr.lr) @ y
    row = {
        "parametrization": work.parametrization,
        "alpha": work.alpha,
        "depth": work.depth,
        "width": work.width,
        "ratio": (work.depth - 1) / work.width,
        "seed": work.seed,
        "change_T": float((theta_T - theta_0).norm() / theta_0.norm()),
        "align_0": alignment(theta_0, y),
        "align_T": alignment(theta_T, y),
        "acc_net": float((torch.sign(f_test) == yt).double().mean()),
        "acc_ntk": float((torch.sign(f_ntk) == yt).double().mean()),
        "lin_dist_T": float((f_test - f_lin).norm() / f_lin.norm()),
    }
    LOG.info("%s", row)
    return NetResult(rows=pack([row]), theta_0=theta_0)


def arm_table(table: pd.DataFrame, spec: FeaturesSpec, arm: str) -> pd.DataFrame:
    names = {unit_name(w) for w in arm_units(spec)[arm]}
    return table[[unit_name(FeatureNet(*r)) in names for r in zip(
        table["parametrization"], table["alpha"], table["depth"], table["width"], table["seed"], strict=True
    )]]  # fmt: skip


def fits(table: pd.DataFrame, spec: FeaturesSpec) -> pd.DataFrame:
    """The arms' log-log slopes with bootstrap intervals over seeds, beside the papers' slopes."""
    n_boot, seed = spec.n_boot, spec.base_seed
    parts = []
    width = arm_table(table, spec, "width")
    for p, g in width.groupby("parametrization", sort=False):
        part = slope_table(g, {"change_T": WIDTH_SLOPES[p]}, n_boot=n_boot, seed=seed)
        parts.append(part.assign(arm="width", group=p, x="width"))
    alpha = arm_table(table, spec, "alpha")
    parts.append(slope_table(alpha, ALPHA_SLOPES, n_boot=n_boot, seed=seed, x="alpha").assign(
        arm="alpha", group="ntk", x="alpha"))  # fmt: skip
    ratio = arm_table(table, spec, "ratio")
    for depth, g in ratio.groupby("depth"):
        part = slope_table(g, RATIO_SLOPES, n_boot=n_boot, seed=seed, x="ratio")
        parts.append(part.assign(arm="ratio", group=f"depth {depth}", x="ratio"))
    out = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return out[["arm", "group", "x", *[c for c in out.columns if c not in ("arm", "group", "x")]]]


def aggregate(spec: FeaturesSpec, run: RunDir, results: Results) -> pd.DataFrame:
    """features.csv, fits.csv and the figure; -> fits."""
    nets = [r for _, r in results.of(FeatureNet)]
    table = unpack(*(r["rows"] for r in nets))
    keys = list(zip(table["parametrization"], table["alpha"], table["depth"], table["width"], strict=True))
    table.insert(
        table.columns.get_loc("change_T"),
        "spread_0",
        seed_spread(keys, [r["theta_0"] for r in nets]),
    )
    fit_table = fits(table, spec)
    run.write_csv("features.csv", table)
    run.write_csv("fits.csv", fit_table)
    net, tr = spec.network, spec.training
    shape = "x".join(str(s) for s in input_shape(spec))
    task_name = f"sign(x1 x2), {shape} Gaussian" if spec.data.inputs == "gaussian" else (
        f"classes {spec.data.classes[0]} vs {spec.data.classes[1]}")  # fmt: skip
    what = network_caption(net, depth=False)  # (arm (c) varies the depth)
    title = (
        f"{what}; {task_name}, {spec.data.n_train} points; "
        f"{tr.steps} GD steps (lr {tr.lr:g}); {spec.seeds} seeds"
    )
    arms = {arm: arm_table(table, spec, arm) for arm in ("width", "alpha", "ratio")}
    features_figure(arms, fit_table, run.path / "figure", title=title)
    return fit_table


RUNNER = Runner(
    FeaturesSpec,
    # bumped by a change that alters its results (docs/architecture.md, "Run identity"); 2: the NTK
    # predictor from g_0 = 0 through dynamics.predictor (1b669c1); 3: a network.layers composition of
    # the CNN's shape takes the CNN's kernel recursion (equal to 1e-13)
    results_version=3,
    inputs="Gaussian vectors or images, or two classes of the IDX images",
    units=units,
    run_unit=run_unit,
    aggregate=aggregate,
    memory=memory,
    archs=("mlp", "cnn"),
    layers=True,  # a network.layers composition (ntkrun.layers): NTK parametrization, arms (a) and (b)
    check=check,
    data_files=data_files,
)
