"""The MLP and the CNN are compositions of ntkrun.layers (issue 34, item 3): each description's
`layer_list` parses to a composition with its exact kernels (to 1e-13, closed forms and
quadrature alike), and any composition of the CNN's shape computes its kernels by the CNN's
pixel-pair recursion (its fast path), equal to the layers' own recursion to 1e-13."""

from __future__ import annotations

import itertools

import pytest
import torch

from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.architectures.layers import LayersArchitecture, as_json, hand_written
from ntkrun.architectures.mlp import MLPArchitecture
from ntkrun.layers.parse import parse

# float64 recursions of the same closed forms (or the same quadrature nodes) in another order of
# operations: a few ulps per layer, far below 1e-13
RTOL = 1e-13


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize(
    "depth,nonlinearity,beta",
    list(itertools.product([1, 2, 4], ["relu", "erf", "gelu", "tanh", "softplus", "identity"], [0.0, 0.7])),
)
def test_the_mlp_is_its_layer_list(depth, nonlinearity, beta):
    torch.manual_seed(depth)
    X, X2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    mlp = MLPArchitecture((5,), depth, nonlinearity, beta)
    sigma, theta = parse(mlp.layer_list).kernels(X, X2)
    want = mlp.kernels(X, X2, kinds=("nngp", "ntk"))
    assert close(sigma, want[0]) < RTOL and close(theta, want[1]) < RTOL


@pytest.mark.parametrize(
    "padding,readout,kernel_size,nonlinearity",
    list(itertools.product(["same", "valid", "circular"], ["flatten", "gap"], [1, 3], ["relu", "erf"])),
)
def test_the_cnn_is_its_layer_list(padding, readout, kernel_size, nonlinearity):
    torch.manual_seed(kernel_size)
    X, X2 = torch.randn(5, 2 * 5 * 5, dtype=torch.float64), torch.randn(3, 2 * 5 * 5, dtype=torch.float64)
    cnn = CNNArchitecture(
        (2, 5, 5), 3, nonlinearity, 0.1, kernel_size=kernel_size, padding=padding, readout=readout
    )
    sigma, theta = parse(cnn.layer_list).kernels(cnn.inputs(X), cnn.inputs(X2))
    want = cnn.kernels(X, X2, kinds=("nngp", "ntk"))
    assert close(sigma, want[0]) < RTOL and close(theta, want[1]) < RTOL


def test_a_composition_of_the_cnns_shape_takes_its_recursion():
    """Written by hand with other options (5x5 valid, erf, b_std 0.3, global average pooling), it is
    recognized; one option off the CNN's (a W_std, two nonlinearities, pooling) and it is not."""
    conv = {"conv": {"kernel_size": 5, "padding": "valid", "b_std": 0.3}}
    layers = [conv, "erf", conv, "erf", "global_avg_pool", {"dense": {"b_std": 0.3}}]
    found = hand_written(as_json(layers), (2, 12, 12))
    assert found == CNNArchitecture((2, 12, 12), 3, "erf", 0.3, kernel_size=5, padding="valid", readout="gap")
    assert hand_written(as_json("cnn"), (1, 8, 8)) == CNNArchitecture((1, 8, 8), 4)
    for other in (
        [{"conv": {"W_std": 2.0}}, "relu", "flatten", "dense"],
        ["conv", "relu", "conv", "erf", "flatten", "dense"],
        ["conv", "relu", "avg_pool", "flatten", "dense"],
        [{"conv": {"b_std": 0.2}}, "relu", "flatten", "dense"],  # the readout's b_std differs
        "myrtle5",
    ):
        assert hand_written(as_json(other), (1, 28, 28)) is None, other
    described = LayersArchitecture((2, 12, 12), 3, layers=as_json(layers))
    X = torch.randn(5, 2 * 12 * 12, dtype=torch.float64)
    sigma, theta = described.kernels(X, kinds=("nngp", "ntk"))
    own = described.model.kernels(described.inputs(X))
    assert close(sigma, own[0]) < RTOL and close(theta, own[1]) < RTOL
    out = torch.zeros(5, 5, dtype=torch.float64)  # a Gram in row blocks, as runners/grams.py fills it
    for rows in ((0, 2), (2, 5)):
        described.kernel(X, kind="ntk", out=out, rows=rows)
    # row blocks may take other BLAS kernels than the whole (AVX2 vs AVX-512): equal to rounding
    torch.testing.assert_close(out.triu(), theta.triu(), rtol=RTOL, atol=0)
    assert described.kernel(X, kind="ntk", rows=(1, 3)).shape == (2, 5)  # a block, as the layers' path
