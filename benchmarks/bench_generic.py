"""Generic empirical NTK (ntkrun.kernels.generic): its two methods, its automatic choice, and the
generic path against ntkrun's MLP fast path, side by side in one run.

1. CNN Conv(1,8,3)-ReLU-Conv(8,8,3)-ReLU-Flatten-Linear(4608,10) on (N, 1, 28, 28), k = 10;
2. NTK-parametrized ReLU MLP n0 = 784, width 512, depth 3, k = 1 and k = 10: generic_ntk on an
   nn.Module holding ntkrun's parameters vs empirical_ntk(MLP) (the layerwise factorization; for
   k = 10 with one backward pass of the deltas per output).

Each round runs every contender once, in turn; the table gives the median of --repeats rounds
(after a warm-up call each on 4 inputs), the FLOPs predicted by method_costs, and both as ratios to the
jacobian method, so the cost model behind method="auto" can be checked against the clock.

    python benchmarks/bench_generic.py [--cnn-n 64] [--mlp-n 256] [--repeats 3] [--threads T]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ntkrun.kernels.empirical import DEFAULT_MEMORY_BUDGET, empirical_ntk
from ntkrun.kernels.generic import _probe, choose_method, generic_ntk, method_costs
from ntkrun.network import MLP


class NTKParametrizedMLP(nn.Module):
    """ntkrun's MLP formula on the same trainable W, b: z = a W^T / sqrt(n_l) + beta b."""

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
        return z[:, 0] if z.shape[1] == 1 else z


def cnn() -> nn.Module:
    torch.manual_seed(0)
    convs = [nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()]
    return nn.Sequential(*convs, nn.Flatten(), nn.Linear(8 * 24 * 24, 10)).eval()


def predicted(model: nn.Module, X: torch.Tensor) -> tuple[dict[str, float], str]:
    """method_costs and choose_method as generic_ntk(model, X) sees them (symmetric Gram)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    k, scalar, flops, numel = _probe(model, params, X)
    P, n = sum(p.numel() for p in params.values()), X.shape[0]
    args = (n, n, k, P, DEFAULT_MEMORY_BUDGET, X.element_size())
    options = {"forward_flops": flops, "numel": numel, "trace_outputs": scalar, "symmetric": True}
    return method_costs(*args, **options), choose_method(*args, **options)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cnn-n", type=int, default=64)
    ap.add_argument("--mlp-n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    net = MLP(784, 512, 3, "relu", beta=0.1, seed=0)
    net10 = MLP(784, 512, 3, "relu", beta=0.1, seed=0, n_out=10)
    X_mlp = torch.rand(args.mlp_n, 784, generator=gen)
    problems = {
        f"CNN N={args.cnn_n} k=10": (cnn(), torch.rand(args.cnn_n, 1, 28, 28, generator=gen), None),
        f"MLP N={args.mlp_n} k=1": (NTKParametrizedMLP(net), X_mlp, net),
        f"MLP N={args.mlp_n} k=10": (NTKParametrizedMLP(net10), X_mlp, net10),
    }
    contenders: dict[tuple[str, str], Callable[[torch.Tensor], torch.Tensor]] = {}
    for case, (model, _, fast) in problems.items():
        for method in ("jacobian", "ntvp", "auto"):
            contenders[case, method] = lambda X, m=model, method=method: generic_ntk(m, X, method=method)
        if fast is not None:
            contenders[case, "ntkrun empirical_ntk"] = lambda X, fast=fast: empirical_ntk(fast, X)
    for (case, _), fn in contenders.items():
        fn(problems[case][1][:4])  # warm-up: torch.func's first-call set-up
    times: dict[tuple[str, str], list[float]] = {key: [] for key in contenders}
    results: dict[tuple[str, str], torch.Tensor] = {}  # from the first round, for the agreement
    for _ in range(args.repeats):
        for (case, method), fn in contenders.items():
            t0 = time.perf_counter()
            results.setdefault((case, method), fn(problems[case][1]))
            times[case, method].append(time.perf_counter() - t0)

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, load average {load:.1f}")
    head = f"{'median s':>9} {'/ jacobian':>10} {'pred. GFLOP':>11} {'pred. /jac':>10}"
    print(f"{'case':<16} {'method':<22} {head}")
    for case, (model, X, _) in problems.items():
        costs, choice = predicted(model, X)
        t_jac = statistics.median(times[case, "jacobian"])
        for (c, method), ts in times.items():
            if c != case:
                continue
            t = statistics.median(ts)
            cost = costs.get(choice if method == "auto" else method)
            pred = f"{cost / 1e9:11.1f} {cost / costs['jacobian']:10.2f}" if cost else f"{'':11} {'':10}"
            print(f"{case:<16} {method:<22} {t:9.3f} {t / t_jac:10.2f} {pred}")
        agree = max(rel_diff(results[case, m], results[case, "jacobian"]) for m in ("ntvp", "auto"))
        print(f"{case}: auto chose {choice}; ntvp and auto agree with jacobian to {agree:.1e} (relative)")
    for case in (c for c, p in problems.items() if p[2] is not None):
        fast = statistics.median(times[case, "ntkrun empirical_ntk"])
        ratio = min(statistics.median(times[case, m]) for m in ("jacobian", "ntvp", "auto")) / fast
        agree = rel_diff(results[case, "jacobian"], results[case, "ntkrun empirical_ntk"])
        print(f"{case}: fastest generic method / ntkrun empirical_ntk = {ratio:.1f}; agree to {agree:.1e}")


if __name__ == "__main__":
    main()
