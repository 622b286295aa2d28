"""One identity for a run's results (docs/architecture.md, "Run identity"): the spec hash (every key
but executor.* and data.dir; newer fields left out at their default) and the content of the data
files read. Used by resume, shared run directories, unit files and checkpoints alike."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_data import idx_bytes
from test_pca import OUTPUTS, tiny
from typer.testing import CliRunner

from ntkrun.cli import app
from ntkrun.experiments import spec_of
from ntkrun.identity import IDENTITY, Identity
from ntkrun.spec import spec_dict, spec_hash

CONVERGENCE = ["convergence", "--preset", "quick", "--set", "network.width=[8, 16]", "--seeds", "1",
               "--steps", "4", "--set", "grid.n_angles=8", "--set", "training.n_train=6",
               "--quiet"]  # fmt: skip


def invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def digits(folder: Path, seed: int = 0, n: int = 80) -> Path:
    """A test split of n random 28 x 28 'digits' (another seed: other data of the same shape)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for stem, arr in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    return folder


def csvs(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.glob("*.csv"))}


def test_identity_leaves_out_what_changes_no_result():
    spec = spec_of("pca", preset="quick")
    moved = spec_of("pca", preset="quick", sets=["data.dir=/elsewhere", "executor.kind=local"])
    assert spec_hash(moved) == spec_hash(spec)
    assert spec_hash(spec_of("pca", preset="quick", sets=["data.n_points=64"])) != spec_hash(spec)
    old = spec_dict(spec)  # a spec.yaml written before network.parametrization existed
    del old["network"]["parametrization"]
    assert spec_hash(old) == spec_hash(spec)
    assert spec_hash(spec_of("convergence", preset="quick", sets=["network.depth=3"])) != spec_hash(
        spec_of("convergence", preset="quick")
    )


def test_identity_mismatch_names_the_reason():
    ident = Identity("abcd1234", {"t10k-images-idx3-ubyte": "1111", "t10k-labels-idx1-ubyte": "2222"})
    assert ident.mismatch(ident.tag()) is None
    assert "belongs to spec ffff0000" in ident.mismatch({"spec_hash": "ffff0000", "data": ident.data})
    other = {"spec_hash": "abcd1234", "data": {**ident.data, "t10k-images-idx3-ubyte": "9999"}}
    assert "t10k-images-idx3-ubyte had digest 9999" in ident.mismatch(other)
    assert ident.mismatch({"spec_hash": "abcd1234"}) is None  # made before data digests: spec hash alone


def test_resume_of_a_run_whose_spec_predates_a_field(tmp_path):
    """A shared run made before network.parametrization existed (spec.yaml without it, no
    identity.json, unit files without data digests) resumes, and gives the CSVs of a fresh run."""
    whole = invoke(*CONVERGENCE, "--output-root", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    shared = tmp_path / "old"
    assert invoke(*CONVERGENCE, "--unit", "0", "--run-dir", shared).exit_code == 0
    spec = yaml.safe_load((shared / "spec.yaml").read_text())
    del spec["network"]["parametrization"]
    (shared / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (shared / IDENTITY).unlink()
    for unit in (shared / "units").glob("*.pt"):
        blob = torch.load(unit, weights_only=True)
        del blob["data"]
        torch.save(blob, unit)
    result = invoke("resume", shared, "--quiet")
    assert result.exit_code == 0, result.output
    assert (shared / "meta.json").is_file()
    assert csvs(shared) == csvs((tmp_path / "whole" / "convergence" / "latest").resolve())


def test_moved_data_resumes_to_the_same_csvs(tmp_path):
    """Run on data in one folder, move the folder, resume with --data-dir at the new place: the
    finished units are kept and the CSVs equal an uninterrupted run's."""
    data = digits(tmp_path / "data")
    whole = invoke(*tiny(data, tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    shared = tmp_path / "shared"
    args = [a for a in tiny(data, tmp_path / "unused") if a != "--quiet"]
    assert invoke(*args, "--unit", "0", "--run-dir", shared).exit_code == 0
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    result = invoke("resume", shared, "--data-dir", moved, "--quiet")
    assert result.exit_code == 0, result.output
    run = (tmp_path / "whole" / "pca" / "latest").resolve()
    assert {n: (shared / n).read_bytes() for n in OUTPUTS} == {n: (run / n).read_bytes() for n in OUTPUTS}
    assert yaml.safe_load((shared / "spec.yaml").read_text())["data"]["dir"] == str(moved)  # provenance


@pytest.mark.parametrize("how", ["env", "flag"])
def test_resume_on_other_data_is_refused(tmp_path, how):
    """data.dir unset, the data found through $NTKRUN_DATA_DIR (or given by --data-dir): resuming
    on another dataset of the same shape is refused, naming the file whose content differs."""
    first, other = digits(tmp_path / "first"), digits(tmp_path / "other", seed=1)
    args = [a for a in tiny(first, tmp_path / "unused") if a not in ("--data-dir", str(first))]
    shared = tmp_path / "shared"
    made = invoke(*args, "--unit", "0", "--run-dir", shared, env={"NTKRUN_DATA_DIR": str(first)})
    assert made.exit_code == 0, made.output
    if how == "env":
        result = invoke("resume", shared, "--quiet", env={"NTKRUN_DATA_DIR": str(other)})
    else:
        result = invoke("resume", shared, "--data-dir", other, "--quiet")
    assert result.exit_code == 2, result.output
    assert "was computed on other data: t10k-images-idx3-ubyte had digest" in result.stderr
    assert not (shared / "meta.json").exists()
    # a unit of the run computed on the other data is refused just the same
    unit = invoke(*args, "--unit", "1", "--run-dir", shared, env={"NTKRUN_DATA_DIR": str(other)})
    assert unit.exit_code == 2 and "was computed on other data" in unit.stderr


def test_a_checkpoint_of_other_data_is_ignored(tmp_path):
    """Checkpoints carry the identity too: one computed on other data is logged and ignored."""
    from ntkrun.rundir import RunDir

    spec = spec_of("convergence", preset="quick")
    run = RunDir.create(tmp_path, spec, identity=Identity(spec_hash(spec), {"x": "1"}))
    run.save_checkpoint("u", {"step": 3})
    assert run.load_checkpoint("u") == {"step": 3}
    again = RunDir(run.path, spec, name=run.name, fixed=False, link_latest=False,
                   identity=Identity(spec_hash(spec), {"x": "2"}))  # fmt: skip
    assert again.load_checkpoint("u") is None


def test_a_pca_run_of_the_previous_version_resumes_and_status_writes_nothing(tmp_path):
    """Unit files of the version before identity.json carry the hash of the old rule (data.dir
    included) and no data digest: they are still this run's. `status` only reads the run."""
    from ntkrun.spec import legacy_spec_hash

    data = digits(tmp_path / "data")
    shared = tmp_path / "shared"
    args = [a for a in tiny(data, tmp_path / "unused") if a != "--quiet"]
    assert invoke(*args, "--unit", "0", "--run-dir", shared).exit_code == 0
    (shared / IDENTITY).unlink()
    old = legacy_spec_hash(yaml.safe_load((shared / "spec.yaml").read_text()))
    for unit in (shared / "units").glob("*.pt"):
        blob = torch.load(unit, weights_only=True)
        del blob["data"]
        blob["spec_hash"] = old
        torch.save(blob, unit)
    assert invoke("status", shared).exit_code == 0
    assert not (shared / IDENTITY).exists()
    result = invoke("resume", shared, "--quiet")
    assert result.exit_code == 0, result.output
    assert (shared / "meta.json").is_file()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"data": {}}', '{"spec_hash": "ab", "data": 3}'])
def test_a_malformed_identity_file_is_one_line_not_an_internal_error(tmp_path, monkeypatch, content):
    """An edited or truncated identity.json: status (of a complete run) and resume (of an
    interrupted one) say which file and why, exit 2."""
    import ntkrun.runners.common as common

    assert invoke(*CONVERGENCE, "-o", tmp_path / "done").exit_code == 0
    real_step, calls = common.gd_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(common, "gd_step", interrupted)
    assert invoke(*CONVERGENCE, "-o", tmp_path / "failed").exit_code == 130
    monkeypatch.setattr(common, "gd_step", real_step)
    (done,) = [p for p in (tmp_path / "done" / "convergence").iterdir() if p.name != "latest"]
    (failed,) = (tmp_path / "failed" / "convergence").glob("*.failed")
    for command, run in ((["status"], done), (["resume", "--quiet"], failed)):
        (run / IDENTITY).write_text(content)
        result = invoke(*command, run)
        assert result.exit_code == 2, (command, result.output)
        assert f"{run / IDENTITY}: " in result.stderr and "internal error" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_cnn_keys_at_their_defaults_keep_an_mlp_runs_hash():
    """network.arch, kernel_size, padding and readout arrived after runs were made: at their
    defaults they leave the hash as it was; a cnn is another spec."""
    spec = spec_of("generalization", preset="quick")
    old = spec_dict(spec)
    for key in ("arch", "kernel_size", "padding", "readout"):
        del old["network"][key]
    assert spec_hash(old) == spec_hash(spec)
    assert spec_hash(spec_of("generalization", preset="quick", sets=["network.arch=cnn"])) != spec_hash(spec)


def test_a_run_of_an_older_results_version_is_not_resumed_into_mixed_results(tmp_path, monkeypatch):
    """Each runner's results_version is part of a run's identity: after an upgrade that changed a
    runner's results, a half-done run of the older version is refused on resume (it silently mixed
    old and new unit files before). A run made before versions existed counts as version 1."""
    import json

    import ntkrun.runners.convergence as convergence

    shared = tmp_path / "shared"
    assert invoke(*CONVERGENCE, "--unit", "0", "--run-dir", shared).exit_code == 0
    tag = json.loads((shared / IDENTITY).read_text())
    assert tag["data"] == {"results version convergence": "1"}
    monkeypatch.setattr(convergence, "RUNNER", replace(convergence.RUNNER, results_version=2))
    result = invoke("resume", shared, "--quiet")
    assert result.exit_code == 2, result.output
    assert "computed by results version 1 of ntkrun's convergence runner, this ntkrun's is 2" in result.output
    monkeypatch.undo()
    tag["data"] = {}  # identity.json and unit files of a run made before versions existed
    (shared / IDENTITY).write_text(json.dumps(tag))
    for unit in (shared / "units").glob("*.pt"):
        blob = torch.load(unit, weights_only=True)
        blob["data"] = {}
        torch.save(blob, unit)
    result = invoke("resume", shared, "--quiet")
    assert result.exit_code == 0, result.output


def test_the_kernel_solve_keys_at_their_defaults_keep_a_generalization_runs_hash():
    """kernels.rows_per_unit, solver, precond_rank, tol and max_iter arrived after runs were made:
    at their defaults they leave the hash as it was (those runs resume); away from them, another spec."""
    spec = spec_of("generalization", preset="quick")
    old = spec_dict(spec)
    for key in ("rows_per_unit", "solver", "precond_rank", "tol", "max_iter"):
        del old["kernels"][key]
    assert spec_hash(old) == spec_hash(spec)
    assert spec_hash(spec_of("generalization", preset="quick", sets=["kernels.tol=1e-6"])) != spec_hash(spec)
