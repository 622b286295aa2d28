"""One GD step of the MLP: its hand-written backward pass (`mlp_gd_step`) against autograd's
(`autograd_gd_step`, the step of every other architecture), side by side in one run.

    python benchmarks/bench_gd.py [--n 256] [--n0 784] [--widths 512 2048 8192] [--depth 4] [--rounds 5]

Prints, per width, the best time of each step over --rounds (alternating) and the ratio
hand-written / autograd (below 1: the hand-written step is faster, which is why it stays).
"""

from __future__ import annotations

import argparse
import time

import torch

from ntkrun.network import MLP, autograd_gd_step, mlp_gd_step


def best(step, net: MLP, X: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> float:
    step(net, X, y, 1e-3)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(net, X, y, 1e-3)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--n0", type=int, default=784)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(args.n, args.n0, generator=gen)
    y = torch.randn(args.n, generator=gen)
    print(f"N {args.n}, n0 {args.n0}, depth {args.depth}, float32; torch threads {torch.get_num_threads()}")
    for width in args.widths:
        net = MLP(args.n0, width, args.depth, seed=0)
        hand = auto = float("inf")
        for _ in range(args.rounds):
            hand = min(hand, best(mlp_gd_step, net, X, y))
            auto = min(auto, best(autograd_gd_step, net, X, y))
        print(f"width {width:>6}: hand-written {hand * 1e3:8.2f} ms  autograd {auto * 1e3:8.2f} ms  "
              f"ratio hand/autograd {hand / auto:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
