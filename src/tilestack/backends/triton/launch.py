"""Compile the generated source with Triton and launch it: on a CUDA GPU, or on the CPU under Triton's
interpreter (no GPU, or ``TRITON_INTERPRET=1``).

The source is written to ``<cache_dir>/triton/<name>_<hash>.py`` and imported from there, so Triton can read
it like any other kernel and a person can open it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile

from tilestack.backends.triton.codegen import generate
from tilestack.config import knobs
from tilestack.errors import BackendError, LaunchError

LAUNCH_OPTIONS = ("num_warps", "num_stages")   # constants the backend reads as launch options


def _triton(interpret: bool):
    if interpret:
        from tilestack.config import use_triton_interpreter
        use_triton_interpreter()
    try:
        import triton
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
        raise BackendError("the Triton backend needs the `triton` package (pip install triton)") from e
    return triton


def _interpret(args) -> bool:
    import torch

    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    if devices == {"cuda"} and not knobs.triton_interpret:
        return False
    if knobs.triton_interpret:
        if devices - {"cpu"}:
            raise LaunchError(f"triton backend: TRITON_INTERPRET=1 runs on CPU tensors; got tensors on {devices}")
        return True
    if devices == {"cuda"}:
        return False
    if devices == {"cpu"} and not torch.cuda.is_available():
        return True   # no GPU here: Triton's interpreter
    raise LaunchError(f"triton backend: tensors are on {sorted(devices)}; with a CUDA GPU present they must be "
                      "on cuda (or set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors)")


def compile_source(src: str, fn_name: str, interpret: bool):
    """Import ``src`` as a module and return its @triton.jit function (interpreted if asked)."""
    triton = _triton(interpret)
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    folder = knobs.cache_dir / "triton"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fn_name}_{digest}.py"
    if not path.exists():   # written whole, then renamed: an interrupted run never leaves half a file
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".py.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(src)
        os.replace(tmp, path)
    old = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = interpret
    try:
        spec = importlib.util.spec_from_file_location(f"tilestack_gen_{fn_name}_{digest}_{int(interpret)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        triton.knobs.runtime.interpret = old
    return getattr(module, fn_name)


TMA_ALIGN = 16   # bytes: the copy engine needs 16-byte aligned base addresses and leading strides


def tma_ok(t) -> bool:
    """Whether the copy engine can address tensor ``t`` in whole tiles."""
    item = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % TMA_ALIGN == 0
            and all((s * item) % TMA_ALIGN == 0 for s in t.stride()[:-1]))


def jit_function(traced, interpret: bool, tma: bool):
    """(jitted function, lowered kernel) for this mode, compiled once per traced kernel."""
    key = f"triton{'-interpret' if interpret else ''}{'-tma' if tma else ''}"
    if key not in traced._compiled:
        low = generate(traced.ir, interpret=interpret, tma=tma)
        traced._compiled[key] = (compile_source(low.source, low.fn_name, interpret), low)
    return traced._compiled[key]


def _descriptor(t, block: tuple[int, ...]):
    """A TMA descriptor of tensor ``t``. Made per launch: a descriptor holds its tensor, so a cache of them
    would keep every output ever launched alive."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def flat_args(traced, args, low) -> list:
    """The kernel's arguments, in the order of ``low.binding`` (only what its body reads)."""
    out = []
    for how in low.binding:
        kind, i = how[0], how[1]
        if kind == "ptr" or kind == "scalar":
            out.append(args[i])
        elif kind == "dim":
            out.append(args[i].shape[how[2]])
        elif kind == "stride":
            out.append(args[i].stride(how[2]))
        else:
            out.append(_descriptor(args[i], how[2]))
    return out


def run(traced, args):
    interpret = _interpret(args)
    tma = (interpret or _tma_capable()) and all(tma_ok(args[i]) for i in traced.tile_globals)
    fn, low = jit_function(traced, interpret, tma)
    grid = traced.grid(*args)
    if 0 in grid:
        return None
    options = {k: traced.constants[k] for k in LAUNCH_OPTIONS if k in traced.constants}
    if interpret:
        fn[grid](*flat_args(traced, args, low), **options)
        return None
    # every GPU launch sits in an NVTX range named by kernel and config, so Nsight tools can select it
    import torch
    label = traced._compiled.get("nvtx-label")
    if label is None:
        from tilestack.perf.nvtx import PREFIX, range_name
        label = traced._compiled["nvtx-label"] = PREFIX + range_name(traced.name, traced.constants)
    torch.cuda.nvtx.range_push(label)
    try:
        traced._compiled["triton-binary"] = fn[grid](*flat_args(traced, args, low), **options)
    finally:
        torch.cuda.nvtx.range_pop()
    return None


_tma_capability: bool | None = None


def _tma_capable() -> bool:
    """Whether this GPU has the copy engine (Hopper or newer); read once."""
    global _tma_capability
    if _tma_capability is None:
        import torch
        _tma_capability = torch.cuda.get_device_capability()[0] >= 9
    return _tma_capability


def resource_report(traced) -> dict:
    """What the compiler gave the last GPU launch: registers per thread, spills, shared memory, warps."""
    k = traced._compiled.get("triton-binary")
    if k is None:
        raise BackendError(f"{traced.name}: no compiled GPU kernel yet; launch it on a CUDA device first")
    md = k.metadata
    return {"registers": k.n_regs, "spills": k.n_spills, "shared_bytes": md.shared,
            "num_warps": md.num_warps, "num_stages": md.num_stages}
