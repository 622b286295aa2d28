"""muP of a composition's network (ntkrun.layers.base.maximal_update_, docs/science.md §12.5):
against the hand-written MLP's muP with the same weights (function, kernel, GD step), against
torch.func Jacobians weighted by Yang & Hu's table written out here, and its kernel at
initialization against the NTK parametrization's (the same draws)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev, vmap
from typer.testing import CliRunner

from ntkrun.cli import app
from ntkrun.kernels import empirical_ntk
from ntkrun.layers.base import LayerError
from ntkrun.layers.parse import parse
from ntkrun.network import MLP, autograd_gd_step, mlp_gd_step

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
MLP_LIST = ["dense", "relu", "dense", "relu", "dense"]  # ntkrun.MLP of depth 3, beta 0.1


def test_a_composition_in_mup_is_the_mlp_in_mup():
    """The MLP's muP with the composition's weights copied in: the same function, the same kernel
    (the structured path against the MLP's layerwise one) and the same GD step (autograd with the
    composition's learning-rate factors against the MLP's hand-written backward pass), float64."""
    width, X = 24, torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.randn(7, dtype=F64)
    net = parse(MLP_LIST).net(width, 1, n0=3, dtype=F64, parametrization="mup")
    mlp = MLP(3, width, 3, "relu", beta=0.1, dtype=F64, parametrization="mup")
    dense = [m for m in net.modules() if hasattr(m, "lr_w")]
    with torch.no_grad():
        for l, m in enumerate(dense):
            mlp.weights[l].copy_(m.weight)
            mlp.biases[l].copy_(m.bias)
    torch.testing.assert_close(net(X), mlp(X), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(empirical_ntk(net, X), empirical_ntk(mlp, X), rtol=1e-12, atol=1e-14)
    autograd_gd_step(net, X, y, 0.05)
    mlp_gd_step(mlp, X, y, 0.05)
    torch.testing.assert_close(net(X), mlp(X), rtol=1e-12, atol=1e-14)


def weighted_ntk(net: torch.nn.Module, X: torch.Tensor, factors: dict[str, float]) -> torch.Tensor:
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (x[None],))[0]

    J = vmap(jacrev(f), (None, 0))(params, X)
    return sum(factors[k] * J[k].flatten(1) @ J[k].flatten(1).T for k in params)


def test_the_structured_mup_kernel_is_the_table_weighted_jacobian_gram():
    """A residual CNN with a flatten readout: every weight and bias moves with lr * width but the
    readout's bias (lr), the table written out from the parameters' names (not the implementation's
    lr_factors)."""
    layers = ["conv", {"residual": ["relu", "conv"]}, "relu", "flatten", "dense"]
    width, X = 6, torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    net = parse(layers).net(width, 2, n0=(2, 4, 4), dtype=F64, parametrization="mup")
    names = [name for name, _ in net.named_parameters()]
    factors = {name: float(width) for name in names}
    factors[names[-1]] = 1.0  # the readout's bias, the last parameter built
    assert names[-1].endswith("bias") and len(names) == 6
    torch.testing.assert_close(empirical_ntk(net, X), weighted_ntk(net, X, factors), rtol=1e-11, atol=1e-13)


def test_mups_kernel_at_initialization_is_the_ntk_parametrizations():
    """From the same draws, the readout's multiplier / sqrt(n) and the learning-rate factor n cancel
    in every term of Theta (docs/science.md §11.1): Theta_mup(0) = Theta_ntk(0), while the output's
    weight term shrinks by sqrt(n)."""
    layers = ["dense", {"residual": ["relu", "dense"]}, "layer_norm", "relu", "dense"]
    width, X = 32, torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    ntk = parse(layers).net(width, 3, n0=5, dtype=F64)
    mup = parse(layers).net(width, 3, n0=5, dtype=F64, parametrization="mup")
    torch.testing.assert_close(empirical_ntk(mup, X), empirical_ntk(ntk, X), rtol=1e-12, atol=1e-14)
    bias = 0.1 * list(ntk.parameters())[-1]
    torch.testing.assert_close(mup(X) - bias, (ntk(X) - bias) / width**0.5, rtol=1e-12, atol=1e-14)


def test_mup_is_refused_where_the_table_has_no_row():
    with pytest.raises(LayerError, match="muP is defined here for Dense and Conv weights only"):
        parse(["dense", "relu", "attention", "relu", "global_avg_pool", "dense"]).net(
            4, 0, n0=(3, 5), dtype=F64, parametrization="mup"
        )
    with pytest.raises(LayerError, match="a composition's networks are ntk or mup"):
        parse(MLP_LIST).net(4, 0, n0=3, dtype=F64, parametrization="meanfield")


def test_features_refuses_mup_of_attention_at_check(tmp_path):
    """One line at --check naming the key (it was an internal error when the units were priced)."""
    layers = "network.layers=[conv, relu, attention, relu, global_avg_pool, dense]"
    images = ["--set", "data.inputs=gaussian", "--set", "data.image=[1, 4, 4]"]
    args = ["features", "--preset", "quick", "--set", layers, "--set", "depth_width=[]", *images, "--check"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert (
        "network.parametrizations: mup: muP is defined here for Dense and Conv weights only" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
