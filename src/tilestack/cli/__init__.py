"""The ``tilestack`` command. Each sub-module adds its commands to ``app``:

    tilestack bench        kernels vs the reference, timed, with FLOP/s and bytes/s (cli/bench.py)
    tilestack profile ...  (cli/perf.py)
    tilestack fl run ...   (cli/fl.py)
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="tilestack: tile kernels, measured.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)



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
