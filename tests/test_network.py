from __future__ import annotations

import math

import pytest
import torch

from ntkrun.kernels import empirical_ntk
from ntkrun.network import MLP, gd_step, hidden_widths, mse_cost


def test_depth_one_is_the_linear_model():
    net = MLP(3, [], 1, beta=0.5, seed=0, dtype=torch.float64)
    X = torch.randn(5, 3, dtype=torch.float64)
    W, b = net.weights[0], net.biases[0]
    expected = (X @ W.T / math.sqrt(3) + 0.5 * b)[:, 0]
    assert torch.allclose(net(X), expected, rtol=0, atol=1e-14)


def test_forward_matches_the_definition_layer_by_layer():
    net = MLP(4, [6, 3], 3, nonlinearity="tanh", beta=0.1, seed=2, dtype=torch.float64)
    X = torch.randn(7, 4, dtype=torch.float64)
    a = X
    for l in range(3):
        z = a @ net.weights[l].T / math.sqrt(net.sizes[l]) + 0.1 * net.biases[l]
        a = torch.tanh(z)
    assert torch.allclose(net(X), z[:, 0], rtol=0, atol=1e-14)


def test_same_seed_same_network_and_parameters_are_standard_normal():
    a, b = MLP(10, 300, 3, seed=7), MLP(10, 300, 3, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    w = a.weights[1].detach()
    # 90000 iid N(0,1) draws: mean within 5 standard errors of 0, variance within 5 SE of 1.
    assert abs(w.mean().item()) < 5 / math.sqrt(w.numel())
    assert abs(w.var().item() - 1) < 5 * math.sqrt(2 / w.numel())


def test_hidden_widths_validation():
    assert hidden_widths(5, 3) == [5, 5]
    with pytest.raises(ValueError, match="needs 2 hidden widths"):
        hidden_widths([5], 3)
    with pytest.raises(ValueError, match="depth"):
        hidden_widths(5, 0)
    with pytest.raises(ValueError, match="shape"):
        MLP(3, 4, 2)(torch.zeros(2, 5))


@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "gelu"])
def test_gd_step_equals_autograd_gradient_descent(nonlinearity):
    net = MLP(3, [8, 5], 3, nonlinearity=nonlinearity, beta=0.3, seed=1, dtype=torch.float64)
    ref = MLP(3, [8, 5], 3, nonlinearity=nonlinearity, beta=0.3, seed=1, dtype=torch.float64)
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    loss = mse_cost(ref(X), y)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.7 * p.grad
    cost = gd_step(net, X, y, lr=0.7)
    assert cost.item() == pytest.approx(loss.item(), rel=1e-14)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-13)


def test_one_small_step_moves_f_by_minus_eta_over_n_theta_residual():
    """f_{t+eta} - f_t = -eta/N Theta (f - y) + O(eta^2): the error must shrink like eta^2."""
    X, y = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    errors, relative = [], []
    for eta in (1e-3, 5e-4):
        net = MLP(2, 64, 4, seed=3, dtype=torch.float64)
        f0 = net(X).detach()
        predicted = -eta / 10 * empirical_ntk(net, X) @ (f0 - y)
        gd_step(net, X, y, eta)
        change = net(X).detach() - f0
        errors.append((change - predicted).norm())
        relative.append(errors[-1] / predicted.norm())
    assert relative[0] < 1e-3  # the first-order term explains the change
    assert 3.5 < errors[0] / errors[1] < 4.5  # and the remainder is second order: halving eta quarters it


@pytest.mark.parametrize(("parametrization", "n_out"), [("ntk", 1), ("standard", 3)])
def test_autograd_gd_step_equals_the_hand_written_mlp_step(parametrization, n_out):
    """One GD semantics: the MLP's hand-written backward pass and autograd's (the path of every
    other architecture) move every parameter alike, to 1e-12 in float64, over 5 steps."""
    from ntkrun.network import autograd_gd_step, mlp_gd_step

    X = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(12, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).squeeze(1)
    y = y if n_out > 1 else y.reshape(12)
    kw = {"seed": 2, "dtype": torch.float64, "n_out": n_out, "parametrization": parametrization}
    hand, auto = MLP(3, 16, 3, "tanh", 0.3, **kw), MLP(3, 16, 3, "tanh", 0.3, **kw)
    for _ in range(5):
        c_hand, c_auto = mlp_gd_step(hand, X, y, 0.5), autograd_gd_step(auto, X, y, 0.5)
        assert float(c_hand) == pytest.approx(float(c_auto), rel=1e-12)
    start = MLP(3, 16, 3, "tanh", 0.3, **kw)
    pairs = zip(hand.parameters(), start.parameters(), strict=True)
    moved = max(float((p - q).detach().abs().max()) for p, q in pairs)
    assert moved > 1e-3  # the steps did move the parameters
    for p, q in zip(hand.parameters(), auto.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12 * max(1.0, float(p.abs().max())))
