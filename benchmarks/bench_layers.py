"""ntkrun.layers' analytic kernels against neural-tangents' jitted kernel_fn, side by side.

The compositions of the anchors' nt_layers_time.py (NTK parametrization, W_std 1, b_std 0.1,
ending in Dense(1)): `resmlp` (Dense, 2 x residual(Relu, Dense), Relu) and `lnmlp` (Dense,
LayerNorm, Relu, Dense, LayerNorm, Relu) on N Gaussian vectors of dimension D, `myrtle5` (Conv,
Relu, Conv, Relu, AvgPool 2, Conv, Relu, AvgPool 2, Conv, Relu, GlobalAvgPool) on N one-channel
H x H images, `attention` (Dense, Relu, softmax Attention with linear scaling, Relu,
GlobalAvgPool) on N sequences of H tokens of 16 features. ntkrun computes Sigma and Theta in
float64; neural-tangents in float32 (its own default; `--nt64` for float64), best of 3 after a
compile run, in its own venv. Rounds alternate the two, and the ratio ntkrun / neural-tangents
of their best times is printed (below 1: faster).

    python benchmarks/bench_layers.py --nt-python ~/.cache/ntkrun-anchors/nt-venv/bin/python \\
        --anchors DIR [--case resmlp 4096 784] [--case myrtle5 16 8]
        [--case attention 256 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

import ntkrun.layers as nl
from ntkrun.units import cpu_model


def composition(case: str) -> nl.Layer:
    if case == "resmlp":
        body = [nl.Dense(), nl.residual(nl.Relu(), nl.Dense()), nl.residual(nl.Relu(), nl.Dense()), nl.Relu()]
    elif case == "lnmlp":
        body = [nl.Dense(), nl.LayerNorm(), nl.Relu(), nl.Dense(), nl.LayerNorm(), nl.Relu()]
    elif case == "myrtle5":
        conv = [nl.Conv(), nl.Relu()]
        body = [*conv, *conv, nl.AvgPool(2), *conv, nl.AvgPool(2), *conv, nl.GlobalAvgPool()]
    elif case == "attention":
        body = [nl.Dense(), nl.Relu(), nl.Attention(), nl.Relu(), nl.GlobalAvgPool()]
    else:
        raise SystemExit(f"unknown case {case!r} (resmlp, lnmlp, myrtle5, attention)")
    return nl.serial(*body, nl.Dense())


def ours(case: str, n: int, h: int) -> float:
    shape = {"myrtle5": (n, 1, h, h), "attention": (n, h, 16)}.get(case, (n, h))
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = composition(case)
    model.kernels(X)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.kernels(X)
        best = min(best, time.perf_counter() - t0)
    return best


def theirs(nt_python: str, anchors: Path, case: str, n: int, h: int, x64: bool) -> float:
    command = [nt_python, str(anchors / "nt_layers_time.py"), case, str(n), str(h)] + (["64"] if x64 else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", required=True)
    parser.add_argument("--anchors", type=Path, required=True, help="the folder of nt_layers_time.py")
    parser.add_argument("--case", nargs=3, action="append", metavar=("CASE", "N", "H"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nt64", action="store_true", help="neural-tangents in float64 too")
    args = parser.parse_args()
    cases = args.case or [
        ["resmlp", "4096", "784"], ["lnmlp", "4096", "784"],
        ["myrtle5", "16", "8"], ["attention", "256", "16"],
    ]  # fmt: skip
    print(
        f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
    )
    nt = "nt f64 s" if args.nt64 else "nt f32 s"
    print(f"{'case':<10} {'N':>6} {'H':>5} {'ntkrun f64 s':>13} {nt:>10} {'ratio':>7}")
    for case, n, h in cases:
        a, b = float("inf"), float("inf")
        for _ in range(args.rounds):  # alternating
            a = min(a, ours(case, int(n), int(h)))
            b = min(b, theirs(args.nt_python, args.anchors, case, int(n), int(h), args.nt64))
        print(f"{case:<10} {n:>6} {h:>5} {a:>13.4f} {b:>10.4f} {a / b:>7.2f}")


if __name__ == "__main__":
    main()
