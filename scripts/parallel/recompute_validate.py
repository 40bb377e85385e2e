"""Selective and full recompute on this CPU: measured dp2 steps of a small GPT against the planner's prediction
with MeasuredCompute's recompute cost (selective measured per block) and with the forward-FLOP share it replaced,
both at the load the lockstep probes read while the plan ran. docs/planner.md ("Selective recompute, measured")
has two runs of it.

    PYTHONPATH=src python scripts/parallel/recompute_validate.py
"""

from __future__ import annotations

from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import MeasuredCompute, Plan, describe_gpt, predict
from tilestack.parallel.plan.comm import CommModel
from tilestack.parallel.plan.compute import PROBE_CHUNK_S, ComputeModel, sync_delays
from tilestack.parallel.plan.measure import measure_plans

# gloo on localhost, 2 ranks (as tests/parallel/test_plan_predict_cpu.py takes it)
GLOO = CommModel(fits={k: {2: (4e-4, 6e-10)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                 source="gloo, localhost (typical fit)")


def main() -> None:
    desc = describe_gpt(ModelConfig(n_layer=8, d=64, n_head=4, vocab=256, max_seq=64), 64)
    compute = MeasuredCompute.for_gpt(desc)
    print("| plan | slowdown | measured ms | predicted ms | error | FLOP-share ms | error |")
    print("|---|---|---|---|---|---|---|")
    for plan in (Plan(batch=8, dp=2), Plan(batch=8, dp=2, recompute="selective"),
                 Plan(batch=8, dp=2, recompute="full")):
        (row,) = measure_plans(desc, [plan], steps=8, warmup=2, probe_s=PROBE_CHUNK_S)
        delays = sync_delays(row["collective_s_median"], row["p2p_s_median"], GLOO, 2, row["probe_message_bytes"])
        compute.set_load(row["slowdown_median"], *delays, 2)
        new = predict(plan, desc, compute, GLOO).step_s
        compute.recompute_s = lambda *args: ComputeModel.recompute_s(compute, *args)   # the FLOP share
        old = predict(plan, desc, compute, GLOO).step_s
        del compute.recompute_s
        compute.background = compute.collective_s = compute.p2p_delay = 0.0
        m = row["step_s_median"]
        print(f"| {plan.label()} | {row['slowdown_median']:.2f} | {m * 1e3:.1f} | {new * 1e3:.1f} | "
              f"{new / m - 1:+.0%} | {old * 1e3:.1f} | {old / m - 1:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
