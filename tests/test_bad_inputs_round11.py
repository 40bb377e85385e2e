"""Round eleven of the bad-input sweep: config keys of the kernel functions (misspelled, of the wrong type, or
naming a constant the function sets itself), ``attention_forward``'s ``schedule=`` and the ping-pong kernel on odd
layouts, and ``ts.load_scalar`` on the Triton backend (Triton's interpreter on a CPU) against the reference.

What rounds 1-10 did not reach, and what it found (each test marked so failed before its fix):
- a config key naming a kernel constant the function derives from its inputs was taken over the function's own
  value or clashed with it: ``attention_forward(q, k, v, DV=8)`` on a head dim of 16 answered wrong without a word
  (NaN on the reference, garbage under Triton), ``D=32`` and ``attention_backward(config={'dq': {'DV': ...}})`` the
  same way, and ``gemm(bias=..., HAS_BIAS=False)``, ``add_rms_norm(CENTERED=True)``, ``rms_norm_backward(ADD_DH=
  True)``, ``fused_linear_cross_entropy(GRAD=False)``, ``quantized_linear(HAS_RESIDUAL=True)`` failed with a bare
  TypeError ("got multiple values for keyword argument"). Each is now a LaunchError naming the key, the value and
  what the function derives it from (``kernels._checks.refuse_derived``);
- ``attention_forward(schedule='pingpong', STAGE=3)`` (any key the ping-pong kernel does not take) dropped the key
  without a word and ran its defaults; now refused with the nearest name;
- ``layer_norm(x, w, b, ONE_TILE=True, BN=None)`` or ``BN='64'`` failed with a bare TypeError comparing BN with the
  row width, and ``ONE_TILE='yes'`` was taken as True (then blamed ``BN=0``): now refused naming BN / ONE_TILE;
- ``ts.load_scalar(X, I)`` with a constant index past int32 (``I=2**31`` into a small X: the reference reads the
  0 outside X) failed inside Triton's interpreter ("Scalar 2147483648 is out of range for type int32"), and
  from a float8_e4m3fn tensor ("cannot cast [0] to fp8e4nv"); both now read what the reference reads.

Checked and left as they are (pinned here): ``schedule=`` junk and ``backend=`` junk are refused by name; the
ping-pong kernel (reference and Triton's interpreter) answers as float64 attention on ragged lengths, both causal
alignments, GQA, expanded (stride 0) and transposed K/V, views at an element offset, Dv != D, head dim 1, with
NaN and inf propagating where torch's math gives them; ``schedule='pingpong'`` where the kernel cannot run (f32
inputs) runs the plain kernel with the same answer. A runtime ``ts.range`` step read from memory that is <= 0 is
refused by the reference (BackendError) but not checked by Triton (a device value; on a GPU a step of 0 would
loop forever): left as documented ("must be positive when the kernel runs"), see the report of round 11.
"""

from __future__ import annotations

import math

import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack import kernels as K
from tilestack.errors import LaunchError, TraceError
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.producers import norm_fp8

BACKENDS = ("reference", "triton")


@pytest.fixture(autouse=True)
def interpreter():
    with config.override(triton_interpret=True):
        yield


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sdpa64(q, k, v, *, causal=False, align="top_left"):
    """Attention in float64 by hand (GQA by repeating K/V heads); a row that sees no key gives 0; NaN and inf
    propagate as torch's math does (no nan_to_num)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    nq, nk = s.shape[-2:]
    if causal:
        keep = torch.ones(nq, nk, dtype=torch.bool).tril(0 if align == "top_left" else nk - nq)
        s = s.masked_fill(~keep, -math.inf)
        empty = ~keep.any(-1)                                     # rows that see no key: 0
        s = s.masked_fill(empty[:, None], 0.0)
        p = torch.softmax(s, -1).masked_fill(empty[:, None], 0.0)
    else:
        p = torch.softmax(s, -1)
    return p @ v


# ---- 1. config keys a function derives itself ------------------------------------------------------------------
def _derived_cases():
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 8, 16, seed=1), randn(1, 2, 8, 16, seed=2)
    o, lse = K.attention_forward(q, k, v, backend="reference")
    do = randn(1, 2, 8, 16, seed=3)
    a, b = randn(8, 16, dtype=torch.bfloat16), randn(16, 8, dtype=torch.bfloat16, seed=1)
    x, w, bias = randn(6, 40), randn(40, seed=1), randn(40, seed=2)
    rstd = torch.ones(6)
    wq, sq = quantize_weight(randn(8, 16, seed=4), "int8")
    labels = torch.tensor([1, 0, 3, 2, 1, 0])
    head = randn(5, 40, seed=5)
    return [
        ("attention_forward DV", lambda: K.attention_forward(q, k, v, DV=8), "config sets DV=8, which "
         "attention_forward derives from v's head dim"),
        ("attention_forward D", lambda: K.attention_forward(q, k, v, D=32), "config sets D=32, which "
         "attention_forward derives from q's head dim"),
        ("attention_forward pingpong DV", lambda: K.attention_forward(q.half(), k.half(), v.half(),
                                                                       schedule="pingpong", DV=8), "sets DV=8"),
        ("attention_backward dq DV", lambda: attention_backward(q, k, v, o, lse, do, config={"dq": {"DV": 8}}),
         r"config\['dq'\] sets DV=8, which attention_backward derives"),
        ("attention_backward dkdv causal", lambda: attention_backward(q, k, v, o, lse, do,
                                                                        config={"dkdv": {"causal": True}}),
         r"config\['dkdv'\] sets causal=True"),
        ("attention_backward PER_Q_HEAD", lambda: attention_backward(q, k, v, o, lse, do,
                                                                       config={"dkdv": {"PER_Q_HEAD": True}}),
         "sets PER_Q_HEAD=True"),
        ("gemm HAS_BIAS", lambda: K.gemm(a, b, bias=torch.ones(8), HAS_BIAS=False),
         "gemm: config sets HAS_BIAS=False, which gemm derives from its bias argument"),
        ("gemm TRANS_B", lambda: K.gemm(a, b, bias=torch.ones(8), TRANS_B=True), "sets TRANS_B=True"),
        ("gemm HAS_RESIDUAL", lambda: K.gemm(a, b, HAS_RESIDUAL=True), "sets HAS_RESIDUAL=True"),
        ("add_rms_norm CENTERED", lambda: K.add_rms_norm(x, x, w, CENTERED=True),
         "add_rms_norm: config sets CENTERED=True"),
        ("add_layer_norm CENTERED", lambda: K.add_layer_norm(x, x, w, bias, CENTERED=False),
         "add_layer_norm: config sets CENTERED=False"),
        ("rms_norm_backward ADD_DH", lambda: K.rms_norm_backward(x, x, w, rstd, ADD_DH=True),
         "rms_norm_backward: config sets ADD_DH=True, which rms_norm_backward derives from its dh argument"),
        ("layer_norm_backward CENTERED", lambda: K.layer_norm_backward(x, x, w, torch.zeros(6), rstd,
                                                                        CENTERED=False), "sets CENTERED=False"),
        ("cross_entropy GRAD", lambda: K.fused_linear_cross_entropy(head, randn(4, 40, seed=6), labels[:5],
                                                                    GRAD=False), "sets GRAD=False"),
        ("quantized_linear HAS_RESIDUAL", lambda: quantized_linear(randn(4, 16), wq, sq, HAS_RESIDUAL=True),
         "quantized_linear: config sets HAS_RESIDUAL=True"),
        ("norm_fp8 CENTERED", lambda: norm_fp8(x, w, None, 1e-6, 1.0, CENTERED=True), "sets CENTERED=True"),
    ]


@pytest.mark.parametrize("case", _derived_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_config_key_the_function_derives_is_refused_by_name(case, backend):
    """Before: DV=8 / D=32 a wrong answer without a word, the others a bare TypeError ('got multiple values')."""
    _, call, needle = case
    with config.override(backend=backend), pytest.raises(LaunchError, match=needle):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_shapes_in_the_config_still_answer_as_float64(backend):
    """What the config is for still works: block shapes and the schedule, against float64 attention."""
    q, k, v = randn(1, 2, 40, 16), randn(1, 2, 24, 16, seed=1), randn(1, 2, 24, 16, seed=2)
    o, _ = K.attention_forward(q, k, v, backend=backend, BM=32, BN=16)
    torch.testing.assert_close(o.double(), sdpa64(q, k, v), rtol=1e-5, atol=1e-5)
    qh, kh, vh = q.half(), k.half(), v.half()
    o, _ = K.attention_forward(qh, kh, vh, backend=backend, schedule="pingpong", BN=16, STAGES=3)
    torch.testing.assert_close(o.double(), sdpa64(qh, kh, vh), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("key", ["STAGE", "bn", "bogus"])
def test_a_pingpong_key_it_does_not_take_is_refused_with_the_nearest(key):
    """Before: dropped by the ping-pong launcher (it keeps only its own keys), the defaults ran in its place."""
    q, k, v = (randn(1, 2, 40, 16, dtype=torch.float16, seed=s) for s in range(3))
    hint = {"STAGE": r" \('STAGE': did you mean 'STAGES'\?\)", "bn": r" \('bn': did you mean 'BN'\?\)",
            "bogus": ""}[key]
    with pytest.raises(LaunchError, match=rf"schedule='pingpong' config key\(s\) \['{key}'\]{hint} are not the "
                                          r"ping-pong kernel's; expected its tunables \['BM', 'BN', 'STAGES'\]"):
        K.attention_forward(q, k, v, backend="reference", schedule="pingpong", **{key: 3})


@pytest.mark.parametrize("schedule", ["junk", None, "PINGPONG", ["plain"]])
def test_schedule_outside_its_two_values_is_refused(schedule):
    q = randn(1, 1, 8, 16)
    with pytest.raises(LaunchError, match=r"schedule=.*; expected 'plain' or 'pingpong'"):
        K.attention_forward(q, q, q, backend="reference", schedule=schedule)


@pytest.mark.parametrize("backend", ["junk", "Triton", 3, ""])
def test_backend_junk_is_refused_naming_the_choices(backend):
    from tilestack.errors import BackendError
    q = randn(1, 1, 8, 16)
    with pytest.raises(BackendError, match=r"backend=.*; expected one of \('reference', 'triton', 'gluon'\)"):
        K.attention_forward(q, q, q, backend=backend)


@pytest.mark.parametrize("fn", ["layer_norm", "softmax", "rms_norm"])
@pytest.mark.parametrize("cfg,needle", [
    (dict(ONE_TILE=True, BN=None), r"BN=None \(NoneType\); expected an int"),
    (dict(ONE_TILE=True, BN="64"), r"BN='64' \(str\); expected an int"),
    (dict(ONE_TILE="yes"), r"ONE_TILE='yes' \(str\); expected a bool"),
])
def test_row_config_of_the_wrong_type_is_refused_naming_it(fn, cfg, needle):
    """Before: a bare TypeError comparing BN with the row width; ONE_TILE='yes' taken as True (then 'BN=0')."""
    x, w, b = randn(6, 40), randn(40, seed=1), randn(40, seed=2)
    args = {"layer_norm": (x, w, b), "softmax": (x,), "rms_norm": (x, w)}[fn]
    with config.override(backend="reference"), pytest.raises(LaunchError, match=rf"{fn}: {needle}"):
        getattr(K, fn)(*args, **cfg)


# ---- 2. the ping-pong kernel on odd layouts, against float64 ---------------------------------------------------
def _layouts():
    h = torch.float16
    q, k, v = randn(1, 2, 40, 16, dtype=h), randn(1, 2, 24, 16, dtype=h, seed=1), randn(1, 2, 24, 16, dtype=h,
                                                                                           seed=2)
    nan_q, inf_k, nan_v = q.clone(), k.clone(), v.clone()
    nan_q[0, 0, 3, 2], inf_k[0, 1, 5, 0], nan_v[0, 1, 5, 0] = math.nan, math.inf, math.nan
    return {
        "ragged": (q, k, v, {}),
        "causal": (q, k, v, dict(causal=True)),
        "causal bottom-right": (q, k, v, dict(causal=True, causal_align="bottom_right")),
        "gqa": (randn(1, 4, 40, 16, dtype=h, seed=3), k, v, {}),
        "expanded kv heads": (q, randn(1, 1, 24, 16, dtype=h, seed=4).expand(1, 2, 24, 16),
                              randn(1, 1, 24, 16, dtype=h, seed=5).expand(1, 2, 24, 16), {}),
        "one key expanded": (q, randn(1, 2, 1, 16, dtype=h, seed=6).expand(1, 2, 24, 16), v, {}),
        "transposed q": (randn(1, 40, 2, 16, dtype=h, seed=7).transpose(1, 2), k, v, {}),
        "offset view": (randn(1, 2, 41, 16, dtype=h, seed=8)[:, :, 1:], k, v, {}),
        "head dim 1": (randn(1, 2, 40, 1, dtype=h), randn(1, 2, 24, 1, dtype=h, seed=1),
                       randn(1, 2, 24, 1, dtype=h, seed=2), {}),
        "dv != d": (q, k, randn(1, 2, 24, 40, dtype=h, seed=9), {}),
        "nan in q": (nan_q, k, v, {}),
        "inf in k": (q, inf_k, v, {}),
        "nan in v": (q, k, nan_v, {}),
        "bf16": (q.bfloat16(), k.bfloat16(), v.bfloat16(), {}),
        "f32 (the plain kernel runs)": (q.float(), k.float(), v.float(), {}),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_layouts()))
def test_pingpong_answers_as_float64_attention(name, backend):
    """Already right (pinned): same NaN positions as torch's math, the rest within the dtype's tolerance."""
    q, k, v, kw = _layouts()[name]
    o, _ = K.attention_forward(q, k, v, backend=backend, schedule="pingpong", **kw)
    want = sdpa64(q, k, v, causal=kw.get("causal", False), align=kw.get("causal_align", "top_left"))
    assert torch.equal(o.isnan(), want.isnan()), (o.isnan().sum(), want.isnan().sum())
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[q.dtype]
    torch.testing.assert_close(o.double().nan_to_num(), want.nan_to_num(), rtol=tol, atol=tol)


# ---- 3. ts.load_scalar under Triton's interpreter, against the reference ---------------------------------------
@ts.kernel(grid=(1,))
def read_at(S, OUT, *, I: int = 0, D: int = 16):
    """OUT[0, :] = S[I] (as f32), 0 where I falls outside S."""
    v = ts.load_scalar(S, I)
    x = ts.RegTile[ts.f32, 1, D]()
    ts.fill(x, 0.0)
    ts.add(x, x, v * 1.0)
    ts.store(OUT, x, at=(0, 0))


def _read(backend, s, index):
    out = torch.full((1, 16), -7.0)
    read_at(s, out, I=index, backend=backend)
    return out


@pytest.mark.parametrize("index", [2**31, 2**40, 2**63 - 1, -(2**31) - 1, -(2**62)])
def test_a_constant_index_past_int32_reads_zero_as_the_reference(index):
    """Before: Triton's interpreter failed ('Scalar 2147483648 is out of range for type int32')."""
    s = torch.tensor([7, 8, 9], dtype=torch.int64)
    assert torch.equal(_read("reference", s, index), torch.zeros(1, 16))
    assert torch.equal(_read("triton", s, index), torch.zeros(1, 16))


def test_a_constant_index_past_int32_into_an_expanded_tensor_reads_its_element():
    """An index past 2**31 that is inside the tensor (expanded, stride 0: no memory behind it): the element."""
    s = torch.tensor([5], dtype=torch.int32).expand(2**31 + 8)
    for backend in BACKENDS:
        assert torch.equal(_read(backend, s, 2**31 + 3), torch.full((1, 16), 5.0)), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float8_scalar_reads_its_value(backend):
    """Before: Triton's interpreter failed on an f8e4m3 tensor ('cannot cast [0] to fp8e4nv'); E4M3's NaN is NaN."""
    s = torch.tensor([1.5, -448.0, math.nan]).to(torch.float8_e4m3fn)
    for i, want in enumerate([1.5, -448.0, math.nan]):
        got = _read(backend, s, i)
        assert torch.equal(got, torch.full((1, 16), want)) or (math.isnan(want) and bool(got.isnan().all())), got
    assert torch.equal(_read(backend, s, 3), torch.zeros(1, 16))          # past the end: 0


def test_misuse_of_load_scalar_is_refused_at_trace_time_by_name():
    """Already refused (pinned): a float scalar as a loop bound or a tile coordinate, a bool or tuple index, a vector
    as an index, a runtime scalar as the source."""
    x = torch.zeros(4, 16)

    @ts.kernel(grid=(1,))
    def float_bound(S, OUT):
        for _ in ts.range(0, ts.load_scalar(S, 0)):
            pass

    @ts.kernel(grid=(1,))
    def float_coordinate(S, X, OUT):
        t = ts.RegTile[ts.f32, 1, 16]()
        ts.load(t, X, at=(ts.load_scalar(S, 0), 0))

    @ts.kernel(grid=(1,))
    def bool_index(S, OUT):
        ts.load_scalar(S, True)

    @ts.kernel(grid=(1,))
    def tuple_index(S, OUT):
        ts.load_scalar(S, (0,))

    @ts.kernel(grid=(1,))
    def vector_index(S, OUT):
        ts.load_scalar(S, ts.RegVec[ts.i32, 4]())

    @ts.kernel(grid=(1,))
    def scalar_source(S, n: int, OUT):
        ts.load_scalar(n, 0)

    s = torch.tensor([3.0])
    cases = [(lambda: float_bound.trace(s, x), r"range: an operand must be an index, got a float scalar"),
             (lambda: float_coordinate.trace(s, x, x), r"load: at\[0\] must be an index, got a float scalar"),
             (lambda: bool_index.trace(s, x), r"index 0 into `S` must be an index \(int or index Scalar\), got bool"),
             (lambda: tuple_index.trace(s, x), r"index 0 into `S` must be an index .*got tuple"),
             (lambda: vector_index.trace(s, x), r"index 0 into `S` must be an index .*got Tile RegVec"),
             (lambda: scalar_source.trace(s, 3, x), r"load_scalar: src must be a global tensor argument, got Scalar")]
    for call, needle in cases:
        with pytest.raises(TraceError, match=needle):
            call()
