"""``tilestack bench``: every library kernel and two model training steps, checked, timed beside their baselines,
kept in the result store; ``tilestack bench compare A B``: two runs, devices or record files, case by case."""

from __future__ import annotations

from pathlib import Path

import typer

from tilestack.cli import app
from tilestack.cli.args import check_output

bench_app = typer.Typer(help="Benchmark suite: run it (no subcommand), or compare two runs.", no_args_is_help=False,
                        add_completion=False, pretty_exceptions_show_locals=False)
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    kernel: list[str] = typer.Option(None, "--kernel", "-k",
                                     help="only these cases (repeatable): gemm, softmax, layer_norm, attention_fwd, "
                                          "attention_train, gpt2_step, llama_step"),
    small: bool = typer.Option(False, help="small sizes even on a GPU"),
    models: bool = typer.Option(True, help="include the model training steps (GPT-2 small, Llama-style 1B)"),
    out: Path = typer.Option(Path("out/bench"),
                             help="folder for report.html, roofline.png, bench.md, bench.json (the run as a record)"),
    store: bool = typer.Option(True, help="append every result to the SQLite result store"),
    against: str = typer.Option(None, help="after the run, compare it with this record file, run or device "
                                           "(as `tilestack bench compare AGAINST <this run>`)"),
) -> None:
    """Check every library kernel against the reference executor and float64 PyTorch, and a training step of two
    language models against torch's in float64; time each beside its baseline on this device (GPU; or CPU at small
    sizes under Triton's interpreter, labelled so), and print time, FLOP/s, bytes/s and arithmetic intensity."""
    if ctx.invoked_subcommand is not None:
        return
    from tilestack.bench import run_suite

    check_output("--out", out, folder=True, files=("roofline.png", "report.html", "bench.md", "bench.json"))
    if kernel:
        from tilestack.bench.cases import cases
        names = sorted({c.name for c in cases("cpu", full=False, models=models)})
        unknown = [k for k in kernel if k not in names]
        if unknown:
            raise typer.BadParameter(f"--kernel {', '.join(unknown)}: no such case{'' if models else ' (--no-models)'};"
                                     f" expected some of {names}", param_hint="--kernel")
    baseline = _side(against, option="--against") if against else None   # read first: a wrong name fails before the run
    rows = run_suite(full=not small, only=kernel or None, store=store, models=models, out_dir=out)
    if baseline is not None and rows:
        from tilestack.bench.compare import compare as compare_runs
        from tilestack.bench.compare import print_comparison
        from tilestack.bench.record import Record

        ms = [m for r in rows for m in (r.ours, r.baseline)]
        print_comparison(compare_runs(baseline, Record(ms[0].device, ms, source="this run")))
    failed = [r.case.name for r in rows if not r.passed]
    if failed:
        typer.echo(f"correctness check failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@bench_app.command("compare")
def compare(
    a: str = typer.Argument(..., help="the baseline side: a record file (*.json), a run (id, prefix, label, latest, "
                                      "latest~N) or a device name (its newest bench run)"),
    b: str = typer.Argument(..., help="the side compared against A, the same kinds"),
    db: Path = typer.Option(None, callback=lambda db: check_output("--db", db) or db,
                            help="the result store (default: <cache_dir>/perf/results.sqlite)"),
) -> None:
    """Two bench runs case by case (matched by case name and shape): tilestack's time on each, B's speed-up over A
    for tilestack and for the baseline, each side's speed-up over its own baseline, and notices where the runs
    differ (sizes, devices, versions, tuned configs). Exits 1 when nothing pairs."""
    from tilestack.bench.compare import compare as compare_runs
    from tilestack.bench.compare import print_comparison

    cmp = compare_runs(_side(a, db), _side(b, db))
    print_comparison(cmp)
    if not cmp.comparable:
        raise typer.Exit(1)


def _side(ref: str, db: Path | None = None, *, option: str = ""):
    """A record file, run or device as a record; a clear error (exit 2) where there is none, naming ``option``
    (the run's ``--against``: its error read as if about `bench compare`'s A or B)."""
    from tilestack.bench.record import RecordError, load_side

    try:
        return load_side(ref, db)
    except RecordError as e:
        typer.echo(f"error: {option + ': ' if option else ''}{e}", err=True)
        raise typer.Exit(2) from None
