"""Attention: global self-attention over positions (docs/science.md §12.9; Hron et al. 2020,
"Infinite attention: NNGP and NTK for deep attention networks"; neural-tangents' stax
GlobalSelfAttention with W_key_std = W_query_std = W_value_std = W_out_std = 1, no positional
embeddings).

Each head h: keys K_h = x W^K_h, queries Q_h (tied to the keys where linear_scaling), values
V_h = x W^V_h, attention weights A = mech(Q_h K_h^T / (n d_k^a)) over positions (a = 1 with
linear_scaling, else 1/2), f = concat_h(A V_h) W^O / sqrt(d_v heads n) + b_std b, n the input's
features, d_k = d_v = the width. At infinite width, with linear_scaling the weights converge to
A(x) = mech(q(x)) (q(x) the input's own covariance over positions) and

    Sigma' = G(x) Sigma G(x')^T + b_std^2,     Theta' = Sigma' + G(x) (Theta + Sigma) G(x')^T,

G = softmax over the second position (mechanism softmax) or q itself (identity); with the
1/sqrt(d_k) scaling and identity weights, the weights stay Gaussian and (|.|^2 and <., .> sum over
all pairs of positions of one pair of inputs)

    Sigma' = |Sigma|^2 Sigma + b_std^2,
    Theta' = 2 <Sigma, Theta> Sigma + |Sigma|^2 (Theta + 4 Sigma) + b_std^2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntkrun.layers.base import Built, Features, Layer, LayerError
from ntkrun.layers.dense import next_source
from ntkrun.layers.state import Kernel, State, second

MECHANISMS = ("softmax", "identity")


class AttentionModule(nn.Module):
    """(N, T, n) or images (N, n, H, W) -> the same positions with `width` features."""

    def __init__(
        self, n_in: int, width: int, heads: int, mechanism: str, linear: bool, b_std: float,
        gen: torch.Generator,
    ) -> None:  # fmt: skip
        super().__init__()
        self.key = nn.Parameter(torch.randn(heads, n_in, width, generator=gen))
        self.query = None if linear else nn.Parameter(torch.randn(heads, n_in, width, generator=gen))
        self.value = nn.Parameter(torch.randn(heads, n_in, width, generator=gen))
        self.out = nn.Parameter(torch.randn(width * heads, width, generator=gen))
        self.bias = nn.Parameter(torch.randn(width, generator=gen)) if b_std else None
        self.mechanism, self.linear, self.b_std = mechanism, linear, b_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.dim() == 4
        if image:  # positions are the pixels; the features are the channels
            n, _, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)
        n_in, d_k = x.shape[-1], self.key.shape[-1]
        keys = torch.einsum("ntc,hck->hntk", x, self.key)
        queries = keys if self.query is None else torch.einsum("ntc,hck->hntk", x, self.query)
        scores = queries @ keys.transpose(-1, -2) / (n_in * d_k ** (1.0 if self.linear else 0.5))
        weights = torch.softmax(scores, -1) if self.mechanism == "softmax" else scores
        heads = weights @ torch.einsum("ntc,hcv->hntv", x, self.value)  # (heads, N, T, d_v)
        joined = heads.permute(1, 2, 3, 0).flatten(2)  # (N, T, d_v heads), as stax orders them
        out = joined @ self.out / math.sqrt(joined.shape[-1] * n_in)
        if self.bias is not None:
            out = out + self.b_std * self.bias
        return out.transpose(1, 2).reshape(n, -1, h, w) if image else out


def _flat(T: torch.Tensor, lead: int) -> torch.Tensor:
    """(*lead, *P, *P) -> (*lead, |P|, |P|)."""
    size = math.isqrt(math.prod(T.shape[lead:]))
    return T.reshape(*T.shape[:lead], size, size)


class Attention(Layer):
    """Global self-attention of `width` features (keys, values and outputs) and `heads` heads."""

    name = "attention"
    mixes_positions = True
    needs_positions = True

    def __init__(
        self, heads: int = 1, mechanism: str = "softmax", linear_scaling: bool = True, b_std: float = 0.1
    ) -> None:
        if mechanism not in MECHANISMS:
            raise LayerError(f"attention: mechanism is one of {', '.join(MECHANISMS)}, got {mechanism!r}")
        if mechanism == "softmax" and not linear_scaling:
            raise LayerError(
                "attention: softmax weights have a closed-form limit only with linear_scaling (1/d_key); "
                "use linear_scaling: true, or mechanism: identity"
            )
        if heads < 1:
            raise LayerError(f"attention: heads must be at least 1, got {heads}")
        self.heads, self.mechanism, self.linear = heads, mechanism, bool(linear_scaling)
        self.b_std = float(b_std)
        self.own_key = object()  # state.second's key for the second inputs' new own covariances

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """(N, T, T) own covariances -> the limit's attention weights G (N, T, T)."""
        return torch.softmax(q, -1) if self.mechanism == "softmax" else q

    def kernel(self, k: State) -> State:
        if not isinstance(k, Kernel):
            raise LayerError("attention: its input is several branches; join them first")
        if not k.spatial:
            raise LayerError("attention: needs positions (sequences (N, T, d), images); its input is vectors")
        n1, n2, b2 = k.sigma.shape[0], k.sigma.shape[1], self.b_std**2
        sigma, theta = _flat(k.sigma, 2), _flat(k.theta, 2)
        q1 = _flat(k.q1, 1)
        if not self.linear:  # identity weights, 1/sqrt(d_k): Gaussian weights
            norm = sigma.square().sum((2, 3), keepdim=True)
            inner = (sigma * theta).sum((2, 3), keepdim=True)
            new_sigma = norm * sigma + b2
            new_theta = 2 * inner * sigma + norm * (theta + 4 * sigma) + b2
            own = lambda q: q.square().sum((1, 2), keepdim=True) * q + b2  # noqa: E731
        else:
            g1 = self.attend(q1)
            g2 = g1 if k.q2 is k.q1 else second(self, lambda q: self.attend(_flat(q, 1)), k.q2)
            weigh = lambda T: torch.einsum("ast,abtu,bvu->absv", g1, T, g2)  # noqa: E731
            new_sigma = weigh(sigma) + b2
            new_theta = new_sigma + weigh(theta + sigma)

            def own(q: torch.Tensor) -> torch.Tensor:
                g = self.attend(q)
                return torch.einsum("ast,atu,avu->asv", g, q, g) + b2

        new_q1 = own(q1)
        new_q2 = new_q1 if k.q2 is k.q1 else second(self.own_key, lambda q: own(_flat(q, 1)), k.q2)
        shape = k.sigma.shape[2:]
        return k.replace(
            sigma=new_sigma.reshape(n1, n2, *shape), theta=new_theta.reshape(n1, n2, *shape),
            q1=new_q1.reshape(k.q1.shape), q2=new_q2.reshape(k.q2.shape),
            gaussian=True, inputs=False, source=next_source(),
        )  # fmt: skip

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        if not isinstance(n_in, tuple):
            raise LayerError(f"attention: needs positions (sequences or images); its input is {n_in}")
        features = n_in[0] if len(n_in) == 3 else n_in[-1]
        built = AttentionModule(features, width, self.heads, self.mechanism, self.linear, self.b_std, gen)
        return built, ((width, *n_in[1:]) if len(n_in) == 3 else (n_in[0], width))
