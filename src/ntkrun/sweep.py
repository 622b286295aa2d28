"""A sweep: one run over a grid of spec values (`--sweep network.depth=2,3,4`, or a spec's `sweep:`
block).

The grid is the product of the swept keys' value lists, in the order they were given; each
combination is a point, a plain spec of the experiment (its `sweep` emptied). The sweep's units are
its points' units, named `<point>.<unit>` (`p00.w500_s0`), run by the same executors into the one run
directory. A unit whose work does not read the keys on which two points differ (the runner's
`shared(spec)`: {work type: the spec keys it ignores}) is computed once, by the first point that has it,
and read by the others. Aggregation runs each point's own aggregate into `points/<point>/` (the
CSVs and figure a plain run of that spec writes), concatenates each CSV into the run's top level
with one column per swept key, and draws the comparison figure (ntkrun.sweep_plots).

`Sweep(runner)` has the runner interface of ntkrun.units (units, run_unit, aggregate, memory,
data_files), so the layers above run a sweep as they run any experiment.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ntkrun import sweep_plots
from ntkrun.errors import SpecError
from ntkrun.identity import Identity
from ntkrun.rundir import RunDir
from ntkrun.runners.common import resolve_device
from ntkrun.runners.contract import Runner
from ntkrun.spec import RunSpec, legacy_spec_hash, spec_dict, spec_hash, spec_identity, with_values
from ntkrun.work import PointWork, Progress, Results, Unit, UnitContext, Work

MAX_POINTS = 256  # the default of --max-points
POINTS_DIR = "points"


def grid_size(spec: RunSpec) -> int:
    """The number of points of the spec's grid (1 without a sweep)."""
    return math.prod(len(values) for values in spec.sweep.values())


def show(value: Any) -> str:
    """A swept value as a table cell or label: lists as JSON ([100, 200]), numbers as given."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass(frozen=True)
class Point:
    """One point of a grid: its index, the swept keys' values, and the plain spec they give."""

    index: int
    name: str  # p00, p01, ... (zero-padded to the grid's size)
    values: dict[str, Any]  # dotted key -> value
    spec: RunSpec

    @property
    def label(self) -> str:
        """network.depth=3, training.lr=0.5"""
        return ", ".join(f"{key}={show(value)}" for key, value in self.values.items())


@dataclass
class Grid:
    """A sweep's points and units; which point owns each unit, and which points share it."""

    points: list[Point]
    units: list[Unit] = field(default_factory=list)
    owner: dict[tuple[int, str], str] = field(default_factory=dict)  # (point, its unit) -> sweep unit
    readers: dict[str, list[str]] = field(default_factory=dict)  # sweep unit -> the points reading it

    def unit_name(self, point: Point, name: str) -> str:
        """The sweep unit that holds `name` of `point` (its own, or the one it shares)."""
        return self.owner.get((point.index, name), f"{point.name}.{name}")

    def work_of(self, point: Point, unit: Unit) -> Work:
        """The work of the sweep unit that holds `unit` of `point` (a PointWork)."""
        name = self.unit_name(point, unit.name)
        return next(u.work for u in self.units if u.name == name)


_GRIDS: dict[str, Grid] = {}


def points(spec: RunSpec) -> list[Point]:
    """The grid's points in order (the last swept key varies fastest). Raises SpecError naming the
    first point that is not a valid spec."""
    keys = list(spec.sweep)
    combos = list(itertools.product(*(spec.sweep[key] for key in keys)))
    digits = max(2, len(str(len(combos) - 1)))
    found = []
    for index, combo in enumerate(combos):
        values = dict(zip(keys, combo, strict=True))
        name = f"p{index:0{digits}d}"
        label = ", ".join(f"{key}={show(value)}" for key, value in values.items())
        point_spec = with_values(spec, values, f"sweep point {name} ({label})")
        found.append(Point(index, name, values, point_spec))
    return found


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _ignores(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class Sweep:
    """The runner interface of ntkrun.units over an experiment's `runner`, for a swept spec."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def grid(self, spec: RunSpec) -> Grid:
        """The spec's grid (cached by the spec's content: units are asked for often)."""
        key = json.dumps(spec_dict(spec), sort_keys=True)
        if key not in _GRIDS:
            _GRIDS[key] = self._grid(spec)
        return _GRIDS[key]

    def _grid(self, spec: RunSpec) -> Grid:
        grid = Grid(points(spec))
        shared_of = self.runner.shared
        first: dict[tuple[str, str], str] = {}  # (unit, what it reads) -> the sweep unit computing it
        made: dict[str, Unit] = {}
        for point in grid.points:
            identity, shared = _flat(spec_identity(spec_dict(point.spec))), shared_of(point.spec)
            for unit in sorted(self.runner.units(point.spec), key=lambda u: u.stage):
                name = f"{point.name}.{unit.name}"
                ignored = shared.get(type(unit.work))
                if ignored is not None:
                    reads = {k: v for k, v in identity.items() if not _ignores(k, ignored)}
                    key = (unit.name, json.dumps(reads, sort_keys=True))
                    if key in first:
                        grid.owner[(point.index, unit.name)] = first[key]
                        grid.readers[first[key]].append(point.name)
                        continue
                    first[key] = name
                grid.owner[(point.index, unit.name)] = name
                grid.readers[name] = [point.name]
                needs = tuple(made[grid.owner[(point.index, n.name)]] for n in unit.needs)  # (earlier stages)
                made[name] = Unit(name, unit.cost, PointWork(point.index, unit), needs=needs)
                grid.units.append(made[name])
        return grid

    # ---------------------------------------------------------------- the runner interface

    def units(self, spec: RunSpec) -> list[Unit]:
        return self.grid(spec).units

    def memory(self, spec: RunSpec, unit: Unit) -> int:
        point = self.grid(spec).points[unit.work.point]
        return int(self.runner.memory(point.spec, unit.work.unit))

    def data_files(self, spec: RunSpec) -> list[Path]:
        found = [path for point in self.grid(spec).points for path in self.runner.data_files(point.spec)]
        return sorted(set(found), key=found.index)

    def run_unit(self, spec: RunSpec, unit: Unit, ctx: UnitContext, progress: Progress) -> dict:
        grid = self.grid(spec)
        point = grid.points[unit.work.point]
        context = _PointContext(ctx, grid, point, self.runner)
        return self.runner.run_unit(point.spec, unit.work.unit, context, progress)

    def aggregate(self, spec: RunSpec, run: RunDir, results: Results) -> pd.DataFrame:
        """Each point's aggregate into points/<point>/ (marked complete there), then the run's
        tables: each point's CSVs concatenated with one column per swept key; points.csv; the
        comparison figure. -> the concatenated summary table."""
        grid, keys = self.grid(spec), list(spec.sweep)
        device = str(resolve_device(spec.device))
        summaries, tables, rows = [], {}, []
        for point in grid.points:
            ident = Identity(spec_hash(point.spec), dict(run.identity.data), legacy_spec_hash(point.spec))
            sub = RunDir.shared(run.path / POINTS_DIR / point.name, point.spec, ident)
            own = Results((u, results[grid.work_of(point, u)]) for u in self.runner.units(point.spec))
            summaries.append(_tagged(self.runner.aggregate(point.spec, sub, own), point))
            sub.finalize(device)
            (sub.path / "units").rmdir()  # a point's units live in the run's units/
            for path in sorted(sub.path.glob("*.csv")):
                frame = pd.read_csv(path)
                tables.setdefault(path.name, []).append(_tagged(frame, point))
            rows.append({"point": point.name, **point.values, "spec_hash": spec_hash(point.spec)})
        merged = {name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()}
        for name, frame in merged.items():
            run.write_csv(name, frame)
        cells = [{k: show(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows]
        run.write_csv("points.csv", pd.DataFrame(cells))
        run.meta["sweep"] = {"keys": keys, "points": rows}
        title = f"{spec.experiment} sweep over {', '.join(keys)} ({len(grid.points)} points)"
        sweep_plots.sweep_figure(spec.experiment, merged, keys, run.path / "figure", title=title)
        return pd.concat(summaries, ignore_index=True)


def _tagged(frame: pd.DataFrame, point: Point) -> pd.DataFrame:
    """The frame with the point's swept values as its first columns, named by the dotted keys."""
    tagged = frame.copy()
    for position, (key, value) in enumerate(point.values.items()):
        tagged.insert(
            position, key, [value if not isinstance(value, (list, dict)) else show(value)] * len(frame)
        )
    return tagged


class _PointContext:
    """A unit context for one point's runner: its units mapped to the sweep's."""

    def __init__(self, ctx: UnitContext, grid: Grid, point: Point, runner: Runner) -> None:
        self.ctx, self.grid, self.point, self.runner = ctx, grid, point, runner

    def require(self, work: Work) -> dict[str, Any]:
        own = [u for u in self.runner.units(self.point.spec) if u.work == work]
        if not own:
            raise LookupError(f"no unit of sweep point {self.point.name} does {work}")
        return self.ctx.require(self.grid.work_of(self.point, own[0]))

    def load_checkpoint(self, name: str, part: str | None = None) -> dict[str, Any] | None:
        return self.ctx.load_checkpoint(self.grid.unit_name(self.point, name), part)

    def save_checkpoint(self, name: str, state: dict[str, Any], part: str | None = None) -> None:
        self.ctx.save_checkpoint(self.grid.unit_name(self.point, name), state, part)


def check_size(spec: RunSpec, max_points: int) -> None:
    """Refuse a grid of more than max_points points before any point is built."""
    size = grid_size(spec)
    if size > max_points:
        sizes = " x ".join(f"{len(v)} ({k})" for k, v in spec.sweep.items())
        raise SpecError(
            f"sweep: {sizes} = {size} points, more than --max-points {max_points}; "
            "fewer values, or raise --max-points"
        )
