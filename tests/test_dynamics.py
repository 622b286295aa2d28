from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg, stats

from ntkrun import dynamics
from ntkrun.errors import NumericalError
from ntkrun.kernels import analytic_kernels, empirical_ntk
from ntkrun.network import MLP, gd_step


def circle(angles: list[float]) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], 1)


def test_linearized_dynamics_reproduce_training_of_a_linear_model_exactly():
    """Depth 1: f is linear in its parameters, so its NTK is constant and GD follows
    f_k(x) = f_0(x) + A_k(x) (y - f_0(X)) with (I - lr K/N)^k exactly (float64 rounding)."""
    X, x_test = torch.randn(5, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    net = MLP(8, [], 1, beta=0.3, seed=0, dtype=torch.float64)
    eig = dynamics.eigen(empirical_ntk(net, X))
    k_test = empirical_ntk(net, x_test, X)
    with torch.no_grad():
        f0_train, f0_test = net(X).clone(), net(x_test).clone()
    lr, steps = 0.5, 40
    for _ in range(steps):
        gd_step(net, X, y, lr)
    predicted = dynamics.linearized(eig, k_test, y, f0_train, f0_test, steps * lr, lr=lr)
    with torch.no_grad():
        assert torch.allclose(net(x_test), predicted, rtol=0, atol=1e-12)
        on_train = dynamics.linearized(eig, empirical_ntk(net, X, X), y, f0_train, f0_train, steps * lr, lr)
        assert torch.allclose(net(X), on_train, rtol=0, atol=1e-12)


def test_small_steps_approach_gradient_flow():
    K = analytic_kernels(circle([-2.5, -0.9, 0.6, 2.2]), depth=3)[1]
    eig = dynamics.eigen(K)
    k_test = analytic_kernels(circle([0.1, 1.0]), circle([-2.5, -0.9, 0.6, 2.2]), depth=3)[1]
    flow = dynamics.predictor(eig, k_test, t=5.0)
    errors = [(dynamics.predictor(eig, k_test, 5.0, lr=lr) - flow).abs().max().item() for lr in (0.1, 0.05)]
    assert errors[0] < 1e-2 and 1.8 < errors[0] / errors[1] < 2.2  # first order in lr


def test_limit_interpolates_the_training_points_with_zero_variance():
    X = circle([-2.5, -0.9, 0.6, 2.2])
    y = X[:, 0] * X[:, 1]
    sigma, theta = analytic_kernels(X, depth=4)
    mean, var = dynamics.gaussian_process(
        dynamics.eigen(theta), theta, y, sigma, sigma, sigma.diag(), math.inf
    )
    assert torch.allclose(mean, y, atol=1e-10)
    assert var.max() < 1e-10
    _, var_finite = dynamics.gaussian_process(
        dynamics.eigen(theta), theta, y, sigma, sigma, sigma.diag(), 3.0
    )
    assert var_finite.min() > 1e-6  # at finite t the band has not collapsed yet


def test_wide_networks_trained_by_gd_match_the_predicted_gaussian():
    """32 networks of width 2048 (depth 3) trained for 100 steps: f_T at test points against the
    predicted mean and variance of the limiting Gaussian at t = T (discrete GD).

    Mean: |seed mean - predicted mean| < 4.5 standard errors (sqrt(var / 32)). Variance: the
    sample variance over 32 seeds must lie inside the chi-square(31) 0.1% .. 99.9% interval
    scaled by the predicted variance. Both bounds are statistical, from the number of seeds.
    """
    X, x_test = circle([-2.5, -0.9, 0.6, 2.2]), circle([-3.0, -1.7, 0.0, 1.4, 2.8])
    y = X[:, 0] * X[:, 1]
    depth, lr, steps, seeds = 3, 1.0, 100, 32
    outputs = []
    for seed in range(seeds):
        net = MLP(2, 2048, depth, seed=seed, dtype=torch.float32)
        Xf, yf = X.float(), y.float()
        for _ in range(steps):
            gd_step(net, Xf, yf, lr)
        with torch.no_grad():
            outputs.append(net(x_test.float()).double())
    f_T = torch.stack(outputs)
    sigma, theta = analytic_kernels(X, depth=depth)
    sigma_x, theta_x = analytic_kernels(x_test, X, depth=depth)
    sigma_xx = analytic_kernels(x_test, depth=depth)[0].diag()
    mean, var = dynamics.gaussian_process(
        dynamics.eigen(theta), theta_x, y, sigma, sigma_x, sigma_xx, steps * lr, lr=lr
    )
    z = (f_T.mean(0) - mean) / (var / seeds).sqrt()
    assert z.abs().max() < 4.5, z
    ratio = f_T.var(0) / var
    lo, hi = stats.chi2.ppf([0.001, 0.999], seeds - 1) / (seeds - 1)
    assert ((ratio > lo) & (ratio < hi)).all(), ratio


def test_percentiles():
    mean, var = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)
    p = dynamics.percentiles(mean, var)
    assert torch.allclose(p[1], mean)
    assert torch.allclose(p[0], mean - 1.2815515655446004 * var.sqrt())
    assert torch.allclose(p[2], mean + 1.2815515655446004 * var.sqrt())
    with pytest.raises(ValueError, match="strictly between"):
        dynamics.percentiles(mean, var, [0, 50])


def test_singular_kernel_needs_a_ridge_for_the_infinite_time_limit():
    X = circle([0.3, 0.3, 1.0])  # duplicate training point
    _, K = analytic_kernels(X, depth=3)
    eig = dynamics.eigen(K)
    assert eig.condition_number > 1e12
    with pytest.raises(NumericalError, match="singular"):
        dynamics.gain(eig, math.inf)
    assert torch.isfinite(dynamics.gain(eig, 100.0)).all()  # finite t is fine
    ridged = dynamics.eigen(K, ridge=1e-6)
    assert ridged.condition_number < 1e8 and torch.isfinite(dynamics.gain(ridged, math.inf)).all()


def test_gd_step_too_large_is_reported():
    eig = dynamics.eigen(torch.eye(3) * 30)
    with pytest.raises(NumericalError, match="diverges"):
        dynamics.gain(eig, 10.0, lr=1.0)  # lr * lambda / N = 10
    with pytest.raises(ValueError, match="whole number"):
        dynamics.decay(dynamics.eigen(torch.eye(3)), 1.5, lr=1.0)


def test_kernel_pca_power_iteration_agrees_with_the_dense_solver():
    X = torch.randn(60, 5, dtype=torch.float64)
    _, K = analytic_kernels(X, depth=3)
    lam_d, f_d = dynamics.kernel_pca_dense(K, 3)
    lam_p, f_p, iters = dynamics.kernel_pca_power(K, 3)
    assert torch.allclose(lam_p, lam_d, rtol=1e-10)
    assert torch.allclose(f_p, f_d, atol=1e-5)
    assert torch.allclose((f_d**2).mean(0), torch.ones(3, dtype=torch.float64))  # pin-norm 1
    assert torch.allclose(K @ f_d / 60, f_d * lam_d, atol=1e-10)  # (K/N) f = lambda f
    assert lam_d[0] > lam_d[1] > lam_d[2] > 0 and all(i > 1 for i in iters)


def test_eigen_rejects_bad_kernels():
    with pytest.raises(ValueError, match="square"):
        dynamics.eigen(torch.zeros(2, 3))
    with pytest.raises(NumericalError, match="NaN"):
        dynamics.eigen(torch.tensor([[float("nan")]]))


@pytest.mark.parametrize(("t", "lr"), [(7.0, None), (50.0, 1.0), (math.inf, None)])
def test_gaussian_process_matches_an_independent_evaluation(t, lr):
    """Mean and variance of f_t from the formulas of docs/science.md §4 evaluated directly in
    float64 numpy (matrix exponential or matrix power, then a linear solve) against ntkrun's one
    eigendecomposition. K here has condition number ~1e2, so both agree to ~1e-14: 1e-10 leaves
    room for summation order and nothing else. A variance with the cross term counted once
    instead of twice (a plausible slip) is off by far more, so this test would catch it."""
    X, x_test = circle([-2.5, -0.9, 0.6, 2.2]), circle([-3.0, -1.7, 0.0, 1.4, 2.8])
    y = (X[:, 0] * X[:, 1]).numpy()
    sigma, theta = analytic_kernels(X, depth=3)
    sigma_x, theta_x = analytic_kernels(x_test, X, depth=3)
    sigma_xx = analytic_kernels(x_test, depth=3)[0].diag()
    K, k, S, Sx, Sxx = (a.numpy() for a in (theta, theta_x, sigma, sigma_x, sigma_xx))
    n, eye = len(K), np.eye(len(K))
    assert np.linalg.cond(K) < 1e3
    if math.isinf(t):
        decay = np.zeros_like(K)
    elif lr is None:
        decay = linalg.expm(-t * K / n)
    else:
        decay = np.linalg.matrix_power(eye - lr * K / n, round(t / lr))
    A = k @ np.linalg.solve(K, eye - decay)
    mean_ref = A @ y
    var_ref = Sxx - 2 * (A * Sx).sum(1) + ((A @ S) * A).sum(1)
    mean, var = dynamics.gaussian_process(dynamics.eigen(theta), theta_x, torch.from_numpy(y), sigma,
                                          sigma_x, sigma_xx, t, lr=lr)  # fmt: skip
    scale = Sxx.max()
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=0, atol=1e-10 * np.abs(y).max())
    np.testing.assert_allclose(var.numpy(), var_ref, rtol=0, atol=1e-10 * scale)
    wrong = Sxx - (A * Sx).sum(1) + ((A @ S) * A).sum(1)
    assert np.abs(wrong - var_ref).max() > 1e-3 * scale
