"""Test-only: with this folder on PYTHONPATH, the SLURM array task whose index is $FAULT_TASK arms
the fault $FAULT_POINT / $FAULT_N / $FAULT_ACTION of tests/faults.py (marker file $FAULT_MARKER)
before anything else runs in it. Every other process is left alone."""

import os
import sys
from pathlib import Path

if (
    os.environ.get("FAULT_TASK") is not None
    and os.environ.get("SLURM_ARRAY_TASK_ID") == os.environ["FAULT_TASK"]
):
    sys.path.insert(0, str(Path(__file__).parents[2]))
    from faults import _arm

    _arm(os.environ["FAULT_POINT"], int(os.environ["FAULT_N"]), os.environ["FAULT_ACTION"],
         Path(os.environ["FAULT_MARKER"]))  # fmt: skip
