"""The kernel predictors of `ntkrun generalization` (ntkrun.runners.generalization): which kernels
are fitted together, on which description, as which units (a fit, and its row blocks where
kernels.rows_per_unit splits the Grams), and the fit itself: Grams, in-place solve, test predictions.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ntkrun.architectures.base import Architecture
from ntkrun.architectures.mlp import MLPArchitecture
from ntkrun.architectures.registry import kind as description_kind
from ntkrun.data import resolve_data_dir, split_info
from ntkrun.iterative import Gram, UpperStrips, cg_solve
from ntkrun.linalg import kernel_solve_
from ntkrun.runners.common import (
    UnknownCost,
    architecture,
    exact_limit,
    pack,
    priced,
    read_cost,
    resolve_dtype,
)
from ntkrun.runners.generalization_spec import GenSpec
from ntkrun.runners.grams import (
    TEST_CHUNK,
    checkpointed_grams,
    gram_block,
    predictions,
    spans,
    strip_grams,
    test_block,
    test_rows,
)
from ntkrun.runners.labelled import KERNEL_KINDS, BlockResult, FitResult, dataset, scores, targets
from ntkrun.work import GramBlock, Progress, Unit, UnitContext

LOG = logging.getLogger("ntkrun")

AUTO_FLOAT64_POINTS = 20000  # float64 Grams up to here (3.2 GB); beyond, float32 (14.4 GB at 60000)
# kernels.solver auto: CG from here, the crossover extrapolated from CG's time over the Cholesky's
# measured at 2000-20000 points on a 2-core AMD EPYC (docs/science.md §5.7)
AUTO_CG_POINTS = 10**6


def image_shape(spec: GenSpec) -> tuple[int, int, int]:
    """(channels, rows, cols) of one image, from the train split's IDX header."""
    info = split_info(resolve_data_dir(spec.data.dir), "train")
    return info.shape


def arch(spec: GenSpec) -> Architecture:
    """The description of spec.network on the data's images (ntkrun.architectures)."""
    return architecture(spec, image_shape(spec))


def cost_model(spec: GenSpec, predictor: str = "ntk") -> Architecture | UnknownCost:
    """The description the units' costs come from: that of a kernel predictor's kernel (NaN costs
    without the data: common.priced)."""
    return priced(lambda: kernel_of(spec, predictor)[0])


def gram_dtype(spec: GenSpec, n: int) -> torch.dtype:
    if spec.kernels.dtype == "auto":
        return torch.float64 if n <= AUTO_FLOAT64_POINTS else torch.float32
    return resolve_dtype(spec.kernels.dtype)


def kernel_of(spec: GenSpec, predictor: str) -> tuple[Architecture, str]:
    """(description, kind) of a kernel predictor: 'ntk'/'nngp' of spec.network, 'mlp_ntk'/'mlp_nngp'
    of the MLP of the same depth, nonlinearity and beta on the same images."""
    if predictor.startswith("mlp_"):
        net = spec.network
        baseline = MLPArchitecture(image_shape(spec), net.depth, net.nonlinearity, net.beta)
        return baseline, predictor.removeprefix("mlp_")
    return arch(spec), predictor


def kernel_groups(spec: GenSpec) -> list[tuple[str, ...]]:
    """The kernel predictors each kernel unit fits: `ntk` and `nngp` of one description whose
    recursion gives both at once (Architecture.JOINT_KERNELS: the CNN) share a unit, so its Grams
    on the training and the test points are computed once; any other is a unit of its own."""
    wanted = [k for k in KERNEL_KINDS if k in spec.predictors]
    groups: list[tuple[str, ...]] = []
    for baseline in (False, True):
        family = tuple(k for k in wanted if k.startswith("mlp_") == baseline)
        joint = (MLPArchitecture if baseline else description_kind(spec.network)).JOINT_KERNELS
        groups.extend([family] if joint and len(family) > 1 else [(k,) for k in family])
    return groups


def monte_carlo(spec: GenSpec, predictors: tuple[str, ...]) -> bool:
    """Whether a kernel unit fits Monte-Carlo kernels (a user's model: runners.generalization_mc)."""
    return not exact_limit(spec) and not predictors[0].startswith("mlp_")


def kernel_unit_name(predictors: tuple[str, ...], n: int) -> str:
    """ntk_n500 for one predictor (as every earlier run named it), ntk+nngp_n500 for a pair."""
    return f"{'+'.join(predictors)}_n{n}"


def kernel_unit(spec: GenSpec, unit: Unit, ctx: UnitContext, progress: Progress) -> FitResult:
    """Each of the unit's predictors fitted on the first n_train points and scored on the test
    split: one row per predictor."""
    predictors, n = unit.work.predictors, unit.work.n_train
    description, kinds = kernel_of(spec, predictors[0])[0], [kernel_of(spec, p)[1] for p in predictors]
    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def lap(phase: str) -> None:  # the unit's profile, logged at its end (benchmarks/bench_floor.py)
        clock.append(time.perf_counter())
        seconds[phase] = seconds.get(phase, 0.0) + clock[-1] - clock[-2]

    X, labels, Xt, labels_t = dataset(spec, n)
    lap("data")
    per_unit = spec.kernels.rows_per_unit
    blocks = per_unit is not None and n > per_unit  # block units computed the Gram's rows, at their cost
    rows, dtype = per_unit if blocks else spec.kernels.checkpoint_rows, gram_dtype(spec, n)
    for block in unit.needs:  # computed first where they are not yet (as when this unit is run alone)
        ctx.require(block.work)
    cg = solver_of(spec, n) == "cg"
    if blocks and cg:  # out of core
        Ks = strip_grams(description, kinds, X, dtype, rows, ctx, unit.name)
    else:  # (CG reads the upper triangle only)
        Ks = checkpointed_grams(
            description, kinds, X, dtype, rows, ctx, unit.name, progress, saved_counts=not blocks,
            lower=not cg,
        )
    lap("Gram")
    alphas, solves, notes, Y = [], [], [], targets(spec, labels)
    for kind in kinds:
        relative = spec.kernels.ridge + (spec.kernels.nngp_noise if kind == "nngp" else 0.0)
        alpha, solved = solve(spec, Ks[0], Y, relative, progress, f"{unit.name}: {kind}")
        del Ks[0]  # (solved in place by a Cholesky): its memory goes before the next one's solve
        alphas.append(alpha.double())
        solves.append(solved)
        notes.extend(f"{kind}: {note}" if len(kinds) > 1 else note for note in solved.pop("notes"))
    lap("solve")
    for note in notes:
        LOG.warning("%s: %s", unit.name, note)
    preds = predictions(description, kinds, Xt, X, alphas, ctx, unit.name, spec.kernels.rows_per_unit)
    lap("test kernel and predictions")
    LOG.info("%s: seconds: %s", unit.name, ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    out = []
    for predictor, pred, solved in zip(predictors, preds, solves, strict=True):
        row = {
            "predictor": predictor,
            "n_train": n,
            "width": math.nan,
            "seed": -1,
            **scores(spec, pred, labels_t),
            "ridge": solved["ridge"],
            "gram_dtype": str(dtype).removeprefix("torch."),
            "solver": solved["solver"],
            "iterations": solved["iterations"],
            "residual": solved["residual"],
        }
        LOG.info("%s", row)
        out.append(row)
    return FitResult(rows=pack(out), notes=notes)


def solver_of(spec: GenSpec, n: int) -> str:
    """kernels.solver, `auto` resolved by the rule of docs/science.md §5.7: cg from AUTO_CG_POINTS."""
    if spec.kernels.solver == "auto":
        return "cg" if n >= AUTO_CG_POINTS else "cholesky"
    return spec.kernels.solver


def solve(
    spec: GenSpec, K: Gram, Y: torch.Tensor, relative: float, progress: Progress, what: str
) -> tuple[torch.Tensor, dict]:
    """(K + r I) alpha = Y, r = relative x the mean diagonal, by the spec's solver: a Cholesky in
    place (K destroyed; r raised where it fails) or preconditioned CG (K kept) -> (alpha (N, m),
    {ridge: r as used, solver, iterations (CG), residual (CG, relative, recomputed), notes})."""
    n, kernels = (K.n if isinstance(K, UpperStrips) else K.shape[0]), spec.kernels
    if solver_of(spec, n) == "cholesky":
        cost, reported = n**3 / 3, [0]

        def factored(done: int, total: int) -> None:  # done/total: the share of the factorization's work
            reported[0] = 0 if done < reported[0] else reported[0]  # a retry with a larger ridge starts over
            progress.advance(f"{what}: Cholesky {done}/{total}", cost * (done - reported[0]) / total)
            reported[0] = done

        alpha, ridge, notes = kernel_solve_(K, Y, ridge=relative, progress=factored)
        return alpha, {"ridge": ridge, "solver": "cholesky", "iterations": math.nan, "residual": math.nan,
                       "notes": notes}  # fmt: skip
    scale = K.diagonal().double().abs().mean().item() or 1.0  # (the strips' diagonal: float64)
    # CG needs K + r I positive definite (the Nystrom preconditioner assumes r > 0): r is at least
    # the floor the Cholesky raises a failed ridge to, max(1e-10, eps) of the mean diagonal
    relative = max(relative, 1e-10, torch.finfo(K.dtype).eps)
    step = 2.0 * n * n * Y.shape[1]

    def iterated(done: int, total: int) -> None:
        progress.advance(f"{what}: CG iteration {done} (at most {total})", step)

    found = cg_solve(K, Y, ridge=relative * scale, rank=kernels.precond_rank, tol=kernels.tol,
                     max_iter=kernels.max_iter, seed=spec.data.seed, progress=iterated)  # fmt: skip
    return found.alpha, {"ridge": relative * scale, "solver": "cg", "iterations": found.iterations,
                         "residual": found.residual, "notes": []}  # fmt: skip


def block_units(spec: GenSpec, predictors: tuple[str, ...], n: int, m: int) -> list[Unit]:
    """The row-block units of the fit of `predictors` on n training points (kernels.rows_per_unit):
    its training Gram's blocks where it has more than one, then its test blocks likewise."""
    rows = spec.kernels.rows_per_unit
    if rows is None:
        return []
    model, name = cost_model(spec, predictors[0]), kernel_unit_name(predictors, n)
    read = read_cost(spec.data.dir, ("train", "test"))
    grams = 1 if model.JOINT_KERNELS else len(predictors)
    out = []
    for r0, r1 in spans(n, rows) if n > rows else []:
        cost = read + grams * model.kernel_cost(r1 - r0, n - (r0 + r1) // 2)  # the upper triangle
        out.append(Unit(f"{name}_rows{r0}", cost, GramBlock(predictors, n, False, r0, r1)))
    for t0, t1 in spans(m, test_rows(rows)) if m > test_rows(rows) else []:
        cost = read + grams * model.kernel_cost(t1 - t0, n)
        out.append(Unit(f"{name}_test{t0}", cost, GramBlock(predictors, n, True, t0, t1)))
    return out


def block_unit(spec: GenSpec, unit: Unit, ctx: UnitContext) -> BlockResult:
    """One row block of a fit's Gram (or of its test kernel), saved as that fit's checkpoint part."""
    work = unit.work
    description, kinds = (
        kernel_of(spec, work.predictors[0])[0],
        [kernel_of(spec, p)[1] for p in work.predictors],
    )
    X, _, Xt, _ = dataset(spec, work.n_train)
    if work.test:
        part, state = f"test{work.r0}", test_block(description, kinds, Xt, X, work.r0, work.r1)
    else:
        dtype = gram_dtype(spec, work.n_train)
        part, state = f"rows{work.r0}", gram_block(description, kinds, X, dtype, work.r0, work.r1)
    ctx.save_checkpoint(kernel_unit_name(work.predictors, work.n_train), state, part)
    return BlockResult(part=part, shape=list(state[kinds[0]].shape))


def block_bytes(spec: GenSpec, work: GramBlock, m: int) -> int:
    """A block unit's peak: its kernels' working memory and the block of each kind, twice where the
    training Gram's upper triangle is copied out of the rows computed."""
    model, n, k = kernel_of(spec, work.predictors[0])[0], work.n_train, len(work.predictors)
    rows = work.r1 - work.r0
    if work.test:
        return model.kernel_bytes(min(rows, TEST_CHUNK), n) + k * rows * n * 8
    return model.kernel_bytes(rows, n) + 2 * k * rows * n * gram_dtype(spec, n).itemsize
