"""Strategies: time candidate configs and keep the fastest correct one.

    best = tune(space, args, run=lambda cfg: ..., check=lambda cfg: err, time=lambda cfg: seconds)
    print(best.as_code())      # the winner as code to paste: attention_fwd_kernel(..., BM=128, BN=64, ...)

``exhaustive`` times every config that fits, in the order given; ``random`` a seeded subset (for large
spaces); ``local`` starts from ``seeds`` (the config in use, winners of similar problems) and then always
tries next the untried config closest to the best so far (fewest tunables changed), so that a search cut
short by its ``deadline`` has spent its time near the winner. A strategy may also be a function
``(candidates, seeds) -> generator`` that yields the next config and is sent each Trial as it is measured (a
cost model's active search: ``tune.guided``); the search ends when it stops. A config that fails to compile (the
compiler ran out of registers or shared memory) or computes a wrong result is logged and skipped, never chosen.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
import time as _time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tilestack.errors import TunableError


@dataclasses.dataclass
class Trial:
    config: dict[str, Any]
    seconds: float | None
    error: str | None = None


@dataclasses.dataclass
class TuneResult:
    kernel: str
    best: dict[str, Any]
    seconds: float
    trials: list[Trial]
    complete: bool = True          # every candidate was tried (False: the deadline cut the search short)

    def as_code(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.best.items())
        return f"{self.kernel}(..., {args})"


def distance(a: dict, b: dict) -> int:
    """How many tunables two configs set differently."""
    return sum(a.get(k) != b.get(k) for k in a.keys() | b.keys())


def _local_order(candidates: list[dict], seeds: Sequence[dict]):
    """Seeds first (those among the candidates), then the untried candidate nearest the best so far; the caller
    sends the best after each trial."""
    left = list(candidates)
    best = None
    for s in seeds:
        if s in left:
            left.remove(s)
            best = (yield s) or best
    while left:
        anchor = best or (seeds[0] if seeds else left[0])
        nxt = min(left, key=lambda c: distance(c, anchor))   # min keeps the first of ties: the given order
        left.remove(nxt)
        best = (yield nxt) or best


def tune(kernel_name: str, candidates: list[dict[str, Any]], *, time: Callable[[dict], float],
         check: Callable[[dict], float] | None = None, tol: float = 2e-2, strategy: str | Callable = "exhaustive",
         samples: int = 16, seed: int = 0, seeds: Sequence[dict] = (), deadline: float | None = None,
         min_trials: int = 1, clock: Callable[[], float] = _time.monotonic,
         log: Callable[[str], None] = lambda s: None) -> TuneResult:
    """The fastest correct config of ``candidates`` (see the module docstring).

    ``deadline`` (a ``clock()`` value): no new candidate starts after it, once ``min_trials`` configs were tried
    and one of them timed."""
    candidates = _checked_arguments(kernel_name, candidates, time, check, tol, samples, deadline)
    # the seed an int (a NumPy int as the int it is): random.Random refused np.int64(1) with its own TypeError, and
    # took 1.5, "x" or None (a draw that differs on every run) without a word
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TunableError(f"tune: seed={seed!r:.60} ({type(seed).__name__}); expected an int (the random "
                           "strategy's seed)")
    if strategy == "random":
        candidates = random.Random(int(seed)).sample(candidates, min(samples, len(candidates)))
    elif not callable(strategy) and strategy not in ("exhaustive", "local"):
        raise ValueError(f"tune: strategy={strategy!r}; expected 'exhaustive', 'random', 'local' or a function "
                         "(candidates, seeds) -> generator")
    if not candidates:
        raise ValueError(f"tune: no candidate configs for {kernel_name} (all over the device's limits?)")
    order = (strategy(candidates, seeds) if callable(strategy) else _local_order(candidates, seeds)
             if strategy == "local" else iter(candidates))
    trials: list[Trial] = []
    best: Trial | None = None
    complete = True
    cfg = next(order)
    while True:
        if deadline is not None and best is not None and len(trials) >= min_trials and clock() >= deadline:
            complete = False
            break
        trials.append(_trial(cfg, time, check, tol, log))
        t = trials[-1]
        if t.seconds is not None and (best is None or t.seconds < best.seconds):
            best = t
        try:
            cfg = (order.send(t) if callable(strategy) else order.send(best.config if best else None)
                   if strategy == "local" else next(order))
        except StopIteration:
            break
    if best is None:
        raise RuntimeError(f"tune: every config of {kernel_name} failed; first error: {trials[0].error}")
    return TuneResult(kernel_name, best.config, best.seconds, trials, complete)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked_arguments(kernel_name, candidates, time, check, tol, samples, deadline) -> list[dict[str, Any]]:
    """``candidates`` as a list, after refusing by name what the search would have misread: a dict of one config
    (its keys searched as configs), a str, configs that are no dicts, a NaN or negative ``tol`` (every config then
    "a wrong result"), ``samples`` < 1, a NaN ``deadline`` (never reached), functions that are none."""
    if not isinstance(kernel_name, str):
        raise TunableError(f"tune: kernel_name={kernel_name!r} ({type(kernel_name).__name__}); expected the "
                           "kernel's name, a str (what TuneResult.as_code prints)")
    if isinstance(candidates, Mapping | str | bytes) or not isinstance(candidates, Iterable):
        raise TunableError(f"tune: candidates is {type(candidates).__name__} {candidates!r:.60}; expected a list of "
                           "configs (dicts), e.g. SearchSpace(kernel).configs(args) or [dict(BM=64), dict(BM=128)]")
    candidates = list(candidates)
    wrong = next((c for c in candidates if not isinstance(c, Mapping)), None)
    if wrong is not None:
        raise TunableError(f"tune: candidate {wrong!r:.60} ({type(wrong).__name__}) of {kernel_name}; expected "
                           "each config a dict of constants and launch options")
    for name, fn in (("time", time), ("check", check)):
        if not callable(fn) and not (name == "check" and fn is None):
            raise TunableError(f"tune: {name}={fn!r:.60}; expected a function of a config returning "
                               + ("its seconds" if name == "time" else "its relative error (or None for no check)"))
    if not _real(tol) or not tol >= 0:
        raise TunableError(f"tune: tol={tol!r}; expected a relative error >= 0 (NaN or below 0 failed every config "
                           "as a wrong result)")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise TunableError(f"tune: samples={samples!r}; expected an int >= 1 (the configs strategy='random' tries)")
    if deadline is not None and (not _real(deadline) or math.isnan(deadline)):
        raise TunableError(f"tune: deadline={deadline!r}; expected a clock() value or None (NaN is never reached)")
    return candidates


def _trial(cfg: dict, time: Callable[[dict], float], check: Callable[[dict], float] | None, tol: float,
           log: Callable[[str], None]) -> Trial:
    try:
        if check is not None:
            err = check(cfg)
            if not err <= tol:
                log(f"  {cfg}: wrong result (rel err {err:.1e})")
                return Trial(cfg, None, f"wrong result (rel err {err:.1e})")
        seconds = time(cfg)
    except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a lost candidate, not a failure
        log(f"  {cfg}: {type(e).__name__}: {str(e)[:80]}")
        return Trial(cfg, None, f"{type(e).__name__}: {str(e)[:120]}")
    if not _real(seconds):   # a mistake in the time function: each config's "seconds" compared as they came
        raise TunableError(f"tune: time({cfg}) returned {type(seconds).__name__} {seconds!r:.40}; expected the "
                           "config's seconds, a number")
    if not 0 < seconds < math.inf:   # no measurement: NaN (never compared smaller, so a first NaN stayed the
        log(f"  {cfg}: time returned {seconds!r}")   # winner), 0 or below, inf; skipped, never chosen
        return Trial(cfg, None, f"time returned {seconds!r}; expected seconds > 0 and finite")
    return Trial(cfg, float(seconds))
