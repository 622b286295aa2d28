"""`--list-units`' time estimates against the measured units of real runs, side by side.

For each run given (experiment, preset and --set overrides; by default the quick presets of the
experiments and two small CNN runs), the units' estimated seconds (ntkrun.orchestrate.unit_table:
timed probes of GD steps, kernels, solves and data reads) are printed beside the wall time each
unit recorded when the run was then made (its units/<name>.pt "info"), with their ratio. The
summary line gives the range of measured / estimated over the units of at least --floor seconds
(below it a unit is start-up: logging, saving, building small tensors) and over whole runs.

    python benchmarks/estimates.py [--floor 0.25] [RUN ...]    RUN: "experiment preset [KEY=VALUE ...]"

Data: NTKRUN_DATA_DIR (Fashion-MNIST or MNIST with both splits) for pca and generalization.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ntkrun import orchestrate
from ntkrun.units import cpu_model

RUNS = [
    "scaling quick",
    "convergence quick",
    "regression quick",
    "features quick",
    "pca quick",
    "generalization quick",
    "scaling cnn network.width=[16,64] network.depth=[3]",
    "generalization cnn-gap data.n_train=[16] data.n_test=16",
]


def measure(run: str, floor: float) -> tuple[float, float, list[float]]:
    """Print the run's units; -> (estimated total, measured total, ratios of units >= floor)."""
    experiment, preset, *sets = shlex.split(run)
    plan = orchestrate.plan(orchestrate.Request(experiment, preset=preset, sets=sets), checks=False)
    table = orchestrate.unit_table(plan)
    out = Path(tempfile.mkdtemp())
    command = [sys.executable, "-m", "ntkrun", experiment, "--preset", preset, "-q", "-o", str(out)]
    subprocess.run(command + [a for s in sets for a in ("--set", s)], check=True, stdout=subprocess.DEVNULL)
    units = next(p for p in out.rglob("units") if p.is_dir())
    print(f"\n{run}")
    ratios, measured = [], 0.0
    for row in table.itertuples(index=False):
        wall = torch.load(units / f"{row.unit}.pt", weights_only=False)["info"]["wall_time_s"]
        measured += wall
        ratio = wall / row.seconds
        if wall >= floor:
            ratios.append(ratio)
        print(
            f"  {row.unit:<28} estimated {row.seconds:9.3f} s   measured {wall:9.3f} s   ratio {ratio:6.2f}"
        )
    total = float(table["seconds"].sum())
    ratio = measured / total
    print(f"  {'(whole run)':<28} estimated {total:9.3f} s   measured {measured:9.3f} s   ratio {ratio:6.2f}")
    return total, measured, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=RUNS)
    parser.add_argument("--floor", type=float, default=0.25, help="units shorter than this are start-up")
    args = parser.parse_args()
    print(
        f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
    )
    ratios, runs = [], []
    for run in args.runs:
        estimated, measured, unit_ratios = measure(run, args.floor)
        ratios += unit_ratios
        runs.append(measured / estimated)
    print(
        f"\nmeasured / estimated: units of at least {args.floor} s {min(ratios):.2f} to {max(ratios):.2f} "
        f"({len(ratios)} units); whole runs {min(runs):.2f} to {max(runs):.2f} ({len(runs)} runs)"
    )


if __name__ == "__main__":
    main()
