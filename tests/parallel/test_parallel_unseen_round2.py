"""Unseen round 2 of tilestack.parallel: what a training loop adds around a step, under every layout on 2 and 3
gloo processes, in float64 against one process (losses and final parameters to 1e-10, f64 rounding):
frozen parameters, tied embeddings, a learning-rate schedule on ``trainer.optimizer``, AdamW's weight decay on
ZeRO's slices, clipping by the global gradient norm across shards (``Trainer.clip_grad_norm_``: equal to
torch.nn.utils.clip_grad_norm_ on one process), gradient accumulation (``step(..., accumulate=k)``), pipelines
with more micro-batches than layers."""

import math

import par_workers_unseen_round2 as W
import pytest
import torch

from tilestack.parallel import run_local

STEPS = 2
FROZEN = {"frozen": True}
CLIP = {"clip": True}
SCHED = {"schedule": True}

# name: (model, ParallelConfig keywords, opts)
WORLD2 = {
    "ddp-frozen": ("two", dict(dp=2), FROZEN),
    "zero2-frozen": ("two", dict(dp=2, zero=2, zero_bucket_numel=300), FROZEN),
    "fsdp2-frozen": ("two", dict(dp_shard=2), FROZEN),
    "tp-sp-frozen": ("two", dict(tp=2, sp=2), FROZEN),
    "1f1b-frozen": ("two", dict(pp=2, microbatches=2), FROZEN),
    # full_grads of a frozen model: ZeRO's gradients are those of the parameters that train
    "zero1-frozen-full-grads": ("two", dict(dp=2, zero=1, zero_bucket_numel=300), {"frozen": True, "grads": True}),
    "tp-sp-frozen-full-grads": ("two", dict(tp=2, sp=2), {"frozen": True, "grads": True}),
    "1f1b-6-micro-more-than-layers": ("two", dict(pp=2, microbatches=6), {}),
    # 5 sequences: no data-parallel degree divides them, tensor parallelism and a 5-micro-batch pipeline take them
    "tp-sp-batch-5": ("two", dict(tp=2, sp=2), {"batch": 5}),
    "gpipe-5-micro-batch-5-clip": ("two", dict(pp=2, pp_schedule="gpipe", microbatches=5), {"batch": 5, "clip": True}),
    "gpipe-6-micro-masked": ("two", dict(pp=2, pp_schedule="gpipe", microbatches=6), {"masked": True}),
    "ddp-tied": ("two", dict(dp=2), {"tied": True}),
    # an unused parameter: DDP failed its second step, ZeRO's AdamW decayed it (one process skips it)
    "ddp-unused-accumulate": ("two", dict(dp=2), {"unused": True, "accumulate": 3}),
    "ddp-ring-unused-clip": ("two", dict(dp=2, dp_comm="ring"), {"unused": True, "clip": True}),
    "zero1-unused-clip": ("three", dict(dp=2, zero=1, zero_bucket_numel=500), {"unused": True, "clip": True}),
    "zero2-unused-accumulate": ("three", dict(dp=2, zero=2, zero_bucket_numel=500), {"unused": True, "accumulate": 3}),
    "fsdp2-unused": ("two", dict(dp_shard=2), {"unused": True}),
    "1f1b-unused": ("two", dict(pp=2, microbatches=2), {"unused": True}),
    "zero2-tied": ("two", dict(dp=2, zero=2, zero_bucket_numel=300), {"tied": True}),
    "fsdp2-tied": ("two", dict(dp_shard=2), {"tied": True}),
    "zero1-strong-decay": ("three", dict(dp=2, zero=1, zero_bucket_numel=500), {"weight_decay": 0.5}),
    "zero2-strong-decay-schedule": ("three", dict(dp=2, zero=2), {"weight_decay": 0.5, "schedule": True}),
    "1f1b-schedule": ("two", dict(pp=2, microbatches=2), SCHED),
    "ddp-clip": ("two", dict(dp=2), CLIP),
    "ddp-ring-clip-masked": ("two", dict(dp=2, dp_comm="ring"), {"clip": True, "masked": True}),
    "zero1-clip": ("three", dict(dp=2, zero=1, zero_bucket_numel=500), CLIP),
    "zero2-clip-frozen": ("three", dict(dp=2, zero=2, zero_bucket_numel=500), {"clip": True, "frozen": True}),
    "fsdp2-clip": ("three", dict(dp_shard=2), CLIP),
    "tp-clip": ("two", dict(tp=2), CLIP),
    "tp-sp-clip-schedule": ("two", dict(tp=2, sp=2), {"clip": True, "schedule": True}),
    "1f1b-clip": ("two", dict(pp=2, microbatches=2), CLIP),
    "ddp-accumulate-2": ("two", dict(dp=2), {"accumulate": 3}),
    "ddp-accumulate-masked": ("two", dict(dp=2), {"accumulate": 3, "masked": True}),
    "zero1-accumulate": ("three", dict(dp=2, zero=1, zero_bucket_numel=500), {"accumulate": 3}),
    "zero2-accumulate": ("three", dict(dp=2, zero=2, zero_bucket_numel=500), {"accumulate": 3}),
    "fsdp2-accumulate": ("three", dict(dp_shard=2), {"accumulate": 3, "masked": True}),
    "tp-sp-accumulate": ("two", dict(tp=2, sp=2), {"accumulate": 2}),
    "1f1b-accumulate": ("two", dict(pp=2, microbatches=3), {"accumulate": 2}),
    "gpipe-accumulate-masked": ("two", dict(pp=2, pp_schedule="gpipe", microbatches=3),
                                {"accumulate": 2, "masked": True}),
}
WORLD3 = {
    "ddp3-clip-accumulate": ("three", dict(dp=3), {"clip": True, "accumulate": 2}),
    "zero2-3-clip": ("three", dict(dp=3, zero=2, zero_bucket_numel=333), CLIP),
    "fsdp2-3-clip-frozen": ("three", dict(dp_shard=3), {"clip": True, "frozen": True}),
    "pp3-1f1b-clip": ("three", dict(pp=3, microbatches=3), CLIP),
    "zero2-3-accumulate": ("three", dict(dp=3, zero=2, zero_bucket_numel=333), {"accumulate": 2}),
    "pp3-gpipe-accumulate": ("three", dict(pp=3, pp_schedule="gpipe", microbatches=1), {"accumulate": 2}),
}
ALL = WORLD2 | WORLD3


@pytest.fixture(scope="module")
def runs():
    out = {}
    for ws, sc in ((2, WORLD2), (3, WORLD3)):
        scenarios = [(name, model, kw, STEPS, opts) for name, (model, kw, opts) in sc.items()]
        ranks = run_local(W.train_scenarios, ws, (scenarios,), timeout_s=500)
        out.update({name: [r[name] for r in ranks] for name in sc})
    return out


def _ref_key(model, opts):
    # accumulation is the whole batch's step; the rest of the options change the run
    return (model, tuple(sorted((k, v) for k, v in opts.items() if k != "accumulate")))


@pytest.fixture(scope="module")
def refs():
    out = {}
    for model, _, opts in ALL.values():
        key = _ref_key(model, opts)
        if key not in out:
            out[key] = W.reference(model, STEPS, dict(key[1]))
    return out


@pytest.mark.parametrize("name", list(ALL))
def test_layout_trains_like_one_process(runs, refs, name):
    model, _, opts = ALL[name]
    ref = refs[_ref_key(model, opts)]
    seen = set()
    for rank, got in enumerate(runs[name]):
        assert "error" not in got, f"{name} rank {rank}:\n{got['error']}"
        assert got["dtypes"] == {"torch.float64"}, (name, got["dtypes"])
        assert len(got["losses"]) == STEPS and all(math.isfinite(v) for v in got["losses"])
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-10 * abs(b), f"{name} rank {rank} step {step}: loss {a!r} vs one process {b!r}"
        if opts.get("clip"):
            assert len(got["norms"]) == STEPS
            for step, (a, b) in enumerate(zip(got["norms"], ref["norms"], strict=True)):
                assert abs(a - b) <= 1e-10 * b, f"{name} rank {rank} step {step}: norm {a!r} vs one process {b!r}"
        for pname, p in got["params"].items():
            torch.testing.assert_close(p, ref["params"][pname], rtol=1e-9, atol=1e-10,
                                       msg=lambda m, pname=pname, rank=rank: f"{name} rank {rank} {pname}: {m}")
        seen |= set(got["params"])
        if opts.get("grads"):
            assert set(got["grads"]) == set(ref["grads"]) & set(got["params"]), (name, rank, sorted(got["grads"]))
            for pname, g in got["grads"].items():
                torch.testing.assert_close(g, ref["grads"][pname], rtol=1e-9, atol=1e-12)
        if opts.get("schedule"):
            assert got["lr"] == [W.HYPER["lr"] * W._schedule_factor(STEPS)], got["lr"]
    assert seen == set(ref["params"]), (name, sorted(set(ref["params"]) ^ seen)[:5])


def test_the_options_change_the_reference(refs):
    """The comparisons can fail: clipping is active (every norm above the bound), frozen parameters stay at their
    start while the rest move, the schedule and the strong decay each give another run than the plain one."""
    plain = W.reference("two", STEPS, {})
    clipped = refs[_ref_key("two", CLIP)]
    assert min(clipped["norms"]) > 5 * W.CLIP, clipped["norms"]
    start = dict(W.new_model(W.TWO, {}).named_parameters())
    frozen = refs[_ref_key("two", FROZEN)]
    for name, p in frozen["params"].items():
        moved = (p - start[name].detach()).abs().max().item()
        assert (moved == 0) == (name in W.FROZEN), (name, moved)
    for other in (clipped, refs[_ref_key("two", SCHED)], frozen):
        assert max((other["params"][n] - plain["params"][n]).abs().max().item() for n in plain["params"]) > 1e-6
    unused = refs[_ref_key("three", {"unused": True, "clip": True})]
    assert torch.equal(unused["params"]["extra"], torch.linspace(1.0, 2.0, 5, dtype=W.DTYPE))
    tied = refs[_ref_key("two", {"tied": True})]
    assert "lm_head.weight" not in tied["params"]        # one tensor, named once (as torch names it)
