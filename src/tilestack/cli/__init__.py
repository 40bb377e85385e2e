"""The ``tilestack`` command. Each sub-module adds its commands to ``app``:

    tilestack bench        kernels vs the reference, timed, with FLOP/s and bytes/s (cli/bench.py)
    tilestack profile ...  (cli/perf.py)
    tilestack fl run ...   (cli/fl.py)
"""

from __future__ import annotations

import importlib

import click
import typer
from typer.core import TyperGroup


class UserError(click.ClickException):
    """A library error about the command's arguments (a TilestackError: it names the argument, what was given and
    what was expected), shown as one ``Error:`` message with exit code 2 instead of a traceback."""

    exit_code = 2


class _CommandGroup(TyperGroup):
    """The root group: every command runs inside its ``invoke``, so a TilestackError raised by the library while
    checking a command's input (PlanError, ParallelConfigError, DeviceError, ...) becomes a UserError here, in one
    place, whichever command raised it. Other exceptions are bugs and keep their traceback."""

    def invoke(self, ctx: click.Context):
        from tilestack.errors import TilestackError

        try:
            return super().invoke(ctx)
        except TilestackError as e:
            raise UserError(str(e)) from e


app = typer.Typer(help="tilestack: tile kernels, measured.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False, cls=_CommandGroup)


@app.callback()
def _root() -> None:
    """tilestack: tile kernels, measured."""


# Command modules, imported for their side effect of registering commands on ``app``.
# A module whose optional dependencies are missing (e.g. flwr) is skipped.
_COMMAND_MODULES = ("bench", "perf", "fl", "tune", "train", "plan")


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"tilestack.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("tilestack.cli"):
                continue  # that command module is not written yet
            raise


def main() -> None:
    _register()
    app()
