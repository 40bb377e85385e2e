"""``tilestack plan``: predict and rank the ways to train a model on N ranks, write the best as a plan file.

    tilestack plan --nproc 4 --layers 4 --d 128 --heads 4 --vocab 256 --seq 64 --batch 16 --memory-limit 64MiB \\
        --out plan.json --figures figs/        # measured here (CPU, gloo); then: tilestack train --plan plan.json
    tilestack plan --nproc 8 --model 1.3b --seq 2048 --batch 64 --device h200 --dtype bfloat16 --memory-limit 141GB
    tilestack plan --nproc 2 --target examples/mlp.py:build --batch 8   # any torch module: its children, the layers
    tilestack plan --nproc 4 --model tiny --batch 8,16,32 --rank-by goodput --noise-scale 24

Prints the ranked table (predicted step time, memory of the largest rank, MFU where the device has a published
peak, samples/s, goodput when ranking by it, the term that bounds the step); ``--measure K`` then trains the K
best runnable plans on gloo processes here and prints predicted against measured.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import typer

from tilestack.cli import app

MODELS = ("tiny", "1.3b")
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str, *, arg: str = "--memory-limit") -> float | None:
    """``"2GiB"``, ``"500MB"``, ``"1e9"`` -> bytes; "" -> None."""
    from tilestack.parallel.plan import PlanError
    if not text:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise PlanError(f"{arg} {text!r}; expected bytes with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    try:
        value = float(m.group(1)) * UNITS[m.group(2).lower()]
    except ValueError:
        raise PlanError(f"{arg} {text!r}; expected a number of bytes") from None
    if not 0 < value < math.inf:          # "1e400" is inf: no limit at all, which is the option left out
        raise PlanError(f"{arg} {text!r}; expected a positive, finite number of bytes (leave {arg} out for no "
                        "limit)")
    return value


def parse_limits(text: str, nproc: int) -> float | list[float] | None:
    """``--memory-limit``: one size for every GPU (``"80GB"``), or ``nproc`` sizes, one per GPU, comma-separated
    (``"80GB,80GB,40GB"``: GPUs of different memories, search's per-GPU limits); "" -> None."""
    from tilestack.parallel.plan import PlanError
    if "," not in text:
        return parse_bytes(text)
    parts = text.split(",")
    if len(parts) != nproc:
        raise PlanError(f"--memory-limit {text!r}: {len(parts)} sizes for --nproc {nproc}; expected one size for "
                        f"every GPU or {nproc} comma-separated sizes, one per GPU")
    return [parse_bytes(x, arg="--memory-limit") or 0.0 for x in parts]


def parse_batches(text: str) -> list[int]:
    from tilestack.parallel.plan import PlanError
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--batch {text!r}; expected a positive int or a comma-separated list of them") from None
    if not out or any(b < 1 for b in out):
        raise PlanError(f"--batch {text!r}; expected a positive int or a comma-separated list of them")
    return out


@app.command("plan")
def plan_command(
    nproc: int = typer.Option(..., min=1, help="ranks (world size) to plan for"),
    model: str = typer.Option("", help="tiny or 1.3b (tilestack.parallel's GPT); or give --layers/--d/... or --target"),
    layers: int = typer.Option(0, help="a GPT of this many blocks (with --d, --heads, --vocab)"),
    d: int = typer.Option(0, help="model width"),
    heads: int = typer.Option(0, help="attention heads"),
    vocab: int = typer.Option(0, help="vocabulary"),
    target: str = typer.Option("", help="path/to/script.py[:fn] returning (torch module, example input)"),
    seq: int = typer.Option(64, min=1, help="tokens per sequence"),
    batch: str = typer.Option("8", help="global batch (sequences), or a comma-separated range for --rank-by goodput"),
    device: str = typer.Option("cpu", help="cpu (measured here), cuda (measured on this GPU) or a device-table "
                               "key for a device not here: h200, h100-sxm, a100-sxm-80gb..."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    memory_limit: str = typer.Option("", help="bytes per rank, e.g. 80GB or 512MiB (default: no limit); or one "
                                     "per GPU, comma-separated, for GPUs of different memories: 80GB,80GB,40GB,40GB"),
    rank_by: str = typer.Option("time", help="time or goodput"),
    noise_scale: float = typer.Option(0.0, help="gradient noise scale phi (samples) for goodput; --base-batch M0"),
    base_batch: int = typer.Option(0, help="the batch size M0 whose statistical efficiency is 1 (default: the "
                                   "smallest --batch)"),
    comm: str = typer.Option("", help="the stored collective fit to use (default: gloo-cpu on cpu, NCCL H200 figures "
                             "on GPUs)"),
    top: int = typer.Option(12, min=1, help="rows of the ranked table"),
    out: str = typer.Option("", help="write the chosen plan here (runnable by tilestack train --plan)"),
    figures: str = typer.Option("", help="directory for timeline.png and memory.png of the chosen plan"),
    alpa: bool = typer.Option(False, help="also run Alpa's inter-operator DP: stages over sub-meshes of any size, "
                              "each with its own best layout"),
    measure: int = typer.Option(0, min=0, help="also train the K best runnable plans here (gloo) and compare"),
    steps: int = typer.Option(6, min=3, help="steps per measured plan"),
) -> None:
    """Search the parallel plans of a model on --nproc ranks and rank them by predicted step time or goodput."""
    from rich.console import Console
    from rich.table import Table

    from tilestack.parallel.plan import PlanError
    from tilestack.parallel.plan.goodput import efficiency
    from tilestack.parallel.plan.search import RANK_BY, check_world, choose, enumerate_plans, search

    # ---- every argument checked before any measurement ----------------------------------------------------------
    check_world(nproc)
    if dtype not in ("float32", "bfloat16"):
        raise PlanError(f"--dtype {dtype!r}; expected float32 or bfloat16")
    if rank_by not in RANK_BY:
        raise PlanError(f"--rank-by {rank_by!r}; expected one of {RANK_BY}")
    batches = parse_batches(batch)
    limit = parse_limits(memory_limit, nproc)
    least_limit = min(limit) if isinstance(limit, list) else limit     # the figure's line and Alpa's stages
    if noise_scale and not 0 < noise_scale < math.inf:      # 0: not given; a negative or NaN phi is no noise scale
        raise PlanError(f"--noise-scale {noise_scale}; expected a finite gradient noise scale phi > 0 (samples), or "
                        "0 (not given)")
    if rank_by == "goodput" and not 0 < noise_scale < math.inf:
        raise PlanError(f"--noise-scale {noise_scale}; --rank-by goodput expects a finite gradient noise scale "
                        "phi > 0 (tilestack.parallel.plan.goodput measures it during training)")
    if base_batch < 0:
        raise PlanError(f"--base-batch {base_batch}; expected a positive batch size M0 (0: the smallest --batch)")
    try:
        if out and Path(out).is_dir():
            raise PlanError(f"--out {out!r} is a directory; expected the plan file's path")
        if figures and Path(figures).exists() and not Path(figures).is_dir():
            raise PlanError(f"--figures {figures!r} is a file; expected a directory for timeline.png and memory.png")
    except OSError:     # (a folder on its way this user cannot enter: a traceback; check_output names the option)
        pass
    from tilestack.cli.args import check_output
    check_output("--out", out)
    check_output("--figures", figures, folder=True, files=("timeline.png", "memory.png"))
    if device.strip().lower() == "cpu" or device.strip().lower().startswith("cuda"):
        device = device.strip().lower()          # ('CPU' was looked up in the device table, and refused as a bf16 peak)
    if measure and (target or device != "cpu"):
        raise PlanError(f"--measure {measure} with {'--target ' + repr(target) if target else '--device ' + device}; "
                        "expected --device cpu and tilestack's GPT (--model or --layers): the measured runs are "
                        "tilestack train's gloo processes here")
    if comm:
        # (on a GPU or a device-table device --comm was dropped without a word: the H200 figures were used whatever
        # it named, a stored fit or none)
        from tilestack.parallel.plan import load_comm
        if load_comm(comm) is None:
            raise PlanError(f"--comm {comm!r}: no stored fit of that name; expected one written by measure_gloo")
    desc, build = _describe(model, layers, d, heads, vocab, target, seq, dtype)
    if not (device == "cpu" or device.startswith("cuda")):
        from tilestack.parallel.plan import RooflineCompute
        # PlanError naming an unknown device, or one with no peak of the --dtype's (as _cost_models asks for it)
        RooflineCompute(desc, device, dtype="bf16" if dtype == "bfloat16" else "tf32")
    for b in batches:
        enumerate_plans(desc, nproc, b)                          # PlanError: nothing fits nproc and this batch
    _check_memory(desc, nproc, batches, limit, cpu=device == "cpu")
    compute, comm_model, peak = _cost_models(desc, build, device, dtype, comm)

    # ---- search -------------------------------------------------------------------------------------------------
    m0 = base_batch or min(batches)
    eff = (lambda m: efficiency(m, noise_scale, m0)) if rank_by == "goodput" else None
    ranked = search(desc, compute, comm_model, world_size=nproc, batch=batches, memory_limit=limit,
                    rank_by=rank_by, efficiency=eff)
    chosen = choose(ranked)
    con = Console() if Console().is_terminal else Console(width=150)     # a pipe or a log: do not squeeze the table
    table = Table(title=f"{desc.name} on {nproc} ranks ({compute.source}; comm: {comm_model.source})",
                  header_style="bold")
    for col in ("#", "plan", "batch", "step ms", "samples/s", *(("goodput",) if eff else ()), "MiB/rank", "MFU",
                "bound", "runnable"):
        table.add_column(col, justify="left" if col in ("plan", "bound") else "right")
    for i, r in enumerate(ranked[:top]):
        p = r.prediction
        mfu = p.mfu(peak)
        table.add_row(str(i + 1), p.plan.label() + (" *" if r is chosen else ""), str(p.plan.batch),
                      f"{p.step_s * 1e3:.2f}", f"{p.samples_per_s():,.1f}",
                      *((f"{r.goodput:,.1f}",) if eff else ()), f"{p.memory_bytes / (1 << 20):,.1f}",
                      f"{mfu:.1%}" if mfu is not None else "-", p.bound, "yes" if p.runnable else "no")
    con.print(table)
    con.print(f"{len(ranked)} plans fit; chosen (*): {chosen.plan.label()}, predicted {chosen.step_s * 1e3:.2f} ms "
              f"per step, bound by {chosen.prediction.bound}")
    if out:
        from tilestack.parallel.plan.planfile import write_plan
        path = write_plan(chosen.prediction, desc, out, device=device, peak_flops=peak)
        how = f"tilestack train --plan {path}" if chosen.prediction.runnable else "not runnable by tilestack train"
        con.print(f"plan written to {path}  ({how})")
    if figures:
        from tilestack.parallel.plan.pictures import memory_png, timeline_png
        fig_dir = Path(figures)
        fig_dir.mkdir(parents=True, exist_ok=True)
        con.print(f"figures: {timeline_png(chosen.prediction, fig_dir / 'timeline.png')}, "
                  f"{memory_png(chosen.prediction, fig_dir / 'memory.png', limit=least_limit)}")
    if alpa:
        _alpa(con, desc, compute, comm_model, nproc, min(batches), chosen, least_limit)
    if measure:
        _measure(con, desc, [r.prediction for r in ranked if r.prediction.runnable][:measure], steps)


def _describe(model: str, layers: int, d: int, heads: int, vocab: int, target: str, seq: int, dtype: str):
    """The model description and, for --target, the module and its example input."""
    from tilestack.parallel import GPT_1P3B, TINY, ModelConfig
    from tilestack.parallel.plan import PlanError, describe_gpt, describe_module
    e = 2 if dtype == "bfloat16" else 4
    given = [name for name, v in (("--model", model), ("--layers", layers), ("--target", target)) if v]
    if len(given) != 1:
        raise PlanError(f"{' and '.join(given) or 'no model'} given; expected exactly one of --model, --layers "
                        "(with --d, --heads, --vocab) or --target")
    # --d, --heads and --vocab shape the GPT of --layers only: beside --model or --target they were dropped without
    # a word (`--model tiny --d 4096` planned tiny's d=32)
    shaping = [f"{name} {v}" for name, v in (("--d", d), ("--heads", heads), ("--vocab", vocab)) if v]
    if shaping and not layers:
        raise PlanError(f"{', '.join(shaping)} given with {given[0]}; expected them only with --layers (they shape the "
                        f"GPT of --layers; {given[0]} fixes its own)")
    # a negative count is no count, said after what is misplaced (--layers -2 reached ModelConfig, whose error
    # named n_layer, not the option; --vocab -3 was "given without --vocab")
    for name, field, v in (("--layers", "n_layer", layers), ("--d", "d", d), ("--heads", "n_head", heads),
                           ("--vocab", "vocab", vocab)):
        if v < 0:
            raise PlanError(f"{name} {v}; expected a positive int (it sets the GPT's {field}={v})")
    if model:
        if model not in MODELS:
            raise PlanError(f"--model {model!r}; expected one of {MODELS}")
        cfg = TINY if model == "tiny" else GPT_1P3B
        if seq > cfg.max_seq:
            raise PlanError(f"--seq {seq} is longer than model {model}'s max_seq={cfg.max_seq}")
        return describe_gpt(cfg, seq, dtype_bytes=e, name=model), None
    if layers:
        missing = [n for n, v in (("--d", d), ("--heads", heads), ("--vocab", vocab)) if v < 1]
        if missing:
            raise PlanError(f"--layers {layers} without {missing}; expected positive --d, --heads and --vocab")
        if d % heads:
            raise PlanError(f"--d {d} is not divisible by --heads {heads}; expected whole heads")
        cfg = ModelConfig(n_layer=layers, d=d, n_head=heads, vocab=vocab, max_seq=seq)
        return describe_gpt(cfg, seq, dtype_bytes=e), None
    from tilestack.perf.profile import load_target
    module, example = load_target(target)
    return describe_module(module, example, name=target), (module, example)


def _cost_models(desc, build, device: str, dtype: str, comm: str):
    from tilestack.parallel.plan import MeasuredCompute, PlanError, RooflineCompute, h200_nccl, load_comm
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda"):
            from tilestack.perf.device import detect
            dev = detect(device)                                    # DeviceError when there is no such GPU
            peak = dev.spec.peak("bf16" if dtype == "bfloat16" else "tf32") if dev.spec else None
        else:
            peak = None
        if build is not None:
            compute = MeasuredCompute.for_module(desc, *build)
        else:
            compute = MeasuredCompute.for_gpt(desc, device=device, overheads=device == "cpu")
        if device == "cpu":
            name = comm or "gloo-cpu"
            stored = load_comm(name)
            if stored is None and comm:
                raise PlanError(f"--comm {comm!r}: no stored fit of that name; expected one written by measure_gloo")
            if stored is None:
                from tilestack.parallel.plan import measure_gloo
                stored = measure_gloo(name=name)
            return compute, stored, peak
        return compute, (load_comm(comm) if comm else h200_nccl()), peak
    compute = RooflineCompute(desc, device, dtype="bf16" if dtype == "bfloat16" else "tf32")  # PlanError: unknown
    return compute, (load_comm(comm) if comm else h200_nccl()), compute.peak


def _check_memory(desc, nproc: int, batches: list[int], limit: float | list[float] | None, *, cpu: bool) -> None:
    """PlanError before any timing when no plan can fit ``limit``: memory does not depend on the times, so it is
    predicted with unit times and free communication. It does depend on the device: on a CPU (``cpu``: a compute
    model with cores) AdamW loops over the tensors and keeps no copy of the second moments beside the gradients,
    which its multi-tensor path on a GPU does; the unit model must say which, or a limit that a CPU plan fits was
    refused as fitting none (a 2-block GPT on 2 ranks: the least peak 288,640 bytes here, 305,280 as on a GPU)."""
    if limit is None:
        return
    from tilestack.parallel.plan import CommModel, PlanError, enumerate_plans, predict
    from tilestack.parallel.plan.compute import ComputeModel

    class Unit(ComputeModel):
        def __init__(self):
            self.desc, self.source = desc, "unit"
            self.cores = 1 if cpu else None          # only whether there are cores matters to memory

        def _times(self, layer, index, micro_batch, tp):
            return 1.0, 2.0

        def optimizer_s(self, params, tensors):
            return 0.0

    free = CommModel(fits={"all_reduce": {2: (0.0, 0.0)}}, source="free")
    least = min((predict(p, desc, Unit(), free) for b in batches for p in enumerate_plans(desc, nproc, b)),
                key=lambda p: p.memory_bytes)
    if isinstance(limit, list):             # one per GPU: a plan fits when its pipeline ranks can be placed
        from tilestack.parallel.plan.search import gpu_limits, placeable
        limits = gpu_limits("--memory-limit", limit, nproc)
        if not any(placeable(predict(p, desc, Unit(), free), limits) for b in batches
                   for p in enumerate_plans(desc, nproc, b)):
            raise PlanError(f"--memory-limit {[float(f'{v:.4g}') for v in limit]} bytes per GPU: no plan fits; the "
                            f"smallest ({least.plan.label()}, batch {least.plan.batch}) needs {least.memory_bytes:.4g} "
                            "on its largest rank; expected larger limits, more ranks or a smaller batch")
        return
    if least.memory_bytes > limit:
        raise PlanError(f"--memory-limit {limit:.4g} bytes per rank: no plan fits; the smallest "
                        f"({least.plan.label()}, batch {least.plan.batch}) needs {least.memory_bytes:.4g}; expected "
                        "a larger limit, more ranks or a smaller batch")


def _alpa(con, desc, compute, comm_model, nproc: int, batch: int, chosen, limit: float | None) -> None:
    """Alpa's stage DP at the chosen plan's micro-batch count (4 without a pipeline, or what divides the batch),
    sub-meshes of 1, 2, 4, ... devices and the whole; each stage's line: its layers, devices, best layout."""
    from rich.table import Table

    from tilestack.parallel.plan import PlanError
    from tilestack.parallel.plan.search import alpa_stages, plan_stage_cost
    m = chosen.plan.microbatches if chosen.plan.pp > 1 else max(k for k in (1, 2, 4) if batch % k == 0)
    sizes = sorted({1 << k for k in range(nproc.bit_length()) if 1 << k <= nproc} | {nproc})
    cost = plan_stage_cost(desc, compute, comm_model, batch=batch, microbatches=m, memory_limit=limit)
    try:
        split = alpa_stages(len(desc.layers), n_devices=nproc, submeshes=sizes, microbatches=m, stage_cost=cost)
    except PlanError as e:
        con.print(f"Alpa's DP: {e}")
        return
    t = Table(title=f"Alpa's inter-operator DP: {len(split.stages)} stages, {m} micro-batches of {batch // m}, "
                    f"pipeline latency {split.latency * 1e3:.2f} ms (sum + (B - 1) max of the stage times)",
              header_style="bold")
    for col in ("stage", "layers", "devices", "layout", "ms per micro-batch"):
        t.add_column(col)
    for j, (k, i, d, layout) in enumerate(split.stages):
        t.add_row(str(j), f"{desc.layers[k].name} .. {desc.layers[i - 1].name}", str(d), layout,
                  f"{cost(k, i, d, len(split.stages) - 1 - j)[0] * 1e3:.2f}")
    con.print(t)


def _measure(con, desc, preds, steps: int) -> None:
    from rich.table import Table

    from tilestack.parallel.plan.measure import measure_plans
    rows = measure_plans(desc, [p.plan for p in preds], steps=steps)
    t = Table(title="predicted vs measured (gloo, this machine)", header_style="bold")
    for col in ("plan", "pred ms", "meas ms", "err", "pred MiB", "meas MiB", "err"):
        t.add_column(col, justify="left" if col == "plan" else "right")
    for p, r in zip(preds, rows, strict=True):
        t.add_row(p.plan.label(), f"{p.step_s * 1e3:.2f}", f"{r['step_s'] * 1e3:.2f}",
                  f"{r['step_s'] / p.step_s - 1:+.0%}", f"{p.memory_bytes / (1 << 20):.2f}",
                  f"{r['peak_bytes'] / (1 << 20):.2f}", f"{r['peak_bytes'] / p.memory_bytes - 1:+.0%}")
    con.print(t)
