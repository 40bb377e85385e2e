"""What a fuzz run records per problem (``Outcome``) and in all (``Report``), and the NaN-poisoned allocations
under which every problem runs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Iterator

KINDS = ("gemm", "softmax", "layer_norm", "rms_norm", "layer_norm_bwd", "rms_norm_bwd", "attention")
STATUSES = ("ok", "mismatch", "nan", "crash")


@dataclasses.dataclass
class Outcome:
    index: int
    kind: str
    backend: str
    status: str
    problem: str                       # what was run: shapes, dtype, flags, value style
    detail: str = ""                   # for a failure: which output, the worst element, or the exception


@dataclasses.dataclass
class Report:
    seed: int
    device: str
    backends: tuple[str, ...]
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    capabilities: dict = dataclasses.field(default_factory=dict)
    next_index: int = 0                # the first problem of this run's range (or shard) that was not tried

    @property
    def tried(self) -> int:
        return len(self.outcomes)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    def by_kind(self) -> dict[str, Counter]:
        table: dict[str, Counter] = {}
        for o in self.outcomes:
            table.setdefault(f"{o.kind}/{o.backend}", Counter())[o.status] += 1
        return table

    def as_dict(self) -> dict:
        return dict(seed=self.seed, device=self.device, backends=list(self.backends), tried=self.tried,
                    **{s: self.count(s) for s in STATUSES}, seconds=round(self.seconds, 1),
                    capabilities=self.capabilities, next_index=self.next_index,
                    by_kind={k: dict(v) for k, v in sorted(self.by_kind().items())},
                    failures=[dataclasses.asdict(o) for o in self.failures])

    def summary(self, max_failures: int = 20) -> str:
        lines = [f"fuzz seed={self.seed} device={self.device} backends={','.join(self.backends)}: "
                 f"{self.tried} problems tried in {self.seconds:.0f} s; mismatches {self.count('mismatch')}, "
                 f"NaN {self.count('nan')}, crashes {self.count('crash')}"]
        for key, c in sorted(self.by_kind().items()):
            lines.append(f"  {key:24s} " + "  ".join(f"{s} {c[s]}" for s in STATUSES if c[s] or s == "ok"))
        for o in self.failures[:max_failures]:
            lines.append(f"  [{o.index}] {o.status} {o.kind}/{o.backend} {o.problem}: {o.detail}")
            lines.append(f"      replay: scripts/fuzz.py --seed {self.seed} --start {o.index} --budget 1 "
                         f"--device {self.device}")
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more failures")
        return "\n".join(lines)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within the block, every floating tensor from ``torch.empty``, ``empty_like``, ``empty_strided`` and
    ``Tensor.new_empty`` starts as NaN (meta tensors have no data and are left alone)."""
    import torch

    saved = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    new_empty = torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point() and t.device.type != "meta" and t.numel():
            t.fill_(math.nan)
        return t

    def wrap(fn):
        return lambda *a, **k: poison(fn(*a, **k))

    for name, fn in saved.items():
        setattr(torch, name, wrap(fn))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = new_empty
