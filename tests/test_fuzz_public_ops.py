"""The fuzzer's public-op kinds (tilestack.testing.fuzz.public_ops): a small budget of each, through the ops a user
calls (tilestack.scaled_dot_product_attention / attention, the four norms, rotary, swiglu, the fused
cross-entropy), forward and backward on both CPU backends, must find nothing; the kinds must leave the default
kinds' problems as they were; and a wrong public op must be caught.

A larger run: ``PYTHONPATH=src python scripts/fuzz.py --kinds public --budget 600 --seed 1``.
Set TILESTACK_FUZZ_SEED to fuzz other problems than CI's.
"""

import ast
import os
import re

import numpy as np
import pytest

import tilestack.torch.ops
from tilestack.testing import fuzz

SEED = int(os.environ.get("TILESTACK_FUZZ_SEED", "0"))
# problems per kind on the CPU: about 2 minutes in all on 2 cores
CI_BUDGET = {"sdpa_op": 16, "norm_op": 24, "rotary_op": 10, "swiglu_op": 16, "cross_entropy_op": 8}


def test_every_public_kind_has_a_budget():
    assert set(CI_BUDGET) == set(fuzz.PUBLIC_KINDS)
    assert fuzz.ALL_KINDS == fuzz.KINDS + fuzz.PUBLIC_KINDS


@pytest.mark.parametrize("kind", list(CI_BUDGET))
def test_small_budget_finds_nothing(kind):
    report = fuzz.fuzz(CI_BUDGET[kind], seed=SEED, device="cpu", kinds=(kind,))
    print(report.summary())
    assert report.tried == CI_BUDGET[kind]
    assert {o.backend for o in report.outcomes} == {"reference", "triton"}
    assert not report.failures, report.summary()


def test_default_kinds_draw_what_they_drew():
    """The public kinds are opt-in: a seed's default problems are those of the kernels' kinds alone, as before."""
    for index in range(40):
        rng = np.random.default_rng([0, index])
        weights = np.array([{"attention": 3.0, "gemm": 2.0, "layer_norm_bwd": 1.0, "rms_norm_bwd": 1.0}.get(k, 1.5)
                            for k in fuzz.KINDS])
        expected = str(rng.choice(list(fuzz.KINDS), p=weights / weights.sum()))
        kind, _, _ = fuzz.draw(index, 0, "cpu", ("reference", "triton"), {"head_dims": [16], "dtypes": ["float16"],
                                                                          "dv_differs": False, "causal_align": [],
                                                                          "attn_mask": False, "op_params": []})
        assert kind == expected


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kinds"):
        fuzz.fuzz(1, kinds=("no_such_op",))


def _empty(problem: str) -> bool:
    """Whether the problem's x (the first ``x(...)`` of its description: the shape) has no element."""
    shape = ast.literal_eval(re.search(r"x(\([^)]*\))", problem).group(1))
    return 0 in shape


def test_a_wrong_public_norm_is_caught(monkeypatch):
    real = tilestack.torch.ops.rms_norm

    def off(x, weight, eps=1e-6):
        y = real(x, weight, eps)
        return y * 1.01 + 0.01 * y.detach().abs().amax() if y.numel() else y

    monkeypatch.setattr(tilestack.torch.ops, "rms_norm", off)
    report = fuzz.fuzz(40, seed=3, device="cpu", backends=("reference",), kinds=("norm_op",))
    hit = [o for o in report.outcomes if o.problem.startswith("rms_norm ") and not _empty(o.problem)]
    assert hit, report.summary()
    assert all(o.status == "mismatch" for o in hit), report.summary()


def test_a_wrong_public_gradient_is_caught(monkeypatch):
    """swiglu's gradient scaled by 1.05 (6 ulp of bf16): only the backward is wrong, only fwd+bwd problems fail."""
    real = tilestack.torch.ops._SwiGLUPlan.backward

    def off(self, dy, x):
        return real(self, dy, x) * 1.05

    monkeypatch.setattr(tilestack.torch.ops._SwiGLUPlan, "backward", off)
    report = fuzz.fuzz(30, seed=4, device="cpu", backends=("reference",), kinds=("swiglu_op",))
    for o in report.outcomes:
        if o.problem.endswith("fwd+bwd") and not _empty(o.problem):
            assert o.status == "mismatch" and "dx" in o.detail, report.summary()
        else:
            assert o.status == "ok", report.summary()
    assert any(o.status == "mismatch" for o in report.outcomes)
