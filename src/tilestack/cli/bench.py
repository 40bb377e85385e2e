"""``tilestack bench``: every kernel of the library checked against the reference, timed beside its baseline."""

from __future__ import annotations

from pathlib import Path

import typer

from tilestack.cli import app


@app.command()
def bench(
    kernel: list[str] = typer.Option(None, "--kernel", "-k", help="only these kernels (repeatable)"),
    small: bool = typer.Option(False, help="small sizes even on a GPU"),
    out: Path = typer.Option(Path("out/bench"), help="folder for report.html, roofline.png, bench.md"),
    store: bool = typer.Option(True, help="append every result to the SQLite result store"),
) -> None:
    """Check every library kernel against the reference executor and float64 PyTorch, time it and its
    baseline on this device (GPU; or CPU at small sizes under Triton's interpreter, labelled so), and print
    time, FLOP/s, bytes/s and arithmetic intensity from the IR's own counts."""
    from tilestack.bench import run_suite

    rows = run_suite(full=not small, only=kernel or None, store=store, out_dir=out)
    failed = [r.case.name for r in rows if not r.passed]
    if failed:
        typer.echo(f"correctness check failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
