"""Fuzz round thirteen, part three: the ops composed, end to end, against the same chain in float64 torch
(tests/_fuzz_round13.py says what is shared).

A transformer block's chain, forward and backward (``test_block_chain``): norm (RMS or layer, f32 weights under
bf16/f16 activations now and then) -> linear (torch's, in the activations' dtype) -> SwiGLU -> linear to q, k, v
-> rotary -> attention (causal, GQA) -> add + RMS norm with the residual stream -> fused linear + cross-entropy;
the loss and every leaf's gradient (x, the norm weights, the projections, the LM head) against float64 autograd
of the same chain written with torch's functions, with an upstream loss gradient of 1, 1e-4 or 1e4 (a loss
scale). The forward-only chain (``test_gemm_epilogue_chain``): norm -> gemm with a fused bias + activation
epilogue (bias and residual of other dtypes, into a NaN-poisoned ``out=`` view) -> SwiGLU (into ``out=``) ->
gemm -> softmax (into ``out=``).

Bound, per result: max |ours - float64| <= 4 max |torch's same chain in the same dtype - float64| + TOL max
|float64| (torch's own low-precision chain is the yardstick of what rounding in that dtype costs); no NaN where
float64 has none, and a poisoned out= written everywhere inside its view and nowhere outside.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from _fuzz_round13 import (
    DTYPES,
    TOL,
    Replay,
    backend_for,
    pick,
    poisoned,
    rng_for,
    size,
    untouched_outside,
)
from tilestack.torch import ops

BLOCK_CASES, GEMM_CHAIN_CASES = 10, 10


def _close(rep, what, got, want, yard) -> None:
    """max |got - want| within 4 max |yard - want| + TOL max |want| (got's dtype), no NaN where want has none."""
    got, want, yard = got.double(), want.double(), yard.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{rep}\n  {what}: NaN where float64 has none (or the reverse)"
    ok = ~want.isnan()
    err, scale = (got - want)[ok].abs().max().item(), want[ok].abs().max().item()
    ref = (yard - want)[ok].abs().nan_to_num(math.inf).max().item()
    tol = TOL[torch.bfloat16 if rep.fields["dtype"] != torch.float32 else torch.float32]
    if rep.fields["dtype"] == torch.float16:
        tol = TOL[torch.float16]
    bound = 4 * ref + tol * scale
    assert err <= bound, f"{rep}\n  {what}: max error {err:.3g} > bound {bound:.3g} (torch's own: {ref:.3g}, " \
                         f"scale {scale:.3g})"


def _rot(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    c, s = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


@pytest.mark.parametrize("index", range(BLOCK_CASES))
def test_block_chain(index, request):
    rng, rep = rng_for("chain", index), Replay("chain", index, request, every=10)
    dt = pick(rng, DTYPES)
    wdt = dt if rng.random() < 0.5 else torch.float32                # norm weights in f32 under bf16 now and then
    B, N = int(pick(rng, (1, 2, 3))), size(rng, 33)
    Hkv, groups, D = int(pick(rng, (1, 2))), int(pick(rng, (1, 3))), int(pick(rng, (16, 32)))
    if backend_for(index, 10) == "triton":
        B, N, Hkv, groups = 1, min(N, 17), 1, min(groups, 2)
    H = Hkv * groups
    d, f, V = H * D, size(rng, 65), size(rng, 257)
    centered = bool(rng.random() < 0.5)
    dloss = float(pick(rng, (1.0, 1e-4, 1e4)))
    rep.fields.update(dtype=dt, weight=wdt, B=B, N=N, H=H, Hkv=Hkv, D=D, f=f, V=V, layer_norm=centered, dloss=dloss)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    params = {"x": torch.randn(B, N, d, generator=g, dtype=torch.float64),
              "w1": torch.randn(d, generator=g, dtype=torch.float64) * 0.2 + 1,
              "b1": torch.randn(d, generator=g, dtype=torch.float64) * 0.1,
              "up": torch.randn(2 * f, d, generator=g, dtype=torch.float64) / math.sqrt(d),
              "qkv": torch.randn((H + 2 * Hkv) * D, f, generator=g, dtype=torch.float64) / math.sqrt(f),
              "w2": torch.randn(d, generator=g, dtype=torch.float64) * 0.2 + 1,
              "head": torch.randn(V, d, generator=g, dtype=torch.float64) / math.sqrt(d)}
    dtypes = {n: (wdt if n in ("w1", "b1", "w2") else dt) for n in params}
    labels = torch.randint(0, V, (B * N,), generator=g)
    labels[torch.rand(B * N, generator=g) < 0.2] = -100
    cos, sin = K.rotary_tables(N, D)

    def block(p, tile: bool):
        """The chain on leaves ``p``: tilestack's ops (``tile``) or torch's functions in p's dtypes."""
        x = p["x"]
        act = x.dtype
        if tile:
            h = ops.layer_norm(x, p["w1"], p["b1"]) if centered else ops.rms_norm(x, p["w1"])
        else:
            w1, b1 = p["w1"].to(act), p["b1"].to(act)
            h = F.layer_norm(x, (d,), w1, b1, 1e-5) if centered else F.rms_norm(x, (d,), w1, 1e-6)
        u = h @ p["up"].T                                                # (B, N, 2f)
        a = ops.swiglu(u) if tile else F.silu(u[..., :f]) * u[..., f:]
        qkv = (a @ p["qkv"].T).view(B, N, H + 2 * Hkv, D)
        q, k, v = qkv.split((H, Hkv, Hkv), 2)                           # (B, N, *, D) strided views
        if tile:
            q, k = ops.rotary(q, k, cos, sin)
            o = tilestack.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True)
        else:
            q, k = _rot(q, cos, sin), _rot(k, cos, sin)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
        o = o.transpose(1, 2).reshape(B, N, d)
        if tile:
            y, _ = ops.add_rms_norm(o, x, p["w2"])
            return ops.fused_linear_cross_entropy(y.reshape(B * N, d), p["head"], labels)
        hh = o + x
        y = F.rms_norm(hh, (d,), p["w2"].to(act), 1e-6)
        logits = y.reshape(B * N, d) @ p["head"].T
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)

    def run(dtypes_of, tile):
        leaves = {n: t.to(dtypes[n]).to(dtypes_of(n)).requires_grad_() for n, t in params.items()}
        loss = block(leaves, tile)
        loss.backward(torch.tensor(dloss, dtype=loss.dtype))
        return loss.detach(), {n: t.grad for n, t in leaves.items()}

    with rep.backend():
        loss, grads = run(lambda n: dtypes[n], True)
    loss64, grads64 = run(lambda n: torch.float64, False)
    loss_t, grads_t = run(lambda n: dtypes[n], False)
    _close(rep, "loss", loss, loss64, loss_t)
    for n in params:
        if grads64[n] is None:                                           # b1 of an RMS norm: unused
            assert grads[n] is None, f"{rep}\n  {n}: a gradient where float64 torch has none"
            continue
        assert grads[n] is not None and grads[n].dtype == dtypes[n], f"{rep}\n  {n}: gradient missing or mistyped"
        _close(rep, f"gradient of {n}", grads[n], grads64[n], grads_t[n])


@pytest.mark.parametrize("index", range(GEMM_CHAIN_CASES))
def test_gemm_epilogue_chain(index, request):
    rng, rep = rng_for("chain_gemm", index), Replay("chain_gemm", index, request, every=10)
    dt = pick(rng, (torch.bfloat16, torch.float16))
    M, d, f, n = size(rng, 65), size(rng, 129), size(rng, 65), size(rng, 129)
    if backend_for(index, 10) == "triton":
        M, d, f, n = min(M, 17), min(d, 33), min(f, 17), min(n, 33)
    act = pick(rng, ("silu", "gelu", "gelu_tanh", "relu"))
    bdt, rdt = pick(rng, DTYPES), pick(rng, DTYPES)                     # epilogue operands of other dtypes
    rep.fields.update(dtype=dt, M=M, d=d, f=f, n=n, act=act, bias=bdt, residual=rdt)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    x = torch.randn(M, d, generator=g).to(dt)
    w = (torch.randn(d, generator=g) * 0.2 + 1).float()
    up = (torch.randn(d, 2 * f, generator=g) / math.sqrt(d)).to(dt)
    bias = torch.randn(2 * f, generator=g).to(bdt)
    res = torch.randn(M, 2 * f, generator=g).to(rdt)
    down = (torch.randn(f, n, generator=g) / math.sqrt(f)).to(dt).t().contiguous().t()   # column-major
    up_out, up_whole = poisoned((M, 2 * f), dt, rng, rep, "up")
    sw_out, sw_whole = poisoned((M, f), dt, rng, rep, "swiglu")
    sm_out, sm_whole = poisoned((M, n), dt, rng, rep, "softmax")

    def chain(x, w, up, bias, res, down, tile):
        if tile:
            h = ops.rms_norm(x, w)
            u = K.gemm(h, up, bias=bias, activation=act, residual=res, out=up_out)
            a = K.swiglu(u[:, :f], u[:, f:], out=sw_out)
            return K.softmax(K.gemm(a, down), out=sm_out)
        act_fn = {"silu": F.silu, "gelu": F.gelu, "relu": torch.relu,
                  "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
        hi = torch.promote_types(x.dtype, torch.float32)                # f32 accumulation (float64 stays)
        h = F.rms_norm(x, (d,), w.to(x.dtype), 1e-6)
        u = (act_fn(h.to(hi) @ up.to(hi) + bias.to(hi)) + res.to(hi)).to(x.dtype)
        a = F.silu(u[:, :f]) * u[:, f:]
        return torch.softmax(a @ down, -1)

    with rep.backend(), torch.no_grad():
        got = chain(x, w, up, bias, res, down, True)
    assert got.data_ptr() == sm_out.data_ptr(), f"{rep}\n  softmax did not return its out="
    for out, whole, name in ((up_out, up_whole, "gemm"), (sw_out, sw_whole, "swiglu"), (sm_out, sm_whole, "softmax")):
        assert not out.isnan().any(), f"{rep}\n  {name}: out= left NaN (an element not written)"
        untouched_outside(out, whole, rep, name)
    want = chain(*(t.double() for t in (x, w, up, bias, res, down)), False)
    yard = chain(x, w, up, bias, res, down, False)
    _close(rep, "softmax output", got, want, yard)


def test_the_chain_catches_a_wrong_gradient(monkeypatch, request):
    """SwiGLU's gradient 5% off inside the block: the chain's upstream gradients (the norm's, x's) fail."""
    real = ops._SwiGLUPlan.backward
    monkeypatch.setattr(ops._SwiGLUPlan, "backward", lambda self, dy, x: real(self, dy, x) * 1.05)
    failed = []
    for i in range(4):
        try:
            test_block_chain(i, request)
        except AssertionError as e:
            failed.append(str(e))
    assert len(failed) == 4 and all("replay: seed=1300 group=chain" in m for m in failed), failed
