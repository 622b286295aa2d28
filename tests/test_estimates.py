"""--list-units' time estimates: what each unit's cost is made of, and how a probe is scaled.

How close the estimates come to measured units is a timing, so it is not a verdict here (a test
that depends on timing fails on a busy machine): benchmarks/estimates.py prints the ratios of
real runs' units side by side (docs/architecture.md, "Costs"). These tests pin what is
deterministic: which timed probes each kind of unit is priced by, at which size a probe runs, and
the arithmetic that scales its time up (with the clock replaced)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ntkrun import costs, orchestrate
from ntkrun.architectures.registry import describe
from ntkrun.cli import app
from ntkrun.costs import PROBE_FLOPS, Cost, Probe
from ntkrun.spec import NetworkSpec
from ntkrun.units import units


def kinds(unit) -> set[str]:
    return {probe.kind for probe, _ in costs.as_cost(unit.cost).probes}


def mlp(n0: int = 784, depth: int = 3):
    return describe(NetworkSpec(depth=depth), (n0,))


def test_each_kind_of_unit_is_priced_by_the_work_it_does(tmp_path):
    from tests.test_data import write_split

    write_split(tmp_path, n=300, split="train")
    write_split(tmp_path, n=300, split="t10k")
    plan = orchestrate.plan(
        orchestrate.Request(
            "generalization",
            preset="quick",
            sets=[f"data.dir={tmp_path}", "data.n_test=100", "data.n_train=[64]"],
        ),
        checks=False,
    )
    by_name = {u.name: u for u in plan.units}
    assert kinds(by_name["ntk_n64"]) == {"read", "kernel", "cholesky"}  # data, Grams, the solve
    assert kinds(by_name["reference"]) == {"read", "kernel", "eigh"}
    net = by_name["w256_s0"]
    assert kinds(net) == {"read", "gd"}
    ((gd, steps),) = [(p, k) for p, k in net.cost.probes if p.kind == "gd"]
    assert (gd.n, gd.width, gd.n_out, steps) == (256, 256, 10, 100)  # training.n_train, steps, classes
    reads = {p.description.name for p, _ in net.cost.probes if p.kind == "read"}
    assert reads == {
        f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))
    }


def test_a_training_unit_costs_its_steps_and_the_progress_weight_is_its_flops():
    spec = orchestrate.resolve(orchestrate.Request("scaling", preset="quick"))
    unit = units(spec)[0]
    gd = [(p, k) for p, k in unit.cost.probes if p.kind == "gd"]
    assert len(gd) == 1 and gd[0][1] == spec.training.steps
    probe = gd[0][0]
    assert unit.flops >= spec.training.steps * probe.description.gd_flops(probe.n, probe.width)


@pytest.mark.parametrize(
    ("probe", "expect"),
    [
        (Probe("gd", 4096, width=2048, description=mlp()), (512, 512)),  # points first, 512 kept
        (Probe("gd", 32, width=64, description=mlp()), (32, 64)),  # small: timed as it is
        (Probe("kernel", 3000, n2=500, description=mlp()), None),
        (Probe("cholesky", 20000), None),
    ],
)
def test_a_probe_is_shrunk_to_its_budget_points_first(probe, expect):
    n, width, n2 = costs.shrunk(probe)
    assert costs.flops_of(probe, n, width, n2) <= PROBE_FLOPS
    if expect is not None:
        assert (n, width) == expect
    if probe.kind == "cholesky":
        assert n >= 512 and costs.flops_of(probe, 2 * n, 0, 0) > PROBE_FLOPS  # halved no further than needed


def test_a_probe_time_is_scaled_by_the_flops_of_the_full_size(monkeypatch):
    costs.probe_seconds.cache_clear()
    costs.timed.cache_clear()
    monkeypatch.setattr(costs, "_best", lambda work, repeats=3: 0.01)  # the clock, replaced
    probe = Probe("gd", 4096, width=2048, description=mlp())
    n, width, n2 = costs.shrunk(probe)
    expected = 0.01 * probe.flops / costs.flops_of(probe, n, width, n2)
    assert costs.probe_seconds(probe) == pytest.approx(expected, rel=1e-12)
    rates = costs.Rates(gemm=1e9)
    cost = Cost(gemm=2e9) + Cost(probes=((probe, 3.0),))
    assert rates.seconds(cost) == pytest.approx(2.0 + 3 * expected, rel=1e-12)
    assert rates.seconds(5e9) == pytest.approx(5.0)  # a bare number: FLOPs of large products
    costs.probe_seconds.cache_clear()
    costs.timed.cache_clear()


def test_costs_add_and_scale():
    p = Probe("eigh", 100)
    c = (Cost(gemm=1.0) + Cost(probes=((p, 2.0),))) * 3 + 4.0
    assert c.gemm == 7.0 and c.probes == ((p, 6.0),) and c.flops == 7.0 + 6 * 9.0 * 100**3


def test_the_list_names_the_rates_and_prices_every_unit():
    result = CliRunner().invoke(app, ["scaling", "--preset", "quick", "--list-units"])
    assert result.exit_code == 0, result.output
    assert "timed at a small size" in result.output and "unknown" not in result.output
    assert "total:" in result.output


def test_gram_block_units_are_priced_by_their_kernels_and_add_up_to_the_whole_fit(tmp_path):
    """kernels.rows_per_unit: each block unit is priced by its data read and its kernel rows, the
    fit by its read and its solve; the blocks' kernel FLOPs add up to the one-unit fit's (the
    training blocks price their upper triangle, as the one-unit Gram does)."""
    from tests.test_data import write_split

    write_split(tmp_path, n=300, split="train")
    write_split(tmp_path, n=2300, split="t10k")
    sets = [f"data.dir={tmp_path}", "data.n_test=2300", "data.n_train=[256]", "predictors=[ntk]"]

    def plan(*extra: str):
        request = orchestrate.Request("generalization", preset="quick", sets=[*sets, *extra])
        return {u.name: u for u in orchestrate.plan(request, checks=False).units}

    whole, split = plan(), plan("kernels.rows_per_unit=100")
    assert sorted(split) == ["ntk_n256", "ntk_n256_rows0", "ntk_n256_rows100", "ntk_n256_rows200",
                             "ntk_n256_test0", "ntk_n256_test1000", "ntk_n256_test2000"]  # fmt: skip
    assert kinds(split["ntk_n256"]) == {"read", "cholesky"} and kinds(whole["ntk_n256"]) == {
        "read",
        "kernel",
        "cholesky",
    }
    blocks = [u for name, u in split.items() if name != "ntk_n256"]
    assert all(kinds(u) == {"read", "kernel"} for u in blocks)

    def kernel_flops(unit) -> float:
        return sum(p.flops * k for p, k in unit.cost.probes if p.kind == "kernel")

    assert sum(kernel_flops(u) for u in blocks) == pytest.approx(kernel_flops(whole["ntk_n256"]), rel=0.01)


def test_a_pool_prices_its_units_as_sharing_the_cores():
    """In a local pool whose workers' threads outnumber the cores, --list-units prices each unit
    slower by that ratio (2 workers of cpu_count threads: 2x), its time alone kept for the total."""
    import os

    threads = os.cpu_count() or 1

    def table(*extra: str):
        sets = [f"executor.threads={threads}", *extra]
        request = orchestrate.Request("scaling", preset="quick", sets=sets)
        return orchestrate.unit_table(orchestrate.plan(request, checks=False))

    inline, pool = table(), table("executor.kind=local", "executor.jobs=2")
    assert inline.attrs["sharing"] == 1.0 and pool.attrs["sharing"] == 2.0
    assert list(pool["alone"]) == list(inline["alone"]) == list(inline["seconds"])
    assert list(pool["seconds"]) == [2.0 * s for s in inline["seconds"]]
    result = CliRunner().invoke(app, ["scaling", "--preset", "quick", "--executor", "local", "--jobs", "2",
                                      "--set", f"executor.threads={threads}", "--list-units"])  # fmt: skip
    assert result.exit_code == 0 and "in the pool 2x a unit's time alone" in result.output
