"""Unseen round 3 of tilestack.parallel, continued: models the Trainer cannot take (any module that is no GPT, a
GPT whose forward returns a tuple) refused by name on every rank; a rank that raises inside a step's backward is
named first and the group ends (the others do not wait for it); a rank that hangs is reported at run_local's
timeout; bf16 parameters under ZeRO-1/2 train on f32 master slices, as one process with f32 master weights; a
buffer of running statistics holds the whole batch's value on every data-parallel replica and in a checkpoint."""

import time

import par_workers_unseen_round3 as W
import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.parallel import run_local

BUFFER_LAYOUTS = [("ddp", dict(dp=2)), ("ddp-ring", dict(dp=2, dp_comm="ring")), ("zero1", dict(dp=2, zero=1)),
                  ("zero2", dict(dp=2, zero=2)), ("fsdp2", dict(dp_shard=2)), ("tp", dict(tp=2))]
BUFFER_STEPS = 3


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("running"))
    return run_local(W.refusals_and_running_buffers, 2, (BUFFER_LAYOUTS, BUFFER_STEPS, folder), timeout_s=300)


def test_models_the_trainer_cannot_take_are_refused_by_name_on_every_rank(two_ranks):
    said = [r["refusals"] for r in two_ranks]
    assert said[0] == said[1], said
    seq, tup = said[0]["sequential"], said[0]["tuple-forward"]
    assert seq.startswith("ParallelConfigError") and "model is Sequential" in seq and "GPT" in seq, seq
    assert tup.startswith("ParallelConfigError") and "returned tuple" in tup and "(B, N, vocab)" in tup, tup


def test_a_rank_raising_in_backward_is_named_first_and_nobody_waits():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        run_local(W.raises_in_backward, 3, timeout_s=200)
    msg = str(info.value)
    assert msg.startswith("run_local: rank 2 failed"), msg[:600]
    assert "rank 2's own fault in backward" in msg.split("--- rank", 2)[1], msg[:2000]
    # 10 s here; the other ranks waiting in gloo would end only at run_local's 200 s timeout (always past 180 s),
    # so the bound leaves a loaded CI machine's spawns and imports 170 s of headroom (it was 120 s)
    assert time.monotonic() - t0 < 180, "the other ranks waited for the one that failed"


def test_a_rank_that_hangs_is_reported_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"no result from ranks \[0, 1\] within 10 s"):
        run_local(W.hangs_in_step, 2, timeout_s=10)
    assert time.monotonic() - t0 < 50, "run_local waited past its timeout (ranks not terminated?)"


STEPS = 4


# k_proj's bias shifts every score of a query's row alike, which softmax ignores: its gradient is rounding noise,
# which AdamW turns into steps of about lr either way (nothing to compare)
NOISE_ONLY = "attn.k_proj.bias"


@pytest.fixture(scope="module")
def bf16_runs():
    return run_local(W.bf16_zero, 2, ((1, 2), STEPS), timeout_s=200)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_parameters_train_on_f32_master_slices(bf16_runs, stage):
    """The gradients are reduced in bf16 (as the model computes them), and AdamW turns small gradients into steps
    of about lr whatever their rounding: each tensor's move from its start (the f32 master's) is compared, to 8 % of
    one process's in L2 (observed under 3 %). The f32 masters are what makes the run differ from plain bf16 AdamW,
    whose updates of about lr = 3e-3 are mostly lost on LayerNorm gains near 1 (bf16's spacing there is 2^-7)."""
    ref = W.bf16_reference(STEPS)
    start = {n: p.detach().float() for n, p in W.new_model(torch.bfloat16).named_parameters()}
    for rank, got in enumerate(r[stage] for r in bf16_runs):
        assert got["master_dtype"] == "torch.float32", got["master_dtype"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=0)
        assert set(got["params"]) == set(ref["params"]) == set(got["masters"])
        for name, p in got["params"].items():
            assert p.dtype == torch.bfloat16, (name, p.dtype)
            m = got["masters"][name].view_as(p)
            assert m.dtype == torch.float32
            # the parameters are the masters' bf16 rounding
            torch.testing.assert_close(p, m.to(torch.bfloat16), rtol=0, atol=0)
            if name.endswith(NOISE_ONLY):
                continue
            moved = ref["masters"][name] - start[name]
            err = float((m - start[name] - moved).norm() / moved.norm())
            assert err < 0.08, f"rank {rank} {name}: moved {err:.3f} of one process's move away from it"
    # the masters moved gains near 1 by less than bf16 can hold: they differ from the bf16 parameters, so a ZeRO
    # without f32 masters (AdamW on bf16) would fail the comparison above
    gain = "layers.0.ln_1.weight"
    moved = ref["masters"][gain] - start[gain]
    assert float((ref["params"][gain].float() - start[gain] - moved).norm() / moved.norm()) > 0.2


def test_running_statistics_buffers_are_the_whole_batchs_on_every_rank(two_ranks):
    """A buffer the forward updates from its rows (a running mean, as BatchNorm keeps) is averaged over the
    data-parallel ranks after each step: every replica holds the one-process value (each rank saw half the rows:
    FSDP2 and ZeRO kept each rank's own, DDP broadcast rank 0's), and a checkpoint saves and loads it."""
    ref = W.running_reference(BUFFER_STEPS)
    assert ref["running"].abs().max() > 1e-3
    per_rank = [r["running"] for r in two_ranks]
    for name, _ in BUFFER_LAYOUTS:
        for rank, r in enumerate(per_rank):
            got = r[name]
            assert "error" not in got, f"{name} rank {rank}:\n{got['error']}"
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-10, atol=0)
            torch.testing.assert_close(got["running"], ref["running"], rtol=1e-12, atol=1e-14,
                                       msg=lambda m, name=name, rank=rank: f"{name} rank {rank}: {m}")
            if "loaded" in got:
                torch.testing.assert_close(got["loaded"], ref["running"], rtol=1e-12, atol=1e-14)


def test_ring_refuses_tensors_of_other_sizes_and_reduces_bf16():
    """Rank 1 of 2 holds another size or dtype: both ranks raise, naming both sizes (rank 0 returned a wrong sum
    without a word, rank 1 failed on the transport); then bf16 tensors of 1 to 1001 elements (odd sizes: unequal
    segments) agree with dist.all_reduce's f32 sum to bf16 rounding, the group still working."""
    said = run_local(W.ring_sizes, 2, timeout_s=200)
    for case in ("numel", "dtype", "empty", "reduce_scatter", "all_gather"):
        for rank in (0, 1):
            msg = said[rank][case]
            assert msg.startswith("LaunchError") and "expected one size and dtype on every rank" in msg, (case, msg)
    assert "5 elements of 4 bytes here" in said[0]["numel"] and "6 of 4 bytes on global rank 1" in said[0]["numel"]
    assert "8 bytes" in said[0]["dtype"] and "ring_reduce_scatter" in said[1]["reduce_scatter"]
    for r in said:
        assert r["bf16"] == [1, 2, 5, 7, 11, 1001]
