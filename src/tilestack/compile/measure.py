"""Measured swap decisions: whether a fused tilestack op beats what Inductor would run instead, timed on the
present GPU at the graph's static shapes, once per device and shape (kept in the user's cache across runs).

    from tilestack.compile import measure
    d = measure.linear_epilogue(x, w, bias, residual, activation, w_is_kn)   # x, w, ...: tensors or fake tensors
    d.pays, d.fused_s, d.unfused_s, d.reason()

The size rule (``tilestack.compile.policy``) says when a swap cannot pay; for a GEMM with a fused epilogue it is not
enough. On the H200 (session 11, GPT-2 small prefill, 8 x 1024 rows) tilestack's GEMM with the GELU fused took
100 us where cuBLAS's GEMM (48 us) and Inductor's separate GELU kernel (35 us) took 83, and the residual forms
lost too: the pass alone made the prefill 5.45 ms against Inductor's 4.54. Whether a fused GEMM wins depends on
the device, the shape and the tuned tables, so it is measured: the fused op against what Inductor runs in its
place, ``torch.addmm`` (cuBLAS, the bias in its epilogue) and one elementwise kernel for the activation and the
residual add (eager runs one kernel per elementwise op where Inductor fuses them into one: the unfused side is
the GEMM's time plus one such pass). A swap is made when the fused op takes at most ``MARGIN`` of that time.

Off a GPU (the CPU runs kernels through Triton's interpreter or the reference backend, whose times say nothing of a
GPU) nothing is measured and the size rule alone decides. The measurements are keyed by the device's name, the
dtype and the shapes, and written atomically to ``<cache_dir>/compile_measure.json`` (an interrupted run loses at
most its own new entries; a corrupt file is measured again, with a warning).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

# The fused op must take <= 80% of the unfused ops' time. A per-op measurement misses what a swap costs the graph
# around it (a custom op's host path, the fusions Inductor loses at its boundary): on the H200 (2026-12-04) the
# fused c_fc + GELU GEMM measured 0.86x cuBLAS + Inductor's GELU per call, and 1.15x faster as a kernel, yet its 12
# swaps made GPT-2 small's compiled prefill 4% slower than Inductor's, timed in alternating rounds in one process
# (scripts/gpu/ab_prefill.py). Below 0.8 the kernel's own gain covers that.
MARGIN = 0.8
BUDGET_S = 0.15          # per side and shape: enough for a few hundred calls of a prefill-sized GEMM
FILE = "compile_measure.json"

_lock = threading.Lock()
_memory: dict[str, dict] = {}        # this process's entries (and the file's, once read)
_loaded = False


@dataclasses.dataclass(frozen=True)
class Decision:
    what: str              # the op and its shapes, as the cache keys it
    fused_s: float         # seconds per call of the fused tilestack op
    unfused_s: float       # seconds per call of what Inductor runs instead
    device: str
    baseline: str = "cuBLAS and a separate epilogue"

    @property
    def pays(self) -> bool:
        return self.fused_s <= MARGIN * self.unfused_s

    def reason(self) -> str:
        return (f"measured on {self.device}: the fused op {self.fused_s * 1e6:.1f} us against {self.baseline} "
                f"{self.unfused_s * 1e6:.1f} us ({self.fused_s / self.unfused_s:.2f}x; a swap needs <= "
                f"{MARGIN:.2f}x)")


def _path() -> Path:
    from tilestack.config import knobs
    return Path(knobs.cache_dir) / FILE


def _usable(entry) -> bool:
    """An entry a Decision can be made of: fused_s and unfused_s finite numbers > 0 (not bools)."""
    import math

    def seconds(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    return isinstance(entry, dict) and seconds(entry.get("fused_s")) and seconds(entry.get("unfused_s"))


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    path = _path()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        usable = {k: v for k, v in data.items() if _usable(v)}
        _memory.update(usable)
        if len(usable) < len(data):            # a hand-edited or foreign file: those swaps are measured again
            warnings.warn(f"tilestack.compile.measure: ignoring {len(data) - len(usable)} entries of {path} whose "
                          "fused_s and unfused_s are not positive numbers; those swaps are measured again",
                          stacklevel=3)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:        # a truncated or foreign file: measure again, say so
        warnings.warn(f"tilestack.compile.measure: ignoring {path} ({e}); swaps are measured again", stacklevel=3)


def _store(key: str, entry: dict) -> None:
    _memory[key] = entry
    path = _path()
    from tilestack.files import write_atomic
    from tilestack.tune.cache import locked
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # read, merge, write under the folder's lock: unlocked, a process that read before another wrote replaced
        # that process's new entries with its own older view of the file
        with locked(path.parent):
            merged = {}
            try:                               # another process may have added entries since this one read
                on_disk = json.loads(path.read_text())
                merged.update({k: v for k, v in on_disk.items() if _usable(v)} if isinstance(on_disk, dict) else {})
            except (OSError, ValueError):
                pass
            merged.update(_memory)
            # its temporaries named "<stem>.<pid>.*.tmp", as before tilestack.files
            write_atomic(path, json.dumps(merged, indent=1, sort_keys=True), tmp_prefix=f"{path.stem}.")
    except OSError as e:                       # a read-only cache costs a measurement next run, not this one
        warnings.warn(f"tilestack.compile.measure: cannot write {path} ({e})", stacklevel=3)


def _time(fn, device) -> float:
    from tilestack.perf.timing import time_fn
    return time_fn(fn, args_sets=[()], device=device, budget_s=BUDGET_S, warmup_s=0.02).median_s


def _real(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """A real tensor of this shape (from a fake tensor of the FX graph), ~N(0, 1) / sqrt(last dim): a GEMM's
    output stays O(1), so no activation saturates and no value is subnormal."""
    shape = tuple(int(s) for s in shape)
    out = torch.randn(shape, generator=gen, dtype=torch.float32)
    return (out / max(shape[-1] if shape else 1, 1) ** 0.5).to(device=device, dtype=dtype)


def linear_epilogue(x, w, bias, residual, activation: str | None, w_is_kn: bool) -> Decision:
    """The fused GEMM (``tilestack::linear_epilogue``) against ``torch.addmm`` and one elementwise pass for
    ``activation`` and ``residual``, at these shapes on x's device (a CUDA device). Cached (see the module)."""
    from tilestack.perf.device import detect

    device = x.device
    k = int(x.shape[-1])
    m = 1
    for s in x.shape[:-1]:
        m *= int(s)
    n = int(w.shape[1] if w_is_kn else w.shape[0])
    name = detect(str(device)).name
    key = (f"{name}|linear_epilogue|{str(x.dtype).removeprefix('torch.')}|M{m} K{k} N{n}|kn={w_is_kn}|"
           f"bias={bias is not None}|act={activation}|residual={residual is not None}")
    with _lock:
        _load()
        hit = _memory.get(key)
        if hit is not None:
            return Decision(key, hit["fused_s"], hit["unfused_s"], name)
        # real tensors and real launches, whatever mode the compile that asks is in (its graph's values are fake)
        with unset_fake_temporarily(), torch.no_grad():
            fused_s, unfused_s, t_gemm = _measure_linear_epilogue(x, w, bias, residual, activation, w_is_kn, m, k,
                                                                  n, device)
        _store(key, {"fused_s": fused_s, "unfused_s": unfused_s, "gemm_s": t_gemm, "device": name,
                     "torch": torch.__version__})
        return Decision(key, fused_s, unfused_s, name)


def _measure_linear_epilogue(x, w, bias, residual, activation, w_is_kn, m, k, n, device):
    """(fused s, unfused s, GEMM s) on real tensors of the graph's shapes: x (M, K), w (N, K) or (K, N)."""
    from tilestack.compile.ops import linear_epilogue_op

    gen = torch.Generator().manual_seed(0)
    xs = _real((m, k), x.dtype, device, gen)
    ws = _real(w.shape, w.dtype, device, gen)
    bs = None if bias is None else _real(bias.shape, bias.dtype, device, gen)
    rs = None if residual is None else _real((m, n), residual.dtype, device, gen)
    act = {None: None, "relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
           "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[activation]
    wt = ws if w_is_kn else ws.t()                         # (K, N)
    bg = None if bs is None else bs.to(xs.dtype)           # addmm takes one dtype

    def gemm():
        return torch.addmm(bg, xs, wt) if bg is not None else xs @ wt

    def fused():
        linear_epilogue_op(xs, ws, bs, rs, activation, w_is_kn)

    def unfused():
        y = gemm()
        if act is not None:
            y = act(y)
        if rs is not None:
            y = y + rs
        return y

    t_gemm = _time(gemm, device)
    passes = (act is not None) + (rs is not None)          # eager's elementwise kernels after the GEMM
    t_pass = max(_time(unfused, device) - t_gemm, 0.0) / max(passes, 1)
    unfused_s = t_gemm + t_pass                            # Inductor: the GEMM, then one fused pass
    fused_s = _time(fused, device)
    return fused_s, unfused_s, t_gemm


def swap(gm, match) -> Decision | None:
    """A swap of an inference graph (attention, a norm, softmax) timed per call, host included (a compiled graph
    that launches faster than the GPU runs hides the host's time; one that does not pays it): the replacement
    (``match.fn``) against the nodes it replaces run as they are, on random inputs of the graph's shapes on its
    device. None when an input is not a tensor of static shape (not measured: the swap is made). The replaced
    nodes run eagerly: one kernel per op where Inductor may fuse several (add + norm), so a fused op that loses
    to them would lose to Inductor too."""
    from tilestack.compile.patterns import value
    from tilestack.compile.rewrite import _fn_args, external_inputs, original_module, random_laid_out_like
    from tilestack.perf.device import detect

    inputs = external_inputs(match)
    fakes = [value(n) for n in inputs]
    if not fakes or not all(isinstance(f, torch.Tensor) for f in fakes) or \
            any(type(d) is not int for f in fakes for d in f.shape):
        return None
    device = fakes[0].device
    name = detect(str(device)).name
    # strides too: the same shapes handed over as a contiguous tensor or a transposed view are two measurements
    shapes = ";".join(f"{str(f.dtype).removeprefix('torch.')}{list(f.shape)}/{list(f.stride())}" for f in fakes)
    key = f"{name}|{match.pattern}|{getattr(match.fn, '__name__', match.fn)}|{shapes}|{match.consts!r}"
    with _lock:
        _load()
        hit = _memory.get(key)
        if hit is not None:
            return Decision(key, hit["fused_s"], hit["unfused_s"], name, "the original ops")
        with unset_fake_temporarily(), torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            real = [random_laid_out_like(f, gen) for f in fakes]   # laid out as the graph hands them over
            original = original_module(gm, match, inputs)
            args = _fn_args(match, dict(zip(inputs, real, strict=True)))
            unfused_s = _time(lambda: original(*real), device)
            fused_s = _time(lambda: match.fn(*args), device)
        _store(key, {"fused_s": fused_s, "unfused_s": unfused_s, "device": name, "torch": torch.__version__})
        return Decision(key, fused_s, unfused_s, name, "the original ops")
