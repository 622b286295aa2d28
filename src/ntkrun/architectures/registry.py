"""The architectures ntkrun knows, by the name `network.arch` gives them, and `describe`, which
builds one's description from a spec's network block and the shape of one input."""

from __future__ import annotations

from typing import Any

from ntkrun.architectures.base import Architecture
from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.architectures.layers import LayersArchitecture, as_json
from ntkrun.architectures.mlp import MLPArchitecture
from ntkrun.architectures.module import ModuleArchitecture

ARCHITECTURES: dict[str, type[Architecture]] = {a.name: a for a in (MLPArchitecture, CNNArchitecture)}
# the network block's keys each architecture takes beyond the shared ones (depth, nonlinearity, ...)
OWN_KEYS: dict[str, tuple[str, ...]] = {"mlp": (), "cnn": ("kernel_size", "padding", "readout")}


def kind(network: Any) -> type[Architecture]:
    """The description class of a spec's network block: what a runner asks before it has data."""
    if getattr(network, "layers", None) is not None:
        return LayersArchitecture
    if getattr(network, "module", None) is not None:
        return ModuleArchitecture
    return ARCHITECTURES[getattr(network, "arch", "mlp")]


def describe(
    network: Any, input_shape: tuple[int, ...], depth: int | None = None, limit: Any = None
) -> Architecture:
    """The description of a spec's `network` block (a NetworkSpec, or any object with its fields:
    arch, depth, nonlinearity, beta, parametrization and the architecture's own keys) on inputs of
    `input_shape`; `depth` overrides network.depth. A `network.module` (the user's own model) is
    described by ModuleArchitecture, its Monte-Carlo limit by the spec's `limit` (a MonteCarloSpec;
    its width defaults to the largest network.width); a `network.layers` by LayersArchitecture (its
    list replaces depth, arch and nonlinearity). ValueError for a geometry that cannot work."""
    depth = network.depth if depth is None else depth
    if getattr(network, "layers", None) is not None:
        try:
            return LayersArchitecture(tuple(input_shape), depth, layers=as_json(network.layers))
        except ValueError as err:
            raise ValueError(f"layers: {err}") from None
    if getattr(network, "module", None) is not None:
        widths = network.width if isinstance(network.width, list) else [network.width]
        limit_width = getattr(limit, "limit_width", None) or max(widths)
        return ModuleArchitecture(
            tuple(input_shape), depth, module=network.module, limit_width=limit_width,
            mc_samples=getattr(limit, "mc_samples", 32),
        )  # fmt: skip
    arch = getattr(network, "arch", "mlp")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    own = {key: getattr(network, key) for key in OWN_KEYS[arch]}
    return ARCHITECTURES[arch](
        input_shape=tuple(input_shape), depth=depth,
        nonlinearity=network.nonlinearity, beta=network.beta,
        parametrization=getattr(network, "parametrization", "ntk"), **own,
    )  # fmt: skip
