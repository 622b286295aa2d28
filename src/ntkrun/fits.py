"""Power-law fits on log-log scales with bootstrap confidence intervals over seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class PowerLawFit:
    """value ~ exp(intercept) * width^slope, with a (1 - alpha) bootstrap interval for the slope."""

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    n_boot: int


def loglog_slope(widths: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares line through (log w, log v): widths (W,), values (W,) > 0 -> (slope, intercept)."""
    slope, intercept = np.polyfit(np.log(widths), np.log(values), 1)
    return float(slope), float(intercept)


def fit_power_law(
    widths: np.ndarray, samples: np.ndarray, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> PowerLawFit:
    """Fit log(mean over seeds) against log(width); bootstrap the seeds for a percentile interval.

    widths (W,), samples (W, S): S independent seeds per width, all > 0. Each bootstrap resample
    draws S seeds with replacement independently for every width (the widths' nets are independent).
    """
    widths, samples = np.asarray(widths, float), np.asarray(samples, float)
    if samples.ndim != 2 or samples.shape[0] != widths.shape[0]:
        raise ValueError(f"samples must have shape ({widths.shape[0]}, seeds), got {samples.shape}")
    if len(widths) < 2:
        raise ValueError("a slope needs at least two widths")
    if not np.all(np.isfinite(samples)) or np.any(samples <= 0):
        raise ValueError("samples must be finite and positive for a log-log fit")
    slope, intercept = loglog_slope(widths, samples.mean(1))
    rng = np.random.default_rng(seed)
    n_w, n_s = samples.shape
    picks = rng.integers(0, n_s, size=(n_boot, n_w, n_s))
    boot_means = np.take_along_axis(samples[None, :, :].repeat(n_boot, 0), picks, axis=2).mean(2)
    x = np.log(widths) - np.log(widths).mean()
    boot_slopes = (np.log(boot_means) - np.log(boot_means).mean(1, keepdims=True)) @ x / (x @ x)
    lo, hi = np.quantile(boot_slopes, [alpha / 2, 1 - alpha / 2])
    return PowerLawFit(slope, intercept, float(lo), float(hi), n_boot)


FIT_COLUMNS = ["metric", "slope", "ci_low", "ci_high", "intercept", "reference_slope"]


def slope_table(
    table: pd.DataFrame,
    references: dict[str, float],
    *,
    n_boot: int,
    seed: int,
    by: str | None = None,
    x: str = "width",
) -> pd.DataFrame:
    """One fit_power_law row per metric (and per value of the column `by`): the log-log slope in
    `x` (the width, or another column such as an output scale) of each metric of `table` (columns
    x, seed, the metrics, `by`), its bootstrap interval over seeds, and the metric's reference
    slope. No rows for a group of fewer than two values of x (a slope needs two)."""
    rows = []
    groups = table.groupby(by, sort=True) if by is not None else [(None, table)]
    for key, g in groups:
        widths = np.array(sorted(g[x].unique()), float)
        if len(widths) < 2:
            continue
        for metric, reference in references.items():
            samples = g.pivot(index=x, columns="seed", values=metric).loc[widths].to_numpy()
            fit = fit_power_law(widths, samples, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    **({by: key} if by is not None else {}),
                    "metric": metric,
                    "slope": fit.slope,
                    "ci_low": fit.ci_low,
                    "ci_high": fit.ci_high,
                    "intercept": fit.intercept,
                    "reference_slope": reference,
                }
            )
    return pd.DataFrame(rows, columns=[*([by] if by is not None else []), *FIT_COLUMNS])
