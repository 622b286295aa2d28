"""The empirical NTK of a composition's network, side by side: ntkrun's structured path
(ntkrun.kernels.layers_empirical), ntkrun's generic torch.func path on the same network, the
hand-written MLP's layerwise path, and neural-tangents' empirical_ntk_fn (structured derivatives,
jit; the anchors' nt_empirical_time.py, in its own venv) on the depth-4 ReLU MLP of NTK
parametrization (W_std 1, b_std 0.1), N inputs of n0, width w, float32 everywhere. Prints each
time (best of 3 after a warm-up; rounds alternate) and the ratios to neural-tangents' (below 1:
faster), and the CPU.

    python benchmarks/bench_layers_empirical.py --nt-python ~/.cache/ntkrun-anchors/nt-venv/bin/python \\
        --anchors DIR [--n0 784] [--width 512] [--n 512] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ntkrun
from ntkrun.kernels.generic import generic_ntk
from ntkrun.kernels.layers_empirical import layers_empirical_ntk
from ntkrun.layers.parse import parse
from ntkrun.units import cpu_model


def best(f: Callable[[], object]) -> float:
    f()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", required=True)
    parser.add_argument("--anchors", type=Path, required=True, help="the folder of nt_empirical_time.py")
    parser.add_argument("--n0", type=int, default=784)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-generic", action="store_true", help="skip the (slow) generic path")
    args = parser.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {cpu_model()} ({capability}), {torch.get_num_threads()} threads")
    X = torch.rand(args.n, args.n0, generator=torch.Generator().manual_seed(0))
    composition = parse("mlp").net(args.width, seed=0, n0=args.n0)  # Dense, 3 x (Relu, Dense): depth 4
    mlp = ntkrun.MLP(args.n0, args.width, 4, seed=0)
    paths: dict[str, Callable[[], object]] = {
        "layers structured": lambda: layers_empirical_ntk(composition, X),
        "MLP layerwise": lambda: ntkrun.empirical_ntk(mlp, X),
    }
    if not args.no_generic:
        paths["layers generic"] = lambda: generic_ntk(composition, X)
    script = str(args.anchors / "nt_empirical_time.py")
    command = [args.nt_python, script, str(args.n0), str(args.width), str(args.n)]
    times = {name: float("inf") for name in [*paths, "neural-tangents"]}
    for _ in range(args.rounds):
        for name, f in paths.items():
            times[name] = min(times[name], best(f))
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        times["neural-tangents"] = min(times["neural-tangents"], float(done.stdout.strip().splitlines()[-1]))
    print(f"depth-4 ReLU MLP, N = {args.n}, n0 = {args.n0}, width {args.width}, float32")
    nt = times["neural-tangents"]
    for name, t in times.items():
        print(f"{name:<20} {t:>9.4f} s   ratio to neural-tangents {t / nt:>6.2f}")


if __name__ == "__main__":
    main()
