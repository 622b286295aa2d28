"""Units computed in a pool of local worker processes that this executor starts and owns.

Each worker is a spawned `multiprocessing.Process` (no forked BLAS state) serving units over its
own pipe. The parent waits on the pipes and on the processes' sentinels together, so a worker
that dies (killed, out of memory) is seen at once; on any error or signal every worker is ended
with `Process.terminate()` and joined before the exception goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from typing import Any

from ntkrun.errors import ExecutorError, RunError
from ntkrun.executors.base import Dispatch, Executor
from ntkrun.rundir import RunDir
from ntkrun.spec import RunSpec
from ntkrun.units import unit_main
from ntkrun.work import Progress, Unit

JOIN_S = 10.0  # how long a worker may take to exit once asked (or terminated)


def _serve(conn: Connection, compute: Callable[[str, str], str]) -> None:
    """A worker: compute(run_dir, unit) for each (run_dir, unit) received, answer
    (unit, None) or (unit, error); None ends it. Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (task := conn.recv()) is not None:
        run_dir, name = task
        try:
            compute(run_dir, name)
            conn.send((name, None))
        except BaseException as err:  # sent back whole where it pickles, else as its message
            try:
                conn.send((name, err))
            except Exception:
                conn.send((name, RunError(f"unit {name}: {type(err).__name__}: {err}")))


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables (where not set already) for the processes started inside."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class _Worker:
    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        args = (child, unit_main)  # the entry point passed by reference (tests replace it)
        self.process = context.Process(target=_serve, args=args, daemon=True)
        self.process.start()
        child.close()
        self.unit: Unit | None = None

    def stop(self, now: bool) -> None:
        """Ask the worker to exit (or terminate it, `now`), then join it."""
        if self.process.is_alive() and not now:
            try:
                self.conn.send(None)
            except OSError:
                now = True
        if now and self.process.is_alive():
            self.process.terminate()
        self.process.join(JOIN_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def sharing(jobs: int, threads: int, units: int) -> float:
    """How many times slower a unit runs in a pool of `jobs` workers of `threads` threads than alone:
    the busy workers' threads over this machine's cores, at least 1 (2 workers of 2 threads on 2
    cores: 2; measured on the cnn-full preset's units, 1.6-2.4x their time alone)."""
    return max(1.0, min(jobs, units) * threads / (os.cpu_count() or 1))


class LocalExecutor(Executor):
    def __init__(self, jobs: int) -> None:
        self.jobs = jobs

    def run(self, spec: RunSpec, run: RunDir, todo: list[Unit], progress: Progress) -> Dispatch:
        """Compute `todo` in `jobs` worker processes, each unit once the units it reads are done
        (`_schedule`). A unit computes with the run's
        executor.threads (as inline and on SLURM: the same bytes).
        Where the workers' threads outnumber the cores, their OpenMP threads sleep instead of
        spinning while they wait (OMP_WAIT_POLICY=PASSIVE: the features quick preset in 2 workers
        x 2 threads on 2 cores took 73 s spinning, 27 s passive, against 28 s inline). A unit's
        error is raised here; a worker that dies is an ExecutorError, not a hang; Ctrl-C or
        SIGTERM terminates every worker."""
        passive = sharing(self.jobs, spec.executor.threads or 1, len(todo)) > 1
        progress.start(sum(u.flops for u in todo) or float(len(todo)))
        if not todo:
            return Dispatch(finished=True)
        context = multiprocessing.get_context("spawn")
        workers: list[_Worker] = []
        failed = True
        try:
            with _environment({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}):
                workers = [_Worker(context) for _ in range(min(self.jobs, len(todo)))]
            self._schedule(run, todo, workers, progress)
            failed = False
        finally:
            for worker in workers:
                worker.stop(now=failed)
        return Dispatch(finished=True)

    @staticmethod
    def _schedule(run: RunDir, todo: list[Unit], workers: list[_Worker], progress: Progress) -> None:
        """Hand each unit, in `todo`'s order (stage 0 first), to an idle worker as soon as what it
        reads is done: the units of its `needs` that are in `todo` where it declares them (a fit
        starts when its own Gram blocks are done, not when every block of the run is), else every
        unit of an earlier stage (what a unit reads without declaring it, e.g. a Reference, is of
        stage 0). Returns when every unit has answered."""
        pending, waited = deque(todo), {u.name for u in todo}
        done: set[str] = set()
        left = Counter(u.stage for u in todo)  # units of each stage not answered yet

        def ready(unit: Unit) -> bool:
            if unit.needs:
                return all(n.name not in waited or n.name in done for n in unit.needs)
            return not any(left[stage] for stage in range(unit.stage))

        while pending or any(w.unit is not None for w in workers):
            for worker in workers:
                unit = next((u for u in pending if ready(u)), None) if worker.unit is None else None
                if unit is None:
                    continue
                pending.remove(unit)
                worker.unit = unit
                try:  # a worker that died idle (killed, out of memory) has a broken pipe
                    worker.conn.send((str(run.path), unit.name))
                except OSError:
                    worker.process.join(JOIN_S)
                    _died(run, worker)
            busy = [w for w in workers if w.unit is not None]
            if not busy:  # (units whose needs are neither in todo nor answered: cannot happen)
                raise RunError(f"units {', '.join(u.name for u in pending)} wait on units never run")
            ready_conns = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.conn in ready_conns or worker.conn.poll():
                    try:
                        name, err = worker.conn.recv()
                    except EOFError:  # the pipe closed: the worker is gone
                        _died(run, worker)
                    if err is not None:
                        raise err
                    progress.advance(name, worker.unit.flops or 1.0)
                    done.add(name)
                    left[worker.unit.stage] -= 1
                    worker.unit = None
                elif worker.process.sentinel in ready_conns:
                    _died(run, worker)


def _died(run: RunDir, worker: _Worker) -> None:
    unit = worker.unit.name if worker.unit is not None else "?"
    raise ExecutorError(
        f"a worker process died while computing unit {unit} (exit code {worker.process.exitcode}: "
        f"killed, or out of memory?); finished units are kept in {run.path}"
    )
