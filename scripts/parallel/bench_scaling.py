"""Scaling of every parallel strategy on one machine: tokens/s, MFU, peak memory per GPU, scaling efficiency.

    PYTHONPATH=src python3 scripts/parallel/bench_scaling.py --gpus 8                       # all strategies
    PYTHONPATH=src python3 scripts/parallel/bench_scaling.py --gpus 4 --only ddp,fsdp,tp-sp
    PYTHONPATH=src python3 scripts/parallel/bench_scaling.py --device cpu --gpus 2 --model tiny --seq 32 --steps 4

Each strategy trains the parallel GPT (tilestack.parallel.model) for --steps steps in a fresh process group of
--gpus ranks (NCCL, one GPU each; gloo on --device cpu), after a 1-rank baseline of the same model and per-GPU
load. Weak scaling: every data-parallel rank gets --per-gpu-batch sequences; tensor- and pipeline-parallel
ranks share theirs, so the global batch is per_gpu_batch * dp * dp_shard (pipelines take 2 * pp micro-batches
of it, rounded to what divides).

Columns: tokens/s (whole job, after --warmup steps), tokens/s per GPU, MFU = tokens/s * FLOPs per token /
(GPUs * dense peak of the device table; ModelConfig.flops_per_token: 6 * matmul parameters + attention),
peak memory allocated per GPU (max over ranks), scaling efficiency = (tokens/s per GPU) / (1-GPU tokens/s).
``--json out.json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from tilestack.parallel import GPT_1P3B, TINY, ModelConfig, ParallelConfig, run_local
from tilestack.parallel.engine import run_training

MODELS = {
    "tiny": TINY,
    "350m": ModelConfig(n_layer=24, d=1024, n_head=16, vocab=50304, max_seq=2048, attention="sdpa"),
    "1.3b": GPT_1P3B,
}


def strategies(n: int) -> dict[str, dict]:
    """Layouts of ``n`` ranks, by name (those whose degrees do not fit ``n`` are left out)."""
    half = n // 2
    out = {
        "ddp": dict(dp=n),
        "ddp-ring": dict(dp=n, dp_comm="ring"),
        "zero1": dict(dp=n, zero=1),
        "zero2": dict(dp=n, zero=2),
        "fsdp": dict(dp_shard=n),
        "fsdp-selective": dict(dp_shard=n, recompute="selective"),
        "fsdp-full-recompute": dict(dp_shard=n, recompute="full"),
        "tp": dict(tp=n),
        "tp-sp": dict(tp=n, sp=n),
        "pp-gpipe": dict(pp=n, pp_schedule="gpipe", microbatches=2 * n),
        "pp-1f1b": dict(pp=n, microbatches=2 * n),
        "pp-interleaved": dict(pp=n, pp_schedule="interleaved-1f1b", stages_per_rank=2, microbatches=2 * n),
    }
    if n >= 4 and n % 2 == 0:
        out |= {
            "dp-x-tp-sp": dict(dp=half, tp=2, sp=2),
            "fsdp-x-tp-sp": dict(dp_shard=half, tp=2, sp=2),
            "hsdp": dict(dp=2, dp_shard=half),
            "pp-x-dp": dict(pp=2, dp=half, microbatches=4),
            "pp-x-fsdp-x-tp": dict(pp=2, dp_shard=n // 4, tp=2, sp=2, microbatches=4) if n % 4 == 0 else None,
        }
    return {k: v for k, v in out.items() if v is not None}


def fit(pc: dict, cfg: ModelConfig, n: int, per_gpu_batch: int, seq: int) -> tuple[ParallelConfig, int] | str:
    """(config, global batch), or why the layout does not fit this model."""
    p = ParallelConfig(**pc)
    batch = per_gpu_batch * p.dp_total
    if p.pp > 1:    # enough rows per data-parallel rank for the micro-batches
        batch = max(batch, p.microbatches * p.dp_total)
    try:
        p.validate(n, model=cfg, batch=batch, seq=seq)
    except ValueError as e:
        return str(e)
    return p, batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 2)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--model", default="350m", choices=sorted(MODELS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--per-gpu-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    ap.add_argument("--attention", default="", choices=("", "math", "sdpa", "tilestack"),
                    help="attention core (default: the model's, sdpa for 350m and 1.3b)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    cfg = MODELS[a.model]
    if a.attention:
        cfg = dataclasses.replace(cfg, attention=a.attention)
    peak = None
    if a.device == "cuda":
        from tilestack.perf.device import detect
        dev = detect(0)
        peak = dev.spec.peak("bf16" if a.dtype == "bfloat16" else "fp32") if dev.spec else None
        print(f"{a.gpus} x {dev.name}, dense peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s per GPU")
    names = [s for s in a.only.split(",") if s] or list(strategies(a.gpus))
    table = strategies(a.gpus)
    unknown = [s for s in names if s not in table]
    if unknown:
        print(f"unknown strategies {unknown}; expected some of {list(table)}", file=sys.stderr)
        return 2

    def run(pc: ParallelConfig, n: int, batch: int) -> dict:
        spec = dict(parallel=pc.describe(), model=cfg.__dict__, batch=batch, seq=a.seq, steps=a.steps,
                    warmup=a.warmup, dtype=a.dtype, device=a.device)
        res = run_local(run_training, n, (spec,), device=a.device, timeout_s=1800)
        mem = [r["peak_bytes"] for r in res if r["peak_bytes"] is not None]
        r0 = res[0]
        return dict(tokens_per_s=r0["tokens_per_s"], flops_per_token=r0["flops_per_token"],
                    peak_gib=max(mem) / 2**30 if mem else None, loss=r0["losses"][-1])

    base = run(ParallelConfig(), 1, a.per_gpu_batch)
    rows = [dict(strategy="1 GPU", gpus=1, batch=a.per_gpu_batch, **base)]
    for name in names:
        got = fit(table[name], cfg, a.gpus, a.per_gpu_batch, a.seq)
        if isinstance(got, str):
            rows.append(dict(strategy=name, gpus=a.gpus, skipped=got))
            continue
        pc, batch = got
        try:
            rows.append(dict(strategy=name, gpus=a.gpus, batch=batch, **run(pc, a.gpus, batch)))
        except Exception as e:  # noqa: BLE001 - one strategy failing (e.g. out of memory) is one row
            rows.append(dict(strategy=name, gpus=a.gpus, skipped=f"{type(e).__name__}: {str(e)[-300:]}"))

    print(f"\nmodel {a.model} ({cfg.n_layer} layers, d={cfg.d}, {cfg.attention} attention), seq {a.seq}, {a.dtype}, "
          f"{a.per_gpu_batch} sequences per data-parallel rank")
    head = (f"{'strategy':<22}{'GPUs':>5}{'batch':>6}{'tokens/s':>12}{'tok/s/GPU':>11}{'MFU':>7}{'mem GiB':>9}"
            f"{'scaling':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['strategy']:<22}{r['gpus']:>5}  skipped: {r['skipped'][:150]}")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (r["gpus"] * peak) if peak else None
        r["scaling"] = per_gpu / base["tokens_per_s"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['strategy']:<22}{r['gpus']:>5}{r['batch']:>6}{r['tokens_per_s']:>12,.0f}{per_gpu:>11,.0f}"
              f"{mfu:>7}{mem:>9}{r['scaling']:>9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
