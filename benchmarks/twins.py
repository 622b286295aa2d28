"""Is GD of a preset's networks chaotic? Twin networks that differ by one ulp in one weight.

A measurement, not a timing: each network of `ntkrun features --preset quick` (arm (a), the NTK
and muP parametrizations over the widths) is trained as the runner trains it, and again from the
same initialization with one first-layer weight moved by one float32 ulp. A contracting (lazy)
training keeps the twins within a few ulps; a chaotic one spreads the ulp until the twins are as
far apart as two seeds. Printed per (parametrization, width): the twins' relative distance in
the test outputs and in change_T, beside the spread of those over seeds (docs/science.md §11.6).

    python benchmarks/twins.py [--preset quick] [--seeds 3] [--set training.lr=0.5 ...]
"""

from __future__ import annotations

import argparse

import torch

from ntkrun.experiments import spec_of
from ntkrun.kernels import empirical_ntk
from ntkrun.runners.common import train
from ntkrun.runners.features import description, task
from ntkrun.work import FeatureNet, NoProgress


def trained(spec, work: FeatureNet, nudge: bool) -> tuple[torch.Tensor, float]:
    """(test outputs, change_T) of the runner's network for `work`, one weight nudged by an ulp."""
    X64, y, Xt64, _ = task(spec)
    model = description(spec, work)
    X, Xt = model.inputs(X64).float(), model.inputs(Xt64).float()
    net = model.net(work.width, work.seed, dtype=torch.float32, device="cpu")
    if nudge:  # a first-layer weight of the input that is largest on the training points: on
        # images, input 0 is a corner pixel, 0 in every image, and a nudge there changes nothing
        with torch.no_grad():
            w = next(net.parameters())  # (width, n0)
            j = int(X64.abs().sum(0).argmax())
            w[0, j] = torch.nextafter(w[0, j], torch.tensor(float("inf")))
    theta_0 = empirical_ntk(net, X).double()
    with torch.no_grad():
        f0, f0_test = net(X), net(Xt)
    goal = f0 + y.float() / work.alpha
    train(net, X, goal, lr=spec.training.lr, steps=spec.training.steps, label="", progress=NoProgress())
    theta_T = empirical_ntk(net, X).double()
    with torch.no_grad():
        f_test = (work.alpha * (net(Xt) - f0_test)).double()
    return f_test, float((theta_T - theta_0).norm() / theta_0.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    spec = spec_of("features", preset=args.preset, sets=args.sets)
    tr = spec.training
    print(f"features {args.preset}, lr {tr.lr}, {tr.steps} steps, {torch.get_num_threads()} threads")
    print("param  width  twin |df|/|f|  seed |df|/|f|  twin dchange/change  seed spread of change")
    for p in spec.network.parametrizations:
        for width in spec.network.width:
            twins, fs, changes = [], [], []
            for seed in range(args.seeds):
                work = FeatureNet(p, spec.training.output_scale, spec.network.depth, width, seed)
                (f, c), (g, d) = trained(spec, work, False), trained(spec, work, True)
                twins.append(((g - f).norm() / f.norm(), abs(d - c) / c))
                fs.append(f)
                changes.append(c)
            seed_f = max((fs[i] - fs[0]).norm() / fs[0].norm() for i in range(1, len(fs)))
            spread = torch.tensor(changes).std() / torch.tensor(changes).mean()
            tf = max(float(t[0]) for t in twins)
            tc = max(float(t[1]) for t in twins)
            print(f"{p:<6} {width:>5}  {tf:13.2e}  {float(seed_f):13.2e}  {tc:19.2e}  {float(spread):21.2e}")


if __name__ == "__main__":
    main()
