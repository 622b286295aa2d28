from __future__ import annotations

import numpy as np
import pytest

from ntkrun.fits import fit_power_law, loglog_slope


def test_exact_power_law():
    w = np.array([64, 128, 256, 512.0])
    slope, intercept = loglog_slope(w, 3.0 * w**-0.5)
    assert slope == pytest.approx(-0.5, abs=1e-12) and intercept == pytest.approx(np.log(3.0), abs=1e-12)


def test_bootstrap_interval_covers_the_true_slope_at_its_nominal_rate():
    """Synthetic data v = 2 w^-0.5 * lognormal noise, 8 seeds: the 95% interval must contain
    -0.5 in about 95% of 200 independent data sets (binomial SD 1.5%: accept 88% .. 99.5%),
    and a known different slope (-1) must be recovered too."""
    rng = np.random.default_rng(1)
    w = 2.0 ** np.arange(6, 12)
    covered = 0
    for _ in range(200):
        samples = 2 * w[:, None] ** -0.5 * np.exp(0.2 * rng.standard_normal((len(w), 8)))
        fit = fit_power_law(w, samples, n_boot=400, seed=int(rng.integers(1 << 30)))
        covered += fit.ci_low <= -0.5 <= fit.ci_high
    assert 0.88 <= covered / 200 <= 0.995
    samples = 5 * w[:, None] ** -1.0 * np.exp(0.05 * rng.standard_normal((len(w), 8)))
    fit = fit_power_law(w, samples)
    assert fit.ci_low <= -1.0 <= fit.ci_high and fit.ci_high - fit.ci_low < 0.1


def test_bad_samples():
    with pytest.raises(ValueError, match="positive"):
        fit_power_law(np.array([1.0, 2.0]), np.array([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="two widths"):
        fit_power_law(np.array([1.0]), np.array([[1.0, 2.0]]))
