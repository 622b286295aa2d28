"""ntkrun.layers against neural-tangents' stax, in float64, on the same compositions and inputs.

neural-tangents runs in its own virtual environment (not a dependency of ntkrun): give its python
with --nt-python (the anchors' setup script builds one). Both sides get the same inputs (with an
exact duplicate, to exercise correlation 1 off the diagonal); printed per composition: the largest
relative difference of Sigma and of Theta.

    python benchmarks/against_stax.py --nt-python ~/.cache/ntkrun-anchors/nt-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

import ntkrun.layers as nl

# each composition twice: ntkrun.layers, and the same in stax (evaluated in the nt venv)
CASES = {
    "linear": (
        lambda: nl.serial(nl.Dense(W_std=1.5), nl.Dense()),
        "stax.serial(stax.Dense(512, W_std=1.5, b_std=0.1), D())",
    ),
    "erf": (lambda: nl.serial(nl.Dense(), nl.Erf(), nl.Dense()), "stax.serial(D(), stax.Erf(), D())"),
    "mlp_relu": (
        lambda: nl.serial(
            nl.Dense(b_std=0.1), nl.Relu(), nl.Dense(b_std=0.1), nl.Relu(), nl.Dense(b_std=0.1)
        ),
        "stax.serial(D(), stax.Relu(), D(), stax.Relu(), D())",
    ),
    "erf_leaky_abs": (
        lambda: nl.serial(
            nl.Dense(W_std=1.5),
            nl.Erf(),
            nl.Dense(),
            nl.LeakyRelu(0.2),
            nl.Dense(),
            nl.Abs(),
            nl.Dense(),
        ),
        "stax.serial(stax.Dense(512, W_std=1.5, b_std=0.1), stax.Erf(), D(), stax.LeakyRelu(0.2), D(),"
        " stax.Abs(), D())",
    ),
    "resmlp": (
        lambda: nl.serial(
            nl.Dense(),
            nl.residual(nl.Relu(), nl.Dense()),
            nl.residual(nl.Relu(), nl.Dense()),
            nl.Relu(),
            nl.Dense(),
        ),
        "stax.serial(D(), res(stax.Relu(), D()), res(stax.Relu(), D()), stax.Relu(), D())",
    ),
    "lnmlp": (
        lambda: nl.serial(
            nl.Dense(), nl.LayerNorm(), nl.Relu(), nl.Dense(), nl.LayerNorm(), nl.Relu(), nl.Dense()
        ),
        "stax.serial(D(), stax.LayerNorm(), stax.Relu(), D(), stax.LayerNorm(), stax.Relu(), D())",
    ),
    "concat": (
        lambda: nl.serial(
            nl.Dense(),
            nl.concat(nl.serial(nl.Relu(), nl.Dense()), nl.serial(nl.Erf(), nl.Dense())),
            nl.Dense(),
            nl.Relu(),
            nl.Dense(),
        ),
        "stax.serial(D(), stax.FanOut(2), stax.parallel(stax.serial(stax.Relu(), D()),"
        " stax.serial(stax.Erf(), D())), stax.FanInConcat(), D(), stax.Relu(), D())",
    ),
}

NT_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from neural_tangents import stax
D = lambda: stax.Dense(512, W_std=1.0, b_std=0.1, parameterization="ntk")
res = lambda *b: stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(*b)), stax.FanInSum())
x = np.load(sys.argv[1])
out = {}
for name, expr in json.loads(sys.argv[2]).items():
    k = eval(expr)[2](x, None, get=("nngp", "ntk"))
    out[name] = [np.asarray(k.nngp).tolist(), np.asarray(k.ntk).tolist()]
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", required=True, help="python of a venv with neural-tangents")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--dim", type=int, default=10)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((args.n, args.dim))
    x[-1] = x[0]  # an exact duplicate: correlation 1 off the diagonal
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        np.save(path, x)
        exprs = json.dumps({name: expr for name, (_, expr) in CASES.items()})
        done = subprocess.run(
            [args.nt_python, "-c", NT_SCRIPT, str(path), exprs], capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
    X = torch.from_numpy(x)
    one = torch.eye(args.n, dtype=torch.bool)
    one[0, -1] = one[-1, 0] = True  # the pairs of correlation 1: the diagonal and the duplicate
    print(
        f"float64, N = {args.n}, dim {args.dim}: largest relative difference, Sigma and Theta, at the pairs"
    )
    print(f"{'composition':<16} {'corr. 1: Sigma':>15} {'Theta':>9} {'others: Sigma':>15} {'Theta':>9}")
    worst = 0.0
    for name, (build, _) in CASES.items():
        rel = [
            (mine - torch.tensor(ref, dtype=torch.float64)).abs()
            / torch.tensor(ref, dtype=torch.float64).abs()
            for mine, ref in zip(build().kernels(X), theirs[name], strict=True)
        ]
        at_one, others = [float(r[one].max()) for r in rel], [float(r[~one].max()) for r in rel]
        print(f"{name:<16} {at_one[0]:>15.2e} {at_one[1]:>9.2e} {others[0]:>15.2e} {others[1]:>9.2e}")
        worst = max(worst, max(at_one) / 5e-8, max(others) / 1e-10)
    if worst > 1:  # the agreement promised: 1e-10, and 5e-8 where arccos is at correlation 1
        raise SystemExit(f"disagrees with stax beyond 1e-10 (5e-8 at correlation 1): {worst:.3g} times")


if __name__ == "__main__":
    main()
