from __future__ import annotations

import pytest

from ntkrun.errors import SpecError
from ntkrun.experiments import EXPERIMENTS, spec_of
from ntkrun.runners.convergence import ConvergenceSpec
from ntkrun.spec import parse_set, spec_hash


def test_defaults_are_the_paper_settings_of_spec_5_1():
    spec = ConvergenceSpec()
    assert spec.network.depth == 4 and spec.network.width == [500, 10000]
    assert spec.network.nonlinearity == "relu" and spec.network.beta == 0.1
    assert spec.training.lr == 1.0 and spec.training.steps == 200 and spec.training.n_train == 128
    assert spec.training.recorded == [0, 200] and spec.grid.n_angles == 256 and spec.seeds == 10
    assert spec_of("convergence") == spec  # the paper preset restates the defaults


def test_layers_apply_in_order(tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("training:\n  lr: 0.5\n  steps: 30\nseeds: 2\n")
    spec = spec_of(
        "convergence",
        preset="quick",
        config=config,
        sets=["training.lr=0.25", "network.width=[3, 4]"],
        overrides=[(("seeds",), 5, "--seeds")],
    )
    assert spec.training.lr == 0.25 and spec.training.steps == 30  # --set beats the file
    assert spec.seeds == 5 and spec.network.width == [3, 4]
    assert spec.grid.n_angles == 64  # from the quick preset


def test_single_width_becomes_a_list_and_record_steps_default_to_ends():
    spec = spec_of("convergence", sets=["network.width=7", "training.steps=12"])
    assert spec.network.width == [7]
    assert spec.training.recorded == [0, 12]
    assert spec_of("convergence", sets=["training.record_steps=[5, 0, 5]"]).training.recorded == [0, 5]


def test_hash_depends_on_the_resolved_spec_only():
    assert spec_hash(spec_of("convergence")) == spec_hash(ConvergenceSpec())
    assert spec_hash(spec_of("convergence", sets=["seeds=3"])) != spec_hash(ConvergenceSpec())


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["network.widht=3"], "--set network.widht=3: network.widht: unknown key (allowed: depth, width"),
        (["training.lr=0"], "--set training.lr=0: training.lr: Input should be greater than 0"),
        (["training.lr=-1"], "training.lr: Input should be greater than 0"),
        (["training.lr=.nan"], "training.lr: Input should be a finite number"),
        (["network.width=[10, 0]"], "network.width.1: Input should be greater than 0"),
        (["training.steps=-5"], "training.steps: Input should be greater than or equal to 0"),
        (["training.steps=2.5"], "training.steps: Input should be a valid integer"),
        (["seeds=true"], "seeds: Input should be a valid integer"),
        (["network.nonlinearity=swish"], "network.nonlinearity: Input should be 'relu'"),
        (["training.record_steps=[0, 300]"], "training: record_steps [300] are past steps = 200"),
        (["network=3"], "network: Input should be a valid dictionary"),
        (["experiment=regression"], "experiment: is 'regression', but this command runs 'convergence'"),
        (["=3"], "--set =3: expected KEY.PATH=VALUE"),
        (["a..b=3"], "expected KEY.PATH=VALUE"),
        (["lr"], "--set lr: expected KEY.PATH=VALUE"),
    ],
)
def test_bad_overrides_name_the_flag_key_and_reason(sets, expected):
    with pytest.raises(SpecError) as info:
        spec_of("convergence", sets=sets)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty file"),
        ("- 1\n- 2\n", "expected a YAML mapping"),
        ("network: {depth: 4\n", "line "),
        ("network:\n  depth: zero\n", "network.depth: Input should be a valid integer"),
        ("training:\n  lr: 1.0\n  bogus: 1\n", "training.bogus: unknown key"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        spec_of("convergence", config=path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value)


def test_unreadable_sources(tmp_path):
    with pytest.raises(SpecError, match="cannot read: No such file"):
        spec_of("convergence", config=tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        spec_of("convergence", config=tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match=r"bin\.yaml: cannot read"):
        spec_of("convergence", config=tmp_path / "bin.yaml")
    with pytest.raises(SpecError, match="unknown preset"):
        spec_of("convergence", preset="huge")
    with pytest.raises(SpecError, match="unknown experiment"):
        spec_of("nope")


def test_parse_set_reads_yaml_values():
    assert parse_set("a.b=0.5") == (("a", "b"), 0.5)
    assert parse_set("w=[1, 2]") == (("w",), [1, 2])
    assert parse_set("s=relu") == (("s",), "relu")


def test_every_preset_file_is_valid():
    for experiment, presets in ((e, r.presets) for e, r in EXPERIMENTS.items()):
        assert presets, f"no presets for {experiment}"
        for name in presets:
            spec_of(experiment, preset=name)


def test_exponent_floats_are_numbers(tmp_path):
    assert parse_set("training.lr=1e-3") == (("training", "lr"), 0.001)
    path = tmp_path / "s.yaml"
    path.write_text("training:\n  lr: 2E-1\n")
    assert spec_of("convergence", config=path).training.lr == 0.2


def test_parametrization_field_keeps_old_hashes_and_is_refused_where_it_has_no_meaning(tmp_path):
    """network.parametrization arrived after runs were made: at its default it leaves the hash
    as it was (runs made before can be resumed); standard is another spec; every experiment
    refuses it with one line naming the key (before it reads any data)."""
    from typer.testing import CliRunner

    from ntkrun import experiments
    from ntkrun.cli import app
    from ntkrun.experiments import spec_of
    from ntkrun.spec import spec_hash

    assert spec_hash(spec_of("convergence", preset="quick")) == "bf90f3d9"  # as pinned before the field
    for experiment in experiments.EXPERIMENTS:  # the schema says what works: no experiment runs it
        args = [experiment, "--preset", "quick", "--set", "network.parametrization=standard"]
        result = CliRunner().invoke(app, [*args, "-o", str(tmp_path)])
        assert result.exit_code == 2, (experiment, result.output)
        assert "network.parametrization: 'standard' is not supported: its NTK grows" in result.stderr
        with pytest.raises(SpecError, match=r"network\.parametrization: 'standard' is not supported"):
            spec_of(experiment, preset="quick", sets=["network.parametrization=standard"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("experiment", ["convergence", "regression"])
def test_experiments_on_the_circle_refuse_a_cnn_at_check(tmp_path, experiment):
    """network.arch=cnn where the inputs are 2-D points: refused at --check in one line naming
    the key, before anything is written; scaling has no such key."""
    from typer.testing import CliRunner

    from ntkrun.cli import app

    args = [experiment, "--preset", "quick", "--set", "network.arch=cnn", "--check", "-o", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = f"network.arch: 'cnn' is not supported by {experiment}, whose inputs are points on the unit"
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
