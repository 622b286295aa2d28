"""Cholesky against preconditioned CG on generalization's kernel fits, side by side in one run.

For the MLP NTK and NNGP of `generalization` (depth 4 ReLU, beta 0.1, pixels / 255) on the first N
Fashion-MNIST training points, the Gram stored as `--dtype` (float32: what `auto` stores beyond
20000 points), each fit is solved by the in-place Cholesky and by CG (Nystrom rank `--rank`,
tol `--tol`) on the same Gram; prints the times, CG's iterations and residual, the relative
difference of the two solutions, the test accuracy of each on the 10000 test points and how many
test labels differ. Fashion-MNIST at /usr/share/datasets/fashion-mnist or $NTKRUN_DATA_DIR.

    python benchmarks/bench_cg.py --n 8000 --rank 500 [--kinds ntk nngp]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from ntkrun.iterative import cg_solve
from ntkrun.linalg import kernel_solve_
from ntkrun.runners.generalization_fits import arch
from ntkrun.runners.generalization_spec import GenSpec
from ntkrun.runners.labelled import dataset, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--kinds", nargs="+", default=["ntk", "nngp"], choices=["ntk", "nngp"])
    args = parser.parse_args()
    folder = os.environ.get("NTKRUN_DATA_DIR", "/usr/share/datasets/fashion-mnist")
    data = {"dir": folder, "n_train": [args.n], "n_test": args.n_test}
    spec = GenSpec(data=data, predictors=["ntk", "nngp"])
    X, labels, Xt, labels_t = dataset(spec, args.n)
    description, dtype, Y = arch(spec), getattr(torch, args.dtype), targets(spec, labels)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"N={args.n} test={Xt.shape[0]} {args.dtype} rank={args.rank} tol={args.tol:g}; {cpu}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")  # fmt: skip
    for kind in args.kinds:  # one Gram at a time (14.4 GB in float32 at 60000 points)
        t0 = time.perf_counter()
        K = description.kernels(X, kinds=(kind,), out_dtype=dtype)[0]
        print(f"{kind} Gram: {time.perf_counter() - t0:.1f} s", flush=True)
        relative = 0.0 if kind == "ntk" else spec.kernels.nngp_noise
        scale = K.diagonal().double().mean().item()
        t0 = time.perf_counter()
        floored = max(relative, 1e-10, torch.finfo(K.dtype).eps)  # CG's ridge floor, as the runner's
        cg = cg_solve(K, Y, ridge=floored * scale, rank=args.rank, tol=args.tol, max_iter=3000)
        t_cg = time.perf_counter() - t0
        t0 = time.perf_counter()
        alpha, ridge, _ = kernel_solve_(K, Y, ridge=relative)  # K destroyed
        t_chol = time.perf_counter() - t0
        alpha = alpha.double()
        del K
        p_chol, p_cg = [], []
        for c0 in range(0, Xt.shape[0], 1000):  # the test kernel 1000 rows at a time
            Kt = description.kernels(Xt[c0 : c0 + 1000], X, kinds=(kind,))[0]
            p_chol.append((Kt @ alpha).argmax(1))
            p_cg.append((Kt @ cg.alpha).argmax(1))
        p_chol, p_cg = torch.cat(p_chol), torch.cat(p_cg)
        diff = float((cg.alpha - alpha).norm() / alpha.norm())
        acc = [float((p == labels_t).double().mean()) for p in (p_chol, p_cg)]
        print(f"{kind}: cholesky {t_chol:.1f} s (ridge {ridge:.3g}); cg {t_cg:.1f} s, {cg.iterations} it., "
              f"residual {cg.residual:.2e}; cg/cholesky time {t_cg / t_chol:.2f}; |alpha_cg - alpha_chol| / "
              f"|alpha_chol| {diff:.2e}; test accuracy {acc[0]:.4f} (cholesky) {acc[1]:.4f} (cg); "
              f"{int((p_chol != p_cg).sum())} of {len(p_cg)} test labels differ", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
