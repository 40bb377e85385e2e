"""Ahead-of-time compiles for a GPU this machine may not have: what the compiler gives one config, no GPU needed.

    from tilestack.tune.aot import resources
    r = resources(gemm_kernel, (a, b, c), {}, dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3))
    r.ok, r.registers, r.spills, r.shared_bytes      # True, 90, 0, 98328 (sm_90a, Triton 3.6)

A config is compiled the way the Triton backend would compile it for a Hopper GPU (``SM90A``): the generated
source with TMA descriptors for whole-tile accesses (what the backend uses when the tensors allow it), Triton's
pipeline down to a cubin through ``ptxas``, then ``cuobjdump -res-usage`` reads registers per thread and local
memory (spills) from the cubin; shared memory is what Triton's metadata says the launch will ask for. ``ok`` is
False when the compile fails or the kernel asks for more shared memory than the device lets a block have (on a
GPU that is the launch's "out of resources").

Each report is kept on disk (``<cache_dir>/aot/<hash>.json``, written atomically), keyed by a hash of the
generated source, the launch options, the argument signature, the target and the Triton version, so a second
call with the same config costs a file read. Errors are cached too (a config that does not compile does not
compile faster the second time).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilestack.errors import BackendError

SM90A = ("cuda", 90, 32)               # Hopper (H100, H200): backend, compute capability, warp size
FORMAT = 1                             # bumped when a report's fields change: older reports are compiled again
DIVISIBILITY = 16                      # Triton's JIT marks pointers and ints divisible by 16 (vectorised access)
INT32_MAX = 2**31 - 1
# Triton's names for the IR's dtypes, as a kernel signature spells them
SIG_DTYPES = {"f64": "fp64", "f32": "fp32", "f16": "fp16", "bf16": "bf16", "i32": "i32", "i64": "i64", "i8": "i8",
              "bool": "i1", "f8e4m3": "fp8e4nv", "u8": "u8"}
TIMED_OUT = "compile: no result within"
COMPILE_TIMEOUT_S = 60.0               # a compile that takes longer is not worth having (see ``resources``)
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the compiler gave one config. ``registers``/``spills`` are None where ``cuobjdump`` is missing."""
    ok: bool                           # compiled, and its shared memory fits the device
    registers: int | None = None       # 32-bit registers per thread
    spills: int | None = None          # 32-bit words of local memory per thread (register spills and stack)
    shared_bytes: int | None = None    # dynamic shared memory the launch asks for
    num_warps: int | None = None
    num_stages: int | None = None
    compile_s: float = 0.0             # seconds the compile took (0 when read from the cache)
    error: str | None = None           # why not ok
    cached: bool = False

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "cached"}


def tools_dir() -> Path:
    """Where Triton keeps the CUDA tools it ships (ptxas, cuobjdump)."""
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def missing_tools() -> str | None:
    """Why an AOT compile cannot run here (no Triton, no ptxas), or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not (tools_dir() / "ptxas").exists() and shutil.which("ptxas") is None:
        return f"no ptxas (looked in {tools_dir()} and on PATH)"
    return None


def _cuobjdump() -> str | None:
    p = tools_dir() / "cuobjdump"
    return str(p) if p.exists() else shutil.which("cuobjdump")


def _split(kernel, config: dict[str, Any]) -> tuple[dict, dict]:
    """(the kernel's constants, the backend's launch options) of a flat config."""
    from tilestack.backends.triton import LAUNCH_OPTIONS

    consts = {k: v for k, v in config.items() if k in kernel.constants or k not in LAUNCH_OPTIONS}
    options = {k: v for k, v in config.items() if k not in consts}
    return consts, options


def _signature(low, ir, args: Sequence, arg_names: Sequence[str]) -> tuple[dict, dict, dict]:
    """(Triton signature, divisibility attributes, constants) of the generated function's parameters, as the JIT
    would specialize them for ``args`` (tensors or ArgSpecs; an ArgSpec's sizes are unknown: 32-bit, no hint).
    A size or stride equal to 1 becomes the constant 1, as Triton's JIT makes it (a unit stride then costs no
    multiply and no register)."""
    sig, attrs, constants = {}, {}, {}
    for pos, (name, how) in enumerate(zip(arg_names, low.binding, strict=True)):
        kind, i = how[0], how[1]
        param = ir.params[i]
        if kind == "ptr":
            sig[name] = "*" + SIG_DTYPES[param.type.dtype.name]
            attrs[(pos,)] = [["tt.divisibility", DIVISIBILITY]]
        elif kind == "desc":
            sig[name] = f"tensordesc<{SIG_DTYPES[param.type.dtype.name]}{list(how[2])}>"
        elif kind == "scalar":
            # (a float argument of f64 work is an f64 parameter: triton.codegen.Lowered.f64_scalars)
            sig[name] = "i32" if param.type.kind == "index" else "fp64" if i in low.f64_scalars else "fp32"
        else:    # a size or a stride
            value = _int_of(args[i], kind, how[2])
            if value == 1:
                sig[name], constants[(pos,)] = "constexpr", 1
                continue
            sig[name] = "i64" if value is not None and value > INT32_MAX else "i32"
            if value is not None and value % DIVISIBILITY == 0 and value:
                attrs[(pos,)] = [["tt.divisibility", DIVISIBILITY]]
    return sig, attrs, constants


def _int_of(arg, kind: str, axis: int) -> int | None:
    if kind == "dim":
        return int(arg.shape[axis]) if hasattr(arg, "shape") else None
    return int(arg.stride(axis)) if hasattr(arg, "stride") else None


def _cache_dir() -> Path:
    from tilestack.config import knobs
    return knobs.cache_dir / "aot"


def _key(source: str, sig: dict, attrs: dict, options: dict, target: tuple, shared_limit: int) -> str:
    import triton
    blob = json.dumps([FORMAT, source, sig, sorted((str(k), v) for k, v in attrs.items()), sorted(options.items()),
                       list(target), shared_limit, triton.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def resources(kernel, args: Sequence, fixed: dict[str, Any], config: dict[str, Any], *,
              shared_limit: int = 227 * 1024, target: tuple = SM90A, tma: bool = True,
              cache: bool = True, timeout_s: float | None = COMPILE_TIMEOUT_S) -> Resources:
    """Compile ``kernel`` with ``fixed`` constants and ``config`` (its tunables and the backend's options, flat)
    for ``target`` and report its resources (see the module docstring). ``args``: tensors (meta tensors will do:
    only shapes, strides and dtypes are read) or ``tilestack.lang.ArgSpec`` (sizes unknown). ``shared_limit``:
    shared memory per block the device allows (``DeviceKey.shared_bytes``). ``timeout_s``: a compile that takes
    longer (ptxas on a kernel that spills thousands of registers can take minutes) runs in a child process that
    is killed then, and the config is reported as not compiling in time (None: in this process, no limit)."""
    reason = missing_tools()
    if reason:
        raise BackendError(f"aot.resources: cannot compile for {target}: {reason}")
    from tilestack.backends.triton import BACKEND, codegen

    consts, options = _split(kernel, config)
    try:
        traced = kernel.trace(*args, **fixed, **consts)
    except Exception as e:  # noqa: BLE001 - a config the tracer rejects is not a valid config
        return Resources(False, error=f"trace: {type(e).__name__}: {str(e)[:200]}")
    opts = BACKEND.options(traced.constants, options).launch_kwargs()
    from tilestack.backends.triton.launch import compile_mode
    tma, index64 = compile_mode(traced, args, tma)    # the variant a launch on these arguments runs
    low = codegen.generate(traced.ir, interpret=False, tma=tma, index64=index64)
    names = _arg_names(low.source, low.fn_name)
    sig, attrs, constants = _signature(low, traced.ir, args, names)
    key = _key(low.source, sig, attrs, opts, target, shared_limit)
    path = _cache_dir() / f"{key}.json"
    if cache and path.exists():
        try:
            r = Resources(**json.loads(path.read_text()), cached=True)
        except (OSError, ValueError, TypeError) as e:     # truncated, garbage or another shape: compile again
            warnings.warn(f"aot.resources: ignoring the cached report {path} ({type(e).__name__}: {e}); "
                          "compiling again", stacklevel=2)
            r = None
        timed_out = r is not None and (r.error or "").startswith(TIMED_OUT)
        if r is not None and not (timed_out and (timeout_s is None or timeout_s > r.compile_s)):
            return r                     # (a compile cut short is tried again with a longer limit)
    if timeout_s is None:
        r = _compile(low, sig, attrs, constants, opts, target, shared_limit)
    else:
        r = _compile_in_child(low, sig, attrs, constants, opts, target, shared_limit, timeout_s)
    if cache:
        from tilestack.tune.cache import write_json_atomic
        try:
            write_json_atomic(path, r.to_json())
        except OSError as e:             # a read-only cache costs a compile next time, not this report
            warnings.warn(f"aot.resources: report not cached: cannot write {path} ({e}); set TILESTACK_CACHE_DIR "
                          "to a writable folder", stacklevel=2)
    return r


@functools.lru_cache(maxsize=256)
def _arg_names(source: str, fn_name: str) -> tuple[str, ...]:
    m = re.search(rf"def {re.escape(fn_name)}\(([^)]*)\)", source)
    return tuple(a.split(":")[0].strip() for a in m.group(1).split(",") if a.strip()) if m else ()   # (`a: tl.float64`)


@functools.lru_cache(maxsize=256)
def _jit(source: str, fn_name: str):
    from tilestack.backends.triton.launch import compile_source
    return compile_source(source, fn_name, False)


def _compile(low, sig: dict, attrs: dict, constants: dict, opts: dict, target: tuple,
             shared_limit: int) -> Resources:
    import triton
    from triton.backends.compiler import GPUTarget

    warps, stages = opts.get("num_warps"), opts.get("num_stages")
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=_jit(low.source, low.fn_name), signature=sig, constexprs=constants,
                                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget(*target), options=opts)
    except Exception as e:  # noqa: BLE001 - what the compiler says is the report
        msg = " ".join(str(e).split())
        return Resources(False, num_warps=warps, num_stages=stages, compile_s=time.perf_counter() - t0,
                         error=f"compile: {type(e).__name__}: {msg[:300]}")
    seconds = time.perf_counter() - t0
    shared = int(k.metadata.shared)
    regs, spills = _registers(k.asm.get("cubin"))
    ok = shared <= shared_limit
    return Resources(ok, regs, spills, shared, int(k.metadata.num_warps), int(k.metadata.num_stages), seconds,
                     None if ok else f"shared memory {shared} B > the device's {shared_limit} B per block")


def _compile_in_child(low, sig, attrs, constants, opts, target, shared_limit, timeout_s: float) -> Resources:
    """``_compile`` in a forked child of its own process group (ptxas included), killed after ``timeout_s``."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, low, sig, attrs, constants, opts, target, shared_limit),
                        daemon=True)
    t0 = time.perf_counter()
    child.start()
    send.close()
    try:
        if recv.poll(timeout_s):
            return recv.recv()
        return Resources(False, num_warps=opts.get("num_warps"), num_stages=opts.get("num_stages"),
                         compile_s=time.perf_counter() - t0,
                         error=f"{TIMED_OUT} {timeout_s:g} s (killed)")
    except EOFError:
        return Resources(False, compile_s=time.perf_counter() - t0, error="compile: the compiler process died")
    finally:
        if child.is_alive():
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.join()
        recv.close()


def _child(send, low, sig, attrs, constants, opts, target, shared_limit) -> None:
    os.setsid()                 # its own process group: a kill reaches ptxas too
    send.send(_compile(low, sig, attrs, constants, opts, target, shared_limit))
    send.close()


def _registers(cubin: bytes | None) -> tuple[int | None, int | None]:
    """(registers per thread, spilled 32-bit words per thread) from the cubin's resource usage."""
    tool = _cuobjdump()
    if not cubin or tool is None:
        return None, None
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    finally:
        os.unlink(path)
    m = _RES.search(out)
    if not m:
        return None, None
    reg, stack, _, local = map(int, m.groups())
    return reg, (local + stack) // 4
