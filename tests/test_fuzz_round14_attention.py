"""Fuzz round fourteen: masked attention through every path that saves the forward for the backward, against
float64 autograd of ``kernels.attention_fwd.reference`` (tests/_fuzz_round14.py has the draws and the bounds).

The masked kernels keep each query row's max and log2 sum apart (STATS, (2, B, H, Nq) f32) so that a row masked
everywhere by a huge finite fill gets its gradients right; these cases carry them through
- ``tilestack.attention`` in eager mode (its autograd Function and plan), on the reference executor and on
  Triton's interpreter;
- ``torch.compile(..., backend="aot_eager", fullgraph=True)`` of a function calling it (the custom ops
  ``tilestack::attention_fwd`` -> (o, lse, stats) and ``tilestack::attention_bwd(..., stats)``);
- ``attention_forward(..., with_stats=True)`` and ``attention_backward(..., stats=...)`` called directly, whose
  stats are also checked against float64 (row max and log2 sum).
Drawn per case: bool or additive masks (f32 or q's dtype) of every broadcastable shape ((Nq, Nk), (1, 1, Nq, Nk),
(B, 1, Nq, Nk), (1, H, Nq, Nk), (B, H, Nq, Nk), (B, H, 1, Nk) expanded, (1, 1, Nq, 1)) laid out plainly, expanded
with zero strides, as stepped slices or transposed; fills -inf, finfo.min, -1e30, -1e4, 0 and large positive
values, -inf beside them; query rows masked everywhere, rows with one visible key and mixed rows; causal in both
alignments with Nq > Nk and Nq < Nk; GQA; f32, bf16, f16 (fp16's dS scaled before its cast); dropout (the mask
from ``dropout_mask``); a given scale or None; q, k, v as (B, N, H, D) storage now and then. Rows of the reference
that see no key give o = 0 and dq = 0 exactly here; NaN or inf is never allowed where float64 is finite.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import tilestack
from _fuzz_round14 import (
    ABSORBED,
    DTYPES,
    HEAD_DIMS,
    Replay,
    bounds,
    check,
    make_mask,
    pick,
    reference_grads,
    rng_for,
    weights,
)
from tilestack import config
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import (
    LOG2E,
    LOWEST_F32,
    MAX_BIAS,
    attention_forward,
    dropout_mask,
    dropout_rng,
)

EAGER_CASES, COMPILE_CASES, DIRECT_CASES = 44, 20, 32
TRITON_EVERY = 4           # every 4th case on Triton's interpreter (slower per program), the rest on the reference


@dataclasses.dataclass
class Case:
    rep: Replay
    backend: str
    dt: torch.dtype
    q: torch.Tensor        # (B, H, Nq, D), maybe a view of (B, Nq, H, D) storage
    k: torch.Tensor        # (B, Hkv, Nk, D)
    v: torch.Tensor        # (B, Hkv, Nk, Dv)
    do: torch.Tensor       # (B, H, Nq, Dv)
    mask: torch.Tensor | None
    causal: bool
    align: str
    scale: float | None
    p: float
    stream_seed: int
    flags: list[bool]      # which of q, k, v require grad
    transposed: bool       # q, k, v (and their gradients) as views of (B, N, H, D) storage

    @property
    def sm(self) -> float:
        return self.q.shape[-1] ** -0.5 if self.scale is None else self.scale

    def keep(self):
        """The dropout mask the op draws after torch.manual_seed(stream_seed) (None without dropout)."""
        if not self.p:
            return None
        torch.manual_seed(self.stream_seed)
        return dropout_mask(dropout_rng(), self.p, (*self.q.shape[:3], self.k.shape[2]))

    def leaves(self):
        """(leaves, inputs): leaves requiring grad per ``flags``; inputs are them, or (B, H, N, D) views of
        (B, N, H, D) leaves."""
        if self.transposed:
            leaves = [t.transpose(1, 2).contiguous().requires_grad_(f) for t, f in zip(self.qkv, self.flags,
                                                                                          strict=True)]
            return leaves, [t.transpose(1, 2) for t in leaves]
        leaves = [t.clone().requires_grad_(f) for t, f in zip(self.qkv, self.flags, strict=True)]
        return leaves, leaves

    def grads_of(self, leaves):
        return [None if t.grad is None else (t.grad.transpose(1, 2) if self.transposed else t.grad)
                for t in leaves]

    @property
    def qkv(self):
        return self.q, self.k, self.v


def draw(path: str, index: int, request, *, mask_always: bool = False) -> Case:
    rng, rep = rng_for(path, index), Replay(path, index, request)
    backend = "triton" if index % TRITON_EVERY == TRITON_EVERY - 1 else "reference"
    dt = pick(rng, DTYPES)
    Hkv, group = int(pick(rng, (1, 1, 2))), int(pick(rng, (1, 2, 3)))
    B = int(pick(rng, (1, 2)))
    Nq, Nk = int(rng.integers(1, 41)), int(rng.integers(1, 41))
    D = int(pick(rng, HEAD_DIMS))
    Dv = D if rng.random() < 0.5 else int(pick(rng, HEAD_DIMS))
    if backend == "triton":        # the interpreter runs each (B, H) program in Python: few, small ones
        B, Hkv, group, Nq, Nk = 1, 1, min(group, 2), min(Nq, 24), min(Nk, 24)
    H = Hkv * group
    causal = bool(rng.random() < 0.4)
    align = pick(rng, ("top_left", "bottom_right"))
    scale = None if rng.random() < 0.5 else float(rng.uniform(0.05, 0.6))
    p = float(pick(rng, (0.0, 0.0, 0.0, 0.25, 0.5)))
    rep.fields.update(backend=backend, dtype=dt, q=(B, H, Nq, D), kv=(Hkv, Nk, Dv), causal=causal, align=align,
                      scale=scale, dropout=p)
    mask = make_mask(rng, B, H, Nq, Nk, dt, rep) if mask_always or rng.random() < 0.9 else None
    if mask is None:
        rep["mask"] = None
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    q = (torch.randn(B, H, Nq, D, generator=g) * float(pick(rng, (1.0, 2.0)))).to(dt)
    k, v = torch.randn(B, Hkv, Nk, D, generator=g).to(dt), torch.randn(B, Hkv, Nk, Dv, generator=g).to(dt)
    do = (torch.randn(B, H, Nq, Dv, generator=g) * float(pick(rng, (1.0, 1.0, 100.0)))).to(dt)
    if rng.random() < 0.3:         # a stepped upstream gradient
        do = torch.zeros(B, H, Nq, 2 * Dv, dtype=dt)[..., ::2].copy_(do)
    flags = [bool(rng.random() < 0.8) for _ in range(3)]
    if not any(flags):
        flags[int(rng.integers(3))] = True
    transposed = bool(rng.random() < 0.25)
    rep.fields.update(grad="".join("1" if f else "0" for f in flags), transposed=transposed)
    return Case(rep, backend, dt, q, k, v, do, mask, causal, align, scale, p, int(rng.integers(1 << 30)), flags,
                transposed)


def expected(case: Case):
    """(o64, lse64, grads64, o bound, grad bounds) in float64 for the case."""
    keep = case.keep()
    kw = dict(attn_mask=case.mask, causal=case.causal, causal_align=case.align, scale=case.sm,
              dropout_p=case.p, dropout_keep=keep)
    o64, lse64, g64 = reference_grads(case.q, case.k, case.v, case.do, **kw)
    ob, gb = bounds(case.q, case.k, case.v, case.do, o64, g64, case.mask, case.causal, case.align, case.sm, case.dt,
                    keep, case.p)
    return o64, lse64, g64, ob, gb


def verify(case: Case, o, grads) -> None:
    """o and the gradients asked for against float64; the rows that see no key exactly 0 in o and dq."""
    o64, lse64, g64, ob, gb = expected(case)
    rep = case.rep
    check(o, o64, ob, "o", rep, dtype=case.dt)
    empty = torch.isneginf(lse64)                         # (B, H, Nq): rows that see no key
    assert not o.detach()[empty].any(), f"{rep}\n  o: a row that sees no key is not 0"
    for name, flag, g, w, b in zip("qkv", case.flags, grads, g64, gb, strict=True):
        if not flag:
            assert g is None, f"{rep}\n  d{name}: a gradient where none was asked for"
            continue
        check(g, w, b, f"d{name}", rep, dtype=case.dt)
        if name == "q":
            assert not g[empty].any(), f"{rep}\n  dq: a row that sees no key has a nonzero gradient"


# ---- eager tilestack.attention ---------------------------------------------------------------------------------------
def _eager(case: Case):
    leaves, ins = case.leaves()
    with config.override(backend=case.backend):
        torch.manual_seed(case.stream_seed)               # the op draws its dropout stream here
        o = tilestack.attention(*ins, case.causal, case.scale, attn_mask=case.mask, causal_align=case.align,
                                dropout_p=case.p)
        o.backward(case.do)
    return o.detach(), case.grads_of(leaves)


@pytest.mark.parametrize("index", range(EAGER_CASES))
def test_eager(index, request):
    case = draw("eager", index, request)
    o, grads = _eager(case)
    verify(case, o, grads)


# ---- torch.compile (the custom ops) ----------------------------------------------------------------------------------
def _compiled(case: Case, dynamic):
    torch._dynamo.reset()                                  # a fresh graph per case: no recompile limit across cases

    def fn(q, k, v, mask):
        return tilestack.attention(q, k, v, case.causal, case.scale, attn_mask=mask, causal_align=case.align,
                                   dropout_p=case.p)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    leaves, ins = case.leaves()
    with config.override(backend=case.backend):
        torch.manual_seed(case.stream_seed)               # the graph draws its dropout stream from it, as eager
        o = compiled(*ins, case.mask)
        o.backward(case.do)
    return o.detach(), case.grads_of(leaves)


@pytest.mark.parametrize("index", range(COMPILE_CASES))
def test_compiled(index, request):
    case = draw("compile", index, request)
    dynamic = index % 3 == 2                               # symbolic shapes through the ops' fake kernels too
    case.rep["dynamic"] = dynamic
    o, grads = _compiled(case, dynamic)
    verify(case, o, grads)


def test_compiled_dynamic_with_a_float_scale_argument():
    """A float scale passed to the compiled function under dynamic shapes is a SymFloat when traced: the
    argument checks compared it with math.isfinite, which Dynamo cannot trace (fullgraph=True raised
    Unsupported 'torch.* op returned non-Tensor'). Two scales, one graph each time right against float64."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(14)
    q, k, v, do = (torch.randn(1, 2, n, 16, generator=g) for n in (7, 9, 9, 7))
    mask = torch.zeros(7, 9)
    mask[2] = -1e30                                        # a row masked everywhere by a huge finite fill
    compiled = torch.compile(lambda q, k, v, m, s: tilestack.attention(q, k, v, scale=s, attn_mask=m),
                             backend="aot_eager", fullgraph=True, dynamic=True)
    for scale in (0.3, 0.45):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with config.override(backend="reference"):
            o = compiled(*leaves, mask, scale)
            o.backward(do)
        o64, _, g64 = reference_grads(q, k, v, do, attn_mask=mask, scale=scale)
        for name, got, want in zip(("o", "dq", "dk", "dv"), [o.detach()] + [t.grad for t in leaves], [o64, *g64],
                                   strict=True):
            err = (got.double() - want).abs().max().item()
            assert err <= 1e-5 * (1 + want.abs().max().item()), (scale, name, err)


# ---- attention_forward(with_stats=True) + attention_backward(stats=...) ----------------------------------------------
def _direct(case: Case, drop_stats: bool = False):
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) if case.transposed else t for t in case.qkv)
    rng = None
    if case.p:
        torch.manual_seed(case.stream_seed)
        rng = dropout_rng()
    kw = dict(attn_mask=case.mask, causal_align=case.align, dropout_p=case.p, rng=rng, backend=case.backend)
    o, lse, stats = attention_forward(q, k, v, case.causal, case.scale, with_stats=True, **kw)
    grads = attention_backward(q, k, v, o, lse, case.do, case.causal, case.scale,
                               stats=None if drop_stats else stats, **kw)
    return o, lse, stats, grads


def check_stats(case: Case, lse, stats) -> None:
    """The forward's stats against float64: STATS[1] = log2 of the row's sum of exp2(t log2 e - max), the row's
    own count of keys at its max where a huge fill absorbed q.k (in both); STATS[0] the row max t log2 e, except
    where the max bias is past MAX_BIAS (the kernels count it as MAX_BIAS, documented in ``add_bias``); a row
    that sees no key has both at the lowest f32 and lse = -inf."""
    rep = case.rep
    if case.mask is None:
        assert stats is None, f"{rep}\n  stats without a mask"
        return
    assert stats.shape == (2, *case.q.shape[:3]) and stats.dtype == torch.float32, \
        f"{rep}\n  stats {tuple(stats.shape)} {stats.dtype}"
    _, pr, t, b = weights(*case.qkv, case.mask, case.causal, case.align, case.sm)
    seen = (t > -math.inf).any(-1)
    m64 = (t.amax(-1) * LOG2E).masked_fill(~seen, 0.0)
    l2_64 = torch.log2(torch.exp2(t * LOG2E - m64[..., None]).sum(-1))
    none = ~seen
    assert (stats[:, none] == LOWEST_F32).all() and torch.isneginf(lse[none]).all(), \
        f"{rep}\n  a row that sees no key: stats {stats[:, none].unique().tolist()}, lse {lse[none].unique().tolist()}"
    # |t| up to a 65504 or 1e4 fill rounds in f32 (t log2 e, then the row's max subtracted): a few ulp of it
    big = t.abs().masked_fill(~((pr > 0) & (b.abs() < ABSORBED)), 0.0).amax(-1)
    tol_l2 = 1e-4 + 16 * 2.0 ** -24 * big * LOG2E
    err = (stats[1].double() - l2_64).abs()
    assert (err[seen] <= tol_l2[seen]).all(), f"{rep}\n  STATS[1] off by {err[seen].max().item():.3g}"
    clamped = b.masked_fill(torch.isinf(b), 0.0).abs().amax(-1) > MAX_BIAS
    ok = seen & ~clamped
    err_m = (stats[0].double() - m64).abs()
    assert (err_m[ok] <= (1e-4 + 1e-6 * m64.abs())[ok]).all(), \
        f"{rep}\n  STATS[0] off by {err_m[ok].max().item():.3g}"


@pytest.mark.parametrize("index", range(DIRECT_CASES))
def test_direct(index, request):
    case = draw("direct", index, request, mask_always=index % 8 != 0)
    o, lse, stats, grads = _direct(case)
    check_stats(case, lse, stats)
    verify(case, o, [g if f else None for g, f in zip(grads, case.flags, strict=True)])


def test_the_stats_are_what_the_cases_need(request):
    """The same direct cases with the stats dropped from the backward (it then makes them from the lse, as before
    the stats existed): the cases holding a row masked everywhere by a huge finite fill fail, on a gradient, so
    this file would have caught the bug the stats fix. The others still pass (the stats made from the lse are
    right where nothing is absorbed)."""
    failed, passed_huge = [], []
    for index in range(DIRECT_CASES):
        case = draw("direct", index, request, mask_always=index % 8 != 0)
        if case.backend == "triton":
            continue
        m = case.mask
        huge = m is not None and m.dtype != torch.bool and bool(((m <= -ABSORBED) & m.isfinite()).any())
        o, _, _, grads = _direct(case, drop_stats=True)
        try:
            verify(case, o, [g if f else None for g, f in zip(grads, case.flags, strict=True)])
            if huge:
                passed_huge.append(index)
        except AssertionError as e:
            assert huge, f"a case without a huge fill failed without the stats:\n{e}"
            failed.append(str(e))
    assert len(failed) >= 2 and all(" d" in f.splitlines()[-1] for f in failed), failed
