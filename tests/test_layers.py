"""ntkrun.layers: each layer's limit against an independent reference, and its finite network.

References: §3's MLP recursion (ntkrun.analytic_kernels) for Dense/activation lists, to the last
bit; Gauss-Hermite quadrature for the closed forms of LeakyRelu and Abs; Monte Carlo over the
finite networks `model.net` describes (their mean empirical NTK and outputs' covariance) for
residual blocks, LayerNorm and concatenation, within a few standard errors (docs/science.md §12).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ntkrun.layers as nl
from ntkrun.kernels import analytic_kernels, empirical_ntk


def mlp(depth: int, act=nl.Relu, beta: float = 0.1) -> nl.Layer:
    layers = [nl.Dense(b_std=beta)]
    for _ in range(depth - 1):
        layers += [act(), nl.Dense(b_std=beta)]
    return nl.serial(*layers)


@pytest.fixture
def points() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(
        9, 6, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "tanh"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_dense_activation_list_is_the_mlp_recursion_to_the_last_bit(points, nonlinearity, depth):
    X, X2 = points
    act = {"relu": nl.Relu, "erf": nl.Erf, "tanh": nl.Tanh}[nonlinearity]
    for other in (None, X2):
        sigma, theta = mlp(depth, act, beta=0.3).kernels(X, other)
        S, T = analytic_kernels(X, other, depth=depth, nonlinearity=nonlinearity, beta=0.3)
        # a Gram: its upper triangle (analytic_kernels mirrors it; quadrature is not exactly
        # symmetric in its two variances, ~1e-6 at 64 nodes); a cross-Gram: every entry
        every = torch.ones_like(S, dtype=torch.bool)
        off = every.triu(1) if other is None else every
        for mine, theirs in ((sigma, S), (theta, T)):
            torch.testing.assert_close(mine[off], theirs[off], rtol=1e-13, atol=0)
            # a Gram's diagonal: the correlation is 1 up to rounding, where arccos has an infinite
            # slope (arccos(1 - e) ~ sqrt(2e)): the two recursions' roundings differ by ~1e-8
            torch.testing.assert_close(mine.diagonal(), theirs.diagonal(), rtol=5e-8, atol=0)


@pytest.mark.parametrize("alpha", [0.2, -1.0])
@pytest.mark.parametrize("c", [0.3, -0.5, 0.95])
def test_leaky_relu_and_abs_closed_forms_equal_sampled_expectations(alpha, c):
    """E[phi(u) phi(v)] and E[phi'(u) phi'(v)] against 2e6 samples of (u, v) (quadrature is no
    reference here: the derivative's step makes it converge slowly, ~1e-3 at 64 nodes)."""
    act = nl.Abs() if alpha == -1.0 else nl.LeakyRelu(alpha)
    sxx, syy = 1.3, 0.8
    cov = torch.tensor([[sxx, c], [c, syy]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2_000_000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    u, v = z[:, 0], z[:, 1]
    expected = act.expect(*(torch.tensor(a, dtype=torch.float64) for a in (sxx, c, syy)))
    products = (act.phi.sigma(u) * act.phi.sigma(v), act.phi.sigma_dot(u) * act.phi.sigma_dot(v))
    for samples, closed in zip(products, expected, strict=True):
        se = samples.std() / len(samples) ** 0.5
        assert abs(samples.mean() - closed) < 5 * se, (samples.mean(), closed, se)


def test_identity_is_the_linear_kernel(points):
    X, X2 = points
    sigma, theta = nl.serial(nl.Dense(W_std=2.0, b_std=0.5), nl.Identity(), nl.Dense(b_std=0.0)).kernels(
        X, X2
    )
    lin = 4 * X @ X2.T / 6 + 0.25
    torch.testing.assert_close(sigma, lin, rtol=1e-14, atol=0)
    torch.testing.assert_close(theta, lin + lin, rtol=1e-14, atol=0)  # both layers' gradients


def monte_carlo(model: nl.Layer, X: torch.Tensor, width: int, samples: int) -> tuple:
    """Mean and standard error over seeds of the outputs' second moment and of the empirical NTK."""
    outs, thetas = [], []
    for seed in range(samples):
        net = model.net(
            width, seed, n0=X.shape[1] if X.dim() == 2 else tuple(X.shape[1:]), dtype=torch.float64
        )
        with torch.no_grad():
            f = net(X)
        outs.append(f[:, None] * f[None, :])
        thetas.append(empirical_ntk(net, X))
    o, t = torch.stack(outs), torch.stack(thetas)
    return o.mean(0), o.std(0) / samples**0.5, t.mean(0), t.std(0) / samples**0.5


COMPOSITIONS = {
    "resmlp": lambda: nl.serial(
        nl.Dense(),
        nl.residual(nl.Relu(), nl.Dense()),
        nl.residual(nl.Relu(), nl.Dense()),
        nl.Relu(),
        nl.Dense(),
    ),
    "lnmlp": lambda: nl.serial(
        nl.Dense(), nl.LayerNorm(), nl.Relu(), nl.Dense(), nl.LayerNorm(), nl.Erf(), nl.Dense()
    ),
    "concat": lambda: nl.serial(
        nl.Dense(),
        nl.concat(nl.serial(nl.Relu(), nl.Dense()), nl.serial(nl.Erf(), nl.Dense())),
        nl.Dense(),
        nl.Relu(),
        nl.Dense(),
    ),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_the_limit_is_the_mean_of_the_finite_networks_it_describes(name):
    """Width 512, 48 seeds: the finite-width bias is O(1/512) of the kernel, the standard error
    of the mean about 1/sqrt(48) of the spread; each entry within 4.5 standard errors plus 2% (a
    wrong transformation, e.g. LayerNorm not dividing Theta, is off by 10% to a factor of 2)."""
    X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = COMPOSITIONS[name]()
    sigma, theta = model.kernels(X)
    s_mean, s_se, t_mean, t_se = monte_carlo(model, X, width=512, samples=48)
    assert ((s_mean - sigma).abs() <= 4.5 * s_se + 0.02 * sigma.abs().max()).all(), (s_mean, sigma)
    assert ((t_mean - theta).abs() <= 4.5 * t_se + 0.02 * theta.abs()).all(), (t_mean, theta)


def test_a_finite_network_has_the_shape_and_seed_it_is_asked_for():
    model = COMPOSITIONS["resmlp"]()
    X = torch.randn(7, 4, dtype=torch.float64)
    one = model.net(32, 0, n0=4, dtype=torch.float64)
    assert one(X).shape == (7,)
    assert model.net(32, 0, n_out=3, n0=4)(X.float()).shape == (7, 3)
    again = model.net(32, 0, n0=4, dtype=torch.float64)
    assert torch.equal(one(X), again(X)) and not torch.equal(
        one(X), model.net(32, 1, n0=4, dtype=torch.float64)(X)
    )
    sizes = [p.shape for p in one.parameters()]
    assert sizes[0] == (32, 4) and sizes[-2:] == [(1, 32), (1,)]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            lambda: nl.serial(nl.Dense(), nl.Relu(), nl.Relu(), nl.Dense()),
            "layer 3 (relu): its input is not Gaussian",
        ),
        (
            lambda: nl.serial(nl.Relu(), nl.Dense()),
            "layer 1 (relu): its input is not Gaussian (the raw inputs)",
        ),
        (
            lambda: nl.serial(nl.Dense(), nl.Relu(), nl.LayerNorm(), nl.Dense()),
            "layer 3 (layer_norm): its input is not",
        ),
        (lambda: nl.serial(nl.residual(nl.Dense()), nl.Dense()), "layer 1 (residual): adds the raw inputs"),
        (lambda: nl.serial(nl.Dense(), nl.residual(nl.Relu()), nl.Dense()), "a branch is not Gaussian"),
        (
            lambda: nl.serial(nl.Dense(), nl.FanOut(2), nl.FanInSum(), nl.Dense()),
            "end on the same weight layer",
        ),
        (
            lambda: nl.serial(nl.Dense(), nl.concat(nl.Dense(), nl.Dense()), nl.Relu(), nl.Dense()),
            "(relu): its in",
        ),
        (
            lambda: nl.serial(nl.Dense(), nl.FanOut(2), nl.Dense()),
            "layer 3 (dense): its input is several branches",
        ),
        (lambda: nl.serial(nl.Dense(), nl.FanOut(2)), "ends on 2 branches"),
    ],
)
def test_a_composition_that_cannot_work_is_refused_naming_its_position(model, message):
    with pytest.raises(nl.LayerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model().kernels(torch.randn(3, 4, dtype=torch.float64))


def test_a_network_must_end_on_a_readout():
    with pytest.raises(nl.LayerError, match="ends on relu: end it with a Dense readout"):
        nl.serial(nl.Dense(), nl.Relu()).net(8, n0=4)


NT_PYTHON = Path(os.environ.get("NTKRUN_NT_PYTHON", Path.home() / ".cache/ntkrun-anchors/nt-venv/bin/python"))


@pytest.mark.skipif(
    not NT_PYTHON.is_file(),
    reason=f"no neural-tangents venv at {NT_PYTHON} (set NTKRUN_NT_PYTHON; the anchors' setup builds one)",
)
def test_compositions_agree_with_neural_tangents_stax():
    """benchmarks/against_stax.py: the same compositions and inputs (with an exact duplicate) in
    stax, float64: 1e-10 relative, 5e-8 at correlation 1 (arccos's infinite slope there)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "against_stax.py"
    done = subprocess.run(
        [sys.executable, str(script), "--nt-python", str(NT_PYTHON)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("padding", ["same", "valid", "circular"])
def test_a_conv_relu_list_is_the_cnn_description(readout, padding):
    """[Conv, Relu] x (L-1), Flatten or GlobalAvgPool, Dense is ntkrun's CNN of depth L: its
    description's pixel-pair recursion (docs/science.md §9), an independent implementation."""
    from types import SimpleNamespace

    from ntkrun.architectures.registry import describe

    g = torch.Generator().manual_seed(0)
    X, X2 = (torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64) for n in (5, 3))
    layers = [nl.Conv(3, padding), nl.Relu(), nl.Conv(3, padding), nl.Relu()]
    model = nl.serial(*layers, nl.Flatten() if readout == "flatten" else nl.GlobalAvgPool(), nl.Dense())
    network = SimpleNamespace(arch="cnn", depth=3, nonlinearity="relu", beta=0.1, parametrization="ntk",
                              kernel_size=3, padding=padding, readout=readout)  # fmt: skip
    cnn = describe(network, (2, 6, 6))
    for other in (None, X2):
        ours = model.kernels(X, other)
        theirs = cnn.kernels(X.flatten(1), None if other is None else other.flatten(1), kinds=("nngp", "ntk"))
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_a_pooling_network_is_the_mean_of_its_finite_networks():
    """Conv, ReLU, AvgPool, circular Conv, erf, GlobalAvgPool, Dense on 1x4x4 images: the limit
    against 40 networks of 256 channels (the bounds of the vector compositions' test)."""
    model = nl.serial(
        nl.Conv(),
        nl.Relu(),
        nl.AvgPool(2),
        nl.Conv(padding="circular"),
        nl.Erf(),
        nl.GlobalAvgPool(),
        nl.Dense(),
    )
    X = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma, theta = model.kernels(X)
    outs, thetas = [], []
    for seed in range(40):
        net = model.net(256, seed, n0=(1, 4, 4), dtype=torch.float64)
        with torch.no_grad():
            f = net(X)
        outs.append(f[:, None] * f[None, :])
        thetas.append(empirical_ntk(net, X))
    for samples, limit in ((torch.stack(outs), sigma), (torch.stack(thetas), theta)):
        mean, se = samples.mean(0), samples.std(0) / len(samples) ** 0.5
        assert ((mean - limit).abs() <= 4.5 * se + 0.02 * limit.abs().max()).all(), (mean, limit)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            lambda: nl.serial(nl.Conv(), nl.Relu(), nl.AvgPool(4), nl.AvgPool(2), nl.Dense()),
            "pooling past a pixel",
        ),
        (lambda: nl.serial(nl.Dense(), nl.Relu(), nl.Conv(), nl.Dense()), "layer 3 (conv): needs images"),
        (
            lambda: nl.serial(nl.Conv(padding="valid"), nl.Conv(padding="valid"), nl.Conv(padding="valid")),
            "valid",
        ),
    ],
)
def test_a_spatial_list_that_cannot_work_is_refused(model, message):
    with pytest.raises(nl.LayerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inputs = (
            torch.randn(2, 3, dtype=torch.float64) if "needs images" in message else torch.randn(2, 1, 4, 4)
        )
        model().kernels(inputs)


def test_the_row_blocks_give_the_whole_gram(monkeypatch, points):
    """kernels() computes in blocks of about TILE pairs: small blocks (down to one row and two
    columns, for images) give the Gram of one block to rounding (the input products' BLAS kernels
    may differ with the block's shape)."""
    import ntkrun.layers.base as base

    X, X2 = points
    model = COMPOSITIONS["resmlp"]()
    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pooled = nl.serial(nl.Conv(), nl.Relu(), nl.AvgPool(2), nl.Conv(), nl.Erf(), nl.Flatten(), nl.Dense())
    whole = [model.kernels(X), model.kernels(X, X2), pooled.kernels(images)]
    monkeypatch.setattr(base, "TILE", 2 * X.shape[0])
    blocks = [model.kernels(X), model.kernels(X, X2)]
    monkeypatch.setattr(base, "TILE", 2 * 6 * 16**2)
    blocks.append(pooled.kernels(images))
    monkeypatch.setattr(base, "TILE", 2 * 16**2)  # blocks of one row and two columns
    blocks.append(pooled.kernels(images))
    whole.append(whole[-1])
    blocks.append(pooled.kernels(images[:4], images[1:]))  # a rectangular Gram, in such blocks
    whole.append(tuple(k[:4, 1:] for k in whole[-1]))
    for a, b in zip(whole, blocks, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


def test_rows_and_the_second_inputs_once(monkeypatch, points):
    """rows=(r0, r1) gives those rows of the Gram; across row blocks the second inputs' own
    covariances go through each layer once (an activation's expectations on them: one call per
    activation, whatever the number of blocks)."""
    import ntkrun.layers.base as base

    X, X2 = points
    calls: list[tuple[int, ...]] = []

    def counted(layer: nl.Activation) -> nl.Activation:
        inner = layer.expect

        def expect(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(tuple(args[1].shape))
            return inner(*args)

        layer.expect = expect
        return layer

    model = nl.serial(nl.Dense(), counted(nl.Relu()), nl.Dense(), counted(nl.Erf()), nl.Dense())
    whole = model.kernels(X, X2)
    monkeypatch.setattr(base, "TILE", 2 * 9 * 9)  # one column block of X2's 9, row blocks of 18 and 2
    calls.clear()
    blocks = model.kernels(X, X2)
    own_of_second = [shape for shape in calls if shape == (X2.shape[0],)]
    assert len(own_of_second) == 2, calls  # once per activation, not once per row block
    assert sorted(shape for shape in calls if len(shape) == 2) == [(2, 9), (2, 9), (18, 9), (18, 9)]
    rows = model.kernels(X, rows=(3, 7))  # of a Gram: the upper triangle and the diagonal
    gram = model.kernels(X)
    upper = torch.ones(20, 20, dtype=torch.bool).triu()[3:7]
    for a, b in zip(whole, blocks, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in zip(rows, gram, strict=True):
        torch.testing.assert_close(a[upper], b[3:7][upper], rtol=1e-12, atol=0)


def test_the_spatial_diagonal_economy_gives_the_full_covariance_answer():
    """Without pooling, images carry only each position with itself (state.Kernel.diagonal_spatial);
    a window-1 average pool (the identity, but a layer that mixes positions) forces the full
    covariance through the same layers: the two agree to rounding, for each padding."""
    images = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for padding in ("same", "valid", "circular"):
        body = [nl.Conv(3, padding), nl.Relu(), nl.Conv(3, padding), nl.LayerNorm(), nl.Erf()]
        economy = nl.serial(*body, nl.Flatten(), nl.Dense()).kernels(images, images[:3])
        full = nl.serial(nl.AvgPool(1), *body, nl.Flatten(), nl.Dense()).kernels(images, images[:3])
        for a, b in zip(economy, full, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


SEQUENCE_COMPOSITIONS = {  # (composition, width of its networks)
    "softmax": (
        lambda: nl.serial(nl.Dense(), nl.Relu(), nl.Attention(), nl.Relu(), nl.GlobalAvgPool(), nl.Dense()),
        256,
    ),
    "identity": (
        lambda: nl.serial(
            nl.Dense(), nl.Attention(32, "identity", linear_scaling=False), nl.Erf(), nl.Flatten(), nl.Dense()
        ),
        128,
    ),
    "residual_heads": (
        lambda: nl.serial(
            nl.Dense(),
            nl.residual(nl.Relu(), nl.Attention(heads=2)),
            nl.LayerNorm(),
            nl.Flatten(),
            nl.Dense(),
        ),
        256,
    ),
}


@pytest.mark.parametrize("name", list(SEQUENCE_COMPOSITIONS))
def test_attention_is_the_mean_of_the_finite_attention_networks(name):
    """Sequences (N, T, d): the finite networks' output second moment and empirical NTK (40 seeds)
    within 4.5 standard errors plus 3% of the limit. With linear scaling the attention weights
    converge at 1/sqrt(width): a few percent at 256, where a wrong weighting (G Sigma G without the
    values' Theta term) is off by tens of percent. With identity weights and the 1/sqrt(d_k)
    scaling the scores stay Gaussian and the outputs are their products: heavy-tailed, and the NTK
    concentrates only over many heads (32 here); its standard errors are then 10-40% of the
    kernel, so this is a coarse check, and benchmarks/against_stax.py (5e-14) the sharp one."""
    X = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    build, width = SEQUENCE_COMPOSITIONS[name]
    model = build()
    sigma, theta = model.kernels(X)
    s_mean, s_se, t_mean, t_se = monte_carlo(model, X, width=width, samples=40)
    assert ((s_mean - sigma).abs() <= 4.5 * s_se + 0.03 * sigma.abs().max()).all(), (s_mean, sigma)
    assert ((t_mean - theta).abs() <= 4.5 * t_se + 0.03 * theta.abs()).all(), (t_mean, theta)


def test_attention_refuses_what_has_no_limit_here():
    X = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(nl.LayerError, match="layer 2 \\(attention\\): needs positions"):
        nl.serial(nl.Dense(), nl.Attention(), nl.Dense()).kernels(X)
    with pytest.raises(
        nl.LayerError, match="softmax weights have a closed-form limit only with linear_scaling"
    ):
        nl.Attention(linear_scaling=False)
    with pytest.raises(nl.LayerError, match="mechanism is one of softmax, identity"):
        nl.Attention(mechanism="relu")
