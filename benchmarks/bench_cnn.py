"""The CNN's kernels (depth-L ReLU CNN, 3x3 SAME convolutions, NTK parametrization, beta 0.1):
ntkrun against neural-tangents side by side in one run, on MNIST-sized images (28 x 28, 1 channel).

    python benchmarks/bench_cnn.py --nt-python PATH [--anchors DIR] [--rounds 2]
        [--flatten-n 512] [--gap-n 8] [--depth 3] [--empirical-n 64] [--channels 32]
    python benchmarks/bench_cnn.py --nt-python PATH --check      (agreement only)
    python benchmarks/bench_cnn.py --bias [--seeds 400]          (finite-width bias of tests/test_cnn.py)

Four timings, each the ratio ntkrun / neural-tangents (best of --rounds, the contenders
alternating): the analytic Sigma and Theta with the "flatten" readout and with "gap" (ntkrun in
float64, neural-tangents' jitted kernel_fn in float32, as its anchor script runs it), and the
empirical NTK of the same CNN with `--channels` channels (ntkrun's `empirical_ntk`, float32, against
neural-tangents' fastest `empirical_ntk_fn` implementation), and ntkrun's generic torch.func path on
that CNN (what the gradient-feature path replaces). neural-tangents is timed by the anchor
script `nt_cnn_time.py` (--anchors, default ../shared/anchors beside the repository root if present;
compile excluded, best of 3 per call) in the separate interpreter --nt-python (a virtual environment
with neural-tangents 0.6.5); it is never a dependency of ntkrun. --check also computes
neural-tangents' kernel_fn in float64 on the same small inputs and prints the largest relative
difference from ntkrun's cnn_kernels, for both readouts.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ntkrun.architectures import CNN
from ntkrun.kernels import empirical_ntk
from ntkrun.kernels.cnn import cnn_kernels
from ntkrun.kernels.generic import generic_ntk

ROOT = Path(__file__).resolve().parent.parent

NT_VALUES = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from neural_tangents import stax
path, depth = sys.argv[1], int(sys.argv[2])
x = np.load(path + "/x.npy")  # (N, H, W, C)
for readout in ("flatten", "gap"):
    layers = []
    for _ in range(depth - 1):
        layers += [stax.Conv(8, (3, 3), padding="SAME", W_std=1.0, b_std=0.1, parameterization="ntk"),
                   stax.Relu()]
    layers.append(stax.Flatten() if readout == "flatten" else stax.GlobalAvgPool())
    _, _, kernel_fn = stax.serial(*layers, stax.Dense(1, W_std=1.0, b_std=0.1, parameterization="ntk"))
    k = kernel_fn(x, None, get=("nngp", "ntk"))
    np.save(f"{path}/{readout}_nngp.npy", np.asarray(k.nngp))
    np.save(f"{path}/{readout}_ntk.npy", np.asarray(k.ntk))
"""


def default_anchors() -> Path | None:
    path = ROOT.parent / "shared" / "anchors"
    return path if path.is_dir() else None


def images(n: int, side: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, side, side, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def ntkrun_analytic(n: int, readout: str, depth: int) -> float:
    X = images(n, 28, torch.float64)
    t = time.perf_counter()
    cnn_kernels(X, depth=depth, readout=readout)
    return time.perf_counter() - t


def ntkrun_empirical(n: int, channels: int, depth: int, readout: str, generic: bool = False) -> float:
    """empirical_ntk of the CNN (its gradient-feature path), or ntkrun's generic torch.func path on
    the same network (generic=True), float32."""
    net = CNN(1, channels, depth, readout=readout, image_size=28)
    X = images(n, 28, torch.float32)
    ntk = generic_ntk if generic else empirical_ntk
    ntk(net, X[:4])  # warm-up, as neural-tangents' compile run is excluded
    t = time.perf_counter()
    ntk(net, X)
    return time.perf_counter() - t


def nt_time(python: str, anchors: Path, *args: object) -> tuple[float, str]:
    command = [python, str(anchors / "nt_cnn_time.py"), *(str(a) for a in args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    return float(line.split()[0]), line


def check(python: str, depth: int) -> None:
    """neural-tangents' float64 kernel_fn against cnn_kernels on 6 random 8 x 8 images."""
    X = images(6, 8, torch.float64, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/x.npy", X.permute(0, 2, 3, 1).numpy())  # NHWC
        subprocess.run([python, "-c", NT_VALUES, tmp, str(depth)], capture_output=True, check=True)
        for readout in ("flatten", "gap"):
            sigma, theta = cnn_kernels(X, depth=depth, readout=readout)
            for name, ours in (("nngp", sigma), ("ntk", theta)):
                ref = torch.from_numpy(np.load(f"{tmp}/{readout}_{name}.npy"))
                err = ((ours - ref).abs().max() / ref.abs().max()).item()
                what = f"{readout:<7} {name:<4} (float64, N 6, 8x8, depth {depth})"
                print(f"agreement {what}: max rel diff {err:.2e}")


def bias(seeds: int) -> None:
    """The finite-width bias of the mean kernels for tests/test_cnn.py's Monte Carlo configurations:
    width * max|mean - limit| / max|limit| at widths 32 and 64, `seeds` networks each."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_cnn import MC_CONFIGS

    torch.set_num_threads(1)
    for width in (32, 64):
        for padding, readout, depth, nonlinearity, c0, side in MC_CONFIGS:
            X = torch.randn(
                3, c0, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
            )
            thetas, sigmas = [], []
            for s in range(seeds):
                net = CNN(c0, width, depth, padding=padding, readout=readout, nonlinearity=nonlinearity,
                          seed=1000 + s, image_size=side, dtype=torch.float64)  # fmt: skip
                thetas.append(empirical_ntk(net, X))
                f = net.nngp_features(X)
                sigmas.append(f @ f.T + 0.01)
            sigma, theta = cnn_kernels(
                X, depth=depth, padding=padding, readout=readout, nonlinearity=nonlinearity
            )
            for name, samples, limit in (("ntk", thetas, theta), ("nngp", sigmas, sigma)):
                samples = torch.stack(samples)
                d = (samples.mean(0) - limit).abs()
                se = samples.std(0) / math.sqrt(seeds)
                scale = limit.abs().max()
                print(
                    f"width {width} {padding:<8} {readout:<7} depth {depth} {nonlinearity:<4} {name:<4} "
                    f"width*max|d|/scale {(width * d.max() / scale).item():.2f}  "
                    f"beyond 2 SE {(width * (d - 2 * se).clamp(min=0).max() / scale).item():.2f}  "
                    f"width*SE/scale {(width * se.max() / scale).item():.2f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", default=None)
    parser.add_argument("--anchors", type=Path, default=default_anchors())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--flatten-n", type=int, default=512)
    parser.add_argument("--gap-n", type=int, default=8)
    parser.add_argument("--empirical-n", type=int, default=64)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--check", action="store_true", help="only the agreement with neural-tangents")
    parser.add_argument("--bias", action="store_true", help="only the finite-width bias measurement")
    parser.add_argument("--seeds", type=int, default=400)
    args = parser.parse_args()
    if args.bias:
        bias(args.seeds)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nt_python and (args.check or args.anchors is not None):
        check(args.nt_python, args.depth)
    if args.check:
        return
    d, ch = args.depth, args.channels
    cases = {
        f"analytic flatten N {args.flatten_n}": (
            lambda: ntkrun_analytic(args.flatten_n, "flatten", d),
            ("analytic", args.flatten_n, 28, "flatten", d),
        ),
        f"analytic gap N {args.gap_n}": (
            lambda: ntkrun_analytic(args.gap_n, "gap", d),
            ("analytic", args.gap_n, 28, "gap", d),
        ),
        f"empirical flatten N {args.empirical_n}, {ch} channels": (
            lambda: ntkrun_empirical(args.empirical_n, ch, d, "flatten"),
            ("empirical", args.empirical_n, 28, ch, d, "flatten"),
        ),
        f"empirical generic path N {args.empirical_n}": (
            lambda: ntkrun_empirical(args.empirical_n, ch, d, "flatten", generic=True),
            ("empirical", args.empirical_n, 28, ch, d, "flatten"),
        ),
    }
    best: dict[tuple[str, str], float] = {}
    notes: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, (ours, nt_args) in cases.items():
            best[name, "ntkrun"] = min(best.get((name, "ntkrun"), math.inf), ours())
            if args.nt_python and args.anchors is not None:
                seconds, line = nt_time(args.nt_python, args.anchors, *nt_args)
                best[name, "nt"] = min(best.get((name, "nt"), math.inf), seconds)
                notes[name] = line
    print(f"28x28x1 images, depth {d}, ReLU, 3x3 SAME, beta 0.1; torch threads {torch.get_num_threads()}; "
          f"best of {args.rounds} rounds")  # fmt: skip
    for name in cases:
        ours = best[name, "ntkrun"]
        if (name, "nt") in best:
            nt = best[name, "nt"]
            print(f"{name:<40} ntkrun {ours:8.3f} s  neural-tangents {nt:8.3f} s ({notes[name]})  "
                  f"ratio ntkrun/nt {ours / nt:.2f}")  # fmt: skip
        else:
            print(f"{name:<40} ntkrun {ours:8.3f} s")


if __name__ == "__main__":
    main()
