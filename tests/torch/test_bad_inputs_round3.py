"""Round three of the bad-input sweep of the PyTorch-facing API (tilestack.attention, the SDPA drop-in, the ops of
``tilestack.torch.ops``, ``tilestack.quantize`` / ``quant.quantized_linear`` / ``norm_fp8`` and
``tilestack.optimize``), as an outside user calls it, on the reference backend.

``REFUSED``, one row per mistake: it must raise the named error with a fragment naming the argument (what was
given, what was expected) before any work; each row failed before its fix (a silent answer where torch raises, an
AttributeError or a RuntimeError from deep inside, an error only after the GEMM ran, an option ignored without a
word, a sparse tensor's missing strides). The tests after it: edges that must give torch's answer (they crashed
or answered differently).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
import tilestack.compile
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import attention_forward, rotary_tables
from tilestack.kernels.rotary import reference as rotary_reference
from tilestack.quant import QuantLinear, accuracy_cost, quantize_weight, quantized_linear
from tilestack.quant.producers import norm_fp8
from tilestack.torch import ops


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(B=1, H=2, Hkv=2, Nq=5, Nk=7, D=16, Dv=None):
    return randn(B, H, Nq, D, seed=1), randn(B, Hkv, Nk, D, seed=2), randn(B, Hkv, Nk, Dv or D, seed=3)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@dataclasses.dataclass(frozen=True)
class Row:
    call: Callable[[], object]
    error: type[Exception]
    fragment: str


def _attention_rows() -> dict[str, Row]:
    q, k, v = qkv()
    rows = {}
    for name, fn in (("attention", tilestack.attention), ("attention_forward", attention_forward)):
        rows |= {
            f"{name}: k None": Row(lambda fn=fn: fn(q, None, v), LaunchError, "k must be a torch.Tensor, got NoneType"),
            f"{name}: scale past f32": Row(lambda fn=fn: fn(q, k, v, scale=1e300), LaunchError,
                                           "scale must be a positive number or None, got 1e+300"),
            f"{name}: attn_mask a list": Row(lambda fn=fn: fn(q, k, v, attn_mask=[[True] * 7] * 5), LaunchError,
                                             "attn_mask must be a torch.Tensor, got list"),
            f"{name}: attn_mask float64": Row(
                lambda fn=fn: fn(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float64)), LaunchError,
                "attn_mask has dtype float64; expected one of bool, float32"),
            f"{name}: attn_mask float16 with float32 q": Row(
                lambda fn=fn: fn(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float16)), LaunchError,
                "attn_mask has dtype float16"),
            f"{name}: attn_mask rank 1": Row(lambda fn=fn: fn(q, k, v, attn_mask=torch.ones(7, dtype=torch.bool)),
                                             LaunchError, "attn_mask is (7,); expected a shape broadcastable"),
            f"{name}: attn_mask rank 0": Row(lambda fn=fn: fn(q, k, v, attn_mask=torch.tensor(True)), LaunchError,
                                             "attn_mask is (); expected a shape broadcastable"),
        }
    qg = q.clone().requires_grad_()
    rows["attention: v a list, q requiring grad"] = Row(lambda: tilestack.attention(qg, k, v.tolist()), LaunchError,
                                                        "v must be a torch.Tensor, got list")
    sdpa = tilestack.scaled_dot_product_attention
    gq = qkv(H=4, Hkv=2)
    # the drop-in hands what the kernels do not take to torch, which raises as it would
    rows["sdpa: enable_gqa a string"] = Row(lambda: sdpa(*gq, enable_gqa="no"), TypeError, "enable_gqa")
    rows["sdpa: attn_mask rank 1"] = Row(lambda: sdpa(q, k, v, attn_mask=torch.ones(7, dtype=torch.bool)),
                                         IndexError, "")
    return rows


def _op_rows() -> dict[str, Row]:
    x, r, w = randn(3, 4, 8), randn(3, 4, 8, seed=4), randn(8, seed=5)
    q, k = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=7)
    cos, sin = rotary_tables(5, 16)
    h, lm, labels = randn(6, 8), randn(10, 8, seed=8), torch.tensor([0, 1, 2, 3, 4, 5])

    def ce(labels, ignore_index=-100):
        return ops.fused_linear_cross_entropy(h, lm, labels, ignore_index)

    return {
        # without a bias the op was RMS norm, a different answer from torch's layer norm without bias
        "layer_norm: bias None": Row(lambda: ops.layer_norm(x, w, None), LaunchError,
                                     "layer_norm: bias must be a torch.Tensor of shape (N,), got None"),
        "add_layer_norm: bias None": Row(lambda: ops.add_layer_norm(x, r, w, None), LaunchError,
                                         "add_layer_norm: bias must be a torch.Tensor"),
        "rotary: cos requires grad": Row(lambda: ops.rotary(q, k, cos.clone().requires_grad_(), sin), LaunchError,
                                         "cos requires grad"),
        "rotary: sin requires grad": Row(lambda: ops.rotary(q, k, cos, sin.clone().requires_grad_()), LaunchError,
                                         "sin requires grad"),
        # torch raises "Target 10 is out of bounds"; the kernel's one-hot matched no column: a wrong loss
        "fused_linear_cross_entropy: label = V": Row(lambda: ce(labels.where(labels != 5, 10)), LaunchError,
                                                     "labels holds 10 (at index 5); expected classes 0..V-1 = 0..9"),
        "fused_linear_cross_entropy: label -1": Row(lambda: ce(labels.where(labels != 2, -1)), LaunchError,
                                                    "labels holds -1 (at index 2)"),
        "fused_linear_cross_entropy: label 2**40": Row(lambda: ce(labels.where(labels != 0, 2**40)), LaunchError,
                                                       "labels holds 1099511627776"),
        "fused_linear_cross_entropy: int32 label = V": Row(lambda: ce(labels.int().where(labels != 1, 10)),
                                                           LaunchError, "labels holds 10"),
        "fused_linear_cross_entropy: ignore_index past int64": Row(lambda: ce(labels, 2**70), LaunchError,
                                                                   "ignore_index must be an int within"),
        # 2**32 + 3 compared with int32 labels wrapped to 3: label 3 silently ignored
        "fused_linear_cross_entropy: ignore_index past int32 labels": Row(
            lambda: ce(labels.int(), 2**32 + 3), LaunchError, "within the labels' torch.int32 range, got 4294967299"),
    }


def _quant_rows() -> dict[str, Row]:
    x = randn(5, 8)
    qf, sf = quantize_weight(randn(16, 8), "fp8")
    one, zero = torch.ones(8), torch.zeros(8)

    def calibrate(batches):
        return tilestack.quantize(mlp(), "fp8-act", calibration=batches)

    def quantized_mlp_backward():
        y = tilestack.quantize(mlp(), "int8")(x.clone().requires_grad_())
        y.sum().backward()

    def cost(batches, model=None):
        return accuracy_cost(model or mlp(), tilestack.quantize(mlp(), "int8"), batches)

    return {
        # no batch gave {"max_rel_err": 0.0, ...}: no error measured read as none
        "accuracy_cost: no batches": Row(lambda: cost([]), LaunchError, "batches gave no non-empty batch"),
        "accuracy_cost: only empty batches": Row(lambda: cost([x[:0]]), LaunchError, "no non-empty batch"),
        "accuracy_cost: batches an int": Row(lambda: cost(3), LaunchError, "batches must be an iterable"),
        "accuracy_cost: batches one tensor": Row(lambda: cost(x), LaunchError, "got Tensor"),
        "accuracy_cost: batch of the wrong shape": Row(lambda: cost([x, randn(5, 7)]), LaunchError,
                                                       "batch 1 ((5, 7)) failed in the model"),
        "accuracy_cost: model None": Row(lambda: accuracy_cost(None, mlp(), [x]), LaunchError,
                                         "model must be a torch.nn.Module, got NoneType"),
        "quantize: mode a list": Row(lambda: tilestack.quantize(mlp(), ["int8"]), LaunchError, "mode=['int8']"),
        "quantize: calibration batch of the wrong shape": Row(lambda: calibrate([randn(5, 7)]), LaunchError,
                                                              "calibration batch 0 ((5, 7)) failed in model(batch)"),
        "quantize: calibration batch of ints": Row(lambda: calibrate([x, x.long()]), LaunchError,
                                                   "calibration batch 1 ((5, 8)) failed"),
        "quantize: calibration an int": Row(lambda: calibrate(3), LaunchError,
                                            "calibration must be an iterable of sample batches"),
        "quantize: calibration one tensor": Row(lambda: calibrate(x), LaunchError, "got Tensor"),
        "quantize: skip an int": Row(lambda: tilestack.quantize(mlp(), "int8", skip=0), LaunchError,
                                     "skip must be layer names (a str or an iterable of str), got 0"),
        "QuantLinear: x of the wrong width": Row(lambda: tilestack.quantize(mlp(), "int8")(randn(5, 7)), LaunchError,
                                                 "QuantLinear: x is (5, 7); expected a tensor (..., in_features=8)"),
        # 2 x 16 reshapes to 4 x 8: the GEMM ran before the view back failed
        "QuantLinear: x of a width that divides": Row(lambda: tilestack.quantize(mlp(), "int8")(randn(2, 16)),
                                                      LaunchError, "x is (2, 16)"),
        "QuantLinear: x 0-d": Row(lambda: tilestack.quantize(mlp(), "int8")(x[0, 0]), LaunchError, "x is ()"),
        "QuantLinear: x a list": Row(lambda: tilestack.quantize(mlp(), "int8")(x.tolist()), LaunchError,
                                     "x is list"),
        "QuantLinear: backward": Row(quantized_mlp_backward, LaunchError, "runs inference only"),
        # their inverse (what the kernels multiply by) overflowed f32: NaN outputs
        "quantized_linear: x_scale 1e-300": Row(lambda: quantized_linear(x, qf, sf, x_scale=1e-300), LaunchError,
                                                "x_scale must be a finite number > 0, got 1e-300"),
        "quantized_linear: x_scale 1e300": Row(lambda: quantized_linear(x, qf, sf, x_scale=1e300), LaunchError,
                                               "x_scale must be a finite number > 0, got 1e+300"),
        "norm_fp8: x_scale 1e-300": Row(lambda: norm_fp8(x, one, zero, 1e-5, 1e-300), LaunchError,
                                        "x_scale must be a finite number > 0, got 1e-300"),
        "norm_fp8: eps None": Row(lambda: norm_fp8(x, one, zero, None, 0.1), LaunchError,
                                  "eps must be a number >= 0, got None"),
    }


def _optimize_rows() -> dict[str, Row]:
    def opt(**kw):
        return tilestack.optimize(mlp(), **kw)

    return {
        "optimize: unknown option": Row(lambda: opt(chek=True), LaunchError, "options ['chek'] unknown"),
        "optimize: check a string": Row(lambda: opt(check="no"), LaunchError, "check='no'; expected a bool"),
        "optimize: mode unknown": Row(lambda: opt(mode="fastest"), LaunchError, "mode='fastest'"),
        "optimize: passes an int": Row(lambda: opt(passes=3), LaunchError, "passes=3"),
        "optimize: passes unknown": Row(lambda: opt(passes=["nope"]), LaunchError, "passes ['nope'] unknown"),
        "optimize: dynamic a string": Row(lambda: opt(dynamic="yes"), LaunchError, "dynamic='yes'"),
        "optimize: fullgraph a string": Row(lambda: opt(fullgraph="no"), LaunchError, "fullgraph='no'"),
        "optimize: Inductor option with inner eager": Row(lambda: opt(inner="eager", max_autotune=True), LaunchError,
                                                          "apply only with inner='inductor'"),
        "optimize: Inductor bool option a string": Row(lambda: opt(max_autotune="x"), LaunchError,
                                                       "max_autotune='x'; expected a bool"),
    }


def _layout_rows() -> dict[str, Row]:
    """Sparse and mkldnn tensors: the plan key read their strides or data pointer (a RuntimeError from inside)."""
    x, w, b = randn(3, 4, 8), randn(8, seed=5), randn(8, seed=6)
    q, k, v = qkv()
    rq, rk = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=7)
    cos, sin = rotary_tables(5, 16)
    h, lm, labels = randn(6, 8), randn(10, 8, seed=8), torch.tensor([0, 1, 2, 3, 4, 5])
    q8, s8 = quantize_weight(randn(16, 8), "int8")
    sparse = "is layout torch.sparse_coo; expected a dense tensor"
    return {
        "rms_norm: x sparse": Row(lambda: ops.rms_norm(x.to_sparse(), w), LaunchError, f"rms_norm: x {sparse}"),
        "rms_norm: weight sparse": Row(lambda: ops.rms_norm(x, w.to_sparse()), LaunchError, f"weight {sparse}"),
        "layer_norm: x mkldnn": Row(lambda: ops.layer_norm(x.to_mkldnn(), w, b), LaunchError,
                                    "x is layout torch._mkldnn"),
        "add_rms_norm: r sparse": Row(lambda: ops.add_rms_norm(x, x.to_sparse(), w), LaunchError, f"r {sparse}"),
        "swiglu: x sparse": Row(lambda: ops.swiglu(x.to_sparse()), LaunchError, f"swiglu: x {sparse}"),
        "rotary: q sparse": Row(lambda: ops.rotary(rq.to_sparse(), rk, cos, sin), LaunchError, f"q {sparse}"),
        "attention: q sparse": Row(lambda: tilestack.attention(q.to_sparse(), k, v), LaunchError, f"q {sparse}"),
        "attention: q sparse, requiring grad": Row(
            lambda: tilestack.attention(q.to_sparse().requires_grad_(), k, v), LaunchError, f"q {sparse}"),
        "attention: attn_mask sparse": Row(
            lambda: tilestack.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool).to_sparse()),
            LaunchError, f"attn_mask {sparse}"),
        "fused_linear_cross_entropy: labels sparse": Row(
            lambda: ops.fused_linear_cross_entropy(h, lm, labels.to_sparse()), LaunchError, f"labels {sparse}"),
        "rms_norm: x nested": Row(lambda: ops.rms_norm(torch.nested.nested_tensor([x[0], x[1, :3]]), w),
                                  LaunchError, "x is a nested tensor (layout torch.strided); expected a dense tensor"),
        "swiglu: x nested, jagged": Row(
            lambda: ops.swiglu(torch.nested.nested_tensor([x[0], x[1, :3]], layout=torch.jagged)), LaunchError,
            "swiglu: x is a nested tensor (layout torch.jagged)"),
        "quantized_linear: x sparse": Row(lambda: quantized_linear(h.to_sparse(), q8, s8), LaunchError,
                                          f"x {sparse}"),
    }


def _overflow_rows() -> dict[str, Row]:
    """An int past float's range as a scalar: math.isfinite / float() raised OverflowError from inside."""
    x, w, b = randn(4, 8), randn(8, seed=5), randn(8, seed=6)
    q, k, v = qkv()
    qf, sf = quantize_weight(randn(16, 8), "fp8")
    huge = 10**400
    return {
        "rms_norm: eps an int past float": Row(lambda: ops.rms_norm(x, w, huge), LaunchError, "eps must be a number"),
        "kernels.layer_norm: eps an int past float": Row(lambda: tilestack.kernels.layer_norm(x, w, b, huge),
                                                         LaunchError, "eps must be a finite number"),
        "attention: scale an int past float": Row(lambda: tilestack.attention(q, k, v, scale=huge), LaunchError,
                                                  "scale must be a positive number"),
        "quantized_linear: x_scale an int past float": Row(lambda: quantized_linear(x, qf, sf, x_scale=huge),
                                                           LaunchError, "x_scale must be a finite number"),
        "norm_fp8: eps an int past float": Row(lambda: norm_fp8(x, w, None, huge, 0.1), LaunchError,
                                               "eps must be a number"),
    }


REFUSED: dict[str, Row] = {**_attention_rows(), **_op_rows(), **_quant_rows(), **_optimize_rows(), **_layout_rows(),
                           **_overflow_rows()}


@pytest.mark.filterwarnings("ignore:tilestack.scaled_dot_product_attention")   # the drop-in's notice
@pytest.mark.parametrize("row", list(REFUSED))
def test_bad_input_is_refused_clearly(row):
    r = REFUSED[row]
    with pytest.raises(Exception) as e:
        r.call()
    assert isinstance(e.value, r.error), f"{type(e.value).__name__} instead of {r.error.__name__}: {e.value}"
    assert r.fragment in str(e.value), f"{r.fragment!r} not in {str(e.value)!r}"


def test_quantlinear_refuses_a_bad_x_before_the_gemm(monkeypatch):
    """The width check comes before any launch: the GEMM is never reached."""
    import tilestack.quant.linear as linear_module

    qmodel = tilestack.quantize(mlp(), "int8")

    def launched(*args, **kwargs):
        raise AssertionError("quantized_linear ran")

    monkeypatch.setattr(linear_module, "quantized_linear", launched)
    with pytest.raises(LaunchError, match="in_features=8"):
        qmodel(randn(2, 16))


# ---- edges that must give torch's answer -------------------------------------------------------------------------
def _grads(fn, tensors):
    """fn's outputs and the gradients of a weighted sum of them with respect to ``tensors``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * randn(*o.shape, seed=9)).sum() for o in outs)
    if loss.requires_grad:
        loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _rows_of_width_zero() -> dict[str, tuple]:
    x, r = randn(3, 4, 0), randn(3, 4, 0, seed=4)
    w, b = randn(0, seed=5), randn(0, seed=6)
    return {
        "rms_norm": (lambda x, w: ops.rms_norm(x, w), lambda x, w: F.rms_norm(x, (0,), w, 1e-6), (x, w)),
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (0,), w, b),
                       (x, w, b)),
        "add_rms_norm": (lambda x, r, w: ops.add_rms_norm(x, r, w),
                         lambda x, r, w: (F.rms_norm(x + r, (0,), w, 1e-6), x + r), (x, r, w)),
        "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
                           lambda x, r, w, b: (F.layer_norm(x + r, (0,), w, b), x + r), (x, r, w, b)),
        "swiglu": (ops.swiglu, lambda x: F.silu(x[..., :0]) * x[..., 0:], (x,)),
    }


WIDTH_ZERO = _rows_of_width_zero()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op", list(WIDTH_ZERO))
def test_rows_of_width_zero_as_torch(op, grad):
    """(..., 0) inputs: the (rows, 0) view took reshape(-1, 0), which torch refuses (-1 is undetermined)."""
    ours, theirs, tensors = WIDTH_ZERO[op]
    if grad:
        (o1, g1), (o2, g2) = _grads(ours, tensors), _grads(theirs, tensors)
    else:
        with torch.no_grad():
            o1, o2 = ours(*tensors), theirs(*tensors)
        o1, o2 = (o1 if isinstance(o1, tuple) else (o1,)), (o2 if isinstance(o2, tuple) else (o2,))
        g1 = g2 = []
    for a, b in zip([*o1, *g1], [*o2, *g2], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("features", [(8, 4), (0, 4), (4, 0)], ids=["8x4", "in0", "out0"])
def test_quantize_a_bare_linear(features):
    """A model that is itself an nn.Linear: its QuantLinear is returned (there is no parent to change)."""
    torch.manual_seed(0)
    linear = nn.Linear(*features)
    x = randn(3, features[0])
    with torch.no_grad():
        want = linear(x)
        qlinear = tilestack.quantize(linear, "int8")
        got = qlinear(x)
    assert type(qlinear) is QuantLinear
    torch.testing.assert_close(got, want, atol=0.05 * max(1.0, float(want.abs().max()) if want.numel() else 0.0),
                               rtol=0)
    if 0 in features:
        assert torch.equal(got, want)      # the bias alone, or nothing: exact


def test_quantize_skip_one_name_as_a_string():
    """skip="lm_head" names that layer (it was taken letter by letter: no layer skipped)."""
    model = nn.Sequential(OrderedDict(proj=nn.Linear(8, 16), act=nn.ReLU(), lm_head=nn.Linear(16, 4)))
    qmodel = tilestack.quantize(model, "int8", skip="lm_head")
    assert type(qmodel.proj) is QuantLinear and type(qmodel.lm_head) is nn.Linear


def test_quantize_a_meta_model():
    """Meta weights (shapes only): quantized to meta buffers, with no value check to fail on."""
    qmodel = tilestack.quantize(mlp().to("meta"), "int8")
    assert qmodel[0].qweight.is_meta and qmodel[0].qweight.dtype == torch.int8
    assert qmodel(torch.empty(5, 8, device="meta")).shape == (5, 4)


def test_quantlinear_under_grad_mode_answers_without_a_backward():
    """Inference in grad mode (no no_grad) still answers as before; only a backward is refused."""
    model = mlp()
    x = randn(5, 8)
    with torch.no_grad():
        want = tilestack.quantize(mlp(), "int8")(x)
    got = tilestack.quantize(model, "int8")(x.clone().requires_grad_())
    torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize("scale", [0.5, 1e30, 2.3e38])
def test_attention_large_scales_as_torch(scale):
    """Scales up to the f32 limit of scale * log2(e) give torch's answer (past it they are refused above)."""
    q, k, v = qkv(H=1, Hkv=1, Nq=2, Nk=3, D=4)
    got = tilestack.attention(q, k, v, scale=scale)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_float32_mask_as_torch(dtype):
    """A float32 additive mask with any q dtype, as torch takes it."""
    q, k, v = (t.to(dtype) for t in qkv())
    mask = randn(5, 7, seed=11)
    got = tilestack.attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_sdpa_enable_gqa_must_be_a_bool():
    """A truthy non-bool enable_gqa ran GQA where torch raises; now torch decides (and raises)."""
    q, k, v = qkv(H=4, Hkv=2)
    with pytest.warns(UserWarning, match="enable_gqa='yes'"), pytest.raises(TypeError):
        tilestack.scaled_dot_product_attention(q, k, v, enable_gqa="yes")


@pytest.mark.parametrize("ignore_index", [-100, np.int64(-1), 10])
def test_cross_entropy_ignore_index_as_torch(ignore_index):
    """ignore_index as an int or a NumPy integer; the labels it names are skipped, any other label a class."""
    h, lm = randn(6, 8), randn(10, 8, seed=8)
    labels = torch.tensor([0, 3, int(ignore_index), 9, 2, int(ignore_index)])
    got = ops.fused_linear_cross_entropy(h, lm, labels, ignore_index)
    want = F.cross_entropy(h @ lm.T, labels, ignore_index=int(ignore_index))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rotary_tables_without_grad_are_fine_under_no_grad():
    """A table that requires grad is refused only where a gradient could be asked for."""
    q, k = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=7)
    cos, sin = rotary_tables(5, 16)
    with torch.no_grad():
        qr, kr = ops.rotary(q, k, cos.clone().requires_grad_(), sin)
    torch.testing.assert_close(qr, rotary_reference(q, cos, sin))
    torch.testing.assert_close(kr, rotary_reference(k, cos, sin))


def test_optimize_passes_one_name_as_a_string():
    """passes="norm" is the norm pass (it was ('n', 'o', 'r', 'm'), refused inside Dynamo at the first call)."""
    torch._dynamo.reset()
    model = tilestack.optimize(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), inner="eager", passes="norm")
    x = randn(4, 8)
    with tilestack.compile.policy.override(min_rows=0):
        model(x)
    report = tilestack.compile.last_report()
    assert {s.pattern for s in report.swaps} <= {"norm"} and report.swaps


def test_quantize_weight_meta_and_scales_bound():
    """activation_scale never gives a scale quantized_linear would refuse (a subnormal amax)."""
    from tilestack.quant.gemm import MIN_SCALE, activation_scale

    assert activation_scale(1e-44) == MIN_SCALE
    assert activation_scale(0.0) == 1.0
    assert math.isclose(activation_scale(448.0), 1.0)


def test_calibration_refused_or_failed_leaves_no_hooks():
    """A refused calibration (not an iterable) or a batch failing in the model leaves the model as it was: no
    forward hook behind (the check ran after the hooks were added, and left them), no layer replaced."""
    for calibration in (3, [randn(5, 7)]):
        model = mlp()
        with pytest.raises(LaunchError, match="calibration"):
            tilestack.quantize(model, "fp8-act", calibration=calibration)
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_calibration_with_an_empty_batch():
    """An empty batch adds nothing to the activation range (its max() raised inside the hook)."""
    x = randn(5, 8)
    with_empty = tilestack.quantize(mlp(), "fp8-act", calibration=[x[:0], x])
    without = tilestack.quantize(mlp(), "fp8-act", calibration=[x])
    assert [m.x_scale for m in with_empty.modules() if isinstance(m, QuantLinear)] == \
        [m.x_scale for m in without.modules() if isinstance(m, QuantLinear)]


@pytest.mark.filterwarnings("ignore:tilestack.scaled_dot_product_attention")
@pytest.mark.parametrize("kw", [dict(scale=-0.5), dict(scale=0.0), dict(scale=1e300), dict(is_causal=np.bool_(True)),
                                dict(is_causal=1), dict(enable_gqa="no")], ids=str)
def test_sdpa_drop_in_answers_or_raises_as_torch(kw):
    """What the kernels do not take (a scale outside (0, f32 max / log2 e], a non-bool is_causal or enable_gqa)
    goes to torch: its answer, or its error, never tilestack's LaunchError (a negative scale) nor an answer
    where torch raises (numpy's True for is_causal)."""
    q, k, v = qkv()
    try:
        want = F.scaled_dot_product_attention(q, k, v, **kw)
    except Exception as e:
        with pytest.raises(type(e)):
            tilestack.scaled_dot_product_attention(q, k, v, **kw)
        return
    torch.testing.assert_close(tilestack.scaled_dot_product_attention(q, k, v, **kw), want, equal_nan=True)


@pytest.mark.filterwarnings("ignore")
def test_sdpa_drop_in_hands_nested_tensors_to_torch():
    """A nested (B, H, [N], D) query went into shape checks that nested tensors refuse ("NestedTensorImpl doesn't
    support sizes"); the drop-in hands it to torch, which answers or raises as it does."""
    def nested():
        return torch.nested.nested_tensor([randn(2, 5, 16, seed=1), randn(2, 4, 16, seed=2)]).transpose(1, 2)

    q, k, v = nested(), nested(), nested()
    try:
        want = F.scaled_dot_product_attention(q, k, v)
    except Exception as e:          # torch's own error, word for word
        with pytest.raises(type(e), match=re.escape(str(e).splitlines()[0])):
            tilestack.scaled_dot_product_attention(q, k, v)
        return
    got = tilestack.scaled_dot_product_attention(q, k, v)
    for a, b in zip(got.unbind(), want.unbind(), strict=True):
        torch.testing.assert_close(a, b)
