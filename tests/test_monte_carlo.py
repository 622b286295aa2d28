"""Monte-Carlo limits (docs/science.md §10): the streamed mean and standard error against stacked
samples; the mean over one-hidden-layer networks is unbiased, so it meets the analytic kernels
within a few of its own standard errors (and rejects a wrong kernel); deeper networks within their
measured finite-width bias plus a few standard errors; standard errors shrink like n_samples^-1/2."""

from __future__ import annotations

import math

import pytest
import torch

from ntkrun import CNN, MLP, analytic_kernels, empirical_ntk
from ntkrun.kernels.monte_carlo import (
    chunks,
    combine,
    jackknife_se,
    leave_one_out,
    monte_carlo_kernels,
    output_covariance,
    z_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
# Over the 15 distinct entries of each of two 5 x 5 kernels, a mean of 100 samples beyond 4.5 SE by
# chance has probability < 30 * 7e-6 if Gaussian (< 30 * 5e-5 with the t tail of 99 degrees of
# freedom); the seeds are fixed, so each test's verdict is the same on every run.
Z = 4.5
# The mean of finite networks is biased by O(1/width). Measured with 1000 networks of 10 outputs
# per case (MLP depths 3-4, relu and erf, widths 16-64, these inputs): width * max(|mean - limit| -
# 2 SE) / max|limit| <= 0.34 (NNGP) and 0.22 (NTK). The allowance takes twice the larger bound.
BIAS = 2 * 0.34


def inputs(n: int = 5, n0: int = 3) -> torch.Tensor:
    return torch.randn(n, n0, generator=torch.Generator().manual_seed(7), dtype=F64)


def mlp_factory(width: int, depth: int, nonlinearity: str, n_out: int = 10):
    return lambda seed: MLP(3, width, depth, nonlinearity, seed=seed, dtype=F64, n_out=n_out)


def test_streamed_mean_and_stderr_equal_the_stacked_samples():
    X, factory = inputs(), mlp_factory(8, 3, "relu", n_out=2)
    est = monte_carlo_kernels(factory, X, n_samples=7, seed=3)
    ntks = torch.stack([empirical_ntk(factory(s), X, trace_outputs=True) for s in range(3, 10)])
    with torch.no_grad():
        nngps = torch.stack([output_covariance(factory(s)(X), factory(s)(X), True) for s in range(3, 10)])
    for samples, mean, se in ((ntks, est.ntk, est.ntk_stderr), (nngps, est.nngp, est.nngp_stderr)):
        torch.testing.assert_close(mean, samples.mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(se, samples.std(0) / math.sqrt(7), rtol=1e-10, atol=1e-14)
    assert est.n_samples == 7 and est.ntk.shape == (5, 5)


@pytest.mark.parametrize("nonlinearity", ["relu", "erf"])
def test_one_hidden_layer_mean_is_unbiased_and_a_wrong_kernel_is_rejected(nonlinearity):
    """Depth 2: E[f f'] = Sigma(2) and E[Theta_n] = Theta(2) at any width (docs/science.md §10)."""
    X = inputs()
    est = monte_carlo_kernels(mlp_factory(64, 2, nonlinearity), X, X, n_samples=100)
    sigma, theta = analytic_kernels(X, depth=2, nonlinearity=nonlinearity)
    assert max(z_scores(est, sigma, theta)) < Z
    wrong_sigma, wrong_theta = analytic_kernels(X, depth=3, nonlinearity=nonlinearity)
    assert z_scores(est, wrong_sigma, wrong_theta)[1] > Z  # the NTK's SE (about 1%) resolves depth


def test_one_conv_layer_cnn_mean_is_unbiased():
    X = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    factory = lambda seed: CNN(1, 16, 2, seed=seed, image_size=4, dtype=F64, n_out=10)  # noqa: E731
    est = monte_carlo_kernels(factory, X, n_samples=100)
    sigma, theta = analytic_kernels(X, depth=2, arch="cnn")
    assert max(z_scores(est, sigma, theta)) < Z
    assert z_scores(est, *analytic_kernels(X, depth=2, arch="cnn", readout="gap"))[1] > Z


@pytest.mark.parametrize(("depth", "nonlinearity"), [(3, "relu"), (4, "erf"), (4, "relu")])
def test_deeper_means_are_within_the_measured_bias_and_a_few_standard_errors(depth, nonlinearity):
    X, width = inputs(), 32
    est = monte_carlo_kernels(mlp_factory(width, depth, nonlinearity), X, n_samples=100, seed=100)
    limits = analytic_kernels(X, depth=depth, nonlinearity=nonlinearity)
    for mean, se, limit in zip((est.nngp, est.ntk), (est.nngp_stderr, est.ntk_stderr), limits, strict=True):
        allowed = Z * se + BIAS * limit.abs().max() / width
        assert ((mean - limit).abs() <= allowed).all()


def test_standard_errors_shrink_like_one_over_sqrt_samples():
    """The same seeds' first 25 and all 100 networks: the standard errors' norms differ by
    sqrt(100 / 25) = 2, up to the spread of the sample standard deviations themselves (a relative
    1 / sqrt(2 * 24) = 14% per entry at 25 samples, less over the 25 entries of a norm)."""
    X, factory = inputs(), mlp_factory(32, 3, "relu")
    few = monte_carlo_kernels(factory, X, n_samples=25)
    many = monte_carlo_kernels(factory, X, n_samples=100)
    for a, b in ((few.ntk_stderr, many.ntk_stderr), (few.nngp_stderr, many.nngp_stderr)):
        assert 1.6 < float(a.norm() / b.norm()) < 2.5


def test_any_module_and_its_mistakes():
    X = inputs()

    def plain(seed: int) -> torch.nn.Module:  # torch's default initialization, through torch.func
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    est = monte_carlo_kernels(plain, X, n_samples=3, trace_outputs=False)
    assert est.ntk.shape == (5, 5, 2, 2) and est.nngp.shape == (5, 5, 2, 2)
    expected = torch.stack([empirical_ntk(plain(s), X) for s in range(3)]).mean(0)
    torch.testing.assert_close(est.ntk, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"factory\(0\) returned str, not a torch.nn.Module"):
        monte_carlo_kernels(lambda seed: "net", X)
    with pytest.raises(ValueError, match="n_samples must be at least 2"):
        monte_carlo_kernels(plain, X, n_samples=1)
    with pytest.raises(ValueError, match=r"output has shape \(5, 2, 1\)"):
        monte_carlo_kernels(lambda s: torch.nn.Sequential(plain(s), torch.nn.Unflatten(1, (2, 1))), X)


def test_estimates_of_disjoint_seeds_combine_into_the_estimate_of_all():
    X, factory = inputs(), mlp_factory(8, 3, "erf", n_out=2)
    whole = monte_carlo_kernels(factory, X, n_samples=11, seed=4)
    parts = [monte_carlo_kernels(factory, X, n_samples=c, seed=4 + s) for s, c in chunks(11, 4)]
    assert [p.n_samples for p in parts] == [3, 3, 3, 2]
    both = combine(parts)
    assert both.n_samples == 11
    for a, b in ((both.ntk, whole.ntk), (both.ntk_stderr, whole.ntk_stderr), (both.nngp, whole.nngp),
                 (both.nngp_stderr, whole.nngp_stderr)):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
    assert chunks(32) == [(0, 8), (8, 8), (16, 8), (24, 8)] and chunks(40) == [(8 * i, 8) for i in range(5)]
    assert chunks(9) == [(0, 3), (3, 2), (5, 2), (7, 2)]
    assert chunks(4) == [(0, 2), (2, 2)] and chunks(3) == [(0, 3)]


def test_jackknife_of_a_linear_statistic_is_the_spread_of_the_share_means():
    X, factory = inputs(), mlp_factory(8, 3, "relu", n_out=1)
    parts = [monte_carlo_kernels(factory, X, n_samples=c, seed=s) for s, c in chunks(16)]
    share_means = torch.tensor([float(p.ntk[0, 1]) for p in parts], dtype=F64)
    replicates = [float(p.ntk[0, 1]) for p in leave_one_out(parts)]
    expected = float(share_means.std() / math.sqrt(len(parts)))  # equal shares: exactly this
    assert jackknife_se(replicates) == pytest.approx(expected, rel=1e-10)
    assert math.isnan(jackknife_se(replicates[:1]))


def test_jackknife_standard_error_of_a_nonlinear_statistic_matches_its_spread_over_repeats():
    # ||NTK|| / ||NNGP|| of the mean kernels from 16 networks in 4 shares, repeated 200 times on
    # disjoint seeds: the mean jackknife SE against the standard deviation of the 200 statistics.
    # With 4 shares an SE estimate has 3 degrees of freedom, mean c4 = 0.921 sigma; over 200 repeats
    # the two sides have relative errors ~3% and ~5%, so [0.8, 1.2] is > 3 of them (measured 0.91).
    X, factory = inputs(), mlp_factory(8, 3, "relu", n_out=1)
    values, ses = [], []
    for r in range(200):
        parts = [monte_carlo_kernels(factory, X, n_samples=c, seed=100 * r + s) for s, c in chunks(16)]
        values.append(float(combine(parts).ntk.norm() / combine(parts).nngp.norm()))
        ses.append(jackknife_se([float(p.ntk.norm() / p.nngp.norm()) for p in leave_one_out(parts)]))
    spread = float(torch.tensor(values).std())
    assert 0.8 < sum(ses) / len(ses) / (0.921 * spread) < 1.2
