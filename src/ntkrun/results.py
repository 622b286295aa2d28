"""A run directory read back for analysis (a notebook, a script): `load_run(path)` gives its spec,
its meta.json and each CSV as a DataFrame."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ntkrun.errors import SpecError
from ntkrun.rundir import COMPLETE_MARKER, is_complete


@dataclass
class Run:
    """A run directory read back: its spec, its meta.json and each CSV as a DataFrame."""

    path: Path
    spec: dict[str, Any]
    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    complete: bool

    def __getitem__(self, name: str) -> pd.DataFrame:
        """run["metrics"] or run["metrics.csv"]: one of its tables (all of them: run.tables)."""
        key = name.removesuffix(".csv")
        if key not in self.tables:
            have = ", ".join(sorted(self.tables)) or "none (the run is not complete)"
            raise KeyError(f"{name!r}: this run has no such table; its tables: {have}")
        return self.tables[key]


def load_run(path: str | Path) -> Run:
    """Read a run directory (a path, or <root>/<experiment>/latest) for analysis in a notebook:
    run.spec, run.meta, run["metrics"]. Raises SpecError if it is not a run directory."""
    path = Path(path).resolve()
    if not (path / "spec.yaml").is_file():
        raise SpecError(f"{path}: not a run directory (no spec.yaml)")
    spec = yaml.safe_load((path / "spec.yaml").read_text())
    meta_file = path / COMPLETE_MARKER
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    tables = {p.stem: pd.read_csv(p) for p in sorted(path.glob("*.csv"))}
    return Run(path, spec, meta, tables, is_complete(path))
