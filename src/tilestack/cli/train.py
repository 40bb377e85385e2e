"""``tilestack train``: train the parallel GPT under any layout on this machine's CPUs (gloo) or GPUs (NCCL).

    tilestack train --nproc 4 --dp 2 --tp 2 --sp --steps 20                   # DP x TP with sequence parallelism
    tilestack train --nproc 2 --pp 2 --schedule interleaved-1f1b --stages-per-rank 2 --microbatches 4
    tilestack train --nproc 8 --device cuda --dp-shard 8 --model 1.3b --seq 2048 --batch 8 --dtype bfloat16
    tilestack train --steps 100 --out run1 --save-every 10      # checkpoints in run1/ (cli/train_state.py)
    tilestack train --steps 100 --out run1 --resume             # after a kill: the uninterrupted run's end

Prints a line per step (loss, tokens/s), then tokens/s after warm-up, MFU (model FLOPs per token from
ModelConfig.flops_per_token over the device table's dense peak; none on a CPU) and peak memory per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import typer

from tilestack.cli import app

MODELS = ("tiny", "1.3b")


@app.command("train")
def train(
    nproc: int = typer.Option(1, min=1, help="processes (ranks); one GPU each with --device cuda"),
    device: str = typer.Option("cpu", help="cpu (gloo) or cuda (NCCL)"),
    dp: int = typer.Option(1, min=1, help="replicated data parallel degree (DDP, or ZeRO with --zero)"),
    dp_shard: int = typer.Option(1, min=1, help="fully sharded data parallel degree (FSDP2)"),
    tp: int = typer.Option(1, min=1, help="tensor parallel degree"),
    sp: bool = typer.Option(False, help="sequence parallelism on the tensor-parallel group"),
    pp: int = typer.Option(1, min=1, help="pipeline stages (ranks)"),
    schedule: str = typer.Option("1f1b", help="gpipe, 1f1b or interleaved-1f1b"),
    stages_per_rank: int = typer.Option(1, min=1, help="virtual stages per rank (interleaved-1f1b)"),
    microbatches: int = typer.Option(1, min=1),
    recompute: str = typer.Option("none", help="none, selective or full"),
    zero: int = typer.Option(0, help="ZeRO stage over dp: 0, 1 or 2"),
    dp_comm: str = typer.Option("library", help="library or ring all-reduce for dp gradients"),
    model: str = typer.Option("tiny", help="tiny (4 layers, d=32) or 1.3b (24 layers, d=2048)"),
    batch: int = typer.Option(8, min=1, help="global batch, sequences"),
    seq: int = typer.Option(32, min=1, help="tokens per sequence"),
    steps: int = typer.Option(10, min=2),
    lr: float = typer.Option(1e-3),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    attention: str = typer.Option("", help="math, sdpa or tilestack (default: the model's own)"),
    store: bool = typer.Option(True, help="append the result to the perf store (tilestack.perf.store)"),
    plan: str = typer.Option("", help="a plan file from `tilestack plan --out` (its ranks, degrees, model, batch, "
                             "seq and dtype replace those options)"),
    noise_scale: bool = typer.Option(False, help="measure the gradient noise scale from the per-rank gradients "
                                     "(plain data parallelism, --dp > 1) and print it with the goodput at this batch"),
    out: str = typer.Option("", help="an output folder: the model and optimizer state are checkpointed to "
                            "<out>/checkpoint (every --save-every steps and after the last) with the run's settings"),
    save_every: int = typer.Option(0, min=0, help="steps between checkpoints with --out (0: after the last only)"),
    resume: bool = typer.Option(False, help="go on from the checkpoint in --out (the steps it holds are skipped; "
                                "the same seed and settings end where an uninterrupted run would)"),
    seed: int = typer.Option(0, min=0, help="the initial model's seed"),
) -> None:
    """Train the parallel GPT for --steps steps under the given degrees."""
    from tilestack.parallel import GPT_1P3B, TINY, ParallelConfig, run_local
    from tilestack.parallel.engine import run_training
    from tilestack.parallel.model import ATTENTIONS
    if model not in MODELS:
        raise typer.BadParameter(f"--model {model!r}; expected one of {MODELS}")
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype {dtype!r}; expected float32 or bfloat16")
    if not 0 <= lr < math.inf:    # AdamW raised NaN and negative rates inside the ranks; inf trained to NaN losses
        raise typer.BadParameter(f"--lr {lr}; expected a finite learning rate >= 0", param_hint="--lr")
    from tilestack.parallel.config import DP_COMMS, PP_SCHEDULES, RECOMPUTE, ZERO_STAGES
    for option, given, allowed in (("--schedule", schedule, PP_SCHEDULES), ("--recompute", recompute, RECOMPUTE),
                                   ("--dp-comm", dp_comm, DP_COMMS), ("--zero", zero, ZERO_STAGES)):
        if given not in allowed:
            raise typer.BadParameter(f"{option} {given!r}; expected one of {tuple(allowed)}", param_hint=option)
    if sp and tp == 1 and not plan:     # (it was dropped without a word: sp=1)
        raise typer.BadParameter("--sp shards the sequence over the tensor-parallel group; got --tp 1; expected "
                                 "--tp > 1", param_hint="--sp")
    parallel = dict(dp=dp, dp_shard=dp_shard, tp=tp, sp=tp if sp else 1, pp=pp, pp_schedule=schedule,
                    stages_per_rank=stages_per_rank, microbatches=microbatches, recompute=recompute, zero=zero,
                    dp_comm=dp_comm)
    cfg = TINY if model == "tiny" else GPT_1P3B
    if attention:
        if attention not in ATTENTIONS:
            raise typer.BadParameter(f"--attention {attention!r}; expected one of {ATTENTIONS}")
        cfg = dataclasses.replace(cfg, attention=attention)
    if plan:
        from tilestack.parallel.model import ModelConfig
        from tilestack.parallel.plan.planfile import read_plan
        spec_file = read_plan(plan)
        nproc, parallel, batch, seq, dtype = (spec_file[k] for k in ("nproc", "parallel", "batch", "seq", "dtype"))
        cfg = ModelConfig(**spec_file["model"])
    pc = ParallelConfig(**parallel)
    pc.validate(nproc, model=cfg, batch=batch, seq=seq)     # fail here, not in nproc children
    if noise_scale:
        from tilestack.parallel.parallelize import uses_ddp
        if not uses_ddp(pc):
            raise typer.BadParameter(f"--noise-scale reads the per-rank gradients of plain data parallelism; got "
                                     f"dp={dp}, dp_shard={dp_shard}, tp={tp}, pp={pp}, zero={zero}; expected --dp > 1 "
                                     "and no other degree")
    spec = dict(parallel=parallel, model=cfg.__dict__, batch=batch, seq=seq, steps=steps, lr=lr, dtype=dtype,
                device=device, progress=True, noise_scale=noise_scale, seed=seed)
    if resume and not out:
        raise typer.BadParameter("--resume goes on from the checkpoint in --out; give --out <the run's folder>")
    if save_every and not out:      # (dropped without a word: a run meant to be checkpointed saved nothing)
        raise typer.BadParameter(f"--save-every {save_every} checkpoints into --out; give --out <a folder> (or "
                                 "leave --save-every out)", param_hint="--save-every")
    if store:
        from tilestack.cli.args import check_store
        check_store("--store", None)        # the default store, opened before the ranks start, not after the run
    with contextlib.ExitStack() as claim:     # --out held for this run until its ranks are done
        if out:
            from tilestack.cli.train_state import prepare_output
            spec.update(checkpoint=prepare_output(out, spec, pc, resume, claim), save_every=save_every,
                        resume=resume)
        results = run_local(run_training, nproc, (spec,), device=device)
    r0 = results[0]
    if not r0["losses"]:
        typer.echo(f"the checkpoint in {out} is at step {r0['start']}; --steps {steps} leaves nothing to train")
        return
    resumed = f" (resumed at step {r0['start']})" if r0["start"] else ""
    typer.echo(f"{nproc} ranks, {r0['n_params'] / 1e6:.2f} M parameters, final loss {r0['losses'][-1]:.4f}{resumed}")
    if r0["tokens_per_s"] is None:
        return                                   # (no step timed: nothing to report or store)
    typer.echo(f"tokens/s {r0['tokens_per_s']:,.0f}")
    if r0.get("noise_scale"):
        from tilestack.parallel.plan.goodput import efficiency
        phi = r0["noise_scale"][-1]
        rate = r0["tokens_per_s"] / seq
        typer.echo(f"gradient noise scale phi {phi:,.1f} sequences (per step: "
                   f"{', '.join(f'{p:.1f}' for p in r0['noise_scale'])}); at batch {batch}: statistical efficiency "
                   f"E = {efficiency(batch, phi, batch // pc.dp_total):.3f} against one rank's batch, goodput "
                   f"{rate * efficiency(batch, phi, batch // pc.dp_total):,.1f} sequences/s")
    from tilestack.perf.device import cpu_device, detect
    dev = detect(0) if device == "cuda" else cpu_device()
    peak = dev.spec.peak("bf16" if dtype == "bfloat16" else "fp32") if dev.spec else None
    if device == "cuda":
        mem = ", ".join(f"{r['peak_bytes'] / 2**30:.2f}" for r in results)
        typer.echo(f"peak memory per rank (GiB): {mem}")
    if peak:
        typer.echo(f"MFU {r0['tokens_per_s'] * r0['flops_per_token'] / (nproc * peak):.1%}")
    else:
        typer.echo("MFU: no published peak for this device")
    if store:
        _store(dev, spec, nproc, r0, peak)


def _store(dev, spec: dict, nproc: int, r0: dict, peak: float | None) -> None:
    """One row per run: latency = median step after warm-up, FLOPs and tokens per rank (so that the row's
    utilisation against one device's peak is the MFU)."""
    import statistics

    from tilestack.perf.metrics import Measurement
    from tilestack.perf.store import Store
    tokens = spec["batch"] * spec["seq"]
    timed = r0["seconds"][min(2, len(r0["seconds"]) - 1):]
    layout = "-".join(f"{k}{v}" for k, v in spec["parallel"].items() if k in ("pp", "dp", "dp_shard", "tp") and v > 1)
    m = Measurement(name=f"train/{layout or 'single'}", config=dict(spec, progress=None, nproc=nproc),
                    device=dev.name, dtype=spec["dtype"], latency_s=statistics.median(timed),
                    flops=r0["flops_per_token"] * tokens / nproc, bytes_read=0.0, bytes_written=0.0,
                    items=tokens / nproc, item_name="tokens", repeats=len(timed), timing_method="wall",
                    device_kind=dev.kind, published_peak_flops=peak)
    with Store() as st:
        run = st.start_run(device=dev, label="train", command="tilestack train")
        st.append(run, m)
    typer.echo(f"stored in the perf store as run {run}")
