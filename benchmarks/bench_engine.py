"""Engine benchmark: achieved FLOP rate of a GD step and of an empirical NTK Gram, as fractions of
the machine's fp32 GEMM rate measured in the same run, and the speed-up over the torch.func
per-sample-Jacobian reference. Prints ratios; absolute seconds drift on a shared machine.

    python benchmarks/bench_engine.py [--width 10000] [--n 512] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch.func import functional_call, jacrev, vmap

from ntkrun.kernels import empirical_ntk
from ntkrun.network import MLP, gd_step


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_seconds(g: int, repeats: int) -> float:
    """Best time of a square fp32 g x g x g matrix product."""
    A, B = torch.randn(g, g), torch.randn(g, g)
    return best_time(lambda: A @ B, repeats)


def matmul_flops(sizes: list[int], n: int) -> float:
    """2 N sum_l n_l n_{l+1}: one pass through every weight matrix."""
    return 2.0 * n * sum(a * b for a, b in itertools.pairwise(sizes))


def gd_flops(sizes: list[int], n: int) -> float:
    """Forward + delta backprop (every layer but the first) + weight gradients."""
    first = 2.0 * n * sizes[0] * sizes[1]
    return 3 * matmul_flops(sizes, n) - first


def gram_flops(sizes: list[int], n: int) -> float:
    """Forward + delta backprop + the a.a' and delta.delta' Gram products of every layer."""
    L = len(sizes) - 1
    first = 2.0 * n * sizes[0] * sizes[1]
    grams = 2.0 * n * n * (sum(sizes[:L]) + sum(sizes[1:L]))
    return 2 * matmul_flops(sizes, n) - first + grams


def torch_func_ntk(net: MLP, X: torch.Tensor) -> torch.Tensor:
    """Reference: contract per-sample Jacobians of every parameter (PyTorch NTK tutorial, method 1)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (x[None],))[0]

    jac = vmap(jacrev(f), (None, 0))(params, X)
    return sum(j.reshape(X.shape[0], -1) @ j.reshape(X.shape[0], -1).T for j in jac.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=10000)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--n0", type=int, default=784)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ref-width", type=int, default=2000)
    ap.add_argument("--ref-n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []

    g = 4096
    t = gemm_seconds(g, args.repeats)
    gemm_rate = 2.0 * g**3 / t
    rows.append({"what": f"fp32 GEMM {g}x{g}x{g}", "seconds": t, "gflops": gemm_rate / 1e9, "ratio": 1.0})

    net = MLP(args.n0, args.width, args.depth, seed=0)
    X = torch.rand(args.n, args.n0)
    y = torch.randn(args.n)
    sizes = net.sizes
    t = best_time(lambda: gd_step(net, X, y, 1e-6), args.repeats)
    rate = gd_flops(sizes, args.n) / t
    rows.append(
        {
            "what": f"GD step N={args.n} width={args.width}",
            "seconds": t,
            "gflops": rate / 1e9,
            "ratio": rate / gemm_rate,
        }
    )
    t = best_time(lambda: empirical_ntk(net, X), args.repeats)
    rate = gram_flops(sizes, args.n) / t
    rows.append(
        {
            "what": f"NTK Gram N={args.n} width={args.width}",
            "seconds": t,
            "gflops": rate / 1e9,
            "ratio": rate / gemm_rate,
        }
    )

    ref_net = MLP(args.n0, args.ref_width, args.depth, seed=0)
    Xr = torch.rand(args.ref_n, args.n0)
    t_fast = best_time(lambda: empirical_ntk(ref_net, Xr), args.repeats)
    t_ref = best_time(lambda: torch_func_ntk(ref_net, Xr), 1)
    err = (empirical_ntk(ref_net, Xr) - torch_func_ntk(ref_net, Xr)).abs().max().item()
    rows.append(
        {
            "what": f"ntkrun Gram N={args.ref_n} width={args.ref_width}",
            "seconds": t_fast,
            "gflops": gram_flops(ref_net.sizes, args.ref_n) / t_fast / 1e9,
            "ratio": float("nan"),
        }
    )
    rows.append(
        {
            "what": f"torch.func jacobian Gram N={args.ref_n} width={args.ref_width}",
            "seconds": t_ref,
            "gflops": float("nan"),
            "ratio": t_ref / t_fast,
        }
    )

    frame = pd.DataFrame(rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"GD step / GEMM rate:       {rows[1]['ratio']:.3f}  (target >= 0.6)")
    print(f"NTK Gram / GEMM rate:      {rows[2]['ratio']:.3f}  (target >= 0.6)")
    print(f"torch.func time / ntkrun:  {rows[4]['ratio']:.1f}x (target >= 100x); max |diff| {err:.2e}")
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
