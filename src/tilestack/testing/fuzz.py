"""Seeded fuzzing of the kernel library against float64 PyTorch.

    from tilestack.testing.fuzz import fuzz
    report = fuzz(budget=200, seed=0, device="cpu")      # both CPU backends, alternating
    print(report.summary())                              # problems tried, mismatches, NaN, crashes

    PYTHONPATH=src python scripts/fuzz.py --budget 2000 --device cpu
    PYTHONPATH=src python scripts/fuzz.py --budget 10000 --device cuda

Problem ``i`` of seed ``s`` is drawn from its own generator (``numpy.random.default_rng([s, i])``), so any one
problem is replayed alone with ``--seed s --start i --budget 1``. Each problem picks a kernel (GEMM, softmax,
layer norm, RMS norm, attention forward and backward), ragged or empty shapes, a dtype, a value style
(ordinary, very wide or tiny magnitudes, near the dtype's limits, strongly negative attention scores, masked
entries), non-contiguous operands, and on the CPU alternates the reference executor and Triton's interpreter.
Every output the library allocates starts as NaN (``poisoned_allocations``), as does every ``out=``, so an
element a kernel forgets to write cannot look right.

Outcomes, per problem: ``ok``; ``nan`` (NaN or inf where the float64 result is finite); ``mismatch`` (an error
above the bound below, or a non-finite result that differs from the float64 one); ``crash`` (any exception
from the library on valid input). Bounds are per element and come from the arithmetic each kernel does: the
output's rounding (2 ulp: Triton's interpreter truncates bf16), f32 accumulation over the reduced dimension,
and for attention the rounding of P and dS to the input dtype before the matrix products, all scaled by the
float64 magnitudes that the error can grow from (``|A| @ |B|`` for a GEMM, ``P @ |V|`` for attention, ...).
A real bug (a wrong tile, a missing mask, a stale element) is off by the size of the result, far above them.
Conventions checked: a row that sees no key gives o = 0, lse = -inf and zero gradients (torch's math backend,
FlashAttention); softmax of a row of -inf is NaN (torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np

U32 = 2.0 ** -24          # f32 unit roundoff
TINY32 = 2.0 ** -126      # smallest normal f32: GPUs flush f32 subnormals to zero
EXP2_APPROX = 2.0 ** -21  # relative error of the GPU's exp2 (ex2.approx) and of the f32 rounding around it
KINDS = ("gemm", "softmax", "layer_norm", "rms_norm", "layer_norm_bwd", "rms_norm_bwd", "attention")
STATUSES = ("ok", "mismatch", "nan", "crash")


# ---- the report --------------------------------------------------------------------------------------------------
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


# ---- poisoned allocations --------------------------------------------------------------------------------------
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


# ---- comparison --------------------------------------------------------------------------------------------------
class Mismatch(Exception):
    """An output outside its bound: ``status`` is "nan" or "mismatch"."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


def check(name: str, got, want, tol=None) -> None:
    """``got`` against the float64 ``want`` elementwise: finite where want is finite and within ``tol``; the same
    infinity where want is infinite; NaN where want is NaN. Raises Mismatch naming the worst element."""
    import torch

    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch("mismatch", f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.numel() == 0:
        return
    g = got.detach().double()
    w = want.double().to(g.device)
    # a finite float64 result beyond the output dtype's range is an infinity in that dtype: either the infinity
    # or a finite value within the bound passes (the f32 result may round either way at the edge)
    in_dtype = w.to(got.dtype).double()
    g = torch.where(w.isfinite() & ~in_dtype.isfinite() & (g == in_dtype), w, g)
    fin = w.isfinite()
    bad_nan = fin & ~g.isfinite()
    if bool(bad_nan.any()):
        idx = tuple(int(i) for i in bad_nan.nonzero()[0])
        raise Mismatch("nan", f"{name}{list(idx)} = {float(g[idx])}, expected {float(w[idx])} "
                              f"({int(bad_nan.sum())} of {g.numel()} elements not finite)")
    special = ~fin & ~(g.isnan() & w.isnan()) & (g != w)
    if bool(special.any()):
        idx = tuple(int(i) for i in special.nonzero()[0])
        raise Mismatch("mismatch", f"{name}{list(idx)} = {float(g[idx])}, expected {float(w[idx])}")
    if tol is None:
        return
    err = torch.where(fin, (g - w).abs(), torch.zeros_like(g))
    ratio = err / tol.double().expand_as(err)
    worst = float(ratio.max())
    if worst > 1.0:
        idx = tuple(int(i) for i in (ratio == ratio.max()).nonzero()[0])
        raise Mismatch("mismatch", f"{name}{list(idx)} = {float(g[idx]):.6g}, expected {float(w[idx]):.6g} "
                                   f"(error {float(err[idx]):.3g}, bound {float(tol.expand_as(err)[idx]):.3g}, "
                                   f"{int((ratio > 1).sum())} of {g.numel()} elements over)")


def _eps(dtype) -> float:
    """The spacing of the dtype's numbers at 1: twice its unit roundoff, one truncation step."""
    import torch

    return torch.finfo(dtype).eps


def _atol(dtype) -> float:
    """Absolute slack near zero: f32 subnormals flushed (GPUs), and two steps of the dtype's own subnormals."""
    import torch

    return TINY32 + 2 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps


# ---- random shapes and values ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Profile:
    """Size limits of a run: small on the CPU (interpreted kernels), large on a GPU."""
    gemm: int
    rows: int
    cols: int
    seq: int
    batch: int
    kv_heads: int


PROFILES = {"cpu": Profile(gemm=96, rows=24, cols=700, seq=80, batch=2, kv_heads=2),
            "cuda": Profile(gemm=1500, rows=400, cols=20000, seq=1100, batch=3, kv_heads=4)}
TILES = (16, 32, 64, 128)


def size(rng, hi: int, *, empty: float = 0.03) -> int:
    """1..hi, often next to a tile edge, sometimes 1 and with probability ``empty`` 0."""
    r = rng.random()
    if r < empty:
        return 0
    if r < 0.12:
        return 1
    if r < 0.45:
        tile = int(rng.choice(TILES))
        n = tile * int(rng.integers(1, max(2, hi // tile + 1))) + int(rng.integers(-1, 2))
        return int(min(max(n, 1), hi))
    return int(rng.integers(1, hi + 1))


def log_uniform(rng, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def tensor(rng, shape, dtype, device, *, scale: float = 1.0, loc: float = 0.0):
    """Normal(loc, scale) values rounded to ``dtype``, clipped to its finite range."""
    import torch

    big = torch.finfo(dtype).max
    x = np.clip(loc + scale * rng.standard_normal(shape), -big, big)
    return torch.from_numpy(x).to(device=device, dtype=dtype)


def strided(rng, t, *, transpose_ok: bool = True):
    """``t``'s values in a non-contiguous layout (a transposed copy or a slice of a wider parent), or ``t``."""
    import torch

    r = rng.random()
    if r < 0.7 or t.dim() != 2 or t.numel() == 0:
        return t
    if r < 0.85 and transpose_ok:
        return t.t().contiguous().t()                      # column-major
    parent = torch.zeros(t.shape[0], t.shape[1] + int(rng.integers(1, 9)), dtype=t.dtype, device=t.device)
    view = parent[:, : t.shape[1]]
    view.copy_(t)
    return view                                            # row stride > width


def poisoned_out(rng, shape, dtype, device):
    """None (the library allocates), or a NaN-filled out: contiguous, column-major or a slice of a parent."""
    import torch

    r = rng.random()
    if r < 0.4:
        return None
    if r < 0.8 or len(shape) != 2 or 0 in shape:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    if r < 0.9:
        return torch.full(shape[::-1], math.nan, dtype=dtype, device=device).t()
    return torch.full((shape[0], shape[1] + 3), math.nan, dtype=dtype, device=device)[:, 1: 1 + shape[1]]


def _reduction_steps(n: int) -> float:
    """How many f32 roundings a sum of n terms takes, in the worst order a kernel may use (tiles of 16 summed
    in a tree, then one after another) with a margin: the growth factor of the accumulation bound."""
    return 4.0 * (math.log2(n + 1) + 2.0) + n / 8.0


# ---- kernels: each draws a problem and returns (description, run, expect) ---------------------------------------
# run() calls the library (its exceptions are crashes); expect(outputs) compares them with float64 (Mismatch).
Problem = tuple[str, Callable[[], tuple], Callable[[tuple], None]]


def _row_config(rng, n: int, device_type: str) -> dict:
    """Half the time the automatic config; else small explicit tiles (one tile per row when it fits)."""
    if rng.random() < 0.5:
        return {}
    bn = int(rng.choice((128, 256, 512) if device_type != "cuda" else (128, 1024, 4096)))
    cfg = dict(BM=int(rng.choice((1, 2, 4))), BN=bn, num_warps=4, num_stages=1)
    if bn >= n and rng.random() < 0.5:
        cfg["ONE_TILE"] = True
    return cfg


def gemm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels import gemm

    m, n, k = (size(rng, prof.gemm) for _ in range(3))
    dtype = [torch.bfloat16, torch.float16][int(rng.integers(2))]
    style = str(rng.choice(["normal", "normal", "wide", "tiny", "huge"]))
    limit = torch.finfo(dtype).max / 8          # no product sum may overflow the output
    sa, sb = {"normal": (1.0, 1.0), "tiny": (1e-4, 1e-4),
              "huge": (limit ** 0.5 / 4, limit ** 0.5 / 4),
              "wide": (log_uniform(rng, 1e-3, 1e3), log_uniform(rng, 1e-3, 1e3))}[style]
    if dtype == torch.bfloat16 and style == "tiny":
        sa = sb = 1e-20                          # products near f32's smallest normals
    a, b = tensor(rng, (m, k), dtype, device, scale=sa), tensor(rng, (k, n), dtype, device, scale=sb)
    bound = float((a.double().abs() @ b.double().abs()).max()) if a.numel() and b.numel() else 0.0
    if bound > limit:                            # keep |A| @ |B| inside the dtype's range
        b = (b.double() * (limit / bound / 2)).to(dtype)
    a, b = strided(rng, a), strided(rng, b)
    out = poisoned_out(rng, (m, n), dtype, device)
    cfg = {}
    if rng.random() < 0.5:
        small = (16, 32, 64) if device != "cuda" else (32, 64, 128)
        cfg = dict(BM=int(rng.choice(small)), BN=int(rng.choice(small)), BK=int(rng.choice((16, 32))),
                   GROUP_M=int(rng.choice((1, 4, 8))), num_warps=4, num_stages=1 if device != "cuda" else 3)
    desc = (f"gemm M={m} N={n} K={k} {str(dtype)[6:]} {style} a{tuple(a.stride())} b{tuple(b.stride())} "
            f"out={'alloc' if out is None else tuple(out.stride())} cfg={cfg}")

    def run():
        return (gemm(a, b, out=out, backend=backend, **cfg),)

    def expect(outs):
        (c,) = outs
        if out is not None and c is not out:
            raise Mismatch("mismatch", "gemm returned a tensor other than out=")
        a64, b64 = a.double(), b.double()
        want = a64 @ b64
        growth = (a64.abs() @ b64.abs())
        tol = 2 * _eps(dtype) * want.abs() + 4 * (k + 1) * U32 * growth + (k + 1) * _atol(dtype)
        check("c", c, want, tol)

    return desc, run, expect


def _softmax_input(rng, m, n, dtype, device):
    import torch

    style = str(rng.choice(["normal", "wide", "extreme", "masked", "constant"]))
    big = torch.finfo(dtype).max
    if style == "normal":
        x = tensor(rng, (m, n), dtype, device)
    elif style == "wide":
        x = tensor(rng, (m, n), dtype, device, scale=log_uniform(rng, 1e-3, 1e3 if dtype == torch.float16 else 1e6))
    elif style == "extreme":                      # near the dtype's limits: x * log2(e) would overflow
        x = tensor(rng, (m, n), dtype, device, scale=big / 4, loc=float(rng.choice((-1, 0, 1))) * big / 2)
    elif style == "masked":                      # -inf entries, some rows entirely
        x = tensor(rng, (m, n), dtype, device, scale=3.0)
        x[torch.from_numpy(rng.random((m, n)) < 0.3).to(device)] = -math.inf
        if m:
            x[int(rng.integers(m))] = -math.inf
    else:
        x = torch.full((m, n), float(rng.choice((0.0, 7.5, -big))), dtype=dtype, device=device)
    return style, x


def softmax_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels import softmax

    m, n = size(rng, prof.rows), size(rng, prof.cols)
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
    style, x = _softmax_input(rng, m, n, dtype, device)
    x = strided(rng, x)
    out = poisoned_out(rng, (m, n), dtype, device)
    cfg = _row_config(rng, n, device)
    desc = (f"softmax M={m} N={n} {str(dtype)[6:]} {style} x{tuple(x.stride())} "
            f"out={'alloc' if out is None else tuple(out.stride())} cfg={cfg}")

    def run():
        return (softmax(x, out=out, backend=backend, **cfg),)

    def expect(outs):
        (y,) = outs
        if out is not None and y is not out:
            raise Mismatch("mismatch", "softmax returned a tensor other than out=")
        x64 = x.double()
        want = torch.softmax(x64, dim=-1)
        if want.numel() == 0:
            check("y", y, want)
            return
        shift = (x64 - x64.amax(dim=-1, keepdim=True)).abs().nan_to_num(0.0, 0.0, 0.0)   # |x - max|
        rel = 2 * _eps(dtype) + 4 * (n + 8) * U32 + EXP2_APPROX + 4 * U32 * shift
        check("y", y, want, rel * want.nan_to_num(0.0) + _atol(dtype))

    return desc, run, expect


def _norm_input(rng, m, n, dtype, device):
    import torch

    style = str(rng.choice(["normal", "offset", "wide", "constant"]))
    hi = 1e3 if dtype == torch.float16 else 1e15
    if style == "normal":
        x = tensor(rng, (m, n), dtype, device)
    elif style == "offset":                      # a large mean: cancellation in x - mean
        s = log_uniform(rng, 1e-3, 1.0 if dtype == torch.float16 else 1e3)
        x = tensor(rng, (m, n), dtype, device, scale=s, loc=s * float(rng.choice((-1, 1))) * log_uniform(rng, 1, 1e3))
    elif style == "wide":
        x = tensor(rng, (m, n), dtype, device, scale=log_uniform(rng, 1 / hi, hi))
    else:
        x = torch.full((m, n), float(rng.normal()), dtype=dtype, device=device)
    return style, x


def layer_norm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels import layer_norm

    m, n = size(rng, prof.rows), size(rng, prof.cols)
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
    pdtype = dtype if rng.random() < 0.7 else torch.float32
    style, x = _norm_input(rng, m, n, dtype, device)
    x = strided(rng, x)
    w = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((1.0, 10.0))), loc=1.0)
    b = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((0.0, 1.0, 10.0))))
    eps = float(rng.choice((1e-5, 1e-6, 1e-2)))
    cfg = _row_config(rng, n, device)
    desc = f"layer_norm M={m} N={n} {str(dtype)[6:]} w,b {str(pdtype)[6:]} {style} eps={eps} x{tuple(x.stride())} " \
           f"cfg={cfg}"

    def run():
        return layer_norm(x, w, b, eps, backend=backend, **cfg)

    def expect(outs):
        y, mean, rstd = outs
        x64, w64, b64 = x.double(), w.double(), b.double()
        want = torch.nn.functional.layer_norm(x64, (n,), w64, b64, eps)
        check("y", y, want, None if n == 0 else _layer_norm_tol(x64, w64, b64, want, eps, dtype))
        if n == 0:                               # the statistics of an empty row: only the shapes
            check("mean", mean, torch.zeros(m, dtype=torch.float64))
            return
        mean64 = x64.mean(-1)
        var64 = x64.var(-1, unbiased=False)
        rstd64 = (var64 + eps).rsqrt()
        steps = _reduction_steps(n) * U32
        spread = x64.abs().mean(-1)
        check("mean", mean, mean64, 2 * steps * spread + TINY32)
        check("rstd", rstd, rstd64, rstd64 * (4 * steps + 2 * (steps * spread * rstd64) ** 2) + TINY32)

    return desc, run, expect


def _layer_norm_tol(x64, w64, b64, want, eps, dtype):
    n = x64.shape[1]
    mean = x64.mean(-1, keepdim=True)
    rstd = (x64.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = (x64 - mean) * rstd
    cond = xhat.abs() + mean.abs() * rstd + 1.0            # how far f32 rounding of x and the mean can move xhat
    steps = _reduction_steps(n) * U32
    return 2 * _eps(dtype) * want.abs() + 4 * steps * cond * w64.abs() + 4 * U32 * b64.abs() + _atol(dtype)


def rms_norm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels.rmsnorm import rms_norm

    m, n = size(rng, prof.rows), size(rng, prof.cols)
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
    pdtype = dtype if rng.random() < 0.7 else torch.float32
    style, x = _norm_input(rng, m, n, dtype, device)
    x = strided(rng, x)
    w = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((1.0, 10.0))), loc=1.0)
    eps = float(rng.choice((1e-6, 1e-5, 1e-2)))
    cfg = _row_config(rng, n, device)
    desc = f"rms_norm M={m} N={n} {str(dtype)[6:]} w {str(pdtype)[6:]} {style} eps={eps} x{tuple(x.stride())} " \
           f"cfg={cfg}"

    def run():
        return rms_norm(x, w, eps, backend=backend, **cfg)

    def expect(outs):
        y, rstd = outs
        x64, w64 = x.double(), w.double()
        if n == 0:
            check("y", y, x64)
            if tuple(rstd.shape) != (m,):
                raise Mismatch("mismatch", f"rstd has shape {tuple(rstd.shape)}, expected ({m},)")
            return
        rstd64 = ((x64 * x64).mean(-1, keepdim=True) + eps).rsqrt()
        want = x64 * rstd64 * w64
        steps = _reduction_steps(n) * U32
        tol = 2 * _eps(dtype) * want.abs() + 4 * steps * (x64 * rstd64 * w64).abs() + _atol(dtype)
        check("y", y, want, tol)
        check("rstd", rstd, rstd64[:, 0], 4 * steps * rstd64[:, 0] + TINY32)

    return desc, run, expect


def norm_backward_problem(rng, device: str, backend: str, prof: Profile, *, centered: bool) -> Problem:
    """layer_norm_backward (centered) or rms_norm_backward, from statistics the forward would save (the exact
    ones rounded to f32), with an optional gradient dh that reaches x by another path."""
    import torch

    from tilestack.kernels import layer_norm_backward, rms_norm_backward

    m, n = size(rng, prof.rows), size(rng, prof.cols)
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
    pdtype = dtype if rng.random() < 0.7 else torch.float32
    style, x = _norm_input(rng, m, n, dtype, device)
    x = strided(rng, x)
    w = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((1.0, 10.0))), loc=1.0)
    dy = tensor(rng, (m, n), dtype, device, scale=log_uniform(rng, 1e-3, 1e2 if dtype == torch.float16 else 1e4))
    dh = tensor(rng, (m, n), dtype, device) if rng.random() < 0.3 else None
    eps = float(rng.choice((1e-6, 1e-5, 1e-2)))
    x64 = x.double()
    mean = x64.mean(-1) if centered else torch.zeros(m, dtype=torch.float64, device=device)
    msq = (x64 - mean[:, None]).square().mean(-1) if n else torch.zeros(m, dtype=torch.float64, device=device)
    mean32, rstd32 = mean.float(), (msq + eps).rsqrt().float()
    cfg = _row_config(rng, n, device)
    name = "layer_norm_backward" if centered else "rms_norm_backward"
    desc = (f"{name} M={m} N={n} {str(dtype)[6:]} w {str(pdtype)[6:]} {style} eps={eps} dh={dh is not None} "
            f"x{tuple(x.stride())} cfg={cfg}")

    def run():
        if centered:
            return layer_norm_backward(dy, x, w, mean32, rstd32, dh=dh, backend=backend, **cfg)
        return rms_norm_backward(dy, x, w, rstd32, dh=dh, backend=backend, **cfg)

    def expect(outs):
        r = rstd32.double()[:, None]                             # (M, 1)
        xhat = (x64 - mean32.double()[:, None]) * r if centered else x64 * r
        g = dy.double() * w.double()
        g_xhat = (g * xhat).mean(-1, keepdim=True) if n else torch.zeros_like(r)
        g_mean = g.mean(-1, keepdim=True) if n and centered else torch.zeros_like(r)
        dx64 = r * (g - g_mean - xhat * g_xhat)
        dh64 = torch.zeros_like(dx64) if dh is None else dh.double()
        dx64 = dx64 + dh64
        steps_n = _reduction_steps(n) * U32
        spread = (g.abs().mean(-1, keepdim=True) + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True)) if n \
            else torch.zeros_like(r)
        tol_dx = 2 * _eps(dtype) * (dx64.abs() + dh64.abs()) + 4 * steps_n * r * (g.abs() + spread) + _atol(dtype)
        check("dx", outs[0], dx64, tol_dx)
        steps_m = _reduction_steps(m) * U32
        dys = dy.double()
        sums = [("dw", (dys * xhat).sum(0), (dys * xhat).abs().sum(0))]
        if centered:
            sums.append(("db", dys.sum(0), dys.abs().sum(0)))
        for (label, want, growth), got in zip(sums, outs[1:], strict=True):
            check(label, got, want, 2 * _eps(pdtype) * want.abs() + 4 * steps_m * growth + (m + 1) * _atol(pdtype))

    return desc, run, expect


# ---- attention -----------------------------------------------------------------------------------------------
def attention_capabilities() -> dict:
    """What the attention functions accept today, found by asking them (their argument checks run before any
    work; the probes are tiny and run on the reference executor)."""
    import torch

    from tilestack.errors import LaunchError
    from tilestack.kernels import attention_fwd

    fwd = attention_fwd.attention_forward
    params = inspect.signature(fwd).parameters

    def accepts(dtype=torch.bfloat16, d=16, dv=None, **kw) -> bool:
        q = torch.zeros(1, 1, 1, d, dtype=dtype)
        v = torch.zeros(1, 1, 1, dv or d, dtype=dtype)
        try:
            fwd(q, q, v, backend="reference", **kw)
        except (LaunchError, TypeError):
            return False
        return True

    dims = [d for d in (1, 5, 16, 24, 32, 40, 64, 72, 96, 128, 160, 192, 256) if accepts(d=d)]
    op_params = inspect.signature(_attention_op()).parameters
    return dict(
        dtypes=[str(t)[6:] for t in (torch.bfloat16, torch.float16, torch.float32) if accepts(dtype=t)],
        head_dims=dims,
        dv_differs=accepts(d=16, dv=32),
        causal_align=[a for a in ("top_left", "bottom_right") if "causal_align" in params
                      and accepts(causal=True, causal_align=a)],
        attn_mask="attn_mask" in params and accepts(attn_mask=torch.ones(1, 1, dtype=torch.bool)),
        op_params=sorted(op_params))


def _attention_op():
    import tilestack

    return tilestack.attention


def attention64(q, k, v, do, *, causal: bool, align: str, scale: float, mask):
    """float64 attention and its gradients: (o, lse, dq, dk, dv, P, dS-magnitude, logits) with rows that see no
    key giving o = 0, lse = -inf and zero gradients. ``mask``: None, bool (True = attend) or an additive bias."""
    import torch

    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv if Hkv else 1
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    do64 = do.double()
    s = (q64 @ k64.transpose(-1, -2)) * scale                      # (B, H, Nq, Nk), natural units
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        shift = Nk - Nq if align == "bottom_right" else 0
        r = torch.arange(Nq, device=q.device)[:, None]
        c = torch.arange(Nk, device=q.device)[None, :]
        s = s.masked_fill(c > r + shift, -math.inf)
    lse = torch.logsumexp(s, dim=-1) if Nk else torch.full((B, H, Nq), -math.inf, dtype=torch.float64,
                                                           device=q.device)
    seen = lse.isfinite()[..., None]
    p = torch.where(seen, torch.exp(s - torch.where(seen, lse[..., None], 0.0)), 0.0)
    o = p @ v64
    dp = do64 @ v64.transpose(-1, -2)
    delta = (do64 * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * ds @ k64
    dk = scale * ds.transpose(-1, -2) @ q64
    dv = p.transpose(-1, -2) @ do64

    def fold(t):                                              # GQA: sum the query heads of each K/V head
        return t.reshape(B, Hkv, group, Nk, t.shape[-1]).sum(2)

    return o, lse, dq, fold(dk), fold(dv), p, dp - delta, s


def attention_problem(rng, device: str, backend: str, prof: Profile, caps: dict) -> Problem:
    import torch

    from tilestack.kernels.attention_bwd import attention_backward
    from tilestack.kernels.attention_fwd import attention_forward

    B = int(rng.integers(1, prof.batch + 1))
    Hkv = int(rng.integers(1, prof.kv_heads + 1))
    H = Hkv * int(rng.choice((1, 1, 2, 3)))
    r = rng.random()
    if r < 0.02:                                 # empty batches and head counts launch nothing
        B = 0
    elif r < 0.04:
        H = Hkv = 0
    Nq, Nk = size(rng, prof.seq, empty=0.04), size(rng, prof.seq, empty=0.06)
    dims = caps["head_dims"]
    small = [d for d in dims if d <= 64] or dims
    D = int(rng.choice(small if device != "cuda" and rng.random() < 0.8 else dims))
    Dv = int(rng.choice(dims)) if caps["dv_differs"] and rng.random() < 0.2 else D
    if device != "cuda" and max(D, Dv) > 64:
        Nq, Nk = min(Nq, 40), min(Nk, 40)        # the interpreter's time grows with the head dim
    dtype = getattr(torch, str(rng.choice(caps["dtypes"])))
    causal = bool(rng.random() < 0.5)
    align = str(rng.choice(caps["causal_align"])) if causal and caps["causal_align"] else "top_left"
    scale = None if rng.random() < 0.6 else log_uniform(rng, 0.02, 2.0)
    eff_scale = 1 / math.sqrt(D) if scale is None else scale
    style = str(rng.choice(["normal", "normal", "wide", "negative", "peaked", "big_v"]))
    q = tensor(rng, (B, H, Nq, D), dtype, device)
    k = tensor(rng, (B, Hkv, Nk, D), dtype, device)
    v = tensor(rng, (B, Hkv, Nk, Dv), dtype, device)
    if style == "wide":
        q = (q.double() * log_uniform(rng, 1e-3, 30)).to(dtype)
        k = (k.double() * log_uniform(rng, 1e-3, 30)).to(dtype)
    elif style == "negative":                    # every score of a row strongly negative (dQ overflowed here)
        target = float(rng.choice((20.0, 90.0, 400.0, 3000.0)))
        q = (1 + 0.1 * q.double().abs()).to(dtype)
        k = (-(target / (eff_scale * D)) * (1 + 0.1 * k.double().abs())).to(dtype)
    elif style == "peaked":                      # near one-hot rows
        q, k = (q.double() * 4).to(dtype), (k.double() * 4).to(dtype)
    elif style == "big_v":
        v = (v.double() * (1e3 if dtype == torch.float16 else 1e6)).to(dtype)
    do = tensor(rng, (B, H, Nq, Dv), dtype, device)
    mask_kind = "none"
    mask = None
    if caps["attn_mask"] and rng.random() < 0.3:
        mask_kind = str(rng.choice(["bool", "bias"]))
        shape = [B if rng.random() < 0.5 else 1, H if rng.random() < 0.5 else 1, Nq, Nk]
        if rng.random() < 0.3:
            shape = shape[2:]
        if mask_kind == "bool":
            mask = torch.from_numpy(rng.random(shape) < 0.8).to(device)
        else:
            mask = tensor(rng, shape, [torch.float32, dtype][int(rng.integers(2))], device,
                          scale=float(rng.choice((1.0, 30.0))))
    backward = bool(rng.random() < 0.6)
    op_ok = ((mask is None or "attn_mask" in caps["op_params"])
             and (not causal or align == "top_left" or "causal_align" in caps["op_params"]))
    path = "op" if op_ok and rng.random() < 0.25 else "kernels"
    desc = (f"attention B={B} H={H} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {str(dtype)[6:]} "
            f"causal={causal}{'/' + align if causal else ''} scale={scale} {style} mask={mask_kind}"
            f"{tuple(mask.shape) if mask is not None else ''} {'fwd+bwd' if backward else 'fwd'} via {path}")
    extra = {}
    if causal and align != "top_left":
        extra["causal_align"] = align

    def run():
        if path == "op":                         # tilestack.attention: autograd, on the backend the knob names
            from tilestack.config import override

            leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
            op_kw = extra if mask is None else dict(extra, attn_mask=mask)
            with torch.enable_grad(), override(backend=backend):
                o = _attention_op()(*leaves, causal=causal, scale=scale, **op_kw)
                if not backward:
                    return o.detach(), None, None, None, None
                o.backward(do)
            return (o.detach(), None, *(t.grad for t in leaves))
        kw = dict(backend=backend, **extra)
        if mask is not None:
            kw["attn_mask"] = mask
        o, lse = attention_forward(q, k, v, causal, scale, **kw)
        if not backward:
            return o, lse, None, None, None
        return (o, lse, *attention_backward(q, k, v, o, lse, do, causal, scale, **kw))

    def expect(outs):
        o, lse, dq, dk, dv = outs
        mask64 = None if mask is None else mask.expand(B, H, Nq, Nk)
        o64, lse64, dq64, dk64, dv64, p, dpd, s = attention64(q, k, v, do, causal=causal, align=align,
                                                                scale=eff_scale, mask=mask64)
        eps_in = _eps(dtype) if dtype != torch.float32 else 2.0 ** -10   # fp32 products may run as tf32
        u_s = U32 if dtype != torch.float32 else 2.0 ** -11
        seen = s.isfinite()
        # a score's rounding error grows with sum |q_d k_d| (tf32 products, f32 sums), not with |s|, plus the bias
        smax = 0.0
        if s.numel():
            q_abs, kk_abs = q.double().abs(), k.double().abs().repeat_interleave(H // Hkv, 1)
            magnitude = eff_scale * (q_abs @ kk_abs.transpose(-1, -2)) + (s - eff_scale * (
                q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2))).abs()
            smax = float(torch.where(seen, magnitude, 0.0).amax())
        lse_mag = float(torch.where(lse64.isfinite(), lse64.abs(), 0.0).amax()) if lse64.numel() else 0.0
        k_err = accumulation_error(D, smax)
        rel_p = 4 * (eps_in + u_s * 4 * (smax + lse_mag) + k_err + EXP2_APPROX)   # rounding of P (and dS) per element
        out_eps = 2 * _eps(dtype)
        atol = _atol(dtype)

        # P and dS are rounded to the input dtype: relative error rel_p, and near zero an absolute error of the
        # dtype's subnormal step (fp16: 6e-8) or f32's smallest normal (flushed on GPUs), on every visible score
        sub = _atol(dtype)
        vis = seen.double()
        group = H // Hkv if Hkv else 1
        v_abs = v.double().abs().repeat_interleave(group, 1)
        check("o", o, o64, (rel_p * p + sub * vis) @ v_abs + out_eps * o64.abs() + atol)
        if lse is not None:
            check("lse", lse, lse64, 8 * u_s * (smax + lse_mag) + k_err + 4 * U32 * lse64.abs().nan_to_num(0, 0, 0)
                  + 1e-6)
        if dq is None:
            return
        k_abs = k.double().abs().repeat_interleave(group, 1)
        # dS = P (dP - delta): P carries rel_p, and delta = rowsum(dO O) is taken from the forward's O rounded
        # to the input dtype, off by up to eps_in * rowsum(|dO| |O|) whatever P is
        d_delta = 2 * eps_in * (do.double().abs() * o64.abs()).sum(-1, keepdim=True)
        ds_err = p * (rel_p * dpd.abs() + 4 * d_delta) + 2 * sub * vis * (dpd.abs() + 1)
        for name, got, want, bound in (
                ("dq", dq, dq64, eff_scale * ds_err @ k_abs),
                ("dk", dk, dk64, _fold(eff_scale * ds_err.transpose(-1, -2) @ q.double().abs(), Hkv, group)),
                ("dv", dv, dv64, _fold((rel_p * p + sub * vis).transpose(-1, -2) @ do.double().abs(), Hkv, group))):
            check(name, got, want, bound + out_eps * want.abs() + atol)

    return desc, run, expect


TENSOR_CORE_K = 16   # products a tensor-core step (mma/wgmma, 16-bit inputs) sums before adding to the f32 accumulator


def accumulation_error(D: int, smax: float) -> float:
    """Bound on what a tensor-core dot of depth ``D`` adds to a score's error: one f32 rounding per k-step into an
    accumulator that reaches ``smax`` (max over visible scores of scale * sum_d |q_d k_d|, plus the bias).

    It grows with the head dim, not its square root: the accumulator's roundings need not cancel. On the H200,
    D = 256 fp16 scores of magnitude ~3,500 (all products of one sign) came out about 15 units of f32 roundoff
    times smax off (fuzz problems 1446, 2263, 7671 and 9475 of seed 0), past a bound without this term."""
    return math.ceil(D / TENSOR_CORE_K) * U32 * smax


def _fold(t, Hkv: int, group: int):
    B, _, N, D = t.shape
    return t.reshape(B, Hkv, group, N, D).sum(2)


# ---- the driver ----------------------------------------------------------------------------------------------
def default_backends(device: str) -> tuple[str, ...]:
    """Both CPU backends on a CPU (the reference executor and Triton's interpreter); Triton on a GPU."""
    return ("reference", "triton") if device == "cpu" else ("triton",)


def draw(index: int, seed: int, device: str, backends: Sequence[str], caps: dict,
         kinds: Sequence[str] = KINDS) -> tuple[str, str, Problem]:
    """Problem ``index`` of ``seed``: (kind, backend, problem), the same on every run."""
    rng = np.random.default_rng([seed, index])
    weights = np.array([{"attention": 3.0, "gemm": 2.0, "layer_norm_bwd": 1.0, "rms_norm_bwd": 1.0}.get(k, 1.5)
                        for k in kinds])
    kind = str(rng.choice(list(kinds), p=weights / weights.sum()))
    backend = backends[index % len(backends)]
    prof = PROFILES["cuda" if device == "cuda" else "cpu"]
    if kind == "attention":
        return kind, backend, attention_problem(rng, device, backend, prof, caps)
    maker = {"gemm": gemm_problem, "softmax": softmax_problem, "layer_norm": layer_norm_problem,
             "rms_norm": rms_norm_problem,
             "layer_norm_bwd": functools.partial(norm_backward_problem, centered=True),
             "rms_norm_bwd": functools.partial(norm_backward_problem, centered=False)}[kind]
    return kind, backend, maker(rng, device, backend, prof)


def fuzz(budget: int, seed: int = 0, device: str = "cpu", backends: Sequence[str] | None = None, *,
         start: int = 0, kinds: Sequence[str] = KINDS, time_limit: float | None = None,
         progress: Callable[[Outcome], None] | None = None, shard: tuple[int, int] = (0, 1)) -> Report:
    """Run problems ``start .. start + budget - 1`` of ``seed``; stop early after ``time_limit`` seconds.
    ``shard=(w, n)`` runs only every n-th of them, from the w-th: n processes share one budget that way."""
    import torch

    backends = tuple(backends or default_backends(device))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"fuzz: unknown kinds {sorted(unknown)}; expected some of {KINDS}")
    caps = attention_capabilities() if "attention" in kinds else {}
    report = Report(seed, device, backends, capabilities=caps)
    t0 = time.perf_counter()
    w, n = shard
    if not 0 <= w < n:
        raise ValueError(f"fuzz: shard must be (w, n) with 0 <= w < n; got {shard!r}")
    report.next_index = start + budget
    for index in range(start + w, start + budget, n):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            report.next_index = index
            break
        kind, backend, (desc, run, expect) = draw(index, seed, device, backends, caps, kinds)
        status, detail = "ok", ""
        try:
            # numpy's overflow warnings from the interpreters are expected with extreme values; results are checked
            with poisoned_allocations(), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                outs = run()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:   # the library failed on valid input: a crash, whatever the exception
            status = "crash"
            where = traceback.extract_tb(e.__traceback__)[-1]
            detail = f"{type(e).__name__}: {str(e)[:300]} (at {where.filename.split('/')[-1]}:{where.lineno})"
        else:
            try:
                expect(outs)
            except Mismatch as m:
                status, detail = m.status, str(m)
            except Exception as e:    # the fuzzer's own check failed: recorded, so the run (and its worker) goes on
                where = traceback.extract_tb(e.__traceback__)[-1]
                status, detail = "crash", (f"in the check, not the library: {type(e).__name__}: {str(e)[:300]} "
                                           f"(at {where.filename.split('/')[-1]}:{where.lineno})")
        outcome = Outcome(index, kind, backend, status, desc, detail)
        report.outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    report.seconds = time.perf_counter() - t0
    return report
