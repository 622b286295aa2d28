"""Experiment specs: the shared models, YAML loading, `--set` overrides, validation.

Each experiment's own model (a RunSpec subclass) lives in its runner module; the defaults are
the paper's settings (docs/science.md).

A spec is built in layers: the model defaults, then a preset file (configs/<experiment>/<name>.yaml)
or a config file, then `--set key.path=value` overrides, then CLI shortcuts. Every leaf
remembers which layer set it, so a validation error names the file or flag it came from.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ntkrun.errors import SpecError
from ntkrun.presets import presets_of
from ntkrun.yamlio import load_yaml as _load
from ntkrun.yamlio import read_yaml


def as_list(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Widths = Annotated[list[PositiveInt], Field(min_length=1), BeforeValidator(as_list)]
# The registered nonlinearities of ntkrun.nonlinearities, named here so that reading a spec does
# not load torch (tests/test_house.py checks that the two lists agree).
NONLINEARITY_NAMES = ("relu", "erf", "tanh", "gelu", "softplus", "identity")
NonlinearityName = Literal[NONLINEARITY_NAMES]  # type: ignore[valid-type]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# The architectures of ntkrun.architectures and the CNN's geometry, named here for the same reason.
ARCH_NAMES = ("mlp", "cnn")
PADDING_NAMES = ("same", "valid", "circular")
READOUT_NAMES = ("flatten", "gap")
CNN_KEYS = {"kernel_size": 3, "padding": "same", "readout": "flatten"}  # with their defaults
MODULE_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # network.module: package.module:function


def _layer_list(value: Any) -> Any:
    """network.layers: a list of layers or a named composition, parsed at once (unknown layers and
    options are refused here; what needs the inputs' shape, when the data are known)."""
    if value is None:
        return value
    from ntkrun.layers.parse import parse  # the layer language, only for specs that use it

    try:
        parse(value)
    except ValueError as err:
        raise ValueError(str(err)) from None
    return value


LayerList = Annotated[list[Any] | str, BeforeValidator(_layer_list)]


def check_arch_keys(network: Any) -> Any:
    """A network block's architecture keys, together: the CNN's keys away from their defaults only
    with arch cnn, and an odd kernel with 'same' or 'circular' padding; arch and module (the user's
    own model, "package.module:function") exclusive. Raises ValueError."""
    module = getattr(network, "module", None)
    if module is not None and not MODULE_PATH.match(module):
        raise ValueError(f"module: {module!r} is not of the form package.module:function")
    if module is not None and network.arch != "mlp":
        raise ValueError(f"arch and module are exclusive: arch {network.arch!r} is ntkrun's, module yours")
    if module is not None and getattr(network, "layers", None) is not None:
        raise ValueError("layers and module are exclusive: layers is a composition of ntkrun's, module yours")
    if network.arch != "cnn":
        changed = [key for key, default in CNN_KEYS.items() if getattr(network, key) != default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: for arch cnn only, but arch is {network.arch!r}")
    elif network.padding != "valid" and network.kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size {network.kernel_size} is even: padding {network.padding!r} needs an odd kernel "
            "(with a centre pixel); use an odd kernel_size or padding valid"
        )
    return network


def _ntk_only(value: Any) -> Any:
    if value == "standard":
        raise ValueError(
            "'standard' is not supported: its NTK grows with the width, and every experiment compares "
            "networks of several widths against one width-independent limit (docs/science.md §7.2); use ntk"
        )
    return value


NtkOnly = Annotated[Literal["ntk"], BeforeValidator(_ntk_only)]  # network.parametrization


class NetworkSpec(Model):
    """The one network block of every experiment. An experiment that varies depth or needs several
    widths subclasses it to change those fields' types and defaults (scaling, features), nothing
    else: what a runner needs to know of the network it asks its description (ntkrun.architectures)."""

    depth: PositiveInt = 4  # weight layers L (a cnn: L - 1 convolutions, then the dense layer)
    width: Widths = [500, 10000]  # one network per width (a cnn: channels)
    nonlinearity: NonlinearityName = "relu"  # sigma of every hidden layer (docs/science.md §1)
    beta: NonNegativeFloat = 0.1  # the bias scale: z = W a / sqrt(n) + beta b
    parametrization: NtkOnly = "ntk"  # docs/science.md §7.2
    arch: Literal[ARCH_NAMES] = "mlp"  # type: ignore[valid-type]  # docs/science.md §9 for cnn
    kernel_size: PositiveInt = 3  # cnn only: k x k convolutions, stride 1
    padding: Literal[PADDING_NAMES] = "same"  # type: ignore[valid-type]  # cnn only
    readout: Literal[READOUT_NAMES] = "flatten"  # type: ignore[valid-type]  # cnn only
    module: str | None = None  # your own model, "package.module:function" (ntkrun.architectures.module)
    # a composition of ntkrun.layers (a list, or a named one): replaces depth, arch and nonlinearity
    layers: LayerList | None = None

    @model_validator(mode="after")
    def _cnn_keys(self) -> NetworkSpec:
        return check_arch_keys(self)


class MonteCarloSpec(Model):
    """The Monte-Carlo limit of a network.module (docs/science.md §10)."""

    limit_width: PositiveInt | None = None  # its networks' width; default: the largest network.width
    mc_samples: Annotated[int, Field(ge=2)] = 32  # networks averaged


class TrainingSpec(Model):
    lr: PositiveFloat = 1.0  # GD learning rate eta (training time t = lr x steps)
    steps: NonNegativeInt = 200  # full-batch GD steps
    n_train: PositiveInt = 128  # (choice) training points x ~ N(0, I_2), drawn once per seed
    record_steps: list[NonNegativeInt] | None = None  # default [0, steps]

    @model_validator(mode="after")
    def _record_within_steps(self) -> TrainingSpec:
        late = [s for s in self.record_steps or [] if s > self.steps]
        if late:
            raise ValueError(f"record_steps {late} are past steps = {self.steps}")
        return self

    @property
    def recorded(self) -> list[int]:
        """Sorted, distinct steps at which the kernel is recorded."""
        return sorted(set(self.record_steps if self.record_steps is not None else [0, self.steps]))


class CircleGridSpec(Model):
    n_angles: PositiveInt = 256  # (choice) gamma on n_angles points of [-pi, pi)


class GridSpec(CircleGridSpec):
    x0_angle: Annotated[float, Field(allow_inf_nan=False)] = 0.0  # x0 = (cos, sin) of this angle


class SlurmSpec(Model):
    partition: str | None = None  # sbatch --partition (default: the cluster's)
    gpus: NonNegativeInt = 0  # GPUs per unit (per array task)
    cpus: PositiveInt = 2  # CPUs per unit
    mem_gb: PositiveFloat | None = None  # memory per unit (default: the unit's estimate)
    time: PositiveInt = 60  # minutes per unit; long units are requeued from their checkpoint
    array_parallelism: PositiveInt = 64  # array tasks running at once
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    additional: dict[str, str] = {}  # any other sbatch option, e.g. {constraint: a100}


class ExecutorSpec(Model):
    """Where the units run. Not hashed: it changes no result beyond the last bits `threads` fixes."""

    kind: Literal["inline", "local", "slurm"] = "inline"  # this process / a process pool / SLURM
    jobs: PositiveInt = 2  # local: worker processes
    threads: PositiveInt | None = None  # every unit's torch threads (default: this machine's, slurm.cpus)
    slurm: SlurmSpec = SlurmSpec()


class RunSpec(Model):
    """Fields every experiment has."""

    experiment: str  # the experiment this spec runs (set by the command)
    seeds: PositiveInt = 10  # seeds base_seed .. base_seed + seeds - 1
    base_seed: NonNegativeInt = 0  # the first seed
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is one
    dtype: Literal["float32", "float64"] = "float32"  # of the networks and their empirical kernels
    output: str = "outputs"  # root directory of run directories
    executor: ExecutorSpec = ExecutorSpec()
    # a grid over spec keys, one run: {dotted key: [values]}, every combination (ntkrun.sweep)
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}

    @property
    def seed_values(self) -> range:
        """The seeds of the run: base_seed .. base_seed + seeds - 1."""
        return range(self.base_seed, self.base_seed + self.seeds)


# --------------------------------------------------------------------------- loading


class Layers:
    """A nested dict built from layered sources, remembering which source set each leaf."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def merge(self, update: dict[str, Any], source: str, prefix: tuple[str, ...] = ()) -> None:
        target = self.data
        for key in prefix:
            target = target.setdefault(key, {})
        for key, value in update.items():
            path = (*prefix, str(key))
            replaced = not (isinstance(value, dict) and value and isinstance(target.get(key), dict))
            if replaced:  # a leaf or a whole subtree is replaced: its old leaves are gone
                for old in [p for p in self.origin if p[: len(path)] == path]:
                    del self.origin[old]
            if isinstance(value, dict) and value:
                if replaced:
                    target[key] = {}
                self.merge(value, source, path)
            else:
                target[key] = value
                self.origin[path] = source

    def source_of(self, path: tuple[str, ...]) -> str:
        """The source that set `path` (or an ancestor), else the last one that set a key below it."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origin:
                return self.origin[path[:n]]
        below = [src for p, src in self.origin.items() if p[: len(path)] == path]
        return below[-1] if below else "defaults"


def parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    """'a.b=value' -> (('a', 'b'), value parsed as a YAML scalar or flow list)."""
    key, sep, raw = item.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not key.strip() or any(not p for p in path):
        raise SpecError(f"--set {item}: expected KEY.PATH=VALUE, e.g. --set training.lr=0.5")
    try:
        value = _load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise SpecError(f"--set {item}: cannot parse value {raw!r}") from None
    return path, value


# Keys a sweep may not vary: those that change no result (executor, data.dir, output) or name the run.
UNSWEPT = (("executor",), ("data", "dir"), ("output",), ("experiment",), ("sweep",))


def parse_sweep(item: str) -> tuple[str, list[Any]]:
    """'a.b=V1,V2,...' -> ('a.b', [V1, V2, ...]), each value parsed as --set parses one (a list in
    brackets: 'network.width=[100,200],[500]')."""
    key, _, raw = item.partition("=")
    try:
        path, values = parse_set(f"{key}=[{raw}]")
    except SpecError:
        raise SpecError(f"--sweep {item}: expected KEY.PATH=V1,V2,... (lists in brackets)") from None
    if not values:
        raise SpecError(f"--sweep {item}: no values (expected KEY.PATH=V1,V2,...)")
    return ".".join(path), values


def _check_sweep(layers: Layers, sets: list[tuple[tuple[str, ...], str]]) -> None:
    """A swept key that is also --set, or one a sweep may not vary, is one line naming both."""
    sweep = layers.data.get("sweep")
    for key in sweep if isinstance(sweep, dict) else ():
        path = tuple(str(key).split("."))
        source = layers.source_of(("sweep", str(key)))
        for fixed in UNSWEPT:
            if path[: len(fixed)] == fixed:
                why = "changes no result or names the run"
                raise SpecError(f"{source}: sweep: {key}: cannot be swept ({'.'.join(fixed)} {why})")
        for set_path, flag in sets:
            n = min(len(path), len(set_path))
            if path[:n] == set_path[:n]:
                given = ".".join(set_path)
                raise SpecError(f"{flag}: sets {given}, which {source} sweeps ({key}); give it in one place")


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def _format_error(err: dict[str, Any], layers: Layers, model: type[Model]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    # a key with a newline or other unprintable characters is shown quoted, keeping one line
    key = ".".join(p if p.isprintable() and p.strip() == p and p else repr(p) for p in loc) or "(top level)"
    source = layers.source_of(tuple(p for p in loc if not p.isdigit()))
    if err["type"] == "extra_forbidden":
        sub: Any = model
        for part in loc[:-1]:
            field = sub.model_fields.get(part) if isinstance(sub, type) else None
            sub = field.annotation if field is not None else None
        allowed = ", ".join(sub.model_fields) if isinstance(sub, type) and issubclass(sub, BaseModel) else ""
        reason = f"unknown key (allowed: {allowed})" if allowed else "unknown key"
    else:
        reason = err["msg"].removeprefix("Value error, ")
        if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            reason += f" (got {err['input']!r})"
    if not loc:  # a check across blocks names its keys in its message
        return f"{source}: {reason}"
    return f"{source}: {key}: {reason}"


Override = tuple[tuple[str, ...], Any, str]  # (key path, value, the flag that set it)


DEFAULT_PRESETS = ("paper", "full", "default")


def load_spec(
    model: type[RunSpec],
    *,
    preset: str | None = None,
    config: Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    overrides: list[Override] | tuple[Override, ...] = (),
    sweeps: list[str] | tuple[str, ...] = (),
) -> RunSpec:
    """Resolve and validate a spec of `model`: defaults <- preset <- config <- --set <- flags, and
    `--sweep KEY=V1,V2` entries into its `sweep` block (a grid: ntkrun.sweep).

    With neither preset nor config the first of DEFAULT_PRESETS that the experiment has is used
    (`paper` for the paper's experiments). Raises SpecError.
    """
    experiment = model.model_fields["experiment"].default
    layers = Layers()
    if preset is not None or config is None:
        presets = presets_of(experiment)
        name = preset or next((p for p in DEFAULT_PRESETS if p in presets), DEFAULT_PRESETS[-1])
        if name not in presets:
            raise SpecError(f"--preset {name}: unknown preset for {experiment} (known: {', '.join(presets)})")
        layers.merge(read_yaml(presets[name]), f"preset {name} ({presets[name]})")
    if config is not None:
        layers.merge(read_yaml(config), str(config))
    fixed: list[tuple[tuple[str, ...], str]] = []
    for item in sets:
        path, value = parse_set(item)
        layers.merge(_nest(path, value), f"--set {item}")
        fixed.append((path, f"--set {item}"))
    for path, value, flag in overrides:
        layers.merge(_nest(path, value), flag)
        fixed.append((path, flag))
    for item in sweeps:
        key, values = parse_sweep(item)
        layers.merge({"sweep": {key: values}}, f"--sweep {item}")
    _check_sweep(layers, fixed)
    exp = layers.data.get("experiment", experiment)
    if exp != experiment:
        source = layers.source_of(("experiment",))
        raise SpecError(f"{source}: experiment: is {exp!r}, but this command runs {experiment!r}")
    try:
        return model.model_validate(layers.data)
    except ValidationError as err:
        raise SpecError(_format_error(err.errors()[0], layers, model)) from None


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    """The fully resolved spec as plain data (what spec.yaml holds; `sweep` only where there is one)."""
    data = spec.model_dump(mode="json")
    if not data.get("sweep", True):
        del data["sweep"]
    return data


def with_values(spec: RunSpec, values: dict[str, Any], source: str) -> RunSpec:
    """The spec with each dotted key of `values` set, and no sweep: one point of a sweep
    (ntkrun.sweep). Raises SpecError naming `source` and the key."""
    layers, data = Layers(), spec_dict(spec)
    layers.merge({k: v for k, v in data.items() if k != "sweep"}, "the spec")
    for key, value in values.items():
        layers.merge(_nest(tuple(key.split(".")), value), source)
    try:
        return type(spec).model_validate(layers.data)
    except ValidationError as err:
        raise SpecError(_format_error(err.errors()[0], layers, type(spec))) from None


# What identifies a run's results (docs/architecture.md, "Run identity"). A spec's identity is its
# plain data less the keys that change no result: the executor block (where units run) and data.dir
# (where the data was found: data are identified by their content, ntkrun.data.digest). A field added
# after runs were made enters the identity only away from its default, so that those runs (whose
# spec.yaml lacks it) keep their identity and can be resumed: (block, key, default).
_NOT_RESULTS = [("executor",), ("data", "dir")]
_NEWER_FIELDS = [
    ("network", "parametrization", "ntk"),
    ("network", "arch", "mlp"),
    *(("network", key, default) for key, default in CNN_KEYS.items()),
    ("network", "module", None),
    ("network", "layers", None),
    ("kernels", "limit_width", None),
    ("kernels", "mc_samples", 32),
    ("kernels", "rows_per_unit", None),
    ("kernels", "solver", "cholesky"),
    ("kernels", "precond_rank", 500),
    ("kernels", "tol", 1e-5),
    ("kernels", "max_iter", 1000),
]


def spec_identity(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a spec's plain data (spec_dict, or a spec.yaml read back) that its results depend on."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for path in _NOT_RESULTS:
        block = data if len(path) == 1 else data.get(path[0])
        if isinstance(block, dict):
            block.pop(path[-1], None)
    for block, key, default in _NEWER_FIELDS:
        if isinstance(data.get(block), dict) and data[block].get(key, default) == default:
            data[block].pop(key, None)
            if not data[block]:  # a block all of whose keys are newer, at their defaults
                data.pop(block)
    if not data.get("sweep", True):  # no sweep: a plain run, whose identity predates the field
        data.pop("sweep")
    return data


def legacy_spec_hash(spec: RunSpec | dict[str, Any]) -> str:
    """The hash ntkrun gave a spec before data.dir left the identity (unit files of earlier runs)."""
    data = spec if isinstance(spec, dict) else spec_dict(spec)
    kept = spec_identity(data)
    if isinstance(data.get("data"), dict):
        kept["data"] = dict(data["data"])  # data.dir included, as it was
    blob = json.dumps(kept, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def spec_hash(spec: RunSpec | dict[str, Any]) -> str:
    """8 hex digits of the spec's identity (a RunSpec, or the plain data of a spec.yaml)."""
    data = spec if isinstance(spec, dict) else spec_dict(spec)
    blob = json.dumps(spec_identity(data), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]
