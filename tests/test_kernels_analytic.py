from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from ntkrun.kernels import analytic_kernels, empirical_nngp, empirical_ntk
from ntkrun.kernels.analytic import erf_expectations, quadrature_expectations, relu_expectations
from ntkrun.network import MLP
from ntkrun.nonlinearities import get_nonlinearity

COVS = [
    (1.0, 0.3, 0.7),
    (2.0, -1.1, 1.5),
    (0.5, 0.5, 0.5),
    (1.0, -1.0, 1.0),
    (0.3, 0.0, 4.0),
    (1.2, 0.9, 0.8),
]


def scipy_relu(sxx: float, sxy: float, syy: float) -> tuple[float, float]:
    """E[relu(u) relu(v)] by adaptive 2-D quadrature on the positive quadrant;
    E[relu'(u) relu'(v)] = P(u > 0, v > 0)."""
    cov = np.array([[sxx, sxy], [sxy, syy]])
    if abs(np.linalg.det(cov)) < 1e-12:  # degenerate: v = c u
        c = sxy / sxx
        e_ss = c * sxx / 2 if c > 0 else 0.0
        return e_ss, 0.5 if c > 0 else 0.0
    dist = stats.multivariate_normal(mean=[0, 0], cov=cov)
    e_ss, _ = integrate.dblquad(lambda v, u: u * v * dist.pdf([u, v]), 0, np.inf, 0, np.inf, epsabs=1e-12)
    return e_ss, float(dist.cdf([0, 0]))  # P(u<0, v<0) = P(u>0, v>0) by symmetry


@pytest.mark.parametrize("cov", COVS)
def test_relu_closed_form_matches_scipy_integration(cov):
    e_ss, e_dd = relu_expectations(*(torch.tensor(c, dtype=torch.float64) for c in cov))
    ref_ss, ref_dd = scipy_relu(*cov)
    assert e_ss.item() == pytest.approx(ref_ss, abs=1e-7)  # dblquad's achieved accuracy here
    assert e_dd.item() == pytest.approx(ref_dd, abs=1e-5)  # scipy's Genz cdf default abseps 1e-5


@pytest.mark.parametrize("cov", COVS)
def test_erf_closed_form_matches_quadrature(cov):
    """Order 64 reaches 1e-8 for variances up to 2; erf'(v)^2 ~ exp(-2 v^2) narrows as the
    variance grows, so the variance-4 case needs order 128 for the same accuracy."""
    args = [torch.tensor(c, dtype=torch.float64) for c in cov]
    closed = erf_expectations(*args)
    order = 64 if max(cov) <= 2 else 128
    quad = quadrature_expectations(get_nonlinearity("erf"), order=order)(*args)
    for c, q in zip(closed, quad, strict=True):
        assert c.item() == pytest.approx(q.item(), abs=1e-8)


def scipy_gauss_expectation(f, cov: tuple[float, float, float]) -> float:
    """E[f(u, v)] for (u, v) ~ N(0, [[sxx, sxy], [sxy, syy]]) by adaptive quadrature on the
    standard normal z with (u, v) = L z (L the Cholesky factor; 1-D when the covariance is
    singular). Independent of ntkrun's Gauss-Hermite rule."""
    sxx, sxy, syy = cov
    a = math.sqrt(sxx)
    c = sxy / a if a > 0 else 0.0
    d2 = syy - c * c
    phi = stats.norm.pdf
    if d2 < 1e-12:
        return integrate.quad(lambda z: f(a * z, c * z) * phi(z), -12, 12, epsabs=1e-13, limit=200)[0]
    d = math.sqrt(d2)
    value, _ = integrate.dblquad(
        lambda z2, z1: f(a * z1, c * z1 + d * z2) * phi(z1) * phi(z2), -12, 12, -12, 12, epsabs=1e-12
    )
    return value


@pytest.mark.parametrize("cov", COVS)
def test_erf_closed_form_matches_scipy_integration(cov):
    """The erf closed forms against scipy's adaptive quadrature of the defining integrals
    (a reference independent of ntkrun's quadrature): 1e-8, what dblquad reaches here."""
    erf_dot = lambda z: 2 / math.sqrt(math.pi) * math.exp(-z * z)  # noqa: E731
    e_ss, e_dd = erf_expectations(*(torch.tensor(c, dtype=torch.float64) for c in cov))
    ref_ss = scipy_gauss_expectation(lambda u, v: math.erf(u) * math.erf(v), cov)
    ref_dd = scipy_gauss_expectation(lambda u, v: erf_dot(u) * erf_dot(v), cov)
    assert e_ss.item() == pytest.approx(ref_ss, abs=1e-8)
    assert e_dd.item() == pytest.approx(ref_dd, abs=1e-8)


def test_layer_recursion_matches_a_scalar_reference_loop():
    """docs/science.md §3 written out for one pair of inputs with scipy expectations, depth 4."""
    x, xp, beta, depth = np.array([0.3, -1.2, 0.8]), np.array([1.0, 0.4, -0.5]), 0.1, 4
    sxx, sxy, syy = x @ x / 3 + beta**2, x @ xp / 3 + beta**2, xp @ xp / 3 + beta**2
    theta = sxy
    for _ in range(depth - 1):
        e_ss, e_dd = scipy_relu(sxx, sxy, syy)
        theta = theta * e_dd + e_ss + beta**2
        sxx, syy, sxy = sxx / 2 + beta**2, syy / 2 + beta**2, e_ss + beta**2  # E[relu(u)^2] = S/2
    sigma, th = analytic_kernels(
        torch.tensor(np.stack([x])), torch.tensor(np.stack([xp])), depth, "relu", beta
    )
    assert sigma.item() == pytest.approx(sxy, abs=1e-6)
    assert th.item() == pytest.approx(theta, abs=1e-5)


@pytest.mark.parametrize("widths", [None, [7, 9, 11]])
def test_in_place_relu_tiles_match_a_numpy_recursion(widths):
    """The in-place ReLU recursion on reused tile buffers (several column tiles: N2 = 2500 > 1024)
    against the closed form written out in numpy over all pairs, both parametrizations, depth 4:
    the same formulas in another order of operations, so agreement to 1e-12 relative."""
    g = np.random.default_rng(3)
    X, X2, beta = g.normal(size=(40, 6)), g.normal(size=(2500, 6)), 0.1
    sxy = X @ X2.T / 6 + beta**2
    sxx, syy = (X * X).sum(1)[:, None] / 6 + beta**2, (X2 * X2).sum(1)[None, :] / 6 + beta**2
    theta = X @ X2.T + 1 if widths else sxy.copy()
    for l in range(3):
        s = np.sqrt(sxx * syy)
        rho = np.clip(sxy / s, -1, 1)
        e_ss = s * (np.sqrt(1 - rho**2) + (np.pi - np.arccos(rho)) * rho) / (2 * np.pi)
        e_dd = (np.pi - np.arccos(rho)) / (2 * np.pi)
        theta = theta * e_dd + (widths[l] * e_ss + 1 if widths else e_ss + beta**2)
        sxx, syy, sxy = sxx / 2 + beta**2, syy / 2 + beta**2, e_ss + beta**2
    kw = {"parametrization": "standard", "widths": widths} if widths else {}
    sigma, th = analytic_kernels(torch.tensor(X), torch.tensor(X2), 4, "relu", beta, **kw)
    np.testing.assert_allclose(sigma.numpy(), sxy, rtol=1e-12)
    np.testing.assert_allclose(th.numpy(), theta, rtol=1e-12)


def test_symmetric_psd_and_blocking():
    X = torch.randn(40, 5, dtype=torch.float64)
    X2 = torch.randn(7, 5, dtype=torch.float64)
    for nonlinearity in ("relu", "erf", "tanh"):
        sigma, theta = analytic_kernels(X, depth=3, nonlinearity=nonlinearity, quadrature_order=32)
        for K in (sigma, theta):
            assert torch.allclose(K, K.T, rtol=0, atol=1e-12)
            assert torch.linalg.eigvalsh(K).min() > -1e-10 * K.abs().max()
    s_ab, t_ab = analytic_kernels(X, X2, depth=4)
    s_ba, t_ba = analytic_kernels(X2, X, depth=4)
    assert torch.allclose(s_ab, s_ba.T, rtol=0, atol=1e-12)
    assert torch.allclose(t_ab, t_ba.T, rtol=0, atol=1e-12)


def test_all_layers_ends_with_the_final_kernels():
    X = torch.randn(6, 2, dtype=torch.float64)
    sigmas, thetas = analytic_kernels(X, depth=3, all_layers=True)
    sigma, theta = analytic_kernels(X, depth=3)
    assert sigmas.shape == (3, 6, 6)
    assert torch.equal(sigmas[-1], sigma) and torch.equal(thetas[-1], theta)
    assert torch.equal(thetas[0], sigmas[0])  # Theta(1) = Sigma(1)


def test_degenerate_inputs_are_finite_and_exact():
    """beta = 0, ReLU, |x|^2/n0 = 1/2: Theta(L)(x, x) = L (1/2) / 2^(L-1); Theta(0, .) = 0;
    Theta(2)(x, -x) = 0 (rho = -1), then Sigma(2)(x, -x) = 0 gives rho = 0 at layer 3, so
    Theta(3)(x, -x) = 0 * Sdot + Sigma(2)(x, x) / (2 pi) = 1 / (8 pi)."""
    x = torch.tensor([[0.6, -0.8], [-0.6, 0.8], [0.0, 0.0]], dtype=torch.float64)
    for depth in (2, 3, 5):
        sigma, theta = analytic_kernels(x, depth=depth, beta=0.0)
        assert torch.isfinite(theta).all() and torch.isfinite(sigma).all()
        assert theta[0, 0].item() == pytest.approx(depth * 0.5 / 2 ** (depth - 1), rel=1e-12)
        assert torch.all(theta[2] == 0)
    assert analytic_kernels(x, depth=2, beta=0.0)[1][0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert analytic_kernels(x, depth=3, beta=0.0)[1][0, 1].item() == pytest.approx(
        1 / (8 * math.pi), rel=1e-12
    )
    _, theta = analytic_kernels(x, depth=4, beta=0.1)
    assert torch.isfinite(theta).all() and theta[2, 2] > 0


def test_mean_empirical_ntk_over_200_seeds_matches_the_limit():
    """Theorem 1 in expectation: the mean of Theta_n over 200 width-1024 nets against Theta(4).

    The tolerance is 4.5 standard errors of the mean, estimated from the observed spread across
    seeds. Over the 28 distinct entries a false alarm has probability < 28 * 7e-6 (Bonferroni);
    the finite-width bias of the mean (O(1/n), measured < 1% relative) is below that.
    The same statistic must reject a wrong limit (depth 3 or beta 0), so the test has power.
    """
    gammas = torch.linspace(-math.pi, math.pi, 7)[:-1]
    X = torch.cat([torch.stack([gammas.cos(), gammas.sin()], 1), torch.tensor([[2.0, -1.0]])]).double()
    samples = torch.stack([empirical_ntk(MLP(2, 1024, 4, seed=s), X).double() for s in range(200)])
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(200)
    _, theta = analytic_kernels(X, depth=4)
    assert ((mean - theta).abs() / se).max() < 4.5
    for wrong in (analytic_kernels(X, depth=3)[1], analytic_kernels(X, depth=4, beta=0.0)[1]):
        assert ((mean - wrong).abs() / se).max() > 4.5


@pytest.mark.parametrize("nonlinearity", ["relu", "erf", "tanh", "gelu", "softplus", "identity"])
def test_every_nonlinearity_matches_the_mean_of_wide_networks(nonlinearity):
    """Mean over 100 width-512 depth-3 networks of Theta_n and of the last-layer Sigma estimate,
    against the limit (closed form or quadrature of order 64); 4.5 standard errors, as above."""
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.7, 0.7], [0.3, -1.5]], dtype=torch.float64)
    nets = [MLP(2, 512, 3, nonlinearity=nonlinearity, seed=s) for s in range(100)]
    thetas = torch.stack([empirical_ntk(net, X).double() for net in nets])
    sigmas = torch.stack([empirical_nngp(net, X).double() for net in nets])
    sigma, theta = analytic_kernels(X, depth=3, nonlinearity=nonlinearity)
    for samples, limit in ((thetas, theta), (sigmas, sigma)):
        se = samples.std(0) / 10
        assert ((samples.mean(0) - limit).abs() / se).max() < 4.5


def test_quadrature_with_a_user_defined_nonlinearity():
    """A Nonlinearity object that is not registered goes through quadrature: erf written by hand
    must agree with the erf closed form at depth 4 to the quadrature's accuracy at order 64."""
    from ntkrun.nonlinearities import Nonlinearity

    mine = Nonlinearity("my_erf", torch.erf, lambda z: 2 / math.sqrt(math.pi) * torch.exp(-z * z))
    X = torch.randn(6, 3, dtype=torch.float64) / 2
    closed = analytic_kernels(X, depth=4, nonlinearity="erf")
    quad = analytic_kernels(X, depth=4, nonlinearity=mine)
    for c, q in zip(closed, quad, strict=True):
        assert not torch.equal(c, q) and torch.allclose(c, q, rtol=0, atol=1e-8)


def test_mean_nngp_estimate_matches_sigma():
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.7, 0.7]], dtype=torch.float64)
    samples = torch.stack([empirical_nngp(MLP(2, 512, 3, seed=s), X).double() for s in range(200)])
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(200)
    sigma, _ = analytic_kernels(X, depth=3)
    assert ((mean - sigma).abs() / se).max() < 4.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": torch.zeros(0, 2)}, "N = 0"),
        ({"X": torch.tensor([[float("inf"), 0.0]])}, "NaN or inf"),
        ({"X": torch.zeros(2, 2), "X2": torch.zeros(2, 3)}, "input dimensions"),
        ({"X": torch.zeros(2, 2), "depth": 0}, "depth"),
        ({"X": torch.zeros(2, 2), "nonlinearity": "sigmoidish"}, "unknown nonlinearity"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        analytic_kernels(**kwargs)


def test_the_diagonal_is_exact_and_the_matrix_symmetric():
    """On the diagonal the correlation is exactly 1 (theta = 0): Sigma(l+1)(x, x) = Sigma(l)(x, x)/2
    + beta^2 and Theta(l+1) = Theta(l)/2 + Sigma(l+1) for ReLU. Computed through arccos of a rho
    rounded to 1 - 1e-16, the diagonal would be off by ~1e-8 relative (arccos' slope at 1)."""
    X = torch.rand(300, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma, theta = analytic_kernels(X, depth=5, beta=0.1)
    s = (X * X).sum(1) / 784 + 0.01
    t = s.clone()
    for _ in range(4):
        s = s / 2 + 0.01
        t = t / 2 + s
    assert torch.allclose(sigma.diag(), s, rtol=1e-14, atol=0)  # a few ulps per layer
    assert torch.allclose(theta.diag(), t, rtol=1e-14, atol=0)
    assert torch.equal(sigma, sigma.T) and torch.equal(theta, theta.T)
    off = analytic_kernels(X[:40], X[:40].clone() + 0.0, depth=5, beta=0.1)[1]  # the general path
    assert torch.allclose(off, theta[:40, :40], rtol=1e-7, atol=0)  # the same up to arccos near 1
