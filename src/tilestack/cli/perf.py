"""Performance commands: device, profile, compare, report, runs, ncu.

    tilestack device [--remeasure]                 the device, its published peaks and measured ceilings
    tilestack profile model.py[:build] [--train]   per-op table of a PyTorch model, hot spots and tips first
    tilestack runs                                 the runs in the result store
    tilestack report [RUN] --out DIR               table, roofline PNG, HTML and markdown of a stored run
    tilestack compare RUN_A RUN_B                  two runs (or two devices), case by case
    tilestack ncu --kernel REGEX -- script.py ...  Nsight Compute's figures for one kernel

torch and matplotlib are imported inside the commands, so ``tilestack --help`` stays fast.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from tilestack.cli import app
from tilestack.files import write_atomic


def _db_path(db: Path | None) -> Path | None:
    """--db is the store's file: a folder, or a path below a file, is refused here rather than by SQLite."""
    from tilestack.cli.args import check_output

    check_output("--db", db)
    return db


DbOption = Annotated[Path | None, typer.Option("--db", callback=_db_path,
                                               help="Result store (default <cache_dir>/perf/results.sqlite).")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
def device(
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: the first GPU, else cpu).")] = None,
    remeasure: Annotated[bool, typer.Option(help="Measure the ceilings again instead of reading the cache.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show the device, its published peaks and its measured ceilings (measured once, then cached)."""
    from tilestack.errors import TilestackError
    from tilestack.perf import device as device_mod
    from tilestack.perf import report

    try:
        dev = device_mod.detect(device)
        with report.console().status("measuring ceilings..." if remeasure else "reading ceilings..."):
            ceil = device_mod.ceilings(dev, remeasure=remeasure)
    except TilestackError as e:
        _fail(str(e))
    if as_json:
        print(
            json.dumps(
                {
                    "device": dev.describe(),
                    "ceilings": ceil.to_json(),
                    "published": dict(dev.spec.flops, bandwidth=dev.spec.bandwidth) if dev.spec else None,
                },
                indent=2,
                default=str,
            )
        )
        return
    from rich.table import Table

    t = Table(title=report.escape(dev.name), header_style="bold")
    for col in ("", "measured", "+- (95%)", "repeats", "published", "measured / published"):
        t.add_column(col)
    spec = dev.spec
    pub_bw = spec.bandwidth if spec else None

    def repeats(key: str) -> str:
        entry = ceil.spread.get(key, {})
        return f"{entry['repeats']}{'' if entry.get('converged') else ' (budget)'}" if entry else "-"

    t.add_row(
        "memory bandwidth",
        report.si(ceil.copy_bytes_per_s, "B/s"),
        report.spread(ceil.rel_ci("copy")),
        repeats("copy"),
        report.si(pub_bw, "B/s"),
        report.pct(ceil.copy_bytes_per_s / pub_bw) if pub_bw else "-",
    )
    for dtype in dict.fromkeys([*ceil.matmul, *(spec.flops if spec else {})]):
        mv, pv = ceil.matmul.get(dtype), spec.peak(dtype) if spec else None
        t.add_row(
            f"matmul {dtype}",
            report.si(mv, "FLOP/s"),
            report.spread(ceil.rel_ci(f"matmul {dtype}")) if mv else "-",
            repeats(f"matmul {dtype}") if mv else "-",
            report.si(pv, "FLOP/s"),
            report.pct(mv / pv) if mv and pv else "-",
        )
    con = report.console()
    con.print(t)
    con.print(
        report.escape(
            f"spec: {spec.label + ' (' + spec.source + ')' if spec else 'not in the table of published peaks'}"
        )
    )
    con.print(
        f"ceilings measured {ceil.measured_at} on {ceil.machine.get('host')} ({ceil.measurements} measurement(s)), "
        f"cached in {device_mod.ceilings_path(dev)}; each timed until known to "
        f"+-{report.pct(device_mod.CEILING_TARGET_REL_CI)} or its budget was spent"
    )
    from tilestack.perf import energy

    meter = energy.meter_for(dev)
    if meter is None:
        con.print("energy: no counter for a CPU (energy per op and perf/W are GPU-only)")
    elif meter.available:
        con.print(f"energy: NVML counter readable; power now {report.si(meter.power_w(), 'W')}")
    else:
        con.print(report.escape(f"energy: NVML counter not readable ({meter.reason})"))


@app.command()
def profile(
    target: Annotated[
        str,
        typer.Argument(
            help="path/to/script.py[:fn] or package.module[:fn]; fn() returns "
            "(model, inputs); else top-level `model` and `inputs`."
        ),
    ],
    device: Annotated[str | None, typer.Option(help="Move model and inputs to this device (cpu, cuda).")] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Profiled steps (default: rounds of steps until the step time is known to +-5%)."),
    ] = None,
    budget: Annotated[float, typer.Option(help="Seconds of profiling after which rounds stop, known or not.")] = 10.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up steps before counting and profiling.")] = 2,
    train: Annotated[bool, typer.Option(help="Profile forward and backward, not just forward.")] = False,
    top: Annotated[int | None, typer.Option(min=1, help="Show only the slowest N ops.")] = 25,
    fastpath: Annotated[
        bool,
        typer.Option(help="Keep nn.MultiheadAttention's fused fast path (its inner matmuls then go uncounted)."),
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write profile.html and profile.png here.")] = None,
    store: Annotated[bool, typer.Option(help="Append every op's row to the result store.")] = True,
    db: DbOption = None,
) -> None:
    """Profile a PyTorch model: per-op time, share, FLOPs, bytes, intensity, bound and % of roof."""
    from tilestack.cli.args import check_output, check_store
    from tilestack.errors import TilestackError
    from tilestack.perf import profile as profile_mod
    from tilestack.perf import report

    if not 0 < budget < math.inf:      # (inf was refused inside the profiler, after the model was loaded)
        raise typer.BadParameter(f"--budget {budget}; expected a finite number of seconds > 0", param_hint="--budget")
    check_output("--out", out, folder=True, files=("profile.html", "profile.png", "profile.md"))
    if store:
        check_store("--db", db)
    try:
        model, inputs = profile_mod.load_target(target)
        if device is not None:
            model, inputs = _to_device(model, inputs, device)
        with report.console().status(f"profiling {target}..."):
            prof = profile_mod.profile_model(
                model,
                inputs,
                steps=steps,
                budget_s=budget,
                warmup=warmup,
                train=train,
                name=_model_name(target),
                fastpath=fastpath,
            )
    except TilestackError as e:
        _fail(str(e))
    profile_mod.print_profile(prof, top=top)
    if out is not None:
        html = profile_mod.profile_html(prof, out / "profile.html", out / "profile.png")
        write_atomic(out / "profile.md",
                     report.markdown_table(profile_mod.PROFILE_COLUMNS, profile_mod.profile_rows(prof)) + "\n")
        report.console().print(f"wrote {html}, {out / 'profile.png'}, {out / 'profile.md'}")
    if store:
        from tilestack.perf.store import Store

        with Store(db) as st:
            run = st.start_run(
                device=prof.device,
                ceilings=prof.ceilings,
                label=f"profile {target}",
                command=" ".join(sys.argv),
            )
            for o in prof.ops:
                if o.counted:
                    st.append(run, o.m)
        report.console().print(f"stored as run {run} in {st.path}")


def _model_name(target: str) -> str:
    """``models/convnet.py:small`` -> ``convnet:small``: the model's name in the store, which `compare` keys on."""
    spec, _, fn = target.partition(":")
    stem = Path(spec).stem if spec.endswith(".py") else spec
    return f"{stem}:{fn}" if fn else stem


def _to_device(model: object, inputs: object, device: str) -> tuple[object, object]:
    """The model and its inputs on ``device``; a device torch cannot use is refused naming --device."""
    import torch

    from tilestack.perf import device as device_mod

    device_mod.detect(device)  # DeviceError: "device='tpu'; expected 'cpu', 'cuda', 'cuda:N' or a GPU index"

    def move(x: object) -> object:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, tuple | list):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    to = getattr(model, "to", None)
    return (to(device) if to else model), move(inputs)


@app.command()
def runs(db: DbOption = None, limit: Annotated[int, typer.Option(min=1, help="Newest N runs.")] = 20) -> None:
    """List the runs in the result store, newest first."""
    from rich.table import Table

    from tilestack.perf import report
    from tilestack.perf.store import Store

    with Store(db) as st:
        rs = st.runs()[:limit]
        t = Table(title=str(st.path), header_style="bold")
    for col in ("run", "started", "device", "results", "label", "versions"):
        t.add_column(col, overflow="fold")
    for r in rs:
        v = r.versions or {}
        cells = (
            r.id,
            r.started_at,
            r.device,
            str(r.n_results),
            r.label or "",
            f"torch {v.get('torch')}, triton {v.get('triton')}, cuda {v.get('cuda')}",
        )
        t.add_row(*(report.escape(c) for c in cells))
    report.console().print(t)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix, label, latest or latest~N.")] = "latest",
    out: Annotated[Path | None, typer.Option(help="Write report.html, roofline.png and report.md here.")] = None,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    db: DbOption = None,
) -> None:
    """Show a stored run as a table; with --out, also the roofline PNG, the HTML report and markdown."""
    from tilestack.cli.args import check_output
    from tilestack.perf import report as report_mod
    from tilestack.perf.store import Store, StoreError

    check_output("--out", out, folder=True, files=("roofline.png", "report.html", "report.md"))
    try:
        with Store(db) as st:
            r = st.run(run)
            ms = st.measurements(r.id)
    except StoreError as e:
        _fail(str(e))
    title = title or f"tilestack run {r.id} on {r.device}"
    report_mod.print_measurements(ms, title=title)
    if out is not None:
        ceil = _ceilings_of(r.ceilings)
        report_mod.roofline_png(ms, out / "roofline.png", ceilings=ceil, title=title)
        report_mod.html_report(ms, out / "report.html", ceilings=ceil, versions=r.versions, title=title)
        write_atomic(out / "report.md", report_mod.measurements_markdown(ms) + "\n")
        report_mod.console().print(f"wrote {out / 'report.html'}, {out / 'roofline.png'}, {out / 'report.md'}")


def _ceilings_of(data: dict | None) -> object:
    from tilestack.perf.device import Ceilings

    try:
        return Ceilings(**data) if data else None
    except (TypeError, ValueError):  # (a DeviceError: a field Ceilings refuses)
        return None  # stored by an older layout: the report falls back to the roofs kept in each row


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="Run (id, prefix, label, latest~N) or device name: the baseline.")],
    b: Annotated[str, typer.Argument(help="Run or device name compared against A.")],
    db: DbOption = None,
) -> None:
    """Compare two runs or two devices case by case (same kernel and config): latency and B's speed-up."""
    from tilestack.bench.record import bench_sides
    from tilestack.perf import report as report_mod
    from tilestack.perf.store import Store, StoreError

    bench = bench_sides(a, b, db)   # bench runs or record files: paired by case and shape (tilestack bench compare)
    if bench is not None:
        from tilestack.bench.compare import compare as compare_bench
        from tilestack.bench.compare import print_comparison

        by_case = compare_bench(*bench)
        print_comparison(by_case)
        if not by_case.comparable:
            raise typer.Exit(1)
        return
    try:
        with Store(db) as st:
            cmp = st.compare(a, b)
    except StoreError as e:
        _fail(str(e))
    if not cmp.comparable:
        _fail(f"A = {cmp.a_label}, B = {cmp.b_label}: " + "; ".join(cmp.notes))
    con = report_mod.console()
    con.print(report_mod.comparison_table(cmp))
    for note in cmp.notes:
        con.print(report_mod.escape(f"note: {note}"))


@app.command()
def ncu(
    target: Annotated[
        list[str] | None,
        typer.Argument(help="The command to profile, after `--` (a .py file runs under this Python)."),
    ] = None,
    case: Annotated[
        str | None,
        typer.Option(
            help="Profile one `tilestack bench` case instead of a command: NAME or NAME#i (the i-th "
            "case of that name); selected by its NVTX range, after two warm-up calls."
        ),
    ] = None,
    kernel: Annotated[str | None, typer.Option(help="Regex on kernel names (ncu --kernel-name regex:...).")] = None,
    nvtx: Annotated[str | None, typer.Option(help="NVTX range filter, e.g. 'tilestack:rmsnorm[BM=64]/'.")] = None,
    skip: Annotated[int, typer.Option(min=0, help="Matching launches to skip first (warm-up).")] = 0,
    count: Annotated[int, typer.Option(min=1, help="Matching launches to profile.")] = 1,
    fold: Annotated[
        str | None,
        typer.Option(help="Fold the figures into the newest stored result of this kernel name (appended to its run)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    db: DbOption = None,
) -> None:
    """Run Nsight Compute (--clock-control none) on matching launches and show speed-of-light and memory."""
    import tempfile

    from tilestack.perf import ncu as ncu_mod
    from tilestack.perf import report as report_mod

    if bool(target) == bool(case):
        _fail(f"target={target!r}, case={case!r}; expected exactly one: a command after `--`, or --case NAME")
    with tempfile.TemporaryDirectory(prefix="tilestack-ncu-case-") as tmp:
        if case:
            script = Path(tmp) / "ncu_case.py"
            script.write_text(CASE_SCRIPT)
            argv = [sys.executable, str(script), case]
            nvtx = nvtx or f"{CASE_RANGE}/"
        else:
            argv = [sys.executable, *target] if target[0].endswith(".py") else list(target)
        try:
            with report_mod.console().status("running ncu..."):
                res = ncu_mod.run(argv, kernel_regex=kernel, nvtx_include=nvtx, launch_skip=skip, launch_count=count)
        except ncu_mod.NcuError as e:
            _fail(str(e))
    if as_json:
        print(json.dumps({"kernels": [vars(k) for k in res.kernels], "summary": res.summary()}, indent=2))
    else:
        from rich.table import Table

        t = Table(title="Nsight Compute (--clock-control none)", header_style="bold")
        for col in (
            "kernel",
            "time",
            "SM SOL",
            "memory SOL",
            "DRAM %",
            "DRAM bytes",
            "L2 bytes",
            "occupancy",
            "regs",
        ):
            t.add_column(col, overflow="fold")
        p = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
        for k in res.kernels:
            t.add_row(
                report_mod.escape(k.name),
                report_mod.seconds(k.duration_s),
                p(k.sm_throughput_pct),
                p(k.memory_throughput_pct),
                p(k.dram_throughput_pct),
                report_mod.si(k.dram_bytes, "B"),
                report_mod.si(k.l2_bytes, "B"),
                p(k.achieved_occupancy_pct),
                f"{k.registers_per_thread:g}" if k.registers_per_thread else "-",
            )
        report_mod.console().print(t)
    if fold:
        _fold(res, fold, db)


CASE_RANGE = "tilestack:ncu_case"
WARMUP_CALLS = 2  # outside the range: compilation and autotuning happen there, not under ncu's filter
CASE_SCRIPT = f"""
import sys
import torch
from tilestack.bench.cases import cases

name, _, index = sys.argv[1].partition("#")
found = [c for c in cases("cuda", full=True) if c.name == name]
if not found or int(index or 0) >= len(found):
    names = sorted({{c.name for c in cases("cuda", full=True)}})
    sys.exit(f"case={{sys.argv[1]!r}}; expected NAME or NAME#i with NAME one of {{names}}")
case = found[int(index or 0)]
inputs = case.make("cuda")
for _ in range({WARMUP_CALLS}):
    case.ours(inputs)
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("{CASE_RANGE}")
case.ours(inputs)
torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
"""


def _fold(res: object, name: str, db: Path | None) -> None:
    from tilestack.perf import ncu as ncu_mod
    from tilestack.perf import report as report_mod
    from tilestack.perf.store import Store, StoreError

    try:
        with Store(db) as st:
            run_id, m = st.latest_result(name)
            st.append(run_id, ncu_mod.fold(m, res))
    except StoreError as e:
        _fail(f"fold: {e}")
    report_mod.console().print(f"folded ncu figures into {name!r} (run {run_id})")
