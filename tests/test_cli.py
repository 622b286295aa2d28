"""End-to-end tests of the CLI on tiny convergence runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import ntkrun.rundir
import ntkrun.runners.common as runners
from ntkrun.cli import app

TINY = [
    "convergence", "--preset", "quick", "--set", "network.width=[8, 32]", "--seeds", "2", "--steps", "6",
    "--set", "grid.n_angles=16", "--set", "training.n_train=10", "--quiet",
]  # fmt: skip
CSVS = ["kernels.csv", "summary.csv", "metrics.csv", "losses.csv"]


def invoke(args: list[str], root: Path):
    return CliRunner().invoke(app, [*args, "--output-root", str(root)] if args[0] == "convergence" else args)


def run_dirs(root: Path) -> list[Path]:
    folder = root / "convergence"
    return sorted(p for p in folder.iterdir() if p.name != "latest") if folder.exists() else []


def test_tiny_run_writes_a_complete_run_directory(tmp_path):
    result = invoke(TINY, tmp_path)
    assert result.exit_code == 0, result.output
    (run,) = run_dirs(tmp_path)
    assert (tmp_path / "convergence" / "latest").resolve() == run.resolve()
    names = {p.name for p in run.iterdir()}
    assert {*CSVS, "figure.png", "figure.pdf", "spec.yaml", "meta.json", "run.log"} <= names
    assert "ERROR" not in names
    kernels = pd.read_csv(run / "kernels.csv")
    assert list(kernels.columns) == ["width", "seed", "step", "gamma", "theta"]
    assert len(kernels) == 2 * 2 * 2 * 16  # widths x seeds x recorded steps x angles
    summary = pd.read_csv(run / "summary.csv")
    assert list(summary.columns) == ["width", "step", "gamma", "mean", "std", "theta_inf"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert sorted(metrics["step"].unique()) == [0, 6]
    first = metrics[metrics["step"] == 0]
    assert (first["rel_change_from_first"] == 0).all()
    assert metrics.notna().all().all()
    losses = pd.read_csv(run / "losses.csv")
    assert len(losses) == 2 * 2 * 7  # loss before each of 6 steps and after the last
    assert str(run) in result.stdout.replace("\n", "")


def test_same_spec_same_seed_gives_byte_identical_csvs(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        assert invoke(TINY, root).exit_code == 0
    (a,), (b,) = run_dirs(tmp_path / "a"), run_dirs(tmp_path / "b")
    for name in [*CSVS, "spec.yaml"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_runs_of_one_spec_in_one_second_get_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(ntkrun.rundir, "_stamp", lambda t: "20260101T000000Z")  # the same second
    assert invoke(TINY, tmp_path).exit_code == 0
    assert invoke(TINY, tmp_path).exit_code == 0
    first, second = run_dirs(tmp_path)
    assert second.name == f"{first.name}-2" and first.name.startswith("20260101T000000Z_")
    assert (tmp_path / "convergence" / "latest").resolve() == second.resolve()  # the newest


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--set", "network.width=0"],
            "--set network.width=0: network.width.0: Input should be greater than 0",
        ),
        (["--width", "0"], "--width: network.width.0: Input should be greater than 0"),
        (["--set", "training.lr=0"], "training.lr: Input should be greater than 0"),
        (["--steps", "3", "--set", "training.record_steps=[5]"], "record_steps [5] are past steps = 3"),
        (["--set", "network.nonlinearity=swish"], "network.nonlinearity"),
        (["--preset", "nope"], "--preset nope: unknown preset"),
        (["--set", "training.n_train=-2"], "training.n_train"),
        (["--set", "bogus"], "--set bogus: expected KEY.PATH=VALUE"),
        (["--config", "/nonexistent/spec.yaml"], "/nonexistent/spec.yaml: cannot read"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, extra, expected):
    result = invoke([*TINY, *extra], tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith("ntkrun: error: ")
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "convergence").exists()


def test_malformed_yaml_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [lr: 1\n")
    result = invoke([*TINY, "--config", str(bad)], tmp_path / "out")
    assert result.exit_code == 2 and f"{bad}: line" in result.stderr
    assert not (tmp_path / "out").exists()


def test_divergence_names_the_unit_and_leaves_a_failed_directory(tmp_path):
    result = invoke([*TINY, "--set", "training.lr=1e6"], tmp_path)
    assert result.exit_code == 1
    assert "width 8, seed 0: training diverged at step" in result.stderr
    assert "Traceback" not in result.output
    (run,) = run_dirs(tmp_path)
    assert run.name.endswith(".failed") and "diverged" in (run / "ERROR").read_text()
    assert not (run / "meta.json").exists() and not (tmp_path / "convergence" / "latest").exists()


def test_interrupt_keeps_partial_files_in_a_failed_directory(tmp_path, monkeypatch):
    real_step, calls = runners.gd_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(runners, "gd_step", interrupted_step)
    result = invoke(TINY, tmp_path)
    assert result.exit_code == 130 and "interrupted; partial files kept in" in result.stderr
    (run,) = run_dirs(tmp_path)
    assert run.name.endswith(".failed")
    assert "interrupted" in (run / "ERROR").read_text()
    assert (run / "spec.yaml").exists() and (run / "run.log").exists()
    assert not (run / "metrics.csv").exists() and not (run / "meta.json").exists()
    assert not (tmp_path / "convergence" / "latest").exists()


def test_unwritable_output_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke(TINY, blocker)
    assert result.exit_code == 2 and f"cannot write the run directory under {blocker}" in result.stderr
    assert result.stderr.count("\n") == 1


def test_show_and_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nothing = CliRunner().invoke(app, ["show"])  # nothing run yet
    assert nothing.exit_code == 2
    expected = "no complete run under outputs/ (run an experiment first, or name a run directory)"
    assert nothing.stderr == f"ntkrun: error: {expected}\n"
    assert invoke(TINY, tmp_path / "outputs").exit_code == 0
    result = CliRunner().invoke(app, ["show"])
    assert result.exit_code == 0
    assert "status: complete" in result.stdout and "rel_dist_to_limit" in result.stdout
    (run,) = run_dirs(tmp_path / "outputs")
    named = CliRunner().invoke(app, ["show", str(run)])
    assert named.exit_code == 0 and f"run:    {run.resolve()}" in named.stdout
    assert "experiment convergence, spec " in named.stdout and "files: " in named.stdout
    missing = CliRunner().invoke(app, ["show", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and f"{tmp_path / 'nope'}: not a run directory" in missing.stderr
    presets = CliRunner().invoke(app, ["presets"])
    lines = presets.stdout.splitlines()
    assert lines[0].startswith("convergence     paper        Paper Figure 1")
    starts = {line.index(line.split()[2]) for line in lines}  # descriptions in one column
    assert len(starts) == 1 and any(line.startswith("generalization  cnn-gap ") for line in lines), lines
    features = next(line for line in lines if line.startswith("features        quick"))
    assert features.endswith("200 GD steps of lr 0.5 on 32 points.")  # the first sentence, whole


def test_a_preset_description_is_the_first_sentence_of_its_comment(tmp_path):
    from ntkrun.presets import preset_description

    path = tmp_path / "p.yaml"
    path.write_text("# Widths 2^6..2^13, depths\n# 2-4. More, e.g. here.\n#\n# Other.\nseeds: 1\n")
    assert preset_description(path) == "Widths 2^6..2^13, depths 2-4."


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ntkrun", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convergence" in result.stdout


def test_tables_print_whole_when_stdout_is_not_a_terminal():
    """Piped or logged (the batch-script case), a wide table is not cut to 80 columns mid-number."""
    import pandas as pd

    from ntkrun.cli.report import frame_table, out

    frame = pd.DataFrame({f"a_long_column_name_{i}": [-0.943218 * i] for i in range(10)})
    with out.capture() as captured:
        out.print(frame_table(frame, "wide"))
    text = captured.get()
    assert all(f"a_long_column_name_{i}" in text for i in range(10)) and "-8.489" in text
    assert "…" not in text


def test_version():
    from ntkrun.version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ntkrun {__version__}"


def test_show_refuses_a_folder_that_is_not_a_run_and_a_run_names_its_tables(tmp_path):
    from ntkrun.results import Run

    result = CliRunner().invoke(app, ["show", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory (no spec.yaml)" in result.output
    run = Run(tmp_path, {}, {}, {"metrics": None}, True)
    with pytest.raises(KeyError, match="'nope': this run has no such table; its tables: metrics"):
        run["nope"]


def test_help_lists_every_experiment_with_its_whole_first_sentence_and_completion_is_offered():
    """`ntkrun --help` names every experiment with its purpose, not cut at Click's 45 characters;
    `--show-completion bash` prints a bash completion script (Typer's own, through Click)."""
    from ntkrun.experiments import EXPERIMENTS

    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for record in EXPERIMENTS.values():
        first = record.help.split(". ")[0].rstrip(".")
        flat = " ".join(result.output.split())
        assert f"{record.name} {first}." in flat, record.name
    assert "..." not in result.output.split("Commands:")[1]
    script = Path(sys.executable).parent / "ntkrun"  # the installed command, as a user's shell runs it
    completion = subprocess.run([script, "--show-completion", "bash"], capture_output=True, text=True)
    assert completion.returncode == 0 and "_ntkrun_completion()" in completion.stdout, completion.stderr
