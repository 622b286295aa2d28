"""Empirical NTK of a composition's network (ntkrun.layers, `Layer.net`) by its weight layers'
structure, no per-sample Jacobian of the whole network formed (docs/science.md §12.5).

Each weight layer l maps its input x_l linearly by its weights: z_l = c_l W_l x_l + b_l b. With
delta_l = df/dz_l (one backward pass per output for a block of inputs: inputs are independent),

    Theta(x, x') = sum_l c_l^2 <dz_l/dW_l ...> = sum_l [c_l^2 x_l(x).x_l(x') + b_l^2] delta_l(x).delta_l(x')

for a Dense layer on vectors (a product of two Grams, as the MLP's fast path), and the inner product
of the layer's per-sample weight gradients g_l(x) = c_l sum_p delta_l(x)_p x_l(x)_p^T (the sum over
positions p; a convolution's x_p its patch) plus b_l^2 (sum_p delta_l(x)_p).(sum_p delta_l(x')_p)
for layers over positions. A network holding another parameter (attention's) takes the generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ntkrun.kernels.generic import DEFAULT_MEMORY_BUDGET
from ntkrun.linalg import empty_checked

Progress = Callable[[int, int], None]
Feature = tuple[torch.Tensor | None, torch.Tensor, float]  # (x, delta (k, N, n)) or (None, g (k, N, m)), b^2


def structured(net: nn.Module) -> bool:
    """Whether every trainable parameter of net belongs to a Dense or Conv module of ntkrun.layers."""
    from ntkrun.layers.dense import DenseModule
    from ntkrun.layers.spatial import ConvModule

    owned = {id(p) for m in net.modules() if isinstance(m, DenseModule | ConvModule) for p in m.parameters()}
    return all(id(p) in owned for p in net.parameters() if p.requires_grad)


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input patches: (N, C, H, W) -> (N, C k^2, P)."""
    r = m.k // 2
    if m.padding == "circular":
        x, pad = nn.functional.pad(x, [r, r, r, r], mode="circular"), 0
    else:
        pad = r if m.padding == "same" else 0
    return nn.functional.unfold(x, m.k, padding=pad)


def features(net: nn.Module, X: torch.Tensor, k: int) -> list[Feature]:
    """Each weight layer's Feature on a block of inputs X (one backward pass per output a < k)."""
    from ntkrun.layers.dense import DenseModule
    from ntkrun.layers.spatial import ConvModule

    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: seen.append((m, args[0].detach(), out)))
        for m in net.modules()
        if isinstance(m, DenseModule | ConvModule)
    ]
    try:
        with torch.enable_grad():
            f = net(X)
            f = f[:, None] if f.dim() == 1 else f
            outs = [z for _, _, z in seen]
            deltas = [torch.autograd.grad(f[:, a].sum(), outs, retain_graph=a < k - 1) for a in range(k)]
    finally:
        for hook in hooks:
            hook.remove()
    found: list[Feature] = []
    for i, (m, x, _) in enumerate(seen):
        d = torch.stack([deltas[a][i] for a in range(k)])  # (k, N, ...) as z
        # each parameter's gradient weighted by the square root of its learning-rate factor (muP)
        rw, rb = math.sqrt(m.lr_w), math.sqrt(m.lr_b)
        b2 = (m.b_std * rb) ** 2 if m.bias is not None else 0.0
        if isinstance(m, DenseModule) and x.dim() == 2:
            found.append((x * (m.w_scale * rw), d, b2))
            continue
        if isinstance(m, ConvModule):
            xs, ds, c = _patches(m, x), d.flatten(3), m.scale  # (N, C k^2, P), (k, N, C', P)
        elif x.dim() == 4:  # Dense on images' channels
            xs, ds, c = x.flatten(2), d.flatten(3), m.w_scale
        else:  # Dense on sequences (N, T, n)
            xs, ds, c = x.transpose(1, 2), d.transpose(2, 3), m.w_scale
        g = torch.einsum("kndp,ncp->kndc", ds, xs).flatten(2) * (c * rw)
        if b2:
            g = torch.cat([g, ds.sum(-1) * (m.b_std * rb)], dim=2)
        found.append((None, g, 0.0))
    return found


def _pair(fa: Feature, fb: Feature, trace: bool) -> torch.Tensor:
    """One layer's Theta on a block pair: (Na, Nb, k, k), or (Na, Nb) (the mean of a = b) if trace."""
    (xa, da, b2), (xb, db, _) = fa, fb
    k, na, nb = da.shape[0], da.shape[1], db.shape[1]
    if trace:
        dd = torch.einsum("kim,kjm->ij", da, db) / k
    else:
        dd = (da.reshape(k * na, -1) @ db.reshape(k * nb, -1).T).view(k, na, k, nb).permute(1, 3, 0, 2)
    if xa is None:
        return dd
    xx = xa @ xb.T + b2
    return xx * dd if trace else xx[..., None, None] * dd


def layers_empirical_ntk(
    net: nn.Module,
    X: torch.Tensor,
    X2: torch.Tensor | None = None,
    *,
    trace_outputs: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Theta of a composition's network (structured(net)): X (N1, ...), X2 (N2, ...) or None (= X)
    -> (N1, N2) for one output or trace_outputs, else (N1, N2, k, k); as generic_ntk, in the dtype
    of the network's parameters. Features of at most two row blocks are held (sized from
    memory_budget by those of one input)."""
    p = next(net.parameters())
    X = torch.as_tensor(X).to(device=p.device, dtype=p.dtype)
    symmetric = X2 is None
    X2 = X if symmetric else torch.as_tensor(X2).to(device=p.device, dtype=p.dtype)
    k = getattr(net, "n_out", 1)
    trace = trace_outputs or k == 1
    per_input = sum(f[1].numel() + (0 if f[0] is None else f[0].numel()) for f in features(net, X[:1], k))
    bs = max(1, memory_budget // (2 * per_input * X.element_size()))
    rows = list(torch.split(X, bs))
    cols = rows if symmetric else list(torch.split(X2, bs))
    shape = (X.shape[0], X2.shape[0]) if trace else (X.shape[0], X2.shape[0], k, k)
    (out,) = empty_checked([shape], X.dtype, X.device, "empirical_ntk")
    total = len(rows) * (len(rows) + 1) // 2 if symmetric else len(rows) * len(cols)
    done = 0
    for i, block in enumerate(rows):
        fi = features(net, block, k)
        for j in range(i if symmetric else 0, len(cols)):
            fj = fi if symmetric and j == i else features(net, cols[j], k)
            theta = sum(_pair(a, b, trace) for a, b in zip(fi, fj, strict=True))
            r = slice(i * bs, i * bs + block.shape[0])
            c = slice(j * bs, j * bs + cols[j].shape[0])
            out[r, c] = theta
            if symmetric and j != i:
                out[c, r] = theta.transpose(0, 1) if trace else theta.permute(1, 0, 3, 2)
            done += 1
            if progress is not None:
                progress(done, total)
    return out
