"""Combinators: layers in series, branches, and their fan-in (docs/science.md §12.4).

serial(*layers) maps the state through each in turn. FanOut(n) makes n copies (a tuple of
states), parallel(*layers) maps the i-th copy by the i-th layer, FanInSum adds the branches'
Sigma, Theta and q (Gaussian branches out of distinct weight layers are independent), and
FanInConcat joins them on the feature axis (a weight layer after it sees the average of the
branches' kernels, all having `width` features; a nonlinearity could not: its features are not
one Gaussian process, as in stax). residual(*branch) is x + branch(x), concat(*branches) the
concatenation of the branches' features.
"""

from __future__ import annotations

import torch
from torch import nn

from ntkrun.layers.base import Built, Features, Layer, LayerError
from ntkrun.layers.state import Kernel, State, second


def _where(i: int, layer: Layer, err: LayerError) -> LayerError:
    return LayerError(
        f"layer {i + 1} ({layer.name}): {err}".replace(f"({layer.name}): {layer.name}: ", f"({layer.name}): ")
    )


class SerialModule(nn.Module):
    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: object) -> object:
        for part in self.parts:
            x = part(x)
        return x


class Serial(Layer):
    """Layers one after the other."""

    name = "serial"

    def __init__(self, *layers: Layer) -> None:
        if not layers:
            raise LayerError("serial: no layers")
        self.layers = layers

    @property
    def weights(self) -> bool:  # type: ignore[override]
        return self.layers[-1].readout

    @property
    def last_name(self) -> str:
        return self.layers[-1].last_name

    def kernel(self, k: State) -> State:
        for i, layer in enumerate(self.layers):
            try:
                k = layer.kernel(k)
            except LayerError as err:
                raise _where(i, layer, err) from None
        return k

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        parts = []
        for i, layer in enumerate(self.layers):
            try:
                part, n_in = layer.module(n_in, width, n_out if i == len(self.layers) - 1 else 0, gen)
            except LayerError as err:
                raise _where(i, layer, err) from None
            parts.append(part)
        return SerialModule(parts), n_in

    def __repr__(self) -> str:
        return f"serial({', '.join(map(repr, self.layers))})"


class FanOutModule(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,) * self.n


class FanOut(Layer):
    name = "fan_out"

    def __init__(self, n: int) -> None:
        if n < 1:
            raise LayerError(f"fan_out: n must be at least 1, got {n}")
        self.n = n

    def kernel(self, k: State) -> State:
        return (k,) * self.n

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        return FanOutModule(self.n), [n_in] * self.n


class ParallelModule(nn.Module):
    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(part(x) for part, x in zip(self.parts, xs, strict=True))


class Parallel(Layer):
    name = "parallel"

    def __init__(self, *layers: Layer) -> None:
        self.layers = layers

    def _branches(self, k: object) -> tuple | list:
        many = isinstance(k, list) or (isinstance(k, tuple) and not all(isinstance(n, int) for n in k))
        if not many or len(k) != len(self.layers):  # type: ignore[arg-type]
            got = f"{len(k)} branches" if many else "one input"  # type: ignore[arg-type]
            raise LayerError(
                f"parallel of {len(self.layers)} layers on {got}: FanOut({len(self.layers)}) first"
            )
        return k

    def kernel(self, k: State) -> State:
        out = []
        for i, (layer, ki) in enumerate(zip(self.layers, self._branches(k), strict=True)):
            try:
                out.append(layer.kernel(ki))
            except LayerError as err:
                raise LayerError(f"branch {i + 1}: {err}") from None
        return tuple(out)

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        built = [
            layer.module(n, width, 0, gen) for layer, n in zip(self.layers, self._branches(n_in), strict=True)
        ]
        return ParallelModule([m for m, _ in built]), [n for _, n in built]


class _Sum(nn.Module):
    def forward(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.stack(xs).sum(0)


class _Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis  # the features: -1 of vectors, the channels (1) of images

    def forward(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat(xs, dim=self.axis)


def _joined(name: str, k: State) -> tuple[Kernel, ...]:
    if not isinstance(k, tuple) or not all(isinstance(ki, Kernel) for ki in k):
        raise LayerError(f"{name}: needs branches (FanOut, parallel) each ending on one state")
    return k  # type: ignore[return-value]


def _sum(*qs: torch.Tensor) -> torch.Tensor:
    return sum(qs[1:], qs[0])


class FanInSum(Layer):
    name = "fan_in_sum"

    def kernel(self, k: State) -> State:
        ks = _joined(self.name, k)
        if len({ki.inputs for ki in ks}) > 1:
            raise LayerError("fan_in_sum: adds the raw inputs to a weight layer's features (shapes differ)")
        if not all(ki.gaussian for ki in ks):
            raise LayerError(
                "fan_in_sum: a branch is not Gaussian (it ends on a nonlinearity); end it on Dense"
            )
        if len({ki.source for ki in ks}) < len(ks):
            raise LayerError(
                "fan_in_sum: two branches end on the same weight layer (their features are correlated: "
                "the kernel of their sum is not the sum of their kernels); give one a Dense of its own"
            )
        q1 = sum(ki.q1 for ki in ks)
        q2 = q1 if all(ki.q2 is ki.q1 for ki in ks) else second(self, _sum, *(ki.q2 for ki in ks))
        return ks[0].replace(
            sigma=sum(ki.sigma for ki in ks), theta=sum(ki.theta for ki in ks), q1=q1, q2=q2, gaussian=True
        )

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        if not isinstance(n_in, list) or any(n != n_in[0] for n in n_in):
            raise LayerError(f"fan_in_sum: branches of different shapes ({n_in})")
        return _Sum(), n_in[0]


class FanInConcat(Layer):
    name = "fan_in_concat"

    def kernel(self, k: State) -> State:
        ks = _joined(self.name, k)
        if any(ki.inputs for ki in ks):
            raise LayerError("fan_in_concat: a branch holds the raw inputs (their count is not the width)")
        n, q1 = len(ks), sum(ki.q1 for ki in ks) / len(ks)
        same = all(ki.q2 is ki.q1 for ki in ks)
        q2 = q1 if same else second(self, lambda *qs: _sum(*qs) / n, *(ki.q2 for ki in ks))
        sigma, theta = sum(ki.sigma for ki in ks) / n, sum(ki.theta for ki in ks) / n
        return ks[0].replace(sigma=sigma, theta=theta, q1=q1, q2=q2, gaussian=False, inputs=False, source=0)

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        if not isinstance(n_in, list) or any(isinstance(n, list) for n in n_in):
            raise LayerError("fan_in_concat: needs branches")
        if all(isinstance(n, int) for n in n_in):
            return _Concat(-1), sum(n_in)  # type: ignore[arg-type]
        if any(not isinstance(n, tuple) or n[1:] != n_in[0][1:] for n in n_in):  # type: ignore[index]
            raise LayerError(f"fan_in_concat: branches of different shapes ({n_in})")
        return _Concat(1), (sum(n[0] for n in n_in), *n_in[0][1:])  # type: ignore[index]


def serial(*layers: Layer) -> Serial:
    return Serial(*layers)


def parallel(*layers: Layer) -> Parallel:
    return Parallel(*layers)


class _ResidualModule(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _as(name: str, err: LayerError) -> LayerError:
    return LayerError(str(err).replace("fan_in_sum:", f"{name}:").replace("fan_in_concat:", f"{name}:"))


class Residual(Layer):
    """x + branch(x): FanOut(2), parallel(Identity, serial(*branch)), FanInSum, as one layer."""

    name = "residual"

    def __init__(self, *branch: Layer) -> None:
        self.branch = Serial(*branch)

    def kernel(self, k: State) -> State:
        try:
            return FanInSum().kernel((k, self.branch.kernel(k)))
        except LayerError as err:
            raise _as(self.name, err) from None

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        body, n = self.branch.module(n_in, width, 0, gen)
        if n != n_in:
            raise LayerError(
                f"residual: the branch gives {n} features from {n_in}: x + branch(x) needs them alike"
            )
        return _ResidualModule(body), n_in

    def __repr__(self) -> str:
        return f"residual({', '.join(map(repr, self.branch.layers))})"


class Concat(Layer):
    """The branches' features side by side: FanOut(n), parallel(*branches), FanInConcat, as one layer."""

    name = "concat"

    def __init__(self, *branches: Layer) -> None:
        self.branches = Parallel(*branches)

    def kernel(self, k: State) -> State:
        try:
            return FanInConcat().kernel(self.branches.kernel((k,) * len(self.branches.layers)))
        except LayerError as err:
            raise _as(self.name, err) from None

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        n = len(self.branches.layers)
        body, outs = self.branches.module([n_in] * n, width, 0, gen)
        try:
            joined, features = FanInConcat().module(outs, width, 0, gen)
        except LayerError as err:
            raise _as(self.name, err) from None
        return SerialModule([FanOutModule(n), body, joined]), features

    def __repr__(self) -> str:
        return f"concat({', '.join(map(repr, self.branches.layers))})"


def residual(*branch: Layer) -> Residual:
    """x + branch(x)."""
    return Residual(*branch)


def concat(*branches: Layer) -> Concat:
    """The branches' features side by side."""
    return Concat(*branches)
