"""Vector outputs and the standard parametrization (docs/science.md §7.1, §7.2), each against an
independent reference: per-sample Jacobians from torch.func, autograd gradients, Monte Carlo."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from ntkrun import dynamics
from ntkrun.errors import ResourceError
from ntkrun.kernels import analytic_kernel, analytic_kernels, empirical_nngp, empirical_ntk
from ntkrun.linalg import mirror_
from ntkrun.network import MLP, gd_step, mse_cost

# float64 sums of the same products in another order: 1e-10 relative is 10^5 above rounding.
TOL = 1e-10


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # the inputs: every verdict here is deterministic


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def jacobian_ntk_k(net: MLP, X: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
    """Reference: sum over parameters of J_a(x) J_b(x')^T from per-sample Jacobians -> (N1, N2, k, k)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, x):
        return functional_call(net, p, (x[None],)).reshape(-1)  # (k,)

    J1 = vmap(jacrev(f), (None, 0))(params, X)
    J2 = vmap(jacrev(f), (None, 0))(params, X2)
    k = net.n_out
    return sum(
        torch.einsum("iap,jbp->ijab", J1[n].reshape(len(X), k, -1), J2[n].reshape(len(X2), k, -1))
        for n in params
    )


@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
@pytest.mark.parametrize("block_size", [None, 3])
def test_vector_output_ntk_matches_per_sample_jacobians(parametrization, block_size):
    f64 = torch.float64
    net = MLP(3, [7, 12, 5], 4, beta=0.3, seed=2, dtype=f64, n_out=4, parametrization=parametrization)
    X, X2 = torch.randn(8, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for A, B in ((X, None), (X, X2)):
        ours = empirical_ntk(net, A, B, block_size=block_size)
        ref = jacobian_ntk_k(net, A, A if B is None else B)
        assert ours.shape == ref.shape == (len(A), len(A if B is None else B), 4, 4)
        assert rel_err(ours, ref) < TOL
        traced = empirical_ntk(net, A, B, trace_outputs=True, block_size=block_size)
        assert rel_err(traced, torch.diagonal(ref, dim1=-2, dim2=-1).mean(-1)) < TOL


def test_per_layer_vector_outputs_sum_to_the_kernel():
    net = MLP(3, 6, 3, seed=0, dtype=torch.float64, n_out=3)
    X = torch.randn(5, 3, dtype=torch.float64)
    layers = empirical_ntk(net, X, per_layer=True)
    assert layers.shape == (3, 5, 5, 3, 3)
    assert rel_err(layers.sum(0), empirical_ntk(net, X)) < TOL


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_standard_parametrization_ntk_matches_per_sample_jacobians(nonlinearity):
    net = MLP(4, [9, 6], 3, nonlinearity, beta=0.2, seed=1, dtype=torch.float64, parametrization="standard")
    X, X2 = torch.randn(7, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert empirical_ntk(net, X, X2).shape == (7, 6)
    assert rel_err(empirical_ntk(net, X, X2), jacobian_ntk_k(net, X, X2)[..., 0, 0]) < TOL


def test_one_seed_gives_the_same_function_in_both_parametrizations():
    X = torch.randn(20, 5, dtype=torch.float64)
    for n_out in (1, 3):
        a = MLP(5, 64, 4, beta=0.1, seed=7, dtype=torch.float64, n_out=n_out)
        b = MLP(5, 64, 4, beta=0.1, seed=7, dtype=torch.float64, n_out=n_out, parametrization="standard")
        assert rel_err(b(X), a(X)) < 1e-12  # W / sqrt(n) then W a, against (W a) / sqrt(n)
        assert rel_err(empirical_nngp(b, X), empirical_nngp(a, X)) < 1e-12
    # the NTKs differ: the standard one grows like the width
    ntk_a, ntk_b = empirical_ntk(a, X, trace_outputs=True), empirical_ntk(b, X, trace_outputs=True)
    assert (ntk_b.diag() / ntk_a.diag()).min() > 10


@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
@pytest.mark.parametrize("n_out", [1, 3])
def test_gd_step_is_gradient_descent_on_the_cost(parametrization, n_out):
    """The fused update equals p - lr * dC/dp from autograd, C = 1/(2N) sum_i |f(x_i) - y_i|^2."""
    f64 = torch.float64
    net = MLP(3, [8, 5], 3, beta=0.4, seed=3, dtype=f64, n_out=n_out, parametrization=parametrization)
    X = torch.randn(10, 3, dtype=f64)
    y = torch.randn(10, n_out, dtype=f64)
    y = y[:, 0] if n_out == 1 else y
    cost = mse_cost(net(X), y)
    if n_out > 1:
        assert cost.item() == pytest.approx(0.5 * ((net(X) - y) ** 2).sum().item() / 10, rel=1e-14)
    grads = torch.autograd.grad(cost, list(net.parameters()))
    expected = [p.detach() - 0.05 * g for p, g in zip(net.parameters(), grads, strict=True)]
    gd_step(net, X, y, lr=0.05)
    for p, e in zip(net.parameters(), expected, strict=True):
        assert rel_err(p.detach(), e) < 1e-12


def test_vector_outputs_train_like_independent_scalar_columns_in_the_dynamics():
    """Section 4 per output column with the same K: one (N, k) call equals k scalar calls."""
    X, Z = torch.randn(12, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    _, K = analytic_kernels(X, depth=3)
    _, k_test = analytic_kernels(Z, X, depth=3)
    eig = dynamics.eigen(K)
    Y, F0, G0 = (torch.randn(12, 3, dtype=torch.float64) for _ in range(3))
    G0 = G0[:4]
    together = dynamics.linearized(eig, k_test, Y, F0, G0, t=2.0)
    for a in range(3):
        alone = dynamics.linearized(eig, k_test, Y[:, a], F0[:, a], G0[:, a], t=2.0)
        assert rel_err(together[:, a], alone) < 1e-12


def test_wide_vector_output_ntk_approaches_theta_kron_identity():
    """Theta_ab -> Theta(L) delta_ab: the cross-output terms vanish like width^-1/2."""
    X = torch.randn(6, 4, dtype=torch.float64)
    _, theta = analytic_kernels(X, depth=3)
    errors = []
    for width in (64, 4096):
        full = empirical_ntk(MLP(4, width, 3, seed=0, dtype=torch.float64, n_out=3), X)
        eye = torch.eye(3, dtype=torch.float64)
        errors.append(rel_err(full, theta[..., None, None] * eye))
    # one seed: the error is O(width^-1/2) with an O(1) constant; 64x the width should cut it by
    # ~8; asking for 3 leaves room for the seed's luck, and the wide one must be close.
    assert errors[1] < errors[0] / 3 and errors[1] < 0.1, errors


def test_standard_parametrization_limit_at_finite_width():
    """The standard NTK at width n is n-dependent; the analytic kernel at the same widths matches
    the empirical one averaged over 8 seeds: one seed's max deviation is 2-15% at n = 2048 (the
    O(n^-1/2) fluctuation), the mean of 8 should be within ~5%; the NTK parametrization's limit
    is off by the factor ~n."""
    X = torch.randn(5, 3, dtype=torch.float64)
    width = 2048
    emp = torch.stack(
        [
            empirical_ntk(MLP(3, width, 3, seed=s, dtype=torch.float64, parametrization="standard"), X)
            for s in range(8)
        ]
    ).mean(0)
    _, limit = analytic_kernels(X, depth=3, parametrization="standard", widths=width)
    _, limit_ntk = analytic_kernels(X, depth=3)
    assert rel_err(emp, limit) < 0.06
    assert rel_err(emp, limit_ntk) > 100  # a different object: never mix the two
    # Sigma is the same function-space prior in both
    s_std, _ = analytic_kernels(X, depth=3, parametrization="standard", widths=[width, width])
    s_ntk, _ = analytic_kernels(X, depth=3)
    assert torch.equal(s_std, s_ntk)


def test_float32_storage_and_row_ranges_rebuild_the_same_gram():
    X = torch.randn(70, 6, dtype=torch.float64)
    sigma, theta = analytic_kernels(X, depth=4)
    s32, t32 = analytic_kernels(X, depth=4, out_dtype=torch.float32)
    assert s32.dtype == t32.dtype == torch.float32
    assert torch.equal(t32, theta.float()) and torch.equal(s32, sigma.float())  # computed in float64
    for kind, ref in (("ntk", theta), ("nngp", sigma)):
        out = torch.full((70, 70), math.nan, dtype=torch.float32)
        for r0 in range(0, 70, 25):
            rows = (r0, min(r0 + 25, 70))
            analytic_kernel(X, depth=4, kind=kind, out_dtype=torch.float32, out=out, rows=rows)
        mirror_(out, to_lower=True)
        assert torch.equal(out, ref.float())
    whole = analytic_kernel(X, depth=4, out_dtype=torch.float32)  # no rows: mirrored
    assert torch.equal(whole, theta.float())


@pytest.mark.parametrize("n", [70, 600])  # one tile of rows (2**18 // 600 = 436 rows), and two
def test_a_grams_numbers_do_not_depend_on_how_its_rows_are_split(n):
    """The promise of ntkrun.kernels.tiles: every entry comes out of the same tile of a grid fixed by
    the Gram's size, so row ranges that cut tiles anywhere (a unit's block, a checkpoint part) give
    the whole Gram's numbers bit for bit, on any CPU: no tolerance, since the arithmetic is the same
    (BLAS and the vectorized loops pick their kernels by shape; shapes are the tiles')."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 6, dtype=torch.float64, generator=g)
    X2 = torch.randn(n // 2 + 3, 6, dtype=torch.float64, generator=g)
    sigma, theta = analytic_kernels(X, depth=3)
    cross = analytic_kernels(X, X2, depth=3)
    for cuts in ([0, 9, 25, 26, n - 1, n], [0, 4, min(437, n - 1), n], [0, n // 3, n]):
        for kind, ref, ref_cross in (("ntk", theta, cross[1]), ("nngp", sigma, cross[0])):
            out = torch.full((n, n), math.nan, dtype=torch.float64)
            out2 = torch.full(ref_cross.shape, math.nan, dtype=torch.float64)
            for rows in itertools.pairwise(cuts):
                analytic_kernel(X, depth=3, kind=kind, out=out, rows=rows)
                analytic_kernel(X, X2, depth=3, kind=kind, out=out2, rows=rows)
            mirror_(out, to_lower=True)
            assert torch.equal(out, ref) and torch.equal(out2, ref_cross)


def test_a_kernel_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    """10^6 points: two (N, N) float64 outputs, 1.6e13 bytes = 1.49e4 GiB; under the 64 GiB limit
    this test sets, refused with the estimate and the limit, as the project's ResourceError (a
    MemoryError too, for library callers)."""
    monkeypatch.setenv("NTKRUN_MEMORY_LIMIT", "64G")
    X = torch.zeros(10**6, 2)
    limit = r"more than the 64 GiB available \(\$NTKRUN_MEMORY_LIMIT\)"
    with pytest.raises(ResourceError, match=rf"analytic_kernels: .* need 1.49e\+04 GiB, {limit}"):
        analytic_kernels(X, depth=2)
    with pytest.raises(MemoryError, match=rf"empirical_ntk: .* GiB, {limit}"):
        empirical_ntk(MLP(2, 4, 2, n_out=3), X)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: MLP(3, 4, 2, n_out=0), "n_out"),
        (lambda: MLP(3, 4, 2, parametrization="sp"), "parametrization"),
        (lambda: analytic_kernels(torch.ones(2, 2), parametrization="standard"), "widths"),
        (lambda: analytic_kernels(torch.ones(2, 2), 3, parametrization="standard", widths=[4]), "widths"),
        (lambda: analytic_kernels(torch.ones(2, 2), parametrization="mup"), "parametrization"),
        (lambda: analytic_kernels(torch.ones(2, 2), out_dtype=torch.float16), "out_dtype"),
        (lambda: analytic_kernel(torch.ones(2, 2), kind="gp"), "kind"),
        (lambda: analytic_kernel(torch.ones(2, 2), rows=(1, 5)), "rows"),
        (lambda: analytic_kernel(torch.ones(2, 2), out=torch.empty(3, 3)), "out"),
        (lambda: mse_cost(torch.zeros(4, 2), torch.zeros(4)), "targets"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_empirical_ntk_takes_any_module_through_the_generic_path():
    """A plain module goes to torch.func (ntkrun.kernels.generic); an ntkrun.MLP keeps the fast path."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    params = dict(model.named_parameters())

    def f(p, x):
        return functional_call(model, p, (x[None],))[0]

    J = vmap(jacrev(f), (None, 0))(params, X)
    ref = sum(torch.einsum("iap,jbp->ijab", J[n].reshape(5, 2, -1), J[n].reshape(5, 2, -1)) for n in params)
    assert rel_err(empirical_ntk(model, X), ref) < TOL
    with pytest.raises(ValueError, match="per_layer"):
        empirical_ntk(model, X, per_layer=True)
