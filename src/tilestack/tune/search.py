"""Strategies: time candidate configs and keep the fastest correct one.

    best = tune(space, args, run=lambda cfg: ..., check=lambda cfg: err, time=lambda cfg: seconds)
    print(best.as_code())      # the winner as code to paste: attention_fwd_kernel(..., BM=128, BN=64, ...)

``exhaustive`` times every config that fits; ``random_sample`` a seeded subset (for large spaces). A config
that fails to compile (the compiler ran out of registers or shared memory) or computes a wrong result is
logged and skipped, never chosen.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
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

    def as_code(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.best.items())
        return f"{self.kernel}(..., {args})"


def tune(kernel_name: str, candidates: list[dict[str, Any]], *, time: Callable[[dict], float],
         check: Callable[[dict], float] | None = None, tol: float = 2e-2, strategy: str = "exhaustive",
         samples: int = 16, seed: int = 0, log: Callable[[str], None] = lambda s: None) -> TuneResult:
    if strategy == "random":
        candidates = random.Random(seed).sample(candidates, min(samples, len(candidates)))
    elif strategy != "exhaustive":
        raise ValueError(f"tune: strategy={strategy!r}; expected 'exhaustive' or 'random'")
    if not candidates:
        raise ValueError(f"tune: no candidate configs for {kernel_name} (all over the device's limits?)")
    trials = []
    for cfg in candidates:
        try:
            if check is not None:
                err = check(cfg)
                if not err <= tol:
                    trials.append(Trial(cfg, None, f"wrong result (rel err {err:.1e})"))
                    log(f"  {cfg}: wrong result (rel err {err:.1e})")
                    continue
            trials.append(Trial(cfg, time(cfg)))
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a lost candidate, not a failure
            trials.append(Trial(cfg, None, f"{type(e).__name__}: {str(e)[:120]}"))
            log(f"  {cfg}: {type(e).__name__}: {str(e)[:80]}")
    timed = [t for t in trials if t.seconds is not None]
    if not timed:
        raise RuntimeError(f"tune: every config of {kernel_name} failed; first error: {trials[0].error}")
    win = min(timed, key=lambda t: t.seconds)
    return TuneResult(kernel_name, win.config, win.seconds, trials)
