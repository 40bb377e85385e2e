"""The planner's predictions against measurement on this machine's CPUs (gloo), for several models and plans.

    PYTHONPATH=src python3 scripts/parallel/plan_cpu_validate.py --nproc 2,4 --out docs/results/plan_cpu.json \\
        --figure docs/img/plan_pred_vs_meas.png --time-limit 900

For each model (--models: small GPTs given as LxD, e.g. 4x64) and world size: the compute model is measured (per-
layer times, the wrappers' overheads), the collectives' fit is loaded (or measured: gloo-cpu), a lockstep probe on
that many ranks reads the machine's state (compute.lockstep_load: how much slower ranks in lockstep compute, and the
delay each synchronisation adds), every plan is predicted and ranked with it, and --plans of them are trained for
real (tilestack.parallel.plan.measure) in --rounds interleaved rounds whose runs are pooled per plan (one run of a
plan moved by 20% between runs minutes apart here), each run with the probe before and after its steps: this
machine is shared, and the probe says how much the other work slowed ranks in lockstep and delayed their
synchronisations while the plan ran. Each plan is then predicted again with that background and delay
(ComputeModel.set_load: the background cores for ComputeModel.contention, the delays per collective and per pipeline
send, counted as often as the plan's ranks meet), which uses nothing of the plan's own measured times: the median of
its timed steps against the medians of its probes (the rows' time_err), and the least step against the least probe
(time_err_least). The plans: the planner's choice, then a spread of layouts (one of each of dp, fsdp, tp, tp+sp, pp
1f1b, pp gpipe, interleaved, zero, recompute, where they fit), then the next-ranked. Prints one table row per plan
(predicted and measured step time and peak memory, the errors), then a summary: the share of plans within 15% (time)
and 10% (memory), and for each model and world size how far the planner's choice is from the fastest plan measured.
Stops starting new groups of runs after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tilestack.parallel.model import ModelConfig
from tilestack.parallel.plan import MeasuredCompute, describe_gpt, load_comm, measure_gloo, predict, search
from tilestack.parallel.plan.compute import PROBE_CHUNK_S, busy_cores, lockstep_load, sync_delays
from tilestack.parallel.plan.measure import measure_plans
from tilestack.parallel.plan.overhead import OVERHEADS
from tilestack.parallel.plan.search import choose, to_measure

TIME_TOL, MEM_TOL = 0.15, 0.10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="4x64,4x128,8x64", help="GPTs as LAYERSxWIDTH (4 heads, vocab 256)")
    ap.add_argument("--nproc", default="2,4")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--plans", type=int, default=6, help="plans measured per model and world size")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of every plan, pooled")
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument("--figure", default="", help="predicted vs measured PNG")
    args = ap.parse_args()
    t0 = time.monotonic()
    comm = load_comm("gloo-cpu") or measure_gloo(name="gloo-cpu")
    rows, summary, overheads, planned_at = [], [], {}, {}
    for spec in args.models.split(","):
        L, D = (int(x) for x in spec.split("x"))
        cfg = ModelConfig(n_layer=L, d=D, n_head=4, vocab=256, max_seq=args.seq)
        desc = describe_gpt(cfg, args.seq, name=f"gpt-{spec}")
        compute = MeasuredCompute.for_gpt(desc)
        overheads[desc.name] = {name: compute.overhead(name) for name in OVERHEADS}
        for n in (int(x) for x in args.nproc.split(",")):
            # the machine as n ranks in lockstep find it now: the planner ranks the plans at that state
            load = lockstep_load(n, comm)
            compute.set_load(*load, n)
            ranked = search(desc, compute, comm, world_size=n, batch=args.batch)
            planned_at[f"{desc.name} n={n}"] = dict(zip(("slowdown", "collective_s", "p2p_delay_s"), load,
                                                        strict=True))
            print(f"{desc.name} n={n}: planned at slowdown {load[0]:.2f}, {load[1] * 1e3:.2f} ms per scalar "
                  f"all-reduce, {load[2] * 1e3:.2f} ms delay per send", flush=True)
            chosen = choose(ranked)
            group = []
            if time.monotonic() - t0 > args.time_limit:
                print(f"time limit {args.time_limit:.0f} s reached: stopping", file=sys.stderr)
                break
            picked = to_measure(ranked, args.plans)
            # what else ran here meanwhile: lockstep probes before and after the steps say how much it slowed the
            # ranks; each plan is predicted again with that background (ComputeModel.contention). The plans are run
            # in --rounds interleaved rounds and each plan's runs pooled (measure.pool_rounds)
            busy = busy_cores()
            measured = measure_plans(desc, [r.plan for r in picked], steps=args.steps, probe_s=PROBE_CHUNK_S,
                                     rounds=args.rounds)
            for r, m in zip(picked, measured, strict=True):
                # the typical step against the typical load (medians over the timed steps and their probes), and
                # the least disturbed step against the least load its probes showed
                least_delays = sync_delays(m["collective_s"], m["p2p_s"], comm, n, m["probe_message_bytes"])
                compute.set_load(m["slowdown"], *least_delays, n)
                least = predict(r.plan, desc, compute, comm)
                delays = sync_delays(m["collective_s_median"], m["p2p_s_median"], comm, n, m["probe_message_bytes"])
                compute.set_load(m["slowdown_median"], *delays, n)
                p = predict(r.plan, desc, compute, comm)
                row = dict(model=desc.name, nproc=n, plan=p.plan.label(), chosen=r is chosen,
                           predicted_step_s=p.step_s, measured_step_s=m["step_s_median"],
                           predicted_step_s_least=least.step_s, measured_step_s_least=m["step_s"],
                           measured_step_s_all=m["step_s_all"], slowdown_median=m["slowdown_median"],
                           predicted_peak_bytes=p.memory_bytes,
                           measured_peak_bytes=m["peak_bytes"], predicted_peak_bytes_per_rank=p.peaks,
                           measured_peak_bytes_per_rank=m["peak_bytes_per_rank"], bound=p.bound, terms=p.terms,
                           predicted_components=p.memory, measured_components=m["components"],
                           background_cores=compute.background, slowdown=m["slowdown"],
                           collective_s=least_delays[0], p2p_delay_s=least_delays[1],
                           collective_s_median=delays[0], p2p_delay_s_median=delays[1],
                           predicted_step_s_planned=r.prediction.step_s, busy_cores_before=busy,
                           rounds=m["rounds"], measured_step_s_medians=m.get("step_s_medians", [m["step_s_median"]]))
                row["time_err"] = row["measured_step_s"] / row["predicted_step_s"] - 1
                row["time_err_least"] = row["measured_step_s_least"] / row["predicted_step_s_least"] - 1
                row["mem_err"] = row["measured_peak_bytes"] / row["predicted_peak_bytes"] - 1
                rows.append(row)
                group.append(row)
                print(f"{desc.name:10s} n={n} bg {compute.background:3.1f} delays {delays[0] * 1e3:4.2f} "
                      f"{delays[1] * 1e3:4.2f} ms "
                      f"{row['plan']:24s} "
                      f"pred {p.step_s * 1e3:8.2f} ms  meas "
                      f"{row['measured_step_s'] * 1e3:8.2f} ms ({row['time_err']:+6.1%}; least "
                      f"{row['time_err_least']:+6.1%})"
                      f"  mem pred "
                      f"{p.memory_bytes / 2**20:7.2f} MiB meas {m['peak_bytes'] / 2**20:7.2f} ({row['mem_err']:+6.1%})"
                      f"{'  <- chosen' if row['chosen'] else ''}", flush=True)
            if group:
                fastest = min(group, key=lambda r: r["measured_step_s"])
                ch = next((r for r in group if r["chosen"]), None)
                if ch is not None:
                    summary.append(dict(model=desc.name, nproc=n, chosen=ch["plan"], fastest=fastest["plan"],
                                        chosen_over_fastest=ch["measured_step_s"] / fastest["measured_step_s"] - 1))
    if args.figure and rows:
        from tilestack.parallel.plan.pictures import predicted_vs_measured_png
        predicted_vs_measured_png(rows, args.figure)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, summary=summary, overheads_s=overheads, planned_at=planned_at), f, indent=1)
    within_t = sum(abs(r["time_err"]) <= TIME_TOL for r in rows)
    within_least = sum(abs(r["time_err_least"]) <= TIME_TOL for r in rows)
    within_m = sum(abs(r["mem_err"]) <= MEM_TOL for r in rows)
    print("\nmodel       nproc  chosen                    fastest measured          chosen vs fastest")
    for s in summary:
        print(f"{s['model']:10s}  {s['nproc']:5d}  {s['chosen']:24s}  {s['fastest']:24s}  "
              f"{s['chosen_over_fastest']:+.1%}")
    print(f"\n{len(rows)} plans: step time within {TIME_TOL:.0%} for {within_t} (medians; {within_least} least against "
          f"least), peak memory within {MEM_TOL:.0%} for {within_m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
