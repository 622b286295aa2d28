from __future__ import annotations

import json

import pandas as pd
import pytest

from ntkrun.rundir import RunDir, is_complete, latest_run, open_run
from ntkrun.runners.convergence import ConvergenceSpec


def test_a_run_is_hidden_until_finalized(tmp_path):
    spec = ConvergenceSpec()
    run = RunDir.create(tmp_path, spec)
    assert run.path.name.startswith(".") and run.path.name.endswith(".partial")
    run.write_csv("x.csv", pd.DataFrame({"a": [1]}))
    assert latest_run(tmp_path) is None
    final = run.finalize("cpu")
    assert not final.name.startswith(".") and is_complete(final)
    assert (tmp_path / "convergence" / "latest").resolve() == final
    assert latest_run(tmp_path) == final
    meta = json.loads((final / "meta.json").read_text())
    assert meta["device"] == "cpu" and meta["seeds"] == list(range(10)) and meta["wall_time_s"] >= 0
    assert (final / "spec.yaml").read_text().startswith("experiment: convergence")


def test_failure_is_recorded_and_reraised(tmp_path):
    with pytest.raises(RuntimeError), open_run(tmp_path, ConvergenceSpec()) as run:
        raise RuntimeError("boom")
    assert run.path.name.endswith(".failed")
    assert (run.path / "ERROR").read_text() == "RuntimeError: boom\n"
    assert not is_complete(run.path) and latest_run(tmp_path) is None


def test_same_second_same_spec_gets_a_second_name(tmp_path):
    a, b = RunDir.create(tmp_path, ConvergenceSpec()), RunDir.create(tmp_path, ConvergenceSpec())
    b.start, b.name = a.start, a.name  # force the collision
    fa, fb = a.finalize("cpu"), b.finalize("cpu")
    assert fa != fb and fb.name == f"{fa.name}-2"


def test_locks_are_exclusive_and_only_their_holder_releases_them(tmp_path):
    from ntkrun.errors import LockedError
    from ntkrun.locks import acquire, lock_holder, my_lock_text, release

    lock = tmp_path / "lock"
    acquire(lock, "busy")
    assert lock.read_text().strip() == my_lock_text()  # written before it has its name: never empty
    with pytest.raises(LockedError, match="busy by"):
        acquire(lock, "busy")
    lock.write_text("otherhost 123 456\n")  # another host's lock: trusted (no age limit given)
    release(lock)
    assert lock.exists() and lock_holder(lock) == "otherhost 123"
    assert lock_holder(lock, stale_after=0.0) is None and not lock.exists()  # too old: stale


def test_a_stale_lock_is_recognised_by_pid_and_start_time(tmp_path):
    import platform

    from ntkrun.locks import _remove_stale, lock_holder, my_lock_text

    lock = tmp_path / "lock"
    host, pid, start = my_lock_text().split()
    lock.write_text(f"{host} {pid} {int(start) + 1}\n")  # our pid, another start: a reused pid
    assert lock_holder(lock, remove=False) is None and lock.exists()  # read-only: left in place
    assert lock_holder(lock) is None and not lock.exists()
    lock.write_text(f"{platform.node()} {pid} {start}\n")
    assert lock_holder(lock) == f"{host} {pid}"  # alive: this process
    lock.write_text("fresh lock of another process\n")
    _remove_stale(lock, "the stale text read a moment ago")  # changed meanwhile: put back
    assert lock.read_text() == "fresh lock of another process\n"


def test_two_processes_making_one_shared_run_never_mix_specs(tmp_path):
    """Process A has created identity.json and not yet spec.yaml (the moment between the two
    writes): B, of another spec, is refused instead of taking the run over, and B of the same spec
    joins it. identity.json is created exclusively, whole: of two creators exactly one wins."""
    from ntkrun.errors import UnitSpecMismatchError

    a, other = ConvergenceSpec(), ConvergenceSpec(seeds=3)
    path = tmp_path / "shared"
    path.mkdir()
    first = RunDir(path, a, name=path.name, fixed=True, link_latest=False)
    assert first.claim() and not first.claim()  # the second creator loses
    assert not (path / "spec.yaml").exists()
    with pytest.raises(UnitSpecMismatchError, match="another spec"):
        RunDir.shared(path, other)
    RunDir.shared(path, a)  # joins, and writes the spec.yaml A had not written yet
    assert (path / "spec.yaml").read_text().startswith("experiment: convergence")
    assert sorted(p.name for p in path.iterdir()) == ["identity.json", "spec.yaml", "units"]


def test_an_untagged_checkpoint_is_ignored_as_older(tmp_path, caplog):
    """A checkpoint saved bare, before checkpoints carried the run's identity (pca saved its own
    {step, state, rows}: a "state" key of its own), is ignored as of an older format, where it was
    logged as "belongs to spec None"."""
    import torch

    run = RunDir.create(tmp_path, ConvergenceSpec())
    (run.path / "units").mkdir()
    torch.save({"step": 100, "state": {"w": torch.ones(2)}, "rows": []}, run.checkpoint_file("net_s0"))
    with caplog.at_level("WARNING", logger="ntkrun"):
        assert run.load_checkpoint("net_s0") is None
    assert "is of an older format (untagged)" in caplog.text and "None" not in caplog.text
    run.save_checkpoint("net_s0", {"step": 200})
    assert run.load_checkpoint("net_s0") == {"step": 200}


def test_a_units_failure_note_goes_when_it_is_saved(tmp_path):
    run = RunDir.create(tmp_path, ConvergenceSpec())
    run.save_failure("w8_s0", "DivergenceError: width 8, seed 0: training diverged\nmore")
    assert run.unit_failure("w8_s0") == "DivergenceError: width 8, seed 0: training diverged"
    run.save_unit("w8_s0", {"x": 1}, {})
    assert run.unit_failure("w8_s0") is None and run.load_unit("w8_s0") == {"x": 1}


def test_a_checkpoint_is_written_through_and_reads_back_whole(tmp_path, monkeypatch):
    """save_checkpoint hands its file to atomic.settle (fsync, then dropped from the page cache,
    from 64 MB on: here from 0 bytes), and the state reads back with its checksums intact."""
    import torch

    import ntkrun.atomic
    import ntkrun.rundir

    settled = []

    def spy(path):
        settled.append(path)
        return ntkrun.atomic.settle(path, min_bytes=0)

    monkeypatch.setattr(ntkrun.rundir, "settle", spy)
    run = RunDir.create(tmp_path, ConvergenceSpec())
    block = torch.arange(12.0).reshape(3, 4)
    run.save_checkpoint("ntk_n100", {"ntk": block}, "rows0")
    assert settled == [run.checkpoint_file("ntk_n100", "rows0")]
    assert torch.equal(run.load_checkpoint("ntk_n100", "rows0")["ntk"], block)
