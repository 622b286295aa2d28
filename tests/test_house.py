"""The house rules: imports flow one way, math modules stay pure, errors map in one place, the
library face is lazy, and each experiment is one record."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import ntkrun
import ntkrun.runners.common
from ntkrun import experiments
from ntkrun.cli import app

PACKAGE = Path(ntkrun.__file__).parent
REPO = Path(__file__).resolve().parents[1]
MATH = ("kernels", "dynamics", "network", "nonlinearities", "fits", "resources")
TINY = [
    "convergence", "--preset", "quick", "--set", "network.width=[8]", "--seeds", "1", "--steps", "2",
    "--set", "grid.n_angles=8", "--set", "training.n_train=4", "--quiet",
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """ntkrun modules `path` imports, at module level or inside functions (not TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ntkrun")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ntkrun"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules or {node.module}  # `from pkg import module` imports the module
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) for name, path in files.items()}
    # the imports made by name at run time: the library face and the experiment records
    graph["ntkrun"] |= {module for module in ntkrun._FACE.values()}
    graph["ntkrun.experiments"] |= {record.module for record in experiments.EXPERIMENTS.values()}
    return graph


def test_no_import_cycle_in_ntkrun():
    graph = import_graph()
    assert "ntkrun.units" in graph["ntkrun.orchestrate"]  # the graph sees real edges
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_math_modules_never_print_touch_files_or_climb_up():
    upper = {"ntkrun.cli", "ntkrun.orchestrate", "ntkrun.rundir", "ntkrun.executors", "ntkrun.units"}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if not any(name == f"ntkrun.{m}" or name.startswith(f"ntkrun.{m}.") for m in MATH):
            continue
        tree = ast.parse(path.read_text())
        calls = {
            n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert not calls & {"print", "open"}, name
        climbed = {m for m in imports_of(path, set(import_graph())) if any(m.startswith(u) for u in upper)}
        assert not climbed, (name, climbed)


def test_files_and_cli_functions_stay_small():
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 450, path
    for path in (PACKAGE / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 80, (path, node.name)


def test_the_repository_does_not_point_outside_itself():
    for path in [REPO / "README.md", *REPO.joinpath("docs").rglob("*.md"), *PACKAGE.rglob("*.py")]:
        text = path.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, path


def test_one_record_per_experiment_makes_its_command():
    for name, record in experiments.EXPERIMENTS.items():
        assert record.model.model_fields["experiment"].default == name
        assert set(record.presets) >= {"quick"}
        help_text = CliRunner().invoke(app, [name, "--help"]).stdout
        for flag in record.all_flags:
            assert flag.name in help_text, (name, flag.name)
    resume_help = CliRunner().invoke(app, ["resume", "--help"]).stdout
    assert "--executor" in resume_help and "--width" not in resume_help


def test_import_ntkrun_is_light_and_its_face_loads_on_use():
    code = (
        "import sys, ntkrun; light = 'torch' not in sys.modules; "
        "net = ntkrun.MLP(2, 8, 3, 'relu', 0.1, seed=0); "
        "print(light, type(net).__name__, callable(ntkrun.empirical_ntk), callable(ntkrun.load_run))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "MLP", "True", "True"]
    with pytest.raises(AttributeError):
        ntkrun.not_a_name  # noqa: B018


def test_load_run_reads_spec_meta_and_tables(tmp_path):
    assert CliRunner().invoke(app, [*TINY, "--output-root", str(tmp_path)]).exit_code == 0
    run = ntkrun.load_run(tmp_path / "convergence" / "latest")
    assert run.complete and run.spec["experiment"] == run.meta["experiment"] == "convergence"
    assert set(run.tables) == {"kernels", "losses", "summary", "metrics"}
    pd.testing.assert_frame_equal(run["metrics.csv"], pd.read_csv(run.path / "metrics.csv"))


def test_a_bug_is_reported_as_one_and_its_traceback_kept(tmp_path, monkeypatch):
    """An unexpected exception (here a ValueError from deep inside training) is not dressed up as
    a spec error: exit 1, its type and message, and where the full traceback was written."""

    def broken(*args, **kwargs):
        raise ValueError("boom inside numpy")

    monkeypatch.setattr(ntkrun.runners.common, "gd_step", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("NTKRUN_DEBUG", raising=False)
    result = CliRunner().invoke(app, [*TINY, "--output-root", str(tmp_path / "out")])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "internal error" in line and "ValueError: boom inside numpy" in line
    kept = Path(line.split("traceback in ")[1].split(";")[0])
    assert kept.parent == tmp_path and "Traceback (most recent call last)" in kept.read_text()
    (failed,) = (tmp_path / "out" / "convergence").glob("*.failed")  # the run is marked failed
    assert "boom inside numpy" in (failed / "ERROR").read_text()
    monkeypatch.setenv("NTKRUN_DEBUG", "1")
    debug = CliRunner().invoke(app, [*TINY, "--output-root", str(tmp_path / "out2")])
    assert debug.exit_code == 1 and "Traceback (most recent call last)" in debug.stderr


def test_list_units_gives_gflop_and_time(tmp_path):
    result = CliRunner().invoke(app, ["scaling", "--preset", "quick", "--list-units"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "GFLOP/s" in lines[0] and lines[-1].startswith("total: ")
    first = lines[1].split()
    assert first[0] == "0" and first[3] == "GFLOP" and first[4].startswith("~")
    assert float(first[2]) > 0


def test_entry_point_runs_as_a_program(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ntkrun", *TINY, "--output-root", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "run directory:" in out.stdout, out.stderr


def test_the_spec_names_every_registered_nonlinearity():
    from ntkrun.nonlinearities import NONLINEARITIES
    from ntkrun.spec import NONLINEARITY_NAMES

    assert tuple(NONLINEARITIES) == NONLINEARITY_NAMES


def test_the_spec_names_every_architecture_and_its_keys():
    from ntkrun.architectures.cnn import PADDINGS, READOUTS
    from ntkrun.architectures.registry import ARCHITECTURES, OWN_KEYS
    from ntkrun.kernels import ARCHS
    from ntkrun.spec import ARCH_NAMES, CNN_KEYS, PADDING_NAMES, READOUT_NAMES, NetworkSpec

    assert tuple(ARCHITECTURES) == ARCH_NAMES == ARCHS and set(OWN_KEYS) == set(ARCH_NAMES)
    assert PADDINGS == PADDING_NAMES and READOUTS == READOUT_NAMES
    assert OWN_KEYS["cnn"] == tuple(CNN_KEYS)
    assert {key: NetworkSpec.model_fields[key].default for key in CNN_KEYS} == CNN_KEYS


def test_help_does_not_load_torch():
    """`ntkrun --help` and a command's --help answer without importing torch (seconds saved)."""
    code = (
        "import sys; from typer.testing import CliRunner; from ntkrun.cli import app; "
        "r = CliRunner().invoke(app, ['convergence', '--help']); print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_every_experiment_has_a_runner_record_of_its_own():
    """Each runner module ends with its RUNNER record (ntkrun.runners.contract), checked when the
    module is imported; the record runs the experiment it is registered as, with a results version
    (docs/architecture.md, "Run identity")."""
    from ntkrun.experiments import EXPERIMENTS
    from ntkrun.runners.contract import Runner

    for name, record in EXPERIMENTS.items():
        runner = record.runner
        assert isinstance(runner, Runner) and runner.experiment == name
        assert runner.results_version >= 1 and set(runner.archs) <= {"mlp", "cnn"}


def test_a_runner_record_that_breaks_the_contract_is_refused_when_it_is_made():
    """A typo in archs, a function of the wrong arity or a spec of no experiment: a TypeError naming
    the runner at import, not a silent default at run time (archs once defaulted to the MLP)."""
    from dataclasses import replace

    import ntkrun.runners.convergence as convergence

    good = convergence.RUNNER
    with pytest.raises(TypeError, match="runner 'convergence': archs: unknown architecture 'cn'"):
        replace(good, archs=("mlp", "cn"))
    with pytest.raises(TypeError, match=r"runner 'convergence': memory\(spec\) does not take 2 positional"):
        replace(good, memory=lambda spec: 0)
    with pytest.raises(TypeError, match="runner 'convergence': check is not a function"):
        replace(good, check=None)
    with pytest.raises(TypeError, match="results_version must be an int >= 1"):
        replace(good, results_version=0)
    with pytest.raises(TypeError, match="Spec must be a RunSpec model"):
        replace(good, Spec=dict)


def test_a_clone_named_ntkrun_beside_a_script_does_not_shadow_the_package(tmp_path):
    """The README clones into ntkrun/: a script in the folder that holds the clone imports the
    installed package, not the clone as a namespace package (`cannot import name 'MLP'` before the
    src/ layout, whose editable install put a finder behind the script's own folder)."""
    clone = tmp_path / "ntkrun"
    (clone / "src" / "ntkrun").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    (tmp_path / "script.py").write_text("from ntkrun import MLP\nprint(type(MLP(2, 8, 2)).__name__)\n")
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "MLP", out.stderr
