"""Run directories and the files in them. Every file is written under a temporary name and
renamed into place, so no file under its final name is ever partial.

A run run by this process (executor inline or local) is built under a hidden name:
<root>/<experiment>/.<stamp>_<hash>.<random>.partial   while running
<root>/<experiment>/<stamp>_<hash>                     when complete (and `latest` points at it)
<root>/<experiment>/<stamp>_<hash>.failed              after an error or Ctrl-C, with an ERROR file
A sharded run (executor slurm, or --run-dir) lives at a fixed visible path from the start,
which many processes share; it is complete when meta.json is there, written last by aggregation.

units/<unit>.pt        a finished unit's result, with the spec hash it belongs to
units/<unit>.ckpt.pt   a long unit's latest checkpoint (removed when the unit finishes)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

import ntkrun
from ntkrun.entry import Stop, stopped
from ntkrun.spec import RunSpec, spec_dict, spec_hash

LOG = logging.getLogger("ntkrun")
COMPLETE_MARKER = "meta.json"  # written last; a complete run has it and no ERROR file
RUNNING = "RUNNING"  # lock file of the process running a run (inline or local executor)


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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(target: Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) into a temporary file beside `target`, then rename it over `target`.

    A failure (a full disk, a signal) leaves `target` as it was and removes the temporary file.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 would hide results from collaborators
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (renames that must happen together)."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class LockedError(ValueError):
    """A lock file is held by a live process."""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), so that a
    reused pid is not taken for the lock's holder; "" where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _start_time(pid) in ("", start)


def my_lock_text() -> str:
    pid = os.getpid()
    return f"{platform.node()} {pid} {_start_time(pid)}".strip()


def lock_holder(lock: Path, stale_after: float | None = None, remove: bool = True) -> str | None:
    """Who holds the lock file ("host pid"), or None if nobody does. On this host a lock is
    stale when its process is gone (pid and start time); from another host, when older than
    `stale_after` seconds (None: never, the message names the file to delete by hand). A stale
    lock is removed (unless remove=False, for read-only commands)."""
    try:
        text, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    host, pid, start = ([*text.split(), "", "", ""])[:3]
    if host == platform.node() and pid.isdigit():
        stale = not _alive(int(pid), start)
    else:
        stale = stale_after is not None and age > stale_after
    if not stale:
        return f"{host} {pid}".strip() or "unknown"
    if remove:
        _remove_stale(lock, text)
    return None


def _remove_stale(lock: Path, text: str) -> None:
    """Remove `lock` if it still holds `text`: moved aside first, so that a fresh lock another
    process took meanwhile is put back, never deleted."""
    aside = lock.with_name(f".{lock.name}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if aside.read_text().strip() == text:
        LOG.warning("%s: removed a stale lock (%s)", lock, text)
    else:
        try:
            os.link(aside, lock)  # not ours to remove: back under its name unless taken again
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def acquire(lock: Path, what: str, stale_after: float | None = None) -> None:
    """Create `lock` holding "host pid start" atomically (written to a temporary file, then
    hard-linked to the lock's name: the lock is never empty); LockedError if it is held."""
    text = my_lock_text()
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                return
            except FileExistsError:
                holder = lock_holder(lock, stale_after)
                if holder is not None:
                    raise LockedError(
                        f"{lock.parent}: {what} by {holder} (if that process is gone, delete {lock})"
                    ) from None
        raise LockedError(f"{lock}: cannot take the lock")
    finally:
        tmp.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove `lock` if this process holds it (never another process's)."""
    try:
        if lock.read_text().strip() == my_lock_text():
            lock.unlink(missing_ok=True)
    except (FileNotFoundError, NotADirectoryError):
        pass


class UnitSpecMismatchError(ValueError):
    """A unit file belongs to another spec."""


def _workdir(parent: Path, name: str) -> Path:
    """A fresh hidden working directory .<name>.<random>.partial with the usual umask permissions
    (mkdtemp's 0700 would hide finished runs from collaborators on a shared filesystem)."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    path.chmod(0o777 & ~_umask())
    return path


class RunDir:
    """One run's directory. Files go into `path`; `finalize` or `fail` ends it."""

    def __init__(self, root: Path, spec: RunSpec, *, visible: bool = False) -> None:
        """A new run under root/<experiment>: hidden until finalized, or (visible) at its final
        name from the start, for a sharded run whose units run elsewhere."""
        self.spec = spec
        self.parent = Path(root) / spec.experiment
        self.start = time.time()
        stamp = datetime.fromtimestamp(self.start, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.name = f"{stamp}_{spec_hash(spec)}"
        self.parent.mkdir(parents=True, exist_ok=True)
        self.fixed, self.link_latest, self.finalized = visible, True, False
        self.path = self._reserve(self.name) if visible else _workdir(self.parent, self.name)
        self.meta: dict[str, Any] = {}
        self.write_text("spec.yaml", yaml.safe_dump(spec_dict(spec), sort_keys=False))

    @classmethod
    def at(cls, path: Path, spec: RunSpec) -> RunDir:
        """The sharded run at `path` (created if absent), shared with other processes; its
        spec.yaml must be this spec's. Raises UnitSpecMismatchError."""
        path = Path(path)
        run = cls.__new__(cls)
        run.spec, run.parent, run.path, run.name = spec, path.parent, path, path.name
        run.start, run.meta, run.fixed, run.finalized = time.time(), {}, True, False
        run.link_latest = path.parent.name == spec.experiment  # under <root>/<experiment>/
        path.mkdir(parents=True, exist_ok=True)
        (path / "units").mkdir(exist_ok=True)
        if (path / "spec.yaml").is_file():
            theirs = yaml.safe_load((path / "spec.yaml").read_text())
            ours = spec_dict(spec)
            strip = lambda d: {k: v for k, v in d.items() if k != "executor"}  # noqa: E731
            if not isinstance(theirs, dict) or strip(theirs) != strip(ours):
                raise UnitSpecMismatchError(
                    f"{path}: holds a run of another spec (its spec.yaml differs from this one); "
                    "use another --run-dir, or `ntkrun resume` that run"
                )
        else:
            run.write_text("spec.yaml", yaml.safe_dump(spec_dict(spec), sort_keys=False))
        return run

    @classmethod
    def reopen(cls, path: Path, spec: RunSpec) -> RunDir:
        """Take an interrupted or failed run directory back under a working name, to resume it."""
        path = Path(path).resolve()  # `.` has no name to tell a hidden or failed run by
        if is_complete(path):
            raise ValueError(f"{path}: run is complete, nothing to resume")

        if not (path.name.startswith(".") or path.name.endswith(".failed")):
            run = cls.at(path, spec)  # a sharded run: resumed in place
            (run.path / "ERROR").unlink(missing_ok=True)
            run.meta = {"resumed": True}
            return run
        run = cls.__new__(cls)
        run.spec, run.parent, run.start = spec, path.parent, time.time()
        run.fixed, run.link_latest, run.finalized = False, True, False
        name = path.name.removesuffix(".failed")
        if name.startswith("."):  # .<name>.<random>.partial of a run that was killed outright
            name = name[1:].split(".")[0]
        run.name = name
        acquire(path / RUNNING, "still being run")  # taken here, so the move below is ours to make
        try:
            run.path = _workdir(run.parent, name)
            os.replace(path, run.path)  # onto the fresh empty directory: atomic on POSIX
        except BaseException:
            release(path / RUNNING)
            raise
        run.holding = True  # the lock moved with the directory
        (run.path / "ERROR").unlink(missing_ok=True)
        run.meta = {"resumed": True}
        return run

    # ---------------------------------------------------------------- units

    def unit_file(self, name: str) -> Path:
        return self.path / "units" / f"{name}.pt"

    def save_unit(self, name: str, result: dict[str, Any], info: dict[str, Any]) -> None:
        """A finished unit's result (tensors, lists, numbers, strings), tagged with the spec hash."""
        (self.path / "units").mkdir(exist_ok=True)
        blob = {"unit": name, "spec_hash": spec_hash(self.spec), "result": result, "info": info}
        atomic_write(self.unit_file(name), lambda tmp: torch.save(blob, tmp))
        self.checkpoint_file(name).unlink(missing_ok=True)

    def load_unit(self, name: str) -> dict[str, Any] | None:
        """The unit's result, or None if it has none yet. A file that cannot be read (corrupt,
        truncated by hand) is logged and treated as absent, so the unit is computed again; a
        file of another spec raises UnitSpecMismatchError."""
        blob = self._load(self.unit_file(name))
        if blob is None:
            return None
        if blob.get("unit") != name or blob.get("spec_hash") != spec_hash(self.spec):
            raise UnitSpecMismatchError(
                f"{self.unit_file(name)}: belongs to spec {blob.get('spec_hash')}, not this run's "
                f"{spec_hash(self.spec)}"
            )
        return blob["result"]

    def unit_info(self, name: str) -> dict[str, Any] | None:
        blob = self._load(self.unit_file(name))
        return None if blob is None else blob.get("info", {})

    def checkpoint_file(self, name: str) -> Path:
        return self.path / "units" / f"{name}.ckpt.pt"

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        """A long unit's state, atomically replacing the previous checkpoint."""
        (self.path / "units").mkdir(exist_ok=True)
        atomic_write(self.checkpoint_file(name), lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        return self._load(self.checkpoint_file(name))

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, weights_only=True)
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

    def _reserve(self, base: str) -> Path:
        """Create the empty directory `base` (or base-2, base-3, ... if taken), atomically."""
        for k in range(1, 1000):
            target = self.parent / (base if k == 1 else f"{base}-{k}")
            try:
                target.mkdir()
            except FileExistsError:
                continue
            target.chmod(0o777 & ~_umask())
            return target
        raise RuntimeError(f"no free run directory name under {self.parent} for {base}")

    def _rename(self, base: str) -> Path:
        """Rename the working directory to `base` (or base-2, base-3, ... if taken)."""
        target = self._reserve(base)
        os.replace(self.path, target)  # onto the reserved empty directory: atomic on POSIX
        self.path = target
        return target

    def finalize(self, device: str) -> Path:
        """Write meta.json (last), move into place and point `latest` at this run."""
        json_text = json.dumps(self._meta(time.time(), device), indent=2) + "\n"
        with signals_deferred():  # meta.json, the rename and `latest` happen together or not at all
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
        if not getattr(self, "holding", False):
            acquire(self.path / RUNNING, "already being run")
            self.holding = True

    def release(self) -> None:
        if getattr(self, "holding", False):
            release(self.path / RUNNING)
            self.holding = False

    def make_visible(self) -> None:
        """Move a hidden working directory to its final name now (for a sharded run, whose jobs
        need a path that does not change); it is complete when meta.json appears."""
        if not self.fixed:
            self._rename(self.name)
            self.fixed = True

    def fail(self, reason: str) -> Path:
        """Keep the partial files, add ERROR with the reason, and mark the directory failed."""
        with signals_deferred():
            self.release()
            self.write_text("ERROR", reason.rstrip() + "\n")
            return self.path if self.fixed else self._rename(f"{self.name}.failed")


@contextmanager
def open_run(
    root: Path, spec: RunSpec, resume: Path | None = None, at: Path | None = None
) -> Iterator[RunDir]:
    """A run directory (new under root, `resume` reopened, or the sharded run `at`) with run.log
    attached to the `ntkrun` logger; marked failed on any exception."""
    if resume is not None:
        run = RunDir.reopen(resume, spec)
    else:
        run = RunDir(root, spec) if at is None else RunDir.at(at, spec)
    handler = logging.FileHandler(run.path / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        run.hold()  # refused while another live process runs it: then nothing here is ours to mark
    except BaseException:
        handler.close()
        LOG.removeHandler(handler)
        raise
    try:
        yield run
    except BaseException as err:
        if run.finalized:  # e.g. Ctrl-C held during finalize, delivered just after: the run is done
            handler.close()
            LOG.removeHandler(handler)
            raise
        reason = stopped(err) if isinstance(err, (KeyboardInterrupt, Stop)) else str(err)
        LOG.error("run failed: %s", reason or type(err).__name__)
        handler.close()
        LOG.removeHandler(handler)
        run.fail(f"{type(err).__name__}: {reason}")
        raise
    finally:
        run.release()
    handler.close()
    LOG.removeHandler(handler)


def is_complete(path: Path) -> bool:
    """meta.json is there, no ERROR, and the name is not a working (.partial) name."""
    path = Path(path).resolve()
    hidden = path.name.startswith(".") or path.name.endswith(".failed")
    return not hidden and (path / COMPLETE_MARKER).is_file() and not (path / "ERROR").exists()


def latest_run(root: Path) -> Path | None:
    """The most recently finished complete run under root, of any experiment."""
    runs = [p.resolve() for p in Path(root).glob("*/latest") if is_complete(p)]
    return max(runs, key=lambda p: (p / COMPLETE_MARKER).stat().st_mtime, default=None)
