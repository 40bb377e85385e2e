"""Goodput: the gradient noise scale estimated from micro-batch gradients (synthetic gradients whose noise scale
is known, and a real model's accumulation micro-steps), Pollux's efficiency and the adaptive batch choice."""

import math

import numpy as np
import pytest
import torch

from tilestack.parallel import GPT, ModelConfig, lm_loss, make_batch
from tilestack.parallel.plan import PlanError
from tilestack.parallel.plan.goodput import (
    AdaptiveBatch,
    GradientNoiseScale,
    accumulate_and_observe,
    efficiency,
    lr_scale,
)


@pytest.mark.parametrize("phi", [5.0, 50.0, 400.0])
def test_noise_scale_of_synthetic_gradients(rng, phi):
    """Per-sample gradients G + noise with tr(Sigma) / |G|^2 = phi: a micro-batch of b averages b of them."""
    dim, b, k = 2000, 8, 4
    G = rng.standard_normal(dim)
    G /= np.linalg.norm(G)                                  # |G|^2 = 1
    sigma = math.sqrt(phi / dim)                            # tr(Sigma) = dim sigma^2 = phi
    gns = GradientNoiseScale(ema=0.95)
    for _ in range(300):
        micro = [torch.from_numpy(G + sigma / math.sqrt(b) * rng.standard_normal(dim)) for _ in range(k)]
        gns.observe(micro, b)
    assert gns.phi == pytest.approx(phi, rel=0.25)
    assert len(gns.history) == 300 and gns.history[-1][0] == 300 * b * k


def test_efficiency_and_gain():
    assert efficiency(32, 100.0, 32) == 1.0
    assert efficiency(64, 100.0, 32) == pytest.approx(132 / 164)
    assert efficiency(64, 0.0, 32) == pytest.approx(0.5)            # no noise: twice the batch, half the progress
    assert lr_scale(64, 1e12, 32) == pytest.approx(2.0, rel=1e-6)  # all noise: linear scaling
    assert lr_scale(64, 0.0, 32) == pytest.approx(1.0)              # no noise: no gain
    with pytest.raises(PlanError, match="phi=nan"):
        efficiency(8, float("nan"), 8)
    with pytest.raises(PlanError, match="batch=0"):
        efficiency(0, 1.0, 8)


def test_adaptive_batch_maximises_goodput():
    throughput = {8: 100.0, 16: 180.0, 32: 300.0, 64: 420.0}      # samples/s: sub-linear in the batch
    ab = AdaptiveBatch(list(throughput), throughput.__getitem__, base_batch=8)
    for phi in (1.0, 30.0, 1000.0):
        best = max(throughput, key=lambda m: throughput[m] * efficiency(m, phi, 8))
        assert ab.choose(phi) == best
    assert ab.choose(1.0) < ab.choose(1000.0)                       # more noise: larger batches pay
    assert ab.choose(float("nan")) == 8 and ab.choose(float("inf")) == 64


def test_accumulation_gives_the_full_batch_gradient_and_a_noise_scale():
    cfg = ModelConfig(n_layer=1, d=32, n_head=4, vocab=64, max_seq=16)
    idx, targets = make_batch(cfg, 8, 16)
    whole = GPT(cfg, seed=0)
    lm_loss(whole(idx), targets).backward()
    acc = GPT(cfg, seed=0)
    gns = GradientNoiseScale()
    loss = accumulate_and_observe(acc, lm_loss, idx, targets, micro_batches=4, gns=gns)
    assert loss == pytest.approx(float(lm_loss(whole(idx), targets).detach()), rel=1e-5)
    for p, q in zip(acc.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert gns.trace is not None and gns.trace > 0 and not math.isnan(gns.phi)
    with pytest.raises(PlanError, match="micro_batches=3"):
        accumulate_and_observe(acc, lm_loss, idx, targets, micro_batches=3)
