"""The labelled data of `ntkrun generalization`: nested training sets of a seeded order, the test
split, centered one-hot targets, the scores of a predictor and the results that hold them."""

from __future__ import annotations

from typing import Any, TypedDict

import torch

from ntkrun.data import choose_points, load_split, resolve_data_dir


class FitResult(TypedDict):
    """A KernelFit unit's result: a row of scores per predictor, and the solves' notes."""

    rows: dict[str, list]
    notes: list[str]


class BlockResult(TypedDict):
    """A GramBlock unit's result: which checkpoint part of its fit holds the block, and its shape
    (the block itself is in that part, read by the fit memory-mapped)."""

    part: str
    shape: list[int]


class ReferenceResult(TypedDict):
    """The Reference unit's result: the NTK predictor's test outputs at t = inf and at the nets'
    training time t (M, 10), and its row of scores (predictor ntk_t)."""

    inf: torch.Tensor
    t: torch.Tensor
    rows: dict[str, list]


class NetResult(TypedDict):
    """A TrainNet unit's result: its row of scores, and its distances to the NTK predictor."""

    rows: dict[str, list]
    distance: dict[str, list]


CLASSES = 10
KERNEL_KINDS = ("ntk", "nngp", "mlp_ntk", "mlp_nngp")  # the kernel predictors (mlp_: the MLP's)


def n_train_sizes(spec: Any) -> list[int]:
    """Every training-set size a unit uses (kernels' list, and the networks' set)."""
    kernel = spec.data.n_train if set(spec.predictors) & set(KERNEL_KINDS) else []
    net = [spec.training.n_train] if "net" in spec.predictors else []
    return [*kernel, *net]


def dataset(spec: Any, n_train: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X (n_train, n0), labels, X_test (M, n0), test labels), float64; the training points are a
    prefix of one seeded order, so the learning curve's sets are nested."""
    folder = resolve_data_dir(spec.data.dir)
    images, labels = load_split(folder, "train")
    X, y = choose_points(images, labels, max(n_train_sizes(spec)), spec.data.seed, nested=True)
    X, y = X[:n_train], y[:n_train]
    images, labels = load_split(folder, "test")
    m = spec.data.n_test or images.shape[0]
    Xt, yt = choose_points(images, labels, m, spec.data.seed)
    if spec.data.scaling == "standardize":  # statistics of the training points, applied to both
        mean, std = X.mean(0), X.std(0)
        std = torch.where(std > 0, std, 1.0)
        X, Xt = (X - mean) / std, (Xt - mean) / std
    return X, y, Xt, yt


def targets(spec: Any, labels: torch.Tensor) -> torch.Tensor:
    """(N,) class labels -> (N, 10) centered one-hot targets."""
    Y = torch.full((len(labels), CLASSES), spec.data.target_off, dtype=torch.float64)
    Y[torch.arange(len(labels)), labels] = spec.data.target_on
    return Y


def scores(spec: Any, pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Test accuracy (argmax over the 10 outputs) and test MSE (mean over points and outputs)."""
    return {
        "test_accuracy": float((pred.argmax(1) == labels).double().mean()),
        "test_mse": float(((pred - targets(spec, labels)) ** 2).mean()),
    }
