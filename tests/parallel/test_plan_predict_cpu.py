"""Predicted against measured step time on this machine's CPU (gloo) for a tiny GPT: the planner's per-layer
timings, overheads and collective fit against real Trainer steps of the same plans.

Tolerance, stated: the least disturbed of ``STEPS`` steps over ``RUNS`` runs at least 1 / TIME_FACTOR of the
prediction for an idle machine and at most TIME_FACTOR times the prediction at the slowdown lockstep probes
measured between the steps (TIME_FACTOR = 3). It is wide because this 2-core machine is shared with other work
that the test cannot stop (docs/planner.md shows how far the load moves measured times); it still fails a model
that forgets a term (the wrappers' overheads alone are 1-3x a tiny model's compute) or double counts one. Peak
memory is compared within 15%."""

import pytest

from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import MeasuredCompute, Plan, describe_gpt, predict
from tilestack.parallel.plan.comm import CommModel
from tilestack.parallel.plan.measure import measure_plans

TIME_FACTOR = 3.0
TIME_TRIES = 3
TP_FACTOR = 1.5
TP_TRIES = 3
MEM_TOL = 0.15
STEPS, RUNS = 6, 2
# gloo on localhost, 2 ranks, as measure_gloo fits it on this machine (about 0.4 ms latency, 1-2 GB/s)
GLOO = CommModel(fits={k: {2: (4e-4, 6e-10)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                 source="gloo, localhost (typical fit)")


@pytest.fixture(scope="module")
def tiny():
    desc = describe_gpt(ModelConfig(n_layer=4, d=64, n_head=4, vocab=128, max_seq=32), 32)
    return desc, MeasuredCompute.for_gpt(desc)


@pytest.mark.slow
@pytest.mark.parametrize("plan", [Plan(batch=8), Plan(batch=8, pp=2, microbatches=2), Plan(batch=8, dp=2)],
                         ids=lambda p: p.label())
def test_predicted_step_time_and_memory_match_measured(tiny, plan):
    """The least disturbed step between the prediction for an idle machine and the prediction at the slowdown
    the lockstep probes between the steps saw (median), each within TIME_FACTOR: other work on this machine
    (a compile, CI's second worker) slowed a dp=2 step 3x, yet a step it spared runs at the idle prediction.

    Up to TIME_TRIES measurements, each after the layers are timed again: the "idle" prediction is made of layer
    times measured once (medians of wall time), and a burst of other work while they were timed raises it with
    no probe to say so. At load 16 (other jobs on this 2-core machine) the least disturbed steps ran 3.1x (single)
    and 4.0x (dp=2) below it. A model that forgets or double counts a term fails every try; a burst passes on a
    later one."""
    from tilestack.parallel.plan.compute import PROBE_CHUNK_S, background_of
    desc, compute = tiny
    seen = []
    for attempt in range(TIME_TRIES):
        if attempt:
            compute = MeasuredCompute.for_gpt(desc)  # the layers timed again, not the cached times of the burst
        rows = [measure_plans(desc, [plan], steps=STEPS, warmup=2, probe_s=PROBE_CHUNK_S)[0] for _ in range(RUNS)]
        row = min(rows, key=lambda r: r["step_s"])
        pred = predict(plan, desc, compute, GLOO)
        idle = pred.step_s
        compute.background = background_of(max(r["slowdown_median"] for r in rows), plan.world_size)
        try:
            loaded = predict(plan, desc, compute, GLOO).step_s
        finally:
            compute.background = 0.0
        measured = row["step_s"]
        seen.append(f"measured {measured * 1e3:.2f} ms, predicted {idle * 1e3:.2f} ms idle, "
                    f"{loaded * 1e3:.2f} ms at the probes' slowdown")
        if idle / TIME_FACTOR <= measured <= loaded * TIME_FACTOR:
            break
    else:
        pytest.fail(f"{plan.label()} outside {TIME_FACTOR}x in all {TIME_TRIES} tries: " + "; ".join(seen))
    peak = min(r["peak_bytes"] for r in rows)
    assert peak == pytest.approx(pred.memory_bytes, rel=MEM_TOL)


@pytest.mark.slow
def test_tensor_parallel_step_time(tiny):
    """tp=2 within TP_FACTOR = 1.5 of measured (median step against the prediction at the median slowdown of the
    lockstep probes run between the steps, as plan_cpu_validate.py compares). DTensor issues more collectives
    than Megatron's 2 + 2 per block and waits for each on gloo's asynchronous path; timed on a one-rank group
    (where they are no-ops) the wrapper's cost came out less than half of it and the step was predicted about 2x
    too fast.

    Up to TP_TRIES measurements: the probes sample the load between steps, not during them, so a burst of other
    work (CI's second pytest worker starting a compile) can slow the steps more than the probes saw (CI measured
    1.62x once). A model that is wrong fails every try; a burst passes on a later one."""
    from tilestack.parallel.plan.compute import PROBE_CHUNK_S, sync_delays
    desc, compute = tiny
    plan = Plan(batch=8, tp=2)
    n = plan.world_size
    compute.overhead("tp")
    seen = []
    for _ in range(TP_TRIES):
        (row,) = measure_plans(desc, [plan], steps=STEPS + 2, warmup=2, probe_s=PROBE_CHUNK_S)
        # the whole load the probes read: background cores and what a collective waits beyond its idle fit
        # (DTensor's tp step is dozens of small collectives, so under load their waits dominate)
        delays = sync_delays(row["collective_s_median"], row["p2p_s_median"], GLOO, n, row["probe_message_bytes"])
        compute.set_load(row["slowdown_median"], *delays, n)
        try:
            pred = predict(plan, desc, compute, GLOO)
        finally:
            compute.background = compute.collective_s = compute.p2p_delay = 0.0
        ratio = row["step_s_median"] / pred.step_s
        seen.append(f"measured {row['step_s_median'] * 1e3:.2f} ms, predicted {pred.step_s * 1e3:.2f} ms at "
                    f"slowdown {row['slowdown_median']:.2f}, collective {delays[0] * 1e3:.2f} ms (ratio {ratio:.2f})")
        if 1 / TP_FACTOR <= ratio <= TP_FACTOR:
            return
    pytest.fail(f"tp=2 outside {TP_FACTOR}x in all {TP_TRIES} tries: " + "; ".join(seen))
