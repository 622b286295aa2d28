"""The convolutional network (ntkrun/architectures/cnn.py) and its infinite-width kernels
(ntkrun/kernels/cnn.py), docs/science.md §9."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from ntkrun.architectures import CNN
from ntkrun.kernels import analytic_kernels, empirical_ntk
from ntkrun.kernels.analytic import relu_expectations, relu_expectations_
from ntkrun.kernels.cnn import cnn_kernels, patch_sum
from ntkrun.linalg import mirror_
from ntkrun.network import MLP
from ntkrun.nonlinearities import get_nonlinearity

F64 = torch.float64
PADDINGS = ("same", "valid", "circular")
READOUTS = ("flatten", "gap")


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, c: int, h: int, seed: int) -> torch.Tensor:
    return torch.randn(n, c, h, h, dtype=F64, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# An independent reference for the limit: the recursion on the joint covariance of all
# (input, pixel) points, with the patch sums written as explicit loops over pixels and offsets.


def reference_kernels(X, X2, depth, nonlinearity, beta, k, padding, readout, order=64):
    """(Sigma(L), Theta(L)) by brute force: M[(i, p), (j, q)] over the points of X and X2 together."""
    from ntkrun.kernels.analytic import quadrature_expectations

    Z = torch.cat([X, X2])
    n, c0, h, w = Z.shape
    nl = get_nonlinearity(nonlinearity)
    expect = relu_expectations if nonlinearity == "relu" else quadrature_expectations(nl, order)
    feats = Z.reshape(n, c0, h * w).permute(0, 2, 1).reshape(n * h * w, c0)
    A = (feats @ feats.T / c0).reshape(n, h, w, n, h, w)
    TA = torch.zeros_like(A)
    r = k // 2
    offsets = range(k) if padding == "valid" else range(-r, r + 1)
    for _ in range(depth - 1):
        ho, wo = (h - k + 1, w - k + 1) if padding == "valid" else (h, w)
        S = torch.zeros(n, ho, wo, n, ho, wo, dtype=F64)
        T = torch.zeros_like(S)
        B = A + TA
        for a in range(ho):
            for b in range(wo):
                for a2 in range(ho):
                    for b2 in range(wo):
                        for da in offsets:
                            for db in offsets:
                                p, q = (a + da, b + db), (a2 + da, b2 + db)
                                if padding == "circular":
                                    p, q = (p[0] % h, p[1] % w), (q[0] % h, q[1] % w)
                                if not all(0 <= u < m for u, m in zip((*p, *q), (h, w, h, w), strict=True)):
                                    continue  # "same": zero padding contributes 0
                                S[:, a, b, :, a2, b2] += A[:, p[0], p[1], :, q[0], q[1]]
                                T[:, a, b, :, a2, b2] += B[:, p[0], p[1], :, q[0], q[1]]
        h, w = ho, wo
        S = S / k**2 + beta**2
        T = T / k**2 + beta**2
        M = S.reshape(n * h * w, n * h * w)
        var = M.diagonal()
        e_ss, e_dd = expect(var[:, None], M, var[None, :])
        A = e_ss.reshape(n, h, w, n, h, w)
        TA = (T.reshape(n * h * w, n * h * w) * e_dd).reshape(n, h, w, n, h, w)
    if readout == "flatten":
        ra = A.diagonal(dim1=1, dim2=4).diagonal(dim1=1, dim2=3).mean((-2, -1))
        rt = TA.diagonal(dim1=1, dim2=4).diagonal(dim1=1, dim2=3).mean((-2, -1))
    else:
        ra, rt = A.mean((1, 2, 4, 5)), TA.mean((1, 2, 4, 5))
    n1 = X.shape[0]
    sigma = ra + beta**2
    return sigma[:n1, n1:], (rt + sigma)[:n1, n1:]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("readout", READOUTS)
def test_kernels_match_a_brute_force_recursion_over_all_points(padding, readout):
    """Every padding and readout, depth 3, against the explicit-loop reference (float64 sums of the
    same terms in another order: agreement to rounding; 1e-12 leaves a margin of 10^3)."""
    side = 5 if padding == "valid" else 4
    X, X2 = images(2, 2, side, 0), images(2, 2, side, 1)
    for nonlinearity in ("relu", "tanh"):
        ref = reference_kernels(X, X2, 3, nonlinearity, 0.1, 3, padding, readout)
        got = cnn_kernels(X, X2, depth=3, nonlinearity=nonlinearity, padding=padding, readout=readout)
        for g, r in zip(got, ref, strict=True):
            assert rel_err(g, r) < 1e-12


def test_flatten_needs_only_same_position_pairs():
    """With a "flatten" readout the kernel is the mean over pixels of the same-position entries of
    the full pixel-pair recursion (the reference computes all pairs), at depth 4, 5 x 5 images."""
    X, X2 = images(2, 1, 4, 2), images(1, 1, 4, 3)
    got = cnn_kernels(X, X2, depth=4, readout="flatten", padding="same")
    ref = reference_kernels(X, X2, 4, "relu", 0.1, 3, "same", "flatten")
    assert rel_err(got[1], ref[1]) < 1e-12


def test_patch_sum_against_loops():
    t = torch.randn(2, 4, 5, dtype=F64)
    for padding in PADDINGS:
        got = patch_sum(t, ((-2,), (-1,)), 3, padding)
        offsets = range(3) if padding == "valid" else range(-1, 2)
        h, w = (2, 3) if padding == "valid" else (4, 5)
        ref = torch.zeros(2, h, w, dtype=F64)
        for a in range(h):
            for b in range(w):
                for da in offsets:
                    for db in offsets:
                        p = (a + da, b + db)
                        if padding == "circular":
                            p = (p[0] % 4, p[1] % 5)
                        if 0 <= p[0] < 4 and 0 <= p[1] < 5:
                            ref[:, a, b] += t[:, p[0], p[1]]
        assert torch.allclose(got, ref, rtol=1e-14, atol=1e-14)


def test_fast_relu_expectations_equal_the_closed_form():
    """The in-place ReLU (2 pi times the expectations) against ntkrun.kernels.analytic's, to
    rounding; with a zero variance (s = 0) both give 0."""
    g = torch.Generator().manual_seed(4)
    sxx, syy = torch.rand(7, 1, dtype=F64, generator=g) + 0.1, torch.rand(1, 6, dtype=F64, generator=g)
    syy[0, 0] = 0.0
    sxy = (torch.rand(7, 6, dtype=F64, generator=g) * 2 - 1) * (sxx * syy).sqrt()
    ref = relu_expectations(sxx, sxy, syy)
    got = relu_expectations_(sxx, sxy.clone(), syy)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a / (2 * math.pi), b, rtol=1e-13, atol=1e-16)
    got = relu_expectations_(sxx, sxy.clone(), syy, roots=(sxx.sqrt(), syy.sqrt()))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a / (2 * math.pi), b, rtol=1e-12, atol=1e-16)


# ---------------------------------------------------------------------------------------------
# (d) The MLP as the 1 x 1 case


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_kernel_size_one_on_one_pixel_is_the_mlp(readout, padding):
    """kernel_size 1 on 1 x 1 images: a conv layer is a dense layer on the channel vector, both
    readouts are the identity, so the kernels are exactly the MLP's (to rounding), also in the
    standard parametrization at the same widths."""
    X = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    X2 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    for depth, nonlinearity in ((1, "relu"), (2, "erf"), (4, "relu"), (3, "tanh")):
        for x2 in (None, X2):
            im2 = None if x2 is None else x2.reshape(-1, 3, 1, 1)
            got = cnn_kernels(X.reshape(6, 3, 1, 1), im2, depth=depth, nonlinearity=nonlinearity,
                              kernel_size=1, padding=padding, readout=readout)  # fmt: skip
            ref = analytic_kernels(X, x2, depth=depth, nonlinearity=nonlinearity)
            for g, r in zip(got, ref, strict=True):
                assert torch.allclose(g, r, rtol=1e-13, atol=0)
    widths = [7, 5]
    got = cnn_kernels(X.reshape(6, 3, 1, 1), depth=3, kernel_size=1, readout=readout, padding=padding,
                      parametrization="standard", widths=widths)  # fmt: skip
    ref = analytic_kernels(X, depth=3, parametrization="standard", widths=widths)
    for g, r in zip(got, ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-13, atol=0)


@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
def test_kernel_size_one_cnn_is_the_mlp_function(parametrization):
    """Same seed: the same weights as ntkrun.MLP (drawn in the same order), the same outputs and
    the same empirical NTK; and an MLP's weights copied into a CNN give its function."""
    X = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    for readout in READOUTS:
        cnn = CNN(4, [6, 5], 3, kernel_size=1, readout=readout, n_out=2, parametrization=parametrization,
                  seed=3, image_size=1, dtype=F64, nonlinearity="tanh")  # fmt: skip
        mlp = MLP(
            4, [6, 5], 3, nonlinearity="tanh", seed=3, dtype=F64, n_out=2, parametrization=parametrization
        )
        for wc, wm in zip(cnn.weights, mlp.weights, strict=True):
            assert torch.equal(wc.reshape(wm.shape), wm)
        assert torch.allclose(cnn(X.reshape(5, 4, 1, 1)), mlp(X), rtol=1e-13, atol=1e-14)
        theta_c = empirical_ntk(cnn, X.reshape(5, 4, 1, 1))
        theta_m = empirical_ntk(mlp, X)
        assert rel_err(theta_c, theta_m) < 1e-12
    other = MLP(4, 6, 2, seed=11, dtype=F64)
    cnn = CNN(4, 6, 2, kernel_size=1, image_size=1, seed=0, dtype=F64)
    with torch.no_grad():
        for wc, bc, wm, bm in zip(cnn.weights, cnn.biases, other.weights, other.biases, strict=True):
            wc.copy_(wm.reshape(wc.shape))
            bc.copy_(bm)
    assert torch.allclose(cnn(X.reshape(5, 4, 1, 1)), other(X), rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# (a) The empirical NTK of the CNN through the generic path, against per-sample Jacobians


def jacobian_reference(net: torch.nn.Module, X: torch.Tensor, X2: torch.Tensor | None) -> torch.Tensor:
    """Theta (N1, N2, k, k) = J1 J2^T from torch.func per-sample Jacobians."""
    params = {name: p.detach() for name, p in net.named_parameters()}

    def f(p, x):
        return functional_call(net, p, (x[None],)).reshape(-1)

    def jac(Z):
        J = vmap(jacrev(f), (None, 0))(params, Z)
        return torch.cat([J[name].flatten(2) for name in params], 2)  # (N, k, P)

    J1 = jac(X)
    J2 = J1 if X2 is None else jac(X2)
    return torch.einsum("iap,jbp->ijab", J1, J2)


@pytest.mark.parametrize(
    ("padding", "readout", "n_out", "parametrization"),
    [("same", "flatten", 1, "ntk"), ("valid", "gap", 3, "ntk"), ("circular", "flatten", 3, "standard"),
     ("same", "gap", 1, "standard")],
)  # fmt: skip
def test_empirical_ntk_matches_per_sample_jacobians(padding, readout, n_out, parametrization):
    """Float64: both are sums of the same products df/dp df/dp' in another order (rounding,
    ~1e-15); 1e-10 still catches any missing parameter's share (far above 1e-10 here)."""
    net = CNN(2, [3, 4], 3, padding=padding, readout=readout, n_out=n_out, nonlinearity="tanh",
              parametrization=parametrization, seed=1, image_size=5, dtype=F64)  # fmt: skip
    X, X2 = images(4, 2, 5, 8), images(3, 2, 5, 9)
    for x2 in (None, X2):
        got = empirical_ntk(net, X, x2)
        ref = jacobian_reference(net, X, x2)
        ref = ref[..., 0, 0] if n_out == 1 else ref
        assert rel_err(got, ref) < 1e-10


# ---------------------------------------------------------------------------------------------
# (b) Monte Carlo: the mean over finite-width networks against the limit

# (padding, readout, depth, nonlinearity, in channels, image side): every padding and readout,
# depths 2-4, ReLU and tanh (quadrature)
MC_CONFIGS = [
    ("same", "flatten", 3, "relu", 2, 4),
    ("same", "gap", 4, "relu", 1, 3),
    ("valid", "flatten", 3, "relu", 1, 5),
    ("valid", "gap", 2, "tanh", 2, 4),
    ("circular", "flatten", 2, "tanh", 1, 4),
    ("circular", "gap", 3, "relu", 1, 4),
]
MC_WIDTH, MC_SEEDS = 256, 30
# |mean - limit| < MC_Z standard errors + the finite-width bias allowance MC_BIAS |limit| / width.
# Over the 6 distinct entries of the two 3 x 3 kernels of 6 configurations (72 statistics) a false
# alarm beyond 4.5 SE has probability < 72 * 7e-6 (Bonferroni, Gaussian means of 30 samples; the
# t-distribution's heavier tail with 29 degrees of freedom keeps it below 72 * 2e-4 = 1.4%).
# The mean of the finite-width kernels is biased by O(1/width) (Dyer & Gur-Ari 2020). Measured for
# these configurations with 400 networks each at widths 32 and 64 (`benchmarks/bench_cnn.py
# --bias`): width * max|mean - limit| / max|limit| <= 1.27, noise included (beyond 2 SE: <= 0.38).
# The allowance takes twice the bound, MC_BIAS max|limit| / width: 1% of the kernel's scale at 256.
MC_Z = 4.5
MC_BIAS_MEASURED = 1.3
MC_BIAS = 2 * MC_BIAS_MEASURED


@pytest.mark.parametrize(("padding", "readout", "depth", "nonlinearity", "c0", "side"), MC_CONFIGS)
def test_mean_of_wide_cnns_matches_the_limit(padding, readout, depth, nonlinearity, c0, side):
    X = images(3, c0, side, 10)
    thetas, sigmas = [], []
    for seed in range(MC_SEEDS):
        net = CNN(c0, MC_WIDTH, depth, padding=padding, readout=readout, nonlinearity=nonlinearity,
                  seed=seed, image_size=side, dtype=F64)  # fmt: skip
        thetas.append(empirical_ntk(net, X))
        f = net.nngp_features(X)  # the last layer's kernel: the finite-width estimate of Sigma(L)
        sigmas.append(f @ f.T + 0.01)
    sigma, theta = cnn_kernels(X, depth=depth, nonlinearity=nonlinearity, padding=padding, readout=readout)
    for samples, limit in ((torch.stack(thetas), theta), (torch.stack(sigmas), sigma)):
        se = samples.std(0) / math.sqrt(MC_SEEDS)
        allowed = MC_Z * se + MC_BIAS * limit.abs().max() / MC_WIDTH
        assert ((samples.mean(0) - limit).abs() <= allowed).all()
    # power: the same statistic rejects the kernel of the other readout (of depth - 1 where the
    # last image is one pixel, so that both readouts agree)
    other = {"flatten": "gap", "gap": "flatten"}[readout]
    one_pixel = padding == "valid" and side - (depth - 1) * 2 == 1
    wrong = cnn_kernels(X, depth=depth - one_pixel, nonlinearity=nonlinearity, padding=padding,
                        readout=readout if one_pixel else other)[1]  # fmt: skip
    se = torch.stack(thetas).std(0) / math.sqrt(MC_SEEDS)
    allowed = MC_Z * se + MC_BIAS * theta.abs().max() / MC_WIDTH
    assert ((torch.stack(thetas).mean(0) - wrong).abs() > allowed).any()


def test_standard_parametrization_mean_matches_its_limit():
    """Standard parametrization at width 128: Theta grows with the channels; the mean of 30 nets
    against cnn_kernels(parametrization="standard", widths=...), as above (relative bias 1/width)."""
    X = images(3, 1, 4, 12)
    width = 128
    thetas = torch.stack([
        empirical_ntk(CNN(1, width, 3, parametrization="standard", seed=s, image_size=4, dtype=F64), X)
        for s in range(MC_SEEDS)
    ])  # fmt: skip
    _, theta = cnn_kernels(X, depth=3, parametrization="standard", widths=width)
    _, theta_ntk = cnn_kernels(X, depth=3)
    assert (theta > 50 * theta_ntk).all()
    se = thetas.std(0) / math.sqrt(MC_SEEDS)
    assert ((thetas.mean(0) - theta).abs() <= MC_Z * se + MC_BIAS * theta.abs().max() / width).all()


# ---------------------------------------------------------------------------------------------
# (c) closed forms against quadrature


@pytest.mark.parametrize("readout", READOUTS)
def test_closed_forms_match_quadrature(readout):
    """erf: quadrature of order 64 is accurate to ~1e-8 for a smooth sigma at these variances
    (docs/science.md §3), so 1e-8. ReLU: its kink makes Gauss-Hermite converge only like 1/order
    (measured on these inputs: 1.8%, 0.83%, 0.38%, 0.19% relative at orders 16, 32, 64, 128), so
    the test asks for that convergence towards the closed form: the error halves (< 0.6x) from
    order 32 to 64 and is below 1% at 64 (0.38% measured, 0.25/order)."""
    X, X2 = images(3, 2, 4, 13) / 2, images(2, 2, 4, 14) / 2
    kw = {"depth": 3, "readout": readout, "padding": "same"}
    closed = cnn_kernels(X, X2, nonlinearity="erf", **kw)
    quad = cnn_kernels(X, X2, nonlinearity="erf", closed_form=False, **kw)
    for c, q in zip(closed, quad, strict=True):
        assert not torch.equal(c, q) and torch.allclose(c, q, rtol=0, atol=1e-8)
    closed = cnn_kernels(X, X2, nonlinearity="relu", **kw)
    q32 = cnn_kernels(X, X2, nonlinearity="relu", closed_form=False, quadrature_order=32, **kw)
    q64 = cnn_kernels(X, X2, nonlinearity="relu", closed_form=False, quadrature_order=64, **kw)
    for c, a, b in zip(closed, q32, q64, strict=True):
        assert rel_err(b, c) < 0.6 * rel_err(a, c) and rel_err(b, c) < 1e-2


# ---------------------------------------------------------------------------------------------
# (e) duplicates, symmetry, PSD, blocking


@pytest.mark.parametrize("readout", READOUTS)
def test_duplicate_input_symmetric_psd_and_blocks(readout):
    X = images(7, 1, 5, 15)
    X = torch.cat([X, X[2:3]])  # a duplicate of input 2 at index 7
    calls = []
    sigma, theta = cnn_kernels(X, depth=3, readout=readout, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    for K in (sigma, theta):
        assert torch.equal(K, K.T)
        assert torch.linalg.eigvalsh(K).min() > -1e-12 * K.abs().max()
        # the duplicate: the diagonal's exact value against the general path (arccos near 1)
        assert K[7, 7] == K[2, 2]
        assert torch.allclose(K[2, 7], K[2, 2], rtol=1e-7, atol=0)
    cross = cnn_kernels(X, X.clone(), depth=3, readout=readout)
    for K, C in zip((sigma, theta), cross, strict=True):
        assert torch.allclose(C, K, rtol=1e-7, atol=0)
        assert torch.allclose(C.diagonal(), K.diagonal(), rtol=1e-7, atol=0)
    one = cnn_kernels(X[2:3], depth=3, readout=readout)  # the exact diagonal alone
    assert torch.allclose(one[1][0, 0], theta[2, 2], rtol=1e-14, atol=0)
    narrow = cnn_kernels(X, X[:5], depth=3, readout=readout, out_dtype=torch.float32)
    assert narrow[1].dtype == torch.float32
    assert torch.allclose(narrow[1].double(), cross[1][:, :5], rtol=1e-6, atol=0)
    # row ranges that cut the tiles anywhere: the whole Gram's numbers bit for bit (ntkrun.kernels.tiles)
    small = 2**14  # tiles of 1-6 pairs, so the ranges cut them
    for X2 in (None, X[:5]):
        ref = cnn_kernels(X, X2, depth=3, readout=readout, memory_budget=small)
        outs = [torch.full(K.shape, math.nan, dtype=torch.float64) for K in ref]
        for rows in ((0, 3), (3, 4), (4, 7), (7, X.shape[0])):
            cnn_kernels(X, X2, depth=3, readout=readout, outs=outs, rows=rows, memory_budget=small)
        for out, K in zip(outs, ref, strict=True):
            if X2 is None:
                mirror_(out, to_lower=True)
            assert torch.equal(out, K)


def test_relu_diagonal_of_a_constant_circular_image_is_the_mlp_diagonal():
    """A constant image with circular padding has the same covariance at every pixel: the
    diagonal is the MLP's on the channel vector, Sigma(l+1) = Sigma(l)/2 + beta^2 for ReLU, exactly
    (a few ulps per layer)."""
    X = torch.full((1, 1, 4, 4), 0.7, dtype=F64)
    sigma, theta = cnn_kernels(X, depth=4, padding="circular")
    s = torch.tensor(0.49 + 0.01, dtype=F64)
    t = s.clone()
    for _ in range(3):
        s = s / 2 + 0.01
        t = t / 2 + s
    assert torch.allclose(sigma[0, 0], s, rtol=1e-14) and torch.allclose(theta[0, 0], t, rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# (f) bad inputs and the cost model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": torch.zeros(3, 4)}, r"X must have shape \(N, C, H, W\), got \(3, 4\)"),
        ({"X": torch.zeros(2, 1, 4, 4), "X2": torch.zeros(2, 2, 4, 4)}, "X2 has images of shape"),
        ({"X": torch.zeros(2, 1, 4, 4), "padding": "valid", "depth": 3},
         "kernel_size 3 with padding 'valid' shrinks the 4x4 image below one pixel"),
        ({"X": torch.zeros(2, 1, 4, 4), "padding": "reflect"}, "padding must be one of same, valid"),
        ({"X": torch.zeros(2, 1, 4, 4), "readout": "max"}, "readout must be one of flatten, gap, got 'max'"),
        ({"X": torch.zeros(2, 1, 4, 4), "kernel_size": 2}, "kernel_size must be odd with padding 'same'"),
        ({"X": torch.zeros(2, 1, 4, 4), "parametrization": "mup"}, "parametrization must be one of"),
        ({"X": torch.zeros(2, 1, 4, 4), "parametrization": "standard"}, "widths"),
        ({"X": torch.zeros(0, 1, 4, 4)}, "N = 0"),
        ({"X": torch.full((1, 1, 2, 2), float("nan"))}, "NaN or inf"),
    ],
)  # fmt: skip
def test_bad_kernel_inputs_raise_one_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        cnn_kernels(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_network_inputs_raise_one_clear_value_error():
    net = CNN(2, 3, 3, image_size=(4, 5))
    cases = [
        (lambda: net(torch.zeros(2, 2, 4)), r"inputs must have shape \(N, 2, H, W\), got \(2, 2, 4\)"),
        (lambda: net(torch.zeros(2, 1, 4, 5)), r"inputs must have shape \(N, 2, H, W\)"),
        (lambda: net(torch.zeros(2, 2, 5, 5)), r"inputs must have shape \(N, 2, 4, 5\), got \(2, 2, 5, 5\)"),
        (lambda: CNN(1, 3, 3, padding="valid", image_size=4),
         "kernel_size 3 with padding 'valid' shrinks the 4x4 image below one pixel: 2 conv layers"),
        (lambda: CNN(1, 3, 2, padding="zeros", image_size=4), "padding must be one of"),
        (lambda: CNN(1, 3, 2, readout="mean", image_size=4), "readout must be one of"),
        (lambda: CNN(1, 3, 2, parametrization="meanfield", image_size=4), "parametrization must be one of"),
        (lambda: CNN(1, 3, 2, kernel_size=4, padding="circular", image_size=4), "kernel_size must be odd"),
        (lambda: CNN(1, 3, 2), "image_size: the 'flatten' readout needs"),
        (lambda: CNN(1, 3, 2, readout="gap", padding="valid")(torch.zeros(1, 1, 2, 2)), "shrinks the 2x2"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_cost_model_matches_torch_flop_counter():
    """forward_flops sums to torch's FlopCounterMode count of a forward pass (convolutions and the
    dense layer: the counted ops), and n_params is the number of trainable numbers."""
    from torch.utils.flop_counter import FlopCounterMode

    for readout, padding in (("flatten", "same"), ("gap", "valid"), ("flatten", "circular")):
        net = CNN(3, [8, 5], 3, padding=padding, readout=readout, n_out=2, image_size=(7, 6))
        X = torch.zeros(1, 3, 7, 6)
        with FlopCounterMode(display=False) as counter:
            net(X)
        flops = net.forward_flops()
        assert len(flops) == 3
        h, w = net.layer_sizes()[-1]
        gap_adds = 5 * h * w if readout == "gap" else 0  # the average: additions, not counted by torch
        assert counter.get_total_flops() == sum(flops) - gap_adds
        assert net.n_params == sum(p.numel() for p in net.parameters() if p.requires_grad)
        assert net.n_params == 8 * 3 * 9 + 8 + 5 * 8 * 9 + 5 + 2 * net.fan_ins[-1] + 2


@pytest.mark.parametrize(("n_out", "trace"), [(1, False), (3, False), (3, True)])
def test_fast_empirical_path_equals_the_generic_path_blocked(n_out, trace):
    """The CNN's gradient-feature path against the generic torch.func path on the same network,
    in blocks of 2 inputs (symmetric and cross Grams): equal up to float64 rounding."""
    from ntkrun.kernels.generic import generic_ntk

    net = CNN(1, 4, 3, readout="flatten", n_out=n_out, seed=3, image_size=4, dtype=F64)
    X, X2 = images(5, 1, 4, 21), images(3, 1, 4, 22)
    calls = []
    for x2 in (None, X2):
        fast = empirical_ntk(net, X, x2, trace_outputs=trace, block_size=2,
                             progress=lambda d, t: calls.append((d, t)))  # fmt: skip
        ref = generic_ntk(net, X, x2, trace_outputs=trace)
        assert fast.shape == ref.shape
        assert rel_err(fast, ref) < 1e-12
    assert calls[-1][0] == calls[-1][1]  # progress reaches its total


def test_library_face_for_cnns():
    """`ntkrun.CNN` and `ntkrun.analytic_kernels(arch="cnn")` are the CNN's, and refuse bad input
    in one line."""
    import ntkrun

    assert ntkrun.CNN is CNN
    X = images(3, 2, 5, 23)
    sigma, theta = ntkrun.analytic_kernels(X, depth=3, arch="cnn", padding="valid", readout="gap")
    ref = cnn_kernels(X, depth=3, padding="valid", readout="gap")
    assert torch.equal(sigma, ref[0]) and torch.equal(theta, ref[1])
    with pytest.raises(ValueError, match="arch must be one of mlp, cnn"):
        ntkrun.analytic_kernels(X, arch="resnet")
    with pytest.raises(ValueError, match=r"X must have shape \(N, C, H, W\)"):
        ntkrun.analytic_kernels(X.flatten(1), arch="cnn")
    with pytest.raises(ValueError, match="all_layers"):
        ntkrun.analytic_kernels(X, arch="cnn", all_layers=True)
    net = ntkrun.CNN(2, 4, 2, image_size=(5, 5), dtype=F64)
    with pytest.raises(ValueError, match=r"X must have shape \(N, 2, 5, 5\)"):
        ntkrun.empirical_ntk(net, images(2, 2, 4, 1))
    with pytest.raises(ValueError, match="per_layer"):
        ntkrun.empirical_ntk(net, X, per_layer=True)


def test_empirical_ntk_of_a_cnn_holds_no_autograd_graph():
    net = CNN(1, 4, 3, image_size=4)
    theta = empirical_ntk(net, images(3, 1, 4, 5).float())
    assert not theta.requires_grad and theta.grad_fn is None


LEAK = """
import torch
from ntkrun.kernels.cnn import cnn_kernels

def status(field):  # kB -> bytes, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

X = torch.rand(24, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
cnn_kernels(X[:2], depth=3, readout="gap")  # warm-up: the allocator, the masks
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the kernel's high-water mark of the resident set
base = status("VmRSS")
cnn_kernels(X, depth=3, readout="gap")
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM)")
def test_the_gap_gram_holds_a_bounded_set_of_tile_buffers():
    """The 300 tiles of a 24-image GAP Gram (one image pair each, 16x16: 65536 pixel pairs) reuse
    at most LIVE_COPIES buffers of a shape: the peak the Gram adds stays within twice that bound
    (12.6 MB; measured 6.5 MB), where an unbounded buffer pool kept every tile's maps (73 MB for
    16 images, growing with the tiles, 24 GB on a 50-image Fashion-MNIST Gram)."""
    from ntkrun.kernels.cnn import LIVE_COPIES, TILE_NUMBERS

    out = subprocess.run([sys.executable, "-c", LEAK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    bound = LIVE_COPIES * 8 * max(TILE_NUMBERS, 256**2)
    assert int(out.stdout.split()[-1]) < 2 * bound
