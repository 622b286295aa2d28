"""A layer: its kernel transformation, its finite torch module, in one object.

Every layer of `ntkrun.layers` is a `Layer`: `kernel(k)` maps the kernel state (state.Kernel, or
a tuple of them between FanOut and a fan-in), `module(n_in, width, n_out)` builds the finite
network's piece for inputs of n_in features (its `width`-feature weight layers, n_out where it is
the readout) and says how many features it gives. Parameters are drawn N(0, 1) from the torch
generator the composition passes down (NTK parametrization: the scales are in the forward pass).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from ntkrun.layers.state import Kernel, State, input_kernel, own_covariance, second_inputs_once
from ntkrun.linalg import mirror_

Features = int | tuple[int, ...] | list["Features"]  # n0, (C, H, W), (T, d), or per branch (a list)
Built = tuple[nn.Module, Features]  # a layer's torch module and the features it gives


TILE = 1 << 18  # pairs (of inputs and positions) of one block of kernels()
PAIRS_AT_LEAST = 16  # pairs of inputs of one block where each holds more than TILE / 16 (pooling on 28 x 28)


class LayerError(ValueError):
    """A composition that cannot work (names the layer; the face adds its position)."""


class Layer(ABC):
    """One layer (or combinator) of a composition."""

    name: str = "layer"
    weights: bool = False  # a weight layer (Dense): the readout the composition ends on
    needs_images: bool = False  # a layer of images' two spatial axes (Conv, AvgPool)
    needs_positions: bool = False  # of positions, images' or sequences' (GlobalAvgPool, Flatten, Attention)
    mixes_positions: bool = False  # needs the full spatial covariance (pooling): see state.Kernel

    @abstractmethod
    def kernel(self, k: State) -> State:
        """The kernel state after this layer."""

    @abstractmethod
    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        """(its torch module, the features it gives) on inputs of n_in features; a weight layer
        gives `width` features, or n_out when it is the readout (n_out > 0 only there)."""

    def __repr__(self) -> str:
        return self.name

    def kernels(
        self, X: torch.Tensor, X2: torch.Tensor | None = None, *, rows: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact limit of the composition ending here: (Sigma, Theta), each (N1, N2) float64
        (with the spatial axes where it ends on positions), of inputs X (N1, n0), images
        (N1, C, H, W) or sequences (N1, T, d), and X2 (None: X). rows=(r0, r1) of a Gram (X2
        None): only those rows, (r1 - r0, N1), of which the upper triangle and the diagonal are
        filled (ntkrun.linalg.mirror_ completes a Gram made of such rows); a whole Gram is
        computed on its upper triangle and mirrored.

        Computed in square blocks of about TILE pairs (positions included): every layer maps each
        pair on its own, and a block's temporaries stay small. Each block's inputs' own covariances
        are mapped with it, those of a column block once for all its rows (state.second)."""
        X = torch.as_tensor(X, dtype=torch.float64)
        Y = X if X2 is None else torch.as_tensor(X2, dtype=torch.float64)
        r0, r1 = rows if rows is not None else (0, X.shape[0])
        diagonal = X.dim() > 2 and not any(layer.mixes_positions for layer in self.walk())
        places = {2: 1, 3: X.shape[1]}.get(X.dim(), math.prod(X.shape[2:]))  # sequences' T, images' H W
        positions = places ** (1 if diagonal else 2)  # pairs of positions of one pair of inputs
        side = max(1, math.isqrt(max(TILE, PAIRS_AT_LEAST * positions) // positions))
        cols, step = min(Y.shape[0], side), max(1, TILE // (min(Y.shape[0], side) * positions))
        sigma = theta = torch.empty(0)
        for c0 in range(0, Y.shape[0], cols):
            c1 = min(c0 + cols, Y.shape[0])
            q2 = own_covariance(Y[c0:c1], diagonal)
            with second_inputs_once():
                for b0 in range(r0, r1, step):
                    b1 = min(b0 + step, r1)
                    if X2 is None and c1 <= b0 and sigma.dim() == 2:
                        continue  # below the diagonal: the mirror of a block above it
                    q1, at = own_covariance(X[b0:b1], diagonal), b0 - c0 if X2 is None else None
                    out = self.kernel(input_kernel(X[b0:b1], Y[c0:c1], q1, q2, at, diagonal))
                    if not isinstance(out, Kernel):
                        raise LayerError(f"the composition ends on {len(out)} branches: join them (FanInSum)")
                    if sigma.dim() == 1:
                        sigma = out.sigma.new_zeros((r1 - r0, Y.shape[0], *out.sigma.shape[2:]))
                        theta = torch.zeros_like(sigma)
                    sigma[b0 - r0 : b1 - r0, c0:c1] = out.sigma
                    theta[b0 - r0 : b1 - r0, c0:c1] = out.theta
        if X2 is None and rows is None and sigma.dim() == 2:
            mirror_(sigma, to_lower=True)
            mirror_(theta, to_lower=True)
        return sigma, theta

    def net(
        self,
        width: int,
        seed: int = 0,
        n_out: int = 1,
        *,
        n0: int | tuple[int, int, int],
        dtype: torch.dtype = torch.float32,
        parametrization: str = "ntk",
    ) -> nn.Module:
        """The finite network it describes on inputs of n0 numbers (or images of shape (C, H, W)):
        every weight layer `width` features (channels), the readout n_out, parameters N(0, 1)
        drawn from `seed`; (N, n0) -> (N,) for n_out 1, else (N, n_out). parametrization "ntk"
        (stax's), or "mup" (maximal_update_: the same draws)."""
        if not self.readout:
            raise LayerError(f"the composition ends on {self.last_name}: end it with a Dense readout")
        if parametrization not in ("ntk", "mup"):
            raise LayerError(f"parametrization {parametrization!r}: a composition's networks are ntk or mup")
        gen = torch.Generator().manual_seed(seed)
        module, _ = self.module(n0, width, n_out, gen)
        net = Net(module, n_out).to(dtype)
        net.composition = self
        if parametrization == "mup":
            maximal_update_(net, width)
        return net

    def walk(self) -> Iterator[Layer]:
        """This layer, then every layer it holds (a combinator's), depth first."""
        yield self
        for value in vars(self).values():
            for held in value if isinstance(value, tuple) else (value,):
                if isinstance(held, Layer):
                    yield from held.walk()

    @property
    def images(self) -> bool:
        """Whether the composition takes images (holds a layer of their two spatial axes)."""
        return any(layer.needs_images for layer in self.walk())

    @property
    def positions(self) -> bool:
        """Whether the composition takes inputs with positions (images or sequences)."""
        return any(layer.needs_images or layer.needs_positions for layer in self.walk())

    @property
    def readout(self) -> bool:
        """Whether the composition ends on a weight layer (the readout n_out applies to)."""
        return self.weights

    @property
    def last_name(self) -> str:
        return self.name


class Net(nn.Module):
    """A composition's network, with ntkrun's output convention: (N,) for one output."""

    def __init__(self, body: nn.Module, n_out: int) -> None:
        super().__init__()
        self.body, self.n_out = body, n_out
        self.composition: Layer | None = None  # the composition it was built from (Layer.net)
        # each parameter's learning-rate factor by name, where not 1 (muP: maximal_update_)
        self.lr_factors: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out.squeeze(-1) if self.n_out == 1 else out


def maximal_update_(net: Net, width: int) -> None:
    """The maximal-update parametrization (muP, Yang & Hu 2021, in ntkrun's NTK-parametrized form:
    docs/science.md §11.1, §12.5) of a composition's network, in place and from the same draws: the
    readout's multiplier divided by sqrt(width) (the MLP's 1/n), and every weight and bias moving
    with the learning rate lr * width but the readout's bias (lr). Yang & Hu's table defines it for
    Dense and Conv weights; a network holding any other parameter (attention's) is refused."""
    weighted = [m for m in net.modules() if hasattr(m, "lr_w")]
    owned = {id(p) for m in weighted for p in m.parameters()}
    if any(id(p) not in owned for p in net.parameters()):
        raise LayerError("muP is defined here for Dense and Conv weights only (attention has other scalings)")
    readout = weighted[-1]  # a composition ends on its readout: the last weight module built
    if not hasattr(readout, "w_scale"):
        raise LayerError("muP needs a Dense readout (flatten or pool a convolution's images first)")
    readout.w_scale /= math.sqrt(width)
    for m in weighted:
        m.lr_w, m.lr_b = float(width), float(width) if m is not readout else 1.0
    names = {id(p): name for name, p in net.named_parameters()}
    for m in weighted:
        net.lr_factors[names[id(m.weight)]] = m.lr_w
        if m.bias is not None:
            net.lr_factors[names[id(m.bias)]] = m.lr_b
