"""What the backend did to one captured graph: the rewrites made (with their checks), the patterns it
recognised but left (and why), and the ops it handed to the inner compiler, counted by op, with the reason.

    print(tilestack.compile.last_report())
"""

from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass
class Swap:
    pattern: str        # the pass
    node: str           # the FX node replaced (its output node)
    what: str           # "layer_norm -> tilestack::layer_norm_fwd"
    check: str          # "passed (max err 1e-07)", "not run", "FAILED ... kept the original"
    made: bool = True   # False: the check failed and the original stayed


@dataclasses.dataclass
class Report:
    graph: str
    inner: str
    swaps: list[Swap] = dataclasses.field(default_factory=list)
    declined: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)   # (pattern, node, why)
    left: Counter = dataclasses.field(default_factory=Counter)                        # op -> count
    left_why: dict[str, str] = dataclasses.field(default_factory=dict)                # op -> why

    @property
    def swapped(self) -> Counter:
        """How many rewrites each pass made."""
        return Counter(s.pattern for s in self.swaps if s.made)

    def __str__(self) -> str:
        lines = [f"tilestack backend, graph {self.graph}: {sum(self.swapped.values())} rewrites, the rest to "
                 f"{self.inner}"]
        for s in self.swaps:
            state = "" if s.made else "  [not made]"
            lines.append(f"  swapped  {s.pattern:<18} {s.node:<22} {s.what}; check: {s.check}{state}")
        for pattern, node, why in self.declined:
            lines.append(f"  left     {pattern:<18} {node:<22} {why}")
        for op, count in sorted(self.left.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {self.inner:<8} {op:<18} x{count:<4} {self.left_why[op]}")
        return "\n".join(lines)
