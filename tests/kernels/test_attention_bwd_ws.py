"""The warp-specialized attention backward (kernels/attention_bwd_ws.py: a producer streaming Q, dO or K, V into
rings, two consumer warpgroups owning half a block each) through ``attention_backward``'s ``schedule="ws"``, on
both CPU backends (the reference runs the roles in program order; Triton's drops them) against float64 and the
split kernels: ragged lengths, both causal alignments, GQA per K/V head and per query head, Dv != D, empty rows,
scores whose P would overflow, block shapes other than the defaults. When it must not run (f32, a mask, dropout,
a fused dQ) the split kernels do, and a bad schedule is refused by name. Its sm_90a compile is in
tests/backends/test_gluon_attention_bwd_ws.py."""

import importlib

import pytest
import torch
from test_attention import TOL, TRUNCATION, check_against_float64, inputs, rel
from test_attention_edges import negative_scores

from tilestack.errors import LaunchError
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward, dropout_rng

BWD = importlib.import_module("tilestack.kernels.attention_bwd")
BWD_WS = importlib.import_module("tilestack.kernels.attention_bwd_ws")   # launches the ws kernels
WS = {"dkdv": {"schedule": "ws"}, "dq": {"schedule": "ws"}}
# half-blocks of 16 rows: several trips and several programs at these short lengths
SMALL = {"dkdv": {"schedule": "ws", "BM": 16, "BN": 32}, "dq": {"schedule": "ws", "BM": 32, "BN": 16}}
TURNS = {part: c | {"TURNS": True, "STAGES": 3} for part, c in SMALL.items()}   # products issued in turn
SHAPES = {"mha-ragged": (1, 2, 2, 37, 53, 16, None), "gqa-nq<nk": (2, 4, 2, 29, 45, 32, None),
          "mqa-nq>nk": (1, 4, 1, 70, 21, 64, 0.3)}
CASES = [("reference", torch.bfloat16, s) for s in SHAPES] + [("triton", torch.float16, "gqa-nq<nk")]


def _launched(monkeypatch) -> list[str]:
    """The names of the kernels attention_backward plans launchers for, from now on."""
    names: list[str] = []
    real = BWD.tuned_launcher

    def spy(kernel, *args, **kwargs):
        names.append(kernel.name)
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(BWD, "tuned_launcher", spy)
    monkeypatch.setattr(BWD_WS, "tuned_launcher", spy)
    attention_backward.plans.clear()
    return names


@pytest.mark.parametrize("cfg", [WS, SMALL, TURNS], ids=["defaults", "small-blocks", "turns"])
@pytest.mark.parametrize("backend,dtype,shape", CASES, ids=str)
@pytest.mark.parametrize("causal,align", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")], ids=str)
def test_ws_backward_matches_float64_and_the_split_kernels(cfg, backend, dtype, shape, causal, align, rng,
                                                           poison_empty, monkeypatch):
    q, k, v, do, scale = inputs(rng, SHAPES[shape], dtype)
    launched = _launched(monkeypatch)
    got = check_against_float64(backend, q, k, v, do, causal, scale, bwd_cfg=cfg, causal_align=align)[2]
    assert "attention_bwd_dkdv_ws_kernel" in launched and "attention_bwd_dq_ws_kernel" in launched, launched
    assert "attention_bwd_dkdv_kernel" not in launched and "attention_bwd_dq_kernel" not in launched, launched
    attention_backward.plans.clear()
    split = check_against_float64(backend, q, k, v, do, causal, scale, causal_align=align)[2]
    for name, a, b in zip(("dq", "dk", "dv"), got, split, strict=True):
        assert rel(a, b) <= TOL[dtype] * TRUNCATION[dtype], name


@pytest.mark.parametrize("part", ["dkdv", "dq"])
def test_ws_one_part_alone(part, rng, poison_empty, monkeypatch):
    """Each part's schedule is its own: the other part keeps the split kernel."""
    q, k, v, do, scale = inputs(rng, SHAPES["gqa-nq<nk"], torch.bfloat16)
    launched = _launched(monkeypatch)
    check_against_float64("reference", q, k, v, do, True, scale, bwd_cfg={part: SMALL[part]})
    other = "dq" if part == "dkdv" else "dkdv"
    assert f"attention_bwd_{part}_ws_kernel" in launched and f"attention_bwd_{other}_kernel" in launched, launched


def test_ws_per_query_head_dv_and_odd_head_dim(rng, poison_empty, monkeypatch):
    """GQA with the dK/dV programs per query head (shares summed after), v's head dim 24 beside q's 40."""
    monkeypatch.setattr(BWD, "DKDV_PROGRAMS_PER_SM", 10**9)
    q, k, v, do, scale = inputs(rng, (2, 6, 2, 29, 45, 40, None), torch.float16, dv=24)
    launched = _launched(monkeypatch)
    check_against_float64("reference", q, k, v, do, True, scale, bwd_cfg=SMALL, causal_align="bottom_right")
    assert "attention_bwd_dkdv_ws_kernel" in launched, launched


def test_ws_rows_that_see_no_key(rng, poison_empty):
    """Bottom-right with Nq > Nk: the first rows see no key (dq = 0 there, never NaN)."""
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 61, 23, 16, None), torch.bfloat16)
    o, lse, (dq, dk, dv) = check_against_float64("reference", q, k, v, do, True, scale, bwd_cfg=SMALL,
                                                 causal_align="bottom_right")
    assert bool((dq[:, :, :61 - 23] == 0).all())


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", [(False, 37, 7, -30.0), (True, 40, 21, -120.0)], ids=str)
def test_ws_strongly_negative_scores(dtype, case, rng, poison_empty):
    """Every score about ``level`` with ragged blocks: a padded key's or query's P, exp2(0 - lse), overflows
    (bf16 below about -88, fp16 below -11) and must reach neither dQ nor dK, dV."""
    causal, Nq, Nk, level = case
    q, k, v, do = negative_scores(rng, 1, 2, Nq, Nk, 16, dtype, level)
    check_against_float64("reference", q, k, v, do, causal, None, bwd_cfg=SMALL)


@pytest.mark.parametrize("why", ["f32", "mask", "dropout", "fused"])
def test_ws_gives_way_where_it_cannot_run(why, rng, poison_empty, monkeypatch):
    """f32 inputs, a mask, dropout or dQ fused into dK/dV: the split kernels run (no error, the same meaning)."""
    dtype = torch.float32 if why == "f32" else torch.bfloat16
    q, k, v, do, scale = inputs(rng, SHAPES["mha-ragged"], dtype)
    cfg = dict(SMALL) | ({"dkdvdq": {}} if why == "fused" else {})
    launched = _launched(monkeypatch)
    if why in ("f32", "fused"):
        check_against_float64("reference", q, k, v, do, True, scale, bwd_cfg=cfg)
    elif why == "mask":
        mask = torch.rand(37, 53, generator=torch.Generator().manual_seed(0)) > 0.3
        mask[:, 0] = True
        check_against_float64("reference", q, k, v, do, False, scale, bwd_cfg=cfg, attn_mask=mask)
    else:
        stream = dropout_rng(torch.Generator().manual_seed(1))
        o, lse = attention_forward(q, k, v, True, scale, backend="reference", dropout_p=0.2, rng=stream)
        grads = attention_backward(q, k, v, o, lse, do, True, scale, backend="reference", config=cfg,
                                   dropout_p=0.2, rng=stream)
        assert all(bool(g.isfinite().all()) for g in grads)
    assert not any(name.endswith("_ws_kernel") for name in launched), launched


@pytest.mark.parametrize("cfg,match", [
    ({"dkdv": {"schedule": "pingpong"}}, "schedule"),
    ({"dq": {"schedule": "WS"}}, "'ws'"),
    ({"delta": {"schedule": "ws"}}, "only the parts"),
    ({"dkdv": {"schedule": "ws", "STAGE": 3}}, "did you mean 'STAGES'"),
    ({"dq": {"schedule": "ws", "turns": True}}, "TURNS"),
])
def test_ws_bad_schedule_is_refused_by_name(cfg, match, rng):
    q, k, v, do, scale = inputs(rng, SHAPES["mha-ragged"], torch.bfloat16)
    o, lse = attention_forward(q, k, v, False, scale, backend="reference")
    with pytest.raises(LaunchError, match=match):
        attention_backward(q, k, v, o, lse, do, False, scale, backend="reference", config=cfg)
