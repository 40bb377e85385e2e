"""The tilestack torch.compile backend on models it has never seen, round 6 (unseen_blocks_round6.py), in inference:
attention through torch.baddbmm + softmax + bmm, ALiBi with a sliding window built by torch.triu / torch.tril (one
folded bias, two masks, an additive band), the softmax in f32 cast back, RMSNorm in the orderings people write (and
F.normalize's SimpleRMSNorm, which is not one), F.layer_norm without parameters or without a bias, exact and tanh
GELU, SiLU written as ``u * torch.sigmoid(u)``, bias-free Linears before a residual add, and a block returning its
intermediates; in f32, bf16 and f16. For each: one graph (no graph break), the outputs eager's within the dtype's
tolerance, every swap made passed its check, what is left has a reason (round 1's ``_run``). On the CPU: the kernels
through the reference executor at tiny sizes (the size policy off), the rest through aot_eager."""

from __future__ import annotations

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined, _one_graph
from unseen_blocks_round6 import (
    AlibiWindowAttention,
    BaddbmmAttention,
    FunctionalNormMLP,
    IntermediatesBlock,
    RMSNorm,
    seeded,
)

import tilestack.compile as tc

F16, BF16 = torch.float16, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, BF16, F16], ids=["f32", "bf16", "f16"])
TOL_F16 = (2e-2, 2e-2)


def _x(dtype=torch.float32, b: int = 2, n: int = 10, d: int = 32):
    torch.manual_seed(1)
    return torch.randn(b, n, d, dtype=dtype)


def _eval(model, *args, dtype):
    """One graph, then the compiled model against eager under torch.no_grad(); f16 compared at bf16's tolerance
    row of round 1's table (TOL has f32 and bf16 only), which bounds f16's rounding too."""
    _one_graph(model, *args)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, *args, dtype=BF16 if dtype == F16 else dtype)
    return swaps, since


def _left_why(op: str, since: int) -> list[str]:
    return [r.left_why[op] for r in tc.reports()[since:] if op in r.left_why]


# ---- attention through baddbmm / bmm ----------------------------------------------------------------------------
@DTYPES
def test_baddbmm_bmm_attention_is_left_with_its_reason(dtype):
    """(B * H, N, N) scores from torch.baddbmm and torch.bmm with v: the attention kernel is 4-D, so the softmax is
    swapped alone and the norm too; the report says why baddbmm and bmm are left (it said 'no tilestack kernel for
    it' of an attention written in 3-D)."""
    swaps, since = _eval(seeded(BaddbmmAttention, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("softmax") == 1 and swaps.get("norm") == 1 and "explicit_attention" not in swaps, swaps
    for op in ("baddbmm", "bmm"):
        whys = _left_why(op, since)
        assert whys and "3-D" in whys[0] and "(B, H, N, D)" in whys[0], whys


# ---- ALiBi with a sliding window ----------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("mask", ["folded", "additive_band"])
def test_alibi_sliding_window_one_mask_is_taken(dtype, mask):
    """ALiBi's slopes times the relative positions, the band of ``window`` keys filled with -inf into that one bias
    (or a band of two -inf triangles alone): one additive mask, the attention swapped with it; the RMSNorm written
    rsqrt-first swapped too. f16 / bf16: the bias cast to x's dtype, the softmax in f32 cast back."""
    model = seeded(AlibiWindowAttention, mask=mask, dtype=dtype)
    swaps, _ = _eval(model, _x(dtype), dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 1, swaps
    what = [s.what for s in tc.last_report().swaps if s.pattern == "explicit_attention"]
    assert "with an additive mask" in what[0] and "0.3536" in what[0], what       # 1 / sqrt(8)


@DTYPES
def test_alibi_then_a_causal_fill_is_two_masks_left(dtype):
    """s + alibi, then masked_fill(~band, -inf): two masks, which the kernel does not take in turn; the attention is
    left with that reason, its softmax swapped alone."""
    model = seeded(AlibiWindowAttention, mask="bool", dtype=dtype)
    swaps, since = _eval(model, _x(dtype), dtype=dtype)
    assert "explicit_attention" not in swaps and swaps.get("softmax") == 1 and swaps.get("norm") == 1, swaps
    assert any("one mask at most" in w for w in _declined("explicit_attention", since))


def test_sliding_window_keeps_only_the_band():
    """An independent check that the swapped kernel reads the band: the window of 1 key back (each query sees
    itself and its predecessor), against a float64 attention computed here from the model's own q, k, v."""
    model = seeded(AlibiWindowAttention, window=1, mask="additive_band")
    x = _x()
    with torch.no_grad():
        got, swaps = _run(model, x)
        assert swaps.get("explicit_attention") == 1, swaps
        b, n, d = x.shape
        q, k, v = model.qkv(model.norm(x)).double().view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 1)
        a = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
        want = x.double() + a.transpose(1, 2).reshape(b, n, d) @ model.o.weight.double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ---- RMSNorm orderings, F.layer_norm without parameters ------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("form", ["rsqrt_first", "eps_first", "method", "f32_then_w"])
def test_rms_norm_orderings_are_swapped(dtype, form):
    """torch.rsqrt(...) * x * w, w * (x * rsqrt(eps + ...)), x.pow(2).mean(...).add(eps).rsqrt(), and the f32
    statistic cast back before the weight: each one RMSNorm written out, swapped, eager's outputs."""
    swaps, _ = _eval(seeded(RMSNorm, 32, form, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps == {"norm": 1}, swaps
    assert "written out" in tc.last_report().swaps[0].what


def test_rms_norm_values_against_float64():
    """The swapped rsqrt-first norm against the formula in float64 (not eager's f32 graph)."""
    model = seeded(RMSNorm, 32, "rsqrt_first")
    x = _x() * 3.0
    with torch.no_grad():
        got, _ = _run(model, x)
    xd = x.double()
    want = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * model.weight.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_f_normalize_rms_norm_is_not_taken_for_one():
    """F.normalize(x) * sqrt(d) * w (eps clamps the norm, not added under the root): no RMSNorm swap (one would be a
    silent wrong answer on rows of small norm), eager's outputs on such rows."""
    x = _x()
    x[0, 0] *= 1e-4                                         # a row where the two definitions part
    swaps, _ = _eval(seeded(RMSNorm, 32, "normalize"), x, dtype=torch.float32)
    assert "norm" not in swaps, swaps


@DTYPES
@pytest.mark.parametrize("norm", ["none", "weight"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_functional_layer_norm_and_gelu_mlp(dtype, norm, act):
    """F.layer_norm(x, x.shape[-1:], None or w, None): swapped (the kernel given ones / zeros). In 16 bits the up
    projection's GELU (exact or tanh, named as such in the report) and the bias-free down projection's residual
    add are fused GEMM epilogues; in f32 they are left with the reason (the GEMM multiplies 16-bit)."""
    swaps, since = _eval(seeded(FunctionalNormMLP, norm=norm, act=act, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("norm") == 1, swaps
    whats = [s.what for r in tc.reports()[since:] for s in r.swaps if s.pattern == "linear_epilogue"]
    if dtype == torch.float32:
        assert "linear_epilogue" not in swaps, swaps
        assert any("bf16 or f16" in w for w in _declined("linear_epilogue", since))
    else:
        assert swaps.get("linear_epilogue") == 2, swaps
        assert sorted(whats) == sorted([f"linear + bias + {act} -> tilestack::linear_epilogue",
                                        "linear + residual add -> tilestack::linear_epilogue"]), whats


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("act", ["silu_sigmoid", "swiglu_sigmoid"])
def test_silu_written_with_sigmoid(dtype, act):
    """u * torch.sigmoid(u) after a Linear is SiLU: fused as the GEMM's silu epilogue (``silu_sigmoid``); in a gate
    (g * sigmoid(g) * up(x)) the product with up(x) follows, so that Linear's SiLU is fused and the product left.
    The bias-free down projection + residual fused either way."""
    swaps, _ = _eval(seeded(FunctionalNormMLP, act=act, dtype=dtype), _x(dtype), dtype=dtype)
    whats = sorted(s.what for s in tc.last_report().swaps if s.pattern == "linear_epilogue")
    silu = "linear + bias + silu" if act == "silu_sigmoid" else "linear + silu"
    assert whats == sorted([f"{silu} -> tilestack::linear_epilogue",
                            "linear + residual add -> tilestack::linear_epilogue"]), whats


@pytest.mark.parametrize("form", ["sigmoid_returned", "quick_gelu"])
def test_sigmoid_products_that_are_not_a_fusable_silu(form):
    """u * sigmoid(u) where sigmoid(u) is returned too (the fused GEMM would not make it), and quick_gelu's
    u * sigmoid(1.702 * u) (not SiLU): no epilogue fused, eager's outputs."""
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            u = self.fc(x)
            if form == "quick_gelu":
                return u * torch.sigmoid(1.702 * u)
            g = torch.sigmoid(u)
            return u * g, g

    swaps, _ = _eval(seeded(Gate, dtype=BF16), _x(BF16), dtype=BF16)
    assert "linear_epilogue" not in swaps, swaps


# ---- intermediates returned ---------------------------------------------------------------------------------------
@DTYPES
def test_a_block_returning_its_intermediates(dtype):
    """The residual sum h that the fused add + LayerNorm makes is returned (the op's second output, eager's), the
    normalized rows of the written-out RMSNorm are returned before its weight (kept, the norm swapped), and the
    attention (scores not returned) swapped."""
    swaps, _ = _eval(seeded(IntermediatesBlock, dtype=dtype), _x(dtype), dtype=dtype)
    assert swaps.get("explicit_attention") == 1 and swaps.get("add_norm") == 1, swaps


@DTYPES
def test_a_block_returning_its_scores(dtype):
    """The raw scores returned: the attention is left (the rewrite would compute it twice), with that reason."""
    swaps, since = _eval(seeded(IntermediatesBlock, scores=True, dtype=dtype), _x(dtype), dtype=dtype)
    assert "explicit_attention" not in swaps and swaps.get("add_norm") == 1, swaps
    assert any("compute the attention twice" in w for w in _declined("explicit_attention", since))
