"""`ntkrun pca` (docs/science.md §5.3, Figure 3): convergence along kernel principal components on MNIST.

The reference kernel K on N digits (one wide network at init, or the analytic limit) gives the
top eigenpairs of K/N (power iteration with deflation, checked against a dense solver). Each
(width, trial) network is trained by GD towards f* = f_theta(0) + c f(k), and Delta_t = f_t - f*
is split into g_t = <Delta_t, f(k)>_pin f(k) and h_t = Delta_t - g_t. In the limit h_t = 0 and
||g_t|| = c exp(-lambda_k t). Units checkpoint every `checkpoint_every` steps; `ntkrun resume`
continues them from there.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Literal, TypedDict

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from ntkrun import dynamics, resources
from ntkrun.architectures.base import Architecture
from ntkrun.costs import Cost
from ntkrun.data import check_request, choose_points, files_of, load_split, resolve_data_dir, split_info
from ntkrun.kernels import empirical_ntk
from ntkrun.kernels.monte_carlo import chunks, jackknife_se
from ntkrun.plots import pca_figure
from ntkrun.rundir import RunDir
from ntkrun.runners.common import (
    LimitShare,
    Table,
    UnknownCost,
    architecture,
    check_user_model,
    eigen_cost,
    exact_limit,
    limit_estimate,
    limit_share,
    limit_units,
    pack,
    priced,
    read_cost,
    resolve_device,
    resolve_dtype,
    train,
    unpack,
)
from ntkrun.runners.contract import Runner
from ntkrun.spec import (
    Model,
    MonteCarloSpec,
    NetworkSpec,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RunSpec,
)
from ntkrun.work import MonteCarloLimit, Progress, Reference, Results, TrainNet, Unit, UnitContext

LOG = logging.getLogger("ntkrun")


def shared(spec: PCASpec) -> dict[type, tuple[str, ...]]:
    """In a sweep, the reference (the kernel and its components) is computed once for points that
    differ only in keys it does not read (ntkrun.sweep): the seeds, training, and the networks'
    widths (unless a network.module's Monte-Carlo limit takes its width from them)."""
    ignored = ("seeds", "base_seed", "training")
    if exact_limit(spec) or spec.kernels.limit_width is not None:
        ignored += ("network.width",)
    return {Reference: ignored, MonteCarloLimit: ignored}


class PCADataSpec(Model):
    dir: str | None = None  # IDX folder; else --data-dir, $NTKRUN_DATA_DIR, ~/.cache/ntkrun
    split: Literal["train", "test"] = "train"  # the IDX split the digits come from
    n_points: PositiveInt = 512  # digits (the kernel is n_points x n_points)
    seed: NonNegativeInt = 0  # the seeded choice of digits
    scaling: Literal["unit", "standardize"] = "unit"  # pixel / 255, or per-pixel standardization


class PCATrainingSpec(Model):
    lr: PositiveFloat = 1.0  # GD learning rate
    steps: PositiveInt = 2000  # (choice)
    record_every: PositiveInt = 10  # steps between recorded points of the trajectories
    checkpoint_every: PositiveInt = 100  # steps between unit checkpoints (resume restarts there)


class PCASpec(RunSpec):
    experiment: Literal["pca"] = "pca"
    seeds: PositiveInt = 2  # trials per width
    network: NetworkSpec = NetworkSpec(depth=5, width=[100, 1000, 10000])  # depth 5: docs/science.md §5.3
    training: PCATrainingSpec = PCATrainingSpec()
    data: PCADataSpec = PCADataSpec()
    kernel: Literal["analytic", "empirical"] = "empirical"  # reference kernel (paper: empirical)
    kernel_width: PositiveInt = 10000  # kernel: empirical, one network of this width at init
    kernel_seed: NonNegativeInt = 0  # that network's seed
    component: Annotated[int, Field(ge=1, le=3)] = 2  # the target moves along f(component)
    target_scale: PositiveFloat = 0.5  # f* = f_theta(0) + target_scale * f(component)
    power_tol: PositiveFloat = 1e-10  # relative tolerance of the top eigenvectors' power iteration
    kernels: MonteCarloSpec = MonteCarloSpec()  # the limit (kernel: analytic) of a network.module


# The Reference unit's result: the kernel's top eigenvalues (`lambda`, (3,)) and components on the
# digits (`f`, (N, 3)), their table, and the digits' labels (N,). (`lambda` is a keyword: hence
# the functional form.)
ReferenceResult = TypedDict(
    "ReferenceResult",
    {"eigenvalues": Table, "lambda": torch.Tensor, "f": torch.Tensor, "labels": torch.Tensor},
)


class NetResult(TypedDict):
    """A TrainNet unit's result: its trajectory along the kernel's components."""

    trajectory: Table


def check(spec: PCASpec) -> None:
    """Before a run directory is made: the split's files must be there, valid, and hold the
    digits asked for (DataError otherwise). Reads the IDX headers only."""
    info = split_info(resolve_data_dir(spec.data.dir), spec.data.split)
    check_request(info, spec.data.split, spec.data.n_points, "data.n_points")
    description = arch(spec)  # the network's geometry on these images (a 'valid' CNN may shrink them away)
    wide = [spec.kernel_width] if spec.kernel == "empirical" else []
    check_user_model(description, [*spec.network.width, *wide])


def arch(spec: PCASpec) -> Architecture:
    """The description of spec.network on the split's images (channels, rows, cols), from its header."""
    info = split_info(resolve_data_dir(spec.data.dir), spec.data.split)
    return architecture(spec, info.shape)


def cost_model(spec: PCASpec) -> Architecture | UnknownCost:
    """The description the units' costs come from (NaN costs without the data: common.priced)."""
    return priced(lambda: arch(spec))


def data_files(spec: PCASpec) -> list[Path]:
    """The files the run reads (their content is part of its identity)."""
    return files_of(spec.data.dir, [spec.data.split])


def monte_carlo(spec: PCASpec) -> bool:
    """Whether the reference is a Monte-Carlo limit (a user's model, kernel: analytic), in shares."""
    return not exact_limit(spec) and spec.kernel == "analytic"


def reference_kernel(spec: PCASpec, X: torch.Tensor, device: torch.device) -> torch.Tensor:
    """K = Theta(X, X): (N, n0) -> (N, N) float64 on the CPU (not a Monte-Carlo limit: see
    reference_unit)."""
    description = arch(spec)
    if spec.kernel == "analytic":
        return description.kernel(X)
    dtype = resolve_dtype(spec.dtype)
    wide = description.net(spec.kernel_width, spec.kernel_seed, dtype=dtype, device=device)
    K = empirical_ntk(wide, description.inputs(X).to(device)).double().cpu()
    return (K + K.T) / 2


def reference_unit(
    spec: PCASpec, X: torch.Tensor, labels: torch.Tensor, device: torch.device, ctx: UnitContext
) -> ReferenceResult:
    """The reference kernel's top eigenpairs; for a Monte-Carlo limit, from its shares, with the
    jackknife standard error of each eigenvalue over them (eigenvalues.csv's lambda_se)."""
    if not monte_carlo(spec):
        K = reference_kernel(spec, X, device)
        eig_table, lam, f = principal_components(spec, K)
        return ReferenceResult({"eigenvalues": pack(eig_table), "lambda": lam, "f": f, "labels": labels})
    whole, replicates = limit_estimate(ctx.require, spec.kernels.mc_samples)
    eig_table, lam, f = principal_components(spec, (whole.ntk + whole.ntk.T) / 2)
    lams = [dynamics.kernel_pca_dense((e.ntk + e.ntk.T) / 2, 3)[0] for e in replicates]
    eig_table["lambda_se"] = [jackknife_se([float(r[i]) for r in lams]) for i in range(3)]
    return ReferenceResult({"eigenvalues": pack(eig_table), "lambda": lam, "f": f, "labels": labels})


def principal_components(spec: PCASpec, K: torch.Tensor) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """-> (eigenvalues table, lambda (3,), f (N, 3)) from power iteration, checked against eigh."""
    lam_d, f_d = dynamics.kernel_pca_dense(K, 3)
    lam_p, f_p, iters = dynamics.kernel_pca_power(K, 3, tol=spec.power_tol)
    table = pd.DataFrame(
        {
            "index": [1, 2, 3],
            "lambda_power": lam_p.numpy(),
            "lambda_dense": lam_d.numpy(),
            "rel_diff": ((lam_p - lam_d).abs() / lam_d).numpy(),
            "eigvec_max_abs_diff": (f_p - f_d).abs().max(0).values.numpy(),
            "power_iterations": iters,
        }
    )
    return table, lam_p, f_p


def pin_norm(v: torch.Tensor) -> float:
    """||v||_pin = sqrt((1/N) sum v_i^2)."""
    return float(v.pow(2).mean().sqrt())


def train_unit(
    spec: PCASpec,
    ctx: UnitContext,
    width: int,
    seed: int,
    X: torch.Tensor,
    f_k: torch.Tensor,
    device: torch.device,
    progress: Progress,
    cost: float,
) -> list[dict]:
    """Train one network (continuing from its checkpoint if any); -> trajectory rows."""
    tr = spec.training
    name = f"w{width}_s{seed}"
    dtype, description = resolve_dtype(spec.dtype), arch(spec)
    net = description.net(width, seed, dtype=dtype, device=device)
    Xd = description.inputs(X).to(device, dtype)
    with torch.no_grad():
        f0 = net(Xd).double().cpu()
    y = f0 + spec.target_scale * f_k
    rows: list[dict] = []
    start = 0
    saved = ctx.load_checkpoint(name)  # None if absent or of another spec or data
    if saved is not None:
        net.load_state_dict(saved["state"])
        rows, start = saved["rows"], saved["step"]
        progress.advance(f"width {width}, seed {seed} (resumed at step {start})", cost * start)
        LOG.info("%s: resuming at step %d", name, start)

    def record(step: int) -> None:
        if step % tr.record_every == 0 or step == tr.steps:
            if not rows or rows[-1]["step"] != step:  # a resumed unit has its start row already
                with torch.no_grad():
                    delta = net(Xd).double().cpu() - y
                coef = float((delta * f_k).mean())
                h = delta - coef * f_k
                rows.append(
                    {
                        "width": width,
                        "seed": seed,
                        "step": step,
                        "t": step * tr.lr,
                        "g_norm": abs(coef),
                        "g_coef": coef,
                        "h_norm": pin_norm(h),
                        "loss": 0.5 * float(delta.pow(2).mean()),
                    }
                )
        if step % tr.checkpoint_every == 0 and step != start:
            ctx.save_checkpoint(name, {"step": step, "state": net.state_dict(), "rows": rows})

    record_at = set(range(0, tr.steps + 1, math.gcd(tr.record_every, tr.checkpoint_every))) | {tr.steps}
    train(
        net,
        Xd,
        y.to(device, dtype),
        lr=tr.lr,
        steps=tr.steps,
        label=f"width {width}, seed {seed}",
        progress=progress,
        step_cost=cost,
        record_at=record_at,
        record=record,
        start=start,
    )
    return rows


def decay_rate(t: np.ndarray, g: np.ndarray, floor: float) -> float:
    """Least-squares rate r of g ~ exp(-r t) over the points with g above `floor`."""
    keep = g > floor
    if keep.sum() < 2:
        return float("nan")
    return float(-np.polyfit(t[keep], np.log(g[keep]), 1)[0])


def metrics(traj: pd.DataFrame, spec: PCASpec, lam_k: float) -> pd.DataFrame:
    rows = []
    for width, g in traj.groupby("width", sort=True):
        per_seed = g.groupby("seed")
        max_h = per_seed["h_norm"].max() / spec.target_scale
        rates = [
            decay_rate(s["t"].to_numpy(), s["g_norm"].to_numpy(), 1e-3 * spec.target_scale)
            for _, s in per_seed
        ]
        final = g[g["step"] == g["step"].max()]
        rows.append(
            {
                "width": width,
                "max_h_over_c": float(max_h.mean()),
                "g_decay_rate": float(np.mean(rates)),
                "lambda_k": lam_k,
                "rate_over_lambda": float(np.mean(rates)) / lam_k,
                "final_loss": float(final["loss"].mean()),
            }
        )
    return pd.DataFrame(rows)


def digits(spec: PCASpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded choice of N digits: (N, rows * cols) inputs, (N,) labels."""
    images, labels = load_split(resolve_data_dir(spec.data.dir), spec.data.split)
    return choose_points(images, labels, spec.data.n_points, spec.data.seed, spec.data.scaling)


def step_cost(spec: PCASpec, width: int) -> Cost:
    """One GD step on the N digits (NaN without the data: see cost_model)."""
    return cost_model(spec).gd_cost(spec.data.n_points, width)


def units(spec: PCASpec) -> list[Unit]:
    """`reference` (kernel and its principal components), then one unit per (width, trial)."""
    seeds, n, description = spec.seed_values, spec.data.n_points, cost_model(spec)
    read, limits, steps = read_cost(spec.data.dir, (spec.data.split,)), [], spec.training.steps
    if spec.kernel == "empirical":
        ref_cost = read + description.ntk_flops(n, n, spec.kernel_width) + eigen_cost(n) * 2
    elif monte_carlo(spec):
        limits = limit_units("limit", spec.kernels.mc_samples, read + description.kernel_cost(n, n))
        ref_cost = read + eigen_cost(n) * (2 + len(limits))
    else:
        ref_cost = read + description.kernel_cost(n, n) + eigen_cost(n) * 2
    reference = Unit("reference", ref_cost, Reference(), needs=tuple(limits))
    return [
        *limits,
        reference,
        *(
            Unit(f"w{w}_s{s}", read + step_cost(spec, w) * steps, TrainNet(w, s), needs=(reference,))
            for w in spec.network.width
            for s in seeds
        ),
    ]


def memory(spec: PCASpec, unit: Unit) -> int:
    """Peak bytes of one unit: the digits, then the reference kernel K (N, N) with its eigen
    decomposition, or a network with a GD step on the N digits."""
    n, b, description = spec.data.n_points, resources.dtype_bytes(spec.dtype), arch(spec)
    count = split_info(resolve_data_dir(spec.data.dir), spec.data.split).count
    data = count * description.n0 + n * description.n0 * 8  # the split's uint8 images, the float64 digits
    if isinstance(unit.work, MonteCarloLimit):
        return data + description.kernel_bytes(n, n)
    if isinstance(unit.work, Reference):
        if monte_carlo(spec):  # the shares' four (N, N) tensors, each replicate's K
            kernel = (4 * len(chunks(spec.kernels.mc_samples)) + 2) * n * n * 8
        elif spec.kernel == "analytic":
            kernel = description.kernel_bytes(n, n)
        else:
            w = spec.kernel_width
            kernel = description.network_bytes(w, 1, b) + description.empirical_ntk_bytes(n, n, w, 1, b)
        return data + kernel + resources.eigen_bytes(n) + 2 * n * n * 8  # K/N and the power iteration's copy
    w = unit.work.width
    return data + description.network_bytes(w, 1, b) + description.training_bytes(n, w, 1, b)


def run_unit(
    spec: PCASpec, unit: Unit, ctx: UnitContext, progress: Progress
) -> ReferenceResult | NetResult | LimitShare:
    device = resolve_device(spec.device)
    X, y_labels = digits(spec)
    if isinstance(unit.work, MonteCarloLimit):
        return limit_share(arch(spec), unit.work, X)
    if isinstance(unit.work, Reference):
        reference = reference_unit(spec, X, y_labels.clone(), device, ctx)
        LOG.info("lambda_1..3 = %s", reference["lambda"].tolist())
        return reference
    reference = ctx.require(Reference())
    f_k = reference["f"][:, spec.component - 1]
    width, seed = unit.work.width, unit.work.seed
    rows = train_unit(spec, ctx, width, seed, X, f_k, device, progress, step_cost(spec, width).flops)
    return NetResult(trajectory=pack(rows))


def aggregate(spec: PCASpec, run: RunDir, results: Results) -> pd.DataFrame:
    """eigenvalues.csv, components.csv, trajectories.csv, metrics.csv and Figure 3; -> metrics."""
    reference = results[Reference()]
    f, lam = reference["f"], reference["lambda"]
    components = pd.DataFrame(
        {
            "index": np.arange(len(f)),
            "label": reference["labels"].numpy(),
            "f1": f[:, 0].numpy(),
            "f2": f[:, 1].numpy(),
            "f3": f[:, 2].numpy(),
        }
    )
    k = spec.component - 1
    traj = unpack(*(r["trajectory"] for _, r in results.of(TrainNet)))
    table = metrics(traj, spec, float(lam[k]))
    eigenvalues = unpack(reference["eigenvalues"])
    lam_se = float(eigenvalues["lambda_se"][k]) if "lambda_se" in eigenvalues else None
    if lam_se is not None:
        table.insert(table.columns.get_loc("lambda_k") + 1, "lambda_k_se", lam_se)
    run.write_csv("eigenvalues.csv", eigenvalues)
    run.write_csv("components.csv", components)
    run.write_csv("trajectories.csv", traj)
    run.write_csv("metrics.csv", table)
    pca_figure(
        components,
        traj,
        run.path / "figure",
        lam_k=float(lam[k]),
        lam_se=lam_se,
        c=spec.target_scale,
        k=spec.component,
        kernel=spec.kernel,
    )
    return table


RUNNER = Runner(
    PCASpec,
    # bumped by a change that alters its results (docs/architecture.md, "Run identity"); 2: a
    # network.layers composition of the CNN's shape takes the CNN's kernel recursion (equal to 1e-13)
    results_version=2,
    inputs="the IDX digits as vectors (mlp) or images (cnn)",
    units=units,
    run_unit=run_unit,
    aggregate=aggregate,
    memory=memory,
    archs=("mlp", "cnn"),
    modules=True,  # a network.module, its limit by Monte Carlo (docs/science.md §10)
    layers=True,  # a network.layers composition (ntkrun.layers), its exact kernels
    check=check,
    data_files=data_files,
    shared=shared,
)
