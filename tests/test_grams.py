"""checkpointed_grams: the Grams of several kinds from one `kernels` call per row block, each block
checkpointed and read back (also a part written before the kinds were its keys)."""

from __future__ import annotations

from typing import Any

import torch

from ntkrun.architectures.conv import CNNArchitecture
from ntkrun.architectures.mlp import MLPArchitecture
from ntkrun.runners.grams import checkpointed_grams
from ntkrun.work import NoProgress, Work


class Checkpoints:
    """A UnitContext that keeps checkpoint parts in a dict."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, str | None], dict[str, Any]] = {}

    def require(self, work: Work) -> dict[str, Any]:
        raise AssertionError("a Gram needs no other unit")

    def load_checkpoint(self, name: str, part: str | None = None) -> dict[str, Any] | None:
        return self.parts.get((name, part))

    def save_checkpoint(self, name: str, state: dict[str, Any], part: str | None = None) -> None:
        self.parts[(name, part)] = state


def test_joint_grams_equal_the_kernels_and_resume_from_their_parts(monkeypatch):
    torch.manual_seed(0)
    X = torch.randn(10, 1 * 4 * 4, dtype=torch.float64)
    cnn = CNNArchitecture(input_shape=(1, 4, 4), depth=2)
    ctx = Checkpoints()
    S, T = checkpointed_grams(cnn, ["nngp", "ntk"], X, torch.float64, 4, ctx, "u", NoProgress())
    torch.testing.assert_close(S, cnn.kernel(X, kind="nngp"), rtol=1e-12, atol=0)
    torch.testing.assert_close(T, cnn.kernel(X, kind="ntk"), rtol=1e-12, atol=0)
    assert sorted(part for _, part in ctx.parts) == ["rows0", "rows4", "rows8"]
    assert set(ctx.parts[("u", "rows4")]) == {"nngp", "ntk"}
    calls = []
    monkeypatch.setattr(CNNArchitecture, "kernels", lambda self, *a, **k: calls.append(k["rows"]))
    del ctx.parts[("u", "rows8")]  # killed before its last block: only that one is computed again
    S2, T2 = checkpointed_grams(cnn, ["nngp", "ntk"], X, torch.float64, 4, ctx, "u", NoProgress())
    assert calls == [(8, 10)]
    assert torch.equal(S2[:8], S[:8]) and torch.equal(T2[:8], T[:8])


def test_a_part_of_one_kind_written_as_block_is_read():
    torch.manual_seed(1)
    X = torch.randn(6, 5, dtype=torch.float64)
    mlp = MLPArchitecture(input_shape=(5,), depth=3)
    ctx = Checkpoints()
    (K,) = checkpointed_grams(mlp, ["ntk"], X, torch.float64, 3, ctx, "u", NoProgress())
    ctx.parts = {key: {"block": state["ntk"] + 1.0} for key, state in ctx.parts.items()}  # the old key
    (K2,) = checkpointed_grams(mlp, ["ntk"], X, torch.float64, 3, ctx, "u", NoProgress())
    assert torch.equal(K2, K + 1.0)  # every entry from the (marked) parts, none recomputed
