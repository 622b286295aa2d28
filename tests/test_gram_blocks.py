"""Past one machine: Gram blocks as units (kernels.rows_per_unit) give the one-unit run's bytes inline,
in a pool, one process per unit and after a kill; a block file that is missing, truncated, corrupt
or of another run is computed again, never read. kernels.solver cg gives the Cholesky's predictions."""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from faults import launch
from test_data import write_split
from typer.testing import CliRunner

from ntkrun.cli import app


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """120 training and 2100 test images: more than two 1000-row test blocks."""
    folder = tmp_path_factory.mktemp("blocks") / "data"
    folder.mkdir()
    write_split(folder, n=120, split="train")
    write_split(folder, n=2100, split="t10k")
    return folder


MLP = ["predictors=[ntk, nngp]", "data.n_train=[50, 100]", "data.n_test=2100"]
CNN = [
    "network.arch=cnn",
    "network.depth=2",
    "predictors=[ntk, nngp]",
    "data.n_train=[70]",
    "data.n_test=1500",
]
BLOCKS = ["kernels.rows_per_unit=32"]


def args(data: Path, sets: list[str], *extra: str | Path) -> list[str]:
    return ["generalization", "--preset", "quick", "--data-dir", str(data), "--quiet",
            *[a for s in ["device=cpu", *sets] for a in ("--set", s)], *map(str, extra)]  # fmt: skip


def invoke(*argv: str | Path):
    return CliRunner().invoke(app, [str(a) for a in argv])


@pytest.fixture(scope="module")
def one_unit(data, tmp_path_factory) -> dict[str, Path]:
    """Each spec run the ordinary way (a unit per fit), inline."""
    runs = {}
    for name, sets in (("mlp", MLP), ("cnn", CNN)):
        out = tmp_path_factory.mktemp(f"whole-{name}")
        result = invoke(*args(data, sets, "-o", out))
        assert result.exit_code == 0, result.output
        runs[name] = out / "generalization" / "latest"
    return runs


def same_csvs(a: Path, b: Path) -> None:
    for name in ("accuracy.csv", "distance.csv", "fits.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_blocks_are_units_listed_with_their_cost(data):
    """Training blocks of 32 rows where a Gram has more; test blocks of whole 1000s; each fit after."""
    listing = invoke(*args(data, [*MLP, *BLOCKS], "--list-units"))
    assert listing.exit_code == 0, listing.output
    assert listing.stdout.startswith("28 units")
    names = [line.split()[1] for line in listing.stdout.splitlines()[1:-1]]
    assert names[:5] == [
        "ntk_n50_rows0",
        "ntk_n50_rows32",
        "ntk_n50_test0",
        "ntk_n50_test1000",
        "ntk_n50_test2000",
    ]
    assert names[-4:] == ["ntk_n50", "ntk_n100", "nngp_n50", "nngp_n100"]  # stage 1: after every block
    block = next(line for line in listing.stdout.splitlines() if " ntk_n100_test0 " in line)
    assert "GFLOP" in block and "stage 0" in block


@pytest.mark.parametrize(("name", "sets", "executor"), [
    ("mlp", MLP, ()), ("cnn", CNN, ()), ("cnn", CNN, ("--executor", "local", "--jobs", "2")),
])  # fmt: skip
def test_a_block_unit_run_gives_the_one_unit_runs_bytes(data, one_unit, tmp_path, name, sets, executor):
    """Same tiles, same test chunks, same solve: the CSVs equal byte for byte, and every block's
    file goes once its fit is saved."""
    result = invoke(*args(data, [*sets, *BLOCKS], "-o", tmp_path, *executor))
    assert result.exit_code == 0, result.output
    run = tmp_path / "generalization" / "latest"
    same_csvs(run, one_unit[name])
    assert not list((run / "units").glob("*.ckpt*"))
    if not executor:  # (a pool's workers log to units/<name>.log)
        log = (run / "run.log").read_text()
        assert "Gram rows 32-64 from their checkpoint" in log and "test rows 1000-" in log


def test_one_process_per_unit_fit_first_computes_its_blocks_as_units(data, one_unit, tmp_path):
    """A fit run alone before its blocks (an array task that started early) computes them first, as
    units (saved, so not computed again), then the blocks' own invocations find them done."""
    shared = tmp_path / "run"
    listing = invoke(*args(data, [*CNN, *BLOCKS], "--list-units"))
    n = int(listing.stdout.split()[0])
    for index in (1, 3):
        assert invoke(*args(data, [*CNN, *BLOCKS], "--unit", index, "--run-dir", shared)).exit_code == 0
    status = invoke("status", shared)
    assert "6 units: 4 not started, 2 done; run not aggregated" in status.stdout, status.stdout
    assert "Gram blocks (kernels.rows_per_unit): 2 of 5 done" in status.stdout
    for index in reversed(range(n)):
        result = invoke(*args(data, [*CNN, *BLOCKS], "--unit", index, "--run-dir", shared))
        assert result.exit_code == 0, result.output
    same_csvs(shared, one_unit["cnn"])
    assert not list((shared / "units").glob("*.ckpt*"))  # no block written after its fit


def test_a_killed_block_run_resumes_to_the_same_bytes(data, one_unit, tmp_path):
    """SIGKILL just after the second block is saved; resume computes the rest."""
    argv = args(data, [*MLP, *BLOCKS], "-o", tmp_path / "killed")
    proc = launch("checkpoint", 2, "SIGKILL", tmp_path / "killed.marker", argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    (partial,) = (tmp_path / "killed" / "generalization").glob(".*.partial")
    assert len(list((partial / "units").glob("*.ckpt.*"))) == 2
    result = invoke("resume", partial, "--quiet")
    assert result.exit_code == 0, result.output
    same_csvs(tmp_path / "killed" / "generalization" / "latest", one_unit["mlp"])


def test_a_damaged_or_foreign_block_file_is_computed_again_never_read(data, one_unit, tmp_path, caplog):
    """Every block unit run (their parts saved), then four parts damaged: one truncated, one with
    a flipped byte (its CRC-32 differs), one deleted, one replaced by the same part of a run of
    another ridge. The fit computes those four itself and gives the one-unit run's bytes."""
    sets = [*CNN, *BLOCKS]
    shared, other = tmp_path / "run", tmp_path / "other"
    names = ["ntk+nngp_n70_rows0", "ntk+nngp_n70_rows32", "ntk+nngp_n70_rows64", "ntk+nngp_n70_test0",
             "ntk+nngp_n70_test1000"]  # fmt: skip
    for name in names:
        assert invoke(*args(data, sets, "--unit", name, "--run-dir", shared)).exit_code == 0
    foreign = [*sets, "kernels.nngp_noise=1e-4"]
    assert invoke(*args(data, foreign, "--unit", names[2], "--run-dir", other)).exit_code == 0
    parts = shared / "units"
    rows0, rows32, rows64 = (parts / f"ntk+nngp_n70.ckpt.rows{r}.pt" for r in (0, 32, 64))
    rows0.write_bytes(rows0.read_bytes()[: rows0.stat().st_size // 2])
    blob = torch.load(rows32, weights_only=True)
    blob["state"]["ntk"][3, 5] += 1e-9  # what a bad disk would do: the saved checksum no longer holds
    torch.save(blob, rows32)
    shutil.copy(other / "units" / rows64.name, rows64)
    (parts / "ntk+nngp_n70.ckpt.test1000.pt").unlink()
    caplog.set_level(logging.INFO, logger="ntkrun")
    result = invoke(*args(data, sets, "--unit", "ntk+nngp_n70", "--run-dir", shared))
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(rows0.name in w and "unreadable" in w for w in warned)
    assert any(rows32.name in w and "has 'ntk' of another checksum (corrupt)" in w for w in warned)
    assert any(rows64.name in w and "belongs to spec" in w for w in warned)
    read = [r.getMessage() for r in caplog.records if "from their" in r.getMessage()]
    assert read == ["ntk+nngp_n70: test rows 0-1000 from their block"]  # the one part left whole
    same_csvs(shared, one_unit["cnn"])


@pytest.mark.parametrize(("sets", "message"), [
    (["kernels.rows_per_unit=0"], "kernels.rows_per_unit: Input should be greater than 0 (got 0)"),
    (["kernels.rows_per_unit=-3"], "kernels.rows_per_unit: Input should be greater than 0"),
    (["kernels.solver=cg", "kernels.precond_rank=60"],
     "kernels.precond_rank: 60 is more than the 50 training points of the smallest data.n_train"),
    (["kernels.tol=0"], "kernels.tol: Input should be greater than 0"),
    (["kernels.tol=1"], "kernels.tol: Input should be less than 1"),
    (["kernels.rows_per_unit=32", "network.module=models:residual_mlp", "network.width=[16]"],
     "kernels.rows_per_unit: a network.module's Monte-Carlo kernels are spread as shares"),
])  # fmt: skip
def test_bad_block_settings_are_one_line_at_check(data, tmp_path, sets, message, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    result = invoke(*args(data, [*MLP, *sets], "--check", "-o", tmp_path))
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "generalization").exists()


@pytest.mark.parametrize("blocks", [[], BLOCKS])  # the Gram assembled, or out of core: its strips
def test_cg_gives_the_cholesky_predictions_and_records_its_solve(data, one_unit, tmp_path, blocks):
    """kernels.solver cg on the float64 Grams at tol 1e-10: accuracy.csv records the solver, its
    iterations and its residual (<= tol); the predictions are the Cholesky's: the same accuracy and
    a test MSE within 1e-6 (alpha's error is at most cond x tol, cond ~1e4 here). With block units
    CG multiplies the saved strips, memory-mapped, and the fit's memory estimate holds no Gram."""
    sets = [*MLP, *blocks, "kernels.solver=cg", "kernels.precond_rank=40", "kernels.tol=1e-10"]
    result = invoke(*args(data, sets, "-o", tmp_path))
    assert result.exit_code == 0, result.output
    cg = pd.read_csv(tmp_path / "generalization" / "latest" / "accuracy.csv")
    chol = pd.read_csv(one_unit["mlp"] / "accuracy.csv")
    assert (cg["solver"] == "cg").all() and (chol["solver"] == "cholesky").all()
    assert (cg["iterations"] > 0).all() and (cg["residual"] <= 1e-10).all()
    assert chol["iterations"].isna().all() and chol["residual"].isna().all()
    assert cg["test_accuracy"].tolist() == chol["test_accuracy"].tolist()
    assert np.allclose(cg["test_mse"], chol["test_mse"], rtol=1e-6, atol=0)
    nngp = cg["predictor"] == "nngp"  # its noise; the NTK's ridge 0 is floored at 1e-10 of its mean diagonal
    assert np.allclose(cg["ridge"][nngp], chol["ridge"][nngp], rtol=1e-12, atol=0)
    assert (cg["ridge"][~nngp] > 0).all() and (chol["ridge"][~nngp] == 0).all()
    log = (tmp_path / "generalization" / "latest" / "run.log").read_text()
    assert ("ntk_n100: the Gram out of core: 4 row strips of 32 rows, memory-mapped" in log) == bool(blocks)
    if blocks:  # the fit's memory estimate: the assembled one's, less the 100-point float64 Gram, plus
        # one 32-row strip, which the fit computes itself where its block unit's part is bad
        from ntkrun import orchestrate, units
        from ntkrun.runners.generalization import block_bytes
        from ntkrun.work import GramBlock

        def fit_bytes(extra: list[str]) -> tuple[object, int]:
            request = orchestrate.Request("generalization", preset="quick", sets=[f"data.dir={data}", *extra])
            plan = orchestrate.plan(request, checks=False)
            fit = next(u for u in plan.units if u.name == "ntk_n100")
            return plan.spec, units.memory_estimate(plan.spec, fit)

        spec, out_of_core = fit_bytes(sets)
        strip = block_bytes(spec, GramBlock(("ntk",), 100, False, 0, 32), 2100)
        assembled = fit_bytes([s for s in sets if s not in BLOCKS])[1]
        assert out_of_core == assembled - 100 * 100 * 8 + strip


def test_a_cg_solve_that_does_not_converge_fails_the_run_and_keeps_its_blocks(data, tmp_path):
    sets = [*MLP, *BLOCKS, "kernels.solver=cg", "kernels.precond_rank=2", "kernels.tol=1e-12",
            "kernels.max_iter=2", "predictors=[ntk]"]  # fmt: skip
    result = invoke(*args(data, sets, "-o", tmp_path))
    assert result.exit_code != 0
    assert "conjugate gradients did not converge: relative residual" in result.output
    assert (
        "raise kernels.precond_rank, kernels.max_iter or kernels.ridge, or use kernels.solver: cholesky"
        in result.output
    )
    (failed,) = (tmp_path / "generalization").glob("*.failed")
    assert not (failed / "meta.json").exists()
    assert (failed / "units" / "ntk_n50.ckpt.rows32.pt").is_file()  # the blocks are kept for a retry
    assert (failed / "units" / "ntk_n50.failed").read_text().startswith("NumericalError: conjugate gradients")


def test_auto_is_the_cholesky_below_the_measured_crossover_and_cg_from_it():
    from ntkrun.runners.generalization_fits import AUTO_CG_POINTS, solver_of
    from ntkrun.runners.generalization_spec import GenSpec

    auto = GenSpec(kernels={"solver": "auto"})
    assert AUTO_CG_POINTS == 10**6  # docs/science.md §5.7: extrapolated from the measured ratios
    assert solver_of(auto, 60000) == "cholesky" and solver_of(auto, 10**6) == "cg"
    assert solver_of(GenSpec(kernels={"solver": "cg"}), 100) == "cg"


def test_test_blocks_follow_the_test_split_when_n_test_is_the_whole_split(data):
    """data.n_test null: the test blocks cover the split's 2100 images (not an assumed 10000)."""
    sets = ["predictors=[ntk]", "data.n_train=[50]", "data.n_test=null", *BLOCKS]
    listing = invoke(*args(data, sets, "--list-units"))
    assert listing.exit_code == 0, listing.output
    names = [line.split()[1] for line in listing.stdout.splitlines()[1:-1]]
    assert [n for n in names if "_test" in n] == ["ntk_n50_test0", "ntk_n50_test1000", "ntk_n50_test2000"]


def test_an_unreadable_fit_file_is_no_fit_done_and_its_missing_strip_is_saved(data, tmp_path):
    """The out-of-core CG fit finds a strip missing and its own unit file corrupt: a corrupt file is
    no unit done, so the strip it computes is saved (and read back memory-mapped), not dropped."""
    sets = ["predictors=[ntk]", "data.n_train=[100]", "data.n_test=40", *BLOCKS, "kernels.solver=cg",
            "kernels.precond_rank=40"]  # fmt: skip
    shared = tmp_path / "run"
    for r0 in (0, 32, 64, 96):
        assert invoke(*args(data, sets, "--unit", f"ntk_n100_rows{r0}", "--run-dir", shared)).exit_code == 0
    (shared / "units" / "ntk_n100.ckpt.rows32.pt").unlink()
    (shared / "units" / "ntk_n100.pt").write_bytes(b"\x00garbage")
    result = invoke(*args(data, sets, "--unit", "ntk_n100", "--run-dir", shared))
    assert result.exit_code == 0, result.output
    assert (shared / "accuracy.csv").is_file() and not list((shared / "units").glob("*.ckpt*"))


def test_a_pool_starts_a_fit_once_its_own_blocks_are_done(data, tmp_path, monkeypatch):
    """No stage barrier: while the larger fit's last block is held, a free worker starts the smaller
    fit, whose blocks are all done (with a barrier it would wait for that block: the gate times out)."""
    from faults import unit_main_gated

    import ntkrun.executors.local

    events = tmp_path / "events"
    monkeypatch.setenv("EVENTS_FILE", str(events))
    monkeypatch.setenv("GATE_UNIT", "ntk_n100_rows96")
    monkeypatch.setenv("GATE_OPEN", "start ntk_n50")
    monkeypatch.setattr(ntkrun.executors.local, "unit_main", unit_main_gated)
    sets = ["predictors=[ntk]", "data.n_train=[50, 100]", "data.n_test=40", *BLOCKS]
    result = invoke(*args(data, sets, "-o", tmp_path / "out", "--executor", "local", "--jobs", "2"))
    assert result.exit_code == 0, result.output
    lines = events.read_text().splitlines()
    assert "gate timed out" not in lines, lines
    assert lines.index("start ntk_n50") < lines.index("end ntk_n100_rows96"), lines
    assert lines.index("start ntk_n100") > lines.index("end ntk_n100_rows96"), lines  # its own block
