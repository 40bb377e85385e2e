"""The planner on paper against Narayanan et al. (SC'21, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM"), Table 1: GPT models of 1.7B to 1T parameters on 32 to 3072 A100s.

    PYTHONPATH=src python3 scripts/parallel/plan_narayanan.py --out docs/results/planner_narayanan.json

For each row, given the same model, batch and cluster (A100 SXM 80 GB peaks from tilestack.perf's device table;
8 GPUs per node on NVLink; 8 x 200 Gb/s InfiniBand per node, 25 GB/s per GPU), the planner predicts the published
plan (its tensor and pipeline degrees, data parallelism for the rest, interleaved 1F1B, full recompute) and
searches the plans around it: tp in 1..8 (within a node), every pipeline degree that divides the layers and the
GPUs, micro-batch sizes 1, 2, 4, 8, 1F1B or interleaved (2 chunks), full or selective recompute, under 80 GB.
Prints, side by side: the published degrees and TFLOP/s per GPU, the planner's prediction for the published plan,
the planner's choice and its prediction. TFLOP/s per GPU are counted as the paper does (its equation 3, with the
recompute forward): 96 B s l h^2 (1 + s / (6 h) + V / (16 l h)) per step.

Assumptions (not measured on A100s): the compute efficiencies are those measured on the H200 (cuBLAS 73% of peak,
cuDNN attention 45%, copies 89% of bandwidth); NVLink collectives are ANCHORS.md's H200 NCCL fits at 600 / 900 of
their bandwidth (NVLink 3 against 4); the inter-node ring runs at each GPU's 25 GB/s with 10 us per step; optimizer
state is counted as 16-bit moments (Megatron keeps f32 master weights and moments: 12 more bytes per parameter,
so the memory limit here is looser than the paper's); no receive buffer per micro-batch (Megatron's schedules
reuse theirs; torch's PipelineStage, which tilestack.parallel runs, keeps one per micro-batch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Narayanan et al. 2021, Table 1: params (billions), heads, hidden, layers, TP, PP, GPUs, batch, TFLOP/s per GPU
TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
SEQ, VOCAB = 2048, 51200
GPUS_PER_NODE = 8
IB_BYTES_PER_S = 25e9          # 200 Gb/s HDR per GPU
NVLINK_RATIO = 600 / 900       # A100 NVLink 3 against H200 NVLink 4, GB/s per GPU
MEMORY = 80e9


def paper_flops(B: int, l: int, h: int) -> float:
    return 96 * B * SEQ * l * h * h * (1 + SEQ / (6 * h) + VOCAB / (16 * l * h))


def candidates(desc, n: int, batch: int, layers: int, heads: int, hidden: int, paper: tuple[int, int]):
    from tilestack.parallel.plan import Plan
    for tp in (1, 2, 4, 8):
        if heads % tp or hidden % tp:
            continue
        for pp in range(1, layers + 1):
            if layers % pp or n % (tp * pp):
                continue
            dp = n // (tp * pp)
            if batch % dp:
                continue
            local = batch // dp
            # tilestack.parallel takes micro-batches only with a pipeline: without one, the rank's whole batch
            for mbs in ((1, 2, 4, 8) if pp > 1 else (local,)):
                if local % mbs:
                    continue
                m = local // mbs
                for sched, v in (("1f1b", 1), ("interleaved-1f1b", 2)):
                    if pp == 1 and v > 1:
                        continue
                    if v > 1 and (layers % (pp * v) or m % pp):
                        continue
                    if pp > 1 and m < pp:
                        continue
                    for rc in ("full", "selective"):
                        yield Plan(batch=batch, pp=pp, dp=dp, tp=tp, schedule=sched if pp > 1 else "1f1b",
                                   stages_per_rank=v if pp > 1 else 1, microbatches=m, recompute=rc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="comma-separated row indices (default all)")
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from tilestack.parallel.plan import RooflineCompute, describe_transformer, h200_nccl, predict
    from tilestack.parallel.plan.comm import ClusterComm, CommModel
    nv = h200_nccl()
    nvlink = CommModel(fits={k: {n: (a, b / NVLINK_RATIO) for n, (a, b) in f.items()} for k, f in nv.fits.items()},
                       source="NVLink 3 (H200 NCCL fits x 600/900)")
    comm = ClusterComm(fits={}, source="A100 cluster: NVLink within 8, IB 25 GB/s per GPU between", intra=nvlink,
                       gpus_per_node=GPUS_PER_NODE, inter_bytes_per_s=IB_BYTES_PER_S)
    rows = [TABLE1[int(i)] for i in args.rows.split(",")] if args.rows else TABLE1
    t0 = time.monotonic()
    out = []
    for params, heads, hidden, layers, tp, pp, n, batch, tflops in rows:
        if time.monotonic() - t0 > args.time_limit:
            print("time limit reached: stopping", flush=True)
            break
        desc = describe_transformer(n_layer=layers, d=hidden, n_head=heads, vocab=VOCAB, seq=SEQ, dtype_bytes=2,
                                    name=f"{params}B", flash=False)
        compute = RooflineCompute(desc, "a100-sxm-80gb", dtype="bf16")
        flops = paper_flops(batch, layers, hidden)
        best = None
        published = None           # the paper's degrees, at their best micro-batch and schedule here, that fit
        published_over = None      # ... the best of them past the memory limit, where none fits
        for plan in candidates(desc, n, batch, layers, heads, hidden, (tp, pp)):
            p = predict(plan, desc, compute, comm, recv_buffers=False)      # Megatron reuses its buffers
            fits = p.memory_bytes <= MEMORY
            if plan.tp == tp and plan.pp == pp and plan.recompute == "full":
                if fits and (published is None or p.step_s < published.step_s):
                    published = p
                if not fits and (published_over is None or p.step_s < published_over.step_s):
                    published_over = p
            if fits and (best is None or p.step_s < best.step_s):
                best = p
        row = dict(params_b=params, gpus=n, batch=batch, paper_tp=tp, paper_pp=pp, paper_tflops=tflops)
        # Without a pipeline Megatron still splits a rank's batch into micro-batches (gradient accumulation), which
        # tilestack's Plan takes only with one (pp > 1): there the published plan runs the rank's whole batch at
        # once. Where that passes the memory limit (18.4B: 32 sequences, 88 GB), its time is still predicted (an
        # accumulated step costs about what one batch does) and the row says it did not fit.
        shown = published or published_over
        if shown is not None:
            row.update(pred_paper_plan=shown.plan.label(), pred_paper_tflops=flops / shown.step_s / n / 1e12,
                       pred_paper_mem_gb=shown.memory_bytes / 1e9, pred_paper_fits=published is not None)
        if best is not None:
            row.update(choice=best.plan.label(), choice_tp=best.plan.tp, choice_pp=best.plan.pp,
                       choice_tflops=flops / best.step_s / n / 1e12, choice_bound=best.bound,
                       choice_mem_gb=best.memory_bytes / 1e9,
                       choice_faster=shown is None or best.step_s <= shown.step_s)
        out.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':>7s} {'GPUs':>5s} | {'paper t,p':>9s} {'TFLOP/s':>8s} | {'pred (paper plan)':>17s} "
          f"{'err':>6s} | {'choice':34s} {'TFLOP/s':>8s}")
    for r in out:
        pred = r.get("pred_paper_tflops")
        err = f"{pred / r['paper_tflops'] - 1:+.0%}" if pred else "-"
        err += "" if r.get("pred_paper_fits", True) else "*"
        print(f"{r['params_b']:6.1f}B {r['gpus']:5d} | {r['paper_tp']:>4d},{r['paper_pp']:<4d} "
              f"{r['paper_tflops']:8.0f} | {pred or float('nan'):17.0f} {err:>6s} | {r.get('choice', '-'):34s} "
              f"{r.get('choice_tflops', 0):8.0f}")
    if any(not r.get("pred_paper_fits", True) for r in out):
        print("* the published plan, run without micro-batches (no pipeline), past the 80 GB limit here")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(assumptions=__doc__.split("Assumptions")[1].strip(), rows=out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
