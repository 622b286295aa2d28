"""The one interface every executor implements: run the given units of a run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ntkrun.rundir import RunDir
from ntkrun.spec import RunSpec
from ntkrun.work import Progress, Unit


@dataclass
class Dispatch:
    """What an executor did with the units it was given."""

    finished: bool  # every unit given has a result in the run directory now


class Executor(ABC):
    """Runs units of a run; their results land in the run directory (units/<name>.pt)."""

    @abstractmethod
    def run(self, spec: RunSpec, run: RunDir, todo: list[Unit], progress: Progress) -> Dispatch:
        """Compute (or submit) `todo`, units with no result yet, stage-0 units first."""
