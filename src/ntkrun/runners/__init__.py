"""One module per experiment, each ending with its `RUNNER` record (ntkrun.runners.contract: the
one contract, checked when the module is imported): its spec model and

    units(spec) -> list[Unit]                          independent pieces of work
    run_unit(spec, unit, ctx, progress) -> result      a TypedDict of tensors, lists and numbers
    aggregate(spec, run, results) -> summary table     CSVs and figures from the saved results
    memory(spec, unit) -> bytes                        the unit's estimated peak memory
    check(spec)                                        (optional) preflight against data files

What they share is in ntkrun.runners.common; how units are run is not their concern
(ntkrun.units, ntkrun.executors, ntkrun.orchestrate).
"""
