"""Monte-Carlo limits, side by side with neural-tangents' `monte_carlo_kernel_fn` (issue: user models).

The same depth-4 ReLU MLP in NTK parametrization (W_std 1, b_std 0.1), the same N inputs, the same
number of networks: ntkrun.monte_carlo_kernels (float64, streamed, with standard errors) against
neural-tangents 0.6.5 in its own virtual environment (float32, jit; no standard errors), each in its
own process, alternating, `--rounds` times. Printed per case: seconds (neural-tangents' first call
includes its compilation, its second does not), peak resident memory, and each mean's relative
distance to the analytic kernels of the same width's limit (both estimate the finite-width mean, so
both sit a bias of O(1/width) plus noise away; ntkrun also says how large its noise is).

    python benchmarks/bench_monte_carlo.py --nt-python PATH [--rounds 2]

PATH: the python of neural-tangents' environment (its setup script prints it). Without it only
ntkrun's side runs. neural-tangents is never imported here: the script below runs under PATH.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ntkrun import analytic_kernels

CASES = [  # (N, n0, width, n_samples)
    (64, 16, 512, 32),
    (256, 784, 512, 32),
]
DEPTH, BETA = 4, 0.1

NT_SCRIPT = """
import json, resource, sys, time
import jax, numpy as np
import neural_tangents as nt
from neural_tangents import stax
path, width, depth, samples = sys.argv[1], *map(int, sys.argv[2:5])
x = np.load(path).astype(np.float32)
layers = []
for _ in range(depth - 1):
    layers += [stax.Dense(width, W_std=1.0, b_std=0.1, parameterization="ntk"), stax.Relu()]
init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(1, W_std=1.0, b_std=0.1, parameterization="ntk"))
fn = nt.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), samples, trace_axes=(),
                              vmap_axes=0, implementation=3)
times, out = [], None
for _ in range(2):
    t = time.perf_counter()
    out = fn(x, None, get=("nngp", "ntk"))
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
np.save(path + ".nngp.npy", np.asarray(out.nngp, np.float64).reshape(len(x), len(x)))
np.save(path + ".ntk.npy", np.asarray(out.ntk, np.float64).reshape(len(x), len(x)))
print(json.dumps({"first": times[0], "second": times[1],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def ntkrun_side(path: str, width: int, samples: int, dtype: str) -> None:
    """Runs in a child process: ntkrun's estimate on the saved inputs (networks in `dtype`, means
    accumulated in float64); prints timings as JSON."""
    from ntkrun import MLP, monte_carlo_kernels

    dt = getattr(torch, dtype)
    X = torch.from_numpy(np.load(path)).to(dt)

    def factory(seed: int) -> torch.nn.Module:
        return MLP(X.shape[1], width, DEPTH, "relu", beta=BETA, seed=seed, dtype=dt)

    t = time.perf_counter()
    est = monte_carlo_kernels(factory, X, n_samples=samples, seed=0)
    seconds = time.perf_counter() - t
    for kind in ("nngp", "ntk"):
        np.save(f"{path}.{kind}.npy", getattr(est, kind).numpy())
        np.save(f"{path}.{kind}_se.npy", getattr(est, f"{kind}_stderr").numpy())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first": seconds, "second": seconds, "rss_mb": rss}))


def run(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def distances(path: str, X: torch.Tensor) -> dict[str, float]:
    """||mean - analytic|| / ||analytic|| per kind (Frobenius)."""
    sigma, theta = analytic_kernels(X, depth=DEPTH, nonlinearity="relu", beta=BETA)
    out = {}
    for kind, ref in (("nngp", sigma), ("ntk", theta)):
        mean = torch.from_numpy(np.load(f"{path}.{kind}.npy"))
        out[kind] = float((mean - ref).norm() / ref.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nt-python", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--side", nargs=4, help=argparse.SUPPRESS)  # PATH WIDTH SAMPLES DTYPE
    args = ap.parse_args()
    if args.side:
        ntkrun_side(args.side[0], int(args.side[1]), int(args.side[2]), args.side[3])
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; depth {DEPTH} ReLU MLP, beta {BETA}"
    )
    for n, n0, width, samples in CASES:
        X = torch.randn(n, n0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "x.npy")
            np.save(path, X.numpy())
            ours: dict[str, list[dict]] = {"float64": [], "float32": []}
            theirs, mine, se, other = [], {}, {}, {}
            for _ in range(args.rounds):
                for dtype, results in ours.items():
                    results.append(
                        run([sys.executable, __file__, "--side", path, str(width), str(samples), dtype])
                    )
                    mine[dtype] = distances(path, X)
                    se[dtype] = float(np.linalg.norm(np.load(f"{path}.ntk_se.npy")))
                if args.nt_python:
                    command = [args.nt_python, "-c", NT_SCRIPT, path, str(width), str(DEPTH), str(samples)]
                    theirs.append(run(command))
                    other = distances(path, X)
            theta_norm = float(analytic_kernels(X, depth=DEPTH, nonlinearity="relu", beta=BETA)[1].norm())
            print(f"\nN {n}, n0 {n0}, width {width}, {samples} networks")
            best = {}
            for dtype, results in ours.items():
                best[dtype] = min(r["first"] for r in results)
                rss = max(r["rss_mb"] for r in results)
                print(f"  ntkrun {dtype}  {best[dtype]:6.2f} s   peak RSS {rss:5.0f} MB   "
                      f"dist to analytic: nngp {mine[dtype]['nngp']:.4f}, ntk {mine[dtype]['ntk']:.4f} "
                      f"(its ||SE_ntk|| / ||analytic|| {se[dtype] / theta_norm:.4f})")  # fmt: skip
            if theirs:
                first, second = min(r["first"] for r in theirs), min(r["second"] for r in theirs)
                print(f"  neural-tangents {first:5.2f} s (first call), {second:.2f} s (second)   peak RSS "
                      f"{max(r['rss_mb'] for r in theirs):5.0f} MB   dist: nngp {other['nngp']:.4f}, "
                      f"ntk {other['ntk']:.4f} (no standard error)")  # fmt: skip
                for dtype, seconds in best.items():
                    print(f"  ratio neural-tangents / ntkrun {dtype}: {first / seconds:.2f} "
                          f"(its first call), {second / seconds:.2f} (its second)")  # fmt: skip


if __name__ == "__main__":
    main()
