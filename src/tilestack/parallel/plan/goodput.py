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
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from tilestack.parallel.plan.describe import PlanError

DEFAULT_EMA = 0.9


def _number(v: Any) -> bool:
    """A real number, numpy's among them (np.int64(16) from a batch list, np.float32 noise scales were refused as
    "expected a positive, finite batch size", where search takes them); a bool (or np.bool_) is none."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _count(v: Any, least: int = 1) -> bool:
    """An int >= ``least``, numpy's integers among them; a bool is none."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= least


def _finite_nonneg(where: str, **values: Any) -> None:
    """PlanError naming the first of ``values`` that is not a finite number >= 0."""
    for arg, v in values.items():
        if not _number(v) or not math.isfinite(v) or v < 0:
            raise PlanError(f"{where}: {arg}={v!r}; expected a finite number >= 0 (a squared gradient norm)")


def efficiency(batch: float, phi: float, base_batch: float) -> float:
    """Pollux's statistical efficiency E(M) = (phi + M0) / (phi + M): 1 at M = M0, falling as M outgrows phi."""
    for arg, v in (("batch", batch), ("base_batch", base_batch)):
        if not _number(v) or not math.isfinite(v) or v <= 0:
            raise PlanError(f"efficiency: {arg}={v!r}; expected a positive, finite batch size")
    if not _number(phi) or phi < 0 or math.isnan(phi):
        raise PlanError(f"efficiency: phi={phi!r}; expected a non-negative gradient noise scale")
    if math.isinf(phi):          # all noise: every sample counts fully at any batch (the limit, not inf / inf)
        return 1.0
    return (float(phi) + float(base_batch)) / (float(phi) + float(batch))


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

    def __post_init__(self) -> None:
        if not _number(self.ema) or not 0 <= self.ema < 1:
            raise PlanError(f"GradientNoiseScale: ema={self.ema!r}; expected a smoothing factor in [0, 1)")

    def update(self, small_sq: float, big_sq: float, small: int, big: int) -> float:
        """One observation: mean squared norm ``small_sq`` of gradients over ``small`` samples, ``big_sq`` of their
        mean over ``big`` samples. Returns the current phi."""
        if not (_number(small) and _number(big) and 0 < small < big and math.isfinite(big)):
            raise PlanError(f"GradientNoiseScale.update: small={small!r}, big={big!r}; expected sample counts with "
                            "0 < small < big")
        # a NaN or inf would stay in the moving averages for good: refused before it gets there
        _finite_nonneg("GradientNoiseScale.update", small_sq=small_sq, big_sq=big_sq)
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
        where = "GradientNoiseScale.observe"
        if isinstance(micro_grads, torch.Tensor) or not isinstance(micro_grads, Sequence):
            raise PlanError(f"{where}: micro_grads={type(micro_grads).__name__}; expected a list of k >= 2 flat "
                            "gradient tensors")
        k = len(micro_grads)
        if k < 2:
            raise PlanError(f"{where}: {k} micro-batch gradients; expected at least 2")
        if not _count(micro_batch):
            raise PlanError(f"{where}: micro_batch={micro_batch!r}; expected a positive int (samples per gradient)")
        micro_batch = int(micro_batch)
        shapes = {tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__ for g in micro_grads}
        if len(shapes) != 1 or not all(isinstance(g, torch.Tensor) and g.numel() > 0 for g in micro_grads):
            raise PlanError(f"{where}: micro_grads of {sorted(map(str, shapes))}; expected non-empty tensors of one "
                            "shape")
        if not all(bool(torch.isfinite(g).all()) for g in micro_grads):
            raise PlanError(f"{where}: a micro-batch gradient holds NaN or inf; expected finite gradients (skip the "
                            "step, as a loss scaler does)")
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

    def __post_init__(self) -> None:
        # refused when made, naming the field (base_batch=0 was taken, and choose(nan) answered a batch of 0)
        if isinstance(self.candidates, str) or not isinstance(self.candidates, Sequence) or not self.candidates \
                or not all(_count(m) for m in self.candidates):
            raise PlanError(f"AdaptiveBatch: candidates={self.candidates!r:.120}; expected a non-empty sequence of "
                            "positive int batch sizes")
        if not _count(self.base_batch):
            raise PlanError(f"AdaptiveBatch: base_batch={self.base_batch!r}; expected the base batch size M0, an "
                            "int >= 1")
        if not callable(self.samples_per_s):
            raise PlanError(f"AdaptiveBatch: samples_per_s={self.samples_per_s!r:.80}; expected a callable "
                            "batch -> samples per second")
        self.candidates = [int(m) for m in self.candidates]
        self.base_batch = int(self.base_batch)

    def choose(self, phi: float) -> int:
        if not _number(phi) or phi < 0:
            raise PlanError(f"AdaptiveBatch.choose: phi={phi!r}; expected a non-negative noise scale (nan: none yet)")
        if math.isnan(phi):
            return self.base_batch
        if math.isinf(phi):
            return max(self.candidates)
        rates = {m: self.samples_per_s(m) for m in self.candidates}
        bad = {m: r for m, r in rates.items() if not _number(r) or not math.isfinite(r) or r <= 0}
        if bad:
            raise PlanError(f"AdaptiveBatch: samples_per_s gave {bad}; expected positive, finite samples per second")
        return max(self.candidates, key=lambda m: rates[m] * efficiency(m, phi, self.base_batch))


LR_RULES = ("sqrt", "linear")     # how the learning rate follows AdaScale's gain: Adam-family, SGD


@dataclasses.dataclass
class GoodputController:
    """Pollux's adaptation inside one training loop: when to read the noise scale, which batch to train at next,
    at which learning rate.

        ctl = GoodputController(candidates=[8, 16, 32, 64, 128], step_s={8: 0.01, ...}, base_batch=8, base_lr=2e-3)
        for step in itertools.count():
            batch, micro = ctl.batch, ctl.micro_batches(step)       # 2 on probe steps, else 1
            set the optimizer's lr to ctl.lr(); accumulate_and_observe(..., micro_batches=micro, gns=ctl.gns)
            opt.step(); ctl.after_step(step, samples_seen)

    Reading the noise scale needs the gradients of two halves of a batch, i.e. two accumulation micro-steps;
    where a step's cost is mostly fixed (small models, the CPU, launch-bound GPUs) that doubles the step. So the
    noise scale is read on one step in ``probe_every`` (it is smoothed over observations anyway and moves slowly
    over training), and the throughput of each candidate is that of the mix actually run: ``step_s[M]`` (one
    micro-step) and ``probe_s[M]`` (two; ``step_s`` when not given) averaged as 1 probe in ``probe_every``. Every
    ``every`` steps the batch becomes the candidate with the largest goodput. The learning rate is ``base_lr``
    times AdaScale's gain (M / M0) E(M), through ``lr_rule``: "linear" for SGD, "sqrt" for Adam-family
    optimizers (whose update is already normalised by the gradient's scale). Before the first estimate the gain is
    M / M0. ``history``: (step, samples, phi, batch) at each choice."""

    candidates: Sequence[int]
    step_s: dict[int, float]
    base_batch: int
    base_lr: float
    probe_s: dict[int, float] | None = None
    every: int = 10
    probe_every: int = 4
    lr_rule: str = "sqrt"
    gns: GradientNoiseScale = dataclasses.field(default_factory=GradientNoiseScale)
    batch: int = 0
    history: list[tuple[int, int, float, int]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        # (candidates=8, no sequence, was a TypeError from the message itself; numpy's ints are ints)
        if isinstance(self.candidates, str) or not isinstance(self.candidates, Sequence) or not self.candidates or \
                not all(_count(m, 2) for m in self.candidates):
            raise PlanError(f"GoodputController: candidates={self.candidates!r:.120}; expected a non-empty sequence "
                            "of int batch sizes >= 2 (a probe step splits the batch in two)")
        if not _count(self.base_batch):
            raise PlanError(f"GoodputController: base_batch={self.base_batch!r}; expected the base batch size M0, an "
                            "int >= 1")
        if self.batch != 0 and not _count(self.batch):
            raise PlanError(f"GoodputController: batch={self.batch!r}; expected the starting batch size, an int >= 1 "
                            "(0: base_batch)")
        self.candidates = [int(m) for m in self.candidates]
        self.base_batch, self.batch = int(self.base_batch), int(self.batch)
        if not isinstance(self.step_s, dict):
            raise PlanError(f"GoodputController: step_s={type(self.step_s).__name__}; expected a dict of seconds "
                            "per step by batch size")
        missing = [m for m in self.candidates if m not in self.step_s or not _number(self.step_s[m])
                   or not 0 < self.step_s[m] < math.inf]
        if missing:
            raise PlanError(f"GoodputController: step_s has no positive time for batch sizes {missing}; expected "
                            "seconds per step for every candidate")
        for name in ("every", "probe_every"):
            if not _count(getattr(self, name)):                 # (every=True was taken as 1)
                raise PlanError(f"GoodputController: {name}={getattr(self, name)!r}; expected an int >= 1")
        if self.lr_rule not in LR_RULES:
            raise PlanError(f"GoodputController: lr_rule={self.lr_rule!r}; expected one of {LR_RULES}")
        bad_probe = {m: t for m, t in (self.probe_s or {}).items() if not _number(t) or not 0 < t < math.inf}
        if bad_probe:
            raise PlanError(f"GoodputController: probe_s={bad_probe}; expected positive, finite seconds per step")
        if not _number(self.base_lr) or not 0 < self.base_lr < math.inf:
            raise PlanError(f"GoodputController: base_lr={self.base_lr!r}; expected a positive learning rate")
        self.batch = self.batch or self.base_batch
        self._chooser = AdaptiveBatch(list(self.candidates), self.samples_per_s, self.base_batch)

    def samples_per_s(self, batch: int) -> float:
        """Samples per second at ``batch`` with one probe step in ``probe_every``."""
        probe = (self.probe_s or self.step_s).get(batch, self.step_s[batch])
        mean_s = ((self.probe_every - 1) * self.step_s[batch] + probe) / self.probe_every
        return batch / mean_s

    def micro_batches(self, step: int) -> int:
        """2 on the steps that read the noise scale (one in ``probe_every``, from the first), else 1."""
        return 2 if step % self.probe_every == 0 and self.batch % 2 == 0 else 1

    def lr(self) -> float:
        phi = self.gns.phi
        gain = self.batch / self.base_batch if math.isnan(phi) else lr_scale(self.batch, phi, self.base_batch)
        return self.base_lr * (math.sqrt(gain) if self.lr_rule == "sqrt" else gain)

    def after_step(self, step: int, samples: int) -> int:
        """After step ``step`` (0-based): every ``every`` steps, the next batch by goodput. Returns the batch."""
        if (step + 1) % self.every == 0 and not math.isnan(self.gns.phi):
            self.batch = self._chooser.choose(self.gns.phi)
            self.history.append((step, samples, self.gns.phi, self.batch))
        return self.batch


def adam_preconditioner(optimizer, params) -> Any:
    """The flat diagonal preconditioner 1 / (sqrt(v_hat) + eps) an Adam-family ``optimizer`` (torch's Adam, AdamW:
    state ``exp_avg_sq`` and ``step``) applies to ``params``' gradients, in their order; None before its first step
    or for an optimizer without second moments (plain SGD: the identity)."""
    import torch
    parts = []
    for group in optimizer.param_groups:
        eps, (_, beta2) = group.get("eps", 1e-8), group.get("betas", (0.9, 0.999))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                return None
            step = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** step)
            parts.append((p, 1.0 / (v_hat.sqrt() + eps)))
    by_param = {id(p): d for p, d in parts}
    if any(id(p) not in by_param for p in params):
        return None
    return torch.cat([by_param[id(p)].reshape(-1) for p in params])


def accumulate_and_observe(model, loss_fn: Callable, inputs, targets, *, micro_batches: int,
                           gns: GradientNoiseScale | None = None, optimizer=None) -> float:
    """One step's gradient by accumulation over ``micro_batches`` equal slices of the batch (dim 0), leaving in
    every ``p.grad`` the gradient of the mean loss over the whole batch (as one backward would), and feeding the
    slices' gradients to ``gns``. Returns the mean loss.

    With an Adam-family ``optimizer`` the noise scale is that of the preconditioned gradients (Pollux's choice
    for adaptive optimizers: tr(P Sigma P) / |P G|^2 with P Adam's 1 / (sqrt(v_hat) + eps)), the noise of the
    update the optimizer actually takes; coordinates with small second moments weigh more than in the raw
    gradient's noise scale, which underestimates the batch Adam can use."""
    import torch
    n = inputs.shape[0] if hasattr(inputs, "shape") and len(inputs.shape) else 0
    if not _count(micro_batches) or not n or n % micro_batches:
        raise PlanError(f"accumulate_and_observe: micro_batches={micro_batches} with a batch of {n}; expected a "
                        "divisor of the batch")
    micro_batches = int(micro_batches)           # (np.int64 was refused)
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
        precond = adam_preconditioner(optimizer, params) if optimizer is not None else None
        gns.observe(flats if precond is None else [f * precond for f in flats], b)
    return total / micro_batches
