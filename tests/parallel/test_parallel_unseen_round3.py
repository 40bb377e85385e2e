"""Unseen round 3 of tilestack.parallel: what changes between the steps of one run, on 2 and 3 gloo processes in
float64 against one process (losses to 1e-10 relative, final parameters to f64 rounding):

- the batch's shape (rows and sequence length) from step to step, an accumulated step among them: a pipeline's
  stages kept the shapes of their first step (the last stage failed on its targets' shape, the others waited);
- parameters frozen between steps (DDP's buckets waited for their gradients: "Expected to have finished
  reduction"), and parameters frozen when the Trainer was built and unfrozen later (trained under every layout but
  ZeRO, which refuses by name: its slices hold only what trained when it was built, one AdamW step count for all).
"""

import math

import par_workers_unseen_round3 as W
import pytest
import torch

from tilestack.parallel import run_local

# (batch, seq) per step; the 1f1b run's third step is accumulated (chunks of another shape again)
SHAPES = [dict(batch=4, seq=8, seed=0), dict(batch=4, seq=6, seed=1), dict(batch=8, seq=6, seed=2, accumulate=2),
          dict(batch=2, seq=6, seed=3), dict(batch=6, seq=10, seed=4)]
FREEZE = [dict(batch=4, seq=6, seed=0), dict(batch=4, seq=6, seed=1, freeze=W.LATER_FROZEN),
          dict(batch=4, seq=6, seed=2)]
UNFREEZE = [dict(batch=4, seq=6, seed=0), dict(batch=4, seq=6, seed=1, unfreeze=W.BUILT_FROZEN),
            dict(batch=4, seq=6, seed=2)]
FREEZE_THEN_UNFREEZE = [dict(batch=4, seq=6, seed=0, freeze=W.LATER_FROZEN[1:2]),
                        dict(batch=4, seq=6, seed=1, unfreeze=W.LATER_FROZEN[1:2])]

# name: (ParallelConfig keywords, plan, frozen when the Trainer is built)
CASES = {
    "shapes-ddp": (dict(dp=2), SHAPES, ()),
    "shapes-fsdp2": (dict(dp_shard=2), SHAPES, ()),
    "shapes-tp-sp": (dict(tp=2, sp=2), SHAPES, ()),
    "shapes-1f1b": (dict(pp=2, microbatches=2), SHAPES, ()),
    "shapes-gpipe": (dict(pp=2, pp_schedule="gpipe", microbatches=2), SHAPES, ()),
    "shapes-interleaved": (dict(pp=2, pp_schedule="interleaved-1f1b", stages_per_rank=2, microbatches=2), SHAPES,
                           ()),
    "freeze-ddp": (dict(dp=2), FREEZE, ()),
    "freeze-ddp-ring": (dict(dp=2, dp_comm="ring"), FREEZE, ()),
    "freeze-zero1": (dict(dp=2, zero=1), FREEZE, ()),
    "freeze-zero2": (dict(dp=2, zero=2), FREEZE, ()),
    "freeze-fsdp2": (dict(dp_shard=2), FREEZE, ()),
    "freeze-tp-sp": (dict(tp=2, sp=2), FREEZE, ()),
    "freeze-1f1b": (dict(pp=2, microbatches=2), FREEZE, ()),
    "unfreeze-ddp": (dict(dp=2), UNFREEZE, W.BUILT_FROZEN),
    "unfreeze-fsdp2": (dict(dp_shard=2), UNFREEZE, W.BUILT_FROZEN),
    "unfreeze-tp": (dict(tp=2), UNFREEZE, W.BUILT_FROZEN),
    "unfreeze-1f1b": (dict(pp=2, microbatches=2), UNFREEZE, W.BUILT_FROZEN),
    "unfreeze-ddp-freeze-then-unfreeze": (dict(dp=2), FREEZE_THEN_UNFREEZE, ()),
}
# world size 3: batches of 3 and 6 rows (3-row chunks of the accumulated step), ragged ZeRO / FSDP2 slices
SHAPES3 = [dict(batch=3, seq=8, seed=0), dict(batch=6, seq=6, seed=1), dict(batch=6, seq=6, seed=2, accumulate=2),
           dict(batch=3, seq=10, seed=3)]
FREEZE3 = [dict(step, batch=3) for step in FREEZE]
UNFREEZE3 = [dict(step, batch=6) for step in UNFREEZE]
CASES3 = {
    "shapes-ddp3": (dict(dp=3), SHAPES3, ()),
    "shapes-zero2-3": (dict(dp=3, zero=2), SHAPES3, ()),
    "freeze-ddp3": (dict(dp=3), FREEZE3, ()),
    "freeze-zero1-3": (dict(dp=3, zero=1), FREEZE3, ()),
    "freeze-fsdp2-3": (dict(dp_shard=3), FREEZE3, ()),
    "unfreeze-fsdp2-3": (dict(dp_shard=3), UNFREEZE3, W.BUILT_FROZEN),
}
# refused on every rank, naming the parameter
REFUSED = {
    "unfreeze-zero1": (dict(dp=2, zero=1), UNFREEZE, W.BUILT_FROZEN),
    "refreeze-zero2": (dict(dp=2, zero=2), FREEZE_THEN_UNFREEZE, ()),
}


@pytest.fixture(scope="module")
def runs():
    out = {}
    for ws, group in ((2, CASES | REFUSED), (3, CASES3)):
        cases = [(name, kw, plan, frozen) for name, (kw, plan, frozen) in group.items()]
        per_rank = run_local(W.train_plans, ws, (cases,), timeout_s=400)
        out.update({name: [r[name] for r in per_rank] for name in group})
    return out


_refs: dict = {}


def _reference(plan, frozen):
    key = (repr(plan), frozen)
    if key not in _refs:
        _refs[key] = W.reference(plan, frozen)
    return _refs[key]


@pytest.mark.parametrize("name", list(CASES | CASES3))
def test_layout_trains_like_one_process(runs, name):
    kw, plan, frozen = (CASES | CASES3)[name]
    ref = _reference(plan, frozen)
    seen = set()
    for rank, got in enumerate(runs[name]):
        assert "error" not in got, f"{name} rank {rank}:\n{got['trace']}"
        assert len(got["losses"]) == len(plan) and all(math.isfinite(v) for v in got["losses"])
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-10 * abs(b), f"{name} rank {rank} step {step}: loss {a!r} vs one process {b!r}"
        for pname, p in got["params"].items():
            torch.testing.assert_close(p, ref["params"][pname], rtol=1e-9, atol=1e-10,
                                       msg=lambda m, pname=pname, rank=rank: f"{name} rank {rank} {pname}: {m}")
        seen |= set(got["params"])
    assert seen == set(ref["params"]), (name, sorted(set(ref["params"]) ^ seen)[:5])


@pytest.mark.parametrize("name, fragments", [
    ("unfreeze-zero1", ("layers.1.attn.q_proj.weight", "layers.2.mlp.fc.bias", "frozen when the Trainer was built",
                        "zero=1")),
    ("refreeze-zero2", ("layers.0.mlp.fc.weight", "train again after steps frozen", "zero=2")),
])
def test_zero_refuses_a_parameter_that_comes_back(runs, name, fragments):
    said = [r.get("error", "no error") for r in runs[name]]
    assert said[0] == said[1], said
    assert said[0].startswith("ParallelConfigError"), said[0]
    for frag in fragments:
        assert frag in said[0], (frag, said[0])


def test_the_plans_change_the_reference():
    """The comparisons can fail: a parameter frozen later stops where it was after step 1 (and differs from its
    start), one unfrozen later moves only from then on; the shapes' run differs from one at a fixed shape."""
    start = dict(W.new_model().named_parameters())
    frozen = _reference(FREEZE, ())
    one_step = W.reference(FREEZE[:1])
    for name in W.LATER_FROZEN:
        torch.testing.assert_close(frozen["params"][name], one_step["params"][name], rtol=0, atol=0)
        assert (frozen["params"][name] - start[name].detach()).abs().max() > 1e-4, name
    unfrozen = _reference(UNFREEZE, W.BUILT_FROZEN)
    for name in W.BUILT_FROZEN:
        assert (unfrozen["params"][name] - start[name].detach()).abs().max() > 1e-4, name
    plain = W.reference(FREEZE[:1] * 3)
    assert (plain["params"]["layers.0.mlp.fc.weight"] - frozen["params"]["layers.0.mlp.fc.weight"]).abs().max() > 1e-4
    assert len({round(v, 6) for v in _reference(SHAPES, ())["losses"]}) == len(SHAPES)
