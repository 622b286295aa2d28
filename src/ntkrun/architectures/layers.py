"""A composition of ntkrun.layers (`network.layers`) as an architecture description.

Its finite network is the composition's `net`, its limit the composition's exact `kernels` (one
recursion gives Sigma and Theta: JOINT_KERNELS), its network's FLOPs and bytes measured on one
network (ProbedArchitecture). A composition holding a layer of positions (Conv, pooling, Flatten,
Attention) takes each point as an image (C, H, W) or a sequence (T, d) of input_shape; any other
takes it flattened, as a vector of n0.
Built from the spec's list, it is tried at once on one input of that shape, so that a composition
that cannot work on it (a nonlinearity after a nonlinearity, pooling past a pixel, images into a
vector-only layer, no readout) is one line before anything runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import nn

from ntkrun.architectures.base import Architecture, place_rows
from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.architectures.probed import ProbedArchitecture
from ntkrun.layers.activations import Activation
from ntkrun.layers.base import PAIRS_AT_LEAST, TILE, Layer, LayerError
from ntkrun.layers.parse import parse
from ntkrun.layers.spatial import Conv
from ntkrun.spec import NONLINEARITY_NAMES

ENTRY_FLOPS = 40.0  # per pair of (input, position) pairs and layer: the closed forms' arithmetic


@lru_cache(maxsize=32)
def composition(layers: str) -> Layer:
    """The Layer of a network.layers given as JSON (the description's hashable field)."""
    return parse(json.loads(layers))


def as_json(layers: Any) -> str:
    """A spec's network.layers (a list, or a name) -> its canonical JSON."""
    return json.dumps(layers, sort_keys=True, separators=(",", ":"))


def signature(layer: Any) -> Any:
    """What a parsed layer computes, comparable: its kind and options (W_std, b_std, k, padding,
    alpha, the nonlinearity's name), its sublayers' signatures; two lists that parse to equal
    signatures are one network ("dense" and {"dense": {"b_std": 0.1}} alike)."""
    if isinstance(layer, Layer):
        own = {k: v for k, v in vars(layer).items() if k not in ("phi", "expect")}
        return (type(layer).__name__, tuple(sorted((k, signature(v)) for k, v in own.items())))
    if isinstance(layer, (list, tuple)):
        return tuple(signature(item) for item in layer)
    return layer


@lru_cache(maxsize=32)
def hand_written(layers: str, input_shape: tuple[int, ...]) -> Architecture | None:
    """The CNN description (ntkrun.architectures.conv) whose layer list the composition is on these
    images, else None: its pixel-pair recursion gives the same kernels (to 1e-13) in about half the
    time of the layers' (benchmarks/bench_layers.py), so any composition of that shape uses it."""
    model = composition(layers)
    items = list(getattr(model, "layers", []))
    if len(input_shape) != 3 or len(items) < 3 or not isinstance(items[0], Conv):
        return None
    names = {layer.name for layer in items if isinstance(layer, Activation)}
    readout = {"Flatten": "flatten", "GlobalAvgPool": "gap"}.get(type(items[-2]).__name__)
    if len(names) != 1 or readout is None or not (names <= set(NONLINEARITY_NAMES)):
        return None
    first = items[0]
    try:
        cnn = CNNArchitecture(
            input_shape, (len(items) - 2) // 2 + 1, names.pop(), first.b_std,
            kernel_size=first.k, padding=first.padding, readout=readout,
        )  # fmt: skip
    except ValueError:
        return None
    return cnn if signature(parse(cnn.layer_list)) == signature(model) else None


@dataclass(frozen=True)
class LayersArchitecture(ProbedArchitecture):
    """The composition `layers` (JSON of the spec's list) on inputs of input_shape."""

    layers: str = '"mlp"'
    name: ClassVar[str] = "layers"
    JOINT_KERNELS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        model, shape = composition(self.layers), tuple(self.input_shape)
        if model.images and len(shape) != 3:
            first = next(layer.name for layer in model.walk() if layer.needs_images)
            what = f"vectors of {self.n0}" if len(shape) == 1 else f"sequences {shape}"
            raise LayerError(f"{first} needs images (C, H, W); these inputs are {what}")
        if model.positions and len(shape) == 1:
            first = next(layer.name for layer in model.walk() if layer.needs_positions)
            raise LayerError(
                f"{first} needs positions (images, sequences); these inputs are vectors of {self.n0}"
            )
        if not model.readout:
            raise LayerError(f"the composition ends on {model.last_name}: end it with a dense readout")
        x = self.inputs(torch.ones(1, self.n0, dtype=torch.float64))
        sigma, _ = model.kernels(x)  # every layer's transformation, on one input of this shape
        if sigma.dim() > 2:
            raise LayerError("the composition ends on images: flatten or global_avg_pool before the readout")
        # and its finite network (muP: Dense and Conv weights only)
        model.net(2, 0, 1, n0=self.features, dtype=torch.float64, parametrization=self.parametrization)(x)

    @property
    def model(self) -> Layer:
        return composition(self.layers)

    @property
    def features(self) -> int | tuple[int, ...]:
        """What the composition's first layer takes: n0 numbers, images (C, H, W), sequences (T, d)."""
        return tuple(self.input_shape) if self.model.positions else self.n0

    def inputs(self, X: torch.Tensor) -> torch.Tensor:
        if composition(self.layers).positions:
            return X.reshape(X.shape[0], *self.input_shape)
        return X.reshape(X.shape[0], -1)

    def net(
        self, width: int, seed: int, *, dtype: torch.dtype, device: torch.device | str, n_out: int = 1
    ) -> nn.Module:
        return self.model.net(
            width, seed, n_out, n0=self.features, dtype=dtype, parametrization=self.parametrization
        ).to(device)

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
        """Sigma ("nngp") and Theta ("ntk") from one pass of the composition; with rows=(r0, r1), rows
        r0 .. r1 of a symmetric Gram, their upper triangle and diagonal (into `outs`, whole Grams or
        (r1 - r0, N) blocks, or returned as blocks; runners/grams.py mirrors the whole)."""
        for kind in kinds:
            self.check_kernel(kind)
        fast = hand_written(self.layers, tuple(self.input_shape))
        if fast is not None:
            return fast.kernels(X, X2, kinds=kinds, out_dtype=out_dtype, outs=outs, rows=rows)
        sigma, theta = self.model.kernels(self.inputs(X), None if X2 is None else self.inputs(X2), rows=rows)
        return place_rows([(theta if kind == "ntk" else sigma) for kind in kinds], outs, rows, out_dtype)

    @property
    def positions(self) -> int:
        """Positions of one input (images' pixels, sequences' T) where the composition takes them, else 1."""
        if not self.model.positions:
            return 1
        return math.prod(self.input_shape[1:]) if len(self.input_shape) == 3 else self.input_shape[0]

    @property
    def entries(self) -> int:
        """Numbers of one pair of inputs' kernel: 1 for vectors, each position with each (pooling,
        attention) or with itself (docs/science.md §12.7)."""
        mixes = any(layer.mixes_positions for layer in self.model.walk())
        return self.positions ** (2 if mixes else 1)

    def kernel_flops(self, n1: int, n2: int) -> float:
        """The inputs' products, then about ENTRY_FLOPS per entry (at the input's resolution: an
        overcount after pooling) and layer."""
        fast = hand_written(self.layers, tuple(self.input_shape))
        if fast is not None:
            return fast.kernel_flops(n1, n2)
        layers = sum(1 for _ in self.model.walk())
        return 2.0 * n1 * n2 * self.n0 + ENTRY_FLOPS * layers * n1 * n2 * self.entries

    def kernel_bytes(self, n1: int, n2: int) -> int:
        """Sigma and Theta, and a block's temporaries (about 32 of its size; a block holds at least
        PAIRS_AT_LEAST pairs of inputs)."""
        fast = hand_written(self.layers, tuple(self.input_shape))
        if fast is not None:
            return fast.kernel_bytes(n1, n2)
        return 2 * n1 * n2 * 8 + 32 * 8 * max(TILE, PAIRS_AT_LEAST * self.entries)
