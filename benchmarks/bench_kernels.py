"""Kernel benchmark (issue: kernel engine). Everything measured side by side in one run:

1. empirical NTK Gram, n0 = 784, depth 4, ReLU, beta 0.1, N = 256, widths 500/1000/2000:
   ntkrun vs torch.func per-sample-Jacobian contraction vs torch.func NTK-vector products
   (the two methods of PyTorch's "Neural Tangent Kernels" tutorial);
2. ntkrun alone at width 10000, N = 512 and 2048, as a fraction of the fp32 GEMM rate;
3. a GD step at width 10000, N = 512, as a fraction of the GEMM rate;
4. analytic Theta(4) for N = 512 and 4096 vs a float64 numpy reference loop per layer.

    python benchmarks/bench_kernels.py [--csv benchmarks/kernels.csv] [--skip-vps]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.func import jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import best_time, gd_flops, gemm_rate, gram_flops, per_sample_function, torch_func_ntk

from ntkrun.kernels import analytic_kernels, empirical_ntk
from ntkrun.network import MLP, gd_step


def torch_func_ntk_vps(net: MLP, X: torch.Tensor) -> torch.Tensor:
    """Reference: NTK-vector products, vmapped over all pairs (PyTorch NTK tutorial, method 2)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    f = per_sample_function(net)

    def pair(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        out, vjp_fn = vjp(lambda p: f(p, x1), params)
        (cotangent,) = vjp_fn(torch.ones_like(out))
        return jvp(lambda p: f(p, x2), (params,), (cotangent,))[1]

    return vmap(vmap(pair, (None, 0)), (0, None))(X, X)


def numpy_theta(X: np.ndarray, depth: int, beta: float) -> np.ndarray:
    """Reference: docs/science.md §3 for ReLU, float64 numpy, one layer at a time."""
    sigma = X @ X.T / X.shape[1] + beta**2
    theta = sigma.copy()
    for _ in range(depth - 1):
        d = np.sqrt(np.diag(sigma))
        s = np.outer(d, d)
        th = np.arccos(np.clip(sigma / s, -1, 1))
        e_dd = (np.pi - th) / (2 * np.pi)
        sigma = s * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi) + beta**2
        theta = theta * e_dd + sigma
    return theta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--skip-vps", action="store_true", help="skip the (slow) NTK-vector-product method")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    n0, depth, rows = 784, 4, []
    gemm, square = gemm_rate(args.repeats)
    rows.append({"case": "fp32 GEMM 4096^3", "method": "torch.mm", "gflops": square / 1e9,
                 "of_gemm": square / gemm})  # fmt: skip
    rows.append({"case": "machine GEMM rate", "method": "best of 4096^3 and 10000x10000x512",
                 "gflops": gemm / 1e9, "of_gemm": 1.0})  # fmt: skip

    X = torch.rand(256, n0)
    for width in (500, 1000, 2000):
        net = MLP(n0, width, depth, seed=0)
        case = f"Gram N=256 width={width}"
        t_fast = best_time(lambda net=net: empirical_ntk(net, X), args.repeats)
        rate = gram_flops(net.sizes, 256) / t_fast
        rows.append(
            {
                "case": case,
                "method": "ntkrun",
                "seconds": t_fast,
                "gflops": rate / 1e9,
                "of_gemm": rate / gemm,
            }
        )
        t_jac = best_time(lambda net=net: torch_func_ntk(net, X), 1)
        rows.append({"case": case, "method": "torch.func jacobian", "seconds": t_jac})
        ref = empirical_ntk(net, X)
        assert torch.allclose(torch_func_ntk(net, X), ref, rtol=1e-4, atol=1e-5)
        if not args.skip_vps:
            t_vps = best_time(lambda net=net: torch_func_ntk_vps(net, X), 1)
            rows.append({"case": case, "method": "torch.func ntk-vps", "seconds": t_vps})
        print(f"{case}: ntkrun {t_fast:.3g} s, jacobian {t_jac:.3g} s", flush=True)

    for n in (512, 2048):
        net = MLP(n0, 10000, depth, seed=0)
        Xn = torch.rand(n, n0)
        t = best_time(lambda net=net, Xn=Xn: empirical_ntk(net, Xn), args.repeats)
        rate = gram_flops(net.sizes, n) / t
        rows.append(
            {
                "case": f"Gram N={n} width=10000",
                "method": "ntkrun",
                "seconds": t,
                "gflops": rate / 1e9,
                "of_gemm": rate / gemm,
            }
        )
    Xg, y = torch.rand(512, n0), torch.randn(512)
    t = best_time(lambda: gd_step(net, Xg, y, 1e-6), args.repeats)
    rate = gd_flops(net.sizes, 512) / t
    rows.append(
        {
            "case": "GD step N=512 width=10000",
            "method": "ntkrun",
            "seconds": t,
            "gflops": rate / 1e9,
            "of_gemm": rate / gemm,
        }
    )

    for n in (512, 4096):
        Xa = torch.rand(n, n0, dtype=torch.float64)
        t = best_time(lambda Xa=Xa: analytic_kernels(Xa, depth=depth), args.repeats)
        t_np = best_time(lambda Xa=Xa: numpy_theta(Xa.numpy(), depth, 0.1), args.repeats)
        err = np.abs(analytic_kernels(Xa, depth=depth)[1].numpy() - numpy_theta(Xa.numpy(), depth, 0.1)).max()
        rows.append({"case": f"analytic Theta N={n}", "method": "ntkrun", "seconds": t, "max_abs_diff": err})
        rows.append({"case": f"analytic Theta N={n}", "method": "numpy loop", "seconds": t_np})

    frame = pd.DataFrame(rows)
    fastest_ref = frame[
        (frame["case"] == "Gram N=256 width=2000") & frame["method"].str.startswith("torch.func")
    ]
    ours = frame[(frame["case"] == "Gram N=256 width=2000") & (frame["method"] == "ntkrun")]["seconds"].item()
    speedup = fastest_ref["seconds"].min() / ours
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    gram = frame[frame["case"] == "Gram N=512 width=10000"]["of_gemm"].item()
    gd = frame[frame["case"] == "GD step N=512 width=10000"]["of_gemm"].item()
    print(f"width 2000: ntkrun is {speedup:.0f}x faster than the fastest torch.func method (target >= 100x)")
    print(f"Gram width 10000 N=512: {gram:.2f} of GEMM rate (target >= 0.75)")
    print(f"GD step width 10000 N=512: {gd:.2f} of GEMM rate (target >= 0.6)")
    if math.isnan(speedup):
        raise SystemExit("no reference timing")
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
