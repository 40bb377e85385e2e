"""Search spaces from a kernel's declared tunables, minus the configs a device cannot run.

    space = SearchSpace(attention_fwd_kernel, fixed=dict(D=128, causal=True))
    space.configs(args, shared_limit=227 * 1024)   # every combination of the domains that fits

A config is dropped before anything compiles when the shared tiles it declares (from the IR's footprint),
times the pipeline stages that keep copies of the tiles loaded in a loop, exceed the device's shared memory,
or when its register tiles (the IR's footprint over the program's threads) are so large that the compiler
could only spill them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from tilestack.errors import TunableError
from tilestack.ir.ops import Op
from tilestack.ir.types import Space, TileType

H100_SHARED_BYTES = 227 * 1024   # per block, after cudaFuncSetAttribute; Hopper's opt-in maximum
THREADS_PER_WARP = 32
# Register tiles per thread past which a config is not worth compiling. A thread has at most 255 32-bit
# registers; the IR's footprint counts every distinct tile as if all were live at once (an over-estimate: the
# largest shipped configs count 293 registers and run well), so the bound is 1.5x that.
REGISTER_BYTES_PER_THREAD = 384 * 4
FOOTPRINT_DIM = 16


def _looped_shared_bytes(body) -> int:
    """Bytes of the distinct shared tiles that some load inside a loop writes."""
    tiles: dict[int, int] = {}
    for loop in body.walk():
        if loop.body is None:
            continue
        for ins in loop.body.walk():
            t = ins.results[0].type if ins.op is Op.LOAD and ins.results else None
            if isinstance(t, TileType) and t.space is Space.SHARED:
                tiles[ins.result.buffer] = t.nbytes
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
        return self.footprint(args, config)[0]

    def footprint(self, args, config: dict) -> tuple[int, int]:
        """(shared bytes with pipelining copies, register-tile bytes per thread) of one config, from its IR."""
        traced = self.kernel.trace(*args, **self.fixed, **config)
        # footprints do not depend on the sizes: cost the IR at small ones (a large grid costs seconds)
        cost = traced.cost(*((FOOTPRINT_DIM,) * len(a.shape) if hasattr(a, "shape") else a for a in args))
        stages = max(1, config.get("num_stages", 1))
        shared = cost.shared_bytes + (stages - 1) * _looped_shared_bytes(traced.ir.body)
        threads = config.get("num_warps", 4) * THREADS_PER_WARP
        return shared, -(-cost.register_bytes // threads)

    def configs(self, args, shared_limit: int = H100_SHARED_BYTES,
                register_limit: int | None = REGISTER_BYTES_PER_THREAD) -> list[dict[str, Any]]:
        """The configs that fit ``shared_limit`` bytes of shared memory per block and (unless None)
        ``register_limit`` bytes of register tiles per thread."""
        kept = []
        for c in self.all_configs():
            shared, regs = self.footprint(args, c)
            if shared <= shared_limit and (register_limit is None or regs <= register_limit):
                kept.append(c)
        return kept
