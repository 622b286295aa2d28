from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data import write_split
from torch.func import functional_call, jacrev, vmap

from ntkrun.network import MLP


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tests of tiny tensors or small blocks make thousands of
    tiny BLAS calls, and on a shared, loaded machine each one with 2 OpenMP threads can wait
    ~10 ms for a descheduled thread (2 s instead of 14 ms measured in tests/test_linalg.py).
    A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path) -> Path:
    """A small labelled IDX dataset with both splits (random pixels, random labels)."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_split(folder, n=120, split="train")
    write_split(folder, n=60, split="t10k")
    return folder


@pytest.fixture
def digits(tmp_path) -> Path:
    """80 random test-split digits (IDX, gzipped)."""
    folder = tmp_path / "digits"
    folder.mkdir()
    write_split(folder, n=80)
    return folder


def jacobian_ntk(net: MLP, X: torch.Tensor, X2: torch.Tensor | None = None, per_layer: bool = False):
    """Independent reference: contract per-sample parameter Jacobians from torch.func.

    -> (N1, N2), or (L, N1, N2) grouped by the layer index of each parameter.
    """
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, x):
        return functional_call(net, p, (x[None],))[0]

    X2 = X if X2 is None else X2
    J1 = vmap(jacrev(f), (None, 0))(params, X)
    J2 = vmap(jacrev(f), (None, 0))(params, X2)
    layers = torch.zeros(net.depth, X.shape[0], X2.shape[0], dtype=X.dtype)
    for name in params:  # names look like weights.2 / biases.2
        l = int(name.split(".")[1])
        layers[l] += J1[name].reshape(X.shape[0], -1) @ J2[name].reshape(X2.shape[0], -1).T
    return layers if per_layer else layers.sum(0)


def pytest_terminal_summary(terminalreporter) -> None:
    """Report what the robustness suite tried: the counters its modules keep."""
    import sys

    for name in ("test_fuzz_spec", "test_faults"):
        counts = getattr(sys.modules.get(name), "COUNTS", None)
        if counts:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            terminalreporter.write_line(f"{name}: {sum(counts.values())} cases ({detail})")
