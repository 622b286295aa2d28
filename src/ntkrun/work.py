"""What a unit of work is, for the runners that define units and the layers that run them
(ntkrun.units, the executors, ntkrun.orchestrate): the Unit, what it computes (typed: the runner
dispatches on the type of `unit.work`, never on the unit's name), its progress and its context.
Imports nothing of ntkrun but ntkrun.costs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ntkrun.costs import Cost, as_cost


class Progress(Protocol):
    """What a runner reports to: total work up front, then advances with a description."""

    def start(self, total: float) -> None: ...

    def advance(self, description: str, amount: float) -> None: ...


class NoProgress:
    def start(self, total: float) -> None:
        pass

    def advance(self, description: str, amount: float) -> None:
        pass


class UnitContext(Protocol):
    """What a running unit may ask of its run: the result of another unit, by the work it does
    (computed first if it is not there yet), and its own checkpoints."""

    def require(self, work: Work) -> dict[str, Any]: ...

    def load_checkpoint(self, name: str, part: str | None = None) -> dict[str, Any] | None: ...

    def save_checkpoint(self, name: str, state: dict[str, Any], part: str | None = None) -> None: ...


@dataclass(frozen=True)
class Reference:
    """The kernel (or limit) the other units of the run read: computed first, in stage 0."""

    depth: int | None = None  # where the run has one per depth (features), else None


@dataclass(frozen=True)
class TrainNet:
    """One finite network, drawn from `seed` at `width` (and `depth`, where the spec has several),
    trained and measured."""

    width: int
    seed: int
    depth: int | None = None


@dataclass(frozen=True)
class KernelFit:
    """Limiting kernels' predictors (e.g. ("ntk",), or ("ntk", "nngp") of one recursion) fitted on
    the first n_train points."""

    predictors: tuple[str, ...]
    n_train: int


@dataclass(frozen=True)
class GramBlock:
    """Rows r0 .. r1 of the kernels of the KernelFit (predictors, n_train): of its training Gram
    (their upper triangle), or of its test points against the training points (`test`), saved as
    a checkpoint part of that fit, which reads it (kernels.rows_per_unit)."""

    predictors: tuple[str, ...]
    n_train: int
    test: bool
    r0: int
    r1: int


@dataclass(frozen=True)
class MonteCarloLimit:
    """`count` of the networks (from the `start`-th) whose mean kernel is the limit of a user's model
    (ntkrun.kernels.monte_carlo): a share of kernels.mc_samples, so that executors spread them."""

    start: int
    count: int
    depth: int | None = None  # where the limit differs by depth and by seed (scaling: on each
    seed: int | None = None  # seed's training set), else None
    n_train: int | None = None  # generalization: the kernels on the first n_train training points


@dataclass(frozen=True)
class FeatureNet:
    """One network of `ntkrun features`: its parametrization, output scale alpha, depth, width and
    seed; trained, its kernel measured before and after."""

    parametrization: str
    alpha: float
    depth: int
    width: int
    seed: int


@dataclass(frozen=True)
class PointWork:
    """A unit of one point of a sweep (ntkrun.sweep): that point's own unit, run with its spec."""

    point: int  # the point's index in the grid
    unit: Unit


Work = Reference | TrainNet | KernelFit | GramBlock | MonteCarloLimit | FeatureNet | PointWork


@dataclass(frozen=True)
class Unit:
    """One independent piece of an experiment."""

    name: str  # file name in units/, e.g. w500_s3
    cost: float | Cost  # what it costs (ntkrun.costs; a bare number: FLOPs of large products)
    work: Work  # what run_unit computes
    needs: tuple[Unit, ...] = ()  # the units whose results it reads (ctx.require): it runs after them

    @property
    def flops(self) -> float:
        """Its floating-point operations: the progress bars' weight."""
        return as_cost(self.cost).flops

    @property
    def stage(self) -> int:
        """Its depth in the graph of `needs`: 1 + the latest stage it reads, so every executor runs it
        after them (a pool or SLURM would otherwise compute them again inside it, serially). A unit
        that declares nothing: 0 for a Reference, Monte-Carlo share or Gram block, which others read;
        else 1."""
        if isinstance(self.work, PointWork):
            return self.work.unit.stage
        if self.needs:
            return 1 + max(u.stage for u in self.needs)
        return 0 if isinstance(self.work, (Reference, MonteCarloLimit, GramBlock)) else 1


W = TypeVar("W", Reference, TrainNet, KernelFit, GramBlock, MonteCarloLimit, FeatureNet, PointWork)


class Results:
    """The saved results of a run's units, told apart by the work each did (never by a unit's
    name or by which keys a result holds): `results[work]`, or `results.of(TrainNet)` for the
    (work, result) pairs of one kind, in the order of the units."""

    def __init__(self, pairs: Iterable[tuple[Unit, dict[str, Any]]]) -> None:
        # one result per unit name, at its first place: a spec that repeats a width lists its units
        # twice, and they share one unit file (its rows are not counted twice)
        named: dict[str, tuple[Work, dict[str, Any]]] = {}
        for unit, result in pairs:
            named.setdefault(unit.name, (unit.work, result))
        self._pairs = list(named.values())
        self._by_work = dict(self._pairs)

    def __getitem__(self, work: Work) -> dict[str, Any]:
        return self._by_work[work]

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[tuple[Work, dict[str, Any]]]:
        return iter(self._pairs)

    def of(self, kind: type[W]) -> list[tuple[W, dict[str, Any]]]:
        return [(work, result) for work, result in self._pairs if isinstance(work, kind)]
