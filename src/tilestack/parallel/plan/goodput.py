"""Goodput (Pollux, Qiao et al. OSDI 2021): throughput x statistical efficiency, with the gradient noise scale
measured during training.

    gns = GradientNoiseScale()
    for step in ...:
        micro = [flat gradient of each of k micro-batches of b samples]     # accumulation micro-steps, or dp ranks
        gns.observe(micro, micro_batch=b)
    gns.phi                                      # the noise scale B_noise = tr(Sigma) / |G|^2, in samples
    efficiency(M, gns.phi, M0)                   # E(M) = (phi + M0) / (phi + M): progress per sample at batch M
    goodput = samples_per_s(M) * efficiency(M, gns.phi, M0)
    lr_scale(M, gns.phi, M0)                     # AdaScale's gain: M / M0 x E(M)

The estimators are McCandlish et al. 2018 (appendix A): with |g_b|^2 the mean squared norm of the k small-batch
gradients (b samples each) and |g_B|^2 that of their mean (B = k b samples),
    |G|^2    ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1 / b - 1 / B)
each unbiased; their ratio is biased, so both are smoothed (exponential moving averages) before dividing.
E(M) is Pollux's statistical efficiency relative to the base batch M0: a batch of M samples makes the progress of
M E(M) / M0 base-batch... samples, i.e. the same progress per step as (phi + M0) / (phi + M) of M0-sample steps
per sample. ``AdaptiveBatch`` picks, among candidate batch sizes, the one with the largest goodput given a
throughput model (samples/s at each size, measured or from the planner).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from tilestack.parallel.plan.describe import PlanError

DEFAULT_EMA = 0.9


def efficiency(batch: float, phi: float, base_batch: float) -> float:
    """Pollux's statistical efficiency E(M) = (phi + M0) / (phi + M): 1 at M = M0, falling as M outgrows phi."""
    if batch <= 0 or base_batch <= 0:
        raise PlanError(f"efficiency: batch={batch}, base_batch={base_batch}; expected positive batch sizes")
    if phi < 0 or math.isnan(phi):
        raise PlanError(f"efficiency: phi={phi}; expected a non-negative gradient noise scale")
    return (phi + base_batch) / (phi + batch)


def lr_scale(batch: float, phi: float, base_batch: float) -> float:
    """AdaScale's gain at batch M: the learning rate that makes one M-sample step worth (M / M0) E(M) base steps."""
    return batch / base_batch * efficiency(batch, phi, base_batch)


@dataclasses.dataclass
class GradientNoiseScale:
    """Running estimate of the gradient noise scale from small-batch gradients (see the module docstring)."""

    ema: float = DEFAULT_EMA
    grad_sq: float | None = None        # smoothed |G|^2
    trace: float | None = None          # smoothed tr(Sigma), per sample
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)   # (samples seen, phi)
    samples: int = 0

    def update(self, small_sq: float, big_sq: float, small: int, big: int) -> float:
        """One observation: mean squared norm ``small_sq`` of gradients over ``small`` samples, ``big_sq`` of their
        mean over ``big`` samples. Returns the current phi."""
        if not 0 < small < big:
            raise PlanError(f"GradientNoiseScale.update: small={small}, big={big}; expected 0 < small < big")
        g2 = (big * big_sq - small * small_sq) / (big - small)
        tr = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
        a = self.ema
        self.grad_sq = g2 if self.grad_sq is None else a * self.grad_sq + (1 - a) * g2
        self.trace = tr if self.trace is None else a * self.trace + (1 - a) * tr
        self.samples += big
        self.history.append((self.samples, self.phi))
        return self.phi

    def observe(self, micro_grads: Sequence, micro_batch: int) -> float:
        """``micro_grads``: k >= 2 flat gradients (torch tensors), each the mean over ``micro_batch`` samples."""
        import torch
        k = len(micro_grads)
        if k < 2:
            raise PlanError(f"GradientNoiseScale.observe: {k} micro-batch gradients; expected at least 2")
        small_sq = float(sum(g.double().pow(2).sum() for g in micro_grads) / k)
        big_sq = float(torch.stack([g.double() for g in micro_grads]).mean(0).pow(2).sum())
        return self.update(small_sq, big_sq, micro_batch, micro_batch * k)

    @property
    def phi(self) -> float:
        """tr(Sigma) / |G|^2 in samples (inf while |G|^2 is not positive: all noise so far)."""
        if self.grad_sq is None or self.trace is None:
            return float("nan")
        if self.grad_sq <= 0:
            return float("inf")
        return max(self.trace, 0.0) / self.grad_sq


@dataclasses.dataclass
class AdaptiveBatch:
    """Choose the batch size of the next steps: argmax over ``candidates`` of samples_per_s(M) x E(M)."""

    candidates: Sequence[int]
    samples_per_s: Callable[[int], float]
    base_batch: int

    def choose(self, phi: float) -> int:
        if not self.candidates:
            raise PlanError("AdaptiveBatch: candidates=[]; expected batch sizes to choose from")
        if math.isnan(phi):
            return self.base_batch
        if math.isinf(phi):
            return max(self.candidates)
        return max(self.candidates, key=lambda m: self.samples_per_s(m) * efficiency(m, phi, self.base_batch))


def accumulate_and_observe(model, loss_fn: Callable, inputs, targets, *, micro_batches: int,
                           gns: GradientNoiseScale | None = None) -> float:
    """One step's gradient by accumulation over ``micro_batches`` equal slices of the batch (dim 0), leaving in
    every ``p.grad`` the gradient of the mean loss over the whole batch (as one backward would), and feeding the
    slices' gradients to ``gns``. Returns the mean loss."""
    import torch
    n = inputs.shape[0]
    if micro_batches < 1 or n % micro_batches:
        raise PlanError(f"accumulate_and_observe: micro_batches={micro_batches} with a batch of {n}; expected a "
                        "divisor of the batch")
    params = [p for p in model.parameters() if p.requires_grad]
    b = n // micro_batches
    flats, total = [], 0.0
    acc = [torch.zeros_like(p) for p in params]
    for k in range(micro_batches):
        for p in params:
            p.grad = None
        loss = loss_fn(model(inputs[k * b:(k + 1) * b]), targets[k * b:(k + 1) * b])
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flats.append(torch.cat([g.reshape(-1) for g in grads]).detach().clone())
        for a, g in zip(acc, grads, strict=True):
            a.add_(g, alpha=1.0 / micro_batches)
        total += float(loss.detach())
    for p, a in zip(params, acc, strict=True):
        p.grad = a
    if gns is not None and micro_batches >= 2:
        gns.observe(flats, b)
    return total / micro_batches
