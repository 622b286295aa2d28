"""Engine benchmark: achieved FLOP rate of a GD step and of an empirical NTK Gram, as fractions of
the machine's fp32 GEMM rate measured in the same run, and the speed-up over the torch.func
per-sample-Jacobian reference. Prints ratios; absolute seconds drift on a shared machine.

    python benchmarks/bench_engine.py [--width 10000] [--n 512] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch.func import jacrev, vmap

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


def gemm_rate(repeats: int, width: int = 10000, n: int = 512) -> tuple[float, float]:
    """The machine's fp32 GEMM rate, FLOP/s: the better of a square 4096^3 product and the
    (width x width) @ (width x n) product the engine is made of (in its fastest layout), so a
    ratio against it cannot flatter the engine. -> (rate, square-only rate)."""
    square = 2.0 * 4096**3 / gemm_seconds(4096, repeats)
    W, A = torch.randn(width, width), torch.randn(width, n)
    tall = 2.0 * width * width * n / best_time(lambda: W @ A, repeats)
    return max(square, tall), square


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


def per_sample_function(net: MLP) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """f(params, x) for one input x (n0,), written out from docs/science.md §1 independently of ntkrun's
    layout-tuned forward pass, for the torch.func references."""

    def f(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        a = x
        for l in range(net.depth):
            z = params[f"weights.{l}"] @ a / math.sqrt(net.sizes[l]) + net.beta * params[f"biases.{l}"]
            a = net.nonlinearity.sigma(z)
        return z[0]

    return f


def torch_func_ntk(net: MLP, X: torch.Tensor) -> torch.Tensor:
    """Reference: contract per-sample Jacobians of every parameter (PyTorch NTK tutorial, method 1)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    jac = vmap(jacrev(per_sample_function(net)), (None, 0))(params, X)
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

    machine, square = gemm_rate(args.repeats, args.width, args.n)
    net = MLP(args.n0, args.width, args.depth, seed=0)
    X, y = torch.rand(args.n, args.n0), torch.randn(args.n)
    t_gd = best_time(lambda: gd_step(net, X, y, 1e-6), args.repeats)
    t_gram = best_time(lambda: empirical_ntk(net, X), args.repeats)
    ref_net = MLP(args.n0, args.ref_width, args.depth, seed=0)
    Xr = torch.rand(args.ref_n, args.n0)
    t_fast = best_time(lambda: empirical_ntk(ref_net, Xr), args.repeats)
    t_ref = best_time(lambda: torch_func_ntk(ref_net, Xr), 1)
    err = (empirical_ntk(ref_net, Xr) - torch_func_ntk(ref_net, Xr)).abs().max().item()

    gd_rate = gd_flops(net.sizes, args.n) / t_gd
    gram_rate = gram_flops(net.sizes, args.n) / t_gram
    w, n, rw, rn = args.width, args.n, args.ref_width, args.ref_n
    frame = pd.DataFrame([
        {"what": "fp32 GEMM 4096^3", "seconds": 2 * 4096**3 / square, "gflops": square / 1e9},
        {"what": f"machine GEMM rate (best of the above and {w}x{w}x{n})", "gflops": machine / 1e9},
        {"what": f"GD step N={n} width={w}", "seconds": t_gd, "gflops": gd_rate / 1e9,
         "of_gemm": gd_rate / machine},
        {"what": f"NTK Gram N={n} width={w}", "seconds": t_gram, "gflops": gram_rate / 1e9,
         "of_gemm": gram_rate / machine},
        {"what": f"ntkrun Gram N={rn} width={rw}", "seconds": t_fast},
        {"what": f"torch.func jacobian Gram N={rn} width={rw}", "seconds": t_ref},
    ])  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    print(f"GD step / GEMM rate:       {gd_rate / machine:.3f}  (target >= 0.6)")
    print(f"NTK Gram / GEMM rate:      {gram_rate / machine:.3f}  (target >= 0.6)")
    print(f"torch.func time / ntkrun:  {t_ref / t_fast:.1f}x (target >= 100x); max |diff| {err:.2e}")
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
