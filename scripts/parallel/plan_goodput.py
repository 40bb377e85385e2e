"""Adaptive batch size by goodput against fixed batch sizes: time to a target loss, on the CPU.

    PYTHONPATH=src python3 scripts/parallel/plan_goodput.py --seeds 3 --out docs/results/planner_goodput.json \\
        --figure docs/img/planner_goodput.png --time-limit 600

A small GPT (tilestack.parallel.model) learns a synthetic language: tokens from a fixed random Markov chain in
which each token has a few likely successors, so the loss can fall well below log(vocab). Ways to train, each
from the same initial model and seed:
- fixed small: batch M0 (--small), AdamW at --lr;
- fixed large: batch --large (the largest candidate), AdamW at --lr x sqrt(large / M0) (square-root scaling for
  Adam); --also adds fixed batches in between, for context (the best fixed batch in hindsight);
- adaptive (Pollux, tilestack.parallel.plan.goodput.GoodputController): the gradient noise scale phi is read on one
  step in --probe-every from its two accumulation micro-steps of M / 2 samples (accumulate_and_observe; of the
  gradients preconditioned as AdamW preconditions them with --precondition; the other steps are one micro-step, as
  the fixed runs'); every --every steps the next batch is the candidate with the largest goodput = samples/s(M) x
  E(M), E(M) = (phi + M0) / (phi + M), at the learning rate --lr x sqrt(AdaScale gain (M / M0) E(M)); samples/s(M)
  is measured for each candidate first, for plain and probe steps, and mixed as the run mixes them.
Each run stops at the first evaluation (every --eval steps, on a fixed held-out batch) whose loss is at or below
--target, or after --max-samples; the evaluations' own time is not counted (at batch 8 an evaluation every 5 steps
costs about as much as the steps). Time is the process's CPU time (this 2-core machine is shared: wall time would
measure the other users); wall time is kept too. Prints the medians over --seeds, writes --out JSON and a
figure: phi over training and loss against time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def markov_batch(trans, batch: int, seq: int, gen):
    """(idx, targets) (batch, seq): sequences of the chain ``trans`` (V, V) row-stochastic."""
    import torch
    V = trans.shape[0]
    x = torch.empty(batch, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (batch,), generator=gen)
    for t in range(seq):
        x[:, t + 1] = torch.multinomial(trans[x[:, t]], 1, generator=gen).squeeze(1)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def make_chain(V: int, fanout: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    trans = torch.zeros(V, V)
    for v in range(V):
        succ = torch.randperm(V, generator=g)[:fanout]
        trans[v, succ] = torch.rand(fanout, generator=g) + 0.2
    return trans / trans.sum(1, keepdim=True)


def run(mode: str, args, seed: int, trans, held, step_s, probe_s) -> dict:
    import torch

    from tilestack.parallel import GPT, ModelConfig, lm_loss
    from tilestack.parallel.plan.goodput import GoodputController, GradientNoiseScale, accumulate_and_observe
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d=args.d, n_head=4, vocab=args.vocab, max_seq=args.seq)
    model = GPT(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    m0 = args.small
    ctl = GoodputController([int(c) for c in args.candidates.split(",")], step_s, m0, args.lr, probe_s=probe_s,
                            every=args.every, probe_every=args.probe_every, lr_rule="sqrt",
                            gns=GradientNoiseScale(ema=0.8))
    adaptive = mode == "adaptive"
    batch = {"small": m0, "large": args.large, "adaptive": m0}.get(mode) or int(mode.split("-")[1])   # fixed-M
    samples, step, cpu0, wall0 = 0, 0, time.process_time(), time.perf_counter()
    trace = []
    reached = None
    while samples < args.max_samples:
        if adaptive:
            batch = ctl.batch
        idx, targets = markov_batch(trans, batch, args.seq, gen)
        # square-root scaling for Adam: of the batch ratio (fixed), of AdaScale's gain (adaptive)
        lr = ctl.lr() if adaptive else args.lr * math.sqrt(batch / m0)
        for group in opt.param_groups:
            group["lr"] = lr
        accumulate_and_observe(model, lm_loss, idx, targets, micro_batches=ctl.micro_batches(step) if adaptive
                               else 1, gns=ctl.gns if adaptive else None,
                               optimizer=opt if args.precondition else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += batch
        if adaptive:
            ctl.after_step(step, samples)
        step += 1
        if step % args.eval == 0:     # the evaluation is the experiment's, not training's: its time is left out
            c, w = time.process_time(), time.perf_counter()
            with torch.no_grad():
                loss = float(lm_loss(model(held[0]), held[1]))
            trace.append((samples, c - cpu0, w - wall0, loss, batch))
            cpu0 += time.process_time() - c
            wall0 += time.perf_counter() - w
            if loss <= args.target:
                reached = trace[-1]
                break
    phis = [(n, phi, b) for _, n, phi, b in ctl.history]
    return dict(mode=mode, seed=seed, reached=reached is not None, samples=samples,
                cpu_s=(reached or trace[-1])[1], wall_s=(reached or trace[-1])[2], trace=trace, phi=phis)


def plot(runs: list[dict], target: float, path: str) -> None:
    """phi and the adaptive batch over training (left), held-out loss against CPU time per run (right)."""
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        if r["mode"] == "adaptive" and r["phi"]:
            a1.plot([p[0] for p in r["phi"]], [p[1] for p in r["phi"]], label=f"phi, seed {r['seed']}")
            a1.step([p[0] for p in r["phi"]], [p[2] for p in r["phi"]], "--", where="post", alpha=0.6,
                    label=f"batch, seed {r['seed']}")
        colour = {"small": "C0", "large": "C1", "adaptive": "C2"}.get(r["mode"]) or f"C{3 + modes.index(r['mode'])}"
        a2.plot([t[1] for t in r["trace"]], [t[3] for t in r["trace"]], color=colour, alpha=0.7,
                label=r["mode"] if r["seed"] == 0 else None)
    a1.set_xlabel("samples")
    a1.set_ylabel("gradient noise scale phi / batch")
    a1.set_yscale("log")
    a1.legend(fontsize=6)
    a2.axhline(target, color="black", linestyle=":", linewidth=1)
    a2.set_xlabel("CPU seconds")
    a2.set_ylabel("held-out loss")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--fanout", type=int, default=3)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--large", type=int, default=512)
    ap.add_argument("--candidates", default="8,16,32,64,128,256,512")
    ap.add_argument("--also", default="", help="more fixed batch sizes to train at, for context (e.g. 32,128)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--target", type=float, default=1.08)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--probe-every", type=int, default=4)
    ap.add_argument("--precondition", action=argparse.BooleanOptionalAction, default=False,
                    help="the noise scale of Adam's preconditioned gradients (Pollux's choice for Adam), else of the "
                         "raw gradients")
    ap.add_argument("--eval", type=int, default=5)
    ap.add_argument("--max-samples", type=int, default=400_000)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--figure", default="")
    args = ap.parse_args()
    import torch

    from tilestack.parallel import GPT, ModelConfig, lm_loss
    torch.set_num_threads(1)
    t_start = time.monotonic()
    trans = make_chain(args.vocab, args.fanout, 0)
    held = markov_batch(trans, 256, args.seq, torch.Generator().manual_seed(7))
    # seconds per step for each candidate batch: a few timed steps (CPU time) as the runs take them, a batch drawn,
    # forward and backward as one accumulation micro-step (plain) or two (a probe step), an AdamW step
    from tilestack.parallel.plan.goodput import accumulate_and_observe
    model = GPT(ModelConfig(n_layer=2, d=args.d, n_head=4, vocab=args.vocab, max_seq=args.seq))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(1)
    step_s, probe_s = {}, {}
    for m in (int(c) for c in args.candidates.split(",")):
        for micro, table in ((1, step_s), (2, probe_s)):
            ts = []
            for _ in range(6):
                t0 = time.process_time()
                idx, targets = markov_batch(trans, m, args.seq, gen)
                accumulate_and_observe(model, lm_loss, idx, targets, micro_batches=micro)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ts.append(time.process_time() - t0)
            table[m] = min(ts[1:])
    throughput = {m: m / step_s[m] for m in step_s}
    print("samples/s by batch (CPU time, plain steps):", {m: round(v) for m, v in throughput.items()},
          "probe step / plain step:", {m: round(probe_s[m] / step_s[m], 2) for m in step_s}, flush=True)
    modes = ["small", "large", *(f"fixed-{m}" for m in args.also.split(",") if m), "adaptive"]
    runs = []
    for seed in range(args.seeds):
        for mode in modes:
            if time.monotonic() - t_start > args.time_limit:
                print("time limit reached: stopping", flush=True)
                break
            r = run(mode, args, seed, trans, held, step_s, probe_s)
            runs.append(r)
            print(f"seed {seed} {mode:8s} reached={r['reached']} samples {r['samples']:7d} cpu {r['cpu_s']:6.2f} s "
                  f"wall {r['wall_s']:6.2f} s" + (f" final phi {r['phi'][-1][1]:.1f} batch {r['phi'][-1][2]}"
                                                  if r["phi"] else ""), flush=True)
    print(f"\ntarget loss {args.target} (log vocab = {math.log(args.vocab):.2f}); medians over seeds")
    print(f"{'mode':9s} {'reached':>8s} {'samples':>9s} {'cpu s':>8s} {'wall s':>8s}")
    summary = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        if not rs:
            continue
        summary[mode] = dict(reached=sum(r["reached"] for r in rs), n=len(rs),
                             samples=statistics.median(r["samples"] for r in rs),
                             cpu_s=statistics.median(r["cpu_s"] for r in rs),
                             wall_s=statistics.median(r["wall_s"] for r in rs))
        s = summary[mode]
        print(f"{mode:9s} {s['reached']:>4d}/{s['n']:<3d} {s['samples']:9.0f} {s['cpu_s']:8.2f} {s['wall_s']:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), throughput=throughput, step_s=step_s, probe_s=probe_s, summary=summary,
                           runs=runs), f, indent=1)
    if args.figure and runs:
        plot(runs, args.target, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
