"""docs/planner.md, Session 16: one process, predicted against measured (3 interleaved rounds), gpt 4x64 and 4x128
at batch 8 on this CPU.

    PYTHONPATH=src python3 scripts/parallel/plan_one_process_gap.py
"""

from tilestack.parallel.model import ModelConfig
from tilestack.parallel.plan import MeasuredCompute, Plan, describe_gpt, load_comm, predict
from tilestack.parallel.plan.measure import measure_plans


def main():
    for L, D in ((4, 64), (4, 128)):
        cfg = ModelConfig(n_layer=L, d=D, n_head=4, vocab=256, max_seq=64)
        desc = describe_gpt(cfg, 64, name=f"gpt-{L}x{D}")
        compute = MeasuredCompute.for_gpt(desc)
        comm = load_comm("gloo-cpu")
        plan = Plan(batch=8)
        p = predict(plan, desc, compute, comm)
        rows = measure_plans(desc, [plan], steps=10, warmup=2, rounds=3)
        m = rows[0]
        print(desc.name, "pred", round(p.step_s * 1e3, 2), {k: round(v * 1e3, 2) for k, v in p.terms.items() if v},
              "meas median", round(m["step_s_median"] * 1e3, 2), "least", round(m["step_s"] * 1e3, 2),
              "err", round(m["step_s_median"] / p.step_s - 1, 3))


if __name__ == "__main__":
    main()
