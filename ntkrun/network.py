"""The fully connected network in NTK parametrization (docs/science.md §1) and full-batch gradient descent.

    z(l+1) = W(l) a(l) / sqrt(n_l) + beta * b(l),   a(l) = sigma(z(l)),   f(x) = z(L)

All entries of W(l) and b(l) are iid N(0, 1). Layers are stored as `weights[l]` with shape
(n_{l+1}, n_l) and `biases[l]` with shape (n_{l+1},), l = 0 .. L-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ntkrun.nonlinearities import Nonlinearity, get_nonlinearity


@dataclass
class ForwardCache:
    """Everything the NTK and the gradient need from one forward pass on N inputs.

    acts[l] = a(l) with shape (N, n_l) for l = 0 .. L-1 (acts[0] is the input x);
    zs[l] = z(l+1) with shape (N, n_{l+1}) for l = 0 .. L-1 (zs[-1] is the output f, (N, 1)).
    """

    acts: list[torch.Tensor]
    zs: list[torch.Tensor]

    @property
    def f(self) -> torch.Tensor:
        """(N,) network outputs."""
        return self.zs[-1][:, 0]


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


class MLP(nn.Module):
    """NTK-parametrized MLP with scalar output: (N, n0) -> (N,).

    `depth` is the number of weight matrices L; `width` is the hidden width (or a list of the
    L - 1 hidden widths). Parameters are drawn in float64 on the CPU from `seed`, then cast, so
    a seed gives the same network (up to rounding) on every device and in every dtype.
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
    ) -> None:
        super().__init__()
        if n0 < 1:
            raise ValueError(f"input dimension n0 must be >= 1, got {n0}")
        self.sizes = [n0, *hidden_widths(width, depth), 1]
        self.depth = depth
        self.beta = float(beta)
        self.nonlinearity = get_nonlinearity(nonlinearity)
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
            b = torch.randn(n_out, generator=gen, dtype=torch.float64)
            self.weights.append(nn.Parameter(w.to(device=device, dtype=dtype)))
            self.biases.append(nn.Parameter(b.to(device=device, dtype=dtype)))

    @property
    def n0(self) -> int:
        return self.sizes[0]

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
            z = torch.addmm(b[:, None], W, a.t(), beta=self.beta, alpha=1.0 / math.sqrt(self.sizes[l])).t()
            zs.append(z)
            if l < self.depth - 1:
                a = sigma(z)
                acts.append(a)
        return ForwardCache(acts, zs)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """(N, n0) -> (N,) outputs f(x)."""
        return self.forward_cache(X).f

    def deltas(self, cache: ForwardCache, top: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Backpropagated delta(l+1) = top * df/dz(l+1), shape (N, n_{l+1}), for l = 0 .. L-1.

        delta(L) = top (default 1), delta(l) = (delta(l+1) W(l) / sqrt(n_l)) * sigma_dot(z(l)).
        """
        n = cache.zs[-1].shape[0]
        d = top.reshape(n, 1) if top is not None else cache.zs[-1].new_ones(n, 1)
        out = [d]
        sigma_dot = self.nonlinearity.sigma_dot
        for l in range(self.depth - 1, 0, -1):
            d = torch.mm(self.weights[l].t(), d.t()).t() * (
                sigma_dot(cache.zs[l - 1]) / math.sqrt(self.sizes[l])
            )
            out.append(d)
        return out[::-1]


def mse_cost(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C = 1/(2N) sum_i (f_i - y_i)^2 for f, y of shape (N,)."""
    return 0.5 * torch.mean((f - y) ** 2)


@torch.no_grad()
def gd_step(net: MLP, X: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One full-batch gradient-descent step on C = 1/(2N) sum (f - y)^2; returns C before the step.

    X: (N, n0), y: (N,). The gradient of W(l) is g(l+1)^T a(l) / sqrt(n_l) with
    g = delta * (f - y) / N; it is written straight into W(l) by one fused addmm, so no gradient
    buffer is allocated.
    """
    cache = net.forward_cache(X)
    cost = mse_cost(cache.f, y)
    g = net.deltas(cache, (cache.f - y) / X.shape[0])
    for l, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        W.addmm_(g[l].t(), cache.acts[l], alpha=-lr / math.sqrt(net.sizes[l]))
        b.sub_(g[l].sum(0), alpha=lr * net.beta)
    return cost
