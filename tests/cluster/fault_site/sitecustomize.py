"""Test-only: with this folder on PYTHONPATH, the SLURM array task whose index is $FAULT_TASK (or,
with FAULT_TASK=any, every SLURM job) arms
the fault $FAULT_POINT / $FAULT_N / $FAULT_ACTION of tests/faults.py (marker file $FAULT_MARKER)
before anything else runs in it, once: a requeued task whose marker exists runs unharmed. Every
other process is left alone."""

import os
import sys
from pathlib import Path

TASK = os.environ.get("FAULT_TASK")
MARKER = Path(os.environ.get("FAULT_MARKER", "/nonexistent"))
IN_JOB = os.environ.get("SLURM_JOB_ID") is not None
if (
    TASK is not None
    and IN_JOB
    and TASK in ("any", os.environ.get("SLURM_ARRAY_TASK_ID"))
    and not MARKER.exists()
):
    sys.path.insert(0, str(Path(__file__).parents[2]))
    from faults import _arm

    _arm(os.environ["FAULT_POINT"], int(os.environ["FAULT_N"]), os.environ["FAULT_ACTION"], MARKER)
