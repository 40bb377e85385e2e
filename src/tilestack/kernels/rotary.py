"""Rotary position embedding (RoPE, the rotate-half form of GPT-NeoX and Llama) of queries and keys in one
launch; the backward is the same rotation by the opposite angle.

    qr, kr = tilestack.kernels.rotary(q, k, cos, sin)              # q: (B, N, H, D), k: (B, N, Hkv, D)
    dq, dk = tilestack.kernels.rotary(dqr, dkr, cos, sin, inverse=True)

cos, sin: (N, D/2) f32, the angles pos * theta**(-2i/D). With x1 = x[..., :D/2] and x2 = x[..., D/2:]:
    out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin      (inverse: the signs of sin flipped)
One program per (position, batch) rotates every query and key head there, reading cos and sin once.
Inputs and outputs may be strided views (a slice of a fused qkv projection in; a (B, H, N, D) buffer seen
as (B, N, H, D) out, so attention reads it without a transpose copy).
"""

from __future__ import annotations

import numpy as np

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import (
    check_out_autograd,
    check_out_not_inference,
    check_same_device,
    check_tensor,
    finite_real,
    next_pow2,
    outputs_apart_check,
)
from tilestack.kernels._plan import checked_once, forward_only, planned
from tilestack.lang.layout import check_writable
from tilestack.tune.lookup import launch_config

MIN_HEAD_DIM = 16     # a half row of 8 bf16 values: the 16 bytes the GPU's tile copies need at least
MAX_HEAD_DIM = 512


def _rotate(X, O, c, s, x1, x2, t, u, o, b, n, inverse: bool) -> None:
    """O[b, n] = X[b, n] rotated: all heads at once, as a (heads, D/2) tile per half."""
    ts.load(x1, X, at=(b, n, 0, 0))             # (BH, HALF): x[..., :D/2]
    ts.load(x2, X, at=(b, n, 0, 1))             # (BH, HALF): x[..., D/2:]
    ts.mul_col(t, x2, s)
    ts.mul_col(x2, x2, c)
    ts.mul_col(u, x1, s)                         # x1 sin
    ts.mul_col(x1, x1, c)
    if inverse:
        ts.add(x1, x1, t)
        ts.sub(x2, x2, u)
    else:
        ts.sub(x1, x1, t)
        ts.add(x2, x2, u)
    ts.copy(o, x1)
    ts.store(O, o, at=(b, n, 0, 0))
    ts.copy(o, x2)
    ts.store(O, o, at=(b, n, 0, 1))


@ts.kernel(grid=lambda Q: (Q.shape[1], Q.shape[0]), options=dict(num_warps=4))
def rotary_kernel(Q, K, Cos, Sin, QO, KO, *, HALF: int, BH: int, BHK: int, INVERSE: bool = False):
    # Q, QO: (B, N, H, 2*HALF); K, KO: (B, N, Hkv, 2*HALF); Cos, Sin: (N, HALF) f32. BH >= H, BHK >= Hkv
    n, b = ts.block_id(0), ts.block_id(1)
    c = ts.RegVec[ts.f32, HALF]()
    s = ts.RegVec[ts.f32, HALF]()
    ts.load(c, Cos, at=(n, 0))
    ts.load(s, Sin, at=(n, 0))
    for X, O, rows in ((Q, QO, BH), (K, KO, BHK)):
        x1 = ts.RegTile[ts.f32, rows, HALF]()
        x2 = ts.RegTile[ts.f32, rows, HALF]()
        t = ts.RegTile[ts.f32, rows, HALF]()
        u = ts.RegTile[ts.f32, rows, HALF]()
        o = ts.RegTile[O.dtype, rows, HALF]()
        _rotate(X, O, c, s, x1, x2, t, u, o, b, n, INVERSE)


def reference(x, cos, sin):
    """Plain PyTorch rotate-half RoPE of x (B, N, H, D) with cos, sin (N, D/2), in f32, returned in x's dtype."""
    import torch

    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


MAX_TABLE_ENTRIES = 1 << 48     # entries of one (n, d/2) rotary table: 1 PiB of f32, past any device's memory


def rotary_tables(n: int, d: int, theta: float = 10000.0, device=None):
    """(cos, sin), each (n, d/2) f32: the angle of position p and frequency i is p * theta**(-2i/d). n an int
    >= 0, d an even int >= 2 (a head dim: its halves rotate together), theta a finite number > 0 (0 or NaN made
    inf and NaN tables, and NaN rotations after them)."""
    import numbers

    import torch

    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not whole(n) or n < 0:
        raise LaunchError(f"rotary_tables: n must be an int >= 0 (a number of positions), got {n!r}")
    if not whole(d) or d < 2 or d % 2:
        raise LaunchError(f"rotary_tables: d must be an even int >= 2 (a head dim), got {d!r}")
    if not finite_real(theta) or theta <= 0:
        raise LaunchError(f"rotary_tables: theta must be a finite number > 0, got {theta!r}")
    n, d, theta = int(n), int(d), float(theta)
    # refused here, not inside torch: a table past MAX_TABLE_ENTRIES failed in arange ("Storage size calculation
    # overflowed"), a device torch cannot name (device="tpu", 3.5) with torch's RuntimeError or TypeError, a CUDA
    # device on a machine without one with torch's AssertionError
    if n * (d // 2) > MAX_TABLE_ENTRIES:
        raise LaunchError(f"rotary_tables: n={n}, d={d} make a table of n * d/2 = {n * (d // 2)} entries; expected "
                          f"at most {MAX_TABLE_ENTRIES} (2**48, more than any device's memory holds)")
    if isinstance(device, bool) or not (device is None or isinstance(device, str | int | torch.device)):
        raise LaunchError(f"rotary_tables: device={device!r:.60} ({type(device).__name__}); expected None, a "
                          "torch.device, a device name ('cpu', 'cuda:0') or a CUDA index")
    try:
        device = None if device is None else torch.device(device)
    except RuntimeError as e:
        raise LaunchError(f"rotary_tables: device={device!r}; expected a device torch knows ('cpu', 'cuda:0'): "
                          f"{e}") from e
    if device is not None and device.type == "cuda":   # (a CPU build of torch raised its bare AssertionError)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise LaunchError(f"rotary_tables: device={str(device)!r}, but this machine has {count} CUDA device(s); "
                              "expected a device present here ('cpu')")
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)   # (d/2,)
    angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]   # (n, d/2)
    return angles.cos().float(), angles.sin().float()


@checked_once
def check_rotary_args(fn: str, q, k, cos, sin, *, differentiable: bool = False) -> None:
    """Every check on rotary's inputs, before any work (once per signature). ``differentiable``: for the op with
    autograd, which gives q and k a gradient and the tables none (a table that requires one is refused)."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor(fn, "q", q, rank=4, dtypes=floats)
    check_tensor(fn, "k", k, rank=4, dtypes=(q.dtype,))
    check_tensor(fn, "cos", cos, rank=2, dtypes=(torch.float32,))
    check_tensor(fn, "sin", sin, rank=2, dtypes=(torch.float32,))
    B, N, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != N or k.shape[3] != D:
        raise LaunchError(f"{fn}: k is {tuple(k.shape)}; expected (B={B}, N={N}, Hkv, D={D}) to match q "
                          f"{tuple(q.shape)}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM or D % 2 or next_pow2(D // 2) != D // 2:     # (17: odd, refused)
        raise LaunchError(f"{fn}: head dim D={D}; expected a power of two in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (N, D // 2):
            raise LaunchError(f"{fn}: {name} is {tuple(t.shape)}; expected (N, D/2) = {(N, D // 2)}")
        if differentiable and t.requires_grad and torch.is_grad_enabled():
            raise LaunchError(f"{fn}: {name} requires grad, and the op gives the cos/sin tables no gradient (only q "
                              "and k); detach it, or call it under torch.no_grad()")
    check_same_device(fn, q=q, k=k, cos=cos, sin=sin)


@planned
@forward_only("rotary", outputs=("q_out", "k_out"))   # a backward through it raises, naming it
def rotary(q, k, cos, sin, *, inverse: bool = False, q_out=None, k_out=None, backend: str | None = None,
           **config):
    """(q, k) rotated by the angles in ``cos``/``sin`` (by minus them if ``inverse``: the backward), into
    ``q_out``/``k_out`` if given (any strides), else new contiguous tensors. Checked and configured once per
    launch signature."""
    import torch

    check_rotary_args("rotary", q, k, cos, sin)
    for name, out, src in (("q_out", q_out, q), ("k_out", k_out, k)):
        if out is not None:
            check_tensor("rotary", name, out, rank=4, dtypes=(src.dtype,))
            if out.shape != src.shape:
                raise LaunchError(f"rotary: {name} is {tuple(out.shape)}; expected {tuple(src.shape)}")
    check_same_device("rotary", q=q, q_out=q_out, k_out=k_out)
    check_out_autograd("rotary", {"q_out": q_out, "k_out": k_out}, {"q": q, "k": k})
    # a bool, not any truthy value: inverse='no' rotated by minus the angle without a word
    if not isinstance(inverse, bool | np.bool_):
        raise LaunchError(f"rotary: inverse={inverse!r} ({type(inverse).__name__}); expected a bool")
    for name, out in (("q_out", q_out), ("k_out", k_out)):
        if out is not None:     # named here as the caller knows it (the kernel's check named its QO / KO)
            check_writable("rotary", name, out)
    rows = q.shape[2] * q.shape[3] + k.shape[2] * k.shape[3]
    cfg = {"num_warps": 4 if rows <= 4096 else 8} if q.device.type == "cuda" else {}
    cfg = launch_config("rotary", f"{str(q.dtype).removeprefix('torch.')}-D{q.shape[3]}", q.device, rows, cfg)

    # q_out may be q itself (an in-place rotation: each element is read before its own store), but not k, whose
    # rows a program may read after storing q's rotation over them (the Triton backend does); nor k_out; nor a
    # shifted view of q (a program stores over rows another program reads: the Triton backend's q_out one position
    # along N past q gave rows rotated twice), and k_out likewise over k
    apart = outputs_apart_check("rotary", "q_out", "k_out")
    q_out_over_q = outputs_apart_check("rotary", "q_out", "q", second_is_input=True, allow_same=True)
    k_out_over_k = outputs_apart_check("rotary", "k_out", "k", second_is_input=True, allow_same=True)
    q_out_apart_from_k = outputs_apart_check("rotary", "q_out", "k", second_is_input=True)
    k_out_apart_from_q = outputs_apart_check("rotary", "k_out", "q", second_is_input=True)
    # nor over the cos / sin tables, which every program reads (the Triton backend's q_out over cos's memory rotated
    # later rows by the angles written there)
    apart_from_tables = [outputs_apart_check("rotary", o, t, second_is_input=True)
                         for o in ("q_out", "k_out") for t in ("cos", "sin")]

    def outputs(q, k, q_out, k_out, cos, sin):
        check_out_not_inference("rotary", q_out=q_out, k_out=k_out)
        apart(q_out, k_out)
        q_out_over_q(q_out, q)
        k_out_over_k(k_out, k)
        q_out_apart_from_k(q_out, k)
        k_out_apart_from_q(k_out, q)
        for check, (out, table) in zip(apart_from_tables, ((q_out, cos), (q_out, sin), (k_out, cos), (k_out, sin)),
                                       strict=True):
            check(out, table)
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out,
                torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out)

    launch = rotary_kernel.launcher_for((q, k, cos, sin, *outputs(q, k, q_out, k_out, cos, sin)), backend,
                                        HALF=q.shape[3] // 2, BH=next_pow2(q.shape[2]), BHK=next_pow2(k.shape[2]),
                                        INVERSE=bool(inverse), **(cfg | config))

    def run(q, k, cos, sin, *, q_out=None, k_out=None, **_):
        q_out, k_out = outputs(q, k, q_out, k_out, cos, sin)
        launch((q, k, cos, sin, q_out, k_out))
        return q_out, k_out
    return run
