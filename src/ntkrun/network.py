"""The fully connected network (docs/science.md §1, §7) and full-batch gradient descent.

NTK parametrization (the paper's, the default), standard parametrization, and the maximal-update
parametrization (muP; `meanfield`: muP of one hidden layer, docs/science.md §11):

    ntk:       z(l+1) = W(l) a(l) / sqrt(n_l) + beta * b(l),   W, b iid N(0, 1)
    standard:  z(l+1) = W(l) a(l) + b(l),   W ~ N(0, 1 / n_l), b ~ N(0, beta^2)
    mup:       as ntk, but the output layer z(L) = W(L-1) a(L-1) / n + beta * b(L-1), and GD moves
               every weight and hidden bias with the learning rate lr * n (the output bias: lr)
    a(l) = sigma(z(l)),   f(x) = z(L) in R^k (k = n_out outputs), n the hidden width

The standard parameters are drawn as W_ntk / sqrt(n_l) and beta * b_ntk from the same random
numbers, so one seed gives the same function at initialization in both; their gradients (and so
the NTK and the GD trajectory) differ. Layers are stored as `weights[l]` with shape
(n_{l+1}, n_l) and `biases[l]` with shape (n_{l+1},), l = 0 .. L-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ntkrun.nonlinearities import Nonlinearity, get_nonlinearity

PARAMETRIZATIONS = ("ntk", "standard", "mup", "meanfield")


@dataclass
class ForwardCache:
    """Everything the NTK and the gradient need from one forward pass on N inputs.

    acts[l] = a(l) with shape (N, n_l) for l = 0 .. L-1 (acts[0] is the input x);
    zs[l] = z(l+1) with shape (N, n_{l+1}) for l = 0 .. L-1 (zs[-1] is the output f, (N, k)).
    """

    acts: list[torch.Tensor]
    zs: list[torch.Tensor]

    @property
    def f(self) -> torch.Tensor:
        """Network outputs: (N,) for one output, (N, k) for k > 1."""
        out = self.zs[-1]
        return out[:, 0] if out.shape[1] == 1 else out


def hidden_widths(width: int | Sequence[int], depth: int) -> list[int]:
    """Hidden widths n_1 .. n_{L-1} from one width or an explicit list of depth - 1 widths."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if isinstance(width, int):
        widths = [width] * (depth - 1)
    else:
        widths = [int(w) for w in width]
        if len(widths) != depth - 1:
            raise ValueError(f"depth {depth} needs {depth - 1} hidden widths, got {len(widths)}")
    if any(w < 1 for w in widths):
        raise ValueError(f"hidden widths must be >= 1, got {widths}")
    return widths


def layer_sizes(n0: int, width: int | Sequence[int], depth: int, n_out: int = 1) -> list[int]:
    """[n0, n_1, ..., n_{L-1}, n_out]: every layer's width, input and output included."""
    return [n0, *hidden_widths(width, depth), n_out]


class MLP(nn.Module):
    """Fully connected network: (N, n0) -> (N,) for n_out = 1, (N, k) for n_out = k > 1.

    `depth` is the number of weight matrices L; `width` is the hidden width (or a list of the
    L - 1 hidden widths); `parametrization` is "ntk" (default), "standard", "mup" or "meanfield"
    (muP of depth 2; `fan` and `lr_scales` hold its multipliers and learning-rate factors). Parameters are
    drawn in float64 on the CPU from `seed`, then cast, so a seed gives the same network (up to
    rounding) on every device, in every dtype and in both parametrizations.
    """

    def __init__(
        self,
        n0: int,
        width: int | Sequence[int],
        depth: int,
        nonlinearity: str | Nonlinearity = "relu",
        beta: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        n_out: int = 1,
        parametrization: str = "ntk",
    ) -> None:
        super().__init__()
        if n0 < 1:
            raise ValueError(f"input dimension n0 must be >= 1, got {n0}")
        if n_out < 1:
            raise ValueError(f"n_out must be >= 1, got {n_out}")
        if parametrization not in PARAMETRIZATIONS:
            names = ", ".join(PARAMETRIZATIONS)
            raise ValueError(f"parametrization must be one of {names}, got {parametrization!r}")
        self.sizes = layer_sizes(n0, width, depth, n_out)
        self.depth = depth
        self.beta = float(beta)
        self.parametrization = parametrization
        self.standard = parametrization == "standard"
        self.mup = parametrization in ("mup", "meanfield")
        if parametrization == "meanfield" and depth != 2:
            raise ValueError(
                f"the meanfield parametrization has one hidden layer (depth 2), got depth {depth}"
            )
        if self.mup and len(set(self.sizes[1:-1])) > 1:
            raise ValueError(f"muP scales with one hidden width; got widths {self.sizes[1:-1]}")
        # fan[l]: W(l)'s multiplier is 1 / fan[l]; lr_scales[l]: (weight, bias) learning-rate factors
        self.fan = [math.sqrt(n) for n in self.sizes[:-1]]
        self.lr_scales = [(1.0, 1.0)] * depth
        if self.mup:
            n = float(self.sizes[-2])
            self.fan[-1] = n
            self.lr_scales = [(n, n)] * (depth - 1) + [(n, 1.0)]
        self.nonlinearity = get_nonlinearity(nonlinearity)
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
            b = torch.randn(n_out, generator=gen, dtype=torch.float64)
            if self.standard:
                w, b = w / math.sqrt(n_in), self.beta * b
            self.weights.append(nn.Parameter(w.to(device=device, dtype=dtype)))
            self.biases.append(nn.Parameter(b.to(device=device, dtype=dtype)))

    @property
    def n0(self) -> int:
        return self.sizes[0]

    @property
    def n_out(self) -> int:
        return self.sizes[-1]

    def forward_cache(self, X: torch.Tensor) -> ForwardCache:
        """One forward pass keeping a(l) and z(l+1) for every layer. X: (N, n0)."""
        if X.dim() != 2 or X.shape[1] != self.n0:
            raise ValueError(f"inputs must have shape (N, {self.n0}), got {tuple(X.shape)}")
        sigma = self.nonlinearity.sigma
        acts, zs = [X], []
        a = X
        for l, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            # z^T = W a^T: computed as (n_{l+1}, N) and used through its transpose, the layout in
            # which CPU BLAS runs these tall-skinny products fastest (measured in benchmarks/).
            if self.standard:
                z = torch.addmm(b[:, None], W, a.t()).t()
            else:
                alpha = 1.0 / self.fan[l]
                z = torch.addmm(b[:, None], W, a.t(), beta=self.beta, alpha=alpha).t()
            zs.append(z)
            if l < self.depth - 1:
                a = sigma(z)
                acts.append(a)
        return ForwardCache(acts, zs)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """(N, n0) -> (N,) outputs f(x), or (N, k) for k = n_out > 1."""
        return self.forward_cache(X).f

    def deltas(self, cache: ForwardCache, top: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Backpropagated delta(l+1) = sum_a top_a * df_a/dz(l+1), shape (N, n_{l+1}), l = 0 .. L-1.

        top: (N,) or (N, k), default all ones for one output. delta(L) = top,
        delta(l) = (delta(l+1) W(l) / sqrt(n_l)) * sigma_dot(z(l)) (ntk; no 1/sqrt(n_l) in the
        standard parametrization, whose W already carries it).
        """
        n = cache.zs[-1].shape[0]
        d = top.reshape(n, -1) if top is not None else cache.zs[-1].new_ones(n, 1)
        if d.shape[1] != self.n_out:
            raise ValueError(f"top must have {self.n_out} output columns, got shape {tuple(top.shape)}")
        out = [d]
        sigma_dot = self.nonlinearity.sigma_dot
        for l in range(self.depth - 1, 0, -1):
            scale = sigma_dot(cache.zs[l - 1])
            if not self.standard:
                scale = scale / self.fan[l]
            d = torch.mm(self.weights[l].t(), d.t()).t() * scale
            out.append(d)
        return out[::-1]

    def output_deltas(self, cache: ForwardCache) -> list[torch.Tensor]:
        """delta(l+1) of each output a (backpropagated from e_a): (k, N, n_{l+1}) for l = 0 .. L-1."""
        n, k = cache.zs[-1].shape
        eye = torch.eye(k, dtype=cache.zs[-1].dtype, device=cache.zs[-1].device)
        per_output = [self.deltas(cache, eye[a].expand(n, k)) for a in range(k)]
        return [torch.stack(layer) for layer in zip(*per_output, strict=True)]


def mse_cost(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C = 1/(2N) sum_i |f_i - y_i|^2 for f, y of shape (N,) or (N, k)."""
    if f.shape != y.shape:
        raise ValueError(f"targets must have the outputs' shape {tuple(f.shape)}, got {tuple(y.shape)}")
    if f.dim() == 1:
        return 0.5 * torch.mean((f - y) ** 2)
    return 0.5 * ((f - y) ** 2).sum() / f.shape[0]


def gd_step(net: nn.Module, X: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One full-batch gradient-descent step on C = 1/(2N) sum (f - y)^2; returns C before the step.

    X: (N, ...) inputs of `net`, y: (N,) or (N, k). Every parameter p moves by -lr dC/dp: an
    `ntkrun.MLP` by its hand-written backward pass (`mlp_gd_step`: as fast as autograd,
    benchmarks/bench_gd.py 0.94-1.05, but with no gradient buffer, a second copy of every weight,
    and the bit-identical results of earlier runs), any other network through autograd
    (`autograd_gd_step`); tests/test_network.py checks that the two agree on the MLP to 1e-12 in
    float64.
    """
    if isinstance(net, MLP):
        return mlp_gd_step(net, X, y, lr)
    return autograd_gd_step(net, X, y, lr)


def lr_factor(net: nn.Module, name: str) -> float:
    """The learning-rate factor of parameter `name` ("weights.l" or "biases.l") of a network with
    per-layer `lr_scales` (muP, docs/science.md §11.1); 1 for any other."""
    factors = getattr(net, "lr_factors", None)  # a composition's network (ntkrun.layers)
    if factors is not None:
        return factors.get(name, 1.0)
    scales = getattr(net, "lr_scales", None)
    kind, _, layer = name.partition(".")
    if scales is None or kind not in ("weights", "biases") or not layer.isdigit():
        return 1.0
    return scales[int(layer)][0 if kind == "weights" else 1]


def autograd_gd_step(net: nn.Module, X: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """gd_step through autograd, for any module: p <- p - lr r_p dC/dp (r_p = lr_factor: 1 but for
    muP); returns C before the step."""
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        cost = mse_cost(net(X), y)
        grads = torch.autograd.grad(cost, [p for _, p in named])
    with torch.no_grad():
        for (name, p), g in zip(named, grads, strict=True):
            p.sub_(g, alpha=lr * lr_factor(net, name))
    return cost.detach()


@torch.no_grad()
def mlp_gd_step(net: MLP, X: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """gd_step of an MLP by its hand-written backward pass; returns C before the step.

    X: (N, n0), y: (N,) or (N, k). The gradient of W(l) is g(l+1)^T a(l) / sqrt(n_l) (ntk;
    g(l+1)^T a(l) in the standard parametrization) with g = delta from top (f - y) / N; it is
    written straight into W(l) by one fused addmm, so no gradient buffer is allocated.
    """
    cache = net.forward_cache(X)
    cost = mse_cost(cache.f, y)
    g = net.deltas(cache, (cache.f - y) / X.shape[0])
    for l, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        if net.standard:
            W.addmm_(g[l].t(), cache.acts[l], alpha=-lr)
            b.sub_(g[l].sum(0), alpha=lr)
        else:
            r_w, r_b = net.lr_scales[l]  # 1 but for muP
            W.addmm_(g[l].t(), cache.acts[l], alpha=-lr * r_w / net.fan[l])
            b.sub_(g[l].sum(0), alpha=lr * r_b * net.beta)
    return cost
