"""Deterministic fault injection: run `ntkrun` in a child process that delivers a signal to
itself (or pauses) at a chosen point of the run, so a test knows exactly which faults happened.

    python tests/faults.py POINT N ACTION MARKER -- <ntkrun arguments>

At the N-th time the run reaches POINT, the child writes MARKER (so the test can tell the fault
happened), then does ACTION: SIGINT / SIGTERM / SIGKILL sent to itself, or HOLD: wait until the
file MARKER.release exists; NONE: nothing (with $FAULT_STAMP set, run directories are named as if
every run started at that UTC time, forcing same-second name collisions). Points:

    import        inside the start-up block that holds signals while torch loads
    gd-step       before a GD step of any network
    unit-write    a unit's result written to its temporary file, before the rename
    unit-saved    a unit's result file in place
    checkpoint    a unit's checkpoint in place
    aggregate     the figure being written (after the CSVs, before meta.json)
    finalize      meta.json written, the rename and `latest` still to come (signals held)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POINTS = ("import", "gd-step", "unit-write", "unit-saved", "checkpoint", "aggregate", "finalize")
ACTIONS = ("SIGINT", "SIGTERM", "SIGKILL", "HOLD", "NONE")


def launch(
    point: str, n: int, action: str, marker: Path, args: list[str], stamp: str | None = None
) -> subprocess.Popen:
    """Start `ntkrun ARGS` with the fault armed (and run directories stamped `stamp`)."""
    assert point in POINTS and action in ACTIONS, (point, action)
    command = [sys.executable, __file__, point, str(n), action, str(marker), "--", *args]
    env = {**os.environ, **({"FAULT_STAMP": stamp} if stamp else {})}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _fire(action: str, marker: Path) -> None:
    if action == "NONE":
        return
    marker.write_text(f"{action}\n")
    if action == "HOLD":
        release = marker.with_name(marker.name + ".release")
        while not release.exists():
            time.sleep(0.01)
        return
    os.kill(os.getpid(), getattr(signal, action))
    time.sleep(0.5)  # a handled signal raises at the next bytecode; SIGKILL never returns


def _arm(point: str, n: int, action: str, marker: Path) -> None:
    """Wrap the function at `point` so that its n-th call fires the action."""
    import torch

    import ntkrun.plots
    import ntkrun.rundir
    import ntkrun.runners.common

    calls = {"n": 0}

    def counted(fire_before: bool, original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if fire_before and calls["n"] == n:
                _fire(action, marker)
            result = original(*args, **kwargs)
            if not fire_before and calls["n"] == n:
                _fire(action, marker)
            return result

        return wrapper

    if point == "gd-step":
        ntkrun.runners.common.gd_step = counted(True, ntkrun.runners.common.gd_step)
    elif point == "unit-write":
        original_save = torch.save

        def save(obj, target, *args, **kwargs):
            original_save(obj, target, *args, **kwargs)
            if isinstance(obj, dict) and "result" in obj:  # a unit result, not a checkpoint
                calls["n"] += 1
                if calls["n"] == n:
                    _fire(action, marker)

        torch.save = save
    elif point in ("unit-saved", "checkpoint"):
        name = "save_unit" if point == "unit-saved" else "save_checkpoint"
        setattr(ntkrun.rundir.RunDir, name, counted(False, getattr(ntkrun.rundir.RunDir, name)))
    elif point == "aggregate":
        ntkrun.plots._save = counted(True, ntkrun.plots._save)
    elif point == "finalize":
        original_write = ntkrun.rundir.RunDir.write_text

        def write_text(self, name, text):
            path = original_write(self, name, text)
            if name == ntkrun.rundir.COMPLETE_MARKER:
                calls["n"] += 1
                if calls["n"] == n:
                    _fire(action, marker)
            return path

        ntkrun.rundir.RunDir.write_text = write_text


if __name__ == "__main__":
    point, n, action, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    args = sys.argv[sys.argv.index("--") + 1 :]
    if point == "import":  # armed before the entry point runs, without importing torch first
        import ntkrun.signals

        original_deferred = ntkrun.signals.deferred
        count = {"n": 0}

        class Deferred:
            def __enter__(self) -> None:
                self.inner = original_deferred()
                self.inner.__enter__()
                count["n"] += 1
                if count["n"] == n:
                    _fire(action, marker)  # held: delivered when the block ends

            def __exit__(self, *exc: object) -> None:
                self.inner.__exit__(*exc)

        ntkrun.signals.deferred = Deferred
    else:
        _arm(point, n, action, marker)
    if os.environ.get("FAULT_STAMP"):
        import ntkrun.rundir

        ntkrun.rundir._stamp = lambda t: os.environ["FAULT_STAMP"]
    sys.argv = ["ntkrun", *args]
    from ntkrun.entry import main

    main()


def unit_main_or_die(run_dir: str, name: str) -> str:
    """A pool worker's entry point that kills its own process (SIGKILL, as the out-of-memory
    killer would) when given the unit named in $FAULT_DIE_UNIT; any other unit runs as usual."""
    if name == os.environ.get("FAULT_DIE_UNIT"):
        os.kill(os.getpid(), signal.SIGKILL)
    from ntkrun.units import unit_main

    return unit_main(run_dir, name)


def unit_main_counting(run_dir: str, name: str) -> str:
    """A pool worker's entry point that appends to $COUNT_FILE the first network of every
    Monte-Carlo share that pca computes in it, whichever unit asked (the share's own unit, or
    another computing it inline because it was not there yet)."""
    import ntkrun.runners.pca as pca

    original = pca.limit_share

    def counted(description, work, X, X2=None):
        with open(os.environ["COUNT_FILE"], "a") as fh:
            fh.write(f"{work.start}\n")
        return original(description, work, X, X2)

    if not hasattr(original, "counting"):  # once per worker process, which serves several units
        counted.counting = True
        pca.limit_share = counted
    from ntkrun.units import unit_main

    with open(os.environ["COUNT_FILE"] + ".events", "a") as fh:
        fh.write(f"start {name}\n")
    unit_main(run_dir, name)
    with open(os.environ["COUNT_FILE"] + ".events", "a") as fh:
        fh.write(f"end {name}\n")
    return name


def unit_main_gated(run_dir: str, name: str) -> str:
    """A pool worker's entry point that appends "start <unit>" / "end <unit>" to $EVENTS_FILE and
    holds the unit named in $GATE_UNIT until the line $GATE_OPEN is there (at most 600 s; then it
    notes "gate timed out" and goes on): a deterministic check that another unit starts meanwhile.
    The bound only ends a failing test (a scheduler that never starts that unit) instead of hanging
    it; a passing one waits for the event itself, however slow the machine."""
    import time
    from pathlib import Path

    from ntkrun.units import unit_main

    events = Path(os.environ["EVENTS_FILE"])
    with open(events, "a") as fh:
        fh.write(f"start {name}\n")
    if name == os.environ.get("GATE_UNIT"):
        deadline = time.monotonic() + 600
        while os.environ["GATE_OPEN"] not in events.read_text().splitlines():
            if time.monotonic() > deadline:
                with open(events, "a") as fh:
                    fh.write("gate timed out\n")
                break
            time.sleep(0.05)
    unit_main(run_dir, name)
    with open(events, "a") as fh:
        fh.write(f"end {name}\n")
    return name
