"""ntkrun.layers.from_torch: a torch model of supported layers is the composition it lifts to.

Three kinds of check: the lift of models built of every supported operation against the
composition written by hand (the same layers, so to rounding); the lifted limit against Monte
Carlo over the torch model itself at torch's default initialization (its NNGP, and its NTK with
each parameter's gradient weighted by its initial variance, docs/science.md §12.10); and every
unsupported operation refused naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import ntkrun.layers as nl

S3 = 1 / math.sqrt(3)  # W_std of torch's default initialization


def b_first(fan_in: int) -> float:
    return math.sqrt(1 / (3 * fan_in))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(nn.functional.relu(x))


class Vectors(nn.Module):
    """Every vector operation: residual, a sum of two branches, torch.cat, LayerNorm, activations."""

    def __init__(self, n0: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(n0, width)
        self.block = Block(width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width, bias=False)
        self.acts = nn.Sequential(
            nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width), nn.LeakyReLU(0.2)
        )
        self.mid = nn.Linear(width, width)
        self.tail = nn.Sequential(nn.Softplus(), nn.Linear(width, width), nn.Identity(), nn.Tanh())
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.block(self.inp(x)))
        h = torch.relu(h)
        h = self.acts(torch.cat([self.a(h), self.b(h)], dim=1))
        h = self.mid(h)
        return self.out(self.tail(h))


def vectors_by_hand(n0: int) -> nl.Layer:
    return nl.serial(
        nl.Dense(S3, b_first(n0)),
        nl.residual(nl.Relu(), nl.Dense(S3, 0.0)),
        nl.LayerNorm(), nl.Relu(),
        nl.concat(nl.Dense(S3, 0.0), nl.Dense(S3, 0.0)),
        nl.Dense(S3, 0.0), nl.Gelu(), nl.Dense(S3, 0.0), nl.LeakyRelu(0.2),
        nl.Dense(S3, 0.0),
        nl.Softplus(), nl.Dense(S3, 0.0), nl.Tanh(),
        nl.Dense(S3, 0.0),
    )  # fmt: skip


class Images(nn.Module):
    """Convolutions of each padding, pooling, a sum of two convolutions, global pooling two ways."""

    def __init__(self, mean: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.c3, self.c4 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding="same")
        self.c5 = nn.Conv2d(8, 8, 3)  # valid
        self.pool, self.gap, self.mean = nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), mean
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))))
        h = self.c3(h) + self.c4(h)
        h = nn.functional.gelu(self.c5(h))
        h = h.mean((2, 3)) if self.mean else torch.flatten(self.gap(h), 1)
        return self.out(h)


IMAGES_BY_HAND = nl.serial(
    nl.Conv(3, "same", S3, b_first(2 * 9)), nl.Relu(),
    nl.Conv(3, "circular", S3, 0.0), nl.Relu(), nl.AvgPool(2),
    nl.FanOut(2), nl.parallel(nl.Conv(1, "valid", S3, 0.0), nl.Conv(3, "same", S3, 0.0)), nl.FanInSum(),
    nl.Conv(3, "valid", S3, 0.0), nl.Gelu(), nl.GlobalAvgPool(), nl.Dense(S3, 0.0),
)  # fmt: skip


def close(a: nl.Layer, b: nl.Layer, X: torch.Tensor) -> float:
    (sa, ta), (sb, tb) = a.kernels(X), b.kernels(X)
    return max(float((sa - sb).abs().max() / sb.abs().max()), float((ta - tb).abs().max() / tb.abs().max()))


def test_vectors_lift_to_their_composition() -> None:
    torch.manual_seed(0)
    lifted = nl.from_torch(Vectors(12, 256))
    assert (lifted.parametrization, lifted.n_out) == ("standard", 2)
    assert repr(lifted.layers) == repr(vectors_by_hand(12))
    X = torch.randn(5, 12, dtype=torch.float64)
    assert close(lifted.layers, vectors_by_hand(12), X) < 1e-13  # the same operations: rounding only


@pytest.mark.parametrize("mean", [False, True])
def test_images_lift_to_their_composition(mean: bool) -> None:
    torch.manual_seed(0)
    lifted = nl.from_torch(Images(mean))
    assert repr(lifted.layers) == repr(IMAGES_BY_HAND)
    X = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    assert close(lifted.layers, IMAGES_BY_HAND, X) < 1e-13


def test_ntkrun_modules_lift_exactly() -> None:
    """A composition's network lifts to it; its body (ntkrun's NTK-parametrized modules, traced)
    to a composition of the same kernels."""
    model = nl.serial(nl.Dense(1.3, 0.2), nl.residual(nl.Erf(), nl.Dense(0.9, 0.05)), nl.Erf(), nl.Dense())
    net = model.net(64, n0=6)
    assert nl.from_torch(net).layers is model
    lifted = nl.from_torch(net.body)
    assert lifted.parametrization == "ntk"
    X = torch.randn(4, 6, dtype=torch.float64)
    assert close(lifted.layers, model, X) < 1e-13


def _mlp(n0: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(n0, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)]
    return nn.Sequential(*layers)


def _sampled(net: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """(2, N, N): f f' and sum_p Var(p) df/dp df/dp' of one network (torch's default Var(p) =
    1/(3 fan_in) for weights and biases alike)."""
    f = net(X)[:, 0]
    params, weights = [], []
    for m in net.modules():
        if isinstance(m, nn.Linear):
            params += [m.weight, m.bias]
            weights += [1 / (3 * m.in_features)] * 2
    grads = [torch.autograd.grad(f[i], params, retain_graph=True) for i in range(len(f))]
    flat = torch.stack(
        [torch.cat([w**0.5 * g.flatten() for w, g in zip(weights, gi, strict=True)]) for gi in grads]
    )
    return torch.stack([torch.outer(f, f).detach(), flat @ flat.T])


def test_lifted_mlp_is_the_limit_of_the_torch_model() -> None:
    """Both kernels against Monte Carlo of the torch model at widths 256 and 512, extrapolated in
    1/width (2 M(512) - M(256)): the finite-width bias is O(1/width) (the hidden and readout biases'
    1/(3 width) alone are 10% of the smallest Theta entries at 512), and what is left is within
    4.5 standard errors of the extrapolation (42 entries; seeds fixed, so deterministic)."""
    torch.set_default_dtype(torch.float64)
    try:
        n0, samples = 64, 200
        X = torch.randn(6, n0, generator=torch.Generator().manual_seed(1))
        X[1] = X[0]  # an exact duplicate
        sigma, theta = nl.from_torch(_mlp(n0, 16, 0)).layers.kernels(X)
        means, variances = {}, {}
        for width in (256, 512):
            draws = torch.stack([_sampled(_mlp(n0, width, 10_000 * width + s), X) for s in range(samples)])
            means[width], variances[width] = draws.mean(0), draws.var(0) / samples
    finally:
        torch.set_default_dtype(torch.float32)
    estimate = 2 * means[512] - means[256]
    se = (4 * variances[512] + variances[256]).sqrt()
    z = (estimate - torch.stack([sigma, theta])).abs() / se
    assert float(z.max()) < 4.5, z


def test_lifted_cnn_nngp_is_the_torch_models() -> None:
    """The NNGP of torch's default convolutions (the bias of the first read as 1/(3 c k^2)) against
    Monte Carlo of f f' over 400 networks of 64 channels, within 4.5 standard errors plus the
    O(1/channels) bias (measured: below 2% of the largest entry at 32 channels)."""

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 25, 1),
        ).double()  # fmt: skip

    X = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma, _ = nl.from_torch(net(0)).layers.kernels(X)
    with torch.no_grad():
        draws = torch.stack([torch.outer(f, f) for f in (net(100 + s)(X)[:, 0] for s in range(400))])
    se = draws.std(0) / 20
    assert float(((draws.mean(0) - sigma).abs() / (4.5 * se + 0.02 * sigma.abs().max())).max()) < 1


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.fc(x)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class Viewed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(self.inp(x)))))


class Graph(nn.Module):
    """A two-branch model whose forward is `how` (the reviewer's cases of tensors used twice, in-place
    operations and concatenations the composition cannot express)."""

    def __init__(self, how: str, widths: tuple[int, int] = (8, 8)) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(4, widths[0]), nn.Linear(4, widths[1])
        self.c, self.out = nn.Linear(8, 8), nn.Linear(sum(widths) if "cat" in how else 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.how == "a+b+a":
            h = a + b + a
        elif self.how == "chain":
            h = (a + b) + a
        elif self.how == "cat aba":
            h = torch.cat([a, b, a], dim=1)
        elif self.how == "cat":
            h = torch.cat([torch.relu(a), torch.tanh(b)], dim=1)
        elif self.how == "inplace":
            h = self.c(nn.functional.relu(a, inplace=True)) + a
        else:  # "cat input"
            h = torch.cat([x, a], dim=1)  # the raw inputs' fixed features beside a growing layer
        return self.out(h)


def dense(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), middle, nn.Linear(8, 1))


def zeroed_readout() -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    nn.init.zeros_(model[2].weight)  # 64 numbers: the check still sees a variance of 0
    return model


def _reinitialized() -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    nn.init.kaiming_normal_(model[0].weight)  # variance 2 / fan_in: six times torch's default
    return model


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (dense(nn.BatchNorm1d(8)), "BatchNorm1d '1' is not supported"),
        (nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten(), nn.Linear(4, 1)), "Conv2d '0': only odd"),
        (dense(nn.LayerNorm(8)), "LayerNorm '1': LayerNorm over the last"),
        (dense(nn.GELU("tanh")), "GELU '1' is not supported"),
        (nn.Sequential(nn.Linear(4, 8), nn.ReLU()), "does not end on nn.Linear"),
        (_reinitialized(), "Linear '0': its weights' variance is"),
        (Scaled(), "mul (call function"),
        (Branchy(), "torch.fx cannot trace Branchy"),
        (Viewed(), "view (call method"),
        (Shared(), "Linear 'fc' is applied 2 times"),
        (Graph("a+b+a"), "is used twice outside"),
        (Graph("chain"), "is used twice outside"),
        (Graph("cat aba"), "joins branches of 3 tensors"),
        (Graph("cat", (4, 12)), "of [4, 12] features"),
        (Graph("cat input", (4, 4)), "joins tensors in a way with no layer"),
        (Graph("inplace"), "works in place"),
        (nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)), "ReLU '1' works in place"),
        (zeroed_readout(), "Linear '2': its weights' variance is 0 times"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2, divisor_override=1), nn.Flatten(),
                       nn.Linear(4, 1)), "AvgPool2d '1' is not supported"),
        (dense(nn.LayerNorm(8, eps=1.0, elementwise_affine=False)), "eps at most 1e-5"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 4), nn.Flatten(), nn.Linear(4, 1)),
         "Linear '1' on images acts on their last axis"),
    ],
)
def test_unsupported_operations_are_refused_by_name(model: nn.Module, message: str) -> None:
    with pytest.raises(nl.LayerError, match=r"^from_torch: ") as err:
        nl.from_torch(model)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


USER_MODELS = """
from torch import nn


def mlp(width, in_shape, n_out):
    return nn.Sequential(nn.Linear(in_shape[0], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, n_out))


def bottleneck(width, in_shape, n_out):
    return nn.Sequential(nn.Linear(in_shape[0], width), nn.ReLU(), nn.Linear(width, 16), nn.ReLU(),
                         nn.Linear(16, n_out))
"""


def test_a_user_model_that_lifts_gets_its_exact_nngp(monkeypatch, tmp_path) -> None:
    """network.module's limit (ModuleArchitecture.monte_carlo): a standard MLP of torch's layers on
    300 inputs lifts, so its NNGP is the composition's exactly, standard error 0, and its NTK stays
    Monte Carlo (the standard parametrization's grows with the width). Models whose limit is not the
    composition's keep Monte Carlo, and the note says why: a hidden layer of fixed width, a first
    layer of small fan-in (examples/models.py's small_cnn: 9, non-Gaussian pre-activations), explicit
    scalings (its residual_mlp)."""
    from ntkrun.architectures.module import ModuleArchitecture

    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    mlp = ModuleArchitecture((300,), 3, module="usermodels:mlp", limit_width=32, mc_samples=3)
    assert "lifts to serial(dense, relu, dense, relu, dense)" in mlp.limit_note()
    assert "its NNGP exact, its NTK by Monte Carlo" in mlp.limit_note()
    X = torch.randn(4, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimate = mlp.monte_carlo(X)
    sigma, _ = nl.from_torch(mlp.net(16, 0, dtype=torch.float64, device="cpu").net).layers.kernels(X)
    torch.testing.assert_close(estimate.nngp, sigma, rtol=0, atol=0)
    assert float(estimate.nngp_stderr.abs().max()) == 0 and float(estimate.ntk_stderr.min()) > 0
    assert mlp.exact_kinds() == ("nngp",)
    for module, shape, why in (
        ("usermodels:bottleneck", (300,), "Linear '2' keeps its width as the width grows"),
        ("models:small_cnn", (1, 5, 5), "its first layer's fan-in is 9"),
        ("models:residual_mlp", (25,), "add (call function"),
    ):
        other = ModuleArchitecture(shape, 3, module=module, limit_width=32, mc_samples=3)
        assert other.exact_kinds() == () and why in other.limit_note(), other.limit_note()
