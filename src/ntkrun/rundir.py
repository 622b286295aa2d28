"""Run directories and the files in them. Every file is written under a temporary name and
renamed into place, so no file under its final name is ever partial.

A run run by this process (executor inline or local) is built under a hidden name:
<root>/<experiment>/.<stamp>_<hash>.<random>.partial   while running
<root>/<experiment>/<stamp>_<hash>                     when complete (and `latest` points at it)
<root>/<experiment>/<stamp>_<hash>.failed              after an error or Ctrl-C, with an ERROR file
A shared run (executor slurm, or --run-dir) lives at a fixed visible path from the start, which
many processes share; it is complete when meta.json is there, written last by aggregation.

units/<unit>.pt        a finished unit's result, with the spec hash it belongs to
units/<unit>.ckpt.pt   a long unit's latest checkpoint (removed when the unit finishes)
units/<unit>.ckpt.<part>.pt   its named parts, e.g. a large Gram's row blocks (removed likewise)
identity.json          the run's Identity: the spec hash and the digest of each data file it reads

Unit results and checkpoints carry the Identity they were computed under; one of another
identity (another spec, or the same spec on other data) is never taken for this run's.
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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from ntkrun import signals
from ntkrun.atomic import atomic_write, settle, umask
from ntkrun.errors import RunError, SpecError, Stop, UnitSpecMismatchError, stopped
from ntkrun.identity import IDENTITY, Identity, run_mismatch
from ntkrun.locks import RUNNING, acquire, release
from ntkrun.spec import RunSpec, spec_dict, spec_hash
from ntkrun.version import __version__

LOG = logging.getLogger("ntkrun")
COMPLETE_MARKER = "meta.json"  # written last; a complete run has it and no ERROR file


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
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
    path.chmod(0o777 & ~umask())
    return path


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _reserve(parent: Path, base: str) -> Path:
    """Create the empty directory parent/base (or base-2, base-3, ... if taken), atomically."""
    for k in range(1, 1000):
        target = parent / (base if k == 1 else f"{base}-{k}")
        try:
            target.mkdir()
        except FileExistsError:
            continue
        target.chmod(0o777 & ~umask())
        return target
    raise RunError(f"no free run directory name under {parent} for {base}")


def crc32(tensor: Any) -> int | None:
    """CRC-32 of a tensor's bytes (None for anything else)."""
    if not isinstance(tensor, torch.Tensor):
        return None
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


class RunDir:
    """One run's directory. Files go into `path`; `finalize` or `fail` ends it.

    Made by one of the named constructors: `create` (a new run), `shared` (a run directory many
    processes write into) or `reopen` (an interrupted or failed run, to resume it).
    """

    def __init__(
        self,
        path: Path,
        spec: RunSpec,
        *,
        name: str,
        fixed: bool,
        link_latest: bool,
        identity: Identity | None = None,
    ) -> None:
        self.spec, self.path, self.name = spec, Path(path), name
        self.identity = identity or Identity.of(spec)
        self.parent = self.path.parent
        self.fixed = fixed  # at its final name already (shared): never renamed
        self.link_latest = link_latest  # point <parent>/latest at it when complete
        self.start = time.time()
        self.meta: dict[str, Any] = {}
        self.finalized = False
        self.holding = False  # this process holds its RUNNING lock

    @classmethod
    def create(
        cls, root: Path, spec: RunSpec, *, visible: bool = False, identity: Identity | None = None
    ) -> RunDir:
        """A new run under root/<experiment>: hidden until finalized, or (visible) at its final
        name from the start, for a run whose units run elsewhere."""
        parent = Path(root) / spec.experiment
        start = time.time()
        name = f"{_stamp(start)}_{spec_hash(spec)}"
        parent.mkdir(parents=True, exist_ok=True)
        path = _reserve(parent, name) if visible else _workdir(parent, name)
        run = cls(path, spec, name=name, fixed=visible, link_latest=True, identity=identity)
        run.start = start
        run.write_spec()
        return run

    @classmethod
    def shared(
        cls, path: Path, spec: RunSpec, identity: Identity | None = None, *, record: bool = False
    ) -> RunDir:
        """The shared run at `path` (created if absent); it must be of this identity (same spec
        hash, same data). Raises UnitSpecMismatchError."""
        path = Path(path)
        link = path.parent.name == spec.experiment
        run = cls(path, spec, name=path.name, fixed=True, link_latest=link, identity=identity)
        path.mkdir(parents=True, exist_ok=True)
        (path / "units").mkdir(exist_ok=True)
        if not (path / "spec.yaml").is_file() and run.claim():
            run.write_spec()
        else:  # another process's run, or one made at this moment by another process
            reason = run_mismatch(path, run.identity)
            if reason is not None:
                raise UnitSpecMismatchError(
                    f"{path}: holds a run of another spec or data: it {reason}; use another --run-dir, "
                    "or `ntkrun resume` that run with its own spec and data"
                )
            if record or not (path / "spec.yaml").is_file():  # a resume records what it used;
                run.write_spec(only_if_changed=True)  # readers (status, units) write nothing
        return run

    def claim(self) -> bool:
        """Create identity.json, whole, if no process has: False if one did (even at this moment),
        so two processes making one shared run never both write it, nor read it half written."""
        text = json.dumps(self.identity.tag(), indent=2, sort_keys=True) + "\n"
        try:
            atomic_write(self.path / IDENTITY, lambda tmp: tmp.write_text(text), exclusive=True)
        except FileExistsError:
            return False
        return True

    @classmethod
    def reopen(cls, path: Path, spec: RunSpec, identity: Identity | None = None) -> RunDir:
        """An interrupted or failed run, to resume: a hidden or failed one is taken back under a
        working name (with its RUNNING lock), a shared one is resumed in place."""
        path = Path(path).resolve()  # `.` has no name to tell a hidden or failed run by
        if is_complete(path):
            raise SpecError(f"{path}: run is complete, nothing to resume")
        if not (path.name.startswith(".") or path.name.endswith(".failed")):
            run = cls.shared(path, spec, identity, record=True)
        else:
            reason = run_mismatch(path, identity or Identity.of(spec))
            if reason is not None:
                raise UnitSpecMismatchError(f"{path}: cannot be resumed here: it {reason}")
            name = path.name.removesuffix(".failed")
            if name.startswith("."):  # .<name>.<random>.partial of a run that was killed outright
                name = name[1:].split(".")[0]
            acquire(path / RUNNING, "still being run")  # taken here, so the move below is ours
            try:
                work = _workdir(path.parent, name)
                os.replace(path, work)  # onto the fresh empty directory: atomic on POSIX
            except BaseException:
                release(path / RUNNING)
                raise
            run = cls(work, spec, name=name, fixed=False, link_latest=True, identity=identity)
            run.holding = True  # the lock moved with the directory
            run.write_spec(only_if_changed=True)
        (run.path / "ERROR").unlink(missing_ok=True)
        run.meta = {"resumed": True}
        return run

    def write_spec(self, only_if_changed: bool = False) -> None:
        """spec.yaml (the resolved spec, as provenance: on a resume it records the data folder and
        executor used last) and identity.json."""
        files = {
            "spec.yaml": yaml.safe_dump(spec_dict(self.spec), sort_keys=False),
            IDENTITY: json.dumps(self.identity.tag(), indent=2, sort_keys=True) + "\n",
        }
        for name, text in files.items():
            path = self.path / name
            if not (only_if_changed and path.is_file() and path.read_text() == text):
                self.write_text(name, text)

    # ---------------------------------------------------------------- units

    def unit_file(self, name: str) -> Path:
        return self.path / "units" / f"{name}.pt"

    def save_unit(self, name: str, result: dict[str, Any], info: dict[str, Any]) -> None:
        """A finished unit's result (tensors, lists, numbers, strings), tagged with the spec hash."""
        (self.path / "units").mkdir(exist_ok=True)
        blob = {"unit": name, **self.identity.tag(), "result": result, "info": info}
        atomic_write(self.unit_file(name), lambda tmp: torch.save(blob, tmp))
        for path in (self.path / "units").glob(f"{name}.ckpt*.pt"):  # its checkpoint and its parts
            path.unlink(missing_ok=True)
        self.failure_file(name).unlink(missing_ok=True)

    def failure_file(self, name: str) -> Path:
        return self.path / "units" / f"{name}.failed"

    def save_failure(self, name: str, reason: str) -> None:
        """Why the unit failed (one line), for `status`; gone once the unit is saved."""
        line = (reason.strip().splitlines() or ["failed"])[0]
        try:
            (self.path / "units").mkdir(exist_ok=True)
            self.write_text(f"units/{name}.failed", line + "\n")
        except OSError:  # (a full disk: the failure being reported matters more than this note)
            pass

    def unit_failure(self, name: str) -> str | None:
        """The reason the unit's last attempt failed, or None."""
        try:
            return self.failure_file(name).read_text().strip() or "failed"
        except OSError:
            return None

    def load_unit(self, name: str) -> dict[str, Any] | None:
        """The unit's result, or None if it has none yet. A file that cannot be read (corrupt,
        truncated by hand) is logged and treated as absent, so the unit is computed again; a
        file of another identity (spec or data) raises UnitSpecMismatchError."""
        blob = self._load(self.unit_file(name))
        if blob is None:
            return None
        reason = self.identity.mismatch(blob) if blob.get("unit") == name else f"is unit {blob.get('unit')}"
        if reason is not None:
            raise UnitSpecMismatchError(f"{self.unit_file(name)}: {reason}")
        return blob["result"]

    def unit_info(self, name: str) -> dict[str, Any] | None:
        """Where and how the unit ran (host, device, threads, ...), without reading its tensors."""
        blob = self._load(self.unit_file(name), mmap=True)
        return None if blob is None else blob.get("info", {})

    def checkpoint_file(self, name: str, part: str | None = None) -> Path:
        return self.path / "units" / (f"{name}.ckpt.pt" if part is None else f"{name}.ckpt.{part}.pt")

    def save_checkpoint(self, name: str, state: dict[str, Any], part: str | None = None) -> None:
        """A long unit's state, atomically replacing the previous checkpoint; a unit may keep
        several named parts (e.g. the row blocks of a large Gram matrix). Tagged with the identity,
        and with the CRC-32 of each tensor at the state's top level; a large one written through
        (atomic.settle). Nothing is written for a unit already done (a block run after its fit)."""
        if self.unit_file(name).is_file() and self._load(self.unit_file(name), mmap=True) is not None:
            return
        (self.path / "units").mkdir(exist_ok=True)
        sums = {key: crc32(value) for key, value in state.items() if isinstance(value, torch.Tensor)}
        blob = {**self.identity.tag(), "state": state, "crc32": sums}
        settle(atomic_write(self.checkpoint_file(name, part), lambda tmp: torch.save(blob, tmp)))

    def load_checkpoint(self, name: str, part: str | None = None) -> dict[str, Any] | None:
        """The saved state, its tensors memory-mapped (read as they are used: a Gram block is copied
        into its Gram, never held twice), or None: absent, unreadable, of another identity, or a
        tensor whose CRC-32 is not the one saved (logged, ignored: the unit computes it again)."""
        path = self.checkpoint_file(name, part)
        blob = self._load(path, mmap=True)
        if blob is None:
            return None
        old = "state" not in blob or "spec_hash" not in blob  # e.g. pca's {step, state, rows}, saved bare
        reason = "is of an older format (untagged)" if old else self.identity.mismatch(blob)
        if reason is None:
            sums = blob.get("crc32", {})
            bad = [key for key, value in sums.items() if crc32(blob["state"].get(key)) != value]
            reason = f"has {bad[0]!r} of another checksum (corrupt)" if bad else None
        if reason is not None:
            LOG.warning("%s: checkpoint ignored: it %s", path, reason)
            return None
        return blob["state"]

    @staticmethod
    def _load(path: Path, mmap: bool = False) -> dict[str, Any] | None:
        """The blob of a unit or checkpoint file (mmap: its tensors mapped, not read)."""
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, weights_only=True, mmap=mmap)
        except Exception as err:  # torch raises RuntimeError, pickle/zip errors, EOFError ...
            LOG.warning("%s: unreadable (%s); computing it again", path, str(err).splitlines()[0][:200])
            return None
        return blob if isinstance(blob, dict) else None

    # ---------------------------------------------------------------- files

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write(self.path / name, lambda tmp: tmp.write_text(text))

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.path / name, lambda tmp: frame.to_csv(tmp, index=False))

    def _meta(self, end: float, device: str) -> dict[str, Any]:
        return {
            "ntkrun_version": __version__,
            "git_commit": _git_commit(),
            "experiment": self.spec.experiment,
            "spec_hash": spec_hash(self.spec),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
            "device": device,
            "threads": torch.get_num_threads(),
            "seeds": list(self.spec.seed_values),
            "start_time": _iso(self.start),
            "end_time": _iso(end),
            "wall_time_s": round(end - self.start, 3),
            **self.meta,
        }

    def _rename(self, base: str) -> Path:
        """Rename the working directory to `base` (or base-2, base-3, ... if taken)."""
        target = _reserve(self.parent, base)
        os.replace(self.path, target)  # onto the reserved empty directory: atomic on POSIX
        self.path = target
        return target

    def finalize(self, device: str) -> Path:
        """Write meta.json (last), move into place and point `latest` at this run."""
        json_text = json.dumps(self._meta(time.time(), device), indent=2) + "\n"
        with signals.deferred():  # meta.json, the rename and `latest` happen together or not at all
            (self.path / "ERROR").unlink(missing_ok=True)  # of an earlier failed attempt
            self.release()
            self.write_text(COMPLETE_MARKER, json_text)
            final = self.path if self.fixed else self._rename(self.name)
            if self.link_latest:
                tmp = self.parent / f".latest.{os.getpid()}"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(final.name)
                os.replace(tmp, self.parent / "latest")  # atomic: readers see the old or the new run
            self.finalized = True  # a signal held until here must not mark the finished run failed
        return final

    def hold(self) -> None:
        """Mark this run as being run by this process (refused while another live one does)."""
        if not self.holding:
            acquire(self.path / RUNNING, "already being run")
            self.holding = True

    def release(self) -> None:
        if self.holding:
            release(self.path / RUNNING)
            self.holding = False

    def make_visible(self) -> None:
        """Move a hidden working directory to its final name now (for a run whose jobs need a
        path that does not change); it is complete when meta.json appears."""
        if not self.fixed:
            self._rename(self.name)
            self.fixed = True

    def fail(self, reason: str) -> Path:
        """Keep the partial files, add ERROR with the reason, and mark the directory failed."""
        with signals.deferred():
            self.release()
            self.write_text("ERROR", reason.rstrip() + "\n")
            return self.path if self.fixed else self._rename(f"{self.name}.failed")


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Inside the block the `ntkrun` logger also writes INFO and above to the file `path`."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.close()
        LOG.removeHandler(handler)


@contextmanager
def open_run(
    root: Path,
    spec: RunSpec,
    resume: Path | None = None,
    at: Path | None = None,
    identity: Identity | None = None,
) -> Iterator[RunDir]:
    """A run directory (new under root, `resume` reopened, or the sharded run `at`) with run.log
    attached to the `ntkrun` logger; marked failed on any exception."""
    if resume is not None:
        run = RunDir.reopen(resume, spec, identity)
    elif at is not None:
        run = RunDir.shared(at, spec, identity)
    else:
        run = RunDir.create(root, spec, identity=identity)
    with log_to(run.path / "run.log"):
        run.hold()  # refused while another live process runs it: then nothing here is ours to mark
        try:
            yield run
        except BaseException as err:
            if not run.finalized:  # (a signal held during finalize, delivered just after: it is done)
                reason = stopped(err) if isinstance(err, (KeyboardInterrupt, Stop)) else str(err)
                LOG.error("run failed: %s", reason or type(err).__name__)
                run.fail(f"{type(err).__name__}: {reason}")
            raise
        finally:
            run.release()


def is_complete(path: Path) -> bool:
    """meta.json is there, no ERROR, and the name is not a working (.partial) name."""
    path = Path(path).resolve()
    hidden = path.name.startswith(".") or path.name.endswith(".failed")
    return not hidden and (path / COMPLETE_MARKER).is_file() and not (path / "ERROR").exists()


def latest_run(root: Path) -> Path | None:
    """The most recently finished complete run under root, of any experiment."""
    runs = [p.resolve() for p in Path(root).glob("*/latest") if is_complete(p)]
    return max(runs, key=lambda p: (p / COMPLETE_MARKER).stat().st_mtime, default=None)
