"""Compositions as data: the YAML list of a spec's `network.layers` -> one Layer.

    [dense, relu, {residual: [relu, dense]}, layer_norm, relu, dense]
    [{conv: {kernel_size: 5, padding: valid}}, relu, flatten, dense]

An item is a layer's name (its options at their defaults), or a one-key mapping of the name to its
options (a mapping of keyword to value, or a single value for a layer of one option:
{leaky_relu: 0.1}, {avg_pool: 2}). Combinators take items: {residual: [items]} is x + branch(x),
{serial: [items]}, {concat: [[items], [items]]} and {parallel: [[items], ...]} take one list of
items per branch. Any nonlinearity of ntkrun's library is a layer of its name (quadrature where it
has no closed form). A whole list may also be the name of one of NAMED (`resmlp`, `myrtle5`, ...).
Errors are LayerErrors naming the item's position (1-based, nested as "layer 3 (residual): layer
2 ..."), raised before any kernel is computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ntkrun.layers.activations import Abs, Activation, Erf, Gelu, Identity, LeakyRelu, Relu, Softplus, Tanh
from ntkrun.layers.attention import Attention
from ntkrun.layers.base import Layer, LayerError
from ntkrun.layers.combinators import FanInConcat, FanInSum, FanOut, concat, parallel, residual, serial
from ntkrun.layers.dense import Dense
from ntkrun.layers.normalization import LayerNorm
from ntkrun.layers.spatial import AvgPool, Conv, Flatten, GlobalAvgPool
from ntkrun.nonlinearities import NONLINEARITIES

LAYERS: dict[str, Callable[..., Layer]] = {
    "dense": Dense, "conv": Conv, "avg_pool": AvgPool, "global_avg_pool": GlobalAvgPool,
    "flatten": Flatten, "layer_norm": LayerNorm, "relu": Relu, "leaky_relu": LeakyRelu, "abs": Abs,
    "erf": Erf, "gelu": Gelu, "tanh": Tanh, "softplus": Softplus, "identity": Identity,
    "fan_out": FanOut, "fan_in_sum": FanInSum, "fan_in_concat": FanInConcat, "attention": Attention,
}  # fmt: skip
BRANCHING = {"concat": concat, "parallel": parallel}  # a list of items per branch
SERIAL = {"residual": residual, "serial": serial}  # a list of items

_RELU_BLOCK: list[Any] = ["dense", "relu"]
NAMED: dict[str, list[Any]] = {
    # the paper's MLP of depth 4 (network.arch mlp, beta 0.1): the same kernels
    "mlp": [*_RELU_BLOCK * 3, "dense"],
    # two residual ReLU blocks (stax's ResNet pattern, pre-activation) between an embedding and the readout
    "resmlp": ["dense", {"residual": ["relu", "dense"]}, {"residual": ["relu", "dense"]}, "relu", "dense"],
    # LayerNorm before each nonlinearity
    "lnmlp": ["dense", *["layer_norm", "relu", "dense"] * 3],
    # the CNN of network.arch cnn, depth 4: three 3x3 'same' convolutions, flattened into the readout
    "cnn": [{"conv": {"kernel_size": 3}}, "relu"] * 3 + ["flatten", "dense"],
    # Shankar et al. 2020's Myrtle-5 on 28x28 images: pooling to 3x3, then global average pooling
    "myrtle5": ["conv", "relu", "conv", "relu", "avg_pool", "conv", "relu", "avg_pool", "conv", "relu",
                "avg_pool", "global_avg_pool", "dense"],
}  # fmt: skip


def names() -> list[str]:
    """Every layer name an item may give."""
    return sorted({*LAYERS, *BRANCHING, *SERIAL, *NONLINEARITIES})


def parse(items: Any) -> Layer:
    """A spec's network.layers (a list of items, or a name of NAMED) -> serial(...) of its layers.
    LayerError naming the first item that is not a layer."""
    if isinstance(items, str):
        if items not in NAMED:
            raise LayerError(
                f"{items!r} names no composition (named ones: {', '.join(NAMED)}); or give a list"
            )
        items = NAMED[items]
    return serial(*_items(items))


def depth(items: Any) -> int:
    """The weight layers of a composition (its Dense, Conv and Attention, in every branch): its
    depth, as a table or a figure names it."""
    return sum(1 for layer in parse(items).walk() if layer.name in ("dense", "conv", "attention"))


def caption(items: Any) -> str:
    """A composition as a figure names it: its name, or its layers."""
    return items if isinstance(items, str) else repr(parse(items)).removeprefix("serial(").removesuffix(")")


def _items(items: Any) -> list[Layer]:
    if not isinstance(items, list) or not items:
        raise LayerError(f"expected a non-empty list of layers, got {items!r}")
    layers = []
    for i, item in enumerate(items):
        try:
            layers.append(_item(item))
        except LayerError as err:
            name = (
                item
                if isinstance(item, str)
                else next(iter(item))
                if isinstance(item, dict) and item
                else None
            )
            where = (
                f"layer {i + 1} ({name})" if isinstance(name, str) and name in names() else f"layer {i + 1}"
            )
            raise LayerError(f"{where}: {err}".replace(f"({name}): {name}: ", f"({name}): ")) from None
    return layers


def _item(item: Any) -> Layer:
    if isinstance(item, str):
        name, options = item, None
    elif isinstance(item, dict) and len(item) == 1:
        name, options = next(iter(item.items()))
    else:
        raise LayerError(f"{item!r} is not a layer: a name, or a mapping of one name to its options")
    if not isinstance(name, str) or name not in names():
        raise LayerError(f"unknown layer {name!r} (layers: {', '.join(names())})")
    if name in SERIAL:
        return SERIAL[name](*_items(options))
    if name in BRANCHING:
        if not isinstance(options, list) or not options:
            raise LayerError(f"{name}: expected a list of branches (each a list of layers)")
        branches = []
        for j, branch in enumerate(options):
            try:
                branches.append(serial(*_items(branch if isinstance(branch, list) else [branch])))
            except LayerError as err:
                raise LayerError(f"{name}: branch {j + 1}: {err}") from None
        return BRANCHING[name](*branches)
    factory = LAYERS.get(name) or (lambda: Activation(name))
    return _build(name, factory, options)


def _build(name: str, factory: Callable[..., Layer], options: Any) -> Layer:
    """factory(**options), or factory(value) for a layer of one option; LayerError naming what
    it does not take."""
    accepted = list(inspect.signature(factory).parameters)
    if options is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(options, dict):
        unknown = [key for key in options if key not in accepted]
        if unknown:
            takes = f"its options: {', '.join(accepted)}" if accepted else "it has no options"
            raise LayerError(f"{name}: unknown option {unknown[0]!r} ({takes})")
        kwargs = dict(options)
    elif len(accepted) >= 1 and not isinstance(options, list):
        kwargs = {accepted[0]: options}
    else:
        raise LayerError(
            f"{name}: options {options!r} are not a mapping of its options ({', '.join(accepted)})"
        )
    for key, value in kwargs.items():
        if isinstance(value, (list, dict)) or (value is None and key != "stride"):
            raise LayerError(f"{name}: option {key} = {value!r} is not a number or a name")
    try:
        return factory(**kwargs)
    except LayerError as err:
        raise LayerError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise LayerError(f"{name}: {err}") from None
