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

C = "stax.Conv(64, (3, 3), padding='SAME', W_std=1.0, b_std=0.1, parameterization='ntk')"
POOL = "stax.AvgPool((2, 2), strides=(2, 2), padding='VALID')"
CIRCULAR = "stax.Conv(64, (3, 3), padding='CIRCULAR', W_std=1.0, b_std=0.1)"
VALID = "stax.Conv(64, (3, 3), padding='VALID', W_std=1.0, b_std=0.1)"
# each composition twice: ntkrun.layers, and the same in stax (evaluated in the nt venv)
CASES = {  # on (N, dim) vectors
    "linear": (lambda: nl.serial(nl.Dense(W_std=1.5), nl.Dense()), "stax.serial(stax.Dense(512, W_std=1.5, b_std=0.1), D())"),
    "erf": (lambda: nl.serial(nl.Dense(), nl.Erf(), nl.Dense()), "stax.serial(D(), stax.Erf(), D())"),
    "mlp_relu": (
        lambda: nl.serial(nl.Dense(), nl.Relu(), nl.Dense(), nl.Relu(), nl.Dense()),
        "stax.serial(D(), stax.Relu(), D(), stax.Relu(), D())",
    ),
    "erf_leaky_abs": (
        lambda: nl.serial(nl.Dense(W_std=1.5), nl.Erf(), nl.Dense(), nl.LeakyRelu(0.2), nl.Dense(), nl.Abs(), nl.Dense()),
        "stax.serial(stax.Dense(512, W_std=1.5, b_std=0.1), stax.Erf(), D(), stax.LeakyRelu(0.2), D(), stax.Abs(), D())",
    ),
    "resmlp": (
        lambda: nl.serial(nl.Dense(), nl.residual(nl.Relu(), nl.Dense()), nl.residual(nl.Relu(), nl.Dense()), nl.Relu(), nl.Dense()),
        "stax.serial(D(), res(stax.Relu(), D()), res(stax.Relu(), D()), stax.Relu(), D())",
    ),
    "lnmlp": (
        lambda: nl.serial(nl.Dense(), nl.LayerNorm(), nl.Relu(), nl.Dense(), nl.LayerNorm(), nl.Relu(), nl.Dense()),
        "stax.serial(D(), stax.LayerNorm(), stax.Relu(), D(), stax.LayerNorm(), stax.Relu(), D())",
    ),
    "concat": (
        lambda: nl.serial(nl.Dense(), nl.concat(nl.serial(nl.Relu(), nl.Dense()), nl.serial(nl.Erf(), nl.Dense())), nl.Dense(), nl.Relu(), nl.Dense()),
        "stax.serial(D(), stax.FanOut(2), stax.parallel(stax.serial(stax.Relu(), D()), stax.serial(stax.Erf(), D())), stax.FanInConcat(), D(), stax.Relu(), D())",
    ),
}  # fmt: skip
IMAGE_CASES = {  # on (N, 2, 6, 6) images (stax: NHWC)
    "cnn_flatten": (
        lambda: nl.serial(nl.Conv(), nl.Relu(), nl.Conv(), nl.Relu(), nl.Flatten(), nl.Dense()),
        f"stax.serial({C}, stax.Relu(), {C}, stax.Relu(), stax.Flatten(), D())",
    ),
    "myrtle_like": (
        lambda: nl.serial(nl.Conv(), nl.Relu(), nl.AvgPool(2), nl.Conv(padding="circular"), nl.Erf(), nl.GlobalAvgPool(), nl.Dense()),
        f"stax.serial({C}, stax.Relu(), {POOL}, {CIRCULAR}, stax.Erf(), stax.GlobalAvgPool(), D())",
    ),
    "conv_valid_ln": (
        lambda: nl.serial(nl.Conv(padding="valid"), nl.LayerNorm(), nl.Relu(), nl.Conv(), nl.Relu(), nl.Flatten(), nl.Dense()),
        f"stax.serial({VALID}, stax.LayerNorm(), stax.Relu(), {C}, stax.Relu(), stax.Flatten(), D())",
    ),
}  # fmt: skip

ATT = "stax.GlobalSelfAttention(512, 512, 512, 1, linear_scaling={}, attention_mechanism='{}', b_std=0.1)"
SEQUENCE_CASES = {  # on (N, 4, 3) sequences (stax: the same layout, features last)
    "attention_softmax": (
        lambda: nl.serial(nl.Dense(), nl.Relu(), nl.Attention(), nl.Relu(), nl.GlobalAvgPool(), nl.Dense()),
        f"stax.serial(D(), stax.Relu(), {ATT.format(True, 'SOFTMAX')}, stax.Relu(), stax.GlobalAvgPool(), D())",
    ),
    "attention_identity": (
        lambda: nl.serial(nl.Dense(), nl.Attention(mechanism="identity", linear_scaling=False), nl.Erf(), nl.Flatten(), nl.Dense()),
        f"stax.serial(D(), {ATT.format(False, 'IDENTITY')}, stax.Erf(), stax.Flatten(), D())",
    ),
    "attention_linear_ln": (
        lambda: nl.serial(nl.Dense(), nl.Attention(heads=2, mechanism="identity"), nl.LayerNorm(), nl.Relu(), nl.GlobalAvgPool(), nl.Dense()),
        f"stax.serial(D(), {ATT.format(True, 'IDENTITY')}, stax.LayerNorm(), stax.Relu(), stax.GlobalAvgPool(), D())",
    ),
    "attention_residual": (
        lambda: nl.serial(nl.Dense(), nl.residual(nl.Relu(), nl.Attention()), nl.Relu(), nl.Dense(), nl.Flatten(), nl.Dense()),
        f"stax.serial(D(), res(stax.Relu(), {ATT.format(True, 'SOFTMAX')}), stax.Relu(), D(), stax.Flatten(), D())",
    ),
}  # fmt: skip

NT_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from neural_tangents import stax
D = lambda: stax.Dense(512, W_std=1.0, b_std=0.1, parameterization="ntk")
res = lambda *b: stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(*b)), stax.FanInSum())
out = {}
for path, cases in zip(sys.argv[1::2], sys.argv[2::2]):
  x = np.load(path)
  for name, expr in json.loads(cases).items():
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
    rng = np.random.default_rng(0)
    x, images = rng.standard_normal((args.n, args.dim)), rng.standard_normal((8, 2, 6, 6))
    sequences = rng.standard_normal((7, 4, 3))
    x[-1], images[-1], sequences[-1] = x[0], images[0], sequences[0]  # exact duplicates: correlation 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "x.npy", Path(tmp) / "images.npy", Path(tmp) / "sequences.npy"]
        np.save(paths[0], x)
        np.save(paths[1], images.transpose(0, 2, 3, 1))  # stax takes NHWC
        np.save(paths[2], sequences)
        groups = (CASES, IMAGE_CASES, SEQUENCE_CASES)
        exprs = [json.dumps({n: expr for n, (_, expr) in cases.items()}) for cases in groups]
        command = [args.nt_python, "-c", NT_SCRIPT, *(a for pair in zip(map(str, paths), exprs, strict=True) for a in pair)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"float64, {args.n} vectors of {args.dim}, 8 images 2x6x6, 7 sequences 4x3: largest relative differences")
    print(f"{'composition':<20} {'corr. 1: Sigma':>15} {'Theta':>9} {'others: Sigma':>15} {'Theta':>9}")
    worst = 0.0
    runs = [(name, build, x) for name, (build, _) in CASES.items()]
    runs += [(name, build, images) for name, (build, _) in IMAGE_CASES.items()]
    runs += [(name, build, sequences) for name, (build, _) in SEQUENCE_CASES.items()]
    for name, build, inputs in runs:
        one = torch.eye(len(inputs), dtype=torch.bool)
        one[0, -1] = one[-1, 0] = True  # the pairs of correlation 1: the diagonal and the duplicate
        refs = [torch.tensor(ref, dtype=torch.float64) for ref in theirs[name]]
        ours = build().kernels(torch.from_numpy(inputs))
        rel = [(mine - ref).abs() / ref.abs() for mine, ref in zip(ours, refs, strict=True)]
        at_one, others = [float(r[one].max()) for r in rel], [float(r[~one].max()) for r in rel]
        print(f"{name:<20} {at_one[0]:>15.2e} {at_one[1]:>9.2e} {others[0]:>15.2e} {others[1]:>9.2e}")
        worst = max(worst, max(at_one) / 5e-8, max(others) / 1e-10)
    if worst > 1:  # the agreement promised: 1e-10, and 5e-8 where arccos is at correlation 1
        raise SystemExit(f"disagrees with stax beyond 1e-10 (5e-8 at correlation 1): {worst:.3g} times")


if __name__ == "__main__":
    main()
