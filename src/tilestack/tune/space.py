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

H100_SHARED_BYTES = 227 * 1024   # per block, after cudaFuncSetAttribute; Hopper's opt-in maximum


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
        """Shared memory the config needs: declared shared tiles, with ``num_stages`` copies (pipelining)."""
        traced = self.kernel.trace(*args, **self.fixed, **config)
        stages = config.get("num_stages", 1)
        return traced.cost(*args).shared_bytes * max(1, stages)

    def configs(self, args, shared_limit: int = H100_SHARED_BYTES) -> list[dict[str, Any]]:
        return [c for c in self.all_configs() if self.shared_bytes(args, c) <= shared_limit]
