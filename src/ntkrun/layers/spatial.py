"""Layers over positions: Conv, AvgPool, GlobalAvgPool, Flatten (docs/science.md §12.6).

On the full spatial covariance (state.Kernel of images), with F the filter's offsets:
Conv: Sigma'_{p,p'} = W_std^2 (1/|F|) sum_{d in F} Sigma_{p+d, p'+d} + b_std^2, Theta'_{p,p'} =
Sigma'_{p,p'} + W_std^2 (1/|F|) sum_d Theta_{p+d, p'+d}; padding "same" (zeros outside), "valid"
(interior positions only) or "circular" (wrap-around). AvgPool: the mean over each side's
window (no parameters). GlobalAvgPool: the mean over all pairs (p, p'): vectors. Flatten: the
mean of the diagonal p = p' (what a Dense after it sees: its fan-in averages channels and
positions alike): vectors. As neural-tangents' stax Conv, AvgPool, GlobalAvgPool and Flatten.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntkrun.layers.base import Built, Features, Layer, LayerError
from ntkrun.layers.dense import next_source
from ntkrun.layers.state import Kernel, State, diagonal, second

PADDINGS = ("same", "valid", "circular")


def _image_state(name: str, k: State, full: bool = False) -> Kernel:
    """k, a state of images (with the full spatial covariance where `full`)."""
    if not isinstance(k, Kernel):
        raise LayerError(f"{name}: its input is several branches; join them first")
    if len(k.spatial) != 2:
        raise LayerError(f"{name}: needs images (N, C, H, W); its input is vectors")
    if full and k.diagonal_spatial:
        raise LayerError(f"{name}: mixes positions, but the state holds only each position with itself")
    return k


def _positions_state(name: str, k: State, full: bool = False) -> Kernel:
    """k, a state of images or sequences (with the full covariance over positions where `full`)."""
    if not isinstance(k, Kernel):
        raise LayerError(f"{name}: its input is several branches; join them first")
    if not k.spatial:
        raise LayerError(f"{name}: needs positions (images, sequences); its input is vectors")
    if full and k.diagonal_spatial:
        raise LayerError(f"{name}: mixes positions, but the state holds only each position with itself")
    return k


def _features_of(name: str, n_in: Features) -> tuple[int, int]:
    """(features at a position, positions) of images (C, H, W) or sequences (T, d)."""
    if not (isinstance(n_in, tuple) and len(n_in) in (2, 3)):
        raise LayerError(f"{name}: needs positions (images, sequences); its input is {n_in}")
    return (n_in[0], n_in[1] * n_in[2]) if len(n_in) == 3 else (n_in[1], n_in[0])


def _image_shape(name: str, n_in: Features) -> tuple[int, int, int]:
    if not (isinstance(n_in, tuple) and len(n_in) == 3):
        raise LayerError(f"{name}: needs images (N, C, H, W); its input is {n_in}")
    return n_in


def patch_mean(T: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """(..., H, W, H, W) -> the mean over the k x k offsets d of T_{p+d, p'+d} (both sides moved
    together), at the output positions of `padding`: the k column offsets first, then the k row
    offsets (2k strided sums instead of k^2)."""
    H, W = T.shape[-4], T.shape[-3]
    r = k // 2
    if padding == "circular":
        cols = sum(T.roll((-dx, -dx), (-3, -1)) for dx in range(-r, r + 1))
        return sum(cols.roll((-dy, -dy), (-4, -2)) for dy in range(-r, r + 1)) / (k * k)  # type: ignore[union-attr]
    if padding == "same":
        T = nn.functional.pad(T, [r, r, r, r, r, r, r, r])  # zeros around both sides' positions
        Ho, Wo = H, W
    else:
        Ho, Wo = H - k + 1, W - k + 1
    cols = T[..., :, 0:Wo, :, 0:Wo].clone()
    for dx in range(1, k):
        cols += T[..., :, dx : dx + Wo, :, dx : dx + Wo]
    out = cols[..., 0:Ho, :, 0:Ho, :].clone()
    for dy in range(1, k):
        out += cols[..., dy : dy + Ho, :, dy : dy + Ho, :]
    return out / (k * k)


def patch_mean_diagonal(T: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """patch_mean on the diagonal of the spatial covariance, (..., H, W) -> the mean over the k x k
    offsets d of T_{p+d} (zeros outside the image for 'same', wrapped around for 'circular')."""
    lead, (H, W) = T.shape[:-2], T.shape[-2:]
    x = T.reshape(-1, 1, H, W)
    r = k // 2
    if padding == "circular":
        x = nn.functional.pad(x, [r, r, r, r], mode="circular")
    out = nn.functional.avg_pool2d(
        x, k, stride=1, padding=r if padding == "same" else 0, count_include_pad=True
    )
    return out.reshape(*lead, *out.shape[-2:])


class ConvModule(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, k: int, padding: str, W_std: float, b_std: float, gen: torch.Generator
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k, generator=gen))
        self.bias = nn.Parameter(torch.randn(c_out, generator=gen)) if b_std else None
        self.scale, self.b_std, self.k, self.padding = W_std / math.sqrt(c_in * k * k), b_std, k, padding
        self.lr_w = self.lr_b = 1.0  # learning-rate factors of weight and bias (muP: maximal_update_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.k // 2
        if self.padding == "circular":
            x, pad = nn.functional.pad(x, [r, r, r, r], mode="circular"), 0
        else:
            pad = r if self.padding == "same" else 0
        out = nn.functional.conv2d(x, self.weight, padding=pad) * self.scale
        return out if self.bias is None else out + self.b_std * self.bias[:, None, None]


class Conv(Layer):
    """A k x k convolution of `width` channels (odd k; stride 1)."""

    name = "conv"
    needs_images = True
    weights = True

    def __init__(
        self, kernel_size: int = 3, padding: str = "same", W_std: float = 1.0, b_std: float = 0.1
    ) -> None:
        if padding not in PADDINGS:
            raise LayerError(f"conv: padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise LayerError(f"conv: kernel_size must be odd and positive, got {kernel_size}")
        self.k, self.padding, self.W_std, self.b_std = kernel_size, padding, float(W_std), float(b_std)

    def kernel(self, k: State) -> State:
        k = _image_state(self.name, k)
        if self.padding == "valid" and min(k.spatial) < self.k:
            raise LayerError(
                f"conv: a {self.k}x{self.k} valid convolution of {k.spatial[0]}x{k.spatial[1]} images"
            )
        w2, b2 = self.W_std**2, self.b_std**2
        mean = patch_mean_diagonal if k.diagonal_spatial else patch_mean
        sigma = w2 * mean(k.sigma, self.k, self.padding) + b2
        theta = sigma + w2 * mean(k.theta, self.k, self.padding)
        q1 = w2 * mean(k.q1, self.k, self.padding) + b2
        own = lambda q: w2 * mean(q, self.k, self.padding) + b2  # noqa: E731
        q2 = q1 if k.q2 is k.q1 else second(self, own, k.q2)
        return k.replace(
            sigma=sigma, theta=theta, q1=q1, q2=q2, gaussian=True, inputs=False, source=next_source()
        )

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        c, h, w = _image_shape(self.name, n_in)
        out = n_out or width
        shrink = self.k - 1 if self.padding == "valid" else 0
        return ConvModule(c, out, self.k, self.padding, self.W_std, self.b_std, gen), (
            out,
            h - shrink,
            w - shrink,
        )


class _Reduce(nn.Module):
    def __init__(self, how: str, window: int = 1) -> None:
        super().__init__()
        self.how, self.window = how, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "flatten":
            return x.flatten(1)
        if self.how == "global":  # images (N, C, H, W) over H, W; sequences (N, T, d) over T
            return x.mean((2, 3)) if x.dim() == 4 else x.mean(1)
        return nn.functional.avg_pool2d(x, self.window)


def _pool(T: torch.Tensor, lead: int, window: int) -> torch.Tensor:
    """Average both sides' positions of T (*lead dims, H, W, H, W) over window x window blocks."""
    shape = T.shape
    H, W = shape[-2], shape[-1]
    T = nn.functional.avg_pool2d(T.reshape(-1, 1, H, W), window)  # p' side
    Ho, Wo = T.shape[-2:]
    T = T.reshape(*shape[:-2], Ho, Wo).movedim((-4, -3), (-2, -1))  # p side to the end
    T = nn.functional.avg_pool2d(T.reshape(-1, 1, H, W), window)
    return T.reshape(*shape[:lead], Ho, Wo, Ho, Wo).movedim((-2, -1), (-4, -3))


class AvgPool(Layer):
    """The mean over non-overlapping window x window blocks (stride = window; stax's
    AvgPool((w, w), strides=(w, w), padding="VALID"))."""

    name = "avg_pool"
    needs_images = True
    mixes_positions = True

    def __init__(self, window: int = 2, stride: int | None = None) -> None:
        if stride not in (None, window):
            raise LayerError(f"avg_pool: only stride = window is supported, got stride {stride}")
        self.window = window

    def kernel(self, k: State) -> State:
        k = _image_state(self.name, k, full=True)
        if min(k.spatial) < self.window:
            h, w, n = *k.spatial, self.window
            raise LayerError(f"avg_pool: a {n}x{n} window on {h}x{w} images (pooling past a pixel)")
        q1 = _pool(k.q1, 1, self.window)
        return k.replace(
            sigma=_pool(k.sigma, 2, self.window), theta=_pool(k.theta, 2, self.window),
            q1=q1, q2=q1 if k.q2 is k.q1 else second(self, lambda q: _pool(q, 1, self.window), k.q2),
        )  # fmt: skip

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        c, h, w = _image_shape(self.name, n_in)
        return _Reduce("pool", self.window), (c, h // self.window, w // self.window)


class GlobalAvgPool(Layer):
    """The mean over all positions: images or sequences -> vectors of their features."""

    name = "global_avg_pool"
    needs_positions = True
    mixes_positions = True

    def kernel(self, k: State) -> State:
        k = _positions_state(self.name, k, full=True)
        pairs, own = tuple(range(2, k.sigma.dim())), lambda q: q.mean(tuple(range(1, q.dim())))
        q1 = own(k.q1)
        return k.replace(
            sigma=k.sigma.mean(pairs), theta=k.theta.mean(pairs),
            q1=q1, q2=q1 if k.q2 is k.q1 else second(self, own, k.q2),
        )  # fmt: skip

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        return _Reduce("global"), _features_of(self.name, n_in)[0]


class Flatten(Layer):
    """Images or sequences -> vectors of all their numbers; a Dense after it sees the mean over
    positions of each position's own kernel."""

    name = "flatten"
    needs_positions = True

    def kernel(self, k: State) -> State:
        k = _positions_state(self.name, k)
        d = k.d
        pair = lambda T: diagonal(T.flatten(0, 1), d).reshape(*T.shape[:2], -1).mean(-1)  # noqa: E731
        q1 = k.var1.flatten(1).mean(1)
        return k.replace(
            sigma=pair(k.sigma),
            theta=pair(k.theta),
            q1=q1,
            q2=q1 if k.q2 is k.q1 else second(self, lambda q: diagonal(q, d).flatten(1).mean(1), k.q2),
            diagonal_spatial=False,
        )

    def module(self, n_in: Features, width: int, n_out: int, gen: torch.Generator) -> Built:
        return _Reduce("flatten"), math.prod(_features_of(self.name, n_in))
