"""The maximal-update parametrization (muP) and mean-field of ntkrun.MLP against Yang & Hu's table
(docs/science.md §11): the function at initialization, the kernel of its GD dynamics (against
torch.func Jacobians weighted by each parameter's learning-rate factor), the GD step (against
autograd with per-parameter learning rates), and the per-layer update sizes at two widths."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from ntkrun.architectures.cnn import CNN
from ntkrun.kernels import empirical_ntk
from ntkrun.network import MLP, autograd_gd_step, gd_step, mse_cost

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def inputs(n: int = 6, n0: int = 3) -> torch.Tensor:
    return torch.randn(n, n0, generator=torch.Generator().manual_seed(1), dtype=F64)


def expected_factors(net: torch.nn.Module, width: int) -> dict[str, float]:
    """Yang & Hu's table in ntkrun's form (docs/science.md §11.1), written out: muP moves every weight
    and hidden bias with lr * n, the output bias with lr; NTK every parameter with lr."""
    names = [name for name, _ in net.named_parameters()]
    if net.parametrization == "ntk":
        return dict.fromkeys(names, 1.0)
    last = f"biases.{net.depth - 1}"
    return {name: 1.0 if name == last else float(width) for name in names}


def weighted_ntk(net: MLP, X: torch.Tensor, width: int) -> torch.Tensor:
    """sum_p r_p df/dp df/dp^T by torch.func per-sample Jacobians (one output), r_p from the table
    written out in expected_factors (not the implementation's own lr_scales: that would be circular)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (x[None],))[0]

    J = vmap(jacrev(f), (None, 0))(params, X)
    factors = expected_factors(net, width)
    return sum(factors[k] * J[k].flatten(1) @ J[k].flatten(1).T for k in params)


@pytest.mark.parametrize(("parametrization", "depth"), [("mup", 3), ("mup", 4), ("meanfield", 2), ("ntk", 3)])
def test_the_fast_kernel_is_the_learning_rate_weighted_jacobian_gram(parametrization, depth):
    net = MLP(3, 16, depth, "relu", beta=0.1, seed=2, dtype=F64, parametrization=parametrization)
    X = inputs()
    torch.testing.assert_close(empirical_ntk(net, X), weighted_ntk(net, X, 16), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_mups_kernel_at_initialization_is_the_ntk_parametrizations(depth):
    """With the same random numbers: the output multiplier 1/n (not 1/sqrt n) scales every
    gradient below the output by n^-1/2 and the output layer's by n^-1/2 too; the learning-rate
    factor n restores each term, and the output bias keeps its factor 1: Theta_mup(0) = Theta_ntk(0)
    exactly (docs/science.md §11), while f_mup(0) is f_ntk(0) with its weight term divided by sqrt(n)."""
    X = inputs()
    ntk = MLP(3, 32, depth, "relu", beta=0.1, seed=3, dtype=F64)
    mup = MLP(3, 32, depth, "relu", beta=0.1, seed=3, dtype=F64, parametrization="mup")
    torch.testing.assert_close(empirical_ntk(mup, X), empirical_ntk(ntk, X), rtol=1e-12, atol=1e-14)
    bias = 0.1 * ntk.biases[-1].detach()
    with torch.no_grad():
        torch.testing.assert_close(mup(X) - bias, (ntk(X) - bias) / math.sqrt(32), rtol=1e-12, atol=1e-14)


def test_the_mup_output_at_initialization_vanishes_like_width_to_the_minus_half():
    """Var f(x) = E[a.a] / n^2 summed over n units = E[a^2] / n (beta 0): over 400 seeds the
    variance ratio between widths 64 and 256 is 4 (each estimate has relative error 0.07, the
    ratio about 0.1: [3, 5.3] is > 3 of them); in NTK parametrization it is 1."""
    X = inputs(2)

    def variance(width: int, parametrization: str) -> float:
        outs = [MLP(3, width, 3, "relu", beta=0.0, seed=s, dtype=F64, parametrization=parametrization)(X)[0]
                for s in range(400)]  # fmt: skip
        return float(torch.stack(outs).detach().var())

    assert 3.0 < variance(64, "mup") / variance(256, "mup") < 5.3
    assert 0.75 < variance(64, "ntk") / variance(256, "ntk") < 1.33


def manual_step(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, width: int) -> None:
    """p <- p - 0.1 r_p dC/dp by autograd, with expected_factors' r_p."""
    factors = expected_factors(net, width)
    grads = torch.autograd.grad(mse_cost(net(X), y), list(net.parameters()))
    with torch.no_grad():
        for (name, p), g in zip(net.named_parameters(), grads, strict=True):
            p.sub_(0.1 * factors[name] * g)


@pytest.mark.parametrize("parametrization", ["mup", "meanfield", "ntk"])
def test_the_gd_step_moves_each_parameter_by_its_learning_rate(parametrization):
    """The MLP's hand-written step and the generic autograd step (the CNN's) against p - lr r_p dC/dp."""
    depth = 2 if parametrization == "meanfield" else 3
    X, y = inputs(), torch.sin(inputs()[:, 0])
    nets = [
        MLP(3, 16, depth, "tanh", beta=0.1, seed=4, dtype=F64, parametrization=parametrization)
        for _ in range(3)
    ]
    fast, generic, manual = nets
    manual_step(manual, X, y, 16)
    gd_step(fast, X, y, lr=0.1)
    autograd_gd_step(generic, X, y, lr=0.1)
    for (name, a), b, c in zip(
        fast.named_parameters(), generic.parameters(), manual.parameters(), strict=True
    ):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14, msg=name)


def hidden(net: torch.nn.Module, X: torch.Tensor) -> list[torch.Tensor]:
    """The first two hidden layers' pre-activations: the MLP's z(1), z(2), the CNN's h(1), h(2)."""
    cache = net.forward_cache(X)
    return [h.detach() for h in (cache.pre if isinstance(net, CNN) else cache.zs)[:2]]


def update_ratios(make: Callable[[int, int], torch.nn.Module], X: torch.Tensor, y: torch.Tensor,
                  widths: tuple[int, int], seeds: int = 6) -> list[float]:  # fmt: skip
    """Per hidden layer, the RMS over units (and pixels and inputs) of its pre-activations' change
    after one GD step of lr 0.5 towards y + f_0 (every width starts from the residual -y), averaged
    over seeds: the feature updates of docs/science.md §11.1; -> their ratio, wide over narrow."""

    def sizes(width: int) -> torch.Tensor:
        total = torch.zeros(2)
        for seed in range(seeds):
            net = make(width, seed)
            before = hidden(net, X)
            gd_step(net, X, y + net(X).detach(), lr=0.5)
            total += torch.tensor(
                [float((b - a).pow(2).mean().sqrt()) for a, b in zip(before, hidden(net, X), strict=True)]
            )
        return total / seeds

    return (sizes(widths[1]) / sizes(widths[0])).tolist()


@pytest.mark.parametrize(("parametrization", "low", "high"), [("mup", 0.8, 1.25), ("ntk", 0.4, 0.6)])
def test_mup_moves_the_features_by_order_one_and_ntk_by_width_to_the_minus_half(parametrization, low, high):
    """Widths 256 and 1024: per hidden layer, the RMS feature update's ratio is 1 in muP and
    1/2 (= 4^-1/2) in NTK parametrization (measured 0.97-1.01 and 0.48-0.51; bounds +-20%)."""
    X = torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    y = torch.sign(X[:, 0] * X[:, 1])

    def make(width: int, seed: int) -> MLP:
        return MLP(4, width, 3, "relu", beta=0.1, seed=seed, dtype=F64, parametrization=parametrization)

    ratios = update_ratios(make, X, y, (256, 1024))
    assert all(low < r < high for r in ratios), ratios


def test_meanfield_needs_one_hidden_layer_and_mup_one_width():
    with pytest.raises(ValueError, match="meanfield parametrization has one hidden layer"):
        MLP(3, 8, 3, parametrization="meanfield")
    with pytest.raises(ValueError, match="muP scales with one hidden width"):
        MLP(3, [8, 16], 3, parametrization="mup")


# ---------------------------------------------------------------- the CNN (n: its channels)


def cnn(channels: int, parametrization: str, seed: int = 3, readout: str = "flatten") -> CNN:
    return CNN(1, channels, 3, readout=readout, beta=0.1, seed=seed, image_size=(5, 5), dtype=F64,
               parametrization=parametrization)  # fmt: skip


def images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 5, 5, generator=torch.Generator().manual_seed(6), dtype=F64)


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_the_cnns_mup_kernel_is_its_learning_rate_weighted_jacobian_gram_and_ntks_at_init(readout):
    net, X = cnn(6, "mup", readout=readout), images()
    theta = empirical_ntk(net, X)
    torch.testing.assert_close(theta, weighted_ntk(net, X, 6), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(
        theta, empirical_ntk(cnn(6, "ntk", readout=readout), X), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("parametrization", ["mup", "ntk"])
def test_the_cnns_gd_step_moves_each_parameter_by_its_learning_rate(parametrization):
    X, y = images(), torch.sin(images().sum((1, 2, 3)))
    net, manual = cnn(6, parametrization), cnn(6, parametrization)
    manual_step(manual, X, y, 6)
    gd_step(net, X, y, lr=0.1)
    for (name, a), b in zip(net.named_parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize(("parametrization", "low", "high"), [("mup", 0.8, 1.25), ("ntk", 0.4, 0.6)])
def test_the_cnns_mup_moves_features_by_order_one_and_ntk_by_channels_to_the_minus_half(
    parametrization, low, high
):
    """Channels 64 and 256 (measured ratios: muP 1.03, 1.07; NTK 0.51, 0.53; bounds +-20%)."""
    X = images(8)
    y = torch.sign(X[:, 0, 1, 1] * X[:, 0, 3, 3])
    ratios = update_ratios(lambda width, seed: cnn(width, parametrization, seed=seed), X, y, (64, 256))
    assert all(low < r < high for r in ratios), ratios


def test_the_cnn_refuses_meanfield():
    with pytest.raises(ValueError, match="parametrization must be one of ntk, standard, mup"):
        cnn(4, "meanfield")


@pytest.mark.parametrize("parametrization", ["ntk", "standard", "mup", "meanfield"])
def test_empirical_nngp_is_the_outputs_covariance_over_the_readouts_draw(parametrization):
    """Sigma(L) of a finite net: the covariance of its output over the readout layer's draw, the hidden
    layers fixed. Measured by redrawing the readout as the net stores it (N(0, 1); the standard
    parametrization N(0, 1/n) and beta N(0, 1)) 4000 times: each entry's Monte-Carlo error is about
    sqrt(2/4000) = 2.2% of the diagonal, so 10% separates it from any misplaced factor (muP's
    readout multiplier is 1/n: dividing by n instead of n^2 was 64x off here)."""
    from ntkrun.kernels import empirical_nngp

    depth = 2 if parametrization == "meanfield" else 3
    net = MLP(3, 64, depth, "tanh", 0.1, seed=0, dtype=torch.float64, parametrization=parametrization)
    X = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gen, draws = torch.Generator().manual_seed(2), 4000
    outs = []
    with torch.no_grad():
        for _ in range(draws):
            w = torch.randn(net.weights[-1].shape, generator=gen, dtype=torch.float64)
            b = torch.randn(net.biases[-1].shape, generator=gen, dtype=torch.float64)
            if parametrization == "standard":
                w, b = w / math.sqrt(64), 0.1 * b
            net.weights[-1].copy_(w)
            net.biases[-1].copy_(b)
            outs.append(net(X))
    f = torch.stack(outs)  # (draws, N); the readout's mean is 0
    measured = f.t() @ f / draws
    sigma = empirical_nngp(net, X)
    scale = sigma.diagonal().max()
    assert (measured - sigma).abs().max() < 0.1 * scale, (measured, sigma)


def test_empirical_nngp_refuses_a_cnn_in_one_line():
    from ntkrun.kernels import empirical_nngp

    with pytest.raises(TypeError, match=r"empirical_nngp takes an ntkrun\.MLP, got CNN"):
        empirical_nngp(CNN(1, 4, 2, image_size=(3, 3)), torch.zeros(2, 1, 3, 3))
