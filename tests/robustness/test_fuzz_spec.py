"""Spec fuzzing: random YAML documents, random --set overrides and hostile files, for every
experiment. The CLI must exit 0 (valid spec) or 2 (one-line error), never print a traceback,
and never create a run directory for a rejected spec.

`--check` validates everything a run validates (schema, data files, numerical range, memory
estimate) and then stops, so thousands of specs are tried in seconds; the accepted ones are not
trained (their runtime would be unbounded). The number of cases tried, by outcome, is printed in
pytest's terminal summary (tests/conftest.py). Every rejected case is also run without
`--check`, to see that it is rejected the same way and creates no run directory.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from ntkrun.cli import app
from ntkrun.experiments import EXPERIMENTS

COUNTS: Counter[str] = Counter()
SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip

KEYS = [
    "seeds", "base_seed", "device", "dtype", "output", "network.depth", "network.width",
    "network.nonlinearity", "network.beta", "training.lr", "training.steps", "training.n_train",
    "training.record_steps", "training.record_every", "training.checkpoint_every", "grid.n_angles",
    "grid.x0_angle", "data.n_points", "data.split", "data.train_angles", "data.target", "data.inputs",
    "data.dim", "kernel", "kernel_width", "percentiles", "n_boot", "component", "target_scale",
    "executor.kind", "executor.jobs", "executor.slurm.time", "experiment", "nested.deep.key",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["relu", "erf", "float64", "cuda", "cpu", "test", "nan", "-inf", "1e400", "0x10", "~"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
RAW_SET_VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["[1, 2", "{a: 1", "!!python/object:os.system", "*alias", "&a [1]", "1e-3", "- x", "'"]),
)  # fmt: skip


def base(experiment: str) -> list[str]:
    """The synthetic digits are small splits: point pca and generalization at them (before the fuzz)."""
    if experiment == "pca":
        return ["--set", "data.split=test", "--set", "data.n_points=16"]
    if experiment == "generalization":
        return ["--set", "data.n_train=[20]", "--set", "training.n_train=20", "--set", "data.n_test=10"]
    return []


def key_path() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10).filter(lambda s: "=" not in s))


def invoke_check(experiment: str, args: list[str], root: Path, data: Path, expect: int | None = None) -> str:
    """Run `ntkrun <experiment> ... --check`; assert the contract (and the exit code `expect`);
    count the outcome; -> what it printed."""
    extra = ["--data-dir", str(data)] if experiment in ("pca", "generalization") else []
    result = CliRunner().invoke(app, [experiment, *args, *extra, "--check", "--output-root", str(root)])
    text = result.output
    assert result.exit_code in (0, 2), (args, result.exit_code, text, result.exception)
    assert "Traceback" not in text, (args, text)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )
    if result.exit_code == 2:
        assert text.startswith("ntkrun: error: ") or text.startswith("Usage:"), text
        assert text.startswith("Usage:") or text.count("\n") == 1, text  # one line
        # the same arguments without --check: rejected the same way, and no run directory made
        real = CliRunner().invoke(app, [experiment, *args, *extra, "--output-root", str(root)])
        assert real.exit_code == 2 and real.output == text, (args, real.output)
        assert not root.exists() or not any(root.iterdir()), f"{args} created {list(root.rglob('*'))}"
    COUNTS[f"{experiment} exit {result.exit_code}"] += 1
    assert expect is None or result.exit_code == expect, (args, text)
    return text


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from test_data import write_split

    folder = tmp_path_factory.mktemp("digits")
    write_split(folder, n=40)
    write_split(folder, n=40, split="train")
    return folder


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@SETTINGS
@given(document=st.dictionaries(key_path(), VALUES, max_size=5))
def test_random_yaml_documents(experiment, document, tmp_path_factory, digits):
    """A YAML file of random (dotted keys unfolded into) nested mappings and random values."""
    nested: dict = {}
    for dotted, value in document.items():
        node = nested
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    folder = tmp_path_factory.mktemp("yaml")
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(nested, allow_unicode=True))  # any failure here fails the test
    invoke_check(experiment, ["--config", str(path), *base(experiment)], folder / "out", digits)


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@SETTINGS
@given(
    overrides=st.lists(
        st.tuples(key_path(), st.one_of(VALUES.map(lambda v: yaml.safe_dump(v).strip()), RAW_SET_VALUES)),
        max_size=4,
    )
)
def test_random_set_overrides(experiment, overrides, tmp_path_factory, digits):
    """--set KEY=VALUE with random keys and values, on the quick preset."""
    args = ["--preset", "quick", *base(experiment)]
    for key, value in overrides:
        args += ["--set", f"{key}={value}".replace("\n", " ")]
    folder = tmp_path_factory.mktemp("set")
    invoke_check(experiment, args, folder / "out", digits)


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@SETTINGS
@given(blob=st.binary(max_size=200))
def test_binary_garbage_files(experiment, blob, tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("bin")
    path = folder / "spec.yaml"
    path.write_bytes(blob)
    invoke_check(experiment, ["--config", str(path)], folder / "out", digits)


HOSTILE = {
    "empty": "",
    "only a comment": "# nothing\n",
    "a list": "- 1\n- 2\n",
    "a scalar": "42\n",
    "deep nesting": "a: " * 200 + "1\n",
    "unicode keys": "réseau:\n  profondeur: 3\n网络: 1\n",
    "huge width": "network:\n  width: 1000000000000\n",
    "huge exponent": "training:\n  lr: 1e999\n",
    "nan lr": "training:\n  lr: .nan\n",
    "negative steps": "training:\n  steps: -5\n",
    "zero seeds": "seeds: 0\n",
    "python tag": "seeds: !!python/object/apply:os.system ['true']\n",
    "tab indent": "network:\n\tdepth: 3\n",
    "duplicate key": "seeds: 1\nseeds: 2\n",  # YAML would keep the last one silently
    "bool as int": "seeds: true\n",
    "string as int": "seeds: '3'\n",
    "wrong experiment": "experiment: nope\n",
    "alias bomb": "a: &a [1, 1, 1, 1]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n",
}


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files(experiment, case, tmp_path, digits):
    """Every hostile file is refused (exit 2, one line), none is taken for a spec."""
    path = tmp_path / "spec.yaml"
    path.write_text(HOSTILE[case], encoding="utf-8")
    invoke_check(experiment, ["--config", str(path)], tmp_path / "out", digits, expect=2)


def _constraint_negatives(model: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(key, a value just outside the constraint) for every constrained field of a spec model:
    gt/ge/le bounds, choices, minimum lengths, and the same inside nested models and lists."""
    found: list[tuple[str, str]] = []
    for name, field in model.model_fields.items():
        key = ".".join((*prefix, name))
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found += _constraint_negatives(kind, (*prefix, name))
            continue
        if get_origin(kind) is Literal and name != "experiment":
            found.append((key, "not-a-choice"))
        for rule in field.metadata:
            for attr, bad in (("gt", lambda b: b), ("ge", lambda b: b - 1), ("le", lambda b: b + 1),
                              ("lt", lambda b: b)):  # fmt: skip
                if getattr(rule, attr, None) is not None:
                    found.append((key, str(bad(getattr(rule, attr)))))
            if getattr(rule, "min_length", None):
                found.append((key, "[]"))
        listed = get_origin(kind) is list  # list[PositiveInt]: a list with one bad item
        for item in get_args(kind):  # ... or Optional[PositiveInt]: a bad scalar
            for rule in getattr(item, "__metadata__", ()):
                for sub in getattr(rule, "metadata", [rule]):
                    for attr in ("gt", "lt"):
                        if getattr(sub, attr, None) is not None:
                            bad = getattr(sub, attr)
                            found.append((key, f"[{bad}, {bad}]" if listed else str(bad)))
    return found


MODEL_NEGATIVES = {  # what the model validators refuse, beyond single-field constraints
    "convergence": [("training.record_steps", "[0, 9999]")],
    "regression": [("data.train_angles", "[0.5, 0.5]"), ("data.train_angles", "null"),
                   ("data.target", "values"), ("data.target_values", "[1, 2, 3, 4]")],
    "scaling": [("data.dim", "3")],
    "pca": [],
    "generalization": [("data.n_train", "[20, 20]"), ("network.width", "[]")],
    "features": [("depth_width", "[[1, 8]]"), ("network.arch", "cnn"), ("network.kernel_size", "5")],
}  # fmt: skip
NEGATIVES = [
    (experiment, key, value)
    for experiment, record in EXPERIMENTS.items()
    for key, value in _constraint_negatives(record.model) + MODEL_NEGATIVES[experiment]
]


@pytest.mark.parametrize(("experiment", "key", "value"), NEGATIVES)
def test_every_validator_refuses_its_negative(experiment, key, value, tmp_path, digits):
    """Each constraint of each spec model, and each model validator, given a value it must refuse
    on an otherwise valid quick preset: exit 2 with one line naming the key. Removing any one
    validator makes its case exit 0 here."""
    args = ["--preset", "quick", *base(experiment), "--set", f"{key}={value}"]
    text = invoke_check(experiment, args, tmp_path / "out", digits, expect=2)
    assert key.split(".")[-1] in text or key.split(".")[0] in text, text


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_a_directory_or_a_missing_file_as_config(experiment, tmp_path, digits):
    invoke_check(experiment, ["--config", str(tmp_path)], tmp_path / "out", digits)
    invoke_check(experiment, ["--config", str(tmp_path / "missing.yaml")], tmp_path / "out", digits)
