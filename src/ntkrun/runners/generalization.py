"""`ntkrun generalization` (docs/science.md §5.5): test accuracy of the infinite-width predictors
against trained finite networks on a whole image dataset, as a learning curve in N_train.

Units: one per (kernel, N_train) (ntk and nngp together where one recursion gives both, as for
the CNN), computing the limiting kernel's Gram on the first N_train
training points (float64 row blocks stored in `kernels.dtype`; a large Gram checkpoints its row
blocks), solving (K + ridge I) alpha = Y in place by a blocked Cholesky and predicting the test
split; `reference`, the NTK predictor on the networks' training set at t = inf and at the nets'
training time; one per (width, seed) network, trained by full-batch GD on 10 centered one-hot
outputs, with its test accuracy and its distance to the reference.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from ntkrun import dynamics, resources
from ntkrun.costs import Cost
from ntkrun.data import check_request, files_of, resolve_data_dir, split_info
from ntkrun.errors import DataError, SpecError
from ntkrun.fits import slope_table
from ntkrun.iterative import nystrom_bytes
from ntkrun.linalg import solve_bytes
from ntkrun.plots import generalization_figure
from ntkrun.rundir import RunDir
from ntkrun.runners import generalization_mc as mc
from ntkrun.runners.common import (
    LimitShare,
    check_user_model,
    cholesky_cost,
    eigen_cost,
    exact_limit,
    network_caption,
    pack,
    placement,
    read_cost,
    train,
    unpack,
)
from ntkrun.runners.contract import Runner
from ntkrun.runners.generalization_fits import (
    arch,
    block_bytes,
    block_unit,
    block_units,
    cost_model,
    gram_dtype,
    kernel_groups,
    kernel_of,
    kernel_unit,
    kernel_unit_name,
    monte_carlo,
    solver_of,
)
from ntkrun.runners.generalization_spec import GenSpec
from ntkrun.runners.labelled import (
    CLASSES,
    BlockResult,
    FitResult,
    NetResult,
    ReferenceResult,
    dataset,
    n_train_sizes,
    scores,
    targets,
)
from ntkrun.work import (
    GramBlock,
    KernelFit,
    MonteCarloLimit,
    Progress,
    Reference,
    Results,
    TrainNet,
    Unit,
    UnitContext,
)

LOG = logging.getLogger("ntkrun")


def shared(spec: GenSpec) -> dict[type, tuple[str, ...]]:
    """In a sweep, a kernel unit is computed once for points that differ only in keys it does not
    read (ntkrun.sweep): the networks' widths, seeds and training (training.n_train only sizes the
    seeded order whose prefixes are the kernels' training sets), and the bootstrap; not the widths
    where a network.module's Monte-Carlo limit takes its width from them."""
    ignored = ("seeds", "base_seed", "training", "n_boot")
    if exact_limit(spec) or spec.kernels.limit_width is not None:
        ignored += ("network.width",)
    return {KernelFit: ignored, GramBlock: ignored, MonteCarloLimit: ignored}


def check(spec: GenSpec) -> None:
    """Before a run directory is made: both splits there and large enough (IDX headers only)."""
    folder = resolve_data_dir(spec.data.dir)
    train_info, test_info = split_info(folder, "train"), split_info(folder, "test")
    check_request(train_info, "train", max(n_train_sizes(spec)), "data.n_train")
    check_request(test_info, "test", spec.data.n_test or 1, "data.n_test")
    if test_info.shape != train_info.shape:
        raise DataError(
            f"{test_info.images}: {test_info.size} test images, but the train split's are {train_info.size}"
        )
    description = arch(spec)  # the network's geometry on these images (a 'valid' CNN may shrink them away)
    check_user_model(description, spec.network.width, CLASSES)
    if spec.kernels.rows_per_unit is not None and not exact_limit(spec):
        raise SpecError(
            "kernels.rows_per_unit: a network.module's Monte-Carlo kernels are spread as shares of "
            "kernels.mc_samples, not as row blocks; leave it unset"
        )


def data_files(spec: GenSpec) -> list[Path]:
    """The files the run reads (their content is part of its identity)."""
    return files_of(spec.data.dir, ["train", "test"])


# ---------------------------------------------------------------- kernel units


def reference_unit(spec: GenSpec, unit: Unit, progress: Progress) -> ReferenceResult:
    """The NTK predictor on the networks' training set, on the test points, at t = inf and at the
    nets' training time t = steps * lr (the GD dynamics of docs/science.md §4, mean only)."""
    tr = spec.training
    X, labels, Xt, labels_t = dataset(spec, tr.n_train)
    description = arch(spec)
    K = description.kernel(X)
    eig = dynamics.eigen(K)
    k_test = description.kernel(Xt, X)
    Y = targets(spec, labels)
    out = {}
    for label, t in (("inf", math.inf), ("t", tr.steps * tr.lr)):
        lr = None if math.isinf(t) else tr.lr
        out[label] = (dynamics.predictor(eig, k_test, t, lr) @ Y).float()
    progress.advance("reference", unit.flops)
    # the NTK predictor at the nets' training time, scored like them ("ntk_t" in accuracy.csv)
    row = {"predictor": "ntk_t", "n_train": tr.n_train, "width": math.nan, "seed": -1}
    row.update(scores(spec, out["t"].double(), labels_t), ridge=0.0, gram_dtype="float64")
    return ReferenceResult(inf=out["inf"], t=out["t"], rows=pack([row]))


# ---------------------------------------------------------------- network units


def net_unit(spec: GenSpec, unit: Unit, ctx: UnitContext, progress: Progress) -> NetResult:
    width, seed, tr = unit.work.width, unit.work.seed, spec.training
    device, dtype = placement(spec)
    X, labels, Xt, labels_t = dataset(spec, tr.n_train)
    description = arch(spec)
    net = description.net(width, seed, dtype=dtype, device=device, n_out=CLASSES)
    Xd, Xtd = description.inputs(X).to(device, dtype), description.inputs(Xt).to(device, dtype)
    Y = targets(spec, labels)
    with torch.no_grad():
        f0_train, f0_test = net(Xd), net(Xtd)
    # centered: train f - f_0 towards Y, i.e. f towards Y + f_0(X) (the same gradient)
    goal = Y.to(device, dtype) + (f0_train if tr.center else 0.0)
    label = f"width {width}, seed {seed}"
    cost = description.gd_flops(tr.n_train, width, CLASSES)
    train(net, Xd, goal, lr=tr.lr, steps=tr.steps, label=label, progress=progress, step_cost=cost)
    with torch.no_grad():
        pred = (net(Xtd) - (f0_test if tr.center else 0.0)).double().cpu()
    reference = ctx.require(Reference())
    row = {
        "predictor": "net",
        "n_train": tr.n_train,
        "width": width,
        "seed": seed,
        **scores(spec, pred, labels_t),
    }
    row["ridge"], row["gram_dtype"] = math.nan, ""
    dist = {"width": width, "seed": seed}
    for key in ("inf", "t"):
        f_ntk = reference[key].double()
        dist[f"dist_{key}"] = float((pred - f_ntk).norm() / f_ntk.norm())
    LOG.info("%s %s", row, dist)
    return NetResult(rows=pack([row]), distance=pack([dist]))


# ---------------------------------------------------------------- the experiment's face


def units(spec: GenSpec) -> list[Unit]:
    """Kernel units (kind, N_train), then `reference` and the (width, seed) networks."""
    description, m = cost_model(spec), test_points(spec)
    read = read_cost(spec.data.dir, ("train", "test"))
    out = []
    for predictors in kernel_groups(spec):
        model = cost_model(spec, predictors[0])
        grams = 1 if model.JOINT_KERNELS else len(predictors)  # (UnknownCost: NaN all the same)
        for n in spec.data.n_train:
            blocks = [] if monte_carlo(spec, predictors) else block_units(spec, predictors, n, m)
            split = {b.work.test for b in blocks}  # the kernels block units compute, not this fit
            kernels = [model.kernel_cost(n, n) * 0.5] * (False not in split) + [model.kernel_cost(m, n)] * (
                True not in split
            )
            cost = read + sum(kernels, Cost()) * grams + cholesky_cost(n) * len(predictors)
            if monte_carlo(spec, predictors):  # the module's kernels in shares, then their fit
                out.extend(mc.share_units(spec, model, n, m))
                cost = read + mc.fit_cost(spec, predictors, n, m)
            out.extend(blocks)
            out.append(
                Unit(kernel_unit_name(predictors, n), cost, KernelFit(predictors, n), needs=tuple(blocks))
            )
    if "net" in spec.predictors:
        n, tr = spec.training.n_train, spec.training
        ref_cost = read + description.kernel_cost(n + m, n) + eigen_cost(n)
        out.append(Unit("reference", ref_cost, Reference()))
        for w in spec.network.width:
            for s in spec.seed_values:
                cost = read + description.gd_cost(n, w, CLASSES) * tr.steps
                out.append(Unit(f"w{w}_s{s}", cost, TrainNet(w, s)))
    return out


def test_points(spec: GenSpec) -> int:
    """n_test, or 10000 (the IDX test splits' size) where the data are not there to say: the units
    are then priced, not run (check refuses the run)."""
    try:
        return n_test(spec)
    except DataError:
        return spec.data.n_test or 10000


def n_test(spec: GenSpec) -> int:
    """Test points: data.n_test, else the whole test split (its IDX header)."""
    if spec.data.n_test is not None:
        return spec.data.n_test
    return split_info(resolve_data_dir(spec.data.dir), "test").count


def memory(spec: GenSpec, unit: Unit) -> int:
    """Peak bytes: the splits' images and the float64 points, then the Gram with the in-place
    solve and one 1000-row test block (kernel units), the reference's kernels and eigen
    decomposition, or a network's GD step and test forward pass."""
    folder = resolve_data_dir(spec.data.dir)
    description, m = arch(spec), n_test(spec)
    n0, images = description.n0, split_info(folder, "train").count + split_info(folder, "test").count
    data = images * n0 + (max(n_train_sizes(spec)) + 2 * m) * n0 * 8
    if isinstance(unit.work, MonteCarloLimit):
        return data + mc.share_bytes(description, unit.work.n_train, m)
    if isinstance(unit.work, KernelFit) and monte_carlo(spec, unit.work.predictors):
        return data + mc.fit_bytes(spec, unit.work.n_train, m)
    if isinstance(unit.work, GramBlock):
        return data + block_bytes(spec, unit.work, m)
    if isinstance(unit.work, KernelFit):
        n, k = unit.work.n_train, len(unit.work.predictors)
        model, b = kernel_of(spec, unit.work.predictors[0])[0], gram_dtype(spec, n).itemsize
        test = model.kernel_bytes(min(m, 1000), n) + (k - 1) * min(m, 1000) * n * 8  # a block per kind
        rows = spec.kernels.rows_per_unit or spec.kernels.checkpoint_rows
        if solver_of(spec, n) == "cholesky":
            return (
                data
                + k * n * n * b
                + solve_bytes(n, CLASSES, b)
                + test
                + (k * rows * n * b if n > rows else 0)
            )
        # CG: the Nystrom step (Omega, Y, its QR's and SVD's copies: 6 N l float64) and the iterates; the
        # Gram assembled, or out of core (kernels.rows_per_unit) its strips memory-mapped (in the page
        # cache, never all in this process) but one computed here where its block unit's part is bad
        per_unit = spec.kernels.rows_per_unit
        if per_unit is not None and n > per_unit:
            gram = block_bytes(spec, GramBlock(unit.work.predictors, n, False, 0, per_unit), m)
        else:
            gram = k * n * n * b
        return data + gram + 6 * n * min(spec.kernels.precond_rank, n) * 8 + nystrom_bytes(n) + test
    n = spec.training.n_train
    if isinstance(unit.work, Reference):
        kernels = description.kernel_bytes(n, n) + description.kernel_bytes(m, n)
        return data + kernels + resources.eigen_bytes(n)
    w, b = unit.work.width, resources.dtype_bytes(spec.dtype)
    net = description.network_bytes(w, CLASSES, b)
    return data + net + description.training_bytes(max(n, m), w, CLASSES, b)


def run_unit(
    spec: GenSpec, unit: Unit, ctx: UnitContext, progress: Progress
) -> FitResult | ReferenceResult | NetResult | LimitShare | BlockResult:
    if isinstance(unit.work, GramBlock):
        return block_unit(spec, unit, ctx)
    if isinstance(unit.work, MonteCarloLimit):
        return mc.share(spec, arch(spec), unit.work)
    if isinstance(unit.work, KernelFit) and monte_carlo(spec, unit.work.predictors):
        return mc.fit(spec, unit, ctx, progress)
    if isinstance(unit.work, KernelFit):
        return kernel_unit(spec, unit, ctx, progress)
    if isinstance(unit.work, Reference):
        return reference_unit(spec, unit, progress)
    return net_unit(spec, unit, ctx, progress)


def fits(distance: pd.DataFrame, spec: GenSpec) -> pd.DataFrame:
    """Slope of each distance in width (log-log, bootstrap over seeds), as `scaling` fits."""
    references = {"dist_t": -0.5, "dist_inf": math.nan}
    return slope_table(distance, references, n_boot=spec.n_boot, seed=spec.base_seed)


def aggregate(spec: GenSpec, run: RunDir, results: Results) -> pd.DataFrame:
    """accuracy.csv, distance.csv, fits.csv and the figure; -> accuracy."""
    scored = [r for work, r in results if isinstance(work, (KernelFit, Reference, TrainNet))]  # in order
    accuracy = unpack(*(r["rows"] for r in scored))
    accuracy = accuracy.sort_values(["predictor", "n_train", "width", "seed"], kind="stable").reset_index(
        drop=True
    )
    run.write_csv("accuracy.csv", accuracy)
    nets = [r["distance"] for _, r in results.of(TrainNet)]
    distance = unpack(*nets) if nets else pd.DataFrame(columns=["width", "seed", "dist_inf", "dist_t"])
    fit_table = fits(distance, spec)
    run.write_csv("distance.csv", distance)
    run.write_csv("fits.csv", fit_table)
    trained = (
        f"nets: {spec.seeds} seeds, {spec.training.steps} GD steps (lr {spec.training.lr:g}) on "
        f"{spec.training.n_train} points"
    )
    title = f"{network_caption(spec.network)}; {trained if 'net' in spec.predictors else 'kernel predictors'}"
    generalization_figure(
        accuracy, distance, fit_table, run.path / "figure", n_net=spec.training.n_train, title=title
    )
    return accuracy


RUNNER = Runner(
    GenSpec,
    # bumped by a change that alters its results (docs/architecture.md, "Run identity"); 2: a
    # network.layers composition of the CNN's shape takes the CNN's kernel recursion (equal to 1e-13)
    results_version=2,
    inputs="the IDX images as vectors (mlp) or images (cnn)",
    units=units,
    run_unit=run_unit,
    aggregate=aggregate,
    memory=memory,
    archs=("mlp", "cnn"),
    modules=True,  # a network.module, its kernels by Monte Carlo (docs/science.md §10)
    layers=True,  # a network.layers composition (ntkrun.layers), its exact kernels
    check=check,
    data_files=data_files,
    shared=shared,
)
