"""The user's own torch model as an architecture description (`network.module: "pkg.mod:factory"`).

The factory is called for each width, depth and seed with those of the keywords `width`, `depth`,
`in_shape` (one input's shape), `n_out` and `seed` that its signature accepts, under
`torch.manual_seed(seed)` (so a model left to torch's default initialization is drawn from the seed
too). Its limiting kernels are Monte-Carlo means over `mc_samples` networks of `limit_width`
(`ntkrun.kernels.monte_carlo`, docs/science.md §10), except where the model lifts to a composition
of ntkrun.layers (`from_torch`, docs/science.md §12.10): then its NNGP is the composition's exact
Sigma (standard error 0), and so is its NTK where the model is NTK-parametrized (a model of torch's
own layers is in the standard parametrization, whose NTK grows with the width: it stays Monte
Carlo). `limit_note` says which. Its costs come from a probe of one network (torch's FLOP counter,
its parameters and its activations).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ntkrun.architectures.base import place_rows
from ntkrun.architectures.probed import ProbedArchitecture
from ntkrun.costs import Cost
from ntkrun.kernels.monte_carlo import MonteCarloKernels, monte_carlo_kernels
from ntkrun.layers import LayerError, Lifted, from_torch

KEYWORDS = ("width", "depth", "in_shape", "n_out", "seed")
LIFT_WIDTH = 64  # the network from_torch reads (its limit does not depend on the width), and twice it
GAUSSIAN_FAN_IN = 256  # torch's uniform first layer: pre-activations of excess kurtosis ~ -3.6 / fan-in
MC_SEED = 1_000_000  # the Monte-Carlo limit's networks: seeds MC_SEED .. MC_SEED + mc_samples - 1


def load_factory(path: str) -> tuple[Callable[..., Any], Path | None]:
    """'package.module:function' -> (the function, its source file), importable from the working
    directory or PYTHONPATH. ValueError naming the reason."""
    name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:  # `ntkrun` as a console script does not put it there itself
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(name)
    except Exception as err:  # a missing module, or the user's module failing as it loads
        raise ValueError(
            f"cannot import {name!r} ({type(err).__name__}: {err}); it must be importable from the "
            "working directory or PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {name!r} ({getattr(module, '__file__', '?')}) has no {attr!r}")
    if not callable(factory):
        raise ValueError(f"{path} is a {type(factory).__name__}, not a function")
    source = getattr(module, "__file__", None)
    return factory, Path(source).resolve() if source else None


def accepted(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The keywords of KEYWORDS the factory takes (all of them with **kwargs)."""
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return KEYWORDS
    names = {p.name for p in parameters}
    return tuple(k for k in KEYWORDS if k in names)


def source_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of one of the model's source files: part of a run's identity."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def source_files(path: str) -> list[Path]:
    """The model's source: the factory's file, then every file it imported from its own package
    (or, for a module outside a package, its own folder), as loaded now: an edit to a helper the
    model imports changes its results as much as one to the factory. Imports made only when the
    factory runs are not seen."""
    factory, source = load_factory(path)
    if source is None:
        return []
    module = sys.modules[factory.__module__] if factory.__module__ in sys.modules else None
    top = (getattr(module, "__package__", None) or "").partition(".")[0]
    package = sys.modules.get(top) if top else None
    root = Path(package.__file__).resolve().parent if package and getattr(package, "__file__", None) else None
    root = root or source.parent
    found = {source}
    for loaded in list(sys.modules.values()):
        file = getattr(loaded, "__file__", None)  # some are relative names of no file (torch._classes)
        if file and file.endswith(".py") and Path(file).is_absolute() and Path(file).is_file():
            if Path(file).resolve().is_relative_to(root):
                found.add(Path(file).resolve())
    return [source, *sorted(found - {source})]


class OneOutput(nn.Module):
    """A model of one output as every experiment takes it, (N, ...) -> (N,): torch's usual head,
    nn.Linear(width, 1), returns (N, 1), squeezed here once for all of them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y.squeeze(-1) if y.dim() == 2 and y.shape[-1] == 1 else y


@dataclass(frozen=True)
class ModuleArchitecture(ProbedArchitecture):
    """The model of `module` on inputs of input_shape; its limit by Monte Carlo."""

    module: str = ""
    limit_width: int = 1024
    mc_samples: int = 32
    name: ClassVar[str] = "module"
    EXACT: ClassVar[bool] = False  # its limit is a Monte-Carlo estimate (docs/science.md §10)
    JOINT_KERNELS: ClassVar[bool] = True  # one Monte-Carlo pass gives the NNGP and the NTK

    def net(
        self, width: int, seed: int, *, dtype: torch.dtype, device: torch.device | str, n_out: int = 1
    ) -> nn.Module:
        factory, _ = load_factory(self.module)
        values = {
            "width": width,
            "depth": self.depth,
            "in_shape": self.input_shape,
            "n_out": n_out,
            "seed": seed,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = factory(**{key: values[key] for key in accepted(factory)})
        if not isinstance(net, nn.Module):
            raise ValueError(f"{self.module} returned {type(net).__name__}, not a torch.nn.Module")
        net = net.to(device=device, dtype=dtype)
        if n_out != 1 or type(net).__module__.startswith("ntkrun."):  # ntkrun's own nets return (N,)
            return net  # (and keep their fast kernel and GD paths)
        return OneOutput(net)

    @lru_cache(maxsize=8)  # noqa: B019 (a frozen description: the cache lives as long as it does)
    def lifted(self) -> tuple[Lifted | None, str]:
        """(the composition the model is, or None; why not): from_torch of one network, tried on
        one input of input_shape."""
        try:
            nets = [self.net(w, 0, dtype=torch.float64, device="cpu") for w in (LIFT_WIDTH, 2 * LIFT_WIDTH)]
            nets = [net.net if isinstance(net, OneOutput) else net for net in nets]
            lifted = from_torch(nets[0])
            gen = torch.Generator().manual_seed(0)
            lifted.layers.kernels(torch.randn(1, *self.input_shape, generator=gen, dtype=torch.float64))
        except LayerError as err:
            return None, str(err).removeprefix("from_torch: ")
        except Exception as err:  # a model that cannot be built here: check_module names it
            return None, f"{type(err).__name__}: {err}"
        fixed = fixed_width_layer(*nets)
        if fixed:  # its limit is not the composition's, whose every hidden layer grows
            return None, f"{fixed} keeps its width as the width grows"
        if lifted.linear_on_inputs and len(self.input_shape) == 3:
            return None, "its first nn.Linear acts on the images' last axis (columns), not a composition's"
        if any(layer.mixes_positions for layer in lifted.layers.walk()):
            return None, "it pools: its exact kernel keeps every pair of positions, dearer than Monte Carlo"
        if lifted.uniform_fan_in is not None and lifted.uniform_fan_in < GAUSSIAN_FAN_IN:
            return None, (
                f"its first layer's fan-in is {lifted.uniform_fan_in}: torch's uniform weights leave its "
                f"pre-activations non-Gaussian (excess kurtosis about -3.6/{lifted.uniform_fan_in})"
            )
        return lifted, ""

    def exact_kinds(self) -> tuple[str, ...]:
        """The kernels of the limit known exactly (from the lifted composition)."""
        lifted, _ = self.lifted()
        if lifted is None:
            return ()
        return ("nngp", "ntk") if lifted.parametrization == "ntk" else ("nngp",)

    def limit_note(self) -> str:
        """One line: which of the limit's kernels are exact and which Monte Carlo, and why."""
        lifted, why = self.lifted()
        if lifted is None:
            return f"{self.module} does not lift to ntkrun.layers ({why}): its NNGP and NTK by Monte Carlo"
        if lifted.parametrization == "ntk":
            return f"{self.module} lifts to {lifted.layers!r}: its NNGP and NTK exact"
        return (
            f"{self.module} lifts to {lifted.layers!r} ({lifted.parametrization} parametrization): its NNGP "
            "exact, its NTK by Monte Carlo (it grows with the width: no limit to compute)"
        )

    def monte_carlo(
        self, X: torch.Tensor, X2: torch.Tensor | None = None, first: int = 0
    ) -> MonteCarloKernels:
        """Both kernels with their standard errors, over mc_samples networks of limit_width (seeds
        MC_SEED + first onwards: a share of them, for a unit); the exact_kinds from the lifted
        composition, with standard errors 0 (no network is drawn when both are exact)."""
        A, B = self.inputs(X).double(), None if X2 is None else self.inputs(X2).double()
        exact = self.exact_kinds()
        if exact:
            sigma, theta = self.lifted()[0].layers.kernels(A, B)  # type: ignore[union-attr]
            if len(exact) == 2:
                zero = torch.zeros_like(sigma)
                return MonteCarloKernels(sigma, theta, zero, zero, self.mc_samples)

        def factory(seed: int) -> nn.Module:
            return self.net(self.limit_width, seed, dtype=torch.float64, device="cpu")

        estimate = monte_carlo_kernels(factory, A, B, self.mc_samples, MC_SEED + first)
        if not exact:
            return estimate
        return replace(estimate, nngp=sigma.to(estimate.nngp), nngp_stderr=torch.zeros_like(estimate.nngp))

    def kernel(
        self,
        X: torch.Tensor,
        X2: torch.Tensor | None = None,
        *,
        kind: str = "ntk",
        out_dtype: torch.dtype = torch.float64,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return self.kernels(X, X2, kinds=[kind], out_dtype=out_dtype, outs=[out], rows=rows)[0]

    def kernels(
        self,
        X: torch.Tensor,
        X2: torch.Tensor | None = None,
        *,
        kinds: Sequence[str],
        out_dtype: torch.dtype = torch.float64,
        outs: Sequence[torch.Tensor | None] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> list[torch.Tensor]:
        """The Monte-Carlo means of `kinds` from one pass over the networks (JOINT_KERNELS); with
        rows=(r0, r1), whole rows r0 .. r1 of the Gram (or into `outs` there)."""
        for kind in kinds:
            self.check_kernel(kind)
        r0, r1 = rows if rows is not None else (0, X.shape[0])
        estimate = self.monte_carlo(X[r0:r1], X2 if X2 is not None else X)
        blocks = [estimate.ntk if kind == "ntk" else estimate.nngp for kind in kinds]
        return place_rows(blocks, outs, rows, out_dtype)

    def kernel_flops(self, n1: int, n2: int) -> float:
        """mc_samples forward passes and empirical NTKs at limit_width."""
        return self.mc_samples * (
            self.ntk_flops(n1, n2, self.limit_width) + (n1 + n2) * self.forward_flops(self.limit_width)
        )

    def kernel_cost(self, n1: int, n2: int) -> Cost:
        """mc_samples networks' NTKs: large products (timing one would build mc_samples networks)."""
        return Cost(gemm=self.kernel_flops(n1, n2))

    def kernel_bytes(self, n1: int, n2: int) -> int:
        """One network of limit_width, one kernel sample and four float64 accumulators per pair."""
        net = self.network_bytes(self.limit_width, 1, 8)
        return net + self.empirical_ntk_bytes(n1, n2, self.limit_width, 1, 8) + 6 * n1 * n2 * 8


def fixed_width_layer(small: nn.Module, large: nn.Module) -> str:
    """The first hidden weight layer (nn.Linear, nn.Conv2d) whose outputs do not double from a
    network to its twice-as-wide twin ('' if none): the readout, giving the outputs, is exempt."""
    names = [n for n, m in small.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    shapes = {n: m.weight.shape[0] for n, m in large.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    for name in names[:-1]:
        if shapes.get(name) != 2 * dict(small.named_modules())[name].weight.shape[0]:
            return f"{type(dict(small.named_modules())[name]).__name__} '{name}'"
    return ""


def check_module(description: ModuleArchitecture, widths: list[int], n_out: int, varies: set[str]) -> None:
    """Everything about a user model that can be known before a run: importable, callable, takes
    the keywords the spec varies, returns a module with trainable parameters whose output on a
    batch of 3 inputs is (3,) or (3, n_out), sample by sample independent of its batch. ValueError
    with one line saying what and why."""
    factory, _ = load_factory(description.module)
    missing = [key for key in sorted(varies) if key not in accepted(factory)]
    if missing:
        raise ValueError(
            f"the spec varies {', '.join(missing)}, but {description.module} takes no {missing[0]!r} "
            f"parameter (it would build the same network for each value): give network.{missing[0]} "
            f"one value (--set network.{missing[0]}=...), or add {missing[0]!r} to the factory's parameters"
        )
    shape, width = description.input_shape, min(widths)
    try:
        net = description.net(width, 0, dtype=torch.float64, device="cpu", n_out=n_out)
    except Exception as err:
        if isinstance(err, ValueError) and "not a torch.nn.Module" in str(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{description.module} failed to build a network of width {width} for in_shape {shape} "
            f"({type(err).__name__}: {first}); in_shape is one input's shape here: a model of images "
            "needs images (scaling: data.image [C, H, W]; pca, generalization: the IDX images; "
            "features: data.inputs images or data.image)"
        ) from None
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"{description.module} built a network without trainable parameters")
    X = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        with torch.no_grad():
            out, pair = net(X), net(X[[0, 2]])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{description.module} (width {width}) rejects inputs of shape {(3, *shape)}: {first}"
        ) from None
    if tuple(out.shape) != ((3,) if n_out == 1 else (3, n_out)):  # (3, 1) is (3,) here (OneOutput)
        want = "(3,) or (3, 1)" if n_out == 1 else str((3, n_out))
        raise ValueError(
            f"{description.module} returns outputs of shape {tuple(out.shape)} on 3 inputs, not {want}"
        )
    if not torch.allclose(out[[0, 2]], pair, rtol=1e-9, atol=1e-12):
        raise ValueError(
            f"{description.module}: the output of a sample changes with its batch (BatchNorm in training "
            "mode, dropout?): the NTK needs samples treated independently"
        )
    if not math.isfinite(float(out.abs().sum())):
        raise ValueError(f"{description.module} returns non-finite outputs at initialization")
