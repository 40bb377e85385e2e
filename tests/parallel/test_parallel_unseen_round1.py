"""Unseen round 1 of tilestack.parallel: models of shapes the project's tests never train (width 36 with 6 heads;
width 52, vocabulary 37, position table 19, 3 layers: nothing splits evenly in two), trained in float64 under
every strategy on 2 and 3 gloo processes and compared with one process: losses per step and final parameters
within 1e-10 (f64 rounding; an f32 step anywhere shows as 1e-7), so a layout that loses precision is caught too."""

import math

import par_workers_unseen_round1 as W
import pytest
import torch

from tilestack.parallel import run_local

STEPS = 3

WORLD2 = {
    "ddp": ("even", dict(dp=2)),
    "ddp-ring": ("odd", dict(dp=2, dp_comm="ring")),
    "zero1": ("odd", dict(dp=2, zero=1)),
    "zero2-ragged-buckets": ("odd", dict(dp=2, zero=2, zero_bucket_numel=1001)),
    "fsdp2-ragged-rows": ("odd", dict(dp_shard=2)),
    "fsdp2-full-recompute": ("odd", dict(dp_shard=2, recompute="full")),
    "tp": ("even", dict(tp=2)),
    "tp-sp-selective": ("even", dict(tp=2, sp=2, recompute="selective")),
    "gpipe": ("even", dict(pp=2, pp_schedule="gpipe", microbatches=2)),
    "gpipe-one-microbatch": ("even", dict(pp=2, pp_schedule="gpipe", microbatches=1)),
    "1f1b-3-micro-full-recompute": ("even", dict(pp=2, microbatches=3, recompute="full")),
    "interleaved": ("even", dict(pp=2, pp_schedule="interleaved-1f1b", stages_per_rank=2, microbatches=2)),
    "pp-no-blocks": ("no-blocks", dict(pp=2, microbatches=2)),                 # embeddings | head
    "sdpa-tp-sp-one-head-per-rank": ("sdpa", dict(tp=2, sp=2, recompute="selective")),
    "sdpa-ddp-ring-full-recompute": ("sdpa", dict(dp=2, recompute="full", dp_comm="ring")),
    # targets partly -100: the shards count different numbers of tokens (each averaged its own: 3e-3 off)
    "ddp-ignored-targets": ("even-masked", dict(dp=2)),
    "1f1b-ignored-targets": ("even-masked", dict(pp=2, microbatches=3)),
    "tp-sp-ignored-targets": ("even-masked", dict(tp=2, sp=2)),
}
WORLD3 = {
    "ddp3": ("odd", dict(dp=3)),
    "zero2-3": ("odd", dict(dp=3, zero=2, zero_bucket_numel=777)),
    "fsdp2-3-ragged": ("odd", dict(dp_shard=3)),
    "ddp-ring3": ("even", dict(dp=3, dp_comm="ring")),
    "pp3-1f1b": ("odd", dict(pp=3, microbatches=3)),
    "pp3-gpipe-6-micro": ("odd", dict(pp=3, pp_schedule="gpipe", microbatches=6)),
    "fsdp2-3-ignored-targets": ("even-masked", dict(dp_shard=3)),
}


# global batches a layout cannot split: batch=5 under dp=2, 6 rows that do not cut into 4 micro-batches under pp=2,
# 9 tokens over sp=2, a sequence past the position table, targets all -100 (a NaN mean)
BAD_BATCHES = [(dict(dp=2), 5, W.SEQ), (dict(pp=2, microbatches=4), 6, W.SEQ), (dict(tp=2, sp=2), 6, 9),
               (dict(dp=2), 6, W.EVEN.max_seq + 1), (dict(dp=2), 6, W.SEQ, "every target ignored")]


@pytest.fixture(scope="module")
def runs():
    """{scenario: per-rank results}, and the 2-rank group's refusals of BAD_BATCHES (per rank)."""
    out = {}
    for ws, sc in ((2, WORLD2), (3, WORLD3)):
        scenarios = [(name, model, kw, STEPS) for name, (model, kw) in sc.items()]
        if ws == 2:
            ranks = run_local(W.scenarios_then_bad_batches, ws, (scenarios, BAD_BATCHES), timeout_s=500)
            out["bad batches"] = [bad for _, bad in ranks]
            ranks = [trained for trained, _ in ranks]
        else:
            ranks = run_local(W.train_scenarios, ws, (scenarios,), timeout_s=500)
        out.update({name: [r[name] for r in ranks] for name in sc})
    return out


@pytest.fixture(scope="module")
def refs():
    return {m: W.reference(m, STEPS) for m in W.MODELS}


def _check(name, model, per_rank, refs):
    ref = refs[model]
    seen = set()
    for rank, got in enumerate(per_rank):
        assert "error" not in got, f"{name} rank {rank}:\n{got['error']}"
        assert got["dtypes"] == {"torch.float64"}, (name, got["dtypes"])
        assert len(got["losses"]) == STEPS and all(math.isfinite(v) for v in got["losses"])
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-10 * abs(b), f"{name} rank {rank} step {step}: loss {a!r} vs one process {b!r}"
        for pname, p in got["params"].items():
            torch.testing.assert_close(p, ref["params"][pname], rtol=1e-9, atol=1e-10,
                                       msg=lambda m, pname=pname, rank=rank: f"{name} rank {rank} {pname}: {m}")
        seen |= set(got["params"])
    # the ranks together hold every parameter of the model (pipeline stages: each its own)
    assert seen == set(ref["params"]), (name, sorted(set(ref["params"]) ^ seen)[:5])


@pytest.mark.parametrize("name", list(WORLD2) + list(WORLD3))
def test_layout_trains_like_one_process(runs, refs, name):
    model = (WORLD2 | WORLD3)[name][0]
    _check(name, model, runs[name], refs)


def test_the_reference_moves(refs):
    """The comparison can fail: three AdamW steps move every parameter far past the tolerance."""
    from tilestack.parallel import GPT
    for model, ref in refs.items():
        start = dict(W.new_model(W.MODELS[model]).named_parameters())
        moved = min((ref["params"][n] - p.detach()).abs().max().item() for n, p in start.items())
        assert moved > 1e-6, model          # (wpe rows past seq: weight decay alone)
        assert isinstance(GPT(W.MODELS[model]), torch.nn.Module)


def test_loss_of_f64_logits_stays_f64():
    """lm_loss widened bf16 to f32 but also narrowed f64 to f32: every f64 run's gradients carried f32 rounding
    (1e-7 against one process where the layouts agree to 1e-15)."""
    from tilestack.parallel import lm_loss
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float64
    expect = torch.nn.functional.cross_entropy(logits.detach().reshape(6, 5), targets.reshape(6))
    assert abs(loss.item() - expect.item()) < 1e-15
    assert lm_loss(logits.detach().bfloat16(), targets).dtype == torch.float32


def test_batch_not_divisible_by_the_data_degree_is_refused_on_every_rank(runs):
    """Each of BAD_BATCHES refused by every rank alike, naming the argument, before any collective (the group's
    barrier after each refusal, and the scenarios trained before them, show the ranks stayed in step)."""
    said = runs["bad batches"]
    assert said[0] == said[1], said
    dp, micro, sp, long, ignored = said[0]
    assert "batch=5" in dp and "dp*dp_shard=2" in dp, dp
    assert "microbatches=4" in micro and "batch=6" in micro, micro
    assert "seq=9" in sp and "sp=2" in sp, sp
    assert "seq=21" in long and "max_seq=20" in long, long
    assert "every target" in ignored and "-100" in ignored, ignored
