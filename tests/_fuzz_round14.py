"""What the round-14 attention fuzz tests share (tests/test_fuzz_round14_attention.py): seeded case draws of masked
attention, the masks (boolean or additive, every broadcastable shape and layout, every kind of fill), the float64
reference (``kernels.attention_fwd.reference`` under autograd) and the bounds the results are held to.

Every case has its own generator, ``np.random.default_rng([SEED, path number, case index])``; a failure's message
starts with ``replay: seed=1400 path=... case=...`` and the pytest line that reruns that case alone.

Fills. A masked position of an additive mask holds one of: -inf; the mask dtype's most negative finite value
(Hugging Face's padding); -1e30; -1e4; 0 (a "mask" that masks nothing); a large positive finite value (1e4, 1e30,
the mask dtype's largest: the key takes its row's weight). Left out on purpose: fills between about 1e5 and
1e17 in size (-1e9, 1e12, ...): f32 scores absorb q.k there (the ulp of 1e9 in f32 is 64) while float64 does not
(its ulp is 1e-7), so a row masked everywhere by such a fill is uniform in f32 (as torch's own f32 SDPA) and a
softmax of the q.k in float64: the two legitimately differ, by O(1). Past 1e30 both absorb q.k exactly (float64's
ulp there is 1.4e14), so a row masked everywhere by -1e30 or finfo.min is uniform in both and is compared tightly.

Bounds, per element, of round 13's form with tighter TOL (a few ulp of the dtype; the worst case drawn here
uses under half of it): the output within TOL (|o| + 2 P'|v|), the gradients within TOL (|g| + 4 m)
where m is the size of the terms each sums (dS = P (dO V^T - rowsum(dO o)), dQ = scale dS K, dK = scale dS^T Q,
dV = P^T dO, over a group's heads), all in float64; P' = P (1 + 8 U32 A / TOL) per row, A the largest |score +
bias| over the row's keys of nonzero weight whose bias is below 1e30: the f32 rounding of a score as large as a
-1e4 or 65504 fill (1e-3 absolute, so 1e-3 relative in P), which torch's f32 SDPA has too; 1 for ordinary rows.
In fp16, P and dS below its smallest normal round to multiples of 2**-24: that absolute error is added (``bounds``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tilestack.kernels.attention_fwd import reference

SEED = 1400
PATHS = ("eager", "compile", "direct")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}   # ~30 ulp of f32; 1 of bf16, 2 of fp16
U32 = 2.0 ** -24
ABSORBED = 1e30            # a bias at least this large absorbs q.k in f32 and in float64 alike (module docstring)
HEAD_DIMS = (8, 16, 24, 32, 40, 64, 72)
SHAPES = ("qk", "11qk", "b1qk", "1hqk", "bhqk", "bh1k", "11q1")
LAYOUTS = ("plain", "expanded", "sliced", "transposed")


def rng_for(path: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, PATHS.index(path), index])


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


class Replay:
    """``replay: seed=1400 path=eager case=7 dtype=bfloat16 ... (.venv/bin/python -m pytest '<node>' ...)``."""

    def __init__(self, path: str, index: int, request):
        self.path, self.index, self.node = path, index, request.node.nodeid
        self.fields: dict = {}

    def __setitem__(self, key, value):
        self.fields[key] = value

    def __str__(self):
        more = " ".join(f"{k}={_short(v)}" for k, v in self.fields.items())
        return (f"replay: seed={SEED} path={self.path} case={self.index} {more} "
                f"(.venv/bin/python -m pytest '{self.node}' -p no:cacheprovider -n 0)")


def _short(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace(" ", "")


# ---- masks --------------------------------------------------------------------------------------------------------
def fills(mdt) -> tuple[float, ...]:
    """The fills of an additive mask in dtype ``mdt`` (module docstring): in f16, 1e30 would be inf and -1e30 -inf
    (the latter kept: the reference sees the same -inf), so its large positive values are 1e4 and 65504."""
    fi = torch.finfo(mdt)
    big = (1e4, fi.max) if mdt == torch.float16 else (1e4, 1e30, fi.max)
    return (-math.inf, fi.min, -1e30, -1e4, 0.0, *big)


def _keep_pattern(rng, g, shape) -> torch.Tensor:
    """True = attend, over the mask's own ``shape``: each query row of it drawn as fully masked, one visible key,
    or mixed (about 60% visible), so rows masked everywhere and rows with a single key come often."""
    keep = torch.rand(shape, generator=g) < 0.6
    rows, nk = shape[-2], shape[-1]
    flat = keep.view(-1, rows, nk)
    for lead in range(flat.shape[0]):
        for r in range(rows):
            kind = rng.random()
            if kind < 0.2:
                flat[lead, r] = False
            elif kind < 0.35:
                flat[lead, r] = False
                flat[lead, r, int(rng.integers(nk))] = True
    return keep


def make_mask(rng, B, H, Nq, Nk, dt, rep: Replay):
    """(mask, description): a bool or additive (f32 or q's dtype) mask broadcastable to (B, H, Nq, Nk), of one of
    SHAPES (bh1k is (B, H, 1, Nk) expanded to Nq queries; 11q1 masks whole query rows), laid out plainly, expanded
    to (B, H, Nq, Nk) with zero strides, as a stepped slice of a larger buffer, or stored transposed."""
    kind = pick(rng, SHAPES)
    shape = {"qk": (Nq, Nk), "11qk": (1, 1, Nq, Nk), "b1qk": (B, 1, Nq, Nk), "1hqk": (1, H, Nq, Nk),
             "bhqk": (B, H, Nq, Nk), "bh1k": (B, H, 1, Nk), "11q1": (1, 1, Nq, 1)}[kind]
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    keep = _keep_pattern(rng, g, shape)
    r = rng.random()
    if r < 0.3:
        mask, form = keep, "bool"
    else:
        mdt = torch.float32 if r < 0.65 else dt
        # this round's subject, the rows a huge finite fill masks everywhere, drawn about half the time
        huge = (torch.finfo(mdt).min, -1e30)
        fill = float(pick(rng, huge if rng.random() < 0.45 else fills(mdt)))
        base = torch.randn(shape, generator=g) if rng.random() < 0.5 else torch.zeros(shape)
        mask = base.masked_fill(~keep, fill)
        form = f"{_short(mdt)}:{fill:g}"
        if rng.random() < 0.25:                    # -inf beside the fill in the same rows
            mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.2, -math.inf)
            form += "+-inf"
        mask = mask.to(mdt)
    layout = pick(rng, LAYOUTS)
    if kind == "bh1k" or layout == "expanded":
        mask = mask.expand(B, H, Nq, Nk) if mask.dim() == 4 else mask.expand(Nq, Nk)   # zero strides
        layout = "expanded"
    elif layout == "sliced":                       # every other element of a wider buffer, at an offset
        wide = torch.zeros(*mask.shape[:-1], 2 * mask.shape[-1] + 3, dtype=mask.dtype)
        wide[..., 1:2 * mask.shape[-1] + 1:2] = mask
        mask = wide[..., 1:2 * mask.shape[-1] + 1:2]
    elif layout == "transposed":
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    rep["mask"] = f"{kind}:{form}:{layout}"
    return mask


# ---- float64: reference, weights, bounds ----------------------------------------------------------------------------
def reference_grads(q, k, v, do, **kw):
    """(o, lse, [dq, dk, dv]) of ``kernels.attention_fwd.reference`` in float64 under autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, lse = reference(*leaves, **kw)
    o.backward(do.double())
    return o.detach(), lse.detach(), [t.grad for t in leaves]


def weights(q, k, v, mask, causal, align, scale, keep=None, p=0.0):
    """float64 by hand, k and v repeated per group: (P after dropout, P, t = scores + bias (the log-domain
    values, -inf where masked), b = the bias); a row that sees no key has P = 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    Nq, Nk = s.shape[-2:]
    b = torch.zeros_like(s)
    if mask is not None:
        b = b.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else b + mask.double()
    if causal:
        tri = torch.ones(Nq, Nk, dtype=torch.bool).tril(0 if align == "top_left" else Nk - Nq)
        b = b.masked_fill(~tri, -math.inf)
    t = s + b
    seen = (t > -math.inf).any(-1, keepdim=True)
    pr = torch.softmax(t.masked_fill(~seen, 0.0), -1) * seen
    pd = pr if keep is None else pr * keep.double() * (1 / (1 - p) if p < 1 else 0.0)
    return pd, pr, t, b


def growth(pr, t, b, dt):
    """(..., Nq, 1): the factor on P for the f32 rounding of large scores (module docstring)."""
    a = (t.abs() + b.abs()).masked_fill(~((pr > 0) & (b.abs() < ABSORBED)), 0.0).amax(-1, keepdim=True)
    return 1 + 8 * U32 * a / TOL[dt]


def bounds(q, k, v, do, o64, grads64, mask, causal, align, scale, dt, keep=None, p=0.0):
    """(bound on o, [bounds on dq, dk, dv]) per element (module docstring)."""
    group = q.shape[1] // k.shape[1]
    pd, pr, t, b = weights(q, k, v, mask, causal, align, scale, keep, p)
    grow = growth(pr, t, b, dt)
    kk, vv = (x.double().repeat_interleave(group, 1).abs() for x in (k, v))
    ob = TOL[dt] * (o64.abs() + 2 * (pd * grow) @ vv)
    dabs = do.double().abs()
    drop = pd / pr.masked_fill(pr == 0, 1.0)               # 1 / (1 - p) where kept, else 0 (1 without dropout)
    ds = pr * grow * (drop * (dabs @ vv.transpose(-1, -2)) + (dabs * o64.abs()).sum(-1, keepdim=True))
    mags = [scale * ds @ kk, scale * ds.transpose(-1, -2) @ q.double().abs(), (pd * grow).transpose(-1, -2) @ dabs]
    floors = [0.0, 0.0, 0.0]
    if dt == torch.float16:
        # P and dS (scale folded in) are rounded to fp16 for the products: below its smallest normal (6e-5) to a
        # multiple of 2**-24, an absolute error of up to 2**-25 per entry a relative bound does not see
        vis = (t > -math.inf).double() * 2.0 ** -24
        ob = ob + vis @ vv
        floors = [vis @ kk, vis.transpose(-1, -2) @ q.double().abs(), vis.transpose(-1, -2) @ dabs]
    for i in (0, 1, 2):
        mags[i] = TOL[dt] * 4 * mags[i] + floors[i]
    for i in (1, 2):                                       # dk, dv: summed over the group's heads
        mags[i] = mags[i].unflatten(1, (k.shape[1], group)).sum(2)
    return ob, [TOL[dt] * g.abs() + m for g, m in zip(grads64, mags, strict=True)]


def check(got, want, bound, what: str, rep: Replay, dtype=None) -> None:
    """``got`` against float64 ``want`` (finite here by construction): same shape and dtype, no NaN or inf where
    want is finite, every element within ``bound`` (and a subnormal step of got's dtype)."""
    head = f"{rep}\n  {what}:"
    assert got is not None, f"{head} no gradient where float64 has one"
    assert tuple(got.shape) == tuple(want.shape), f"{head} shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if dtype is not None:
        assert got.dtype == dtype, f"{head} dtype {got.dtype}, expected {dtype}"
    assert want.isfinite().all(), f"{head} the float64 reference is not finite (a test bug)"
    g = got.double()
    bad = ~g.isfinite()
    assert not bad.any(), f"{head} {int(g.isnan().sum())} NaN, {int(g.isinf().sum())} inf where float64 is " \
                          f"finite; first at {bad.nonzero()[0].tolist()}"
    # plus one step of the result dtype's subnormals (fp16's 6e-8): a result that small rounds to a multiple of it
    fi = torch.finfo(got.dtype)
    bound = bound + fi.smallest_normal * fi.eps
    err = (g - want).abs()
    off = err > bound
    if off.any():
        i = tuple(off.nonzero()[0].tolist())
        j = tuple(int(x) for x in np.unravel_index(int((err / bound.clamp_min(1e-300)).argmax()), err.shape))
        raise AssertionError(f"{head} {int(off.sum())} of {err.numel()} elements off; first {i}: got "
                             f"{g[i].item():.7g}, want {want[i].item():.7g}, bound {bound[i].item():.3g}; worst {j}: "
                             f"got {g[j].item():.7g}, want {want[j].item():.7g}, bound {bound[j].item():.3g}")
