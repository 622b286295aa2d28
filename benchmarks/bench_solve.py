"""Kernel least squares in place (ntkrun.linalg.kernel_solve_) in float32 and float64 against a
dense torch.linalg.solve in float64, side by side in one run, on the analytic ReLU NTK.

    python benchmarks/bench_solve.py [--n 4000] [--n-test 1000] [--depth 4] [--ridge 0]
                                     [--rounds 3] [--block 2048] [--data-dir DIR]

Inputs: uniform random in [0, 1]^784 with teacher labels (argmax of a random linear map), or
with --data-dir the train and test IDX files of MNIST (or Fashion-MNIST): pixels / 255, seeded
choice of points. Targets: one-hot labels - 0.1, m = 10. Rounds alternate between the contenders;
each prints its median time and its peak memory beyond its input (VmHWM, reset before each call;
its own K copy is made before the reset and is not counted). Then the ratios, the difference of
the coefficients and of the predictions K(test, train) alpha on held-out points, all in float64.
--ridge is relative to the mean of diag K (as kernel_solve_'s default); kernel_solve_ raises it
itself if Cholesky fails, and the reference solves at the ridge the float64 solve used.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ntkrun import analytic_kernels
from ntkrun.linalg import kernel_solve_, solve_bytes

MiB = 2**20


def vm(key: str) -> int:
    """VmRSS / VmHWM of this process, bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """-> X (n, 784), labels (n,), X_test (n_test, 784), labels_test (n_test,), a description."""
    if args.data_dir:
        from ntkrun.data import choose_points, load_split

        folder = Path(args.data_dir)
        X, y = choose_points(*load_split(folder, "train"), args.n, seed=0)
        Xt, yt = choose_points(*load_split(folder, "test"), args.n_test, seed=1)
        return X, y, Xt, yt, f"{folder.name} train/test, pixels / 255"
    g = torch.Generator().manual_seed(0)
    X = torch.rand(args.n + args.n_test, 784, dtype=torch.float64, generator=g)
    y = (X @ torch.randn(784, 10, dtype=torch.float64, generator=g)).argmax(1)
    return X[: args.n], y[: args.n], X[args.n :], y[args.n :], "uniform random, teacher labels"


Solver = Callable[[torch.Tensor], tuple[torch.Tensor, float]]


def measure(run: Solver, K: torch.Tensor) -> tuple[float, int, torch.Tensor, float]:
    """Time run(K), and its peak RSS beyond what was resident before it: (s, bytes, alpha, ridge)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    base = vm("VmRSS:")
    t = time.perf_counter()
    alpha, ridge = run(K)
    seconds = time.perf_counter() - t
    return seconds, vm("VmHWM:") - base, alpha, ridge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--ridge", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    X, y, Xt, yt, source = inputs(args)
    t = time.perf_counter()
    _, K = analytic_kernels(X, depth=args.depth)
    _, K_test = analytic_kernels(Xt, X, depth=args.depth)
    kernel_s = time.perf_counter() - t
    Y = torch.nn.functional.one_hot(y, 10).double() - 0.1
    scale = K.diagonal().mean().item()
    notes: dict[str, list[str]] = {}

    def ours(Kc: torch.Tensor) -> tuple[torch.Tensor, float]:
        alpha, ridge, said = kernel_solve_(Kc, Y, ridge=args.ridge, block=args.block)
        notes[str(Kc.dtype)] = said
        return alpha, ridge

    def reference(Kc: torch.Tensor) -> tuple[torch.Tensor, float]:
        return torch.linalg.solve(Kc, Y), ridge64

    names = ["kernel_solve_ float32", "kernel_solve_ float64", "torch.linalg.solve float64"]
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    alphas: dict[str, torch.Tensor] = {}
    ridges: dict[str, float] = {}
    small = torch.eye(64, dtype=torch.float64)  # warm-up: LAPACK and BLAS code paged in, not timed
    kernel_solve_(small.clone(), small[:, :10])
    kernel_solve_(small.float(), small[:, :10])
    torch.linalg.solve(small, small)
    ridge64 = args.ridge * scale
    for _ in range(args.rounds):
        for name in names:
            if name.startswith("kernel_solve_"):
                dtype = torch.float32 if "float32" in name else torch.float64
                Kc, run = K.to(dtype, copy=True), ours
            else:
                Kc, run = K.clone(), reference
                Kc.diagonal().add_(ridge64)
            seconds, peak, alpha, ridge = measure(run, Kc)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
            alphas[name], ridges[name] = alpha.double(), ridge
            del Kc, alpha
            if name == "kernel_solve_ float64":
                ridge64 = ridges[name]

    threads = torch.get_num_threads()
    print(
        f"N = {args.n} train, {args.n_test} test, n0 = 784 ({source}), depth {args.depth} ReLU Theta, "
        f"m = 10; block {args.block}; torch threads {threads}"
    )
    print(f"kernels (float64, not timed below): {kernel_s:.2f} s; K {K.numel() * 8 / MiB:.0f} MiB in float64")
    print(f"{'':<28} {'median s':>9} {'peak beyond input':>18} {'solve_bytes':>12}  ridge (relative)")
    for name in names:
        itemsize = 4 if "float32" in name else 8
        is_ours = name.startswith("kernel_solve_")
        estimate = f"{solve_bytes(args.n, 10, itemsize, args.block) / MiB:9.0f} MiB" if is_ours else ""
        print(
            f"{name:<28} {statistics.median(times[name]):9.3f} {peaks[name] / MiB:14.0f} MiB {estimate:>12}"
            f"  {ridges[name]:.3g} ({ridges[name] / scale:.3g})"
        )
    for said in notes.values():
        for line in said:
            print(f"  note: {line}")
    med = {name: statistics.median(seconds) for name, seconds in times.items()}
    print(f"kernel_solve_ float64 / torch.linalg.solve float64: {med[names[1]] / med[names[2]]:.2f}")
    print(f"kernel_solve_ float32 / kernel_solve_ float64: {med[names[0]] / med[names[1]]:.2f}")

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    a32, a64, ref = (alphas[name] for name in names)
    f32, f64, fref = K_test @ a32, K_test @ a64, K_test @ ref
    pairs = {"coefficients": (a32, a64, ref), "predictions": (f32, f64, fref)}
    for what, (x32, x64, xref) in pairs.items():
        print(f"{what:<13} |32 - 64| / |64| {rel(x32, x64):.2e}   |64 - ref| / |ref| {rel(x64, xref):.2e}")
    agree = (f32.argmax(1) == f64.argmax(1)).sum().item()
    accuracy = [(f.argmax(1) == yt).double().mean().item() for f in (f32, f64, fref)]
    print(
        f"held-out classes: float32 and float64 agree on {agree} of {args.n_test}; test accuracy "
        f"float32 {accuracy[0]:.4f}, float64 {accuracy[1]:.4f}, reference {accuracy[2]:.4f}"
    )


if __name__ == "__main__":
    main()
