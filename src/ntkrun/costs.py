"""What a unit of work costs, and this machine's rates that turn a cost into seconds.

A FLOP count alone prices a 64-wide network's GD step, a one-channel convolution and a 28x28
pixel-pair recursion alike, and all wrongly: a small network's step is bound by the dispatch of
its tensor operations, a recursion by the memory it streams, a thin product or a factorization
runs far below the GEMM rate. So a `Cost` keeps apart what runs at the GEMM rate and the work
that is timed here: a `Probe` runs the very computation (a GD step of the unit's network, its
limiting kernel, a Cholesky or eigendecomposition) on this machine, at a size that takes
milliseconds, and scales the time by the FLOPs. `--list-units` prints the sum; the test
tests/test_estimates.py holds it within 2x of the units of timed quick runs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

PROBE_FLOPS = 3e9  # a probe is shrunk (points, then width) until it does at most this: ~30 ms
KERNEL_PROBE_MAX = 1024  # a kernel probe's points: at most this square


@dataclass(frozen=True)
class Cost:
    """gemm: FLOPs in large matrix products (2 per multiply-add); probes: (probe, how many times)
    of the timed pieces."""

    gemm: float = 0.0
    probes: tuple[tuple[Probe, float], ...] = field(default=())

    @property
    def flops(self) -> float:
        """All floating-point operations: the progress bars' weight."""
        return self.gemm + sum(p.flops * k for p, k in self.probes)

    def __add__(self, other: float | Cost) -> Cost:
        other = as_cost(other)
        return Cost(self.gemm + other.gemm, self.probes + other.probes)

    __radd__ = __add__

    def __mul__(self, k: float) -> Cost:
        return Cost(self.gemm * k, tuple((p, n * k) for p, n in self.probes))

    __rmul__ = __mul__


@dataclass(frozen=True)
class Probe:
    """A piece of work timed on this machine: kind "gd" (one GD step of description's network of
    `width` on n inputs with n_out outputs), "kernel" (its limit on (n, n2) pairs), "cholesky" or
    "eigh" (of an (n, n) matrix), "read" (the IDX file `description`, a path, read n times).
    `description` is an architecture description (hashable) or that path."""

    kind: str
    n: int
    n2: int = 0
    width: int = 0
    n_out: int = 1
    description: Any = None

    @property
    def flops(self) -> float:
        return flops_of(self, self.n, self.width, self.n2)


def as_cost(cost: float | Cost) -> Cost:
    """A bare FLOP count is matrix products."""
    return cost if isinstance(cost, Cost) else Cost(gemm=float(cost))


@dataclass(frozen=True)
class Rates:
    """gemm: FLOP/s of a large float32 product."""

    gemm: float

    def seconds(self, cost: float | Cost) -> float:
        cost = as_cost(cost)
        return cost.gemm / self.gemm + sum(probe_seconds(p) * k for p, k in cost.probes)


def _best(f: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def rates() -> Rates:
    """This machine's rates at the thread count torch has now: a float32 1024^3 product."""
    a = torch.randn(1024, 1024)
    return Rates(2 * 1024**3 / _best(lambda: a @ a))


def flops_of(probe: Probe, n: int, width: int, n2: int) -> float:
    """The FLOPs of `probe`'s kind of work at size (n, width, n2)."""
    if probe.kind == "gd":
        return probe.description.gd_flops(n, width, probe.n_out)
    if probe.kind == "kernel":
        return probe.description.kernel_flops(n, n2)
    if probe.kind == "read":
        return 0.0
    return n**3 / 3 if probe.kind == "cholesky" else 9.0 * n**3


def shrunk(probe: Probe) -> tuple[int, int, int]:
    """The size (n, width, n2) it is timed at: halved, points before width, until it does at most
    PROBE_FLOPS, or as far as it goes: GD keeps 512 points and 16 channels, a factorization 512
    rows, as smaller ones run far below the rate of the full size (a kernel goes down to one pair)."""
    n, width, n2 = probe.n, probe.width, probe.n2
    if probe.kind == "kernel":  # one square size per description, whatever (n, n2): every kernel unit
        s = 1  # of a run is priced by the same timing, so their estimates are consistent
        while s < KERNEL_PROBE_MAX and flops_of(probe, 2 * s, width, 2 * s) <= PROBE_FLOPS:
            s *= 2
        return s, width, s
    while flops_of(probe, n, width, n2) > PROBE_FLOPS:
        if probe.kind == "gd" and n > 512:
            n //= 2
        elif probe.kind == "gd" and width > 16:
            width //= 2
        elif probe.kind == "kernel" and max(n, n2) > 1:
            n, n2 = (max(n // 2, 1), n2) if n >= n2 else (n, max(n2 // 2, 1))
        elif probe.kind in ("cholesky", "eigh") and n > 512:
            n //= 2
        else:
            break
    return n, width, n2


@functools.cache
def probe_seconds(probe: Probe) -> float:
    """Seconds of the probe's work at its full size: timed at its shrunk size (the best of two,
    after one that warms up, unless that one took over half a second), scaled by the FLOPs. NaN
    where the FLOPs are unknown."""
    if probe.kind == "read":
        from ntkrun.data import read_idx  # (the data's module imports torch's world)

        return _best(lambda: read_idx(probe.description), 1) * probe.n
    if probe.flops != probe.flops:
        return float("nan")
    n, width, n2 = shrunk(probe)
    seconds = timed(replace(probe, n=n, width=width, n2=n2))
    return seconds * probe.flops / max(flops_of(probe, n, width, n2), 1.0)


@functools.cache
def timed(probe: Probe) -> float:
    """Seconds of the probe's work at its size, the best of two after one that warms up (unless that
    one took over half a second); once per size a process."""
    work = _work(probe, probe.n, probe.width, probe.n2)
    seconds = _best(work, 1)
    return _best(work, 2) if seconds < 0.5 else seconds


def _work(probe: Probe, n: int, width: int, n2: int) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    if probe.kind in ("cholesky", "eigh"):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        a = a @ a.T + n * torch.eye(n, dtype=torch.float64)
        factor = torch.linalg.cholesky if probe.kind == "cholesky" else torch.linalg.eigh
        return lambda: factor(a)
    d = probe.description
    if probe.kind == "kernel":
        X = torch.randn(n, d.n0, generator=g, dtype=torch.float64)
        X2 = torch.randn(n2, d.n0, generator=g, dtype=torch.float64)
        return lambda: d.kernel(X, X2)
    from ntkrun.network import gd_step  # (the network's module imports the descriptions)

    net = d.net(width, 0, dtype=torch.float32, device="cpu", n_out=probe.n_out)
    X = d.inputs(torch.randn(n, d.n0, generator=g))
    y = torch.randn(n, probe.n_out, generator=g).squeeze(-1)
    return lambda: gd_step(net, X, y, 1e-6)
