"""Activations: phi applied to each feature of a Gaussian input (docs/science.md §12.2).

With (u, v) centered Gaussian of variances q(x), q(x') and covariance Sigma(x, x'):
Sigma' = E[phi(u) phi(v)], Theta' = Theta E[phi'(u) phi'(v)], q' = E[phi(u)^2]. Closed forms for
ReLU and erf (ntkrun.kernels.analytic), LeakyRelu and Abs from ReLU's (phi = relu(u) - a relu(-u)
gives E[phi phi] = (1 + a^2) k(c) - 2a k(-c) and E[phi' phi'] = (1 + a^2) d(c) + 2a d(-c), k and d
ReLU's two expectations at covariance c; Abs is a = -1), Identity exactly; any other library
nonlinearity (tanh, gelu, softplus, or a `Nonlinearity`) by Gauss-Hermite quadrature.
"""

from __future__ import annotations

import torch
from torch import nn

from ntkrun.kernels.analytic import (
    Expectations,
    erf_expectations,
    quadrature_expectations,
    relu_expectations,
)
from ntkrun.layers.base import Built, Features, Layer, LayerError
from ntkrun.layers.state import Kernel, State, diagonal, outer, second, self_outer
from ntkrun.nonlinearities import Nonlinearity, get_nonlinearity

Pair = tuple[torch.Tensor, torch.Tensor]


def leaky_expectations(a: float) -> Expectations:
    """E[phi phi], E[phi' phi'] of phi(u) = u (u > 0), a u (u < 0)."""

    def expectations(
        sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_plus, d_plus = relu_expectations(sxx, sxy, syy)
        k_minus, d_minus = relu_expectations(sxx, -sxy, syy)
        return (1 + a * a) * k_plus - 2 * a * k_minus, (1 + a * a) * d_plus + 2 * a * d_minus

    return expectations


def _around(pair: tuple[torch.Tensor, torch.Tensor], cov: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(variance of u, covariance, variance of v), as the expectations take them."""
    return pair[0], cov, pair[1]


class ActivationModule(nn.Module):
    def __init__(self, layer: Activation) -> None:
        super().__init__()
        self.phi, self.layer = layer.phi, layer  # the layer: its closed form, for from_torch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.phi.sigma(x)


class Activation(Layer):
    """phi on each feature of a Gaussian input."""

    def __init__(self, phi: str | Nonlinearity, expect: Expectations | None = None) -> None:
        self.phi = get_nonlinearity(phi)
        self.name = self.phi.name
        self.expect = expect or quadrature_expectations(self.phi)

    def kernel(self, k: State) -> State:
        if not isinstance(k, Kernel):
            raise LayerError(f"{self.name}: its input is several branches; join them first")
        if not k.gaussian:
            what = "the raw inputs" if k.inputs else "a nonlinearity"
            raise LayerError(
                f"{self.name}: its input is not Gaussian ({what}); put a weight layer (Dense) before it"
            )
        d = k.d
        e_ss, e_dd = self.expect(*_around(outer(k.var1, k.var2, d), k.sigma))
        q1 = self.expect(*_around(self_outer(k.var1, d), k.q1))[0]
        own = lambda q: self.expect(*_around(self_outer(diagonal(q, d), d), q))[0]  # noqa: E731
        q2 = q1 if k.q2 is k.q1 else second(self, own, k.q2)
        return k.replace(sigma=e_ss, theta=k.theta * e_dd, q1=q1, q2=q2, gaussian=False, inputs=False)

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        return ActivationModule(self), n_in


def Relu() -> Activation:  # noqa: N802 (stax's names)
    return Activation("relu", relu_expectations)


def Erf() -> Activation:  # noqa: N802
    return Activation("erf", erf_expectations)


def LeakyRelu(alpha: float = 0.01) -> Activation:  # noqa: N802
    phi = Nonlinearity(
        f"leaky_relu({alpha:g})",
        lambda z: torch.where(z > 0, z, alpha * z),
        lambda z: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha)),
    )
    return Activation(phi, leaky_expectations(alpha))


def Abs() -> Activation:  # noqa: N802
    phi = Nonlinearity("abs", torch.abs, torch.sign)
    return Activation(phi, leaky_expectations(-1.0))


def Tanh() -> Activation:  # noqa: N802
    return Activation("tanh")


def Gelu() -> Activation:  # noqa: N802
    return Activation("gelu")


def Softplus() -> Activation:  # noqa: N802
    return Activation("softplus")


def _identity_expectations(
    sxx: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return sxy.clone(), torch.ones_like(sxy)


def Identity() -> Activation:  # noqa: N802
    """phi(u) = u (its input need not be Gaussian: nothing is averaged)."""
    return _Identity(get_nonlinearity("identity"), _identity_expectations)


class _Identity(Activation):
    def kernel(self, k: State) -> State:
        return k
