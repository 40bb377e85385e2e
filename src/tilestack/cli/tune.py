"""``tilestack tune``: tune the kernel library for this GPU within a time budget.

    tilestack tune                                   # every kernel, bf16 and fp16, 10 minutes
    tilestack tune -k gemm -k softmax --budget-s 120
    tilestack tune --budget-s 300 --ship --out out/tables --report out/tune.json   # tables to commit
    tilestack tune --dry-run                          # what would be tuned, in which order
    tilestack tune --model --top-k 8                  # time only what the cost model ranks best (tune.guided)
    tilestack tune -k gemm --backends triton,gluon    # the backends searched (default: each that runs here)

Winners go to the user's table (``<cache_dir>/tuned/<device key>.json``) as soon as each is known, written
atomically; ``--ship`` also writes them, merged with the packaged tables of this device, as tables for
``src/tilestack/tune/tables/``. See ``tilestack.tune.session`` for how the budget is spent.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

from tilestack.cli import app

# the H200 ground truth the cost model is pre-trained on: the repository's, wherever the command runs from (an
# editable install, as scripts/setup.sh makes; elsewhere --model-data names a copy)
GROUND_TRUTH = Path(__file__).resolve().parents[3] / "docs" / "results" / "tune_ground_truth_h200.jsonl"


@app.command()
def tune(
    kernel: list[str] = typer.Option(None, "--kernel", "-k", help="only these kernels (repeatable); default all"),
    dtype: list[str] = typer.Option(None, "--dtype", help="bfloat16 and/or float16 (repeatable); default both"),
    budget_s: float = typer.Option(600.0, "--budget-s", help="seconds for the whole run (set-up included)"),
    size: list[int] = typer.Option(None, "--size", min=1, help="only these sizes: sequence length, GEMM size, "
                                                               "row width (repeatable)"),
    head_dim: list[int] = typer.Option(None, "--head-dim", min=1, help="attention: only these head dims (repeatable)"),
    ship: bool = typer.Option(False, help="also write tables for src/tilestack/tune/tables/ (one per kernel)"),
    out: Path = typer.Option(None, help="folder for --ship's tables; default the package's tables folder"),
    report: Path = typer.Option(None, help="write every problem's outcome here as JSON"),
    device: int = typer.Option(0, min=0, help="CUDA device index"),
    missing: bool = typer.Option(False, "--missing", help="only problems this device's tables have no entry for "
                                                          "(its key, its size bucket)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be tuned, in order; tune nothing"),
    small: bool = typer.Option(False, hidden=True, help="tests: tiny sizes on the CPU under Triton's interpreter"),
    model: bool = typer.Option(False, "--model", help="time only the --top-k configs the cost model ranks best "
                                                      "(tune.guided; pre-trained on --model-data)"),
    model_data: list[Path] = typer.Option(None, "--model-data", help="ground-truth JSON lines for --model "
                                          "(default docs/results/tune_ground_truth_h200.jsonl)"),
    top_k: int = typer.Option(8, "--top-k", min=1, help="--model: configs timed per problem (plus the one in use)"),
    backends: str = typer.Option(None, "--backends", help="backends to search, comma-separated (e.g. "
                                 "triton,gluon); default: every GPU backend that can launch on this device"),
    as_device: str = typer.Option(None, help="tune for this device key instead of the GPU's own; with --dry-run, "
                                             "plan for it from any machine: 'sm90-132sm-227kb:NVIDIA H200'"),
) -> None:
    """Time each kernel's candidate configs on this GPU (checked against a reference first) and keep the
    fastest per kernel, signature and size, most valuable problems first, within --budget-s seconds."""
    from tilestack.cli.args import check_output
    from tilestack.errors import TilestackError
    from tilestack.tune.library import DTYPES, library_problems

    check_output("--out", out, folder=True)
    if out is not None and not ship:     # --out is where --ship writes: without it the tables went nowhere, silently
        raise typer.BadParameter(f"--out {str(out)!r} without --ship; expected --ship (the tables it writes there), "
                                 "or no --out", param_hint="--out")
    check_output("--report", report)
    _check_model_data(model, model_data)
    _check_user_tables()
    if as_device is not None:       # checked before a dry run's early return too: a typo planned for no device
        from tilestack.tune.devices import DeviceKey
        try:
            DeviceKey.parse(as_device.partition(":")[0])
        except TilestackError as e:
            raise typer.BadParameter(f"--as-device {as_device!r}: {e}", param_hint="--as-device") from e
        if ":" in as_device and not as_device.partition(":")[2].strip():    # a name the tables would be keyed by
            raise typer.BadParameter(f"--as-device {as_device!r} has an empty device name after ':'; expected "
                                     "'KEY' or 'KEY:NAME' (e.g. 'sm90-132sm-227kb:NVIDIA H200')",
                                     param_hint="--as-device")
    if not 0 < budget_s < math.inf:      # (NaN passed a "<= 0" test: a run whose every deadline compares False)
        raise typer.BadParameter(f"--budget-s must be > 0, got {budget_s} (a finite number of seconds)",
                                 param_hint="--budget-s")
    chosen = None
    if backends is not None:
        from tilestack.backends import NAMES
        chosen = tuple(dict.fromkeys(b.strip() for b in backends.split(",") if b.strip()))   # each once
        unknown = [b for b in chosen if b not in NAMES]
        if unknown or not chosen:
            raise typer.BadParameter(f"--backends {backends!r}: expected a comma-separated list of {NAMES}",
                                     param_hint="--backends")
    try:
        problems = library_problems(kernel or None, tuple(dtype or DTYPES), small=small)
    except TilestackError as e:
        raise typer.BadParameter(str(e)) from e
    # a value no problem has (a typo: --head-dim 7, --size 1000) dropped what it meant to choose, silently: with a
    # second, valid value given too, or with --head-dim (it leaves the kernels without one), the rest ran
    for option, given, have in (("--size", size, {p.n for p in problems}),
                                ("--head-dim", head_dim, {p.fixed["D"] for p in problems if p.fixed.get("D")})):
        if unknown := sorted({v for v in given or () if v not in have}):
            raise typer.BadParameter(f"{option} {', '.join(map(str, unknown))}: no problem matches (of the chosen "
                                     "kernels and dtypes); expected " + (f"some of {sorted(have)}" if have else
                                     "no --head-dim (only the attention kernels have one)"), param_hint=option)
    problems = [p for p in problems if (not size or p.n in size) and
                (not head_dim or p.fixed.get("D") is None or p.fixed["D"] in head_dim)]
    if not problems:
        raise typer.BadParameter("no problem matches --kernel/--dtype/--size/--head-dim")
    if dry_run and not missing:
        _print_plan(problems, budget_s)
        return
    if dry_run and as_device:          # a plan for another device, from any machine
        from tilestack.tune.devices import DeviceKey
        text, _, name = as_device.partition(":")
        key, device_str = DeviceKey.parse(text, name=name), "cpu"
    else:
        key, device_str = _device(device, small, as_device)
    if missing:
        problems = _missing(problems, key)
        if not problems:
            typer.echo(f"every problem already has an entry for {key}; nothing to tune")
            return
    if dry_run:
        _print_plan(problems, budget_s)
        return
    guided = None
    if model:
        from tilestack.tune.guided import pretrained_model
        if top_k < 1:
            raise typer.BadParameter(f"--top-k must be >= 1, got {top_k}")
        try:
            guided = (pretrained_model(model_data or [GROUND_TRUTH]), top_k)
        except TilestackError as e:
            raise typer.BadParameter(str(e)) from e
    _run(problems, key, device_str, budget_s, ship, out, report, guided, chosen)


def _check_user_tables() -> None:
    """The user's tuned tables, which the run reads and adds to, can be read: a damaged one (cut short, edited by
    hand) was a ValueError traceback once --missing or the run first read them; now refused before any work, by
    the message naming the file and what to do."""
    from tilestack.cli import UserError
    from tilestack.tune.cache import ConfigCache

    try:
        ConfigCache(tables_dir=None)
    except ValueError as e:
        raise UserError(str(e)) from e


def _check_model_data(model: bool, model_data) -> None:
    """--model-data names existing files, and only with --model (which alone reads them): a dry run returned
    before reading them, so a missing file or --model-data without --model passed without a word."""
    from tilestack.cli.args import check_input

    if not model_data:
        return
    if not model:
        raise typer.BadParameter(f"--model-data {[str(p) for p in model_data]} without --model; expected --model "
                                 "(the cost model it trains), or no --model-data", param_hint="--model-data")
    for path in model_data:
        check_input("--model-data", path)


def _missing(problems, key):
    """The problems without an entry of their own (kernel, signature, bucket) in the user's table for ``key`` or
    a shipped table tuned on a GPU of ``key``'s name (another GPU of the same key does not count)."""
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.cache import key as entry_key

    cache = ConfigCache()
    have = set()
    for t in cache.tables_for(key):
        if t.path is None or t.path.parent == cache.dir or t.device.name == key.name:
            have.update(t.entries)
    return [p for p in problems if entry_key(p.kernel, p.signature, p.bucket) not in have]


def _device(index: int, small: bool, as_device: str | None):
    from tilestack.perf.device import cuda_available
    from tilestack.tune.devices import DeviceKey, device_key

    as_device = as_device.partition(":")[0] if as_device else None
    if small:
        return DeviceKey.parse(as_device or "sm90-132sm-227kb", name="interpreter"), "cpu"
    if not cuda_available():
        typer.echo("tilestack tune times kernels on a CUDA GPU, and torch sees none here (on a CPU the library "
                   "runs its default configs).", err=True)
        raise typer.Exit(2)
    import torch

    if not 0 <= index < torch.cuda.device_count():
        raise typer.BadParameter(f"--device {index}; expected an index below {torch.cuda.device_count()}")
    torch.cuda.set_device(index)
    key = DeviceKey.parse(as_device, name=device_key(index).name, memory_gb=device_key(index).memory_gb) \
        if as_device else device_key(index)
    return key, "cuda"


def _console():
    """Rich's console; 200 columns wide when the output is not a terminal (a log: lines are not wrapped)."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _print_plan(problems, budget_s: float) -> None:
    from rich.table import Table

    from tilestack.tune.session import plan
    from tilestack.tune.space import SearchSpace

    shares = plan(problems, budget_s)
    table = Table(title=f"{len(problems)} problems, {budget_s:.0f} s", show_lines=False)
    for col in ("#", "kernel", "signature", "bucket", "shape", "configs", "share (s)"):
        table.add_column(col, justify="right" if col in ("#", "bucket", "configs", "share (s)") else "left")
    for i, (p, share) in enumerate(zip(problems, shares, strict=True)):
        n = len(SearchSpace(p.tile, fixed=p.fixed, restrict=p.restrict).all_configs())
        table.add_row(str(i + 1), p.kernel, p.signature, str(p.bucket), p.label, str(n), f"{share:.1f}")
    _console().print(table)


def _run(problems, key, device_str: str, budget_s: float, ship: bool, out: Path | None, report: Path | None,
         guided=None, backends=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tilestack.tune.cache import TABLES, ConfigCache
    from tilestack.tune.session import Session

    console = _console()
    cache = ConfigCache()
    ship_dir = (out or TABLES) if ship else None
    console.print(f"tuning {len(problems)} problems on {key.name or '?'} ({key}) in {budget_s:.0f} s; winners go to "
                  f"{cache.user_path(key)}" + (f" and {ship_dir}" if ship_dir else ""))
    if guided is not None:       # (cost model, top k): time only the model's best-ranked configs
        from tilestack.tune.guided import ModelSession
        session = ModelSession(key, budget_s=budget_s, device_str=device_str, cache=cache, ship_dir=ship_dir,
                               model=guided[0], top_k=guided[1], backends=backends)
    else:
        session = Session(key, budget_s=budget_s, device_str=device_str, cache=cache, ship_dir=ship_dir,
                          backends=backends)
    outcomes = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("tune", total=len(problems))

        def start(i, p):
            progress.update(task, description=f"{p.kernel} {p.signature} {p.label}")

        def done(o):
            outcomes.append(o)
            progress.console.print(_line(o))
            progress.advance(task)
            if report is not None:        # after every problem: a run that is killed keeps its report so far
                _write_report(report, key, budget_s, outcomes)

        session.run(problems, on_start=start, on_done=done)
    tuned = [o for o in outcomes if o.config]
    faster = [o for o in tuned if o.speedup and o.speedup > 1.0]
    console.print(f"{len(tuned)} of {len(problems)} problems tuned ({len(faster)} faster than before); "
                  f"{sum(o.tried for o in outcomes)} configs tried")


def _line(o) -> str:
    p = o.problem
    head = f"{p.kernel} {p.signature} @{p.bucket} ({p.label})"
    if not o.config:
        return f"  {head}: {o.note}"
    was = f", was {o.before_seconds * 1e3:.3f} ms ({o.speedup:.2f}x)" if o.speedup else ""
    cfg = " ".join(f"{k}={v}" for k, v in o.config.items())
    more = "" if o.complete else ", search cut short"
    on = "" if len(o.seconds_by_backend) < 2 else " on " + o.backend + " (" + ", ".join(
        f"{b} {s * 1e3:.3f} ms" for b, s in o.seconds_by_backend.items()) + ")"
    return f"  {head}: {o.seconds * 1e3:.3f} ms{was}{on}  {cfg}  [{o.tried} tried, {o.failed} failed{more}]"


def _write_report(path: Path, key, budget_s: float, outcomes) -> None:
    from tilestack.tune.cache import write_json_atomic

    rows = [{"kernel": o.problem.kernel, "signature": o.problem.signature, "bucket": o.problem.bucket,
             "shape": o.problem.label, "config": o.config, "ms": o.seconds and o.seconds * 1e3,
             "backend": o.backend, "ms_by_backend": {b: s * 1e3 for b, s in o.seconds_by_backend.items()},
             "before": o.before, "before_ms": o.before_seconds and o.before_seconds * 1e3, "speedup": o.speedup,
             "tried": o.tried, "failed": o.failed, "complete": o.complete, "note": o.note} for o in outcomes]
    write_json_atomic(Path(path), {"device": key.meta(), "budget_s": budget_s, "problems": rows})
