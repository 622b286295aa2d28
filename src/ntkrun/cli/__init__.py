"""The `ntkrun` command line: parses, calls ntkrun.orchestrate, reports. Its commands are made
from the experiment records (ntkrun.experiments) and registered here."""

from __future__ import annotations

import typer

from ntkrun.cli import data, experiments, runs
from ntkrun.version import __version__

app = typer.Typer(
    help="Experiment runner for the Neural Tangent Kernel (Jacot, Gabriel & Hongler 2018).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain usage errors: "Error: Invalid value for '--width': ..."
)
for module in (experiments, runs, data):
    module.register(app)
for command in app.registered_commands:  # `ntkrun --help` lists each command's whole first sentence
    text = command.help or command.callback.__doc__ or ""
    first = text.strip().split("\n\n")[0].split(". ")[0].replace("\n", " ").rstrip(".")
    command.short_help = command.short_help or f"{first}."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ntkrun {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print ntkrun's version and exit."
    ),
) -> None:
    """Experiment runner for the Neural Tangent Kernel (Jacot, Gabriel & Hongler 2018)."""
