"""Fuzz round twenty-four, part two: a NaN query row under a causal mask (its NaN reaches the keys it sees, and no
others: dv of later keys finite, as torch's is_causal), through ``tilestack.attention`` and torch's signature
(``tilestack.scaled_dot_product_attention``) with only some inputs requiring grad; the public ops on Triton's
interpreter on inputs of every layout (transposed, offset, zero-stride, channels-last) with every other input
requiring grad, against float64 torch; rotary's double backward (the one op whose backward is differentiable)
with q alone requiring grad. CPU backends; every result starts as NaN (``poisoned_allocations``).

The bugs these found are listed in part one's header (tests/test_fuzz_round24.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.kernels import rotary_tables
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

BACKENDS = ("reference", "triton")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2450 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


# ---- a NaN query row under a causal mask ---------------------------------------------------------------------------
def sdpa64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, enable_gqa: bool) -> torch.Tensor:
    """Float64 top-left causal attention by its definition, row by row: query row i's softmax over keys 0..i alone,
    so a NaN in that row reaches those keys and no others (differentiable, in q's dtype). Not torch's fused CPU
    kernel, which these tests first compared with: it picks its path by the CPU's instruction set, and on AVX-512
    (an AMD EPYC, 2026-12-08) it gave a NaN query row zeros; nor the math backend, whose dense softmax spreads the
    row's NaN over the masked keys too (its dv NaN for every key)."""
    assert is_causal and enable_gqa
    scale = q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    rows = [torch.softmax(q[:, :, i:i + 1] @ k[:, :, :i + 1].transpose(-1, -2) * scale, -1) @ v[:, :, :i + 1]
            for i in range(q.shape[2])]
    return torch.cat(rows, 2)


def _nan_row(nq: int = 6, nk: int = 6, dtype=torch.float32):
    """q, k, v (1, 2, N, 16) / (1, 1, N, 16) with query row 2 of head 1 NaN in one element: that row is NaN, and
    under top-left causal it sees keys 0..2 only."""
    q, k, v = randn(1, 1, 2, nq, 16, dtype=dtype), randn(2, 1, 1, nk, 16, dtype=dtype), randn(3, 1, 1, nk, 16,
                                                                                              dtype=dtype)
    q[0, 1, 2, 5] = math.nan
    return q, k, v


def close_grad(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """dq and dv as the definition's (NaN exactly where it has them); dk of keys 0..2 (those the NaN row sees) too.
    dk of the later keys: where a kernel's block held the NaN row, dS = P * (dP - delta) = 0 * NaN there is NaN
    (as in torch's fused kernel); elsewhere the definition's value, which leaves the row out (never a wrong finite
    number)."""
    if name != "k":
        close(got, want, tol, what)
        return
    close(got[:, :, :3], want[:, :, :3], tol, what + " (keys the NaN row sees)")
    later, apart = got[:, :, 3:], want[:, :, 3:]
    kept = later.isfinite()
    close(later[kept], apart[kept], tol, what + " (later keys)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["qkv", "q", "v", "kv"])
def test_nan_query_row_under_causal_reaches_only_the_keys_it_sees(needs, backend):
    q, k, v = _nan_row()
    got = [t.clone().requires_grad_(n in needs) for n, t in zip("qkv", (q, k, v), strict=True)]
    want = [t.double().requires_grad_(n in needs) for n, t in zip("qkv", (q, k, v), strict=True)]
    g = randn(4, 1, 2, 6, 16)
    with config.override(backend=backend), poisoned_allocations():
        o = tilestack.attention(*got, causal=True)
        o.backward(g)
    o64 = sdpa64(*want, is_causal=True, enable_gqa=True)
    o64.backward(g.double())
    if "v" in needs:
        assert bool(want[2].grad[0, 0, 3:].isfinite().all()), "the case is what it claims: torch's dv finite there"
    close(o, o64, 2e-6, f"o ({backend})")
    for name, a, b in zip("qkv", got, want, strict=True):
        assert (a.grad is None) == (b.grad is None), f"d{name} None where torch's is not, or the reverse"
        if b.grad is not None:
            close_grad(name, a.grad, b.grad, 2e-5, f"d{name} ({backend}, {needs} need grad)")


def test_nan_query_row_through_torchs_signature():
    """tilestack.scaled_dot_product_attention (is_causal, enable_gqa) on the same rows: o and the gradients as the
    definition's, NaN exactly where it has them (dk of later keys: ``close_grad``)."""
    q, k, v = _nan_row()
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    want = [t.double().requires_grad_() for t in (q, k, v)]
    g = randn(5, 1, 2, 6, 16)
    with config.override(backend="reference"), poisoned_allocations():
        o = tilestack.scaled_dot_product_attention(*got, is_causal=True, enable_gqa=True)
        o.backward(g)
    o64 = sdpa64(*want, is_causal=True, enable_gqa=True)
    o64.backward(g.double())
    close(o, o64, 2e-6, "sdpa o")
    for name, a, b in zip("qkv", got, want, strict=True):
        close_grad(name, a.grad, b.grad, 2e-5, f"sdpa d{name}")


@pytest.mark.parametrize("schedule", ["split", "ws"])
def test_nan_query_row_on_the_backward_kernels_in_bf16(schedule):
    """The split kernels and the warp-specialized schedule (bf16, 37 rows and keys, blocks of 16/32) on two NaN
    query rows (2 and 20, head 1): o, dq and dv as float64 torch's (dv of keys 21.. finite), dk of the keys those
    rows see as torch's. dk of the keys they never see: NaN where a block computed with a NaN row makes
    dS = P * (dP - delta) = 0 * NaN (torch's dense dS is NaN there throughout), else the float64 value without
    those rows (a finite number there is never a wrong one)."""
    q, k, v = _nan_row(37, 37, torch.bfloat16)
    q[0, 1, 20, 0] = math.nan
    g = randn(6, 1, 2, 37, 16).bfloat16()
    want = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = sdpa64(*want, is_causal=True, enable_gqa=True)
    o64.backward(g.double())
    k_apart = k.double().requires_grad_()
    sdpa64(q.double().nan_to_num(0.0), k_apart, v.double(), is_causal=True,
                                   enable_gqa=True).backward(g.double())
    cfg = {"dkdv": {"schedule": "ws", "BM": 16, "BN": 32}, "dq": {"schedule": "ws", "BM": 32, "BN": 16}} \
        if schedule == "ws" else {"dkdv": {"BM": 16, "BN": 16}, "dq": {"BM": 16, "BN": 16}}
    with poisoned_allocations():
        o, lse = attention_forward(q, k, v, True, backend="reference")
        dq, dk, dv = attention_backward(q, k, v, o, lse, g, True, backend="reference", config=cfg)
    close(o, o64, 2e-2, f"o ({schedule})")
    close(dq, want[0].grad, 5e-2, f"dq ({schedule})")
    close(dv, want[2].grad, 5e-2, f"dv ({schedule})")
    close(dk[:, :, :21], want[1].grad[:, :, :21], 5e-2, f"dk of the keys the NaN rows see ({schedule})")
    later, apart = dk[:, :, 21:], k_apart.grad[:, :, 21:]
    kept = later.isfinite()                      # NaN where a block shared with a NaN row made 0 * NaN, as torch
    close(later[kept], apart[kept], 5e-2, f"dk of the keys they never see ({schedule})")


# ---- the public ops on Triton's interpreter, every layout, some inputs requiring grad ------------------------------
def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """t's values in a view of another layout (t is (2, 3, 4, 16) or (3, 16)-shaped at its last dims)."""
    if how == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "offset":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        big[..., 3:3 + t.shape[-1]] = t
        return big[..., 3:3 + t.shape[-1]]
    if how == "channels last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.clone()


COS, SIN = rotary_tables(4, 16)


def rotate64(t):
    h = t.shape[-1] // 2
    c, s = COS.double()[None, :, None], SIN.double()[None, :, None]
    return torch.cat((t[..., :h] * c - t[..., h:] * s, t[..., h:] * c + t[..., :h] * s), -1)


W16, B16 = randn(10, 16), randn(11, 16)
LABELS = torch.tensor([3, -100, 0, 15, 7, 7, -100, 1])

# op -> (tilestack's call, float64 torch's, which inputs require grad); x (2, 4, 4, 16), r a second such tensor
TRITON_OPS = {
    "rms_norm": (lambda x, r, w, b: ops.rms_norm(x, w), lambda x, r, w, b: F.rms_norm(x, (16,), w, 1e-6), "xw"),
    "layer_norm w only": (lambda x, r, w, b: ops.layer_norm(x, w, b),
                          lambda x, r, w, b: F.layer_norm(x, (16,), w, b, 1e-5), "w"),
    "add_rms_norm r and w": (lambda x, r, w, b: ops.add_rms_norm(x, r, w)[0] * 2 + ops.add_rms_norm(x, r, w)[1],
                             lambda x, r, w, b: F.rms_norm(x + r, (16,), w, 1e-6) * 2 + (x + r), "rw"),
    "add_layer_norm x and b": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)[0],
                               lambda x, r, w, b: F.layer_norm(x + r, (16,), w, b, 1e-5), "xb"),
    "swiglu": (lambda x, r, w, b: ops.swiglu(x), lambda x, r, w, b: F.silu(x[..., :8]) * x[..., 8:], "x"),
    "rotary q only": (lambda x, r, w, b: ops.rotary(x, r, COS, SIN)[0] + ops.rotary(x, r, COS, SIN)[1],
                      lambda x, r, w, b: rotate64(x) + rotate64(r), "x"),
    "cross-entropy weight only": (
        lambda x, r, w, b: ops.fused_linear_cross_entropy(x.reshape(-1, 16)[:8], r.reshape(-1, 16)[:16], LABELS),
        lambda x, r, w, b: F.cross_entropy(x.reshape(-1, 16)[:8] @ r.reshape(-1, 16)[:16].T, LABELS), "r"),
}


LAYOUTS = ("transposed", "offset", "channels last")


# each op in one layout (Triton's interpreter costs seconds a case), the layouts taken in turn
@pytest.mark.parametrize("op,layout", [(op, LAYOUTS[i % 3]) for i, op in enumerate(TRITON_OPS)])
def test_public_ops_on_triton_in_every_layout_with_some_inputs_requiring_grad(op, layout):
    fn, ref, needs = TRITON_OPS[op]
    x, r = randn(12, 2, 4, 4, 16), randn(13, 2, 4, 4, 16)
    x[0, 0, 0, :3] = torch.tensor([1e30, -1e30, 1e-40])     # huge and subnormal elements in one row
    ins = {"x": x, "r": r, "w": W16, "b": B16}
    got = {n: (_layout(t, layout) if n in "xr" else t.clone()).requires_grad_(n in needs) for n, t in ins.items()}
    want = {n: t.double().requires_grad_(n in needs) for n, t in ins.items()}
    with config.override(backend="triton"), poisoned_allocations():
        y = fn(*got.values())
        g = randn(14, *y.shape)
        (y * g).sum().backward()
    y64 = ref(*want.values())
    (y64 * g.double()).sum().backward()
    close(y, y64, 2e-5, f"{op} on {layout}")
    for n in "xrwb":
        assert (got[n].grad is None) == (want[n].grad is None), f"{op}: d{n} None where torch's is not, or reverse"
        if want[n].grad is not None:
            close(got[n].grad, want[n].grad, 2e-4, f"{op} on {layout}: d{n}")


# ---- rotary's double backward -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_double_backward_with_q_alone_requiring_grad(backend):
    """grad of (rotary(q)^2 summed), made with create_graph, then differentiated again (a Hessian-vector product):
    as float64 torch's for q; k's gradient None, as torch's."""
    q, k = randn(20, 1, 4, 2, 16), randn(21, 1, 4, 1, 16)
    ql, qd = q.clone().requires_grad_(), q.double().requires_grad_()
    kd = k.double()
    u = randn(22, 1, 4, 2, 16)
    with config.override(backend=backend), poisoned_allocations():
        qr, kr = ops.rotary(ql, k, COS, SIN)
        (gq,) = torch.autograd.grad((qr.pow(3) + kr.sum()).sum(), ql, create_graph=True)
        (gq * u).sum().backward()
    (gq64,) = torch.autograd.grad((rotate64(qd).pow(3) + rotate64(kd).sum()).sum(), qd, create_graph=True)
    (gq64 * u.double()).sum().backward()
    close(gq, gq64, 2e-5, f"rotary first derivative ({backend})")
    close(ql.grad, qd.grad, 2e-5, f"rotary second derivative ({backend})")
