"""Run directories: built under a hidden name, renamed into place only when complete.

<root>/<experiment>/.<stamp>_<hash>.partial   while running
<root>/<experiment>/<stamp>_<hash>            when complete (and `latest` points at it)
<root>/<experiment>/<stamp>_<hash>.failed     after an error or Ctrl-C, with an ERROR file
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

import ntkrun
from ntkrun.spec import RunSpec, spec_dict, spec_hash

LOG = logging.getLogger("ntkrun")
COMPLETE_MARKER = "meta.json"  # written last; a complete run has it and no ERROR file


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(ntkrun.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _workdir(parent: Path, name: str) -> Path:
    """A fresh hidden working directory .<name>.<random>.partial with the usual umask permissions
    (mkdtemp's 0700 would hide finished runs from collaborators on a shared filesystem)."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


class RunDir:
    """One run's directory. Files go into `path`; `finalize` or `fail` ends it."""

    def __init__(self, root: Path, spec: RunSpec) -> None:
        self.spec = spec
        self.parent = Path(root) / spec.experiment
        self.start = time.time()
        stamp = datetime.fromtimestamp(self.start, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.name = f"{stamp}_{spec_hash(spec)}"
        self.parent.mkdir(parents=True, exist_ok=True)
        self.path = _workdir(self.parent, self.name)
        self.meta: dict[str, Any] = {}
        self.write_text("spec.yaml", yaml.safe_dump(spec_dict(spec), sort_keys=False))

    @classmethod
    def reopen(cls, path: Path, spec: RunSpec) -> RunDir:
        """Take an interrupted or failed run directory back under a working name, to resume it."""
        path = Path(path)
        if is_complete(path):
            raise ValueError(f"{path}: run is complete, nothing to resume")
        run = cls.__new__(cls)
        run.spec, run.parent, run.start = spec, path.parent, time.time()
        name = path.name.removesuffix(".failed")
        if name.startswith("."):  # .<name>.<random>.partial of a run that was killed outright
            name = name[1:].split(".")[0]
        run.name = name
        run.path = _workdir(run.parent, name)
        os.replace(path, run.path)  # onto the fresh empty directory: atomic on POSIX
        (run.path / "ERROR").unlink(missing_ok=True)
        run.meta = {"resumed": True}
        return run

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        """Write units/<name>.pt atomically (a temporary file renamed over the old one)."""
        folder = self.path / "units"
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, folder / f"{name}.pt")

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        path = self.path / "units" / f"{name}.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(text)
        return target

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        target = self.path / name
        frame.to_csv(target, index=False)
        return target

    def _meta(self, end: float, device: str) -> dict[str, Any]:
        return {
            "ntkrun_version": ntkrun.__version__,
            "git_commit": _git_commit(),
            "experiment": self.spec.experiment,
            "spec_hash": spec_hash(self.spec),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
            "device": device,
            "threads": torch.get_num_threads(),
            "seeds": list(range(self.spec.base_seed, self.spec.base_seed + self.spec.seeds)),
            "start_time": _iso(self.start),
            "end_time": _iso(end),
            "wall_time_s": round(end - self.start, 3),
            **self.meta,
        }

    def _rename(self, base: str) -> Path:
        """Rename the working directory to `base` (or base-2, base-3, ... if taken)."""
        for k in range(1, 1000):
            target = self.parent / (base if k == 1 else f"{base}-{k}")
            try:
                target.mkdir()  # reserve the name atomically; rename onto an empty dir replaces it
            except FileExistsError:
                continue
            os.replace(self.path, target)
            self.path = target
            return target
        raise RuntimeError(f"no free run directory name under {self.parent} for {base}")

    def finalize(self, device: str) -> Path:
        """Write meta.json, move into place and point `latest` at this run."""
        json_text = json.dumps(self._meta(time.time(), device), indent=2) + "\n"
        self.write_text(COMPLETE_MARKER, json_text)
        final = self._rename(self.name)
        link = self.parent / "latest"
        tmp = self.parent / f".latest.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(final.name)
        os.replace(tmp, link)
        return final

    def fail(self, reason: str) -> Path:
        """Keep the partial files, add ERROR with the reason, and mark the directory failed."""
        self.write_text("ERROR", reason.rstrip() + "\n")
        return self._rename(f"{self.name}.failed")


@contextmanager
def open_run(root: Path, spec: RunSpec, resume: Path | None = None) -> Iterator[RunDir]:
    """A run directory (new, or `resume` reopened) with run.log attached to the `ntkrun` logger;
    marked failed on any exception."""
    run = RunDir(root, spec) if resume is None else RunDir.reopen(resume, spec)
    handler = logging.FileHandler(run.path / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        yield run
    except BaseException as err:
        reason = "interrupted (KeyboardInterrupt)" if isinstance(err, KeyboardInterrupt) else str(err)
        LOG.error("run failed: %s", reason or type(err).__name__)
        handler.close()
        LOG.removeHandler(handler)
        run.fail(f"{type(err).__name__}: {reason}")
        raise
    handler.close()
    LOG.removeHandler(handler)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and not (path / "ERROR").exists()


def latest_run(root: Path) -> Path | None:
    """The most recently finished complete run under root, of any experiment."""
    runs = [p.resolve() for p in Path(root).glob("*/latest") if is_complete(p)]
    return max(runs, key=lambda p: (p / COMPLETE_MARKER).stat().st_mtime, default=None)
