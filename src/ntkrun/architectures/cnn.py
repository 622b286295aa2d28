"""The convolutional network (docs/science.md §9), in the conventions of the MLP (ntkrun/network.py).

NTK parametrization (the default): a depth-L CNN has L - 1 convolutional hidden layers, a readout
and one dense output layer (L weight layers in all),

    alpha(0) = x                                                     x: (C0, H, W)
    h(l)     = conv_kxk(alpha(l-1), W(l)) / sqrt(C_(l-1) k^2) + beta b(l)     l = 1 .. L-1
    alpha(l) = sigma(h(l))
    f(x)     = W(L) . r(alpha(L-1)) / sqrt(fan_in) + beta b(L)

with stride 1 and every weight and bias iid N(0, 1). The readout r is "flatten" (vec of the
C x H' x W' activations, fan_in = C H' W') or "gap" (the mean over pixels, fan_in = C). Padding:
"same" (zeros, output as large as the input, the normalisation sqrt(C k^2) also at the borders),
"valid" (none: each layer shrinks the image by k - 1) or "circular" (periodic). "same" and
"circular" need an odd kernel_size, which has a centre pixel (**choice**: an even kernel is
refused rather than padded asymmetrically). The standard parametrization draws W_std =
W_ntk / sqrt(fan_in) and b_std = beta b_ntk from the same random numbers (the same function at
initialization, other gradients), as the MLP does. Parameters are drawn in float64 on the CPU from
`seed`, layer by layer (weights, then biases), then cast: with kernel_size 1 on 1 x 1 images and
the same seed the CNN holds exactly the weights of `ntkrun.MLP` and computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from ntkrun.network import PARAMETRIZATIONS, hidden_widths
from ntkrun.nonlinearities import Nonlinearity, get_nonlinearity

PADDINGS = ("same", "valid", "circular")
READOUTS = ("flatten", "gap")


def check_geometry(kernel_size: int, padding: str, readout: str, depth: int) -> None:
    """ValueError (one line, naming the argument) for an unknown padding/readout, a kernel_size
    < 1, an even kernel with "same"/"circular" padding, or depth < 1."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
    if padding != "valid" and kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd with padding {padding!r} (an even kernel has no centre pixel), "
            f"got {kernel_size}"
        )


def image_sizes(size: tuple[int, int], kernel_size: int, padding: str, depth: int) -> list[tuple[int, int]]:
    """(H_l, W_l) of alpha(l), l = 0 .. L-1; ValueError if "valid" shrinks the image below 1 pixel."""
    h, w = size
    shrink = kernel_size - 1 if padding == "valid" else 0
    n_conv = depth - 1
    if min(h, w) - n_conv * shrink < 1:
        need = 1 + n_conv * shrink
        raise ValueError(
            f"kernel_size {kernel_size} with padding 'valid' shrinks the {h}x{w} image below one pixel: "
            f"{n_conv} conv layers need at least {need}x{need}"
        )
    return [(h - l * shrink, w - l * shrink) for l in range(depth)]


def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {image_size!r}")
    return size  # type: ignore[return-value]


def pad_image(a: torch.Tensor, kernel_size: int, padding: str) -> torch.Tensor:
    """(N, C, H, W) -> the padded input of a stride-1 k x k convolution ("valid": unchanged)."""
    r = kernel_size // 2
    if padding == "valid" or r == 0:
        return a
    if padding == "same":
        return functional.pad(a, (r, r, r, r))
    h, w = a.shape[-2:]
    if r <= min(h, w):
        return functional.pad(a, (r, r, r, r), mode="circular")
    # a kernel wider than the image wraps around more than once: index modulo the size
    rows = torch.arange(-r, h + r, device=a.device) % h
    cols = torch.arange(-r, w + r, device=a.device) % w
    return a.index_select(-2, rows).index_select(-1, cols)


def forward_flops(
    channels: Sequence[int], kernel_size: int, sizes: Sequence[tuple[int, int]], readout: str, n_out: int
) -> list[int]:
    """FLOPs of one forward pass per input, per weight layer l = 1 .. L (a list of L ints), for the
    channels C_0 .. C_(L-1) and the image sizes (H_l, W_l) of alpha(l), l = 0 .. L-1.

    The cost model: 2 per multiply-add, as torch's FlopCounterMode counts. Conv layer l:
    2 C_l C_(l-1) k^2 H_l W_l; the dense layer: 2 k_out fan_in, plus C H' W' additions for the
    "gap" average. Bias additions, scalings and the nonlinearity (O(C_l H_l W_l) each) are not
    counted: they are a 1/(C k^2) share of a layer's cost.
    """
    k2 = kernel_size**2
    flops = [
        2 * c_out * c_in * k2 * h * w
        for c_in, c_out, (h, w) in zip(channels[:-1], channels[1:], sizes[1:], strict=True)
    ]
    h, w = sizes[-1]
    fan_in = channels[-1] * (h * w if readout == "flatten" else 1)
    dense = 2 * n_out * fan_in + (channels[-1] * h * w if readout == "gap" else 0)
    return [*flops, dense]


@dataclass
class CNNCache:
    """One forward pass on N inputs: acts[l] = alpha(l), (N, C_l, H_l, W_l), l = 0 .. L-1 (acts[0]
    = x); pre[l] = h(l+1), l = 0 .. L-2; feats = the readout r(alpha(L-1)), (N, fan_in); out the
    dense layer's output (N, k)."""

    acts: list[torch.Tensor]
    pre: list[torch.Tensor]
    feats: torch.Tensor
    out: torch.Tensor

    @property
    def f(self) -> torch.Tensor:
        return self.out[:, 0] if self.out.shape[1] == 1 else self.out


class CNN(nn.Module):
    """Convolutional network: (N, C0, H, W) -> (N,) for n_out = 1, (N, k) for n_out = k > 1.

    `depth` L counts weight layers (L - 1 convolutions, then the dense layer); `width` is the
    number of channels of every hidden layer, or a list of the L - 1 of them. `image_size` (H, W)
    (or an int for square images) is required for the "flatten" readout, whose dense layer's size
    depends on it; with "gap" it may be None (any image size). Stored as `weights[l]`, `biases[l]`:
    (C_{l+1}, C_l, k, k) and (C_{l+1},) for the convolutions l = 0 .. L-2, then (k_out, fan_in) and
    (k_out,) for the dense layer.
    """

    def __init__(
        self,
        in_channels: int,
        width: int | Sequence[int],
        depth: int,
        kernel_size: int = 3,
        padding: str = "same",
        readout: str = "flatten",
        nonlinearity: str | Nonlinearity = "relu",
        beta: float = 0.1,
        n_out: int = 1,
        parametrization: str = "ntk",
        seed: int = 0,
        image_size: int | Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        check_geometry(kernel_size, padding, readout, depth)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if n_out < 1:
            raise ValueError(f"n_out must be >= 1, got {n_out}")
        if parametrization not in PARAMETRIZATIONS or parametrization == "meanfield":
            names = ", ".join(p for p in PARAMETRIZATIONS if p != "meanfield")
            raise ValueError(f"parametrization must be one of {names}, got {parametrization!r}")
        if image_size is None and readout == "flatten":
            raise ValueError("image_size: the 'flatten' readout needs the image size (H, W) of its inputs")
        self.image_size = None if image_size is None else _size_pair(image_size)
        self.sizes = image_sizes(self.image_size, kernel_size, padding, depth) if self.image_size else None
        self.channels = [in_channels, *hidden_widths(width, depth)]
        self.depth, self.kernel_size, self.padding, self.readout = depth, kernel_size, padding, readout
        self.beta = float(beta)
        self.parametrization = parametrization
        self.standard = parametrization == "standard"
        self.mup = parametrization == "mup"
        self.nonlinearity = get_nonlinearity(nonlinearity)
        self.n_out = n_out
        # muP (docs/science.md §11.1, n the channels): the readout's multiplier 1 / (n sqrt(fan_in / n)),
        # i.e. readout_scale / sqrt(fan_in); learning-rate factors (weight, bias) per layer
        self.readout_scale, self.lr_scales = 1.0, [(1.0, 1.0)] * depth
        if self.mup:
            if len(set(self.channels[1:])) > 1:
                raise ValueError(f"muP scales with one hidden width; got channels {self.channels[1:]}")
            c = float(self.channels[-1])
            self.readout_scale, self.lr_scales = 1.0 / math.sqrt(c), [(c, c)] * (depth - 1) + [(c, 1.0)]
        h, w = self.sizes[-1] if self.sizes else (1, 1)
        self.fan_ins = [c * kernel_size**2 for c in self.channels[:-1]]
        self.fan_ins.append(self.channels[-1] * (h * w if readout == "flatten" else 1))
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        shapes = [(c_out, c_in, kernel_size, kernel_size) for c_in, c_out in zip(
            self.channels[:-1], self.channels[1:], strict=True)]  # fmt: skip
        shapes.append((n_out, self.fan_ins[-1]))
        for shape, fan_in in zip(shapes, self.fan_ins, strict=True):
            wt = torch.randn(shape, generator=gen, dtype=torch.float64)
            b = torch.randn(shape[0], generator=gen, dtype=torch.float64)
            if self.standard:
                wt, b = wt / math.sqrt(fan_in), self.beta * b
            self.weights.append(nn.Parameter(wt.to(device=device, dtype=dtype)))
            self.biases.append(nn.Parameter(b.to(device=device, dtype=dtype)))

    @property
    def in_channels(self) -> int:
        return self.channels[0]

    @property
    def n_params(self) -> int:
        """Number of trainable parameters P (all weights and biases)."""
        return sum(p.numel() for p in self.parameters())

    def layer_sizes(self, image_size: int | Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(H_l, W_l) of alpha(l), l = 0 .. L-1, for inputs of `image_size` (default: the network's)."""
        if image_size is None:
            if self.sizes is None:
                raise ValueError("image_size: this 'gap' network was built without one; pass it")
            return list(self.sizes)
        return image_sizes(_size_pair(image_size), self.kernel_size, self.padding, self.depth)

    def forward_flops(self, image_size: int | Sequence[int] | None = None) -> list[int]:
        """FLOPs of one forward pass per input, per weight layer l = 1 .. L (`forward_flops`)."""
        sizes = self.layer_sizes(image_size)
        return forward_flops(self.channels, self.kernel_size, sizes, self.readout, self.n_out)

    def check_inputs(self, X: torch.Tensor, name: str = "inputs") -> None:
        """ValueError unless X is (N, C0, H, W) with this network's channels and image size."""
        c = self.in_channels
        if X.dim() != 4 or X.shape[1] != c:
            raise ValueError(f"{name} must have shape (N, {c}, H, W), got {tuple(X.shape)}")
        if self.image_size is not None and tuple(X.shape[2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"{name} must have shape (N, {c}, {h}, {w}), got {tuple(X.shape)}")
        if self.image_size is None:
            self.layer_sizes(tuple(X.shape[2:]))  # "valid" may shrink this image below one pixel

    def forward_cache(self, X: torch.Tensor) -> CNNCache:
        """One forward pass keeping alpha(l) and h(l+1) of every layer. X: (N, C0, H, W)."""
        self.check_inputs(X)
        sigma = self.nonlinearity.sigma
        acts, pre = [X], []
        a = X
        for l in range(self.depth - 1):
            W, b = self.weights[l], self.biases[l]
            if not self.standard:
                W, b = W * (1.0 / math.sqrt(self.fan_ins[l])), b * self.beta
            h = functional.conv2d(pad_image(a, self.kernel_size, self.padding), W, b)
            pre.append(h)
            a = sigma(h)
            acts.append(a)
        feats = a.flatten(1) if self.readout == "flatten" else a.mean((2, 3))
        W, b = self.weights[-1], self.biases[-1]
        if self.standard:
            out = torch.addmm(b, feats, W.t())
        else:
            out = torch.addmm(
                b, feats, W.t(), beta=self.beta, alpha=self.readout_scale / math.sqrt(self.fan_ins[-1])
            )
        return CNNCache(acts, pre, feats, out)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """(N, C0, H, W) -> (N,) outputs f(x), or (N, k) for k = n_out > 1."""
        return self.forward_cache(X).f

    def nngp_features(self, X: torch.Tensor) -> torch.Tensor:
        """The readout features r(alpha(L-1)) / sqrt(fan_in), (N, fan_in): their Gram plus beta^2
        is the finite-width estimate of Sigma(L) (the covariance of each output at init)."""
        with torch.no_grad():
            return self.forward_cache(X).feats * (self.readout_scale / math.sqrt(self.fan_ins[-1]))
