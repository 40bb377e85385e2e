"""SDPA parity, round one: ``tilestack.scaled_dot_product_attention`` argument for argument against torch's
``F.scaled_dot_product_attention`` on the CPU backends (reference, Triton under its interpreter).

Each case either answers as torch does (float64 torch SDPA is the truth: the output, its NaN pattern, its dtype
and shape, and the gradients of q, k, v and a mask that requires grad, to the input dtype's tolerance), or raises
where torch raises (torch's exception type and message: a call the kernels do not take is handed to torch).
Covered: ranks 3, 4 and 5; attn_mask of every broadcastable shape, boolean and additive, rows masked everywhere
(by False, -inf and ``finfo.min``), mask dtypes unlike q's; is_causal with a mask and with L != S; scale None, a
number, 0, an int, negative; GQA with and without enable_gqa; Ev != E; head dims 1 to 300; fp32, fp16, bf16,
fp64 and mixed; non-contiguous inputs; zero-length L, S, B and H; meta tensors; torch's signature.

What it found (the tests failed before their fix):
- a mask of rank 5 (which broadcasts to (B, H, L, S)) reached the kernels, whose check raised a LaunchError (a
  ValueError) where torch raises a RuntimeError; q, k, v or the mask on different devices (meta beside CPU) did
  the same, and a meta mask beside CPU inputs, which torch answers, raised: both go to torch now
  (``sdpa.unsupported``);
- key and value with different sequence lengths were handed to torch, whose CPU flash kernel answered from memory
  past the shorter one and whose backward then corrupted the heap (the test process died): refused first with a
  RuntimeError naming both (``errors.TorchArgumentError``, a LaunchError too);
- ``scale`` and ``enable_gqa`` were accepted positionally (torch's are keyword-only: a TypeError);
- a row masked everywhere by an additive ``torch.finfo(dtype).min`` (f32, bf16) gave 0 where torch averages v
  (its softmax of equal huge scores is uniform): the kernels' log2-domain bias overflowed to -inf; a finite bias
  below -MAX_BIAS now counts as -MAX_BIAS (``kernels.attention_fwd.add_bias``).
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import tilestack
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.torch import sdpa as sdpa_module

torch_sdpa = sdpa_module.torch_sdpa
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
B, H, L, S, E = 2, 3, 19, 23, 16        # L and S past one 16-row tile of the CPU configs


def gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(g, lead=(B, H), hkv=None, l=L, s=S, e=E, ev=None, dtype=torch.float32):   # noqa: E741
    kv = (*lead[:-1], hkv if hkv is not None else lead[-1]) if lead else ()
    return dict(query=randn(g, *lead, l, e, dtype=dtype), key=randn(g, *kv, s, e, dtype=dtype),
                value=randn(g, *kv, s, ev or e, dtype=dtype))


def bool_mask(g, *shape, p_keep=0.7):
    return torch.rand(shape, generator=g) < p_keep


def family(e: BaseException) -> type:
    """The builtin exception class an error is caught as (RuntimeError, TypeError, ValueError, ...)."""
    return next(c for c in type(e).__mro__ if c.__module__ == "builtins")


def as_f64(x):
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def run(fn, kw, grads: bool, cast=None):
    """fn(**kw) with fresh leaves (cast by ``cast``, float64 for the truth); the output and the gradients of q, k, v
    and of a mask that requires grad."""
    kw = {n: ((cast(x) if cast else x).detach().clone().requires_grad_(grads and (n != "attn_mask" or
                                                                                    x.requires_grad))
              if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    o = fn(**kw)
    if not grads:
        return o.detach(), {}
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(o.dtype)
    o.backward(do)
    return o.detach(), {n: x.grad for n, x in kw.items() if isinstance(x, torch.Tensor) and x.requires_grad}


def rel(got, want, floor: float = 1e-30) -> float:
    """The error's norm relative to the truth's, or to ``floor`` where the truth is about 0."""
    got, want = got.double(), want.double()
    if got.numel() == 0:
        return 0.0
    return float((got - want).norm() / want.norm().clamp_min(floor))


def check_parity(kw: dict, backend: str = "reference", grads: bool = True, math_truth: bool = False) -> str:
    """tilestack's answer to ``kw`` against torch's: "raised" or "answered". ``math_truth``: the float64 truth from
    torch's math backend, where its CPU flash kernel's float64 lse absorbs log l (a row whose keys all carry
    finfo.min: its backward takes each key's P as 1, the math backend and tilestack 1 / l)."""
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want_dtype_out = torch_sdpa(**kw)
    except Exception as theirs:   # noqa: BLE001 (any of torch's errors)
        with config.override(backend=backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(family(theirs)) as ours:
                tilestack.scaled_dot_product_attention(**kw)
        assert str(ours.value) == str(theirs), (str(ours.value), str(theirs))
        return "raised"
    dtype = kw["query"].dtype if isinstance(kw.get("query"), torch.Tensor) else torch.float32
    with config.override(backend=backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o, g = run(tilestack.scaled_dot_product_attention, kw, grads)
    if math_truth:
        with sdpa_kernel(SDPBackend.MATH):
            o64, g64 = run(torch_sdpa, kw, grads, cast=torch.Tensor.double)
        o64 = o64.nan_to_num()                  # (the math backend's NaN for a row that sees no key: 0 here)
        g64 = {n: x.nan_to_num() for n, x in g64.items()}
    else:
        o64, g64 = run(torch_sdpa, kw, grads, cast=torch.Tensor.double)
    assert o.shape == want_dtype_out.shape and o.dtype == want_dtype_out.dtype
    assert torch.equal(o.isnan(), o64.isnan()), "NaN where float64 torch has none, or none where it has"
    finite = ~o64.isnan()
    tol = TOL.get(dtype, 1e-5)
    assert rel(o[finite], o64[finite]) <= tol
    assert g.keys() == g64.keys()
    for n in g:
        assert g[n].shape == g64[n].shape and torch.equal(g[n].isnan(), g64[n].isnan()), n
        # (a floor of 1% of the incoming gradient's norm: a gradient that is 0 in exact arithmetic, e.g. dq where
        # each row sees one key, is 1e-16 in float64 and the rounding of dP - delta here)
        assert rel(g[n].nan_to_num(), g64[n].nan_to_num(), floor=max(0.01 * o.numel() ** 0.5, 1e-30)) <= 2 * tol, n
    return "answered"


# ---- ranks and attn_mask shapes --------------------------------------------------------------------------------------
MASK_SHAPES = {"LS": (L, S), "11LS": (1, 1, L, S), "B1LS": (B, 1, L, S), "BHLS": (B, H, L, S), "HLS": (H, L, S),
               "B11S": (B, 1, 1, S), "1S": (1, S)}


def _masked(name, kind, shape):
    g = gen(name)
    kw = qkv(g)
    kw["attn_mask"] = bool_mask(g, *shape) if kind == "bool" else 2.0 * randn(g, *shape)
    return kw


CASES = {
    "rank3": lambda g: qkv(g, lead=(H,)),
    "rank3-causal": lambda g: qkv(g, lead=(H,)) | dict(is_causal=True),
    "rank4": lambda g: qkv(g),
    "rank5": lambda g: qkv(g, lead=(2, B, H)),
    "rank5-bool-mask": lambda g: qkv(g, lead=(2, B, H)) | dict(attn_mask=bool_mask(g, L, S)),
    "rank5-causal": lambda g: qkv(g, lead=(2, 1, H)) | dict(is_causal=True),
    "rank2": lambda g: qkv(g, lead=()),
    "rank3-q-rank4-kv": lambda g: qkv(g) | dict(query=randn(g, H, L, E)),
    "kv-batch-broadcast": lambda g: qkv(g) | dict(key=randn(g, 1, H, S, E), value=randn(g, 1, H, S, E)),
    "mask-rank1": lambda g: qkv(g) | dict(attn_mask=bool_mask(g, S)),
    "mask-rank5-ones": lambda g: qkv(g) | dict(attn_mask=randn(g, 1, 1, 1, L, S)),
    "mask-rank5": lambda g: qkv(g) | dict(attn_mask=randn(g, 2, B, H, L, S)),
    "mask-wrong-L": lambda g: qkv(g) | dict(attn_mask=randn(g, L + 1, S)),
    "mask-wrong-H": lambda g: qkv(g) | dict(attn_mask=randn(g, H + 1, L, S)),
    "mask-expanded": lambda g: qkv(g) | dict(attn_mask=randn(g, 1, 1, 1, S).expand(B, H, L, S)),
    "mask-transposed": lambda g: qkv(g) | dict(attn_mask=randn(g, S, L).t()),
    "mask-bool-transposed": lambda g: qkv(g) | dict(attn_mask=bool_mask(g, S, L).t()),
    # masks unlike q's dtype: f32 with half inputs is torch's; anything else is refused by torch
    "mask-f32-q-bf16": lambda g: qkv(g, dtype=torch.bfloat16) | dict(attn_mask=randn(g, B, 1, L, S)),
    "mask-f32-q-f16": lambda g: qkv(g, dtype=torch.float16) | dict(attn_mask=randn(g, L, S)),
    "mask-f64-q-f32": lambda g: qkv(g) | dict(attn_mask=randn(g, L, S, dtype=torch.float64)),
    "mask-f16-q-f32": lambda g: qkv(g) | dict(attn_mask=randn(g, L, S, dtype=torch.float16)),
    "mask-bf16-q-f16": lambda g: qkv(g, dtype=torch.float16) | dict(attn_mask=randn(g, L, S, dtype=torch.bfloat16)),
    "mask-int": lambda g: qkv(g) | dict(attn_mask=torch.zeros(L, S, dtype=torch.int32)),
    "mask-uint8": lambda g: qkv(g) | dict(attn_mask=torch.ones(L, S, dtype=torch.uint8)),
    "mask-list": lambda g: qkv(g, l=2, s=3) | dict(attn_mask=[[0.0] * 3] * 2),
    # is_causal
    "causal-L<S": lambda g: qkv(g) | dict(is_causal=True),
    "causal-L>S": lambda g: qkv(g, l=S, s=L) | dict(is_causal=True),
    "causal-L1": lambda g: qkv(g, l=1) | dict(is_causal=True),
    "causal-with-bool-mask": lambda g: qkv(g) | dict(attn_mask=bool_mask(g, L, S), is_causal=True),
    "causal-with-float-mask": lambda g: qkv(g) | dict(attn_mask=randn(g, B, 1, L, S), is_causal=True),
    "causal-int": lambda g: qkv(g) | dict(is_causal=1),
    # scale
    "scale-0.125": lambda g: qkv(g) | dict(scale=0.125),
    "scale-0.0": lambda g: qkv(g) | dict(scale=0.0),
    "scale-int-0": lambda g: qkv(g) | dict(scale=0),
    "scale-int-2": lambda g: qkv(g) | dict(scale=2),
    "scale-negative": lambda g: qkv(g) | dict(scale=-0.5),
    "scale-str": lambda g: qkv(g) | dict(scale="0.5"),
    "scale-0-causal-mask": lambda g: qkv(g) | dict(scale=0.0, attn_mask=bool_mask(g, L, S)),
    # GQA
    "gqa-4-2": lambda g: qkv(g, lead=(B, 4), hkv=2) | dict(enable_gqa=True),
    "gqa-mqa-causal": lambda g: qkv(g, lead=(B, 4), hkv=1) | dict(enable_gqa=True, is_causal=True),
    "gqa-equal-heads": lambda g: qkv(g) | dict(enable_gqa=True),
    "gqa-3-2": lambda g: qkv(g, lead=(B, 3), hkv=2) | dict(enable_gqa=True),
    "gqa-2-4": lambda g: qkv(g, lead=(B, 2), hkv=4) | dict(enable_gqa=True),
    "no-gqa-4-2": lambda g: qkv(g, lead=(B, 4), hkv=2),
    "gqa-mask-per-q-head": lambda g: qkv(g, lead=(B, 4), hkv=2) | dict(enable_gqa=True,
                                                                       attn_mask=bool_mask(g, B, 4, L, S)),
    "gqa-int": lambda g: qkv(g) | dict(enable_gqa=1),
    # value head dim
    "Ev24": lambda g: qkv(g, ev=24),
    "Ev1-causal": lambda g: qkv(g, ev=1) | dict(is_causal=True),
    "E!=Ek": lambda g: qkv(g) | dict(key=randn(g, B, H, S, E + 1)),
    # dtypes
    "fp16-causal": lambda g: qkv(g, dtype=torch.float16) | dict(is_causal=True),
    "bf16-mask": lambda g: qkv(g, dtype=torch.bfloat16) | dict(attn_mask=bool_mask(g, B, 1, 1, S)),
    "fp64": lambda g: qkv(g, dtype=torch.float64) | dict(is_causal=True),
    "mixed-q-f32-k-f16": lambda g: qkv(g) | dict(key=randn(g, B, H, S, E, dtype=torch.float16)),
    "mixed-v-bf16": lambda g: qkv(g) | dict(value=randn(g, B, H, S, E, dtype=torch.bfloat16)),
    "mixed-q-f64": lambda g: qkv(g) | dict(query=randn(g, B, H, L, E, dtype=torch.float64)),
    "int-inputs": lambda g: {n: x.to(torch.int32) for n, x in qkv(g).items()},
    # layouts
    "non-contiguous": lambda g: dict(query=randn(g, B, L, H, E).transpose(1, 2),
                                     key=randn(g, B, S, H, E).transpose(1, 2),
                                     value=randn(g, B, H, E, S).transpose(-1, -2)),
    "sliced": lambda g: {n: x[..., ::2, :] for n, x in qkv(g, l=2 * L, s=2 * S).items()},
    # empty problems
    "L0": lambda g: qkv(g, l=0),
    "S0": lambda g: qkv(g, s=0),
    "S0-causal": lambda g: qkv(g, s=0) | dict(is_causal=True),
    "S0-mask": lambda g: qkv(g, s=0) | dict(attn_mask=torch.zeros(L, 0)),
    "B0": lambda g: qkv(g, lead=(0, H)),
    "H0": lambda g: qkv(g, lead=(B, 0)),
    "E0": lambda g: qkv(g, e=0),
    # dropout's edges (the statistics: test_sdpa_parity_round1_more.py)
    "dropout-1.0": lambda g: qkv(g) | dict(dropout_p=1.0),
    "dropout-above-1": lambda g: qkv(g) | dict(dropout_p=1.5),
    "dropout-negative": lambda g: qkv(g) | dict(dropout_p=-0.1),
    "dropout-str": lambda g: qkv(g) | dict(dropout_p="0"),
}
for _shape_name, _shape in MASK_SHAPES.items():
    for _kind in ("bool", "float"):
        CASES[f"mask-{_kind}-{_shape_name}"] = (lambda n, k, s: lambda g: _masked(n, k, s))(
            f"mask-{_kind}-{_shape_name}", _kind, _shape)

# what torch does with each (so that a change in torch shows up here, not as a silent change of meaning)
RAISES = {"mask-rank1", "mask-rank5-ones", "mask-rank5", "mask-wrong-L", "mask-wrong-H",
          "mask-f64-q-f32", "mask-f16-q-f32", "mask-bf16-q-f16", "mask-int", "mask-uint8", "mask-list",
          "causal-int", "scale-str", "gqa-3-2", "gqa-2-4", "no-gqa-4-2", "gqa-int", "E!=Ek", "mixed-q-f32-k-f16",
          "mixed-v-bf16", "mixed-q-f64", "int-inputs", "dropout-above-1", "dropout-negative", "dropout-str"}


@pytest.mark.parametrize("case", list(CASES))
def test_answers_as_torch_or_raises_as_torch(case):
    outcome = check_parity(CASES[case](gen(case)))
    assert outcome == ("raised" if case in RAISES else "answered")


TRITON_CASES = ["rank4", "mask-bool-B1LS", "mask-float-BHLS", "mask-float-HLS", "causal-L>S", "gqa-mqa-causal",
                "Ev24", "bf16-mask", "non-contiguous", "S0"]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_backend_answers_as_torch(case):
    assert check_parity(CASES[case](gen(case)), backend="triton") == "answered"


# ---- rows masked everywhere ------------------------------------------------------------------------------------------
def _rows_masked(kind: str, dtype):
    """Rows 1 and 4 of a (L, S) mask see no key; row 2 sees only keys masked by finfo.min (when additive)."""
    g = gen(f"rows-{kind}-{dtype}")
    kw = qkv(g, dtype=dtype)
    if kind == "bool":
        m = bool_mask(g, L, S)
        m[[1, 4]] = False
    else:
        low = {"-inf": -math.inf, "finfo.min": torch.finfo(dtype).min}[kind]
        m = randn(g, L, S, dtype=dtype).masked_fill(bool_mask(g, L, S, p_keep=0.3), low)
        m[[1, 4]] = low
        m[2, :5] = -math.inf
        m[2, 5:] = torch.finfo(dtype).min          # finfo.min beside -inf: torch averages over the finfo.min keys
    return kw | dict(attn_mask=m)


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("kind", ("bool", "-inf", "finfo.min"))
def test_rows_masked_everywhere_match_torch(kind, dtype, backend):
    """torch gives 0 for a row that sees no key (False or -inf everywhere), and averages v over the keys of a row
    masked only by a finite huge negative value (finfo.min): the same here, forward and backward."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the reference backend covers it; the interpreter is slow")
    kw = _rows_masked(kind, dtype)
    assert check_parity(kw, backend=backend, math_truth=kind != "bool") == "answered"
    with config.override(backend=backend):
        o = tilestack.scaled_dot_product_attention(**kw)
    if kind != "finfo.min":
        assert not o[:, :, [1, 4]].any()
    elif dtype != torch.float16:   # f32's and bf16's lowest absorb the scores (fp16's, -65504, does not)
        want = kw["value"].double().mean(2)
        assert rel(o[:, :, 1], want) <= TOL[dtype] and rel(o[:, :, 4], want) <= TOL[dtype]


def test_a_nan_query_row_is_nan_as_torchs_math_backend():
    """A NaN in q: torch's CPU flash kernel answers 0 for that row, its math backend (and CUDA's kernels) NaN; the
    kernels give the math backend's answer (NaN in exactly that row, every other row unchanged)."""
    kw = qkv(gen("nan-row"))
    kw["query"][1, 2, 3, 5] = math.nan
    with config.override(backend="reference"):
        o = tilestack.scaled_dot_product_attention(**kw)
    with sdpa_kernel(SDPBackend.MATH):
        want = torch_sdpa(**{n: as_f64(x) for n, x in kw.items()})
    assert torch.equal(o.isnan(), want.isnan()) and int(o.isnan().any(-1).sum()) == 1
    assert rel(o.nan_to_num(), want.nan_to_num()) <= TOL[torch.float32]


# ---- head dims -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("d", (1, 7, 80, 96, 112, 160, 256, 300))
def test_head_dims_match_torch(d, backend):
    if backend == "triton" and d in (1, 96, 160):
        pytest.skip("the reference backend covers it; the interpreter is slow")
    kw = qkv(gen(f"hd{d}"), lead=(1, 2), l=9, s=13, e=d, ev=max(1, d // 2)) | dict(is_causal=True)
    assert check_parity(kw, backend=backend) == "answered"


def test_head_dim_past_256_goes_to_torch_once_with_a_notice(monkeypatch):
    kw = qkv(gen("hd300-notice"), lead=(1, 2), l=5, s=6, e=300)
    monkeypatch.setattr(sdpa_module, "attention", lambda *a, **k: pytest.fail("the kernels ran a 300-wide head"))
    sdpa_module._noticed.clear()
    with config.override(backend="reference"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = [tilestack.scaled_dot_product_attention(**kw) for _ in range(2)]
    notices = [str(w.message) for w in seen if "handing" in str(w.message)]
    assert len(notices) == 1 and "head dims 300" in notices[0]
    assert torch.equal(ours[0], torch_sdpa(**kw)) and torch.equal(ours[1], ours[0])


# ---- devices, meta tensors, the signature ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["rank4", "gqa-4-2", "Ev24", "mask-bool-BHLS", "mask-float-HLS", "causal-L>S",
                                  "rank3", "rank5", "fp16-causal", "S0"])
def test_meta_tensors_give_torchs_shape_and_dtype(case):
    kw = {n: x.to("meta") if isinstance(x, torch.Tensor) else x for n, x in CASES[case](gen(case)).items()}
    want = torch_sdpa(**kw)
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tilestack.scaled_dot_product_attention(**kw)
    assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("on_meta", [("query",), ("key", "value"), ("value",), ("query", "key", "value")])
def test_inputs_on_different_devices_raise_as_torch(on_meta):
    kw = qkv(gen("devices"), l=5, s=6)
    kw |= {n: kw[n].to("meta") for n in on_meta}
    if len(on_meta) == 3:      # all of q, k, v on meta, the mask on the CPU
        kw["attn_mask"] = torch.zeros(5, 6)
    assert check_parity(kw, grads=False) == "raised"


def test_a_meta_mask_beside_cpu_inputs_is_torchs_to_answer():
    """torch answers it (what it reads for the mask is its business); the kernels' device check refused it."""
    kw = qkv(gen("meta-mask"), l=5, s=6) | dict(attn_mask=torch.zeros(5, 6, device="meta"))
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tilestack.scaled_dot_product_attention(**kw)
    assert got.shape == torch_sdpa(**kw).shape and got.device.type == "cpu"


@pytest.mark.parametrize("extra", [(0.5,), (0.5, True), (None, False)], ids=("scale", "scale-gqa", "defaults"))
def test_scale_and_enable_gqa_are_keyword_only_as_torchs(extra):
    kw = qkv(gen("positional"), l=4, s=5)
    args = (kw["query"], kw["key"], kw["value"], None, 0.0, False, *extra)
    with pytest.raises(TypeError) as theirs:
        torch_sdpa(*args)
    with config.override(backend="reference"), pytest.raises(TypeError, match="positional argument"):
        tilestack.scaled_dot_product_attention(*args)
    assert "positional argument" in str(theirs.value)
    # and by keyword, both answer the same
    with config.override(backend="reference"):
        got = tilestack.scaled_dot_product_attention(*args[:6], scale=0.5, enable_gqa=True)
    assert rel(got, torch_sdpa(*args[:6], scale=0.5, enable_gqa=True)) <= TOL[torch.float32]


@pytest.mark.parametrize("lead", [(B, H), (H,), (2, B, H)], ids=("rank4", "rank3", "rank5"))
def test_key_and_value_of_different_lengths_raise_a_runtime_error_before_torch_sees_them(lead, monkeypatch):
    """torch's math backend raises a RuntimeError; its CPU flash kernel (a CPU call's) answered from memory past
    the shorter tensor and its backward corrupted the heap (the process died), so the drop-in refuses it first."""
    kw = qkv(gen("kv-lengths"), lead=lead, l=5, s=6)
    kw["value"] = randn(gen("v"), *lead, 7, E).requires_grad_()
    with sdpa_kernel(SDPBackend.MATH), pytest.raises(RuntimeError):
        torch_sdpa(**kw)
    monkeypatch.setattr(sdpa_module, "torch_sdpa", lambda *a, **k: pytest.fail("handed to torch"))
    for backend in ("reference", "auto"):
        with config.override(backend=backend), pytest.raises(RuntimeError, match=r"key has 6 keys and value 7"):
            tilestack.scaled_dot_product_attention(**kw)
    with pytest.raises(LaunchError):
        tilestack.scaled_dot_product_attention(**kw)


# ---- a mask that requires grad ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(B, H, L, S), (L, S), (B, 1, 1, S)], ids=str)
def test_a_mask_that_requires_grad_gets_torchs_gradient(shape):
    g = gen(f"mask-grad-{shape}")
    kw = qkv(g) | dict(attn_mask=randn(g, *shape).requires_grad_())
    assert check_parity(kw) == "answered"                    # checks the mask's gradient against float64 torch

