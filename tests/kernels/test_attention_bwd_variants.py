"""Variants of the attention backward against float64 and against the default split kernels, on both CPU
backends: the one-kernel backward (``attention_bwd_dkdvdq_kernel``: dQ added atomically by the dK/dV kernel, 5
matrix products per block pair where the split kernels take 7) and the key-major dK/dV block (``KEY_MAJOR``:
S^T = K Q^T). Ragged lengths, both causal alignments, GQA per K/V head and per query head, Dv != D, head dims that
are not a tile width, f32, scores that overflow P. And when the fused kernel must not run: torch's deterministic
mode, a mask."""

import importlib

import pytest
import torch
from test_attention import TOL, TRUNCATION, check_against_float64, inputs, rel
from test_attention_edges import negative_scores

from tilestack.errors import LaunchError
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward

FUSED = {"dkdvdq": {}}
# the variants by their config: dQ fused or not, the dK/dV block key-major or not
VARIANTS = {"fused": FUSED, "key-major": {"dkdv": dict(KEY_MAJOR=True)},
            "fused-key-major": {"dkdvdq": dict(KEY_MAJOR=True)}}
BWD = importlib.import_module("tilestack.kernels.attention_bwd")


def _kernels_launched(monkeypatch) -> list[str]:
    """The names of the kernels attention_backward plans launchers for, from now on."""
    names: list[str] = []
    real = BWD.tuned_launcher

    def spy(kernel, *args, **kwargs):
        names.append(kernel.name)
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(BWD, "tuned_launcher", spy)
    attention_backward.plans.clear()
    return names


SHAPES = {"mha-ragged": (1, 2, 2, 37, 37, 16, None), "gqa-nq<nk": (2, 4, 2, 29, 45, 32, None),
          "mqa-nq>nk": (1, 4, 1, 50, 21, 64, 0.3)}
# every shape on the reference executor (fp16), the GQA one under Triton's interpreter (bf16; it is ~10x slower)
CASES = [("reference", torch.float16, s) for s in SHAPES] + [("triton", torch.bfloat16, "gqa-nq<nk")]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend,dtype,shape", CASES, ids=str)
@pytest.mark.parametrize("causal,align", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")], ids=str)
def test_backward_variant_matches_float64_and_the_split_kernels(variant, backend, dtype, shape, causal, align, rng,
                                                                poison_empty, monkeypatch):
    shape = SHAPES[shape]
    q, k, v, do, scale = inputs(rng, shape, dtype)
    launched = _kernels_launched(monkeypatch)
    got = check_against_float64(backend, q, k, v, do, causal, scale, bwd_cfg=VARIANTS[variant],
                                causal_align=align)[2]
    fused = "dkdvdq" in VARIANTS[variant]
    assert ("attention_bwd_dkdvdq_kernel" in launched) is fused, launched
    assert ("attention_bwd_dq_kernel" in launched) is not fused, launched
    attention_backward.plans.clear()
    split = check_against_float64(backend, q, k, v, do, causal, scale, causal_align=align)[2]
    for name, a, b in zip(("dq", "dk", "dv"), got, split, strict=True):
        assert rel(a, b) <= TOL[dtype] * TRUNCATION[dtype], name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("triton", torch.bfloat16)], ids=str)
def test_backward_variant_per_query_head_dv_and_odd_head_dim(variant, backend, dtype, rng, poison_empty,
                                                             monkeypatch):
    """GQA with the dK/dV programs per query head (their shares summed after), v's head dim 24 beside q's 40
    (neither a tile width: the atomic adds' columns past D are dropped)."""
    monkeypatch.setattr(BWD, "DKDV_PROGRAMS_PER_SM", 10**9)
    q, k, v, do, scale = inputs(rng, (2, 6, 2, 29, 45, 40, None), dtype, dv=24)
    launched = _kernels_launched(monkeypatch)
    check_against_float64(backend, q, k, v, do, True, scale, bwd_cfg=VARIANTS[variant],
                          causal_align="bottom_right")
    assert ("attention_bwd_dkdvdq_kernel" in launched) is ("dkdvdq" in VARIANTS[variant]), launched


@pytest.mark.parametrize("part", ("dkdv", "dkdvdq"))
@pytest.mark.parametrize("BM,BN", [(32, 16), (16, 32)], ids=str)
def test_backward_variant_block_shapes(part, BM, BN, rng, poison_empty):
    """BM != BN moves the causal diagonal's blocks (and, key-major, the diagonal is S^T's: triu, not tril)."""
    q, k, v, do, scale = inputs(rng, (1, 4, 2, 70, 53, 16, None), torch.bfloat16)
    cfg = {part: dict(BM=BM, BN=BN, num_warps=4, num_stages=1, KEY_MAJOR=True)}
    check_against_float64("reference", q, k, v, do, True, scale, bwd_cfg=cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", [(False, 37, 7, -30.0), (True, 40, 21, -120.0)], ids=str)
def test_backward_variant_with_strongly_negative_scores(variant, dtype, case, rng, poison_empty):
    """Every score about ``level`` with the last key block ragged: a padded key's P, exp2(0 - lse), overflows
    (bf16 below about -88, fp16 below -11) and must not reach dQ (the fused kernel masks keys past Nk)."""
    causal, Nq, Nk, level = case
    q, k, v, do = negative_scores(rng, 1, 2, Nq, Nk, 16, dtype, level)
    check_against_float64("triton", q, k, v, do, causal, None, bwd_cfg=VARIANTS[variant])


def test_deterministic_mode_and_masks_keep_the_split_kernels(rng, monkeypatch):
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 19, 21, 16, None), torch.bfloat16)
    o, lse = attention_forward(q, k, v, False, scale, backend="reference")
    launched = _kernels_launched(monkeypatch)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = attention_backward(q, k, v, o, lse, do, False, scale, backend="reference", config=FUSED)
    finally:
        torch.use_deterministic_algorithms(was)
    assert "attention_bwd_dkdvdq_kernel" not in launched and "attention_bwd_dq_kernel" in launched, launched
    launched.clear()
    fused = attention_backward(q, k, v, o, lse, do, False, scale, backend="reference", config=FUSED)
    assert "attention_bwd_dkdvdq_kernel" in launched, launched      # the mode is part of the plan's key
    for a, b in zip(det, fused, strict=True):
        assert rel(a, b) <= TOL[torch.bfloat16]
    launched.clear()
    mask = torch.ones(19, 21, dtype=torch.bool).tril()
    o, lse = attention_forward(q, k, v, False, scale, backend="reference", attn_mask=mask)
    attention_backward(q, k, v, o, lse, do, False, scale, backend="reference", config=FUSED, attn_mask=mask)
    assert "attention_bwd_dkdvdq_kernel" not in launched, launched


@pytest.mark.parametrize("config,match", [({"fused": {}}, "dkdvdq"), ({"dkdvdq": 3}, r"config\['dkdvdq'\] is 3"),
                                          ([("dkdv", {})], "config is list")], ids=str)
def test_bad_config_is_refused_by_name(config, match, rng, no_launch):
    no_launch(BWD, *(name for name in dir(BWD) if name.endswith("_kernel")))
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 8, 8, 16, None), torch.bfloat16)
    o, lse = torch.zeros_like(do), torch.zeros(1, 2, 8)
    with pytest.raises(LaunchError, match=match):
        attention_backward(q, k, v, o, lse, do, False, scale, backend="reference", config=config)
