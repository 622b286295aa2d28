"""The skeleton the runners share, written once: the results they read by work, and the caption
of their figures (ntkrun.work.Results, ntkrun.runners.common.network_caption)."""

from __future__ import annotations

import pytest
import torch

from ntkrun.runners.common import limit_estimate, limit_units, network_caption
from ntkrun.runners.features import FeaturesNetworkSpec
from ntkrun.runners.scaling import ScalingNetworkSpec
from ntkrun.spec import NetworkSpec
from ntkrun.work import MonteCarloLimit, Reference, Results, TrainNet, Unit


def test_results_are_read_by_work_in_the_order_of_the_units():
    units = [
        Unit("reference", 1.0, Reference()),
        Unit("w8_s1", 1.0, TrainNet(8, 1)),
        Unit("w8_s0", 1.0, TrainNet(8, 0)),
    ]
    results = Results((u, {"name": u.name}) for u in units)
    assert results[Reference()] == {"name": "reference"}
    assert [w for w, _ in results.of(TrainNet)] == [TrainNet(8, 1), TrainNet(8, 0)]
    assert len(results) == 3 and results.of(MonteCarloLimit) == []
    with pytest.raises(KeyError):
        results[Reference(depth=2)]


def test_a_unit_listed_twice_is_read_once():
    """A spec that repeats a width lists its units twice, sharing one unit file: its rows are
    aggregated once, at its first place (as when results were a dict by unit name)."""
    twice = Unit("w8_s0", 1.0, TrainNet(8, 0))
    units = [twice, Unit("w16_s0", 1.0, TrainNet(16, 0)), twice]
    results = Results((u, {"name": u.name}) for u in units)
    assert [r["name"] for _, r in results.of(TrainNet)] == ["w8_s0", "w16_s0"]


def test_a_limit_is_read_from_its_shares_by_their_work():
    """limit_estimate asks each share for the work limit_units gave it: a share of another depth or
    seed is never read in its place."""
    units = limit_units("limit_d2_s0", 4, 1.0, depth=2, seed=0) + limit_units(
        "limit_d3_s0", 4, 1.0, depth=3, seed=0
    )

    value = {u.work: float(u.work.depth) for u in units}
    asked = []

    def read(work: MonteCarloLimit) -> dict:
        asked.append(work)
        k = torch.full((2, 2), value[work], dtype=torch.float64)
        return {"n": work.count, "ntk": k, "ntk_se": k * 0, "nngp": k, "nngp_se": k * 0}

    whole, _ = limit_estimate(read, 4, depth=3, seed=0)
    assert {w.depth for w in asked} == {3} and float(whole.ntk[0, 0]) == 3.0


def test_one_caption_for_every_network_block():
    assert network_caption(NetworkSpec()) == "depth 4 relu, beta 0.1"
    cnn = NetworkSpec(arch="cnn", kernel_size=5, padding="valid")
    assert network_caption(cnn) == "cnn depth 4 relu, 5x5 valid, flatten, beta 0.1"
    scaling = ScalingNetworkSpec(arch="cnn")
    assert (
        network_caption(scaling, depth=False, on="8x8 images")
        == "cnn relu, 3x3 same, flatten on 8x8 images, beta 0.1"
    )
    layers = FeaturesNetworkSpec(layers=["dense", "relu", "dense"], parametrizations=["ntk"])
    assert network_caption(layers, depth=False) == "layers dense, relu, dense"
