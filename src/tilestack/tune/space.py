"""Search spaces from a kernel's declared tunables, minus the configs a device cannot run.

    space = SearchSpace(attention_fwd_kernel, fixed=dict(D=128, causal=True))
    space.configs(args, shared_limit=227 * 1024)   # every combination of the domains that fits

A config is dropped before anything compiles when the shared tiles it declares (from the IR's footprint),
times the pipeline stages that keep copies of the tiles loaded in a loop, exceed the device's shared memory.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from tilestack.errors import TunableError
from tilestack.ir.ops import Op
from tilestack.ir.types import Space, TileType

H100_SHARED_BYTES = 227 * 1024   # per block, after cudaFuncSetAttribute; Hopper's opt-in maximum


def _looped_shared_bytes(body) -> int:
    """Bytes of the distinct shared tiles that some load inside a loop writes."""
    tiles: dict[int, int] = {}
    for loop in body.walk():
        if loop.body is None:
            continue
        for ins in loop.body.walk():
            t = ins.results[0].type if ins.op is Op.LOAD and ins.results else None
            if isinstance(t, TileType) and t.space is Space.SHARED:
                tiles[ins.attrs["dst"]] = t.nbytes
    return sum(tiles.values())


@dataclasses.dataclass
class SearchSpace:
    kernel: Any                          # a tilestack.lang.Kernel
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)   # non-tunable constants (D=128, ...)
    restrict: dict[str, tuple] = dataclasses.field(default_factory=dict)   # narrower domains to search

    def __post_init__(self):
        tunables = self.kernel.tunables
        for name, dom in self.restrict.items():
            if name not in tunables:
                raise TunableError(f"SearchSpace: {name!r} is not a tunable of {self.kernel.name}; its tunables "
                                   f"are {sorted(tunables)}")
            outside = set(dom) - set(tunables[name].domain)
            if outside:
                raise TunableError(f"SearchSpace: {name}={sorted(outside)} is outside the declared domain "
                                   f"{tunables[name].domain}")

    def domains(self) -> dict[str, tuple]:
        return {n: self.restrict.get(n, t.domain) for n, t in self.kernel.tunables.items()}

    def all_configs(self) -> list[dict[str, Any]]:
        doms = self.domains()
        names = list(doms)
        return [dict(zip(names, vals, strict=True)) for vals in itertools.product(*(doms[n] for n in names))]

    def shared_bytes(self, args, config: dict) -> int:
        """Shared memory the config needs: the declared shared tiles (the IR's footprint), plus
        ``num_stages - 1`` more copies of those loaded inside a loop (pipelining); a tile loaded once before
        the loops (attention's Q) is not multiplied."""
        traced = self.kernel.trace(*args, **self.fixed, **config)
        stages = max(1, config.get("num_stages", 1))
        return traced.cost(*args).shared_bytes + (stages - 1) * _looped_shared_bytes(traced.ir.body)

    def configs(self, args, shared_limit: int = H100_SHARED_BYTES) -> list[dict[str, Any]]:
        return [c for c in self.all_configs() if self.shared_bytes(args, c) <= shared_limit]
