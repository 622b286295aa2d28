"""ntkrun.layers: compose a network from layers and get its exact infinite-width limit.

    import ntkrun.layers as nl
    model = nl.serial(nl.Dense(), nl.Relu(), nl.residual(nl.Relu(), nl.Dense()),
                      nl.LayerNorm(), nl.Relu(), nl.Dense())
    sigma, theta = model.kernels(X)              # the exact limit, float64 (N1, N2)
    net = model.net(width=512, seed=0, n0=X.shape[1])   # the finite torch module it describes

neural-tangents' stax semantics and names (NTK parametrization, W_std and b_std as there); each
layer's kernel transformation is in docs/science.md §12. Inputs: vectors (N, n0), images
(N, C, H, W) or sequences (N, T, d).
"""

from ntkrun.layers.activations import Abs, Activation, Erf, Gelu, Identity, LeakyRelu, Relu, Softplus, Tanh
from ntkrun.layers.attention import Attention
from ntkrun.layers.base import Layer, LayerError
from ntkrun.layers.combinators import FanInConcat, FanInSum, FanOut, concat, parallel, residual, serial
from ntkrun.layers.dense import Dense
from ntkrun.layers.lift import Lifted, from_torch
from ntkrun.layers.normalization import LayerNorm
from ntkrun.layers.spatial import AvgPool, Conv, Flatten, GlobalAvgPool

__all__ = [
    "Abs",
    "Activation",
    "Attention",
    "AvgPool",
    "Conv",
    "Dense",
    "Erf",
    "FanInConcat",
    "FanInSum",
    "FanOut",
    "Flatten",
    "Gelu",
    "GlobalAvgPool",
    "Identity",
    "Layer",
    "LayerError",
    "LayerNorm",
    "LeakyRelu",
    "Lifted",
    "Relu",
    "Softplus",
    "Tanh",
    "concat",
    "from_torch",
    "parallel",
    "residual",
    "serial",
]  # fmt: skip
