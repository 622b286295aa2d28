"""Empirical NTK of any torch.nn.Module: the generic path (torch.func).

    Theta_ab(x, x') = sum_p df_a(x)/dp . df_b(x')/dp   over every trainable parameter p

Two methods of Novak, Sohl-Dickstein & Schoenholz 2022, "Fast finite width neural tangent
kernel" (neural-tangents' JACOBIAN_CONTRACTION and NTK_VECTOR_PRODUCTS):

- "jacobian": per-sample Jacobians J (n, k, P) of two input blocks, contracted by one GEMM per
  parameter tensor: Theta = sum_p einsum('iap,jbp->ijab').
- "ntvp": NTK-vector products. For a group of column inputs, J2^T e_jb (one vjp per basis
  cotangent e_jb, batched by vmap) gives P-sized tangents; one jvp per tangent through the model
  on a row block then yields Theta(X1, x_j)_{:, :, b} = J1 J2^T e_jb without forming J1.

The model is evaluated per sample (vmap over x[None]), so its layers must be batch independent:
BatchNorm and Dropout in train mode are refused with a ValueError (call model.eval() first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import functional_call, jacrev, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode  # private, but stable since torch 2.0
from torch.utils.flop_counter import FlopCounterMode

from ntkrun.linalg import empty_checked

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of Jacobians / features held at once (both paths)

Progress = Callable[[int, int], None]
Params = dict[str, torch.Tensor]
PerSample = Callable[[Params, torch.Tensor], torch.Tensor]  # (params, x (...)) -> (k,)
METHODS = ("auto", "jacobian", "ntvp")
JVP_COPIES = 3  # numbers per activation and tangent in a jvp: primal, tangent, temporaries
# tangent-batched jvps run ~2x slower per FLOP than the contraction's GEMMs (CPU, torch 2.13, dense
JVP_SLOWDOWN = 2.0  # k = 10: ntvp/jacobian measured 0.22, 0.11 predicted with S = 1; convs: worse)


class _Shape(NamedTuple):  # what the two methods need besides the inputs
    symmetric: bool  # X2 is X: compute half, mirror
    trace: bool  # out is (N1, N2) = mean_a Theta_aa (also for a scalar-output model)
    k: int  # outputs per input
    n_params: int  # P, trainable numbers
    budget: int  # memory_budget, bytes
    numel: float  # numbers written by one forward pass per input (the probe's count)


class _CountNumel(TorchDispatchMode):
    """Counts the numbers written by every aten op: an upper bound on activation memory."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(
        self, func: Callable, types: object, args: tuple = (), kw: dict | None = None
    ) -> object:
        out = func(*args, **(kw or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        self.numel += sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))
        return out


def choose_method(
    n1: int, n2: int, k: int, n_params: int, memory_budget: int, itemsize: int, *,
    forward_flops: float | None = None, numel: float = 0.0, trace_outputs: bool = False,
    symmetric: bool = False,
) -> str:  # fmt: skip
    """The cheaper method_costs; "ntvp" if 2 k P numbers (jacobian, 1-input blocks) exceed the budget."""
    if 2 * k * n_params * itemsize > memory_budget:
        return "ntvp"
    costs = method_costs(n1, n2, k, n_params, memory_budget, itemsize, forward_flops=forward_flops,
                         numel=numel, trace_outputs=trace_outputs, symmetric=symmetric)  # fmt: skip
    return "ntvp" if costs["ntvp"] < costs["jacobian"] else "jacobian"


def method_costs(
    n1: int, n2: int, k: int, n_params: int, memory_budget: int, itemsize: int, *,
    forward_flops: float | None = None, numel: float = 0.0, trace_outputs: bool = False,
    symmetric: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Predicted cost of both methods in FLOPs, {"jacobian": ..., "ntvp": ...}.

    F = forward FLOPs per input (default 2P: each weight used once, as in a dense net; conv nets
    reuse weights, F >> P). A vjp costs ~2F, so one input's k Jacobian rows cost (1 + 2k) F; a jvp
    costs F for the primal plus 2F per tangent, weighted by S = JVP_SLOWDOWN. With r row blocks
    of jacobian_block (column Jacobians recomputed per row block), G column groups of ntvp_blocks
    (row primals recomputed per group), m = n1 n2 pairs and c = k (1 for the trace):

        jacobian = (n1 + r n2) (1 + 2k) F + 2 m k c P
        ntvp     = n2 (1 + 2k) F + G n1 F + 2 S m k F

    Symmetric: n1 (r + 1) / 2 Jacobians, m = n1^2 (r + 1) / 2r; ntvp m = n1^2 (G + 1) / 2G.
    So ntvp wins for many outputs of a dense net (2SkF = 8kP < 2k^2 P for k > 4) or when the
    jacobian blocks are small (recomputation); it loses for k = 1, for trace_outputs and for
    weight-sharing nets. `numel`: numbers per input written by a forward (sizes ntvp row blocks).
    """
    P, F, S = n_params, float(forward_flops) if forward_flops else 2.0 * n_params, JVP_SLOWDOWN
    c = 1 if trace_outputs else k
    r = math.ceil(n1 / jacobian_block(n1, 0 if symmetric else n2, k, P, memory_budget, itemsize))
    G = math.ceil(n2 / ntvp_blocks(n1, n2, k, P, memory_budget, itemsize, numel)[1])
    if symmetric:
        jacobian = n1 * (r + 1) / 2 * (1 + 2 * k) * F + n1**2 * (r + 1) / r * k * c * P
        ntvp = n1 * (1 + 2 * k) * F + n1 * (G + 1) / 2 * F + S * n1**2 * (G + 1) / G * k * F
    else:
        jacobian = (n1 + r * n2) * (1 + 2 * k) * F + 2 * n1 * n2 * k * c * P
        ntvp = n2 * (1 + 2 * k) * F + G * n1 * F + 2 * S * n1 * n2 * k * F
    return {"jacobian": jacobian, "ntvp": ntvp}


def ntvp_blocks(
    n1: int, n2: int, k: int, n_params: int, memory_budget: int, itemsize: int, numel: float = 0.0
) -> tuple[int, int]:
    """(b, g) of the ntvp method: row blocks of b inputs, column groups of g inputs.

    A (group, row block) holds g k tangents of P numbers and g k b JVP_COPIES numel numbers of
    activation tangents; b = n1 unless one group input's tangents over all rows exceed half the
    budget, then g as large as the budget allows (>= 1)."""
    per_row = k * JVP_COPIES * max(numel, 1.0) * itemsize
    b = n1 if n1 * per_row <= memory_budget / 2 else max(1, int(memory_budget / 2 // per_row))
    g = min(n2, max(1, int(memory_budget // (k * n_params * itemsize + b * per_row))))
    return b, g


def jacobian_block(n1: int, n2: int, k: int, n_params: int, memory_budget: int, itemsize: int) -> int:
    """Inputs per block of the jacobian method: all (max(n1, n2)) when the Jacobians of both input
    sets fit in `memory_budget` bytes (n2 = 0 when symmetric), else budget // (2 k P itemsize) >= 1.
    Transient activations of the backward passes (block k A numbers) are not counted."""
    per_input = k * n_params * itemsize
    if (n1 + n2) * per_input <= memory_budget:
        return max(n1, n2)
    return max(1, memory_budget // (2 * per_input))


def _check_model(model: torch.nn.Module) -> Params:
    for name, m in model.named_modules():
        what = type(m).__name__
        if m.training and isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"model: {what} '{name}' is in train mode; BatchNorm in train mode mixes the samples "
                "of a batch and is not supported by the per-sample NTK: call model.eval()"
            )
        if m.training and isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(f"model: {what} '{name}' is in train mode (random); call model.eval()")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return params


def _prepare(X: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    X = torch.as_tensor(X).to(device=like.device, dtype=like.dtype)
    if X.dim() < 1 or X.shape[0] < 1:
        raise ValueError(f"{name} must have a leading batch dimension N >= 1; got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


def _probe(model: torch.nn.Module, params: Params, X: torch.Tensor) -> tuple[int, bool, float, float]:
    """Forward on min(N, 2) inputs -> (k, scalar output?, FLOPs per sample, numbers per sample)."""
    m = min(X.shape[0], 2)
    with torch.no_grad(), FlopCounterMode(display=False) as flops, _CountNumel() as numel:
        y = functional_call(model, params, (X[:m],))
    if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2) or y.shape[0] != m:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"model output must have shape (N,) or (N, k); got {shape} for N = {m}")
    k = 1 if y.dim() == 1 else y.shape[1]
    return k, y.dim() == 1, flops.get_total_flops() / m, numel.numel / m


def generic_ntk(
    model: torch.nn.Module,
    X: torch.Tensor,
    X2: torch.Tensor | None = None,
    *,
    trace_outputs: bool = False,
    method: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Empirical NTK of `model` over its trainable parameters.

    (N1, ...), (N2, ...) or None (= X, symmetric: half the block pairs, mirrored) ->
    (N1, N2) for a model with output (N,); (N1, N2, k, k) for output (N, k), k = 1 included;
    (N1, N2) = mean_a Theta_aa with trace_outputs=True. Computed in the dtype and on the device of
    the model's first trainable parameter (X is converted). `method` is "jacobian", "ntvp" or
    "auto" (choose_method, with the forward FLOPs counted on one input). At most about
    `memory_budget` bytes of Jacobians/tangents are held; `progress(done, total)` is called after
    each block pair.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes; got {memory_budget}")
    params = _check_model(model)
    like = next(iter(params.values()))
    X = _prepare(X, "X", like)
    symmetric = X2 is None
    X2 = X if symmetric else _prepare(X2, "X2", like)
    if X2.shape[1:] != X.shape[1:]:
        raise ValueError(f"X2 has trailing shape {tuple(X2.shape[1:])} but X has {tuple(X.shape[1:])}")
    k, scalar, flops, numel = _probe(model, params, X)
    trace = trace_outputs or scalar
    n1, n2, P = X.shape[0], X2.shape[0], sum(p.numel() for p in params.values())
    itemsize = like.element_size()
    if method == "auto":
        method = choose_method(n1, n2, k, P, memory_budget, itemsize, forward_flops=flops or None,
                               numel=numel, trace_outputs=trace, symmetric=symmetric)  # fmt: skip

    def f(p: Params, x: torch.Tensor) -> torch.Tensor:  # one input (...) -> (k,) outputs
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(k)

    (out,) = empty_checked([(n1, n2) if trace else (n1, n2, k, k)], X.dtype, X.device, "empirical_ntk")
    run = _jacobian if method == "jacobian" else _ntvp
    run(f, params, X, X2, out, _Shape(symmetric, trace, k, P, memory_budget, numel), progress)
    return out


def _jacobians(f: PerSample, params: Params, X: torch.Tensor) -> list[torch.Tensor]:
    """(n, ...) -> [J (n, k, p)] per parameter tensor."""
    J = vmap(jacrev(f), (None, 0))(params, X)
    return [J[name].flatten(2) for name in params]


def _contract(J1: list[torch.Tensor], J2: list[torch.Tensor], trace: bool) -> torch.Tensor:
    """Sum over parameter tensors: -> (n1, n2) = mean_a Theta_aa if trace, else (n1, n2, k, k)."""
    n1, k, n2 = J1[0].shape[0], J1[0].shape[1], J2[0].shape[0]
    if trace:
        acc = J1[0].new_zeros(k, n1, n2)
        for a, b in zip(J1, J2, strict=True):
            acc.baddbmm_(a.transpose(0, 1), b.permute(1, 2, 0))
        return acc.mean(0)
    acc = J1[0].new_zeros(n1 * k, n2 * k)
    for a, b in zip(J1, J2, strict=True):
        acc.addmm_(a.reshape(n1 * k, -1), b.reshape(n2 * k, -1).t())
    return acc.reshape(n1, k, n2, k).permute(0, 2, 1, 3)


def _mirror(block: torch.Tensor) -> torch.Tensor:
    """Theta(X2, X1)_ab = Theta(X1, X2)_ba: swap the input axes and the output axes."""
    return block.transpose(0, 1) if block.dim() == 2 else block.permute(1, 0, 3, 2)


def _jacobian(
    f: PerSample, params: Params, X: torch.Tensor, X2: torch.Tensor, out: torch.Tensor, s: _Shape,
    progress: Progress | None,
) -> None:  # fmt: skip
    """Jacobian contraction on block pairs (upper triangle only when symmetric)."""
    n1, n2, symmetric, trace = X.shape[0], X2.shape[0], s.symmetric, s.trace
    bs = jacobian_block(n1, 0 if symmetric else n2, s.k, s.n_params, s.budget, X.element_size())
    rows = list(torch.split(X, bs))
    cols = rows if symmetric else list(torch.split(X2, bs))
    total, done = (len(rows) * (len(rows) + 1) // 2 if symmetric else len(rows) * len(cols)), 0
    for i, x_i in enumerate(rows):
        J_i = _jacobians(f, params, x_i)
        for j in range(i if symmetric else 0, len(cols)):
            J_j = J_i if symmetric and j == i else _jacobians(f, params, cols[j])
            block = _contract(J_i, J_j, trace)
            r, c = slice(i * bs, i * bs + len(x_i)), slice(j * bs, j * bs + len(cols[j]))
            out[r, c] = block
            if symmetric and j != i:
                out[c, r] = _mirror(block)
            del J_j, block  # before the next block's Jacobians: two blocks live, never three
            done += 1
            if progress is not None:
                progress(done, total)
        del J_i


def _ntvp(
    f: PerSample, params: Params, X: torch.Tensor, X2: torch.Tensor, out: torch.Tensor, s: _Shape,
    progress: Progress | None,
) -> None:  # fmt: skip
    """NTK-vector products: column groups (their tangents J2^T e_jb) times row blocks (jvps)."""
    n1, n2, k, symmetric, trace = X.shape[0], X2.shape[0], s.k, s.symmetric, s.trace
    b, g = ntvp_blocks(n1, n2, k, s.n_params, s.budget, X.element_size(), s.numel)
    groups = [(c, min(c + g, n2)) for c in range(0, n2, g)]
    total, done = sum(math.ceil((e if symmetric else n1) / b) for _, e in groups), 0
    for c0, e in groups:
        tangents = {n: t.flatten(0, 1) for n, t in vmap(jacrev(f), (None, 0))(params, X2[c0:e]).items()}
        for r0 in range(0, e if symmetric else n1, b):
            r1 = min(r0 + b, e if symmetric else n1)

            def rows_f(p: Params, x_rows: torch.Tensor = X[r0:r1]) -> torch.Tensor:
                return vmap(f, (None, 0))(p, x_rows)

            def one(t: Params, rows_f: Callable = rows_f) -> torch.Tensor:
                return jvp(rows_f, (params,), (t,))[1]

            res = vmap(one)(tangents).reshape(e - c0, k, r1 - r0, k)  # [j, b, i, a]
            if trace:
                out[r0:r1, c0:e] = res.diagonal(dim1=1, dim2=3).mean(-1).t()
            else:
                out[r0:r1, c0:e] = res.permute(2, 0, 3, 1)
            done += 1
            if progress is not None:
                progress(done, total)
        if symmetric and c0 > 0:
            out[c0:e, :c0] = _mirror(out[:c0, c0:e])
        del tangents  # before the next group's: one group's tangents live, never two
