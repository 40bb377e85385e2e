"""The fuzzer's attention problems (forward and backward, masks, GQA, causal alignments), checked against a
float64 attention of its own."""

from __future__ import annotations

import inspect
import math

from tilestack.testing.fuzz.compare import EXP2_APPROX, U32, _atol, _eps, accumulation_error, check
from tilestack.testing.fuzz.draws import Profile, log_uniform, size, tensor
from tilestack.testing.fuzz.problems import Problem


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
        check_attention(outs, q, k, v, do, causal=causal, align=align, scale=eff_scale, mask=mask)

    return desc, run, expect


def check_attention(outs, q, k, v, do, *, causal: bool, align: str, scale: float, mask) -> None:
    """(o, lse or None, dq, dk, dv or None) of one attention call against float64 (``attention64``): the bounds of
    the kernels' arithmetic (P and dS rounded to the input dtype, f32 scores and sums). ``scale`` is the effective
    one; ``mask`` None, bool or additive, broadcastable to (B, H, Nq, Nk)."""
    import torch

    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dtype = q.dtype
    eff_scale = scale
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


def _fold(t, Hkv: int, group: int):
    B, _, N, D = t.shape
    return t.reshape(B, Hkv, group, N, D).sum(2)
