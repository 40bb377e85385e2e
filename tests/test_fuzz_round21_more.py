"""Fuzz round twenty-one, part two: bad inputs to every public op (dtype mixes between arguments, int, bool, complex
and float64 tensors, Python numbers where tensors go and 0-d tensors where numbers go, wrong ranks, tensors on the
'meta' device beside CPU ones) refused with a LaunchError naming the argument before any kernel launches; NaN in
the memory a view skips (strided views' gaps), in rows a cross-entropy ignores and in keys a causal mask hides,
which must not reach the answer; and the ops under torch.inference_mode, torch.no_grad, CPU autocast (bf16),
deterministic mode, on 'meta' tensors, and under torch.vmap, against float64 torch on the CPU backends. Every
result starts as NaN (``poisoned_allocations``).

This part found no bug.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2150 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.double(), want.detach().double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 torch has none, or the reverse"
    fin = ~want.isnan()
    if fin.any():
        err = ((got[fin] - want[fin]).abs().max() / want[fin].abs().max().clamp_min(1.0)).item()
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


# ---- bad inputs, refused by name before any work --------------------------------------------------------------------
X, W, B, R = randn(0, 4, 8), randn(1, 8), randn(2, 8), randn(3, 4, 8)
Q, KK, V = randn(4, 1, 2, 3, 8), randn(5, 1, 2, 5, 8), randn(6, 1, 2, 5, 8)
Q16, K16 = randn(7, 1, 4, 2, 16), randn(8, 1, 4, 1, 16)
COS, SIN = rotary_tables(4, 16)
LM, LABELS = randn(9, 10, 8), torch.tensor([0, 1, 2, 3])
A16, B16 = randn(10, 4, 8, dtype=torch.float16), randn(11, 8, 6, dtype=torch.float16)

BAD = [
    # (id, the argument the message must name, call)
    ("rms int x", "x", lambda: ops.rms_norm(X.int(), W)),
    ("rms complex x", "x", lambda: ops.rms_norm(X.cfloat(), W.cfloat())),
    ("rms f64 x", "x", lambda: ops.rms_norm(X.double(), W.double())),
    ("rms bool weight", "weight", lambda: ops.rms_norm(X, W > 0)),
    ("rms int weight python", "weight", lambda: ops.rms_norm(X, 3)),
    ("rms python x", "x", lambda: ops.rms_norm(1.5, W)),
    ("rms weight 2-D", "weight", lambda: ops.rms_norm(X, W[None])),
    ("rms eps 0-d tensor", "eps", lambda: ops.rms_norm(X, W, torch.tensor(1e-6))),
    ("rms eps str", "eps", lambda: ops.rms_norm(X, W, "1e-6")),
    ("rms eps bool", "eps", lambda: ops.rms_norm(X, W, True)),
    ("rms meta x, cpu weight", "weight", lambda: ops.rms_norm(X.to("meta"), W)),
    ("layer_norm f16 bias, f32 weight", "bias", lambda: ops.layer_norm(X, W, B.half())),
    ("layer_norm None bias", "bias", lambda: ops.layer_norm(X, W, None)),
    ("add_rms_norm r of another shape", "r", lambda: ops.add_rms_norm(X, R[:2], W)),
    ("add_layer_norm int r", "r", lambda: ops.add_layer_norm(X, R.int(), W, B)),
    ("swiglu int", "x", lambda: ops.swiglu(X.long())),
    ("swiglu f64", "x", lambda: ops.swiglu(X.double())),
    ("swiglu odd last dim", "x", lambda: ops.swiglu(X[:, :7])),
    ("swiglu python", "x", lambda: ops.swiglu([1.0, 2.0])),
    ("ce f16 weight, f32 x", "weight", lambda: ops.fused_linear_cross_entropy(X, LM.half(), LABELS)),
    ("ce f64 x", "x", lambda: ops.fused_linear_cross_entropy(X.double(), LM.double(), LABELS)),
    ("ce float labels", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, LABELS.float())),
    ("ce bool labels", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, LABELS > 1)),
    ("ce 2-D labels", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, LABELS[None])),
    ("ce ignore_index 0-d tensor", "ignore_index",
     lambda: ops.fused_linear_cross_entropy(X, LM, LABELS, ignore_index=torch.tensor(-100))),
    ("ce empty vocabulary", "weight", lambda: ops.fused_linear_cross_entropy(X, LM[:0], LABELS)),
    ("attention f16 k", "k", lambda: tilestack.attention(Q, KK.half(), V)),
    ("attention f64", "q", lambda: tilestack.attention(Q.double(), KK.double(), V.double())),
    ("attention int", "q", lambda: tilestack.attention(Q.int(), KK.int(), V.int())),
    ("attention complex", "q", lambda: tilestack.attention(Q.cfloat(), KK.cfloat(), V.cfloat())),
    ("attention python q", "q", lambda: tilestack.attention(1, KK, V)),
    ("attention list k", "k", lambda: tilestack.attention(Q, [1.0], V)),
    ("attention 3-D q", "q", lambda: tilestack.attention(Q[0], KK[0], V[0])),
    ("attention scale 0-d tensor", "scale", lambda: tilestack.attention(Q, KK, V, scale=torch.tensor(0.5))),
    ("attention dropout 0-d tensor", "dropout_p", lambda: tilestack.attention(Q, KK, V, dropout_p=torch.tensor(0.1))),
    ("attention causal int", "causal", lambda: tilestack.attention(Q, KK, V, causal=1)),
    ("attention causal str", "causal", lambda: tilestack.attention(Q, KK, V, causal="yes")),
    ("attention int mask", "attn_mask",
     lambda: tilestack.attention(Q, KK, V, attn_mask=torch.ones(3, 5, dtype=torch.int32))),
    ("attention f64 mask", "attn_mask",
     lambda: tilestack.attention(Q, KK, V, attn_mask=torch.zeros(3, 5, dtype=torch.float64))),
    ("attention 1-D mask", "attn_mask",
     lambda: tilestack.attention(Q, KK, V, attn_mask=torch.ones(5, dtype=torch.bool))),
    ("attention 5-D mask", "attn_mask",
     lambda: tilestack.attention(Q, KK, V, attn_mask=torch.ones(1, 1, 2, 3, 5, dtype=torch.bool))),
    ("rotary f64 cos", "cos", lambda: ops.rotary(Q16, K16, COS.double(), SIN.double())),
    ("rotary f16 q, f32 k", "k", lambda: ops.rotary(Q16.half(), K16, COS, SIN)),
    ("rotary python cos", "cos", lambda: ops.rotary(Q16, K16, 1.0, SIN)),
    ("rotary int q", "q", lambda: ops.rotary(Q16.int(), K16.int(), COS, SIN)),
    ("rotary cos of another length", "cos", lambda: ops.rotary(Q16, K16, COS[:3], SIN[:3])),
    ("gemm f32", "a", lambda: K.gemm(A16.float(), B16.float())),
    ("gemm bf16 a, f16 b", "b", lambda: K.gemm(A16.bfloat16(), B16)),
    ("gemm python bias", "bias", lambda: K.gemm(A16, B16, bias=1)),
    ("gemm f64 bias", "bias", lambda: K.gemm(A16, B16, bias=torch.zeros(6, dtype=torch.float64))),
    ("gemm (1, N) bias", "bias", lambda: K.gemm(A16, B16, bias=torch.zeros(1, 6, dtype=torch.float16))),
    ("gemm 1-D residual", "residual", lambda: K.gemm(A16, B16, residual=torch.zeros(6, dtype=torch.float16))),
    ("gemm unknown activation", "activation", lambda: K.gemm(A16, B16, activation="tanh")),
    ("gemm int out_dtype", "out_dtype", lambda: K.gemm(A16, B16, out_dtype=torch.int32)),
    ("gemm str out_dtype", "out_dtype", lambda: K.gemm(A16, B16, out_dtype="float32")),
    ("softmax int", "x", lambda: K.softmax(X.int())),
    ("softmax 0-d", "x", lambda: K.softmax(torch.tensor(1.0))),
]


@pytest.mark.parametrize("case", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_inputs_refused_by_name_before_any_work(case, monkeypatch):
    _, arg, call = BAD[case]
    kernel_module = importlib.import_module("tilestack.lang.kernel")

    def launched(*args, **kwargs):
        raise AssertionError(f"{BAD[case][0]}: a kernel launched before the bad {arg} was refused")
    monkeypatch.setattr(kernel_module.Kernel, "launcher_for", launched, raising=False)
    with config.override(backend="reference"), pytest.raises(LaunchError, match=rf"\b{arg}\b"):
        call()


# ---- NaN where the answer must not look ---------------------------------------------------------------------------
def gapped(seed: int, *shape, every: int = 2) -> torch.Tensor:
    """A view of ``shape`` taking every ``every``-th column of a NaN-filled tensor: NaN in every gap."""
    base = torch.full((*shape[:-1], every * shape[-1]), float("nan"))
    base[..., ::every] = randn(seed, *shape)
    return base[..., ::every]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_in_the_gaps_of_strided_views_does_not_leak(backend):
    x, r, w, b = gapped(20, 3, 8), gapped(21, 3, 8), gapped(22, 8, every=3), gapped(23, 8)
    q, k, v = gapped(24, 2, 2, 4, 8), gapped(25, 2, 2, 5, 8), gapped(26, 2, 2, 5, 8)
    q16, k16 = gapped(27, 1, 4, 2, 16), gapped(28, 1, 4, 1, 16)
    lm = gapped(29, 6, 8)
    d = lambda t: t.double()                                                         # noqa: E731
    with config.override(backend=backend), poisoned_allocations():
        close(ops.rms_norm(x, w), F.rms_norm(d(x), (8,), d(w), 1e-6), 2e-5, "rms_norm")
        close(ops.layer_norm(x, w, b), F.layer_norm(d(x), (8,), d(w), d(b), 1e-5), 2e-5, "layer_norm")
        y, h = ops.add_layer_norm(x, r, w, b)
        close(h, d(x) + d(r), 2e-5, "add_layer_norm h")
        close(y, F.layer_norm(d(x) + d(r), (8,), d(w), d(b), 1e-5), 2e-5, "add_layer_norm y")
        close(ops.swiglu(x), F.silu(d(x)[:, :4]) * d(x)[:, 4:], 2e-5, "swiglu")
        close(tilestack.attention(q, k, v), F.scaled_dot_product_attention(d(q), d(k), d(v)), 2e-5, "attention")
        qr, kr = ops.rotary(q16, k16, COS, SIN)
        h2 = 8
        c, s = d(COS)[None, :, None, :], d(SIN)[None, :, None, :]
        want = torch.cat((d(q16)[..., :h2] * c - d(q16)[..., h2:] * s, d(q16)[..., h2:] * c + d(q16)[..., :h2] * s), -1)
        close(qr, want, 2e-5, "rotary q")
        labels = torch.tensor([0, 5, -100])
        close(ops.fused_linear_cross_entropy(x, lm, labels), F.cross_entropy(d(x) @ d(lm).T, labels), 2e-5,
              "fused_linear_cross_entropy")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_in_an_ignored_row_and_in_causally_hidden_keys(backend):
    """A cross-entropy row labelled ignore_index holding NaN leaves the loss finite (torch's answer; its gradients
    are NaN there, as torch's); a NaN key a causal mask hides from every earlier query leaves those rows' outputs and
    gradients finite, as torch's."""
    x, lm = randn(30, 5, 8), randn(31, 7, 8)
    x[2] = float("nan")
    labels = torch.tensor([1, 6, -100, 0, 3])
    xl, lml = x.clone().requires_grad_(), lm.clone().requires_grad_()
    x6, lm6 = x.double().requires_grad_(), lm.double().requires_grad_()
    with config.override(backend=backend), poisoned_allocations():
        loss = ops.fused_linear_cross_entropy(xl, lml, labels)
        loss.backward()
    want = F.cross_entropy(x6 @ lm6.T, labels)
    want.backward()
    assert loss.isfinite(), f"a NaN in an ignored row reached the loss: {loss}"
    close(loss, want, 2e-5, "loss")
    close(xl.grad, x6.grad, 2e-5, "dx")                 # NaN in the ignored row only, as torch's
    q, k, v = randn(32, 1, 2, 4, 8), randn(33, 1, 2, 4, 8), randn(34, 1, 2, 4, 8)
    k[..., 3, :] = float("nan")                          # seen by the last query only
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    with config.override(backend=backend), poisoned_allocations():
        o = tilestack.attention(*leaves, causal=True)
        o[..., :3, :].sum().backward()
    want = F.scaled_dot_product_attention(*ref, is_causal=True)
    want[..., :3, :].sum().backward()
    assert o[..., :3, :].isfinite().all(), "a causally hidden NaN key reached an earlier query's row"
    close(o, want, 2e-5, "attention o")
    close(leaves[0].grad, ref[0].grad, 2e-5, "attention dq")


# ---- grad modes, autocast, deterministic mode, meta tensors, vmap --------------------------------------------------
def all_ops(x, w, b, r, q, k, v, q16, k16, lm, labels, tables=(COS, SIN)):
    return {
        "rms_norm": ops.rms_norm(x, w),
        "layer_norm": ops.layer_norm(x, w, b),
        "add_rms_norm": ops.add_rms_norm(x, r, w)[0],
        "swiglu": ops.swiglu(x),
        "rotary": ops.rotary(q16, k16, *tables)[0],
        "attention": tilestack.attention(q, k, v, causal=True),
        "sdpa": tilestack.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "fused_linear_cross_entropy": ops.fused_linear_cross_entropy(x, lm, labels),
    }


def all_ops64(x, w, b, r, q, k, v, q16, k16, lm, labels):
    c, s = COS.double()[None, :, None, :], SIN.double()[None, :, None, :]
    return {
        "rms_norm": F.rms_norm(x, (8,), w, 1e-6),
        "layer_norm": F.layer_norm(x, (8,), w, b, 1e-5),
        "add_rms_norm": F.rms_norm(x + r, (8,), w, 1e-6),
        "swiglu": F.silu(x[..., :4]) * x[..., 4:],
        "rotary": torch.cat((q16[..., :8] * c - q16[..., 8:] * s, q16[..., 8:] * c + q16[..., :8] * s), -1),
        "attention": F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa": F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "fused_linear_cross_entropy": F.cross_entropy(x @ lm.T, labels),
    }


def inputs(requires_grad: bool = False):
    ts = [randn(40, 3, 8), randn(41, 8), randn(42, 8), randn(43, 3, 8), randn(44, 1, 4, 3, 8),
          randn(45, 1, 2, 5, 8), randn(46, 1, 2, 5, 8), randn(47, 1, 4, 2, 16), randn(48, 1, 4, 1, 16),
          randn(49, 6, 8)]
    return [t.requires_grad_(requires_grad) for t in ts] + [torch.tensor([0, 5, 3])]


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "deterministic"])
def test_ops_under_grad_modes_and_deterministic_mode(mode):
    """Inputs that require grad, called under torch.inference_mode / torch.no_grad (no graph: outputs without
    grad), or with torch.use_deterministic_algorithms(True), match float64 torch."""
    args = inputs(requires_grad=True)
    want = all_ops64(*[t.detach().double() if t.is_floating_point() else t for t in args])
    before = torch.are_deterministic_algorithms_enabled()
    try:
        with config.override(backend="reference"), poisoned_allocations(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "inference_mode":
                with torch.inference_mode():
                    got = all_ops(*args)
            elif mode == "no_grad":
                with torch.no_grad():
                    got = all_ops(*args)
            else:
                torch.use_deterministic_algorithms(True)
                got = all_ops(*args)
                sum(o.sum() for o in got.values()).backward()
    finally:
        torch.use_deterministic_algorithms(before)
    for name, g in got.items():
        close(g, want[name], 3e-5, f"{name} under {mode}")
        if mode != "deterministic":
            assert not g.requires_grad, f"{name} under {mode} made an output that requires grad"


def test_ops_under_cpu_autocast_bf16_answer_in_torchs_dtypes():
    """Inside torch.autocast('cpu', bfloat16): the drop-in SDPA answers in bf16 as torch's (autocast casts its
    arguments), the norms, SwiGLU, rotary and the loss in their inputs' dtype (f32), all within bf16's tolerance of
    float64."""
    args = inputs()
    want = all_ops64(*[t.double() if t.is_floating_point() else t for t in args])
    with config.override(backend="reference"), poisoned_allocations(), torch.autocast("cpu", dtype=torch.bfloat16), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = all_ops(*args)
        torch_sdpa = F.scaled_dot_product_attention(*args[4:7], is_causal=True, enable_gqa=True)
    assert got["sdpa"].dtype == torch_sdpa.dtype == torch.bfloat16
    for name, g in got.items():
        if name != "sdpa":
            assert g.dtype == torch.float32, f"{name} under autocast answered in {g.dtype}"
        close(g, want[name], 3e-2 if name == "sdpa" else 3e-5, f"{name} under autocast")


def test_ops_on_meta_tensors_give_torchs_shapes_and_dtypes():
    args = [t.to("meta") for t in inputs()]
    want = all_ops64(*[t.double() if t.is_floating_point() else t for t in inputs()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = all_ops(*args, tables=(COS.to("meta"), SIN.to("meta")))
    for name, g in got.items():
        assert g.is_meta and g.shape == want[name].shape and g.dtype == torch.float32, \
            f"{name} on meta tensors: {g.device}, {tuple(g.shape)}, {g.dtype}"


@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_over_every_op_matches_float64(in_dim):
    """torch.vmap over a batch dim (first, or second: a strided batch) of every op's tensor inputs."""
    x, r = randn(50, 4, 3, 8), randn(51, 4, 3, 8)
    q, k, v = randn(52, 4, 1, 2, 3, 8), randn(53, 4, 1, 2, 5, 8), randn(54, 4, 1, 2, 5, 8)
    q16, k16 = randn(55, 4, 1, 4, 2, 16), randn(56, 4, 1, 4, 1, 16)
    w, b = randn(57, 8), randn(58, 8)
    m = lambda t: t.movedim(0, in_dim)                                               # noqa: E731
    d = lambda t: t.double()                                                         # noqa: E731
    c, s = COS.double()[None, :, None, :], SIN.double()[None, :, None, :]
    cases = {
        "rms_norm": (lambda x: ops.rms_norm(x, w), (x,), F.rms_norm(d(x), (8,), d(w), 1e-6)),
        "add_layer_norm": (lambda x, r: ops.add_layer_norm(x, r, w, b)[0], (x, r),
                           F.layer_norm(d(x) + d(r), (8,), d(w), d(b), 1e-5)),
        "swiglu": (ops.swiglu, (x,), F.silu(d(x)[..., :4]) * d(x)[..., 4:]),
        "attention": (lambda q, k, v: tilestack.attention(q, k, v, causal=True), (q, k, v),
                      F.scaled_dot_product_attention(d(q), d(k), d(v), is_causal=True)),
        "rotary": (lambda q, k: ops.rotary(q, k, COS, SIN)[0], (q16, k16),
                   torch.cat((d(q16)[..., :8] * c - d(q16)[..., 8:] * s, d(q16)[..., 8:] * c + d(q16)[..., :8] * s),
                             -1)),
    }
    with config.override(backend="reference"), poisoned_allocations(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (fn, args, want) in cases.items():
            got = torch.vmap(fn, in_dims=in_dim)(*[m(t) for t in args])
            close(got, want, 3e-5, f"vmap {name} in_dims={in_dim}")
