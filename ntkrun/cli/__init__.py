"""The `ntkrun` command line: parses, calls ntkrun.orchestrate, reports. Its commands are made
from the experiment records (ntkrun.experiments) and registered here."""

from __future__ import annotations

import typer

from ntkrun.cli import data, experiments, runs

app = typer.Typer(
    help="Experiment runner for the Neural Tangent Kernel (Jacot, Gabriel & Hongler 2018).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain usage errors: "Error: Invalid value for '--width': ..."
)
for module in (experiments, runs, data):
    module.register(app)
