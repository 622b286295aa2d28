"""Pointwise nonlinearities sigma and their derivatives sigma_dot (docs/science.md §1, §3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Nonlinearity:
    name: str
    sigma: Fn
    sigma_dot: Fn


def _relu_dot(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _erf_dot(z: torch.Tensor) -> torch.Tensor:
    return (2.0 / math.sqrt(math.pi)) * torch.exp(-z * z)


def _tanh_dot(z: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.tanh(z) ** 2


def _gelu(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(z)


def _gelu_dot(z: torch.Tensor) -> torch.Tensor:
    # d/dz [z Phi(z)] = Phi(z) + z phi(z)
    phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * phi


NONLINEARITIES: dict[str, Nonlinearity] = {
    "relu": Nonlinearity("relu", torch.relu, _relu_dot),
    "erf": Nonlinearity("erf", torch.erf, _erf_dot),
    "tanh": Nonlinearity("tanh", torch.tanh, _tanh_dot),
    "gelu": Nonlinearity("gelu", _gelu, _gelu_dot),
    "softplus": Nonlinearity("softplus", torch.nn.functional.softplus, torch.sigmoid),
    "identity": Nonlinearity("identity", lambda z: z, torch.ones_like),
}


def get_nonlinearity(name: str | Nonlinearity) -> Nonlinearity:
    """Look up a nonlinearity by name; a `Nonlinearity` passes through unchanged."""
    if isinstance(name, Nonlinearity):
        return name
    try:
        return NONLINEARITIES[name]
    except KeyError:
        known = ", ".join(NONLINEARITIES)
        raise ValueError(f"unknown nonlinearity {name!r} (known: {known})") from None
