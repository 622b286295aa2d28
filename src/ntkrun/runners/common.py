"""What every runner uses: units, progress, the experiment's networks and their training, the
numerical-range check, and unit results as plain data. Pure of CLI, executor and file concerns."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any, TypedDict

import pandas as pd
import torch

from ntkrun.architectures.base import Architecture
from ntkrun.architectures.mlp import analytic_flops, gd_flops, mlp_macs, ntk_flops  # noqa: F401 (the runners' costs)
from ntkrun.architectures.module import accepted, check_module, load_factory
from ntkrun.architectures.registry import describe
from ntkrun.architectures.registry import kind as description_kind
from ntkrun.costs import Cost, Probe
from ntkrun.data import resolve_data_dir, split_files
from ntkrun.errors import DataError, DivergenceError, NumericalRangeError, SpecError
from ntkrun.kernels.monte_carlo import MonteCarloKernels, chunks, combine, leave_one_out
from ntkrun.layers.parse import caption, parse
from ntkrun.network import gd_step, mse_cost
from ntkrun.spec import RunSpec
from ntkrun.work import MonteCarloLimit, Progress, Unit


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error. Turns TF32 off:
    torch lets cuDNN's convolutions (and may let matmuls) round float32 inputs to a 10-bit
    mantissa, an error of 1e-3 relative, large next to the kernel distances ntkrun measures."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: 'cuda' requested but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)


def distinct_names(key: str, values: list[float], where: str) -> None:
    """ValueError where two values print alike (f"{v:g}") in `where` (unit names, column names)."""
    seen: dict[str, float] = {}
    for v in values:
        if seen.setdefault(f"{v:g}", v) != v:
            raise ValueError(
                f"{key}: {seen[f'{v:g}']!r} and {v!r} are both {v:g} in {where}; "
                "give values that differ within 6 significant digits"
            )


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def placement(spec: RunSpec) -> tuple[torch.device, torch.dtype]:
    """Where and in what a unit's networks compute: spec.device and spec.dtype, resolved."""
    return resolve_device(spec.device), resolve_dtype(spec.dtype)  # type: ignore[attr-defined]


def train(
    net: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    steps: int,
    label: str,
    progress: Progress,
    step_cost: float = 1.0,
    record_at: Collection[int] = (),
    record: Callable[[int], None] | None = None,
    start: int = 0,
) -> list[float]:
    """Full-batch GD from step `start` to `steps`; -> the cost before each step and after the last.

    `record(step)` is called before the step at each step in `record_at` (and at `steps`).
    Raises DivergenceError naming `label` and the step on a non-finite cost.
    """
    losses = []
    for step in range(start, steps + 1):
        if record is not None and step in record_at:
            record(step)
        if step == steps:
            break
        loss = float(gd_step(net, X, y, lr))
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{label}: training diverged at step {step} (loss {loss}); lower training.lr (now {lr})"
            )
        losses.append(loss)
        progress.advance(label, step_cost)
    with torch.no_grad():
        losses.append(float(mse_cost(net(X), y)))
    if not math.isfinite(losses[-1]):
        raise DivergenceError(f"{label}: training diverged at step {steps}; lower training.lr (now {lr})")
    return losses


def architecture(spec: RunSpec, input_shape: tuple[int, ...], depth: int | None = None) -> Architecture:
    """The description of spec.network (ntkrun.architectures) on inputs of `input_shape` (from the
    data); SpecError naming network.* for a geometry that cannot work on them."""
    try:
        network, limit = spec.network, getattr(spec, "kernels", None)  # type: ignore[attr-defined]
        return describe(network, input_shape, depth, limit)
    except ValueError as err:
        key = "network." if str(err).startswith("layers: ") else "network: "
        raise SpecError(f"{key}{err} (inputs of shape {tuple(input_shape)})") from None


def exact_limit(spec: RunSpec) -> bool:
    """Whether spec.network's limit is exact (Architecture.EXACT), else a Monte-Carlo estimate the
    runner computes in shares: asked of the description's class, before the data are read."""
    return description_kind(spec.network).EXACT  # type: ignore[attr-defined]


def check_user_model(
    description: Architecture, widths: list[int], n_out: int = 1, depths: list[int] | tuple[int, ...] = ()
) -> None:
    """The networks of a description that is a user's model (not EXACT) tried before anything is
    written (ntkrun.architectures.module.check_module), with the widths (and depths) the spec
    varies; SpecError naming network.module. Nothing to try for any other."""
    if description.EXACT:
        return
    varies = {key for key, values in (("width", widths), ("depth", depths)) if len(set(values)) > 1}
    try:
        check_module(description, list(widths), n_out, varies)
    except ValueError as err:
        raise SpecError(f"network.module: {err}") from None


def priced(describe: Callable[[], Architecture]) -> Architecture | UnknownCost:
    """The description the units' costs come from; without the data (whose IDX header gives the
    inputs' shape), or for a network that cannot take these inputs, an UnknownCost, whose costs are
    NaN: the units can still be listed, followed and aggregated, and a run is refused by the data
    check or the preflight before anything is computed."""
    try:
        return describe()
    except (DataError, SpecError):
        return UnknownCost()


class UnknownCost:
    """The cost model of a description whose inputs' shape is unknown here (its data are absent):
    every FLOP count is NaN, never a guess."""

    JOINT_KERNELS = False

    def gd_flops(self, n: int, width: int, n_out: int = 1) -> float:
        return math.nan

    def ntk_flops(self, n1: int, n2: int, width: int, n_out: int = 1) -> float:
        return math.nan

    def kernel_flops(self, n1: int, n2: int) -> float:
        return math.nan

    def gd_cost(self, n: int, width: int, n_out: int = 1) -> Cost:
        return Cost(gemm=math.nan)

    def kernel_cost(self, n1: int, n2: int) -> Cost:
        return Cost(gemm=math.nan)


def build_net(
    spec: RunSpec,
    input_shape: int | tuple[int, ...],
    width: int,
    seed: int,
    device: torch.device,
    depth: int | None = None,
    n_out: int = 1,
) -> torch.nn.Module:
    """The experiment's network of one width and seed on inputs of `input_shape` (an int: n0):
    its architecture, depth (default spec.network.depth), nonlinearity, beta and parametrization
    from spec.network, dtype from spec.dtype."""
    shape = (input_shape,) if isinstance(input_shape, int) else input_shape
    dtype = resolve_dtype(spec.dtype)
    return architecture(spec, shape, depth).net(width, seed, dtype=dtype, device=device, n_out=n_out)


def network_caption(net: Any, depth: bool = True, on: str = "") -> str:
    """A figure's account of spec.network, written once for every experiment: 'depth 4 relu, beta
    0.1'; a cnn 'cnn depth 4 relu, 3x3 same, flatten, beta 0.1'; a composition 'layers ...'; a
    user's model its factory. depth=False leaves the depth out (a figure with a panel per depth);
    `on` names the inputs ('8x8 images')."""
    where = f" on {on}" if on else ""
    if getattr(net, "layers", None) is not None:
        return f"layers {caption(net.layers)}{where}"
    if getattr(net, "module", None) is not None:  # its depth, where the factory takes one
        try:
            takes = depth and "depth" in accepted(load_factory(net.module)[0])
        except ValueError:  # not importable here (the figure of a run made elsewhere)
            takes = depth
        return f"{net.module} (depth {net.depth}){where}" if takes else f"{net.module}{where}"
    what = f"depth {net.depth} {net.nonlinearity}" if depth else net.nonlinearity
    if getattr(net, "arch", "mlp") == "cnn":
        k = net.kernel_size
        return f"cnn {what}, {k}x{k} {net.padding}, {net.readout}{where}, beta {net.beta:g}"
    return f"{what}{where}, beta {net.beta:g}"


def check_range(spec: RunSpec, q0: float = 0.1) -> None:
    """Refuse depth/nonlinearity/beta/dtype combinations whose kernels leave the dtype's range.

    The limiting Sigma and Theta on the diagonal of an input with |x|^2 / n0 = q0 (0.1: about the
    smallest input scale of the experiments), as the architecture's description gives them
    (`range_values`: every layer's for the MLP), tell the size of the activations and of the
    empirical NTK; e.g. ReLU with beta = 0 halves Sigma at every layer, so a depth-300 network
    computes an NTK of exactly 0 in float32.
    """
    net = spec.network  # type: ignore[attr-defined]
    depth = max(net.depth) if isinstance(net.depth, list) else net.depth
    info = torch.finfo(resolve_dtype(spec.dtype))
    low, high = info.tiny * 1e4, info.max / 1e4
    data = getattr(spec, "data", None)
    image = getattr(data, "image", None) or getattr(data, "sequence", None)
    # |x|^2 / n0 is all an MLP sees; a CNN its image, else the 28x28 images of the data experiments
    vectors = getattr(net, "arch", "mlp") == "mlp"
    if getattr(net, "layers", None) is not None:
        vectors = not parse(net.layers).positions
    shape = (1,) if vectors else tuple(image or (1, 28, 28))
    values = architecture(spec, shape, depth).range_values(q0)
    smallest, largest = float(values.min()), float(values.max())
    if smallest < low or largest > high or not math.isfinite(largest):
        what = "underflow" if smallest < low else "overflow"
        value = smallest if smallest < low else largest
        which = (
            f"layers {caption(net.layers)}"
            if getattr(net, "layers", None) is not None
            else (f"depth {depth} with {net.nonlinearity} and beta {net.beta}")
        )
        raise NumericalRangeError(
            f"network: {which} drives the kernels to "
            f"{value:.3g} (Sigma/Theta of the limit): {spec.dtype} would {what} (normal range "
            f"{info.tiny:.3g} to {info.max:.3g}); use dtype: float64, a smaller depth, or beta > 0"
        )


# ---------------------------------------------------------------- unit results as plain data


def seed_spread(keys: list[tuple], thetas: list[torch.Tensor]) -> list[float]:
    """Per network: ||Theta_s(0) - mean|| / ||mean||, the mean over the networks of its key (all it
    is but its seed): the NTK's seed fluctuation at initialization, measured without a limit."""
    means = {
        key: torch.stack([t for k, t in zip(keys, thetas, strict=True) if k == key]).mean(0)
        for key in set(keys)
    }
    return [float((t - means[k]).norm() / means[k].norm()) for k, t in zip(keys, thetas, strict=True)]


Table = dict[str, list]  # a table as a unit result stores it: {column: its values}


def pack(rows: list[dict[str, Any]] | pd.DataFrame) -> Table:
    """Rows (or a DataFrame) -> {column: list of Python scalars}, storable by torch.save."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return {str(c): frame[c].tolist() for c in frame.columns}


def unpack(*tables: Table) -> pd.DataFrame:
    """The inverse of pack, concatenating several tables in order."""
    return pd.concat([pd.DataFrame(t) for t in tables], ignore_index=True)


# ---------------------------------------------------------------- cost in floating-point operations


def eigen_cost(n: int) -> Cost:
    """That eigendecomposition, as this machine runs it (timed: ntkrun.costs.Probe)."""
    return Cost(probes=((Probe("eigh", n), 1.0),))


def cholesky_cost(n: int) -> Cost:
    """A Cholesky factorization of an (n, n) matrix (n^3 / 3 FLOPs), as this machine runs it."""
    return Cost(probes=((Probe("cholesky", n), 1.0),))


def read_cost(data_dir: str | None, splits: Collection[str]) -> Cost:
    """Reading these splits' files (timed: ntkrun.costs.Probe); nothing where they are absent."""
    try:
        folder = resolve_data_dir(data_dir)
        files = [path for split in splits for path in split_files(folder, split)]
    except DataError:
        return Cost()
    return Cost(probes=tuple((Probe("read", 1, description=path), 1.0) for path in files))


# ---------------------------------------------------------------- Monte-Carlo limits as units


def limit_works(samples: int, **where: int) -> list[MonteCarloLimit]:
    """The shares (kernels.monte_carlo.chunks) of a Monte-Carlo limit over `samples` networks;
    `where`: MonteCarloLimit's depth, seed or n_train."""
    return [MonteCarloLimit(start, count, **where) for start, count in chunks(samples)]


def limit_units(prefix: str, samples: int, cost: float | Cost, **where: int) -> list[Unit]:
    """The shares of a Monte-Carlo limit (limit_works) as units prefix_0, prefix_1, ...; cost: the
    FLOPs of all of them."""
    return [
        Unit(f"{prefix}_{i}", cost * (work.count / samples), work)
        for i, work in enumerate(limit_works(samples, **where))
    ]


class LimitShare(TypedDict):
    """A Monte-Carlo share's result: its networks' mean kernels and their standard errors."""

    n: int
    ntk: torch.Tensor
    ntk_se: torch.Tensor
    nngp: torch.Tensor
    nngp_se: torch.Tensor


def limit_share(
    description: Architecture, work: MonteCarloLimit, X: torch.Tensor, X2: torch.Tensor | None = None
) -> LimitShare:
    """One share's Monte-Carlo kernels (a ModuleArchitecture's networks work.start onwards) as a
    unit result."""
    note = getattr(description, "limit_note", None)
    if note is not None:
        logging.getLogger("ntkrun").info("limit: %s", note())
    estimate = replace(description, mc_samples=work.count).monte_carlo(X, X2, first=work.start)  # type: ignore[type-var]
    return {"n": estimate.n_samples, "ntk": estimate.ntk, "ntk_se": estimate.ntk_stderr,
            "nngp": estimate.nngp, "nngp_se": estimate.nngp_stderr}  # fmt: skip


def limit_estimate(
    read: Callable[[MonteCarloLimit], Any], samples: int, **where: int
) -> tuple[MonteCarloKernels, list[MonteCarloKernels]]:
    """The results of a limit's shares (limit_works(samples, **where), read by their work:
    UnitContext.require, or Results' __getitem__) -> (the estimate over all of them, the
    jackknife's leave-one-share-out estimates)."""
    shares: list[LimitShare] = [read(work) for work in limit_works(samples, **where)]
    parts = [MonteCarloKernels(r["nngp"], r["ntk"], r["nngp_se"], r["ntk_se"], r["n"]) for r in shares]
    return combine(parts), leave_one_out(parts) if len(parts) > 1 else []
