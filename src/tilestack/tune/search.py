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
import random
import time as _time
from collections.abc import Callable, Sequence
from typing import Any


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
    if strategy == "random":
        candidates = random.Random(seed).sample(candidates, min(samples, len(candidates)))
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


def _trial(cfg: dict, time: Callable[[dict], float], check: Callable[[dict], float] | None, tol: float,
           log: Callable[[str], None]) -> Trial:
    try:
        if check is not None:
            err = check(cfg)
            if not err <= tol:
                log(f"  {cfg}: wrong result (rel err {err:.1e})")
                return Trial(cfg, None, f"wrong result (rel err {err:.1e})")
        return Trial(cfg, time(cfg))
    except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a lost candidate, not a failure
        log(f"  {cfg}: {type(e).__name__}: {str(e)[:80]}")
        return Trial(cfg, None, f"{type(e).__name__}: {str(e)[:120]}")
