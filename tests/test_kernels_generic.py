from __future__ import annotations

import math

import pytest
import torch
from memory import LiveBytes
from torch import nn

from ntkrun.kernels.empirical import empirical_ntk
from ntkrun.kernels.generic import choose_method, generic_ntk
from ntkrun.network import MLP

# Both sides are float64 sums of the same products (df/dp . df/dp') in different orders, so they
# agree to rounding (~1e-15 relative); 1e-10 leaves a margin of 10^5 and still catches any wrong
# or missing term (a single parameter's share of Theta is far above 1e-10 in these small nets).
TOL = 1e-10
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def loop_jacobian(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Independent reference, plain autograd: (N, ...) -> (N, k, P), one grad per sample and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x in X:
        y = model(x[None]).reshape(-1)
        per_output = []
        for a in range(y.numel()):
            grads = torch.autograd.grad(y[a], params, retain_graph=True, allow_unused=True)
            flat = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
            per_output.append(torch.cat([g.reshape(-1) for g in flat]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_ntk(model: nn.Module, X: torch.Tensor, X2: torch.Tensor | None = None) -> torch.Tensor:
    """Theta = J1 J2^T -> (N1, N2, k, k)."""
    J1 = loop_jacobian(model, X)
    J2 = J1 if X2 is None else loop_jacobian(model, X2)
    return torch.einsum("iap,jbp->ijab", J1, J2)


class Squeeze(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-1)


def small_cnn(k: int, squeeze: bool = False) -> nn.Module:
    torch.manual_seed(k)
    layers = [nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, k)]
    return nn.Sequential(*layers, *([Squeeze()] if squeeze else [])).to(F64).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


CNN_X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
CNN_X2 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
_REFS: dict[tuple[int, bool], torch.Tensor] = {}


def cnn_reference(k: int, symmetric: bool) -> torch.Tensor:
    if (k, symmetric) not in _REFS:
        _REFS[k, symmetric] = reference_ntk(small_cnn(k), CNN_X, None if symmetric else CNN_X2)
    return _REFS[k, symmetric]


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("method", ["jacobian", "ntvp", "auto"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tiny_budget", [False, True])
def test_cnn_matches_autograd_loop(k, method, symmetric, tiny_budget):
    model = small_cnn(k, squeeze=k == 1)  # k = 1: output (N,) -> Theta (N1, N2)
    calls: list[tuple[int, int]] = []
    # two one-sample Jacobians: blocks of 2 inputs (jacobian), 1 x 1 (ntvp)
    budget = 4 * k * n_params(model) * 8 if tiny_budget else 2**30
    theta = generic_ntk(
        model,
        CNN_X,
        None if symmetric else CNN_X2,
        method=method,
        memory_budget=budget,
        progress=lambda done, total: calls.append((done, total)),
    )
    ref = cnn_reference(k, symmetric)
    assert rel_err(theta, ref[:, :, 0, 0] if k == 1 else ref) < TOL
    total = calls[-1][1]
    assert [c[0] for c in calls] == list(range(1, total + 1))
    assert (total > 1) == tiny_budget  # several block pairs exactly when the budget is tiny


@pytest.mark.parametrize("budget_units", [1.5, 2.5, 4, 7, 30])
def test_ntvp_uneven_groups_and_row_blocks(budget_units):
    """Column groups and row blocks of different sizes (symmetric: the mirrored strip)."""
    model = small_cnn(3)
    X = torch.cat([CNN_X, CNN_X2[:2]])
    budget = int(budget_units * 3 * n_params(model) * 8)
    ref = reference_ntk(model, X)
    for method in ("ntvp", "jacobian"):
        assert rel_err(generic_ntk(model, X, method=method, memory_budget=budget), ref) < TOL


def mlp_with_layernorm() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # frozen: not part of Theta
    return model.to(F64)


def mlp_with_eval_batchnorm() -> nn.Module:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(F64)
    model.train()(torch.randn(32, 4, dtype=F64))  # non-trivial running statistics
    return model.eval()


@pytest.mark.parametrize("make", [mlp_with_layernorm, mlp_with_eval_batchnorm])
@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
def test_batch_independent_layers_k3(make, method):
    model = make()
    X, X2 = torch.randn(6, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    theta = generic_ntk(model, X, X2, method=method)
    assert theta.shape == (6, 3, 3, 3)
    assert rel_err(theta, reference_ntk(model, X, X2)) < TOL
    assert rel_err(generic_ntk(model, X, method=method), reference_ntk(model, X)) < TOL


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_trace_outputs_is_the_mean_of_the_diagonal(method, symmetric):
    model = small_cnn(10)
    X2 = None if symmetric else CNN_X2
    full = generic_ntk(model, CNN_X, X2, method=method)
    for budget in (2**30, 3 * 10 * n_params(model) * 8):
        trace = generic_ntk(model, CNN_X, X2, trace_outputs=True, method=method, memory_budget=budget)
        assert trace.shape == full.shape[:2]
        assert rel_err(trace, full.diagonal(dim1=2, dim2=3).mean(-1)) < TOL


def test_single_output_column_keeps_its_output_axes():
    model = small_cnn(1)  # output (N, 1), not squeezed
    theta = generic_ntk(model, CNN_X, CNN_X2)
    assert theta.shape == (5, 4, 1, 1)
    assert rel_err(theta, cnn_reference(1, False)) < TOL


def test_dtype_follows_the_model():
    theta = generic_ntk(small_cnn(2).float(), CNN_X)  # float64 inputs, float32 model
    assert theta.dtype == torch.float32
    # float32 rounding (~1e-7 per product, sums of a few hundred terms)
    assert rel_err(theta.double(), reference_ntk(small_cnn(2), CNN_X)) < 1e-5


class NTKParametrizedMLP(nn.Module):
    """ntkrun's MLP formula with the same trainable W, b: z = a W^T / sqrt(n_l) + beta b."""

    def __init__(self, net: MLP) -> None:
        super().__init__()
        self.W = nn.ParameterList(nn.Parameter(w.detach().clone()) for w in net.weights)
        self.b = nn.ParameterList(nn.Parameter(b.detach().clone()) for b in net.biases)
        self.sizes, self.beta = list(net.sizes), net.beta

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        a = X
        for l, (W, b) in enumerate(zip(self.W, self.b, strict=True)):
            z = a @ W.T / math.sqrt(self.sizes[l]) + self.beta * b
            a = torch.relu(z)
        return z[:, 0]


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "auto"])
def test_agrees_with_the_fast_mlp_path(method):
    net = MLP(5, 12, 3, "relu", beta=0.1, seed=0, dtype=F64)
    model = NTKParametrizedMLP(net)
    X, X2 = torch.randn(7, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    assert rel_err(generic_ntk(model, X, method=method), empirical_ntk(net, X)) < TOL
    assert rel_err(generic_ntk(model, X, X2, method=method), empirical_ntk(net, X, X2)) < TOL


class Bad(nn.Module):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 2).double(), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return {"3d": y[:, :, None], "sum": y.sum(), "tuple": (y,)}[self.out]


def test_bad_inputs_raise_value_errors():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="method must be one of auto, jacobian, ntvp; got 'fast'"):
        generic_ntk(model, X, method="fast")
    with pytest.raises(ValueError, match="memory_budget"):
        generic_ntk(model, X, memory_budget=0)
    with pytest.raises(ValueError, match=r"X must have a leading batch dimension N >= 1; got shape \(\)"):
        generic_ntk(model, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"X must have a leading batch dimension N >= 1; got shape \(0, 3\)"):
        generic_ntk(model, X[:0])
    with pytest.raises(ValueError, match=r"X2 must have a leading batch dimension"):
        generic_ntk(model, X, X[:0])
    with pytest.raises(ValueError, match=r"X2 has trailing shape \(4,\) but X has \(3,\)"):
        generic_ntk(model, X, torch.randn(2, 4))
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        generic_ntk(model, torch.cat([X, torch.full((1, 3), math.nan)]))
    with pytest.raises(ValueError, match="X2 contains NaN or inf"):
        generic_ntk(model, X, torch.full((1, 3), math.inf))
    for out, got in (("3d", r"\(2, 2, 1\)"), ("sum", r"\(\)"), ("tuple", "tuple")):
        with pytest.raises(
            ValueError, match=rf"model output must have shape \(N,\) or \(N, k\); got {got} for N = 2"
        ):
            generic_ntk(Bad(out), X)
    frozen = nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        generic_ntk(frozen, X)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' is in train mode.*model\.eval\(\)"):
        generic_ntk(bn, X)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match="Dropout '1' is in train mode"):
        generic_ntk(drop, X)


GIB = 2**30


def test_choose_method_by_cost():
    # dense net (F = 2P), many outputs: ntvp's 2 S n^2 k F = 8 n^2 k P beats the 2 n^2 k^2 P contraction
    assert choose_method(200, 200, 10, 10**5, GIB, 4) == "ntvp"
    assert choose_method(200, 200, 10, 10**5, GIB, 4, symmetric=True) == "ntvp"
    # one output, or only the trace: the contraction (2 n^2 k P) is cheaper than the jvps
    assert choose_method(200, 200, 1, 10**5, GIB, 4) == "jacobian"
    assert choose_method(200, 200, 10, 10**5, GIB, 4, trace_outputs=True) == "jacobian"
    # weight sharing (conv net: F = 50 P): a jvp costs ~F per pair and output, the contraction k P
    assert choose_method(200, 200, 10, 10**5, GIB, 4, forward_flops=50 * 2 * 10**5) == "jacobian"


def test_choose_method_by_memory():
    P, n, k = 10**6, 1000, 3
    assert choose_method(n, n, k, P, 2 * n * k * P * 4, 4) == "jacobian"  # every Jacobian fits at once
    # blocks of one input: the jacobian method recomputes every column Jacobian per row -> ntvp
    assert choose_method(n, n, k, P, 2 * k * P * 4, 4) == "ntvp"
    # not even one input's Jacobian pair fits: only ntvp keeps to the budget, even for k = 1
    assert choose_method(n, n, 1, P, 2 * P * 4 - 1, 4) == "ntvp"
    assert choose_method(n, n, 1, P, 2 * P * 4, 4) == "jacobian"


def test_the_jacobian_blocks_stay_within_the_memory_budget():
    """A 240-input Gram whose Jacobians (240 x 280k parameters, 540 MB) are 8x the 64 MB budget:
    the engine holds two blocks at a time (the budget) and a few small per-sample tensors. The
    tensors alive at once (LiveBytes, exact, the same on every CPU) peak at 0.98x the budget; they
    peaked at 1.45x while a block's successor was computed before the block was let go (three
    blocks live). 1.2x sits between the two."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 1)]
    model = nn.Sequential(*layers).double()
    X = torch.randn(240, 32, dtype=torch.float64)
    budget = 64 * 2**20
    with LiveBytes() as held:
        generic_ntk(model, X, method="jacobian", memory_budget=budget)
    assert held.peak < 1.2 * budget, held.peak / budget
