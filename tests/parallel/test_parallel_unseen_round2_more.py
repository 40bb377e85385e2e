"""Unseen round 2 of tilestack.parallel, continued: refusals by name (heads, layers or a batch a layout cannot
split, an accumulation that does not divide the batch, tied weights under a pipeline or tensor parallelism, a
clip before any gradient or with a bad bound), a checkpoint saved mid-run and loaded into a fresh trainer under
each layout (the continuation bit for bit the uninterrupted run's), and the hybrids DP x TP, FSDP2 x TP, ZeRO-2 x TP
and PP x DP on 4 gloo processes with clipping and accumulation, in float64 against one process."""

import math

import par_workers_unseen_round2 as W
import pytest
import torch

from tilestack.parallel import run_local

# (model, ParallelConfig keywords, opts, batch, call), call: "" a step, "k" step(accumulate=k), "clip=x" a clip
# after forward_backward, "clip-before-backward"; then fragments every rank's message must hold
REFUSALS = [
    (("three", dict(pp=2, microbatches=2), {}, 6, ""), ("n_layer=3", "pp*stages_per_rank")),
    (("three", dict(tp=2), {}, 6, ""), ("n_head=3", "tp=2")),
    (("two", dict(dp=2), {}, 7, ""), ("batch=7", "dp*dp_shard=2")),
    (("two", dict(pp=2, microbatches=4), {}, 6, ""), ("microbatches=4",)),
    (("two", dict(dp=2), {}, 6, "4"), ("accumulate=4", "batch of 6")),
    (("two", dict(dp=2), {}, 6, "3"), ("accumulate=3", "dp*dp_shard=2")),     # chunks of 2 rows: 1 per rank, ok
    (("two", dict(dp=2), {}, 6, "0"), ("accumulate=0", "positive int")),
    (("two", dict(dp=2), {}, 6, "6"), ("accumulate=6", "batch=1")),           # chunks of 1 row over 2 ranks
    (("two", dict(pp=2, microbatches=2), {"tied": True}, 6, ""), ("lm_head.weight", "wte.weight", "pp=2")),
    (("two", dict(tp=2), {"tied": True}, 6, ""), ("lm_head.weight", "wte.weight", "tp=2")),
    (("two", dict(dp=2), {}, 6, "clip-before-backward"), ("clip_grad_norm_", "forward_backward")),
    (("two", dict(dp=2), {}, 6, "clip=nan"), ("max_norm=nan",)),
    (("two", dict(dp_shard=2), {}, 6, "clip=-1"), ("max_norm=-1.0",)),
]


@pytest.fixture(scope="module")
def refused():
    return run_local(W.refusals, 2, ([case for case, _ in REFUSALS],), timeout_s=300)


@pytest.mark.parametrize("k", range(len(REFUSALS)))
def test_refused_by_name_on_every_rank(refused, k):
    (_, kw, _, batch, call), fragments = REFUSALS[k]
    said = [r[k] for r in refused]
    assert said[0] == said[1], said
    if call == "3":            # 3 chunks of 2 rows split over dp=2: allowed
        assert said[0] == "no error", said[0]
        return
    assert said[0].startswith("ParallelConfigError"), said[0]
    for frag in fragments:
        assert frag in said[0], (kw, call, frag, said[0])


# ---- a checkpoint saved mid-run: the continuation is the uninterrupted run's -------------------------------------
CKPT_STEPS, CKPT_CUT = 3, 1
CKPT = {
    "ddp-ring-masked": (dict(dp=2, dp_comm="ring"), {"masked": True}),
    "fsdp2": (dict(dp_shard=2), {}),
    "fsdp2-frozen": (dict(dp_shard=2), {"frozen": True}),
    "tp-sp-selective": (dict(tp=2, sp=2, recompute="selective"), {}),
    "1f1b": (dict(pp=2, microbatches=3), {}),
    "gpipe-one-micro-full-recompute": (dict(pp=2, pp_schedule="gpipe", microbatches=1, recompute="full"), {}),
}


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cases = [(name, kw, opts) for name, (kw, opts) in CKPT.items()]
    ranks = run_local(W.checkpoint_continuations, 2, (cases, str(folder), CKPT_STEPS, CKPT_CUT), timeout_s=400)
    return {name: [r[name] for r in ranks] for name in CKPT}


@pytest.mark.parametrize("name", list(CKPT))
def test_resumed_run_continues_bit_for_bit(continued, name):
    ref = W.reference("two", CKPT_STEPS, CKPT[name][1])
    for rank, got in enumerate(continued[name]):
        assert "error" not in got, f"{name} rank {rank}:\n{got['error']}"
        assert got["start"] == CKPT_CUT
        assert got["rest"] == got["whole"][CKPT_CUT:], (name, rank, got["rest"], got["whole"])
        assert got["params_rest"].keys() == got["params_whole"].keys()
        for pname, p in got["params_rest"].items():
            assert torch.equal(p, got["params_whole"][pname]), (name, rank, pname)
        for step, (a, b) in enumerate(zip(got["whole"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-10 * abs(b), (name, rank, step, a, b)
        for pname, p in got["params_whole"].items():
            torch.testing.assert_close(p, ref["params"][pname], rtol=1e-9, atol=1e-10)


# ---- hybrids on 4 ranks ------------------------------------------------------------------------------------------
HYBRID_STEPS = 2
HYBRIDS = {
    "dp-x-tp-sp-clip": ("two", dict(dp=2, tp=2, sp=2), {"clip": True}),
    "fsdp2-x-tp-clip-frozen": ("two", dict(dp_shard=2, tp=2), {"clip": True, "frozen": True}),
    "zero2-x-tp-clip": ("two", dict(dp=2, zero=2, tp=2, zero_bucket_numel=400), {"clip": True}),
    "pp-x-dp-clip-accumulate-masked": ("two", dict(pp=2, dp=2, microbatches=1, pp_schedule="gpipe"),
                                       {"accumulate": 3, "masked": True, "clip": True}),
}


@pytest.fixture(scope="module")
def hybrids():
    scenarios = [(name, model, kw, HYBRID_STEPS, opts) for name, (model, kw, opts) in HYBRIDS.items()]
    ranks = run_local(W.train_scenarios, 4, (scenarios,), timeout_s=500)
    return {name: [r[name] for r in ranks] for name in HYBRIDS}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_trains_like_one_process(hybrids, name):
    model, _, opts = HYBRIDS[name]
    ref = W.reference(model, HYBRID_STEPS, {k: v for k, v in opts.items() if k != "accumulate"})
    seen = set()
    for rank, got in enumerate(hybrids[name]):
        assert "error" not in got, f"{name} rank {rank}:\n{got['error']}"
        assert all(math.isfinite(v) for v in got["losses"])
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-10 * abs(b), f"{name} rank {rank} step {step}: {a!r} vs {b!r}"
        for step, (a, b) in enumerate(zip(got["norms"], ref["norms"], strict=True)):
            assert abs(a - b) <= 1e-10 * b, f"{name} rank {rank} step {step}: norm {a!r} vs {b!r}"
        assert len(got["norms"]) == len(ref["norms"])
        for pname, p in got["params"].items():
            torch.testing.assert_close(p, ref["params"][pname], rtol=1e-9, atol=1e-10,
                                       msg=lambda m, pname=pname, rank=rank: f"{name} rank {rank} {pname}: {m}")
        seen |= set(got["params"])
    assert seen == set(ref["params"])


def test_ring_on_a_sub_group_scalars_and_more_chunks_than_elements():
    per_rank = run_local(W.ring_round2, 3, timeout_s=300)
    assert per_rank[0] == per_rank[2] and len(per_rank[0]) == 3 * 5 * 2 + 2, per_rank[0]
    assert per_rank[1] == ["reduce_scatter segment", "all_gather owned_shift=0"]
