"""The planner's peak memory per rank against real gloo runs of a few plans of a small GPT (byte counts, so the
machine's load does not matter): the numbers of docs/planner.md's "Session 10" section.

    PYTHONPATH=src python3 scripts/parallel/plan_memory_check.py [--model 4x64] [--plans "dp2-rc-full,..."]
"""

from __future__ import annotations

import argparse

from tilestack.parallel.model import ModelConfig
from tilestack.parallel.plan import MeasuredCompute, Plan, describe_gpt, load_comm, measure_gloo, predict
from tilestack.parallel.plan.measure import measure_plans

PLANS = {
    "single-rc-full": dict(recompute="full"),
    "dp2-rc-full": dict(dp=2, recompute="full"),
    "pp2-gpipe-m1-rc-full": dict(pp=2, schedule="gpipe", microbatches=1, recompute="full"),
    "pp2-gpipe-m2-rc-full": dict(pp=2, schedule="gpipe", microbatches=2, recompute="full"),
    "pp2-1f1b-m4-rc-full": dict(pp=2, schedule="1f1b", microbatches=4, recompute="full"),
    "dp4-zero1": dict(dp=4, zero=1),
    "dp4-zero2": dict(dp=4, zero=2),
    "dp4-zero2-rc-selective": dict(dp=4, zero=2, recompute="selective"),
    "dp4-zero2-rc-full": dict(dp=4, zero=2, recompute="full"),
    "dp2-zero2-rc-full": dict(dp=2, zero=2, recompute="full"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="4x64", help="LAYERSxWIDTH (4 heads, vocab 256, sequence 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--plans", default=",".join(PLANS))
    a = ap.parse_args()
    L, D = (int(x) for x in a.model.split("x"))
    desc = describe_gpt(ModelConfig(n_layer=L, d=D, n_head=4, vocab=256, max_seq=64), 64, name=f"gpt-{a.model}")
    comm = load_comm("gloo-cpu") or measure_gloo(name="gloo-cpu")
    compute = MeasuredCompute.for_gpt(desc)
    plans = [Plan(batch=a.batch, **PLANS[name]) for name in a.plans.split(",")]
    for plan, m in zip(plans, measure_plans(desc, plans, steps=3, warmup=1), strict=True):
        p = predict(plan, desc, compute, comm)
        errs = [f"{meas / pred - 1:+.1%}" for meas, pred in zip(m["peak_bytes_per_rank"], p.peaks, strict=False)]
        print(f"{plan.label():24s} predicted MiB {[round(x / 2**20, 3) for x in p.peaks]}  measured "
              f"{[round(x / 2**20, 3) for x in m['peak_bytes_per_rank']]}  error per rank {errs}", flush=True)


if __name__ == "__main__":
    main()
