"""Monte-Carlo estimates of the limiting kernels, with standard errors (docs/science.md §10): the
mean over initializations of the output covariance (NNGP) and of the empirical NTK of networks
drawn by a factory, streamed one network at a time (Welford's update, float64)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ntkrun.kernels.empirical import empirical_ntk

Factory = Callable[[int], torch.nn.Module]


@dataclass(frozen=True)
class MonteCarloKernels:
    """Mean kernels over n_samples initializations and the standard error of each mean, entrywise:
    each (N1, N2) (traced outputs) or (N1, N2, k, k), float64 on the inputs' device."""

    nngp: torch.Tensor
    ntk: torch.Tensor
    nngp_stderr: torch.Tensor
    ntk_stderr: torch.Tensor
    n_samples: int


class _Welford:
    """Running mean and sum of squared deviations of equally shaped tensors (float64)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, torch.zeros(()), torch.zeros(())

    def add(self, sample: torch.Tensor) -> None:
        sample = sample.double()
        self.n += 1
        if self.n == 1:
            self.mean, self.m2 = sample.clone(), torch.zeros_like(sample)
            return
        delta = sample - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (sample - self.mean)

    def stderr(self) -> torch.Tensor:
        """s / sqrt(n), s the sample standard deviation (n - 1 in its denominator)."""
        return (self.m2 / (self.n - 1) / self.n).sqrt()


def output_covariance(f1: torch.Tensor, f2: torch.Tensor, trace_outputs: bool) -> torch.Tensor:
    """One network's outputs -> its NNGP sample: (N1,) and (N2,) -> f1 f2^T (N1, N2); (N1, k) and
    (N2, k) -> mean_a f1_a f2_a^T (traced) or the (N1, N2, k, k) blocks f1_a(x) f2_b(x')."""
    if f1.dim() == 1:
        return f1[:, None] * f2[None, :]
    if trace_outputs:
        return f1 @ f2.T / f1.shape[1]
    return f1[:, None, :, None] * f2[None, :, None, :]


def monte_carlo_kernels(
    factory: Factory,
    X: torch.Tensor,
    X2: torch.Tensor | None = None,
    n_samples: int = 32,
    seed: int = 0,
    trace_outputs: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> MonteCarloKernels:
    """The NNGP and NTK of the networks `factory(seed + s)`, s = 0 .. n_samples - 1, averaged over
    their initializations, with the standard error of each mean (docs/science.md §10):
    X (N1, ...), X2 (N2, ...) or None (= X) -> MonteCarloKernels of (N1, N2) kernels (or (N1, N2,
    k, k) untraced). The factory returns an nn.Module mapping (N, ...) to (N,) or (N, k) in the
    inputs' dtype; memory is one kernel per kind plus the accumulators, whatever n_samples.
    `progress(done, n_samples)` is called after each network. These estimate the kernels of the
    factory's width: their distance to the infinite-width limit is a bias of order 1/width."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 for a standard error, got {n_samples}")
    nngp, ntk = _Welford(), _Welford()
    for s in range(n_samples):
        net = factory(seed + s)
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"factory({seed + s}) returned {type(net).__name__}, not a torch.nn.Module")
        with torch.no_grad():
            f1 = net(X)
            f2 = f1 if X2 is None else net(X2)
        if f1.dim() not in (1, 2):
            raise ValueError(f"the network's output has shape {tuple(f1.shape)}: expected (N,) or (N, k)")
        nngp.add(output_covariance(f1, f2, trace_outputs))
        ntk.add(empirical_ntk(net, X, X2, trace_outputs=trace_outputs))
        del net
        if progress is not None:
            progress(s + 1, n_samples)
    return MonteCarloKernels(nngp.mean, ntk.mean, nngp.stderr(), ntk.stderr(), n_samples)


def combine(parts: list[MonteCarloKernels]) -> MonteCarloKernels:
    """The estimate over all the networks of several estimates (disjoint seeds), as if computed in
    one pass (Chan et al.'s pairwise update of the means and the sums of squared deviations)."""
    n, means, m2s = 0, [torch.zeros(())] * 2, [torch.zeros(())] * 2
    for part in parts:
        k = part.n_samples
        for i, (mean, se) in enumerate(((part.nngp, part.nngp_stderr), (part.ntk, part.ntk_stderr))):
            m2 = se.double() ** 2 * k * (k - 1)
            delta = mean.double() - means[i]
            means[i] = means[i] + delta * k / (n + k)
            m2s[i] = m2s[i] + m2 + delta**2 * n * k / (n + k)
        n += k
    nngp_se, ntk_se = ((m2 / (n - 1) / n).sqrt() for m2 in m2s)
    return MonteCarloKernels(means[0], means[1], nngp_se, ntk_se, n)


def chunks(n_samples: int, size: int = 8, least: int = 4) -> list[tuple[int, int]]:
    """(start, count) shares of n_samples networks for units: about `size` each, but at least
    `least` shares where every share can keep 2 networks (a standard error per share, and groups
    for the jackknife of a statistic of the mean kernel); near-equal counts."""
    groups = max(math.ceil(n_samples / size), min(least, n_samples // 2), 1)
    base, extra = divmod(n_samples, groups)
    counts = [base + (g < extra) for g in range(groups)]
    return [(sum(counts[:g]), c) for g, c in enumerate(counts)]


def leave_one_out(parts: list[MonteCarloKernels]) -> list[MonteCarloKernels]:
    """For each share g, the estimate from all the other shares: the jackknife's replicates."""
    return [combine(parts[:g] + parts[g + 1 :]) for g in range(len(parts))]


def jackknife_se(replicates: list[float]) -> float:
    """The delete-a-group jackknife standard error of a statistic of the mean kernel from its G
    leave-one-share-out values: sqrt((G - 1) / G * sum_g (s_g - mean s)^2) (docs/science.md §10);
    NaN with fewer than 2 shares."""
    values = torch.tensor(replicates, dtype=torch.float64)
    g = values.numel()
    if g < 2:
        return math.nan
    return float(((g - 1) / g * ((values - values.mean()) ** 2).sum()).sqrt())


def z_scores(estimate: MonteCarloKernels, nngp: torch.Tensor, ntk: torch.Tensor) -> tuple[float, float]:
    """The largest |estimate - reference| / SE over the entries of each kind (entries with a zero
    standard error and no difference count as 0): how many standard errors the Monte-Carlo means
    are from given kernels."""

    def worst(mean: torch.Tensor, se: torch.Tensor, ref: torch.Tensor) -> float:
        diff = (mean - ref.to(mean)).abs()
        z = torch.where(diff == 0, torch.zeros_like(diff), diff / se)
        return float(z.max()) if z.numel() else math.nan

    return worst(estimate.nngp, estimate.nngp_stderr, nngp), worst(estimate.ntk, estimate.ntk_stderr, ntk)
