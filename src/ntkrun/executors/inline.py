"""Units computed one after the other in this process."""

from __future__ import annotations

from ntkrun.executors.base import Dispatch, Executor
from ntkrun.rundir import RunDir
from ntkrun.spec import RunSpec
from ntkrun.units import compute_unit
from ntkrun.work import Progress, Unit


class InlineExecutor(Executor):
    def run(self, spec: RunSpec, run: RunDir, todo: list[Unit], progress: Progress) -> Dispatch:
        progress.start(sum(u.flops for u in todo) or float(len(todo)))
        for unit in todo:
            compute_unit(spec, run, unit, progress)
        return Dispatch(finished=True)
