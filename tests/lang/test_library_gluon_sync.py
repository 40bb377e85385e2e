"""The library's warp-specialized kernels (kernels/attention_fwd_pingpong.py, kernels/attention_bwd_ws.py) through
the structural synchronization rules of tests/lang/gluon_sync_check.py, over their variants: causal or not, both
alignments, head dims 64 and 128, consumers in turn or not, dK/dV per query head. No GPU: the Gluon source only
(a stage freed before its last reader retires is a race only a GPU would show, and then rarely)."""

import re

import pytest
from gluon_sync_check import check_sync

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.kernels import attention_bwd_ws as ws
from tilestack.kernels import attention_fwd_pingpong as pp

BF16_4, F32_3 = ts.ArgSpec(ts.bf16, 4), ts.ArgSpec(ts.f32, 3)
ROLES = ("consumer0", "consumer1", "producer")
VARIANTS = [dict(D=d, causal=c, causal_align=a) for d in (64, 128)
            for c, a in ((False, "top_left"), (True, "top_left"), (True, "bottom_right"))]


def source(kernel, args, **consts) -> str:
    return get_backend("gluon").source(kernel.trace(*args, **consts))


@pytest.mark.parametrize("v", VARIANTS, ids=str)
@pytest.mark.parametrize("turns", [False, True], ids=["free", "turns"])
@pytest.mark.parametrize("per_q_head", [False, True], ids=["per-kv-head", "per-q-head"])
def test_dkdv_ws_sync(v, turns, per_q_head):
    args = (BF16_4, BF16_4, BF16_4, BF16_4, F32_3, F32_3, BF16_4, BF16_4, 0.1)
    src = source(ws.attention_bwd_dkdv_ws_kernel, args, **v, TURNS=turns, PER_Q_HEAD=per_q_head)
    check_sync(src, "attention_bwd_dkdv_ws_kernel", ROLES)
    # the case the rules exist for: a consumer's Q stage read by two wgmmas of a trip (S^T = K Q^T, dK += dS^T Q)
    consumer = src.split("def attention_bwd_dkdv_ws_kernel_consumer0(")[1].split("@gluon.jit")[0].splitlines()
    views = set(re.findall(r"\b(q_s_\d+) = q_ring\.index", "\n".join(consumer)))
    assert views and all(sum("warpgroup_mma(" in line and re.search(rf"\b{view}\b", line) is not None
                             for line in consumer) == 2 for view in views), views


@pytest.mark.parametrize("v", VARIANTS, ids=str)
@pytest.mark.parametrize("turns", [False, True], ids=["free", "turns"])
def test_dq_ws_sync(v, turns):
    args = (BF16_4, BF16_4, BF16_4, BF16_4, F32_3, F32_3, BF16_4, 0.1)
    check_sync(source(ws.attention_bwd_dq_ws_kernel, args, **v, TURNS=turns), "attention_bwd_dq_ws_kernel", ROLES)


@pytest.mark.parametrize("v", VARIANTS, ids=str)
@pytest.mark.parametrize("stages", [2, 3])
def test_pingpong_forward_sync(v, stages):
    args = (BF16_4, BF16_4, BF16_4, BF16_4, F32_3, 0.1)
    check_sync(source(pp.attention_fwd_pingpong_kernel, args, **v, STAGES=stages), "attention_fwd_pingpong_kernel",
               ROLES)
