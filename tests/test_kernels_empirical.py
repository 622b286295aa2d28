from __future__ import annotations

import pytest
import torch
from conftest import jacobian_ntk

from ntkrun.kernels import empirical_nngp, empirical_ntk
from ntkrun.network import MLP

# Both sides are float64 sums of the same products in different orders: agreement to 1e-10
# relative leaves a margin of 10^5 over rounding (~1e-15) and would catch any wrong term.
TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_matches_per_sample_jacobians(depth, beta):
    widths = [7, 12, 5, 9][: depth - 1]  # non-equal hidden widths
    net = MLP(3, widths, depth, beta=beta, seed=depth, dtype=torch.float64)
    X = torch.randn(11, 3, dtype=torch.float64)
    assert rel_err(empirical_ntk(net, X), jacobian_ntk(net, X)) < TOL


@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "tanh", "gelu", "softplus", "identity"])
def test_every_nonlinearity_matches_per_sample_jacobians(nonlinearity):
    net = MLP(4, [10, 6, 8], 4, nonlinearity=nonlinearity, beta=0.1, seed=5, dtype=torch.float64)
    X, X2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    assert rel_err(empirical_ntk(net, X, X2), jacobian_ntk(net, X, X2)) < TOL


def test_per_layer_contributions_match_the_parameters_of_each_layer():
    net = MLP(3, [9, 4, 7], 4, beta=0.5, seed=1, dtype=torch.float64)
    X = torch.randn(8, 3, dtype=torch.float64)
    layers = empirical_ntk(net, X, per_layer=True)
    assert layers.shape == (4, 8, 8)
    assert rel_err(layers, jacobian_ntk(net, X, per_layer=True)) < TOL


@pytest.mark.parametrize("block_size", [1, 3, 4, 100])
def test_blocking_does_not_change_the_result(block_size):
    net = MLP(3, 16, 3, seed=0, dtype=torch.float64)
    X, X2 = torch.randn(10, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    full = jacobian_ntk(net, X)
    assert rel_err(empirical_ntk(net, X, block_size=block_size), full) < TOL
    assert rel_err(empirical_ntk(net, X, X2, block_size=block_size), jacobian_ntk(net, X, X2)) < TOL
    # a memory budget small enough to force one input per block
    assert rel_err(empirical_ntk(net, X, memory_budget=1), full) < TOL


def test_progress_reports_every_block_pair():
    net = MLP(2, 8, 3, seed=0)
    calls = []
    empirical_ntk(net, torch.randn(10, 2), block_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]  # 3 row blocks, upper triangle


def test_nngp_estimate_is_the_last_hidden_layer_kernel():
    net = MLP(3, [5, 6], 3, beta=0.2, seed=4, dtype=torch.float64)
    X = torch.randn(4, 3, dtype=torch.float64)
    a = net.forward_cache(X).acts[-1]
    assert torch.allclose(empirical_nngp(net, X), a @ a.T / 6 + 0.04, rtol=0, atol=1e-14)


def test_float32_and_float64_agree_to_float32_precision():
    X = torch.randn(12, 5, dtype=torch.float64)
    k64 = empirical_ntk(MLP(5, 64, 4, seed=9, dtype=torch.float64), X)
    k32 = empirical_ntk(MLP(5, 64, 4, seed=9, dtype=torch.float32), X)
    assert k32.dtype == torch.float32
    assert rel_err(k32.double(), k64) < 1e-5  # float32 epsilon 1.2e-7 times sums of ~100 terms


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (torch.zeros(0, 3), "N = 0"),
        (torch.tensor([[1.0, float("nan"), 0.0]]), "NaN"),
        (torch.zeros(4, 2), "shape"),
        (torch.zeros(4), "shape"),
    ],
)
def test_bad_inputs_raise_value_error(X, message):
    with pytest.raises(ValueError, match=message):
        empirical_ntk(MLP(3, 4, 2), X)
