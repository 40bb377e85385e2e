"""Round 5 of unseen models, goodput: the gradient noise scale on a problem whose noise scale is known in closed
form, the estimators' unbiasedness, Pollux's statistical efficiency at its edges, and the batch-size adaptation's
bounds, against brute force.

The quadratic: per sample c ~ N(mu, sigma^2 I) in D dimensions and loss 0.5 |w - c|^2, so a sample's gradient is
w - c: the true gradient G = w - mu, the per-sample covariance sigma^2 I, and the noise scale
phi = tr(Sigma) / |G|^2 = D sigma^2 / |w - mu|^2 exactly (McCandlish et al. 2018's B_simple).
"""

import math

import pytest
import torch
from torch import nn

from tilestack.parallel.plan import (
    AdaptiveBatch,
    GoodputController,
    GradientNoiseScale,
    PlanError,
    accumulate_and_observe,
    efficiency,
)
from tilestack.parallel.plan.goodput import lr_scale

D, SIGMA = 32, 1.0


class Quadratic(nn.Module):
    """Per-sample losses 0.5 |w - c|^2 of samples c (B, D); w starts at ``offset`` from mu = 0."""

    def __init__(self, offset):
        super().__init__()
        self.w = nn.Parameter(torch.full((D,), offset, dtype=torch.float64))

    def forward(self, c):                                            # (B, D) -> (B,)
        return 0.5 * (self.w - c).pow(2).sum(-1)


def _mean_loss(per_sample, _targets):
    return per_sample.mean()


@pytest.mark.parametrize("phi", [4.0, 40.0, 400.0])
def test_the_noise_scale_of_a_quadratic_is_recovered(phi):
    """|w - mu|^2 = D sigma^2 / phi: the noise scale read through accumulate_and_observe (4 micro-batches of 64
    samples, w held still, 400 steps) is phi within 15% (at phi = 400 four seeds gave 366 to 422); the
    accumulated gradient is the whole batch's, w - mean(c)."""
    g = torch.Generator().manual_seed(int(phi))
    model = Quadratic(math.sqrt(SIGMA ** 2 / phi))                   # |w - mu|^2 = D * offset^2 = D sigma^2 / phi
    gns = GradientNoiseScale(ema=0.99)
    for _ in range(400):
        c = SIGMA * torch.randn(256, D, generator=g, dtype=torch.float64)
        accumulate_and_observe(model, _mean_loss, c, torch.zeros(256), micro_batches=4, gns=gns)
        torch.testing.assert_close(model.w.grad, model.w.detach() - c.mean(0))
    assert gns.phi == pytest.approx(phi, rel=0.15)


def test_the_estimators_of_the_gradient_and_its_noise_are_unbiased():
    """Each observation's |G|^2 and tr(Sigma) estimates (ema 0: the last one) average, over 3000 draws, to
    |w - mu|^2 and D sigma^2 within 4 standard errors; the plain small-batch |g_b|^2 overestimates |G|^2 by
    tr(Sigma) / b (why the estimators are needed)."""
    g = torch.Generator().manual_seed(5)
    true_g2, trace, b, k = 2.0, D * SIGMA ** 2, 8, 4
    G = torch.full((D,), math.sqrt(true_g2 / D), dtype=torch.float64)
    g2s, trs, naive = [], [], []
    for _ in range(3000):
        gns = GradientNoiseScale(ema=0.0)
        micro = [G + SIGMA * torch.randn(b, D, generator=g, dtype=torch.float64).mean(0) for _ in range(k)]
        gns.observe(micro, micro_batch=b)
        g2s.append(gns.grad_sq)
        trs.append(gns.trace)
        naive.append(float(sum(m.pow(2).sum() for m in micro)) / k)
    for est, truth in ((torch.tensor(g2s), true_g2), (torch.tensor(trs), trace)):
        se = float(est.std()) / math.sqrt(len(est))
        assert abs(float(est.mean()) - truth) < 4 * se, (float(est.mean()), truth, se)
    assert float(torch.tensor(naive).mean()) == pytest.approx(true_g2 + trace / b, rel=0.05)


def test_no_noise_reads_zero_and_pure_noise_reads_infinite():
    """Equal micro-batch gradients: tr(Sigma) = 0, phi = 0, and a flat throughput then keeps the smallest batch.
    Two halves of opposite gradients (their mean is 0): |G|^2 = (B |g_B|^2 - b |g_b|^2) / (B - b) < 0, phi reads
    inf (all noise), and an AdaptiveBatch takes its largest candidate."""
    gns = GradientNoiseScale(ema=0.0)
    same = torch.ones(D, dtype=torch.float64)
    assert gns.observe([same, same.clone(), same.clone()], micro_batch=4) == 0.0
    assert AdaptiveBatch([8, 16, 64], lambda m: 1.0, 8).choose(gns.phi) == 8
    assert math.isinf(GradientNoiseScale(ema=0.0).observe([same, -same], micro_batch=4))
    assert AdaptiveBatch([8, 16, 64], lambda m: 1.0, 8).choose(math.inf) == 64


@pytest.mark.parametrize("phi", [0.0, 1.0, 40.0, 1e6, math.inf])
def test_statistical_efficiency_at_its_edges(phi):
    """E(M0) = 1 whatever the noise; E falls with M (strictly while phi is finite); with no noise E = M0 / M (a
    larger batch makes the same progress per step, so per sample M0 / M); E(M) -> 0 as M -> inf for finite phi
    while M E(M) -> phi + M0; all noise: E = 1 at every M. AdaScale's gain (M / M0) E(M) lies in [1, M / M0] for
    M >= M0."""
    M0 = 8
    assert efficiency(M0, phi, M0) == 1.0
    batches = [8, 16, 64, 1024, 10 ** 12]
    effs = [efficiency(m, phi, M0) for m in batches]
    if math.isinf(phi):
        assert effs == [1.0] * len(batches)
        assert [lr_scale(m, phi, M0) for m in batches] == [m / M0 for m in batches]
        return
    assert all(a > b for a, b in zip(effs, effs[1:], strict=False))
    if phi == 0:
        assert effs == [pytest.approx(M0 / m, rel=1e-15) for m in batches]
    assert effs[-1] < 1e-5
    assert batches[-1] * effs[-1] == pytest.approx(phi + M0, rel=1e-6)
    for m in batches:
        assert 1.0 - 1e-12 <= lr_scale(m, phi, M0) <= m / M0 * (1 + 1e-12)
    assert efficiency(4, phi, M0) >= 1.0                     # below the base batch: at least as efficient


@pytest.mark.parametrize("call, match", [
    (lambda: efficiency(0, 4.0, 8), "efficiency: batch=0; expected a positive, finite batch size"),
    (lambda: efficiency(math.inf, 4.0, 8), "batch=inf"),
    (lambda: efficiency(16, 4.0, math.nan), "base_batch=nan"),
    (lambda: efficiency(True, 4.0, 8), "batch=True"),
    (lambda: efficiency(16, -1.0, 8), "phi=-1.0; expected a non-negative gradient noise scale"),
    (lambda: efficiency(16, math.nan, 8), "phi=nan"),
    (lambda: GradientNoiseScale(ema=1.0), "ema=1.0; expected a smoothing factor in \\[0, 1\\)"),
    (lambda: GradientNoiseScale().update(1.0, 0.5, 8, 8), "small=8, big=8; expected sample counts with 0 < small"),
    (lambda: GradientNoiseScale().observe([torch.ones(3)], 4), "1 micro-batch gradients; expected at least 2"),
    (lambda: GradientNoiseScale().observe([torch.ones(3), torch.ones(4)], 4), "expected non-empty tensors of one"),
    (lambda: accumulate_and_observe(Quadratic(1.0), _mean_loss, torch.zeros(10, D), torch.zeros(10),
                                    micro_batches=4), "micro_batches=4 with a batch of 10; expected a divisor"),
    (lambda: AdaptiveBatch([8, 0], lambda m: 1.0, 8).choose(4.0), "candidates=\\[8, 0\\]"),
])
def test_bad_goodput_requests_are_refused_by_name(call, match):
    with pytest.raises(PlanError, match=match):
        call()


def test_the_adaptive_batch_is_the_brute_force_argmax_within_its_candidates():
    """Over noise scales and throughput curves (saturating, linear, flat, irregular): the choice is the candidate
    of the largest samples/s x E(M), found here by trying each, and always one of the candidates. Linear scaling
    (samples/s proportional to M) with any finite noise takes the largest; a flat throughput with no noise the
    smallest."""
    cands = [4, 8, 16, 32, 64, 128]
    curves = {
        "saturating": lambda m: m / (0.01 + 0.001 * m),
        "linear": lambda m: 100.0 * m,
        "flat": lambda m: 50.0,
        "irregular": lambda m: {4: 10.0, 8: 31.0, 16: 29.0, 32: 90.0, 64: 80.0, 128: 200.0}[m],
    }
    for name, rate in curves.items():
        ab = AdaptiveBatch(cands, rate, base_batch=8)
        for phi in (0.0, 0.5, 7.0, 40.0, 300.0, 1e5):
            want = max(cands, key=lambda m, phi=phi: rate(m) * (phi + 8) / (phi + m))
            assert ab.choose(phi) == want and want in cands, (name, phi)
            if name == "linear" and phi > 0:
                assert want == max(cands)
        if name == "flat":
            assert ab.choose(0.0) == min(cands)


def test_the_controller_stays_within_its_candidates_and_scales_the_rate_by_adascale():
    """A controller whose noise scale is set to values across five orders: every choice is a candidate, the
    chosen batch's goodput is the brute-force best, and the learning rate is base_lr x sqrt((M / M0) E(M)),
    between base_lr and base_lr sqrt(M / M0) for M >= M0."""
    step_s = {8: 0.010, 16: 0.012, 32: 0.016, 64: 0.024, 128: 0.040}
    ctl = GoodputController(list(step_s), step_s, 8, 2e-3, every=1)
    for step, phi in enumerate((0.1, 3.0, 30.0, 300.0, 3000.0, 30.0)):
        ctl.gns.grad_sq, ctl.gns.trace = 1.0, phi
        batch = ctl.after_step(step, 0)
        want = max(step_s, key=lambda m, phi=phi: m / step_s[m] * efficiency(m, phi, 8))
        assert batch == want and batch in step_s
        assert ctl.lr() == pytest.approx(2e-3 * math.sqrt(batch / 8 * efficiency(batch, phi, 8)))
        assert 2e-3 * (1 - 1e-12) <= ctl.lr() <= 2e-3 * math.sqrt(batch / 8) * (1 + 1e-12)
    assert [h[3] for h in ctl.history] == [want for want in (
        max(step_s, key=lambda m, p=p: m / step_s[m] * efficiency(m, p, 8)) for p in (0.1, 3.0, 30.0, 300.0,
                                                                                     3000.0, 30.0))]
