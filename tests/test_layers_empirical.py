"""The empirical NTK of a composition's network by its weight layers' structure
(ntkrun.kernels.layers_empirical) against the generic path's per-sample Jacobians (torch.func) of
the same network: equal to rounding (1e-12 relative, float64), for one and several outputs, traced
or not, a Gram and a cross block, in one block or many; attention's parameters take the generic
path."""

from __future__ import annotations

import pytest
import torch

import ntkrun.layers as nl
from ntkrun.kernels import empirical_ntk
from ntkrun.kernels.generic import generic_ntk
from ntkrun.kernels.layers_empirical import layers_empirical_ntk, structured

CASES = {
    "resmlp": (
        nl.serial(nl.Dense(), nl.residual(nl.Relu(), nl.Dense()), nl.LayerNorm(), nl.Relu(),
                  nl.concat(nl.Dense(), nl.Dense(b_std=0.0)), nl.Dense(), nl.Erf(), nl.Dense()),
        (7, 5),
    ),
    "cnn": (  # every padding, pooling, a Dense on the channels of images, flatten
        nl.serial(nl.Conv(3, "same"), nl.Relu(), nl.Conv(3, "circular", b_std=0.3), nl.Relu(), nl.AvgPool(2),
                  nl.Conv(3, "valid"), nl.Relu(), nl.Dense(), nl.Relu(), nl.Flatten(), nl.Dense()),
        (6, 2, 8, 8),
    ),
    "sequences": (
        nl.serial(nl.Dense(), nl.Relu(), nl.Dense(), nl.Tanh(), nl.GlobalAvgPool(), nl.Dense()),
        (5, 4, 3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("trace", [False, True])
def test_the_structured_path_is_the_jacobians(name: str, n_out: int, trace: bool) -> None:
    model, shape = CASES[name]
    n0 = shape[1] if len(shape) == 2 else shape[1:]
    net = model.net(16, seed=1, n_out=n_out, n0=n0, dtype=torch.float64)
    assert structured(net)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    X2 = torch.randn(3, *shape[1:], generator=g, dtype=torch.float64)
    for other, budget in ((None, 2**30), (X2, 2**30), (None, 4000), (X2, 4000)):  # 4000 bytes: blocks of 1
        ours = layers_empirical_ntk(net, X, other, trace_outputs=trace, memory_budget=budget)
        theirs = generic_ntk(net, X, other, trace_outputs=trace)
        if n_out == 1 and theirs.dim() == 4:
            theirs = theirs[..., 0, 0]
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * float(theirs.abs().max()))
        routed = empirical_ntk(net, X, other, trace_outputs=trace, memory_budget=budget)
        torch.testing.assert_close(routed, ours, rtol=0, atol=0)  # empirical_ntk routes it here


def test_attention_takes_the_generic_path() -> None:
    model = nl.serial(nl.Dense(), nl.Relu(), nl.Attention(), nl.Relu(), nl.GlobalAvgPool(), nl.Dense())
    net = model.net(8, n0=(4, 3), dtype=torch.float64)
    assert not structured(net)
    X = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(empirical_ntk(net, X), generic_ntk(net, X), rtol=0, atol=0)
