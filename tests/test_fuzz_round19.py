"""Fuzz round nineteen, part one: the norms of ``tilestack.torch.ops`` (and the kernel functions below them) on rows at
magnitudes past the square root of f32's range, against float64 torch, forward and backward.

Rounds 8 and 12-18 drew norm rows up to 1e15 in f32 (1e3 in f16) and found them right; docs/reliability.md listed
rows past about 1.8e19 as short. This round draws rows at 1e20-1e37 in f32 and bf16 (whose range is f32's), constant
rows there (y = bias), rows holding an infinity among them (NaN exactly where float64 has NaN), and the one-tile path
of the kernels (``ONE_TILE=True``, which the CPU takes only when asked), on both CPU backends; every result starts as
NaN (``poisoned_allocations``), so an element no program writes cannot pass.

What this round found (each test below failed before its fix):
- ``rms_norm``, ``layer_norm``, ``add_rms_norm`` and ``add_layer_norm`` of f32 or bf16 rows whose largest |x| passed
  about 1.8e19 summed squares past f32's range: rstd 0, so RMS norm gave y = 0 (float64: about +-1) and layer norm NaN
  (inf - inf in its variance), where float64 torch (and torch's CPU layer_norm) answer. The kernels
  (``kernels.layernorm.row_scale``) now take such a row's statistics of x / max|x| (rows up to 2^32 keep their
  arithmetic bit for bit), one extra pass over a row too wide for one tile;
- ``rotary`` took an odd head dim such as 17 (17 // 2 = 8, a power of two) and left the last column 0; it is refused
  by name now (the check asks D % 2 == 0 too).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack.kernels as K
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

SEED = 1900
TOL = {torch.float32: 3e-5, torch.bfloat16: 3e-2}
NORMS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")


def rng_for(*key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, *key])


def backend_for(case: int) -> str:
    return "triton" if case % 3 == 0 else "reference"      # the Triton interpreter every third case


def close(got: torch.Tensor, want: torch.Tensor, dtype, what: str, scale: float = 0.0) -> None:
    """got against float64 ``want``: NaN exactly where want has NaN, the same infinities, and elsewhere within the
    dtype's tolerance relative to the largest finite |want| or ``scale``, the size of the terms it sums, if larger
    (the gradients of a row at 1e30 are near 1e-30: a bound in absolute terms would pass anything)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}; expected {tuple(want.shape)}"
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 has none, or the reverse"
    fin = want.isfinite()
    assert torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()]), f"{what}: infinities differ"
    if fin.any():
        scale = want[fin].abs().max().clamp_min(max(scale, 1e-300))
        err = ((got[fin] - want[fin]).abs() / scale).max().item()
        assert err <= 4 * TOL[dtype], f"{what}: error {err:.3g} of the largest |want| (bound {4 * TOL[dtype]:.3g})"


def torch_norm(name: str, x, r, w, b, eps):
    """The float64 torch answer: (y,) or (y, h)."""
    h = x if r is None else x + r
    if "layer" in name:       # by its formula: F.layer_norm's float64 mean of a row of one -3e33 is off by 1e17
        d = h - h.mean(-1, keepdim=True)
        y = d * (d * d).mean(-1, keepdim=True).add(eps).rsqrt() * w + b
    else:
        y = F.rms_norm(h, (h.shape[-1],), w, eps)
    return (y,) if r is None else (y, h)


def ours(name: str, x, r, w, b, eps):
    fn = getattr(ops, name)
    args = {"rms_norm": (x, w), "layer_norm": (x, w, b), "add_rms_norm": (x, r, w),
            "add_layer_norm": (x, r, w, b)}[name]
    out = fn(*args, eps=eps)
    return out if isinstance(out, tuple) else (out,)


def big_rows(rng, shape, dtype, style: str) -> torch.Tensor:
    mag = 10.0 ** rng.uniform(20, 37 if style != "sum" else 35)
    x = torch.from_numpy(rng.standard_normal(shape)) * mag
    if style == "constant":                                     # every element of a row the same: y = bias
        x = x[..., :1].expand(shape).clone()
    elif style == "offset":                                     # a large mean against a spread 1e-3 of it
        x = x[..., :1] + x * 1e-3
    elif style == "mixed":                                      # rows at 1e30 beside ordinary rows
        x[..., ::2, :] /= mag
    elif style == "inf":                                        # one infinity in the first row
        x[(0,) * (len(shape) - 1) + (int(rng.integers(shape[-1])),)] = math.inf
    return x.clamp(-3e38, 3e38).to(dtype)


STYLES = ("plain", "constant", "offset", "mixed", "inf", "sum")
CASES = 24


@pytest.mark.parametrize("case", range(CASES))
def test_norms_of_rows_past_f32_square_range_match_float64(case):
    """Seeded: a norm, a dtype, a shape (rank 1-3, widths around a tile edge), a style of huge rows, a subset
    requiring grad; values and gradients against float64 torch."""
    rng = rng_for(1, case)
    name = NORMS[case % 4]
    dtype = (torch.float32, torch.bfloat16)[int(rng.integers(2))]
    n = int(rng.choice((1, 3, 16, 17, 33, 1025)))
    lead = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(0, 3))))
    style = STYLES[int(rng.integers(len(STYLES)))]
    if style == "mixed" and not lead:
        lead = (4,)
    x = big_rows(rng, (*lead, n), dtype, style)
    # r at x's own magnitude: h = x + r a few ulps from constant (r at 1e-7 of x) is ill-conditioned in any f32 norm
    r = None
    if name.startswith("add_"):
        r = torch.from_numpy(rng.standard_normal((*lead, n))).to(dtype) * x.float().abs().clamp(max=1e37).amax(
            -1, keepdim=True).to(dtype)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, n)).to(dtype)
    b = torch.from_numpy(rng.standard_normal(n)).to(dtype) if "layer" in name else None
    eps = float(rng.choice((1e-6, 1e-5)))
    needs = [bool(v) for v in rng.integers(0, 2, size=4)]
    needs[0] = True
    leaves = [None if t is None else t.clone().requires_grad_(f) for t, f in zip((x, r, w, b), needs, strict=True)]
    what = f"case {case}: {name} {tuple(x.shape)} {dtype} {style} eps={eps}"
    with config.override(backend=backend_for(case)), poisoned_allocations():
        got = ours(name, *leaves, eps)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    want = torch_norm(name, *ref_leaves, eps)
    for k, (g, wv) in enumerate(zip(got, want, strict=True)):
        close(g, wv.detach(), dtype, f"{what}: output {k}")
    if style == "inf":      # NaN rows: their gradients are NaN in both; compared above by value only
        return
    dys = [torch.from_numpy(rng.standard_normal(tuple(g.shape))).to(dtype) for g in got]
    with config.override(backend=backend_for(case)), poisoned_allocations():
        torch.autograd.backward(got, dys)
    torch.autograd.backward(want, [d.double() for d in dys])
    # dx = rstd (w dy - xhat mean(w dy xhat) [- mean(w dy)]) cancels where a row is nearly one value (width 1, a
    # constant row): its error is a few roundings of rstd |w| |dy|, not of dx
    h64 = want[-1].detach() if len(want) == 2 else ref_leaves[0].detach()
    sq = h64.var(-1, unbiased=False) if "layer" in name else h64.pow(2).mean(-1)
    terms = ((sq + eps).rsqrt().unsqueeze(-1) * w.double().abs() * dys[0].double().abs()).max().item()
    terms += sum(d.double().abs().max().item() for d in dys[1:])      # dh adds into dx
    # dw, db: sums over the rows of dy xhat and dy, |xhat| at most sqrt(n)
    wterms = dys[0].double().abs().reshape(-1, n).sum(0).max().item() * math.sqrt(n)
    for label, leaf, ref in zip("xrwb", leaves, ref_leaves, strict=True):
        if leaf is not None and leaf.requires_grad:
            close(leaf.grad, ref.grad, dtype, f"{what}: grad of {label}", terms if label in "xr" else wterms)


@pytest.mark.parametrize("one_tile", [False, True], ids=["passes", "one_tile"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kernel", ["layer_norm", "rms_norm", "add_rms_norm", "add_layer_norm"])
def test_kernel_functions_at_1e30_both_paths(kernel, backend, one_tile):
    """The kernel functions themselves, on the multi-pass path (a row wider than BN) and the one-tile path, with
    rows at 1e30, a constant row at 1e36 and an ordinary row (kept bit for bit: c = 1), against float64."""
    rng = rng_for(2, NORMS.index(kernel) if kernel in NORMS else 0)
    n = 300
    x = torch.from_numpy(rng.standard_normal((4, n))).float()
    x[0] *= 1e30
    x[1] = 1e36
    x[2] *= -3e25
    r = torch.from_numpy(rng.standard_normal((4, n))).float() * 1e35
    w = torch.from_numpy(rng.uniform(0.5, 2.0, n)).float()
    b = torch.from_numpy(rng.standard_normal(n)).float()
    cfg = dict(BM=2, BN=512, ONE_TILE=True) if one_tile else dict(BM=2, BN=128)
    eps = 1e-5
    with poisoned_allocations():
        if kernel == "layer_norm":
            y, mean, rstd = K.layer_norm(x, w, b, eps, backend=backend, **cfg)
            h = x
        elif kernel == "rms_norm":
            y, rstd = K.rms_norm(x, w, eps, backend=backend, **cfg)
            h, mean = x, None
        elif kernel == "add_rms_norm":
            y, h, rstd = K.add_rms_norm(x, r, w, eps, backend=backend, **cfg)
            mean = None
        else:
            y, h, mean, rstd = K.add_layer_norm(x, r, w, b, eps, backend=backend, **cfg)
    h64 = x.double() + (r.double() if kernel.startswith("add_") else 0)
    close(h, h64.float().double(), torch.float32, f"{kernel} h")
    h64 = h.double()                  # normalised as rounded to x's dtype
    if mean is not None:
        close(mean, h64.mean(-1), torch.float32, f"{kernel} mean")
        var = h64.var(-1, unbiased=False)
        close(rstd, (var + eps).rsqrt(), torch.float32, f"{kernel} rstd")
        want = F.layer_norm(h64, (n,), w.double(), b.double(), eps)
    else:
        close(rstd, (h64.pow(2).mean(-1) + eps).rsqrt(), torch.float32, f"{kernel} rstd")
        want = F.rms_norm(h64, (n,), w.double(), eps)
    for row in range(4):
        close(y[row], want[row], torch.float32, f"{kernel} y row {row}")


@pytest.mark.parametrize("d", [17, 33, 65])
def test_rotary_refuses_an_odd_head_dim(d):
    q, k = torch.randn(1, 3, 2, d), torch.randn(1, 3, 1, d)
    cos, sin = torch.ones(3, d // 2), torch.zeros(3, d // 2)
    with pytest.raises(LaunchError, match=f"rotary: head dim D={d}"):
        ops.rotary(q, k, cos, sin)
    with pytest.raises(LaunchError, match=f"rotary: head dim D={d}"):
        K.rotary(q, k, cos, sin)
