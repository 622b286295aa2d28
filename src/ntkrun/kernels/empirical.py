"""Empirical (finite-width) NTK by the layerwise factorization of docs/science.md §2.

    Theta_ab(x, x') = sum_{l=0}^{L-1} [a(l)(x).a(l)(x') / n_l + beta^2] * [delta_a(l+1)(x).delta_b(l+1)(x')]

with delta_a backpropagated from output a (docs/science.md §7.1); the standard parametrization
replaces the first factor by a(l)(x).a(l)(x') + 1; muP (docs/science.md §11) weights each term by
the learning-rate factors of its parameters, so Theta is the kernel of its GD dynamics. One
forward pass and one backward pass of the deltas per input and output; no per-sample parameter
gradient is ever formed. Inputs are processed in row blocks sized from a memory budget. Any other
torch module goes through the generic torch.func path (ntkrun.kernels.generic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ntkrun.architectures.cnn import CNN
from ntkrun.kernels.cnn_empirical import cnn_empirical_ntk
from ntkrun.kernels.generic import DEFAULT_MEMORY_BUDGET, generic_ntk
from ntkrun.kernels.layers_empirical import layers_empirical_ntk, structured
from ntkrun.layers.base import Net
from ntkrun.linalg import empty_checked
from ntkrun.network import MLP

Progress = Callable[[int, int], None]


def _features(net: MLP, X: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(N, n0) -> ([a(l)] (N, n_l), [delta(l+1)] (N, n_{l+1}), or (k, N, n_{l+1}) per output a
    for k > 1 outputs) for l = 0 .. L-1."""
    with torch.no_grad():
        cache = net.forward_cache(X)
        return cache.acts, net.deltas(cache) if net.n_out == 1 else net.output_deltas(cache)


def _delta_gram(da: torch.Tensor, db: torch.Tensor, trace_outputs: bool) -> torch.Tensor:
    """delta_a(x).delta_b(x') for k outputs: (k, Na, n), (k, Nb, n) -> (Na, Nb, k, k), or the
    mean over a of the diagonal a = b, (Na, Nb), with trace_outputs."""
    k, na, n = da.shape
    nb = db.shape[1]
    if trace_outputs:
        return da.permute(1, 0, 2).reshape(na, k * n) @ db.permute(1, 0, 2).reshape(nb, k * n).t() / k
    prod = da.reshape(k * na, n) @ db.reshape(k * nb, n).t()  # rows (a, i), columns (b, j)
    return prod.view(k, na, k, nb).permute(1, 3, 0, 2)


def _block_gram(
    net: MLP,
    fa: tuple[list[torch.Tensor], list[torch.Tensor]],
    fb: tuple[list[torch.Tensor], list[torch.Tensor]],
    per_layer: bool,
    trace_outputs: bool = False,
) -> torch.Tensor:
    """Theta on a block pair: -> (Na, Nb) (one output, or trace_outputs) or (Na, Nb, k, k), with a
    leading layer axis L if per_layer."""
    acts_a, deltas_a = fa
    acts_b, deltas_b = fb
    beta2 = net.beta**2
    k_out = net.n_out
    layers = []
    total = None
    for l in range(net.depth):
        k = acts_a[l] @ acts_b[l].t()
        if net.standard:
            k.add_(1.0)
        elif net.mup:  # each parameter's gradient weighted by its learning-rate factor
            r_w, r_b = net.lr_scales[l]
            k.mul_(r_w / net.fan[l] ** 2).add_(r_b * beta2)
        else:
            k.mul_(1.0 / net.sizes[l]).add_(beta2)
        if k_out > 1 and l < net.depth - 1:
            dd = _delta_gram(deltas_a[l], deltas_b[l], trace_outputs)
            k = k.mul_(dd) if trace_outputs else k[..., None, None] * dd
        elif k_out > 1:  # delta_a(L) = e_a: delta_a.delta_b = 1 if a = b else 0 (trace: 1)
            if not trace_outputs:
                k = k[..., None, None] * torch.eye(k_out, dtype=k.dtype, device=k.device)
        elif l < net.depth - 1:  # delta(L) = 1: the last layer has no delta product
            k.mul_(deltas_a[l] @ deltas_b[l].t())
        if per_layer:
            layers.append(k)
        elif total is None:
            total = k
        else:
            total.add_(k)
    return torch.stack(layers) if per_layer else total


FEATURE_COPIES = 6  # per input and layer width: a, z, delta, and the temporaries of the passes


def feature_bytes(net: MLP, dtype: torch.dtype) -> int:
    """Bytes held per input while its features are live: a and delta of every layer plus what
    the forward and backward passes hold meanwhile (z, sigma'(z)), about FEATURE_COPIES numbers
    per unit of width (measured in tests/robustness/test_resources.py), and the deltas of the
    other k - 1 outputs."""
    numbers = FEATURE_COPIES * sum(net.sizes) + (net.n_out - 1) * sum(net.sizes[1:])
    return numbers * torch.empty((), dtype=dtype).element_size()


def block_size_for(net: MLP, n1: int, n2: int, memory_budget: int, dtype: torch.dtype) -> int:
    """Inputs per block: all of them when the features of both input sets fit in `memory_budget`
    bytes at once (n2 = 0 for the symmetric Gram), else as many as let two blocks fit."""
    per_input = feature_bytes(net, dtype)
    if (n1 + n2) * per_input <= memory_budget:
        return max(n1, n2)
    return max(1, memory_budget // (2 * per_input))


def _prepare(net: MLP, X: torch.Tensor) -> torch.Tensor:
    p = net.weights[0]
    X = torch.as_tensor(X).to(device=p.device, dtype=p.dtype)
    if X.dim() != 2 or X.shape[1] != net.n0:
        raise ValueError(f"inputs must have shape (N, {net.n0}), got {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError("inputs must hold at least one point (N = 0)")
    if not torch.isfinite(X).all():
        raise ValueError("inputs contain NaN or inf")
    return X


def empirical_ntk(
    net: torch.nn.Module,
    X: torch.Tensor,
    X2: torch.Tensor | None = None,
    *,
    trace_outputs: bool = False,
    per_layer: bool = False,
    block_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Empirical NTK Gram matrix: X (N1, n0), X2 (N2, n0) or None (= X) -> (N1, N2) for one
    output, (N1, N2, k, k) for k outputs, or (N1, N2) = mean_a Theta_aa with trace_outputs.

    An `ntkrun.MLP` takes the layerwise fast path, an `ntkrun.CNN` its per-layer gradient
    features (`ntkrun.kernels.cnn_empirical`, X (N, C, H, W)), a composition's network of Dense
    and Conv weights their structure (`ntkrun.kernels.layers_empirical`); any other module mapping
    (N, ...) to (N,) or (N, k) takes the generic torch.func path (`ntkrun.kernels.generic.generic_ntk`,
    which picks Jacobian contraction or NTK-vector products by cost; per_layer and block_size are
    MLP-only).
    With per_layer=True returns a leading axis L: the contribution of the parameters W(l), b(l)
    of each layer l = 0 .. L-1 (they sum to Theta). Features are held for at most two blocks of
    `block_size` inputs (default: chosen from `memory_budget` bytes); a larger N recomputes the
    forward pass of column blocks. `progress(done, total)` is called after each block pair.
    """
    if isinstance(net, CNN):
        if per_layer:
            raise ValueError("per_layer needs an ntkrun.MLP (the layerwise fast path)")
        return cnn_empirical_ntk(
            net, X, X2, trace_outputs=trace_outputs, block_size=block_size, memory_budget=memory_budget,
            progress=progress,
        )  # fmt: skip
    if not isinstance(net, MLP):
        if per_layer or block_size is not None:
            raise ValueError("per_layer and block_size need an ntkrun.MLP (the layerwise fast path)")
        if isinstance(net, Net) and structured(net):
            return layers_empirical_ntk(
                net, X, X2, trace_outputs=trace_outputs, memory_budget=memory_budget, progress=progress
            )
        return generic_ntk(
            net, X, X2, trace_outputs=trace_outputs, memory_budget=memory_budget, progress=progress
        )
    X = _prepare(net, X)
    symmetric = X2 is None
    X2 = X if symmetric else _prepare(net, X2)
    bs = block_size or block_size_for(
        net, X.shape[0], 0 if symmetric else X2.shape[0], memory_budget, X.dtype
    )
    rows = list(torch.split(X, bs))
    cols = rows if symmetric else list(torch.split(X2, bs))
    shape = (X.shape[0], X2.shape[0])
    if net.n_out > 1 and not trace_outputs:
        shape = (*shape, net.n_out, net.n_out)
    (out,) = empty_checked([(net.depth, *shape) if per_layer else shape], X.dtype, X.device, "empirical_ntk")
    pair = slice(-2, None) if len(shape) == 2 else slice(-4, -2)
    total = len(rows) * (len(rows) + 1) // 2 if symmetric else len(rows) * len(cols)
    done = 0
    for i, rows_i in enumerate(rows):
        fi = _features(net, rows_i)
        for j in range(i if symmetric else 0, len(cols)):
            fj = fi if symmetric and j == i else _features(net, cols[j])
            block = _block_gram(net, fi, fj, per_layer, trace_outputs)
            na, nb = block.shape[pair]
            r, c = slice(i * bs, i * bs + na), slice(j * bs, j * bs + nb)
            if len(shape) == 2:
                out[..., r, c] = block
                if symmetric and j != i:
                    out[..., c, r] = block.transpose(-1, -2)
            else:  # Theta_ab(x, x') = Theta_ba(x', x)
                out[..., r, c, :, :] = block
                if symmetric and j != i:
                    out[..., c, r, :, :] = block.transpose(-3, -4).transpose(-1, -2)
            done += 1
            if progress is not None:
                progress(done, total)
    return out


def empirical_nngp(net: MLP, X: torch.Tensor, X2: torch.Tensor | None = None) -> torch.Tensor:
    """Finite-width estimate of Sigma(L), the covariance of each output over the readout's draw
    given the hidden layers: a(L-1)(x).a(L-1)(x') c^2 + beta^2 -> (N1, N2), c the readout's
    multiplier on its N(0, 1) weights (1/sqrt(n_{L-1}) in the NTK and, folded into the weights, the
    standard parametrization; 1/n in muP and mean-field, whose outputs shrink with the width). An
    `ntkrun.MLP` only (a CNN or a module: `ntkrun.monte_carlo_kernels` gives their NNGP)."""
    if not isinstance(net, MLP):
        raise TypeError(
            f"empirical_nngp takes an ntkrun.MLP, got {type(net).__name__}; for other networks "
            "ntkrun.monte_carlo_kernels estimates the NNGP over seeds"
        )
    X = _prepare(net, X)
    X2 = X if X2 is None else _prepare(net, X2)
    with torch.no_grad():
        a = net.forward_cache(X).acts[-1]
        a2 = a if X2 is X else net.forward_cache(X2).acts[-1]
    c2 = 1.0 / net.sizes[-2] if net.standard else 1.0 / net.fan[-1] ** 2
    return a @ a2.t() * c2 + net.beta**2
