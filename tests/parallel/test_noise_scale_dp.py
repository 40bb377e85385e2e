"""The gradient noise scale measured online from the per-rank gradients of data parallelism (Pollux), on a real
gloo process group of 2 CPU processes, against the same estimate from two accumulation micro-steps in one process
(the same samples split the same way: rank k's rows are micro-batch k), and the same training run."""

import par_workers as W
import pytest
import torch

from tilestack.parallel import GPT, lm_loss, run_local
from tilestack.parallel.plan.goodput import GradientNoiseScale, accumulate_and_observe

STEPS = 6


@pytest.mark.slow
def test_per_rank_noise_scale_equals_the_accumulated_one():
    ranks = run_local(W.noise_scale_dp, 2, (STEPS,), timeout_s=300)
    model = GPT(W.CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), foreach=False, **W.HYPER)
    gns = GradientNoiseScale(ema=0.5)
    losses = []
    for idx, targets in W.batches(STEPS):
        losses.append(accumulate_and_observe(model, lm_loss, idx, targets, micro_batches=2, gns=gns))
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = [phi for _, phi in gns.history]
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        assert r["phi"] == pytest.approx(want, rel=1e-4)
        assert all(phi > 0 for phi in r["phi"])
        assert "gns needs each rank's whole gradient" in r["refused"] and "dp_shard=2" in r["refused"]
