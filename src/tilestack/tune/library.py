"""What ``tilestack tune`` tunes: every kernel of the library, as problems with inputs, a reference and a space.

    problems = library_problems(["gemm", "softmax"], ["bfloat16"])    # most valuable first
    work = problems[0].make("cuda")                                   # inputs allocated, reference computed
    work.check(cfg), work.run(cfg)                                    # relative error; one launch

A problem is one table entry: (kernel, signature, size bucket), keyed exactly as the kernel's launch path asks
``launch_config`` for it, with inputs of a size in that bucket. ``TUNERS`` holds one line per kernel: its name
(as given to ``tilestack tune -k``) and the function that lists its problems for a dtype. Sizes on a GPU are
those the library is used and benchmarked at (attention: the FlashAttention-3 grid, 16k tokens of hidden size
2048; GEMM: squares; row kernels: 64M elements, well past L2); ``small=True`` gives tiny ones for Triton's
interpreter on a CPU (tests).

Each problem's first seed is the launch path's own default, so a tuned entry is never slower than what the
library did without it (as measured).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

DTYPES = ("bfloat16", "float16")
TOKENS, HIDDEN = 16 * 1024, 2048              # attention: batch * sequence and heads * head dim (FA3's grid)
SEQS = (4096, 512, 1024, 2048, 8192, 16384)   # the first is each family's anchor: tuned first, seeds the rest
HEAD_DIMS = (128, 64, 256)
SEQS_D256 = (4096,)                           # head dim 256: rarer, and slow to compile
GEMM_SIZES = (4096, 8192, 2048, 1024)
# short-K GEMMs (kernels.gemm.gemm_config's "<dtype>-shortk" signature), (M, K, N) per bucket of the largest dim:
# GPT-2 small's mlp.c_fc at 8 x 1024 tokens
SHORTK_GEMM_SHAPES = ((8192, 768, 3072),)
ROW_ELEMENTS = 1 << 26                        # row kernels: rows x width = 64M elements (128 MiB in bf16)
NORM_WIDTHS = (8192, 1024, 2048, 4096, 16384)
SOFTMAX_WIDTHS = (*NORM_WIDTHS, 32768, 65536)
SWIGLU_WIDTHS = (8192, 2048, 4096, 16384)
CE_VOCABS = (65536, 32768, 131072)            # cross-entropy's vocabulary (GPT-2's 50257 -> 65536)
POISON = float("nan")
# the tables whose launch path launches on the tuned backend (``tune.lookup.take_backend``): the tuner searches
# every backend for these, the default backend alone for the rest (their launch paths read its config only)
BACKEND_CHOICE = frozenset({"gemm", "attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_delta"})

# the tuned domains: narrower than the declared ones where a value never wins on a GPU (tiny tiles); each
# names the kernel's tunables and the Triton backend's launch options it searches (tune.space: their product)
ATTN_FWD = dict(BM=(64, 128), BN=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3, 4))
# the ping-pong forward (kernels.attention_fwd_pingpong) on the Gluon backend: two consumer warpgroups of 64 rows
# (a wgmma's), key blocks and ring stages that fit 227 KiB of shared memory at head dims 64 and 128
ATTN_FWD_PINGPONG = dict(BM=(128,), BN=(64, 128), STAGES=(2, 3))
PINGPONG_BACKENDS = ("gluon",)    # where its schedule exists (Triton's backend drops the roles and turns)
ATTN_BWD = {"delta": dict(BM=(32, 64, 128), num_warps=(4, 8), num_stages=(1,)),
            # KEY_MAJOR (S^T = K Q^T) held at its default until scripts/gpu/probe_attention_bwd.py has timed it:
            # the stored ground truth and tables have no key-major entries
            "dkdv": dict(BM=(32, 64, 128), BN=(32, 64, 128), KEY_MAJOR=(False,), num_warps=(4, 8),
                         num_stages=(1, 2, 3)),
            "dq": dict(BM=(32, 64, 128), BN=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))}
# the warp-specialized backward (kernels.attention_bwd_ws) on the Gluon backend: a consumer warpgroup owns half the
# dK/dV kernel's key block or half the dQ kernel's query block (at least a wgmma's 64 rows)
ATTN_BWD_WS = {"dkdv": dict(BM=(32, 64), BN=(128,), STAGES=(2, 3)),   # BM 128 spills 4 KB at hd128
               "dq": dict(BM=(128,), BN=(64, 128), STAGES=(2, 3))}
WS_BACKENDS = ("gluon",)          # where its roles exist (Triton's backend drops them: a plain kernel)
GEMM = dict(BM=(64, 128, 256), BN=(64, 128, 256), BK=(32, 64, 128), GROUP_M=(8,), num_warps=(4, 8),
            num_stages=(2, 3, 4, 5))
ROWS = dict(BM=(1, 2, 4, 8), num_warps=(2, 4, 8, 16))
SMALL = dict(num_warps=(4,), num_stages=(1,))           # the interpreter: one launch option, tiles vary
LOOPLESS = dict(num_stages=(3,))    # a kernel with no loop has nothing to pipeline: Triton's default, not searched


@dataclasses.dataclass
class Workload:
    """A problem's inputs, allocated once."""
    args: tuple                          # the tile kernel's positional arguments (the space reads the IR)
    run: Callable[[dict], Any]           # one launch with this config
    check: Callable[[dict], float]       # relative error of this config's outputs against the reference
    on: Callable[[str], Workload] | None = None   # the same inputs launched on another backend (None: Triton only)


@dataclasses.dataclass
class Problem:
    kernel: str                          # the table name, as the launch path calls launch_config
    signature: str                       # ... and the signature it builds
    n: int                               # the size whose bucket this tunes
    label: str                           # the shape in words
    tile: Any                            # the tile-language kernel
    fixed: dict                          # its constants that are not tuned (D, causal, ONE_TILE)
    restrict: dict                       # the domains searched
    default: dict                        # the launch path's default (the first seed)
    make: Callable[[str], Workload]      # device -> Workload
    priority: int = 0                    # lower first
    weight: float = 1.0                  # share of the time budget
    # another kernel the launch path can run for this table entry (``schedule``: the config key that selects it,
    # as attention_forward's ``schedule="pingpong"``), searched beside this one on ``backends`` only; the entry
    # keeps whichever is faster, the variant's config carrying its ``schedule``
    variants: tuple[Problem, ...] = ()
    schedule: str | None = None          # set on a variant: the value of its config's ``schedule`` key
    backends: tuple[str, ...] | None = None   # a variant's backends (None: every backend the session searches)

    @property
    def bucket(self) -> int:
        from tilestack.tune.cache import size_bucket
        return size_bucket(self.n)

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.signature} @{self.bucket}" + (f" ({self.schedule})" if self.schedule else "")

    @property
    def search_name(self) -> str:
        """The kernel as the tuner's winners and seeds know it: the table's name, or ``name:schedule`` for a
        variant (another tile kernel, other tunables)."""
        return f"{self.kernel}:{self.schedule}" if self.schedule else self.kernel


def rel_error(out, ref) -> float:
    """Relative L2 error in float64; inf if ``out`` is not finite where ``ref`` is (NaN never passes)."""
    o, r = out.double(), ref.double()
    fin = r.isfinite()
    if not bool(o[fin].isfinite().all()) or not bool((o[~fin] == r[~fin]).all()):
        return math.inf
    return float((o[fin] - r[fin]).norm() / r[fin].norm().clamp_min(1e-30))


def direct(tile, args: tuple, fixed: dict, outputs: tuple[int, ...], expected: tuple, *,
           extra: Callable[[dict], dict] = lambda cfg: {}, backend: str = "triton") -> Workload:
    """A Workload that launches ``tile`` on ``args`` (through ``backend``: Triton's on the GPU, or under its
    interpreter on a CPU) and checks the arguments at ``outputs`` (poisoned first) against ``expected``."""
    def run(cfg):
        tile(*args, **fixed, **extra(cfg), **cfg, backend=backend)

    def check(cfg):
        for i in outputs:
            args[i].fill_(POISON)
        run(cfg)
        return max(rel_error(args[i], ref) for i, ref in zip(outputs, expected, strict=True))

    def on(name: str) -> Workload:
        return direct(tile, args, fixed, outputs, expected, extra=extra, backend=name)

    return Workload(args, run, check, on)


def _module(name: str):
    """A kernel module by name (``tilestack.kernels`` re-exports functions of the same names as modules)."""
    import importlib
    return importlib.import_module(f"tilestack.kernels.{name}")


def _torch_dtype(dtype: str):
    import torch
    return getattr(torch, dtype)


# ---- attention -------------------------------------------------------------------------------------------------
def _attention_shape(N: int, D: int, small: bool) -> tuple[int, int, int]:
    return (1, 2, N) if small else (max(1, TOKENS // N), max(1, HIDDEN // D), N)


def _attention_inputs(dtype: str, B: int, H: int, N: int, D: int, device: str):
    """q, k, v, dO: (B, H, N, D) each."""
    return [_randn((B, H, N, D), _torch_dtype(dtype), device, seed) for seed in range(4)]


def _sdpa(q, k, v, causal, scale):
    import torch
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention_fwd_problems(dtype: str, small: bool = False) -> list[Problem]:
    af = _module("attention_fwd")

    out = []
    dims, seqs = ((64,), (32, 64)) if small else (HEAD_DIMS, SEQS)
    for D in dims:
        for causal in (False, True):
            for N in (SEQS_D256 if D > 128 else seqs):
                B, H, _ = _attention_shape(N, D, small)

                def make(device, B=B, H=H, N=N, D=D, causal=causal, tile=af.attention_fwd_kernel):
                    import torch
                    q, k, v, _ = _attention_inputs(dtype, B, H, N, D, device)
                    scale = 1.0 / math.sqrt(D)
                    o = torch.empty_like(q)
                    lse = torch.empty(B, H, N, dtype=torch.float32, device=device)
                    return direct(tile, (q, k, v, o, lse, scale), dict(D=D, causal=causal),
                                  (3,), (_sdpa(q, k, v, causal, scale),))

                anchor = N == seqs[0]
                plain = Problem(
                    "attention_fwd", af.config_signature(_Dtype(dtype), D, D, causal), N,
                    f"B={B} H={H} N={N} D={D}{' causal' if causal else ''}", af.attention_fwd_kernel,
                    dict(D=D, causal=causal), _restrict(ATTN_FWD, small, BM=(16, 32), BN=(16, 32)),
                    _default(af.default_config(D, causal, "cuda", _torch_dtype(dtype)), small), make,
                    priority=_attention_priority(D, dtype, anchor, 0), weight=_attention_weight(D, dtype, anchor))
                if D <= 128:     # head dim 256: a consumer's accumulator and scores exceed its registers
                    plain.variants = (_pingpong_variant(plain, make, small),)
                out.append(plain)
    return out


def _pingpong_variant(plain: Problem, make, small: bool) -> Problem:
    """The ping-pong forward as a variant of a plain attention_fwd problem: same inputs and reference, its own
    kernel and tunables, searched on the Gluon backend only."""
    from tilestack.kernels.attention_fwd_pingpong import PINGPONG_DEFAULTS
    from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel as tile

    return dataclasses.replace(
        plain, tile=tile, restrict=_restrict(ATTN_FWD_PINGPONG, small, BM=(32,), BN=(16,)),
        default=_default(PINGPONG_DEFAULTS, small),
        make=functools.partial(make, tile=tile), variants=(), schedule="pingpong", backends=PINGPONG_BACKENDS)


class _Dtype:
    """Stands in for a tensor where only its dtype is read (config_signature)."""
    def __init__(self, dtype: str):
        self.dtype = _torch_dtype(dtype)


def _attention_priority(D: int, dtype: str, anchor: bool, offset: int) -> int:
    """Head dims 64 and 128 in bf16 before the rest; each family's anchor size first."""
    rank = 1 if D <= 128 and dtype == "bfloat16" else 3 if D <= 128 else 5
    return rank + offset + (0 if anchor else 1)


def _attention_weight(D: int, dtype: str, anchor: bool) -> float:
    """A family's anchor searches widest (it seeds the other sizes); fp16 and head dim 256 start from bf16's
    winners and matter less."""
    return (4.0 if anchor else 1.0) * (0.5 if dtype != "bfloat16" else 1.0) * (0.5 if D > 128 else 1.0)


def attention_bwd_problems(dtype: str, small: bool = False) -> list[Problem]:
    """dK/dV, dQ and delta, each tuned on its own (independent launches), with the others' defaults."""
    ab = _module("attention_bwd")
    af = _module("attention_fwd")

    out = []
    dims, seqs = ((64,), (32, 64)) if small else (HEAD_DIMS, SEQS)
    for D in dims:
        for causal in (False, True):
            defaults = ab.default_config(D, causal, "cuda", _torch_dtype(dtype))
            for N in (SEQS_D256 if D > 128 else seqs):
                B, H, _ = _attention_shape(N, D, small)
                for part in ("dkdv", "dq", "delta"):
                    make = _bwd_maker(part, dtype, B, H, N, D, causal, small)
                    anchor = N == seqs[0]
                    tile = {"dkdv": ab.attention_bwd_dkdv_kernel, "dq": ab.attention_bwd_dq_kernel,
                            "delta": ab.attention_bwd_delta_kernel}[part]
                    fixed = dict(D=D) if part == "delta" else dict(D=D, causal=causal)
                    shrink = dict(BM=(16, 32)) if part == "delta" else dict(BM=(16, 32), BN=(16, 32))
                    plain = Problem(
                        f"attention_bwd_{part}", af.config_signature(_Dtype(dtype), D, D, causal), N,
                        f"B={B} H={H} N={N} D={D}{' causal' if causal else ''}", tile, fixed,
                        _restrict(ATTN_BWD[part], small, **shrink), _default(defaults[part], small), make,
                        priority=_attention_priority(D, dtype, anchor, 1) + (2 if part == "delta" else 0),
                        weight=_attention_weight(D, dtype, anchor) * (0.25 if part == "delta" else 1.0))
                    if part != "delta" and D <= 128:   # at 256 a consumer's two accumulators exceed its registers
                        plain.variants = (_ws_variant(plain, part, make, small),)
                    out.append(plain)
    return out


def _ws_variant(plain: Problem, part: str, make, small: bool) -> Problem:
    """The warp-specialized kernel of a backward part (dkdv, dq) as a variant of its split problem: same inputs
    and reference, its own kernel and tunables, searched on the Gluon backend only."""
    from tilestack.kernels import attention_bwd_ws as ws

    tile = ws.attention_bwd_dkdv_ws_kernel if part == "dkdv" else ws.attention_bwd_dq_ws_kernel
    shrink = dict(BM=(16,), BN=(32,)) if part == "dkdv" else dict(BM=(32,), BN=(16,))
    return dataclasses.replace(
        plain, tile=tile, restrict=_restrict(ATTN_BWD_WS[part], small, **shrink),
        default=_default(ws.WS_DEFAULTS[part], small), make=functools.partial(make, tile=tile), variants=(),
        schedule="ws", backends=WS_BACKENDS)


def _bwd_maker(part: str, dtype: str, B: int, H: int, N: int, D: int, causal: bool, small: bool):
    def make(device, tile=None):   # tile: another kernel of the part's arguments (its ws variant)
        import torch

        ab = _module("attention_bwd")
        af = _module("attention_fwd")

        q, k, v, do = _attention_inputs(dtype, B, H, N, D, device)
        scale = 1.0 / math.sqrt(D)
        fwd = af.default_config(D, causal, device, q.dtype)
        o, lse = af.attention_forward(q, k, v, causal, scale, **fwd)
        defaults = ab.default_config(D, causal, device if not small else "cpu", q.dtype)
        delta = torch.empty(B, H, N, dtype=torch.float32, device=device)
        if part == "delta":
            expected = (o.float() * do.float()).sum(-1)       # (B, H, N): rowsum(dO * O)
            return direct(ab.attention_bwd_delta_kernel, (o, do, delta), dict(D=D), (2,), (expected,))
        ab.attention_bwd_delta_kernel(o, do, delta, D=D, backend="triton", **defaults["delta"])
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        dq_ref, dk_ref, dv_ref = torch.autograd.grad(_sdpa(qq, kk, vv, causal, scale), (qq, kk, vv), do)
        fixed = dict(D=D, causal=causal)
        if part == "dkdv":
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            return direct(tile or ab.attention_bwd_dkdv_kernel, (q, k, v, do, lse, delta, dk, dv, scale), fixed,
                          (6, 7), (dk_ref, dv_ref))
        dq = torch.empty_like(q)
        return direct(tile or ab.attention_bwd_dq_kernel, (q, k, v, do, lse, delta, dq, scale), fixed, (6,),
                      (dq_ref,))
    return make


# ---- GEMM ---------------------------------------------------------------------------------------------------------
def gemm_problems(dtype: str, small: bool = False) -> list[Problem]:
    gm = _module("gemm")

    out = []
    for i, n in enumerate((48, 80) if small else GEMM_SIZES):
        def make(device, n=n):
            import torch
            a, b = (_randn((n, n), _torch_dtype(dtype), device, seed) for seed in range(2))
            c = torch.empty(n, n, dtype=a.dtype, device=device)
            return direct(gm.gemm_kernel, (a, b, c), {}, (2,), (a.float() @ b.float(),))

        big = i < 2          # the sizes the benchmark bars are set at
        out.append(Problem("gemm", dtype, n, f"{n}x{n}x{n}", gm.gemm_kernel, {},
                           _restrict(GEMM, small, BM=(16, 32), BN=(16, 32), BK=(16, 32)),
                           _default({}, small), make,     # the launch path's default: the declared one
                           priority=(0 if big else 4) + (0 if dtype == "bfloat16" else 2),
                           weight=(3.0 if big else 1.0) * (1.0 if dtype == "bfloat16" else 0.5)))
    for M, K, N in ((48, 16, 80),) if small else SHORTK_GEMM_SHAPES:
        def make_short(device, M=M, K=K, N=N):
            import torch
            a, b = _randn((M, K), _torch_dtype(dtype), device, 0), _randn((K, N), _torch_dtype(dtype), device, 1)
            c = torch.empty(M, N, dtype=a.dtype, device=device)
            return direct(gm.gemm_kernel, (a, b, c), {}, (2,), (a.float() @ b.float(),))

        out.append(Problem("gemm", f"{dtype}-shortk", max(M, K, N), f"{M}x{K}x{N}", gm.gemm_kernel, {},
                           _restrict(GEMM, small, BM=(16, 32), BN=(16, 32), BK=(16, 32)),
                           _default({}, small), make_short, priority=3 + (0 if dtype == "bfloat16" else 2),
                           weight=1.0 if dtype == "bfloat16" else 0.5))
    return out


# ---- the fp8 GEMM (quant.gemm.qgemm_kernel on fp8 activations and weights) ------------------------------------------
# (M, K, N) per bucket of the largest dim: GPT-2 small's qkv projection at 8 x 1024 tokens, a square 4096
FP8_GEMM_SHAPES = ((8192, 768, 2304), (4096, 4096, 4096))
FP8_GEMM = dict(BM=(64, 128, 256), BN=(64, 128, 256), BK=(64, 128), GROUP_M=(8,), num_warps=(4, 8),
                num_stages=(2, 3, 4))


def qgemm_problems(dtype: str, small: bool = False) -> list[Problem]:
    """The fp8 x fp8 GEMM of quantized_linear (signature "float8_e4m3fn", whatever the model's float dtype: its
    problems come with the bfloat16 ones only)."""
    if dtype != "bfloat16":
        return []
    qg = importlib.import_module("tilestack.quant.gemm")
    out = []
    for i, (M, K, N) in enumerate(((48, 40, 80),) if small else FP8_GEMM_SHAPES):
        def make(device, M=M, K=K, N=N):
            import torch
            x = _randn((M, K), torch.bfloat16, device, 0)
            w = _randn((N, K), torch.float32, device, 1) * K**-0.5
            q, s = qg.quantize_weight(w, "fp8")
            x_scale = qg.activation_scale(float(x.abs().max()))
            xq = qg.quantize_activation(x, x_scale)
            y = torch.empty(M, N, dtype=torch.bfloat16, device=device)
            want = (xq.float() @ q.float().T) * (x_scale * s)[None, :]
            return direct(qg.qgemm_kernel, (xq, q, s, s, s, y, x_scale), {}, (5,), (want,))

        out.append(Problem("qgemm", "float8_e4m3fn", max(M, K, N), f"{M}x{K}x{N} fp8", qg.qgemm_kernel, {},
                           _restrict(FP8_GEMM, small, BM=(16, 32), BN=(16, 32), BK=(16, 32)),
                           _default(dict(qg.FP8_CUDA_CONFIG), small), make, priority=5 + i, weight=1.0))
    return out


# ---- row kernels: softmax, layer norm, RMS norm -------------------------------------------------------------------
def _row_problems(kernel: str, tile, widths, dtype: str, small: bool, make_args, fixed: dict | None = None,
                  priority: int = 0) -> list[Problem]:
    """Problems for a kernel over the rows of a (rows, width) tensor, configured like softmax: the whole row in
    one tile up to MAX_ONE_TILE wide (then BN is the row width), else passes of BN-wide tiles. ``fixed``: more
    constants of the kernel, the same for every problem."""
    from tilestack.kernels._checks import next_pow2
    from tilestack.kernels.softmax import MAX_ONE_TILE, row_config

    out = []
    for n in ((40, 300) if small else widths):
        width = next_pow2(n)
        one = width <= MAX_ONE_TILE and not small
        bn = (width,) if one else (128,) if small else (2048, 4096, 8192, 16384)
        rows = 8 if small else max(1, ROW_ELEMENTS // n)

        def make(device, n=n, rows=rows, one=one):
            args, outputs, expected = make_args(rows, n, _torch_dtype(dtype), device)
            return direct(tile, args, dict(fixed or {}, ONE_TILE=one), outputs, expected)

        restrict = dict(ROWS, BN=bn, num_stages=(1,) if one else (1, 2))
        default = {k: v for k, v in row_config(n, "cuda").items() if k != "ONE_TILE"}
        out.append(Problem(kernel, dtype, n, f"{rows}x{n}", tile, dict(fixed or {}, ONE_TILE=one),
                           _restrict(restrict, small, BM=(1, 4), BN=(128,)), _default(default, small), make,
                           priority=priority + (0 if dtype == "bfloat16" else 2), weight=0.5))
    return out


def _randn(shape, dtype, device, seed=0):
    """Standard normal values, the same for a seed on a device (made there: no host copy of a large input)."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def _softmax_args(rows, n, dtype, device):
    import torch
    x = _randn((rows, n), dtype, device)
    return (x, torch.empty_like(x)), (1,), (torch.softmax(x.float(), -1),)


def _layer_norm_args(rows, n, dtype, device, eps=1e-5):
    import torch
    x, w, b = _randn((rows, n), dtype, device), _randn((n,), dtype, device, 1), _randn((n,), dtype, device, 2)
    f32 = dict(dtype=torch.float32, device=device)
    y, mean, rstd = torch.empty_like(x), torch.empty(rows, **f32), torch.empty(rows, **f32)
    xf = x.float()
    ref_mean, ref_var = xf.mean(-1), xf.var(-1, unbiased=False)
    ref = torch.nn.functional.layer_norm(xf, (n,), w.float(), b.float(), eps)
    return (x, w, b, y, mean, rstd, eps), (3, 4, 5), (ref, ref_mean, torch.rsqrt(ref_var + eps))


def _rms_norm_args(rows, n, dtype, device, eps=1e-6):
    import torch
    x, w = _randn((rows, n), dtype, device), _randn((n,), dtype, device, 1)
    y, rstd = torch.empty_like(x), torch.empty(rows, dtype=torch.float32, device=device)
    r = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
    return (x, w, y, rstd, eps), (2, 3), (x.float() * r[:, None] * w.float(), r)


def softmax_problems(dtype: str, small: bool = False) -> list[Problem]:
    from tilestack.kernels.softmax import softmax_kernel
    return _row_problems("softmax", softmax_kernel, SOFTMAX_WIDTHS, dtype, small, _softmax_args)


def layer_norm_problems(dtype: str, small: bool = False) -> list[Problem]:
    from tilestack.kernels.layernorm import layer_norm_kernel
    return _row_problems("layer_norm", layer_norm_kernel, NORM_WIDTHS, dtype, small, _layer_norm_args)


def rms_norm_problems(dtype: str, small: bool = False) -> list[Problem]:
    from tilestack.kernels.rmsnorm import rms_norm_kernel
    return _row_problems("rms_norm", rms_norm_kernel, NORM_WIDTHS, dtype, small, _rms_norm_args)


def _add_norm_args(centered: bool):
    """norm_fwd_kernel's arguments: h = x + r (rounded to x's dtype), then layer norm (centered) or RMS norm."""
    def make_args(rows, n, dtype, device, eps=1e-5):
        import torch
        x, r = _randn((rows, n), dtype, device), _randn((rows, n), dtype, device, 1)
        w, b = _randn((n,), dtype, device, 2), _randn((n,), dtype, device, 3)
        f32 = dict(dtype=torch.float32, device=device)
        y, h, mean, rstd = torch.empty_like(x), torch.empty_like(x), torch.empty(rows, **f32), torch.empty(rows, **f32)
        hf = (x + r).float()                     # (rows, n): the sum as torch rounds it, then in f32
        mu = hf.mean(-1) if centered else torch.zeros(rows, **f32)
        r_std = torch.rsqrt(((hf - mu[:, None]) ** 2).mean(-1) + eps)
        ref = (hf - mu[:, None]) * r_std[:, None] * w.float() + (b.float() if centered else 0.0)
        args = (x, r, w, b if centered else w, y, h, mean if centered else rstd, rstd, eps)
        outputs, expected = ((4, 5, 6, 7), (ref, hf, mu, r_std)) if centered else ((4, 5, 7), (ref, hf, r_std))
        return args, outputs, expected
    return make_args


def add_rms_norm_problems(dtype: str, small: bool = False) -> list[Problem]:
    tile = _module("rmsnorm").norm_fwd_kernel
    return _row_problems("add_rms_norm", tile, NORM_WIDTHS, dtype, small, _add_norm_args(False),
                         dict(CENTERED=False), priority=1)


def add_layer_norm_problems(dtype: str, small: bool = False) -> list[Problem]:
    tile = _module("rmsnorm").norm_fwd_kernel
    return _row_problems("add_layer_norm", tile, NORM_WIDTHS, dtype, small, _add_norm_args(True),
                         dict(CENTERED=True), priority=1)


def _norm_bwd_problems(kernel: str, centered: bool, dtype: str, small: bool) -> list[Problem]:
    """The norm backward (dx, and dw [, db] from per-program partial sums), launched as the library does it
    (``norm_backward``: persistent programs, then the sum of the partials), keyed by the row width."""
    from tilestack.kernels._checks import next_pow2

    lb = _module("layernorm_bwd")
    out = []
    for n in ((40, 300) if small else NORM_WIDTHS):
        width = max(128, next_pow2(n))
        one = width <= lb.MAX_ONE_TILE and not small       # the backward's own limit (it holds more a row)
        rows = 8 if small else max(1, ROW_ELEMENTS // n)

        def make(device, n=n, rows=rows, eps=1e-5):
            import torch
            dt = _torch_dtype(dtype)
            x, dy = _randn((rows, n), dt, device), _randn((rows, n), dt, device, 1)
            w, b = _randn((n,), dt, device, 2), _randn((n,), dt, device, 3)
            xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
            if centered:
                y = torch.nn.functional.layer_norm(xf, (n,), wf, bf, eps)
                grads = torch.autograd.grad(y, (xf, wf, bf), dy.float())
            else:
                y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * wf
                grads = torch.autograd.grad(y, (xf, wf), dy.float())
            xd = x.float()
            mean = xd.mean(-1) if centered else None
            rstd = torch.rsqrt(xd.var(-1, unbiased=False) + eps) if centered else \
                torch.rsqrt(xd.pow(2).mean(-1) + eps)

            def run(cfg):
                return lb.norm_backward(dy, x, w, mean, rstd, centered=centered, backend="triton", config=cfg)

            def check(cfg):
                dx, sums = run(cfg)
                return max(rel_error(got, ref) for got, ref in zip((dx, *sums), grads, strict=True))

            parts = torch.empty(1, n, dtype=torch.float32, device=device)     # (P, N): shapes only, for the IR
            args = (x, w, dy, dy, rstd if mean is None else mean, rstd, torch.empty_like(x), parts, parts)
            return Workload(args, run, check)

        bn = (width,) if one else (128,) if small else (2048, 4096, 8192)
        restrict = dict(BM=(1, 2, 4, 8, 16), BN=bn, num_warps=(4, 8, 16), num_stages=(1,) if one else (1, 2))
        default = {k: v for k, v in lb.bwd_config(n, "cuda", {}).items() if k != "ONE_TILE"}
        out.append(Problem(kernel, dtype, n, f"{rows}x{n}", lb.norm_bwd_kernel, dict(CENTERED=centered, ONE_TILE=one),
                           _restrict(restrict, small, BM=(1, 2), BN=(128,)), _default(default, small), make,
                           priority=1 if dtype == "bfloat16" else 3, weight=0.5))
    return out


def layer_norm_bwd_problems(dtype: str, small: bool = False) -> list[Problem]:
    return _norm_bwd_problems("layer_norm_bwd", True, dtype, small)


def rms_norm_bwd_problems(dtype: str, small: bool = False) -> list[Problem]:
    return _norm_bwd_problems("rms_norm_bwd", False, dtype, small)


# ---- SwiGLU, rotary, cross-entropy --------------------------------------------------------------------------------
def swiglu_problems(dtype: str, small: bool = False) -> list[Problem]:
    """The forward, silu(a) * b over (rows, F); keyed by F."""
    sw = _module("swiglu")

    out = []
    for f in ((40, 72) if small else SWIGLU_WIDTHS):
        rows = 8 if small else ROW_ELEMENTS // f

        def make(device, f=f, rows=rows):
            import torch
            a, b = _randn((rows, f), _torch_dtype(dtype), device), _randn((rows, f), _torch_dtype(dtype), device, 1)
            y = torch.empty_like(a)
            return direct(sw.swiglu_fwd_kernel, (a, b, y), {}, (2,), (sw.reference(a, b).float(),))

        restrict = dict(BM=(1, 2, 4, 8, 16), BN=(256, 512, 1024, 2048), num_warps=(2, 4, 8), **LOOPLESS)
        out.append(Problem("swiglu", dtype, f, f"{rows}x{f}", sw.swiglu_fwd_kernel, {},
                           _restrict(restrict, small, BM=(1, 4), BN=(16, 32)),
                           _default(sw.default_config("cuda"), small), make,
                           priority=1 if dtype == "bfloat16" else 3, weight=0.5))
    return out


def swiglu_bwd_problems(dtype: str, small: bool = False) -> list[Problem]:
    """The backward, (da, db) of silu(a) * b over (rows, F); keyed by F."""
    sw = _module("swiglu")
    out = []
    for f in ((40, 72) if small else SWIGLU_WIDTHS):
        rows = 8 if small else ROW_ELEMENTS // f

        def make(device, f=f, rows=rows):
            import torch
            dt = _torch_dtype(dtype)
            a, b, dy = (_randn((rows, f), dt, device, seed) for seed in range(3))
            af, bf = a.float().requires_grad_(), b.float().requires_grad_()
            ga, gb = torch.autograd.grad(torch.nn.functional.silu(af) * bf, (af, bf), dy.float())
            da, db = torch.empty_like(a), torch.empty_like(b)
            return direct(sw.swiglu_bwd_kernel, (dy, a, b, da, db), {}, (3, 4), (ga, gb))

        restrict = dict(BM=(1, 2, 4, 8, 16), BN=(256, 512, 1024, 2048), num_warps=(2, 4, 8), **LOOPLESS)
        out.append(Problem("swiglu_bwd", dtype, f, f"{rows}x{f}", sw.swiglu_bwd_kernel, {},
                           _restrict(restrict, small, BM=(1, 4), BN=(16, 32)),
                           _default(sw.default_config("cuda"), small), make,
                           priority=1 if dtype == "bfloat16" else 3, weight=0.5))
    return out


def rotary_problems(dtype: str, small: bool = False) -> list[Problem]:
    """q and k of a (B, N, H, D) layout rotated together; keyed by D, sized by H*D + Hkv*D as the launch path
    picks its warps."""
    ro = _module("rotary")
    from tilestack.kernels._checks import next_pow2

    out = []
    for D, H in (((16, 2),) if small else ((128, 16), (64, 12), (128, 32))):
        B, N = (1, 8) if small else (max(1, TOKENS // 2048), 2048)

        def make(device, D=D, H=H, B=B, N=N):
            import torch
            q, k = _randn((B, N, H, D), _torch_dtype(dtype), device), _randn((B, N, H, D), _torch_dtype(dtype),
                                                                             device, 1)
            cos, sin = ro.rotary_tables(N, D, device=device)
            qo, ko = torch.empty_like(q), torch.empty_like(k)
            fixed = dict(HALF=D // 2, BH=next_pow2(H), BHK=next_pow2(H))
            return direct(ro.rotary_kernel, (q, k, cos, sin, qo, ko), fixed, (4, 5),
                          (ro.reference(q, cos, sin).float(), ro.reference(k, cos, sin).float()))

        out.append(Problem("rotary", f"{dtype}-D{D}", 2 * H * D, f"B={B} N={N} H={H} D={D}", ro.rotary_kernel,
                           dict(HALF=D // 2, BH=next_pow2(H), BHK=next_pow2(H)),
                           _restrict(dict(num_warps=(1, 2, 4, 8), **LOOPLESS), small),
                           {"num_warps": 4 if 2 * H * D <= 4096 else 8}, make,
                           priority=2 if dtype == "bfloat16" else 4, weight=0.25))
    return out


def cross_entropy_problems(dtype: str, small: bool = False) -> list[Problem]:
    """The logits-gradient kernel of the fused linear + cross-entropy, over a chunk of (rows, V) logits; keyed by
    the vocabulary size."""
    ce = _module("cross_entropy")

    out = []
    for v in ((300,) if small else CE_VOCABS):
        rows = 8 if small else ce.chunk_rows(1 << 16, v, 2)

        def make(device, v=v, rows=rows):
            import torch
            logits = _randn((rows, v), _torch_dtype(dtype), device)
            g = torch.Generator(device=device).manual_seed(3)
            labels = torch.randint(0, v, (rows,), generator=g, device=device)
            scale = torch.full((rows,), 1.0 / rows, device=device)
            loss = torch.empty(rows, device=device)
            lf = logits.float()
            ref_loss = (torch.logsumexp(lf, -1) - lf.gather(1, labels[:, None])[:, 0]) * scale
            ref_grad = (torch.softmax(lf, -1) - torch.nn.functional.one_hot(labels, v)) * scale[:, None]
            work = logits.clone()                    # the kernel overwrites its logits with their gradient
            cols: dict[int, Any] = {}                # BN -> (BN,) f32 column numbers, as the launch path makes

            def run(cfg):
                bn = cfg["BN"]
                if bn not in cols:
                    cols[bn] = torch.arange(bn, dtype=torch.float32, device=device)
                ce.ce_grad_kernel(work, labels, scale, cols[bn], loss, **cfg, backend="triton")

            def check(cfg):
                work.copy_(logits)
                loss.fill_(POISON)
                run(cfg)
                err = max(rel_error(work, ref_grad), rel_error(loss, ref_loss))
                work.copy_(logits)
                return err

            return Workload((work, labels, scale, torch.arange(128, dtype=torch.float32, device=device), loss),
                            run, check)

        restrict = dict(BM=(1, 2, 4), BN=(1024, 2048, 4096, 8192), num_warps=(4, 8, 16), num_stages=(1, 2))
        if small:
            restrict = dict(BM=(1, 2), BN=(128,), num_warps=(4,), num_stages=(1,))
        out.append(Problem("cross_entropy", dtype, v, f"{rows}x{v}", ce.ce_grad_kernel, {}, restrict,
                           _default(ce.default_config(v, "cuda"), small), make,
                           priority=2 if dtype == "bfloat16" else 4, weight=0.5))
    return out


def _restrict(domains: dict, small: bool, **tiny) -> dict:
    """The GPU domains, or on the interpreter tiny tiles and one launch option."""
    if not small:
        return dict(domains)
    return {k: tiny.get(k, SMALL.get(k, v[:1])) for k, v in domains.items()}


def _default(cfg: dict, small: bool) -> dict:
    """The launch path's default on a GPU (on the interpreter ``library_problems`` picks tiny tiles)."""
    return {} if small else dict(cfg)


# One line per kernel: the name `tilestack tune -k` takes -> its problems for a dtype.
TUNERS: dict[str, Callable[..., list[Problem]]] = {
    "attention_fwd": attention_fwd_problems,
    "attention_bwd": attention_bwd_problems,
    "gemm": gemm_problems,
    "qgemm": qgemm_problems,
    "softmax": softmax_problems,
    "layer_norm": layer_norm_problems,
    "rms_norm": rms_norm_problems,
    "swiglu": swiglu_problems,
    "swiglu_bwd": swiglu_bwd_problems,
    "add_rms_norm": add_rms_norm_problems,
    "add_layer_norm": add_layer_norm_problems,
    "layer_norm_bwd": layer_norm_bwd_problems,
    "rms_norm_bwd": rms_norm_bwd_problems,
    "rotary": rotary_problems,
    "cross_entropy": cross_entropy_problems,
}


def library_problems(kernels=None, dtypes=DTYPES, *, small: bool = False) -> list[Problem]:
    """Every problem of these kernels and dtypes, most valuable first (then in each kernel's own order)."""
    from tilestack.errors import TunableError

    # one name may be given as a str (it was split into letters: kernels ['g', 'e', 'm', 'm'] are not tunable);
    # a name given twice is tuned once (each problem was tuned twice, on half the budget); an empty list names
    # nothing (it tuned every kernel, or no dtype: refused, as None asks for all)
    names = list(dict.fromkeys([kernels] if isinstance(kernels, str) else TUNERS if kernels is None else kernels))
    dtypes = list(dict.fromkeys([dtypes] if isinstance(dtypes, str) else dtypes))
    for what, given, known in (("kernels", names, sorted(TUNERS)), ("dtypes", dtypes, list(DTYPES))):
        if not given:
            raise TunableError(f"tune: {what} is empty; expected some of {known} (or leave it out for all)")
    unknown = [k for k in names if k not in TUNERS]
    if unknown:
        raise TunableError(f"tune: kernels {unknown} are not tunable; expected some of {sorted(TUNERS)}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise TunableError(f"tune: dtypes {bad}; expected some of {DTYPES}")
    problems = [p for name in names for d in dtypes for p in TUNERS[name](d, small)]
    if small:                   # the interpreter: the first of the tiny domains stands for the default
        for p in problems:
            p.default = {k: v[0] for k, v in p.restrict.items()}
    return sorted(problems, key=lambda p: p.priority)          # stable: each kernel's order within a priority
