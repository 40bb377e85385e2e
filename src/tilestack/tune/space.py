"""Search spaces: a kernel's declared tunables times its backend's options, minus the configs a device cannot run.

    space = SearchSpace(attention_fwd_kernel, fixed=dict(D=128, causal=True))
    space.domains()                     # {"BM": (...), "BN": (...), "num_warps": (4, 8), "num_stages": (1, 2, 3, 4)}
    space.configs(args)                 # every combination that fits the device (default: this GPU, else Hopper)
    space.split(cfg)                    # ({"BM": 128, "BN": 64}, {"num_warps": 8, "num_stages": 3})

The kernel declares its own tunables (tile sizes, variants: ``ts.tunable``); the backend declares its launch
options and the values worth searching (``Backend.search_domains()``: Triton's num_warps and num_stages).
A config is one flat dict, as a launch takes it (``kernel(*args, **cfg)`` sends the options to the backend);
``split`` parts it again for a table. ``restrict`` narrows either kind. A kernel that still declares
``num_warps``/``num_stages`` as tunables keeps its declared domains for them.

A config is dropped before anything compiles when the shared tiles it declares (from the IR's footprint),
times the pipeline stages that keep copies of the tiles loaded in a loop, exceed the device's shared memory per
block, or when its register tiles (the IR's footprint over the program's threads) are so large that the compiler
could only spill them. Both limits come from the device (``tune.devices.DeviceKey``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tilestack.errors import BackendError, TunableError
from tilestack.ir.cost import footprints
from tilestack.ir.ops import Op
from tilestack.ir.types import Space, TileType
from tilestack.tune.devices import REGISTER_BYTES_PER_THREAD, DeviceKey, target_device

THREADS_PER_WARP = 32
DEVICE_LIMIT = -1      # configs(register_limit=...): the device's (None: no limit)
__all__ = ["DEVICE_LIMIT", "REGISTER_BYTES_PER_THREAD", "SearchSpace", "THREADS_PER_WARP"]


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
    backend: str = "triton"              # whose launch options are searched beside the kernel's tunables
    device: DeviceKey | None = None      # whose limits filter the configs (None: this GPU, else Hopper)

    def __post_init__(self):
        from tilestack.backends import get_backend
        from tilestack.lang.kernel import Kernel

        # each refused by name here, not at configs() (a TypeError or AttributeError from inside the trace)
        if not isinstance(self.kernel, Kernel):
            raise TunableError(f"SearchSpace: kernel is {type(self.kernel).__name__} {self.kernel!r:.60}; expected a "
                               "tile-language kernel (@ts.kernel), e.g. tilestack.kernels.gemm_kernel")
        for arg in ("fixed", "restrict"):
            value = getattr(self, arg)
            if not isinstance(value, Mapping):
                what, example = ("constants", "64") if arg == "fixed" else ("names to the values searched", "(64, 128)")
                raise TunableError(f"SearchSpace: {arg}={value!r} ({type(value).__name__}); expected a dict of {what}, "
                                   f"e.g. {arg}=dict(BM={example})")
        if self.device is not None and not isinstance(self.device, DeviceKey):
            raise TunableError(f"SearchSpace: device={self.device!r} ({type(self.device).__name__}); expected a "
                               "DeviceKey (tune.device_key(0), or DeviceKey.parse('sm90-132sm-227kb')) or None")
        self._backend = get_backend(self.backend)
        tunables = self.kernel.tunables
        searched = self._backend.search_domains()
        self._names = frozenset(searched)      # the backend's option names: a table stores these apart
        # the options the kernel does not declare itself (a kernel declaring num_warps keeps its own domain)
        self._options = {n: d for n, d in searched.items() if n not in tunables}
        for name, value in self.fixed.items():   # (a searched name fixed too: "multiple values for keyword" in trace)
            if name in tunables or name in self._options:
                raise TunableError(f"SearchSpace: fixed={{{name!r}: {value!r}}} names a value the search chooses (a "
                                   f"tunable of {self.kernel.name} or a launch option of {self.backend}); expected "
                                   f"it in restrict: restrict=dict({name}=({value!r},)) searches that value alone")
        # each domain kept as a tuple of plain values: a generator or iterator was used up by the check below, and
        # the search then had no config without a word; NumPy values went on into the configs (and tables) as such
        restrict = {}
        for name, dom in self.restrict.items():
            if isinstance(dom, str | bytes) or not isinstance(dom, Iterable) or not (dom := tuple(dom)):
                hint = ("a str is not split into characters" if isinstance(dom, str | bytes) else "none would leave "
                        "no config to search" if isinstance(dom, Iterable) else f"one value: ({dom!r},)")
                raise TunableError(f"SearchSpace: restrict[{name!r}]={dom!r}; expected a non-empty tuple of the "
                                   f"values to search ({hint})")
            dom = restrict[name] = tuple(v.item() if isinstance(v, np.generic) else v for v in dom)
            if name in self._options:
                try:
                    for v in dom:
                        self._backend.check_options({name: v})
                except BackendError as e:
                    raise TunableError(f"SearchSpace: {name}={list(dom)} for {self.kernel.name}: {e}") from e
                continue
            if name not in tunables:
                raise TunableError(f"SearchSpace: {name!r} is not a tunable of {self.kernel.name}; its tunables "
                                   f"are {sorted(tunables)} and {self.backend}'s options {sorted(self._options)}")
            outside = set(dom) - set(tunables[name].domain)
            if outside:
                raise TunableError(f"SearchSpace: {name}={sorted(outside)} is outside the declared domain "
                                   f"{tunables[name].domain}")

        self.restrict = restrict

    def domains(self) -> dict[str, tuple]:
        """The values searched per name: the kernel's tunables, then the backend's options (the kernel's default
        option added to the backend's values, so the search can start from it)."""
        doms = {n: self.restrict.get(n, t.domain) for n, t in self.kernel.tunables.items()}
        for name, values in self._options.items():
            if name in self.restrict:
                doms[name] = tuple(self.restrict[name])
            else:
                default = self.kernel.options.get(name)
                doms[name] = tuple(values) if default is None or default in values else \
                    tuple(sorted({*values, default}))
        return doms

    def defaults(self) -> dict[str, Any]:
        """The config a launch uses when it is given none: the tunables' defaults, the kernel's default options,
        else the backend's own."""
        out = {n: t.default for n, t in self.kernel.tunables.items()}
        backend = self._backend.option_defaults()
        for name in self._options:
            out[name] = self.kernel.options.get(name, backend.get(name))
        return out

    def split(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the kernel's tunables, the backend's options) of a flat config, as a table stores them (a kernel that
        declares num_warps among its tunables has it stored as the option it is)."""
        return ({k: v for k, v in config.items() if k not in self._names},
                {k: v for k, v in config.items() if k in self._names})

    def all_configs(self) -> list[dict[str, Any]]:
        """Every combination of ``domains()``: the kernel's tunables times the backend's options."""
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
        traced = self.kernel.trace(*args, **self.fixed, **config)    # launch options do not change the trace
        shared_bytes, register_bytes = footprints(traced.ir)           # the IR's buffers: no sizes needed
        launch = {**self.kernel.options, **config}      # a legacy kernel's num_warps is among its tunables
        stages = max(1, launch.get("num_stages", 1))
        shared = shared_bytes + (stages - 1) * _looped_shared_bytes(traced.ir.body)
        threads = launch.get("num_warps", 4) * THREADS_PER_WARP
        return shared, -(-register_bytes // threads)

    def limits(self) -> tuple[int, int]:
        """(shared bytes per block, register-tile bytes per thread) of the device this space is for."""
        device = self.device or target_device()
        return device.shared_bytes, device.register_tile_bytes

    def configs(self, args, shared_limit: int | None = None,
                register_limit: int | None = DEVICE_LIMIT) -> list[dict[str, Any]]:
        """The configs that fit ``shared_limit`` bytes of shared memory per block (None: the device's) and
        ``register_limit`` bytes of register tiles per thread (``DEVICE_LIMIT``: the device's; None: no limit)."""
        # (NaN kept no config, silently); a NumPy number is the number it is
        for arg, value in (("shared_limit", shared_limit), ("register_limit", register_limit)):
            if value is not None and value != DEVICE_LIMIT and (isinstance(value, bool) or not isinstance(
                    value, numbers.Real) or not value >= 0 or math.isinf(value)):
                raise TunableError(f"SearchSpace.configs: {arg}={value!r}; expected bytes >= 0, or None")
        shared_dev, regs_dev = self.limits()
        shared_limit = shared_dev if shared_limit is None else shared_limit
        register_limit = regs_dev if register_limit == DEVICE_LIMIT else register_limit
        kept = []
        for c in self.all_configs():
            shared, regs = self.footprint(args, c)
            if shared <= shared_limit and (register_limit is None or regs <= register_limit):
                kept.append(c)
        return kept
