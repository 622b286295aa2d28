"""The experiment commands (`ntkrun convergence`, ...) and `ntkrun resume`, generated from the
experiment records: each record's flags become options that set spec keys."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ntkrun import experiments
from ntkrun.cli.report import RichProgress, frame_table, heavy, out, reported, say
from ntkrun.experiments import EXPERIMENTS, Experiment, Flag
from ntkrun.spec import Override, spec_hash

if TYPE_CHECKING:
    from ntkrun import orchestrate

# (parameter, type, option names, help, default) of the options that are not spec keys
SPEC_SOURCES = [
    ("preset", str | None, ("--preset", "-p"), "Preset name (see `ntkrun presets`).", None),
    ("config", Path | None, ("--config", "-c"), "YAML spec file (overlays the preset).", None),
    ("set_", list[str] | None, ("--set", "-s"), "Override: KEY.PATH=VALUE (repeatable).", None),
    ("sweep", list[str] | None, ("--sweep",), "Sweep: KEY.PATH=V1,V2,... (repeatable; the grid of all "
     "of them is one run; lists in brackets).", None),
]  # fmt: skip
RUN_OPTIONS = [
    ("output_root", Path | None, ("--output-root", "-o"), "Root of run directories.", None),
    ("quiet", bool, ("--quiet", "-q"), "No progress bar or table.", False),
    ("unit", list[str] | None, ("--unit",), "Compute only this unit (index or name, repeatable) into "
     "--run-dir; see --list-units.", None),
    ("run_dir", Path | None, ("--run-dir",), "Run directory shared by the units of a sharded run "
     "(created if absent).", None),
    ("wait", bool, ("--wait",), "slurm: block until the jobs end, then aggregate.", False),
    ("list_units", bool, ("--list-units",), "Print the units of this spec (index, name, cost) and exit.",
     False),
    ("check", bool, ("--check",), "Validate the spec, data and memory estimate, print a summary, "
     "run nothing.", False),
    ("force", bool, ("--force",), "Run even if the memory estimate exceeds what is available.", False),
    ("max_points", int, ("--max-points",), "Refuse a sweep of more points than this.", 256),
]  # fmt: skip
RESUMABLE = {"set_", "quiet", "wait", "force"}


def _parameter(name: str, kind: Any, names: tuple[str, ...], help: str, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, typer.Option(*names, help=help)],
    )


def _flag_name(flag: Flag) -> str:
    return flag.name.lstrip("-").replace("-", "_")


def _flag_parameter(flag: Flag) -> inspect.Parameter:
    return _parameter(_flag_name(flag), flag.type | None, (flag.name,), flag.help, None)


def _overrides(flags: tuple[Flag, ...], values: dict[str, Any]) -> list[Override]:
    """(spec key, value, flag) of each flag given."""
    found: list[Override] = []
    for flag in flags:
        value = values.get(_flag_name(flag))
        if value is None or value == []:
            continue
        value = str(value) if isinstance(value, Path) else list(value) if isinstance(value, list) else value
        found.append((flag.path, value, flag.name))
    return found


def _command(name: str, help: str, parameters: list[inspect.Parameter], body: Any) -> Any:
    """A Typer command function with the given keyword parameters, calling body(values)."""

    def command(**values: Any) -> None:
        body(values)

    command.__name__, command.__doc__ = name, help
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return reported(command)


def run_command(record: Experiment) -> Any:
    parameters = [_parameter(*o) for o in SPEC_SOURCES]
    parameters += [_flag_parameter(f) for f in record.all_flags]
    parameters += [_parameter(*o) for o in RUN_OPTIONS]

    def body(values: dict[str, Any]) -> None:
        request = heavy("ntkrun.orchestrate").Request(
            record.name,
            preset=values["preset"],
            config=values["config"],
            sets=values["set_"] or [],
            overrides=_overrides(record.all_flags, values),
            sweeps=values["sweep"] or [],
            max_points=values["max_points"],
            output_root=values["output_root"],
            unit_keys=values["unit"] or [],
            run_dir=values["run_dir"],
            wait=values["wait"],
            force=values["force"],
        )
        run(request, values["quiet"], values["list_units"], values["check"])

    return _command(record.name, record.help, parameters, body)


def resume_command() -> Any:
    flags = (*(f for f in experiments.EXECUTOR_FLAGS if f.on_resume), experiments.DATA_DIR_FLAG)
    argument = inspect.Parameter(
        "run_dir",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[Path, typer.Argument(help="An interrupted, failed or sharded run directory.")],
    )
    options = [o for o in SPEC_SOURCES + RUN_OPTIONS if o[0] in RESUMABLE]
    parameters = [argument] + [_parameter(*o) for o in options] + [_flag_parameter(f) for f in flags]

    def body(values: dict[str, Any]) -> None:
        run_dir = values["run_dir"]
        request = heavy("ntkrun.orchestrate").Request(
            experiments.experiment_of(run_dir).name,
            sets=values["set_"] or [],
            overrides=_overrides(flags, values),
            resume=run_dir,
            wait=values["wait"],
            force=values["force"],
        )
        run(request, values["quiet"])

    help = (
        "Finish a run from its spec.yaml: only units without a result run (or are re-submitted), "
        "checkpointed units continue where they stopped. --set executor.* may change where, "
        "--data-dir where the same data files are now (they are checked by content)."
    )
    return _command("resume", help, parameters, body)


def run(request: orchestrate.Request, quiet: bool, list_units: bool = False, check: bool = False) -> None:
    """Plan the request, then list its units, report the checks, or run it and report."""
    orchestrate = heavy("ntkrun.orchestrate")
    plan = orchestrate.plan(request, checks=not list_units)
    if list_units:
        return print_units(plan)
    if check:
        spec = plan.spec
        grid = f" over {math.prod(len(v) for v in spec.sweep.values())} sweep points" if spec.sweep else ""
        flop = sum(u.flops for u in plan.units)
        cost = f"{flop / 1e9:.3g} GFLOP" if math.isfinite(flop) else "cost unknown"
        return say(
            f"spec ok: {spec.experiment}, hash {spec_hash(spec)}, {len(plan.units)} units{grid} ({cost}), "
            f"executor {spec.executor.kind}; memory {plan.memory}"
        )
    progress = RichProgress(enabled=not quiet)
    with progress.bar:
        outcome = orchestrate.execute(plan, progress, notify=say)
    if outcome.note == "submitted":
        return
    if outcome.note is not None:
        return say(outcome.note)
    report(plan.spec.experiment, outcome, quiet)


def report(experiment: str, outcome: orchestrate.Outcome, quiet: bool) -> None:
    if not quiet and outcome.table is not None:
        out.print(frame_table(outcome.table, f"{experiment} results"))
    say(f"run directory: {outcome.path}")


def print_units(plan: orchestrate.Plan) -> None:
    """Index, name, stage and cost of every unit (for an sbatch --array range)."""
    table = heavy("ntkrun.orchestrate").unit_table(plan)
    share = table.attrs["sharing"]
    pool = f"; in the pool {share:.2g}x a unit's time alone: its workers share the cores" * (share > 1)
    say(
        f"{len(table)} units (sbatch --array=0-{len(table) - 1}); cost in GFLOP, time estimated on this "
        "machine (its GD steps, kernels, solves and data reads timed at a small size; products at "
        f"{table.attrs['gflops']:.0f} GFLOP/s{pool}):"
    )
    for row in table.itertuples(index=False):
        stage = " (stage 0: before the others)" if row.stage == 0 else ""
        shared = f" (shared: read by {row.shared} too)" if row.shared else ""
        cost = "unknown" if math.isnan(row.gflop) else f"{row.gflop:>10.3g} GFLOP  ~{_duration(row.seconds)}"
        say(f"{row.index:>5}  {row.unit:<24} {cost}{stage}{shared}")
    unknown = int(table["gflop"].isna().sum())
    if unknown:  # the costs need the input shape, from the data's headers
        known = table["gflop"].sum()
        say(f"total: {known:.3g} GFLOP and {unknown} unit(s) of unknown cost (their data were not found: "
            "the costs need the images' shape; --check says why)")  # fmt: skip
    else:
        say(f"total: {table['gflop'].sum():.3g} GFLOP, ~{_duration(table['alone'].sum())} in one process")


def _duration(seconds: float) -> str:
    if seconds < 0.01:
        return "<0.01 s"
    if seconds < 60:
        return f"{seconds:.2g} s"
    if seconds < 3600:
        return f"{seconds / 60:.2g} min"
    return f"{seconds / 3600:.2g} h"


def register(app: typer.Typer) -> None:
    for record in EXPERIMENTS.values():
        app.command(name=record.name, help=record.help)(run_command(record))
    app.command(name="resume")(resume_command())
