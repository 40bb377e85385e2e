"""The fuzzer's problems for the PUBLIC ops a user calls (``tilestack.scaled_dot_product_attention``,
``tilestack.attention``, the four norms, ``rotary``, ``swiglu``, ``fused_linear_cross_entropy``), forward and
backward through autograd, against float64 torch.

These are separate kinds (``PUBLIC_KINDS``) that a run asks for by name (``fuzz(kinds=ALL_KINDS)``,
``scripts/fuzz.py --kinds all``): the default kinds and so every existing seed's problems are unchanged. Each
op runs on the backend a problem draws (``config.override(backend=...)``, as a user forces one), with inputs of
any leading dims (0-size ones included), strided views, and gradients of every output. Bounds come from the
arithmetic as in ``compare`` / ``problems``: the output's rounding (2 ulp), f32 sums over the reduced dim, and the
rounding of intermediates to the input dtype where the kernels round them (P and dS in attention, the
normalised rows' statistics, the logits' gradient in the cross-entropy).
"""

from __future__ import annotations

import math

from tilestack.testing.fuzz.attention import check_attention
from tilestack.testing.fuzz.compare import EXP2_APPROX, TINY32, U32, Mismatch, _atol, _eps, check
from tilestack.testing.fuzz.compare import check as _check
from tilestack.testing.fuzz.draws import Profile, _reduction_steps, log_uniform, size, tensor
from tilestack.testing.fuzz.problems import Problem, _layer_norm_tol, _norm_input

PUBLIC_KINDS = ("sdpa_op", "norm_op", "rotary_op", "swiglu_op", "cross_entropy_op")
DTYPES = ("float32", "bfloat16", "float16")


def _dtype(rng):
    import torch

    return getattr(torch, str(rng.choice(DTYPES)))


def _leading(rng, hi: int, *, max_rank: int = 3) -> tuple[int, ...]:
    """0..max_rank leading dims whose product stays near ``hi``; a 0-size dim now and then."""
    rank = int(rng.integers(0, max_rank + 1))
    dims = []
    for _ in range(rank):
        dims.append(1 if rng.random() < 0.2 else int(rng.integers(1, 4)))
    if dims and rng.random() < 0.08:
        dims[int(rng.integers(len(dims)))] = 0
    if math.prod(dims) == 1 or not dims:      # at least some rows unless chosen empty
        dims.append(size(rng, hi, empty=0.02))
    while math.prod(dims) > hi:
        dims[dims.index(max(dims))] //= 2
    return tuple(dims)


def _maybe_strided(rng, t):
    """t, or the same values as a view of a wider parent (the last dim sliced) or with its two leading dims
    swapped in memory."""
    import torch

    r = rng.random()
    if r < 0.65 or t.dim() == 0:
        return t
    if r < 0.85 or t.dim() < 3:
        parent = torch.zeros(*t.shape[:-1], t.shape[-1] + int(rng.integers(1, 5)), dtype=t.dtype, device=t.device)
        view = parent[..., : t.shape[-1]]
        view.copy_(t)
        return view
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _grad_layout(rng, t):
    """An output's gradient as autograd may hand it over: contiguous, expanded from one value (``y.sum()``'s,
    every stride 0), or with its last two dims swapped in memory (a transpose after the op)."""
    import torch

    r = rng.random()
    if r < 0.7 or t.dim() < 2 or t.numel() == 0:
        return t
    if r < 0.85:
        return torch.full((), float(t.reshape(-1)[0]), dtype=t.dtype, device=t.device).expand(t.shape)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _leaves(*ts, grad):
    """Fresh leaves of ``ts`` (None stays None); ``grad`` a bool for all, or one per tensor."""
    grads = grad if isinstance(grad, list | tuple) else [grad] * len(ts)
    return [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(ts, grads, strict=True)]


def _grads(leaves):
    """Each leaf's gradient: zeros when it requires one and got none, None when it requires none."""
    import torch

    return tuple(None if t is None or not t.requires_grad else (t.grad if t.grad is not None else torch.zeros_like(t))
                 for t in leaves)


def _with_backend(backend: str):
    from tilestack.config import override

    return override(backend=backend)


# ---- attention through tilestack.scaled_dot_product_attention / tilestack.attention ------------------------------
def sdpa_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    import tilestack

    B = int(rng.integers(1, prof.batch + 1))
    Hkv = int(rng.integers(1, prof.kv_heads + 1))
    H = Hkv * int(rng.choice((1, 1, 2, 3)))
    if rng.random() < 0.03:
        B = 0
    Nq, Nk = size(rng, min(prof.seq, 48), empty=0.04), size(rng, min(prof.seq, 48), empty=0.04)
    D = int(rng.choice((1, 5, 8, 16, 24, 32, 40, 64)))
    Dv = D if rng.random() < 0.75 else int(rng.choice((3, 8, 16, 32, 48)))
    dtype = _dtype(rng)
    gqa = H != Hkv
    causal = bool(rng.random() < 0.35)
    scale = None if rng.random() < 0.6 else log_uniform(rng, 0.02, 2.0)
    eff_scale = 1 / math.sqrt(D) if scale is None else scale
    q = tensor(rng, (B, H, Nq, D), dtype, device, scale=float(rng.choice((1.0, 1.0, 4.0))))
    k = tensor(rng, (B, Hkv, Nk, D), dtype, device)
    v = tensor(rng, (B, Hkv, Nk, Dv), dtype, device)
    do = _grad_layout(rng, tensor(rng, (B, H, Nq, Dv), dtype, device))
    mask = None
    mask_kind = "none"
    if not causal and rng.random() < 0.4:
        mask_kind = str(rng.choice(["bool", "bias", "bias_inf"]))
        full = [B, H, Nq, Nk]
        shape = [d if rng.random() < 0.5 else 1 for d in full]
        shape = shape[int(rng.choice((0, 0, 1, 2))):]            # rank 4, 3 or 2: broadcast over the rest
        if mask_kind == "bool":
            mask = torch.from_numpy(rng.random(shape) < 0.75).to(device)
        else:
            mask = tensor(rng, shape, dtype, device, scale=float(rng.choice((1.0, 10.0))))
            if mask_kind == "bias_inf":
                mask[torch.from_numpy(rng.random(shape) < 0.3).to(device)] = -math.inf
    q, k, v = (_maybe_strided(rng, t) for t in (q, k, v))
    via = str(rng.choice(["sdpa", "sdpa", "attention"]))
    backward = bool(rng.random() < 0.6)
    desc = (f"{via} B={B} H={H} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {str(dtype)[6:]} causal={causal} "
            f"scale={scale} mask={mask_kind}{tuple(mask.shape) if mask is not None else ''} "
            f"q{tuple(q.stride())} do{tuple(do.stride())} {'fwd+bwd' if backward else 'fwd'}")

    def run():
        leaves = _leaves(q, k, v, grad=backward)
        with torch.enable_grad(), _with_backend(backend):
            if via == "sdpa":
                o = tilestack.scaled_dot_product_attention(*leaves, attn_mask=mask, dropout_p=0.0, is_causal=causal,
                                                           scale=scale, enable_gqa=gqa)
            else:
                o = tilestack.attention(*leaves, causal=causal, scale=scale, attn_mask=mask, dropout_p=0.0)
            if not backward:
                return o.detach(), None, None, None, None
            o.backward(do)
        return (o.detach(), None, *_grads(leaves))

    def expect(outs):
        check_attention(outs, q, k, v, do, causal=causal, align="top_left", scale=eff_scale, mask=mask)

    return desc, run, expect


# ---- the four norms ----------------------------------------------------------------------------------------------
def norm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    import tilestack

    name = str(rng.choice(["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]))
    centered, residual = "layer" in name, name.startswith("add_")
    lead = _leading(rng, prof.rows)
    m = math.prod(lead)
    n = size(rng, min(prof.cols, 300), empty=0.02)
    dtype = _dtype(rng)
    pdtype = dtype if rng.random() < 0.7 else torch.float32
    style, x2 = _norm_input(rng, m, n, dtype, device)
    x = _maybe_strided(rng, x2.reshape(*lead, n))
    r = None
    if residual:
        r = _maybe_strided(rng, tensor(rng, (*lead, n), dtype, device,
                                       scale=float(x2.double().abs().mean()) if x2.numel() else 1.0))
    w = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((1.0, 10.0))), loc=1.0)
    b = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((0.0, 1.0)))) if centered else None
    eps = float(rng.choice((1e-5, 1e-6, 1e-2)))
    dy = _grad_layout(rng, tensor(rng, (*lead, n), dtype, device, scale=log_uniform(rng, 1e-2, 1e2)))
    dh = _grad_layout(rng, tensor(rng, (*lead, n), dtype, device)) if residual and rng.random() < 0.6 else None
    backward = bool(rng.random() < 0.6)
    # which inputs want a gradient: all, or x (and r) alone (a frozen norm), or the weights alone
    wants = str(rng.choice(["all", "all", "all", "inputs", "params"]))
    want_x, want_p = wants != "params", wants != "inputs"
    desc = (f"{name} x{lead + (n,)} {str(dtype)[6:]} w {str(pdtype)[6:]} {style} eps={eps} x{tuple(x.stride())} "
            f"dy{tuple(dy.stride())} dh={dh is not None} {'fwd+bwd grad=' + wants if backward else 'fwd'}")

    def run():
        xl, rl, wl, bl = _leaves(x, r, w, b, grad=[backward and want_x] * 2 + [backward and want_p] * 2)
        with torch.enable_grad(), _with_backend(backend):
            op = getattr(tilestack, name)
            args = [xl] + ([rl] if residual else []) + [wl] + ([bl] if centered else [])
            out = op(*args, eps=eps)
            y, h = (out if residual else (out, None))
            if backward:
                outs, grads = [y], [dy]
                if dh is not None and h.requires_grad:
                    outs.append(h)
                    grads.append(dh)
                torch.autograd.backward(outs, grads)
        return (y.detach(), None if h is None else h.detach(), *(_grads([xl, rl, wl, bl]) if backward else ()))

    def expect(outs):
        y, h = outs[0], outs[1]
        if residual:
            want_h = x.double() + r.double()
            check("h", h, want_h, 2 * _eps(dtype) * want_h.abs() + 2 * U32 * (x.double().abs() + r.double().abs())
                  + _atol(dtype))
            src = h.double()              # the norm reads the residual stream as stored, in x's dtype
        else:
            src = x.double()
        rows = src.reshape(m, n)
        w64 = w.double()
        b64 = b.double() if centered else torch.zeros_like(w64)
        if centered:
            want = torch.nn.functional.layer_norm(rows, (n,), w64, b64, eps)
            tol = None if n == 0 or m == 0 else _layer_norm_tol(rows, w64, b64, want, eps, dtype)
        else:
            rstd = ((rows * rows).mean(-1, keepdim=True) + eps).rsqrt() if n else torch.ones(m, 1).double()
            want = rows * rstd * w64
            tol = 2 * _eps(dtype) * want.abs() + 4 * _reduction_steps(n) * U32 * want.abs() + _atol(dtype)
        check("y", y, want.reshape(*lead, n), None if tol is None else tol.reshape(*lead, n))
        if not backward:
            return
        dx, dr, dw, db = outs[2:]
        _check_norm_grads(rows, w64, b64, eps, centered, dy.double().reshape(m, n),
                          None if dh is None else dh.double().reshape(m, n), dx, dr, dw, db, lead, n, dtype, pdtype)

    return desc, run, expect


def _check_norm_grads(rows, w64, b64, eps, centered, dy, dh, dx, dr, dw, db, lead, n, dtype, pdtype):
    """dx (and dr, the same for the fused add), dw, db against float64 autograd of the norm of ``rows``; a
    gradient given as None (its input wanted none) is not checked."""
    import torch

    def check(label, got, want, tol=None):
        if got is not None:
            _check(label, got, want, tol)

    m = rows.shape[0]
    leaf = rows.clone().requires_grad_(True)
    wl, bl = w64.clone().requires_grad_(True), b64.clone().requires_grad_(True)
    if centered:
        y64 = torch.nn.functional.layer_norm(leaf, (n,), wl, bl, eps)
    else:
        y64 = leaf * ((leaf * leaf).mean(-1, keepdim=True) + eps).rsqrt() * wl if n else leaf * wl
    gx, gw, gb = torch.autograd.grad(y64, (leaf, wl, bl), dy, allow_unused=True)
    gx = gx if gx is not None else torch.zeros_like(rows)
    gw = gw if gw is not None else torch.zeros_like(w64)
    gb = gb if gb is not None else torch.zeros_like(b64)
    dh64 = torch.zeros_like(rows) if dh is None else dh
    gx = gx + dh64
    if m == 0 or n == 0:
        check("dx", dx, gx.reshape(*lead, n))
        check("dw", dw, gw)
        return
    mean = rows.mean(-1, keepdim=True) if centered else torch.zeros_like(rows[:, :1])
    r = ((rows - mean).square().mean(-1, keepdim=True) + eps).rsqrt()
    xhat = (rows - mean) * r
    g = dy * w64
    cond = xhat.abs() + mean.abs() * r + 1.0               # how far the f32 statistics move xhat (forward's bound)
    steps_n = _reduction_steps(n) * U32
    spread = g.abs().mean(-1, keepdim=True) + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True)
    tol_dx = (2 * _eps(dtype) * (gx.abs() + dh64.abs()) + 8 * steps_n * r * cond * (g.abs() + spread)
              + _atol(dtype))
    check("dx", dx, gx.reshape(*lead, n), tol_dx.reshape(*lead, n))
    if dr is not None:
        check("dr", dr, gx.reshape(*lead, n), tol_dx.reshape(*lead, n))
    steps_m = _reduction_steps(m) * U32
    growth = (dy.abs() * (4 * steps_m * xhat.abs() + 8 * steps_n * cond)).sum(0)
    check("dw", dw, gw, 2 * _eps(pdtype) * gw.abs() + growth + (m + 1) * _atol(pdtype))
    if centered:
        check("db", db, gb, 2 * _eps(pdtype) * gb.abs() + 4 * steps_m * dy.abs().sum(0) + (m + 1) * _atol(pdtype))


# ---- rotary ------------------------------------------------------------------------------------------------------
def rotary_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    import tilestack
    from tilestack.kernels import rotary_tables

    B = int(rng.integers(0 if rng.random() < 0.05 else 1, prof.batch + 1))
    N = size(rng, 40, empty=0.04)
    Hkv = int(rng.integers(1, 3))
    H = Hkv * int(rng.choice((1, 2)))
    D = int(rng.choice((16, 32, 64, 128)))
    dtype = _dtype(rng)
    theta = float(rng.choice((10000.0, 500000.0, 10.0)))
    cos, sin = rotary_tables(N, D, theta, device=device)
    q = _maybe_strided(rng, tensor(rng, (B, N, H, D), dtype, device))
    k = _maybe_strided(rng, tensor(rng, (B, N, Hkv, D), dtype, device, scale=float(rng.choice((1.0, 100.0)))))
    dq = _grad_layout(rng, tensor(rng, (B, N, H, D), dtype, device))
    dk = _grad_layout(rng, tensor(rng, (B, N, Hkv, D), dtype, device))
    backward = bool(rng.random() < 0.6)
    desc = (f"rotary q{(B, N, H, D)} k{(B, N, Hkv, D)} {str(dtype)[6:]} theta={theta} q{tuple(q.stride())} "
            f"dq{tuple(dq.stride())} {'fwd+bwd' if backward else 'fwd'}")

    def run():
        ql, kl = _leaves(q, k, grad=backward)
        with torch.enable_grad(), _with_backend(backend):
            qr, kr = tilestack.rotary(ql, kl, cos, sin)
            if backward:
                torch.autograd.backward([qr, kr], [dq, dk])
        return (qr.detach(), kr.detach(), *(_grads([ql, kl]) if backward else ()))

    def rotate(t, sign):
        c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :] * sign
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        out = torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)
        mag = torch.cat([(t1 * c).abs() + (t2 * s).abs(), (t2 * c).abs() + (t1 * s).abs()], -1)
        return out, mag

    def expect(outs):
        for label, got, src, sign in (("q", outs[0], q, 1), ("k", outs[1], k, 1)) + (
                (("dq", outs[2], dq, -1), ("dk", outs[3], dk, -1)) if backward else ()):
            want, mag = rotate(src.double(), sign)
            check(label, got, want, 2 * _eps(dtype) * want.abs() + 4 * U32 * mag + _atol(dtype))

    return desc, run, expect


# ---- SwiGLU ------------------------------------------------------------------------------------------------------
def swiglu_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    import tilestack

    lead = _leading(rng, prof.rows)
    f = size(rng, 200, empty=0.02)
    dtype = _dtype(rng)
    spread = float(rng.choice((1.0, 1.0, 8.0, 40.0)))
    x = _maybe_strided(rng, tensor(rng, (*lead, 2 * f), dtype, device, scale=spread))
    dy = _grad_layout(rng, tensor(rng, (*lead, f), dtype, device, scale=log_uniform(rng, 1e-2, 1e2)))
    backward = bool(rng.random() < 0.6)
    desc = (f"swiglu x{lead + (2 * f,)} {str(dtype)[6:]} scale={spread} x{tuple(x.stride())} dy{tuple(dy.stride())} "
            f"{'fwd+bwd' if backward else 'fwd'}")

    def run():
        (xl,) = _leaves(x, grad=backward)
        with torch.enable_grad(), _with_backend(backend):
            y = tilestack.swiglu(xl)
            if backward:
                y.backward(dy)
        return (y.detach(), *(_grads([xl]) if backward else ()))

    def expect(outs):
        x64 = x.double()
        a, b = x64[..., :f], x64[..., f:]
        sig = torch.sigmoid(a)
        silu = a * sig
        want = silu * b
        rel = 8 * (4 * U32 + EXP2_APPROX + 2 * U32 * a.abs())      # exp of a (its argument rounded), the divide
        # below a = -88.7, exp(-a) overflows f32 and sigmoid(a) (< 3e-39) comes out 0, as torch's f32 silu does
        under = TINY32 * (a * b).abs()
        check("y", outs[0], want, 2 * _eps(dtype) * want.abs() + rel * want.abs() + under + _atol(dtype))
        if not backward:
            return
        d64 = dy.double()
        dsilu = sig * (1 + a * (1 - sig))
        da, db = d64 * b * dsilu, d64 * silu
        mag_a = (d64 * b).abs() * (sig + (a * sig * (1 - sig)).abs() + sig)
        tol_a = 2 * _eps(dtype) * da.abs() + rel * mag_a + TINY32 * (d64 * b).abs() * (1 + a.abs()) + _atol(dtype)
        tol_b = 2 * _eps(dtype) * db.abs() + rel * db.abs() + TINY32 * (d64 * a).abs() + _atol(dtype)
        check("dx", outs[1], torch.cat([da, db], -1), torch.cat([tol_a, tol_b], -1))

    return desc, run, expect


# ---- fused linear + cross-entropy --------------------------------------------------------------------------------
def cross_entropy_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    import tilestack

    T = size(rng, 32, empty=0.04)                # the interpreter runs the kernel tile by tile: small sizes
    d = size(rng, 64, empty=0.0)
    V = size(rng, 160, empty=0.0)
    dtype = _dtype(rng)
    wscale = float(rng.choice((1.0, 1.0, 0.1, 4.0)))
    x = tensor(rng, (T, d), dtype, device)
    w = tensor(rng, (V, d), dtype, device, scale=wscale / math.sqrt(d))
    ignore_index = int(rng.choice((-100, -1, 0, V - 1)))
    labels = torch.from_numpy(rng.integers(0, V, T)).to(device)
    p_ignore = float(rng.choice((0.0, 0.3, 1.0)))
    labels[torch.from_numpy(rng.random(T) < p_ignore).to(device)] = ignore_index
    if rng.random() < 0.3:
        labels = labels.to(torch.int32)
    x, w = _maybe_strided(rng, x), _maybe_strided(rng, w)
    gscale = 1.0 if rng.random() < 0.5 else float(rng.choice((0.5, 3.0, -2.0)))
    backward = bool(rng.random() < 0.7)
    desc = (f"fused_linear_cross_entropy T={T} d={d} V={V} {str(dtype)[6:]} w_scale={wscale} "
            f"ignore_index={ignore_index} ignored={p_ignore} labels {str(labels.dtype)[6:]} x{tuple(x.stride())} "
            f"w{tuple(w.stride())} dloss={gscale} {'fwd+bwd' if backward else 'fwd'}")

    def run():
        xl, wl = _leaves(x, w, grad=backward)
        with torch.enable_grad(), _with_backend(backend):
            loss = tilestack.fused_linear_cross_entropy(xl, wl, labels, ignore_index=ignore_index)
            if backward:
                loss.backward(torch.tensor(gscale, dtype=loss.dtype, device=loss.device))
        return (loss.detach(), *(_grads([xl, wl]) if backward else ()))

    def expect(outs):
        x64, w64 = x.double(), w.double()
        valid = labels != ignore_index
        count = int(valid.sum())
        if count == 0:              # nothing labelled: a NaN loss (torch's 0/0) and zero gradients
            check("loss", outs[0], torch.tensor(math.nan, dtype=torch.float64))
            if backward:
                check("dx", outs[1], torch.zeros_like(x64))
                check("dw", outs[2], torch.zeros_like(w64))
            return
        xl, wl = x64.clone().requires_grad_(True), w64.clone().requires_grad_(True)
        logits = xl @ wl.T
        loss = torch.nn.functional.cross_entropy(logits, labels.long(), ignore_index=ignore_index)
        gx, gw = torch.autograd.grad(loss * gscale, (xl, wl))
        growth = x64.abs() @ w64.abs().T                               # (T, V)
        eps_in = 2.0 ** -10 if dtype == torch.float32 and device == "cuda" else 0.0   # tf32 products on a GPU
        # the logits are made in x's dtype (one GEMM, as torch's F.linear) before the f32 softmax: rounded there
        err_logit = (4 * (d + 1) * U32 + eps_in) * growth + _eps(dtype) * logits.detach().abs() + EXP2_APPROX
        row_err = err_logit.amax(-1)                                   # (T,)
        lse = torch.logsumexp(logits.detach(), -1)
        loss_tol = (2 * row_err + 4 * _reduction_steps(V) * U32 * (lse.abs() + 1))[valid].max() + \
            4 * _reduction_steps(T) * U32 * float(loss.detach().abs()) + 1e-6
        check("loss", outs[0], loss.detach(), loss_tol)
        if not backward:
            return
        p = torch.softmax(logits.detach(), -1)
        scale_rows = valid.double()[:, None] * abs(gscale) / count                # (T, 1)
        dlogit = (p - torch.nn.functional.one_hot(torch.where(valid, labels.long(), 0), V).double()
                  * valid.double()[:, None]).abs() * scale_rows
        # dlogits rounded to the input dtype before the GEMMs; p off by its logits' errors (2 * row_err relative)
        dl_err = ((4 * row_err[:, None] + EXP2_APPROX) * p * scale_rows + 2 * _eps(dtype) * dlogit
                  + _atol(dtype) * valid.double()[:, None])
        out_eps = 3 * _eps(dtype)          # the gradient rounded, then scaled by the loss's gradient and rounded
        tol_x = dl_err @ w64.abs() + 4 * (V + 1) * U32 * (dlogit @ w64.abs()) + out_eps * gx.abs() + \
            (V + 1) * _atol(dtype)
        tol_w = dl_err.T @ x64.abs() + 4 * _reduction_steps(T) * U32 * (dlogit.T @ x64.abs()) + \
            out_eps * gw.abs() + (T + 1) * _atol(dtype)
        check("dx", outs[1], gx, tol_x)
        check("dw", outs[2], gw, tol_w)

    return desc, run, expect


MAKERS = {"sdpa_op": sdpa_problem, "norm_op": norm_problem, "rotary_op": rotary_problem,
          "swiglu_op": swiglu_problem, "cross_entropy_op": cross_entropy_problem}


def public_problem(kind: str, rng, device: str, backend: str, prof: Profile) -> Problem:
    if kind not in MAKERS:
        raise Mismatch("crash", f"unknown public kind {kind!r}")
    return MAKERS[kind](rng, device, backend, prof)
