"""The MLP and the CNN as compositions, side by side in one run: each named layer list's kernels
(Sigma and Theta, float64) by the layers' own recursion against the hand-written recursion of the
same network (the MLP's ntkrun.kernels.analytic, the CNN's pixel-pair cnn_kernels: the fast path a
composition of the CNN's shape takes, ntkrun.architectures.layers.hand_written). Prints each time
(best of 3 after a warm-up; rounds alternate), the ratio hand-written / layers (below 1: the
hand-written recursion is faster) and the CPU.

    python benchmarks/bench_named.py [--n-vectors 3000] [--n-images 64] [--rounds 2]
"""

from __future__ import annotations

import argparse

import torch
from bench_engine import best_time

from ntkrun.architectures.base import Architecture
from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.architectures.mlp import MLPArchitecture
from ntkrun.layers.parse import parse
from ntkrun.units import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-vectors", type=int, default=3000)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases: list[tuple[str, Architecture, torch.Tensor]] = [
        (f"mlp depth 4, {args.n_vectors} x 784", MLPArchitecture((784,), 4), torch.randn(args.n_vectors, 784)),  # noqa: E501
        *(
            (f"cnn depth 4 {ro}, {args.n_images} x 1x8x8", CNNArchitecture((1, 8, 8), 4, readout=ro),
             torch.randn(args.n_images, 64))
            for ro in ("flatten", "gap")
        ),
    ]  # fmt: skip
    print(
        f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
    )
    print(f"{'case':36s} {'layers s':>10s} {'hand s':>10s} {'hand/layers':>12s}")
    for name, hand, X in cases:
        X, model = X.double(), parse(hand.layer_list)
        layers_t, hand_t = [], []
        for _ in range(args.rounds):
            layers_t.append(best_time(lambda m=model, h=hand, x=X: m.kernels(h.inputs(x)), 3))
            hand_t.append(best_time(lambda h=hand, x=X: h.kernels(x, kinds=("nngp", "ntk")), 3))
        a, b = min(layers_t), min(hand_t)
        print(f"{name:36s} {a:10.4f} {b:10.4f} {b / a:12.2f}")


if __name__ == "__main__":
    main()
