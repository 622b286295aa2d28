"""Architecture descriptions (ntkrun/architectures): each gives its network, its limit and its cost
consistently with the modules and kernel functions it wraps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ntkrun.architectures.cnn import CNN
from ntkrun.architectures.registry import describe
from ntkrun.kernels import analytic_kernels
from ntkrun.linalg import mirror_
from ntkrun.network import MLP


def network(**kw: object) -> SimpleNamespace:
    base = {"arch": "mlp", "depth": 3, "nonlinearity": "relu", "beta": 0.1, "parametrization": "ntk",
            "kernel_size": 3, "padding": "same", "readout": "flatten"}  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_a_description_gives_its_network_and_its_limit_row_block_by_row_block(arch):
    """net() is the module of that architecture with the spec's fields; kernel() in row blocks
    (upper triangle, then mirrored) equals the whole Gram and `ntkrun.analytic_kernels`."""
    description = describe(network(arch=arch, padding="circular" if arch == "cnn" else "same"), (1, 5, 5))
    net = description.net(4, seed=3, dtype=torch.float64, device="cpu", n_out=2)
    assert isinstance(net, CNN if arch == "cnn" else MLP)
    X = torch.randn(7, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert net(description.inputs(X)).shape == (7, 2)
    for kind, index in (("ntk", 1), ("nngp", 0)):
        whole = description.kernel(X, kind=kind)
        blocks = torch.zeros(7, 7, dtype=torch.float64)
        for rows in ((0, 3), (3, 5), (5, 7)):
            description.kernel(X, kind=kind, out=blocks, rows=rows)
        mirror_(blocks, to_lower=True)
        assert torch.allclose(blocks, whole, rtol=1e-13, atol=0)
        extra = {"arch": "cnn", "padding": "circular"} if arch == "cnn" else {}
        ref = analytic_kernels(description.inputs(X), depth=3, **extra)[index]
        assert torch.allclose(whole, ref, rtol=1e-13, atol=0)
        cross = description.kernel(X[:2], X[2:], kind=kind)
        assert torch.allclose(cross, whole[:2, 2:], rtol=1e-12, atol=0)


def test_the_cnn_cost_model_is_the_modules():
    description = describe(network(arch="cnn", padding="valid"), (2, 9, 9))
    net = description.net(6, seed=0, dtype=torch.float32, device="cpu", n_out=3)
    assert description.forward_flops(6, n_out=3) == sum(net.forward_flops())
    assert description._params(6, 3) == net.n_params
    assert description.gd_flops(10, 6, 3) == 3 * 10 * description.forward_flops(6, 3)


@pytest.mark.parametrize(
    ("kw", "shape", "message"),
    [
        ({"arch": "resnet"}, (1, 4, 4), "arch must be one of mlp, cnn"),
        ({"arch": "cnn"}, (16,), r"a CNN takes images \(C, H, W\)"),
        ({"arch": "cnn", "padding": "valid", "kernel_size": 5}, (1, 4, 4), "shrinks the 4x4 image"),
        ({"arch": "cnn", "readout": "max"}, (1, 4, 4), "readout must be one of flatten, gap"),
    ],
)
def test_a_geometry_that_cannot_work_is_one_value_error(kw, shape, message):
    with pytest.raises(ValueError, match=message):
        describe(network(**kw), shape)


def test_a_description_refuses_a_limit_it_does_not_have():
    description = describe(network(parametrization="standard"), (4,))
    X = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="standard parametrization has no width-independent limit"):
        description.kernel(X)
    with pytest.raises(ValueError, match="kind must be one of ntk, nngp"):
        describe(network(), (4,)).kernel(X, kind="gp")


LAYERS = '["conv", "relu", "avg_pool", "flatten", "dense"]'  # no fast path: the layers' own


@pytest.mark.parametrize("kind", ["mlp", "cnn", "layers"])
def test_a_row_block_alone_is_those_rows_of_the_gram_bit_for_bit(kind):
    """rows=(r0, r1) into an (r1 - r0, N) block (what a Gram-block unit holds: never the whole Gram),
    or returned alone, is exactly the same rows written into a whole (N, N) Gram: the same tiles."""
    from ntkrun.architectures.layers import LayersArchitecture

    if kind == "layers":
        description = LayersArchitecture((1, 6, 6), 2, layers=LAYERS)
    else:
        description = describe(network(arch=kind), (1, 6, 6))
    X = torch.randn(9, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = [torch.full((9, 9), float("nan"), dtype=torch.float64) for _ in range(2)]
    for rows in ((0, 4), (4, 9)):
        description.kernels(X, kinds=("ntk", "nngp"), outs=whole, rows=rows)
    for rows in ((0, 4), (2, 7), (4, 9)):
        r0, r1 = rows
        blocks = [torch.full((r1 - r0, 9), float("nan"), dtype=torch.float64) for _ in range(2)]
        description.kernels(X, kinds=("ntk", "nngp"), outs=blocks, rows=rows)
        alone = description.kernels(X, kinds=("ntk", "nngp"), rows=rows)
        upper = torch.ones(r1 - r0, 9, dtype=torch.bool).triu(r0)  # the rows' upper triangle
        for W, B, A in zip(whole, blocks, alone, strict=True):
            assert B.shape == A.shape == (r1 - r0, 9)
            assert torch.equal(B[upper], W[r0:r1][upper]) and torch.equal(A[upper], W[r0:r1][upper])
