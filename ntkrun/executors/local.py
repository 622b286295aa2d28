"""Units computed in a pool of local worker processes."""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import torch

from ntkrun.errors import ExecutorError
from ntkrun.executors.base import Dispatch, Executor
from ntkrun.rundir import RunDir
from ntkrun.runners.common import Progress, Unit
from ntkrun.spec import RunSpec
from ntkrun.units import unit_main


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us


class LocalExecutor(Executor):
    def __init__(self, jobs: int) -> None:
        self.jobs = jobs

    def run(self, spec: RunSpec, run: RunDir, todo: list[Unit], progress: Progress) -> Dispatch:
        """Compute `todo` in `jobs` worker processes (spawned: no forked BLAS state), stage by
        stage. Each worker gets an equal share of this machine's torch threads. A unit's error is
        raised here; a worker that dies (killed, out of memory) is an ExecutorError, not a hang."""
        threads = max(1, torch.get_num_threads() // self.jobs)
        progress.start(sum(u.cost for u in todo) or float(len(todo)))
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_ignore_sigint)
        try:
            for stage in sorted({u.stage for u in todo}):
                batch = [u for u in todo if u.stage == stage]
                futures = {pool.submit(unit_main, str(run.path), u.name, threads): u for u in batch}
                for future in as_completed(futures):
                    future.result()
                    progress.advance(futures[future].name, futures[future].cost or 1.0)
        except BrokenProcessPool as err:
            raise ExecutorError(
                f"a worker process died (killed, or out of memory?); finished units are kept in {run.path}"
            ) from err
        except BaseException:
            for process in list(getattr(pool, "_processes", {}).values()):  # no public way to stop them
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return Dispatch(finished=True)
