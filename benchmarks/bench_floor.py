"""The whole N-point NTK predictor command against the exact method's floor, side by side in one run.

The floor of the exact predictor is its GEMM work at this machine's float32 GEMM rate: the
Cholesky's N^3 / 3 flops, the Grams' products (the input Gram's upper triangle N^2 n0 and the test
block's 2 M N n0) and the two triangular solves (2 N^2 m). The rate is the best of three square
4096^3 float32 products, measured before and after the command (the better of the two is used:
the floor is then the smallest, the ratio the most demanding). The command is
`ntkrun generalization` with the NTK predictor alone on the first N Fashion-MNIST training points
and all 10000 test points (depth 4 ReLU, beta 0.1), in a fresh process, its wall time measured
around it; its unit logs where its time went (data, Gram, solve, test kernel and predictions), and
the rest of the wall time is start-up (imports, spec, data digests) and writing (unit file, CSVs,
figure). Prints the floor, the time, floor / time, the profile and the test accuracy.

    python benchmarks/bench_floor.py [--n 60000] [--solver cholesky|cg] [--rank 500] [--tol 1e-5]
                                     [--set KEY=VALUE ...]

Fashion-MNIST at /usr/share/datasets/fashion-mnist or $NTKRUN_DATA_DIR. At N = 60000 the command
needs about 15 GB of memory; it runs 10-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

N0, M, TEST = 784, 10, 10000


def gemm_rate(size: int = 4096, rounds: int = 3) -> float:
    """Best float32 GEMM rate of `rounds` square size^3 products, flop/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(rounds))
    return 2 * size**3 / best


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--solver", default="cholesky", choices=["cholesky", "cg"])
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--keep", type=Path, default=None, help="output root to keep the run in")
    parser.add_argument("--set", action="append", default=[], help="more KEY=VALUE for the command")
    args = parser.parse_args()
    data = os.environ.get("NTKRUN_DATA_DIR", "/usr/share/datasets/fashion-mnist")
    torch.set_num_threads(torch.get_num_threads())
    print(f"{cpu()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    before = gemm_rate()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_floor_"))
    sets = [
        f"data.dir={data}", f"data.n_train=[{args.n}]", "predictors=[ntk]",
        f"kernels.solver={args.solver}", f"kernels.precond_rank={args.rank}", f"kernels.tol={args.tol}",
        *args.set,
    ]  # fmt: skip
    command = [sys.executable, "-m", "ntkrun", "generalization", "--output-root", str(root)]
    command += [x for s in sets for x in ("--set", s)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the command failed ({done.returncode}):\n{done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    after = gemm_rate()
    rate = max(before, after)
    n = args.n
    flops = {
        "Cholesky N^3/3": n**3 / 3,
        "Gram X X^T (upper) N^2 n0": n**2 * N0,
        "test block 2 M N n0": 2 * TEST * n * N0,
        "triangular solves 2 N^2 m": 2 * n**2 * M,
    }
    floor = sum(flops.values()) / rate
    run = next((root / "generalization").glob("*/run.log")).parent
    log = (run / "run.log").read_text()
    found = re.search(r"seconds: (.*)", log)
    phases = dict((k.rsplit(" ", 1)[0], float(k.rsplit(" ", 1)[1])) for k in found.group(1).split(", "))
    accuracy = pd.read_csv(run / "accuracy.csv")
    print(f"float32 GEMM rate (4096^3, best of 3): before {before / 1e9:.1f}, after {after / 1e9:.1f} "
          "GFLOP/s")  # fmt: skip
    for what, f in flops.items():
        print(f"  {what}: {f / 1e12:.2f} TFLOP = {f / rate:.1f} s at {rate / 1e9:.1f} GFLOP/s")
    print(f"floor {floor:.1f} s; the whole command ({args.solver}) {wall:.1f} s; floor / command = "
          f"{floor / wall:.2f}; peak RSS {peak / 2**30:.1f} GiB")  # fmt: skip
    print("where the time went:")
    for phase, s in phases.items():
        print(f"  {phase}: {s:.1f} s ({s / wall:.1%})")
    rest = wall - sum(phases.values())
    print(f"  start-up, digests and writing (the rest): {rest:.1f} s ({rest / wall:.1%})")
    row = accuracy.iloc[0]
    print(f"test accuracy {row['test_accuracy']:.4%} on {TEST} test points; solver {row['solver']}, "
          f"iterations {row['iterations']}, residual {row['residual']:.2e}, "
          f"ridge {row['ridge']:.3g}")  # fmt: skip
    print(f"run directory: {run}")


if __name__ == "__main__":
    main()
