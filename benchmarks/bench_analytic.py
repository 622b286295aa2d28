"""Analytic Sigma(L) and Theta(L) of a ReLU MLP (NTK parametrization, beta 0.1): ntkrun in float64
against neural-tangents' jitted kernel_fn in float32 and float64, side by side in one run.

    python benchmarks/bench_analytic.py [--n 4096] [--depth 4] [--rounds 3] [--nt-python PATH]

--nt-python is the interpreter of a virtual environment with neural-tangents 0.6.5 (and jax
0.4.23); neural-tangents runs only in that separate process, it is never a dependency of
ntkrun. Rounds alternate between the contenders; each prints its best time, then the ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from ntkrun import analytic_kernels

NT = """
import sys, time, jax
jax.config.update("jax_enable_x64", sys.argv[2] == "float64")
import jax.numpy as jnp
from neural_tangents import stax
n, depth = int(sys.argv[1]), int(sys.argv[3])
layers = []
for _ in range(depth - 1):
    layers += [stax.Dense(10, W_std=1.0, b_std=0.1, parameterization="ntk"), stax.Relu()]
_, _, kernel_fn = stax.serial(*layers, stax.Dense(1, W_std=1.0, b_std=0.1, parameterization="ntk"))
kf = jax.jit(kernel_fn, static_argnames="get")
dtype = jnp.float64 if sys.argv[2] == "float64" else jnp.float32
x = jax.random.uniform(jax.random.PRNGKey(0), (n, 784), dtype=dtype)
jax.block_until_ready(kf(x, None, get=("nngp", "ntk")))  # compile
t = time.perf_counter()
jax.block_until_ready(kf(x, None, get=("nngp", "ntk")))
print(time.perf_counter() - t)
"""


def ntkrun_time(n: int, depth: int) -> float:
    X = torch.rand(n, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    analytic_kernels(X, depth=depth)
    return time.perf_counter() - t


def nt_time(python: str, n: int, depth: int, dtype: str) -> float:
    command = [python, "-c", NT, str(n), dtype, str(depth)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nt-python", default=None)
    args = parser.parse_args()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        contenders = {"ntkrun float64": lambda: ntkrun_time(args.n, args.depth)}
        if args.nt_python:
            for dtype in ("float32", "float64"):
                contenders[f"neural-tangents {dtype}"] = lambda d=dtype: nt_time(
                    args.nt_python, args.n, args.depth, d
                )
        for name, measure in contenders.items():
            best[name] = min(best.get(name, float("inf")), measure())
    threads = torch.get_num_threads()
    print(f"N = {args.n}, n0 = 784, depth {args.depth}, ReLU, Sigma and Theta; torch threads {threads}")
    for name, seconds in best.items():
        print(f"{name:<26} {seconds:8.3f} s  (best of {args.rounds})")
    for name, seconds in best.items():
        if name != "ntkrun float64":
            print(f"ntkrun float64 / {name}: {best['ntkrun float64'] / seconds:.2f}")


if __name__ == "__main__":
    main()
