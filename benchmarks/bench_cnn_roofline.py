"""The CNN's limiting-kernel recursion against this machine's roofline, measured side by side in one run.

The roofline's three ceilings, each measured here at the thread count torch has:
- float64 matrix products: the best of three 2048^3 float64 GEMMs (flop/s);
- float64 elementwise work in cache: addcmul_ (2 flops per number) on 2^17 numbers (1 MB, the
  size of the recursion's tile intermediates, ntkrun.kernels.cnn.TILE_NUMBERS);
- memory: a triad c = a + s b on 2^26 numbers (1.5 GB moved per pass), bytes/s.
The recursion: `cnn_kernels` (Sigma and Theta, flatten or gap readout, 3x3 SAME, ReLU, depth L) on
N random images of 1 x H x W, timed (best of --rounds), its FLOPs counted by the architecture's cost
model (kernel_flops: the patch sums' 4 k^2 and 60 more per pixel pair and layer, the input
products). Prints the achieved flop rate and its fraction of each ceiling.

    python benchmarks/bench_cnn_roofline.py [--n 128] [--gap-n 8] [--depth 3] [--size 28] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch
from bench_engine import best_time as best

from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.kernels.cnn import TILE_NUMBERS, cnn_kernels


def ceilings(rounds: int) -> dict[str, float]:
    a, b = torch.randn(2048, 2048, dtype=torch.float64), torch.randn(2048, 2048, dtype=torch.float64)
    gemm = 2 * 2048**3 / best(lambda: a @ b, rounds)
    x, y, z = (torch.rand(TILE_NUMBERS, dtype=torch.float64) for _ in range(3))
    reps = 200

    def elementwise() -> None:
        for _ in range(reps):
            x.addcmul_(y, z, value=1e-9)

    cache = 2 * TILE_NUMBERS * reps / best(elementwise, rounds)
    big = [torch.rand(2**26, dtype=torch.float64) for _ in range(3)]
    triad = 3 * 8 * 2**26 / best(lambda: torch.add(big[0], big[1], alpha=0.5, out=big[2]), rounds)
    return {"gemm": gemm, "cache": cache, "triad": triad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--gap-n", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    roof = ceilings(args.rounds)
    print(f"ceilings: float64 GEMM {roof['gemm'] / 1e9:.1f} GFLOP/s, float64 addcmul in cache (1 MB) "
          f"{roof['cache'] / 1e9:.1f} GFLOP/s, memory triad {roof['triad'] / 1e9:.1f} GB/s")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for readout, n in (("flatten", args.n), ("gap", args.gap_n)):
        X = torch.rand(n, 1, args.size, args.size, generator=g, dtype=torch.float64)
        X2 = torch.rand(n, 1, args.size, args.size, generator=g, dtype=torch.float64)

        def gram(X=X, X2=X2, r=readout) -> object:
            return cnn_kernels(X, X2, depth=args.depth, readout=r)

        seconds = best(gram, args.rounds)
        flops = CNNArchitecture((1, args.size, args.size), args.depth, readout=readout).kernel_flops(n, n)
        rate = flops / seconds
        print(f"{readout}: N = {n} x {n} pairs, {seconds:.3f} s, {seconds / n**2 * 1e6:.2f} us per pair, "
              f"{flops / n**2:.3g} flop per pair, {rate / 1e9:.1f} GFLOP/s = {rate / roof['gemm']:.2f} of "
              f"float64 GEMM, {rate / roof['cache']:.2f} of in-cache addcmul")  # fmt: skip


if __name__ == "__main__":
    main()
