"""LayerNorm over the features, without affine parameters (docs/science.md §12.3).

At infinite width a Gaussian input's feature mean is 0 and its feature variance q(x), so the
layer divides by sqrt(q): Sigma' = Sigma / sqrt(q(x) q(x')), Theta' = Theta / sqrt(q(x) q(x')),
q' = 1 (neural-tangents' stax.LayerNorm, eps 1e-12 as there). Its input must be Gaussian (the
channel mean of a ReLU's outputs is not 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntkrun.layers.base import Built, Features, Layer, LayerError
from ntkrun.layers.state import Kernel, State, outer, second, self_outer

EPS = 1e-12


class LayerNormModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = 1 if x.dim() == 4 else -1  # the features: the channels of images (N, C, H, W)
        mean = x.mean(axis, keepdim=True)
        var = x.var(axis, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + EPS)


class LayerNorm(Layer):
    name = "layer_norm"

    def kernel(self, k: State) -> State:
        if not isinstance(k, Kernel):
            raise LayerError("layer_norm: its input is several branches; join them first")
        if not k.gaussian:
            raise LayerError("layer_norm: its input is not Gaussian; put a weight layer (Dense) before it")
        d = k.d
        s1, s2 = torch.sqrt(k.var1 + EPS), torch.sqrt(k.var2 + EPS)
        a, b = outer(s1, s2, d)
        q1 = k.q1 / math.prod(self_outer(s1, d))
        q2 = q1 if k.q2 is k.q1 else second(self, lambda q: q / math.prod(self_outer(s2, d)), k.q2)
        return k.replace(sigma=k.sigma / (a * b), theta=k.theta / (a * b), q1=q1, q2=q2)

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        return LayerNormModule(), n_in
