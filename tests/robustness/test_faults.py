"""Faults: signals at random points, interrupts inside a file write and inside aggregation, a
full disk, an unusable output root. Nothing under a final name is ever partial, finished units
survive, and `ntkrun resume` ends with the CSVs of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

import ntkrun.plots
from ntkrun.cli import app
from ntkrun.errors import Terminated

sys.path.insert(0, str(Path(__file__).parents[1]))
from faults import launch

COUNTS: Counter[str] = Counter()
# 8 units of ~0.2-0.5 s each: a run lasts a few seconds, so random signals land in start-up,
# training, unit writes, aggregation and the final rename.
SPEC = [
    "convergence", "--preset", "quick", "--set", "network.width=[16, 256]", "--seeds", "4",
    "--steps", "300", "--set", "grid.n_angles=32", "--set", "training.n_train=16", "--quiet",
]  # fmt: skip
CSVS = ["kernels.csv", "losses.csv", "summary.csv", "metrics.csv"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def check_final_files(root: Path, reference: Path | None = None) -> None:
    """Every file under its final name (not .-hidden, not .tmp) is whole; a CSV is byte for byte
    the one an uninterrupted run of the same spec wrote (a CSV cut short would still parse)."""
    for path in root.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or path.name.endswith(".tmp"):
            continue
        data = path.read_bytes()
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".csv":
            assert len(pd.read_csv(path).columns) > 0, path
            if reference is not None:
                assert data == (reference / path.name).read_bytes(), path
        elif path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(data), dict), path
        elif path.suffix == ".png":
            assert data.endswith(b"IEND\xaeB`\x82"), path
        elif path.suffix == ".pdf":
            assert data.rstrip().endswith(b"%%EOF"), path
        elif path.name == "ERROR":
            assert data.strip(), path


def unit_results(root: Path) -> dict[str, object]:
    found = {}
    for path in root.rglob("units/*.pt"):
        if not path.name.endswith(".ckpt.pt"):
            found[path.name] = torch.load(path, weights_only=True)["result"]
    return found


def leftover(root: Path) -> Path | None:
    """The interrupted run directory to resume (.failed, or .partial after SIGKILL), if any."""
    folder = root / "convergence"
    if not folder.exists():
        return None
    found = [p for p in folder.iterdir() if p.name.endswith((".failed", ".partial"))]
    assert len(found) <= 1, found
    return found[0] if found else None


def complete(root: Path) -> Path | None:
    folder = root / "convergence"
    if not folder.exists():
        return None
    done = [
        p
        for p in folder.iterdir()
        if (p / "meta.json").is_file() and not p.name.endswith((".failed", ".partial"))
    ]
    return done[0] if done else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    result = invoke(*SPEC, "--output-root", root)
    assert result.exit_code == 0, result.output
    return complete(root)


# (point, n, action): in this order, each on the run the previous one left (see tests/faults.py).
# Together they stop a run at start-up, in training, inside and after unit writes, in aggregation
# and after completion; the number of faults is fixed, whatever the machine's speed.
EVENTS = [
    ("import", 1, "SIGINT"),  # while the CLI loads, before any run directory exists
    ("import", 2, "SIGTERM"),  # while torch loads for the command (held: C++ import code)
    ("gd-step", 10, "SIGINT"),  # training the first unit
    ("unit-write", 1, "SIGTERM"),  # a unit's temporary file written, not yet renamed
    ("unit-saved", 2, "SIGKILL"),  # two units done, then killed outright: a .partial stays
    ("gd-step", 400, "SIGTERM"),  # in the second unit of this attempt
    ("unit-write", 2, "SIGKILL"),  # a temporary unit file left behind by a kill
    ("aggregate", 1, "SIGINT"),  # CSVs written, the figure not: no meta.json
    ("finalize", 1, "SIGTERM"),  # meta.json written: held until the run is complete
]
EXIT = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}
REASON = {"SIGINT": "interrupted", "SIGTERM": "terminated (SIGTERM)"}


def test_signals_at_chosen_points_never_lose_work(reference, tmp_path):
    """SIGINT, SIGTERM and SIGKILL delivered at chosen points of a run and of its resumes: after
    each, no partial file under a final name, every finished unit still there with the same
    result, the exit code of the signal and an ERROR naming it; the last resume completes with
    the CSVs of an uninterrupted run."""
    root = tmp_path / "runs"
    seen: dict[str, object] = {}
    for k, (point, n, action) in enumerate(EVENTS):
        target = leftover(root)
        args = ["resume", str(target), "--quiet"] if target else [*SPEC, "--output-root", str(root)]
        marker = tmp_path / f"fault{k}"
        proc = launch(point, n, action, marker, args)
        _, err = proc.communicate(timeout=300)
        assert marker.exists(), f"fault {k} ({point} {n}) never happened: {err}"
        COUNTS[f"{point} {action}"] += 1
        assert proc.returncode == EXIT[action], (point, proc.returncode, err)
        assert "Traceback" not in err, err
        check_final_files(root, reference)
        now = unit_results(root)
        for name, result in seen.items():
            assert now.get(name) == result, f"unit {name} lost or changed by {point} {action}"
        seen = now
        if action != "SIGKILL":
            assert REASON[action] in err, err
        if point == "import":
            assert not root.exists()  # stopped before anything was written
        elif point == "finalize":
            assert complete(root) is not None and leftover(root) is None
            assert "after the run completed" in err
        elif action == "SIGKILL":
            assert leftover(root).name.endswith(".partial")
        else:
            assert leftover(root).name.endswith(".failed") and complete(root) is None
            assert REASON[action] in (leftover(root) / "ERROR").read_text()
            assert f"ntkrun resume {leftover(root)}" in err
    final = complete(root)
    assert final is not None and (root / "convergence" / "latest").resolve() == final.resolve()
    assert len(seen) == 8
    for name in CSVS:
        assert (final / name).read_bytes() == (reference / name).read_bytes(), name


def interrupted_write(original, when: dict, exc: BaseException):
    """Wrap a writer: the `when['n']`-th call writes half its bytes, then raises `exc`."""

    def writer(obj, target, *args, **kwargs):
        when["calls"] += 1
        if when["calls"] != when["n"]:
            return original(obj, target, *args, **kwargs)
        original(obj, target, *args, **kwargs)
        data = Path(target).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])  # the write got half-way
        raise exc

    return writer


@pytest.mark.parametrize(
    ("n", "exc", "code"),
    [
        (1, KeyboardInterrupt(), 130),
        (3, KeyboardInterrupt(), 130),
        (5, Terminated(), 143),
        (2, OSError(errno.ENOSPC, "No space left on device"), 1),
        (6, OSError(errno.ENOSPC, "No space left on device"), 1),
    ],
)
def test_fault_inside_a_unit_write(n, exc, code, reference, tmp_path, monkeypatch):
    """The n-th unit result write is cut half-way by Ctrl-C / SIGTERM / a full disk."""
    monkeypatch.setattr(torch, "save", interrupted_write(torch.save, {"n": n, "calls": 0}, exc))
    result = invoke(*SPEC, "--output-root", tmp_path)
    monkeypatch.undo()
    COUNTS[f"unit write {type(exc).__name__}"] += 1
    assert result.exit_code == code, result.output
    if isinstance(exc, OSError):
        assert "No space left on device" in result.stderr
    run = leftover(tmp_path)
    assert run is not None and run.name.endswith(".failed") and not (run / "meta.json").exists()
    check_final_files(tmp_path, reference)
    assert not list(run.rglob("*.tmp")), "temporary file left behind"
    assert len(unit_results(tmp_path)) == n - 1  # the units before the fault survive
    resumed = invoke("resume", run, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    for name in CSVS:
        assert (complete(tmp_path) / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_fault_during_aggregation(exc, reference, tmp_path, monkeypatch):
    """The figure (written after the CSVs, before meta.json) fails: the run is not complete."""

    def broken_save(fig, stem):
        raise exc

    monkeypatch.setattr(ntkrun.plots, "_save", broken_save)
    result = invoke(*SPEC, "--output-root", tmp_path)
    monkeypatch.undo()
    COUNTS[f"aggregation {type(exc).__name__}"] += 1
    if isinstance(exc, OSError):
        assert result.exit_code == 1 and "No space left on device" in result.stderr, result.output
    else:
        assert result.exit_code == 130 and "interrupted" in result.stderr, result.output
    run = leftover(tmp_path)
    assert run is not None and not (run / "meta.json").exists() and (run / "ERROR").is_file()
    assert not (tmp_path / "convergence" / "latest").exists()
    check_final_files(tmp_path, reference)
    assert len(unit_results(tmp_path)) == 8  # all units survive; only aggregation is redone
    assert invoke("resume", run, "--quiet").exit_code == 0
    for name in CSVS:
        assert (complete(tmp_path) / name).read_bytes() == (reference / name).read_bytes(), name


def test_csv_write_hits_a_full_disk(reference, tmp_path, monkeypatch):
    original = pd.DataFrame.to_csv
    state = {"n": 2, "calls": 0}
    monkeypatch.setattr(
        pd.DataFrame,
        "to_csv",
        interrupted_write(original, state, OSError(errno.ENOSPC, "No space left on device")),
    )
    result = invoke(*SPEC, "--output-root", tmp_path)
    monkeypatch.undo()
    COUNTS["csv write ENOSPC"] += 1
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert "partial files kept in" in result.stderr and "Traceback" not in result.output
    check_final_files(tmp_path, reference)  # the CSV cut half-way is not under its final name
    run = leftover(tmp_path)
    assert run is not None and not (run / "meta.json").exists()
    assert not list(run.rglob("*.tmp")), "temporary file left behind"
    assert invoke("resume", run, "--quiet").exit_code == 0  # space is back: the run completes
    for name in CSVS:
        assert (complete(tmp_path) / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("root", ["file", "/proc/ntkrun-unwritable"])
def test_unusable_output_root(root, tmp_path):
    if root == "file":
        (tmp_path / "file").write_text("x")
        root = str(tmp_path / "file")
    result = invoke(*SPEC, "--output-root", root)
    assert result.exit_code == 2 and "cannot write the run directory under" in result.stderr
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1


def test_two_processes_in_the_same_second_get_distinct_directories(tmp_path):
    """Four ntkrun processes with one spec, started together: four complete runs, distinct
    names, `latest` pointing at one of them (swapped atomically: never dangling)."""
    tiny = [*SPEC[:3], "--set", "network.width=[8]", "--seeds", "1", "--steps", "2", "--quiet"]
    args = [*tiny, "--output-root", str(tmp_path)]
    stamp = "20260101T000000Z"  # every process names its run as if it started in this second
    procs = [launch("gd-step", 1, "NONE", tmp_path / "none", args, stamp=stamp) for _ in range(4)]
    printed = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        printed.append(out.split("run directory:")[-1].strip())
    assert len(set(printed)) == 4  # each process reports its own directory
    runs = sorted(p for p in (tmp_path / "convergence").iterdir() if p.name != "latest")
    assert len(runs) == 4 and all((p / "meta.json").is_file() for p in runs)
    assert {str(p) for p in runs} == set(printed)
    assert (tmp_path / "convergence" / "latest").resolve() in {p.resolve() for p in runs}
    assert not list((tmp_path / "convergence").glob(".latest.*"))
    base = f"{stamp}_{runs[0].name.split('_')[1].split('-')[0]}"
    assert sorted(p.name for p in runs) == sorted([base, f"{base}-2", f"{base}-3", f"{base}-4"])
    COUNTS["same-second starts"] += 4


def test_a_run_still_running_is_not_resumed_from_under_it(reference, tmp_path):
    """`ntkrun resume` / `aggregate` of a run another live process is running are refused (its
    RUNNING lock); once that process is killed outright, resume takes the run over. The process
    is held inside its 5th GD step until the test has tried everything."""
    marker = tmp_path / "held"
    proc = launch("gd-step", 5, "HOLD", marker, [*SPEC, "--output-root", str(tmp_path)])
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    running = leftover(tmp_path)
    assert (running / "RUNNING").exists()
    for command in ("resume", "aggregate"):
        refused = invoke(command, running, "--quiet")
        assert refused.exit_code == 1, refused.stderr
        assert f"still being run by {platform.node()} {proc.pid}" in refused.stderr
        assert running.exists()  # not moved away from the process
    assert f"being run by {platform.node()} {proc.pid}" in invoke("status", running).stdout
    assert proc.poll() is None  # still held: every refusal above was against a live run
    proc.kill()
    proc.communicate()
    COUNTS["resume refused while running"] += 2
    resumed = invoke("resume", leftover(tmp_path), "--quiet")
    assert resumed.exit_code == 0, resumed.output
    for name in CSVS:
        assert (complete(tmp_path) / name).read_bytes() == (reference / name).read_bytes(), name
