"""tilestack.compile.measure (a fused GEMM timed against cuBLAS and Inductor's pass before it is swapped) and its
use by tilestack.compile.policy. The timings are real on the CPU here (tiny shapes through the CPU backend); the
policy's GPU branch is driven by fake CUDA tensors, as Dynamo's graphs carry them."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tilestack
from tilestack import config
from tilestack.compile import measure, ops, policy
from tilestack.compile.patterns import Match
from tilestack.errors import LaunchError


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty user cache and a process that has read nothing yet."""
    monkeypatch.setattr(measure, "_memory", {})
    monkeypatch.setattr(measure, "_loaded", False)
    with config.override(cache_dir=tmp_path):
        yield tmp_path / measure.FILE


def _tiny(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=g, dtype=dtype)          # (..., K): M = 10 rows, ragged
    w = torch.randn(24, 16, generator=g, dtype=dtype)            # (N, K), a Linear's weight
    b = torch.randn(24, generator=g, dtype=dtype)
    r = torch.randn(2, 5, 24, generator=g, dtype=dtype)
    return x, w, b, r


def test_a_measurement_is_written_once_and_read_back_by_a_new_process(fresh_cache, monkeypatch):
    x, w, b, r = _tiny()
    d = measure.linear_epilogue(x, w, b, r, "gelu", False)
    assert d.fused_s > 0 and d.unfused_s > 0 and d.pays == (d.fused_s <= measure.MARGIN * d.unfused_s)
    assert "M10 K16 N24" in d.what and "act=gelu" in d.what and "residual=True" in d.what
    on_disk = json.loads(fresh_cache.read_text())
    assert on_disk[d.what]["fused_s"] == d.fused_s and on_disk[d.what]["unfused_s"] == d.unfused_s
    # a new process (nothing in memory) takes the file's numbers and times nothing
    monkeypatch.setattr(measure, "_memory", {})
    monkeypatch.setattr(measure, "_loaded", False)
    monkeypatch.setattr(measure, "_time", lambda *a: pytest.fail("a cached shape was timed again"))
    again = measure.linear_epilogue(x, w, b, r, "gelu", False)
    assert (again.fused_s, again.unfused_s) == (d.fused_s, d.unfused_s)
    # another shape or epilogue is another entry, measured (here: refused, as _time fails)
    with pytest.raises(pytest.fail.Exception):
        measure.linear_epilogue(x, w, b, None, "gelu", False)


def test_a_corrupt_cache_file_is_measured_again_with_a_warning(fresh_cache):
    fresh_cache.parent.mkdir(parents=True, exist_ok=True)
    fresh_cache.write_text('{"half a fi')
    x, w, b, r = _tiny()
    with pytest.warns(UserWarning, match="ignoring"):
        d = measure.linear_epilogue(x, w, None, None, "relu", False)
    assert json.loads(fresh_cache.read_text())[d.what]["fused_s"] == d.fused_s      # the file is whole again


def _fake_match(fn=ops.ts_linear_epilogue, device="cuda", act="gelu"):
    with FakeTensorMode():
        x = torch.empty(8, 1024, 768, device=device, dtype=torch.bfloat16)
        w = torch.empty(3072, 768, device=device, dtype=torch.bfloat16)
        b = torch.empty(3072, device=device, dtype=torch.bfloat16)
    return Match("linear_epilogue", fn, [x, w, b, None], (act, False, None), [], [], "test")


def _decision(fused_s, unfused_s):
    return measure.Decision("k", fused_s, unfused_s, "a GPU")


def test_the_policy_declines_a_fused_gemm_measured_slower_and_keeps_a_faster_one(monkeypatch):
    seen = []

    def fake(x, w, bias, residual, activation, w_is_kn):
        seen.append((tuple(x.shape), tuple(w.shape), activation, w_is_kn))
        return answer

    monkeypatch.setattr(measure, "linear_epilogue", fake)
    answer = _decision(100e-6, 83e-6)
    why = policy.unpaid(_fake_match())
    assert why is not None and "measured on a GPU" in why and "100.0 us" in why and "83.0 us" in why
    assert seen == [((8, 1024, 768), (3072, 768), "gelu", False)]
    answer = _decision(60e-6, 83e-6)
    assert policy.unpaid(_fake_match()) is None
    answer = _decision(72e-6, 83e-6)                     # within the margin (0.87x): stays with Inductor
    assert policy.unpaid(_fake_match()) is not None
    # not measured: measure=False, a quantized GEMM, a CPU graph
    n = len(seen)
    assert policy.unpaid(_fake_match(), policy.Policy(measure=False)) is None
    assert policy.unpaid(_fake_match(fn=ops.ts_quant_linear_epilogue)) is None
    assert policy.unpaid(_fake_match(device="cpu")) is None
    assert len(seen) == n
    with policy.override(measure=False):
        assert policy.unpaid(_fake_match()) is None
    assert len(seen) == n


def test_measure_must_be_a_bool():
    with pytest.raises(LaunchError, match=r"measure=1.*True or False"):
        policy.Policy(measure=1)
    with pytest.raises(LaunchError, match="measure="):
        tilestack.optimize(torch.nn.Linear(4, 4), measure="yes")


def _grab(f, *args):
    """The FX graph Dynamo captures of f (as the backend receives it)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(f, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return graphs[0]


def test_a_swap_is_timed_against_the_ops_it_replaces_and_cached(fresh_cache, monkeypatch):
    from tilestack.compile.patterns import PASSES

    x, w, b = torch.randn(6, 40), torch.randn(40), torch.randn(40)
    gm = _grab(lambda x, w, b: torch.nn.functional.layer_norm(x, (40,), w, b), x, w, b)
    with config.override(backend="reference"):     # a CPU graph is rewritten only with a backend forced
        matches, declined = PASSES["norm"](gm)
        assert len(matches) == 1, declined
        d = measure.swap(gm, matches[0])
    assert d is not None and d.fused_s > 0 and d.unfused_s > 0 and d.baseline == "the original ops"
    assert "|norm|ts_layer_norm|float32[6, 40]/[40, 1];float32[40]/[1];float32[40]/[1]|" in d.what
    assert json.loads(fresh_cache.read_text())[d.what]["unfused_s"] == d.unfused_s
    monkeypatch.setattr(measure, "_time", lambda *a: pytest.fail("a cached swap was timed again"))
    with config.override(backend="reference"):
        assert measure.swap(gm, matches[0]).fused_s == d.fused_s


def test_a_swap_is_timed_on_inputs_laid_out_as_the_graph_hands_them_over(fresh_cache, monkeypatch):
    """A transposed view reaches the replacement as one (its copy is part of what the swap costs): the timed
    inputs keep the graph's strides, and the cache tells the layouts apart."""
    from tilestack.compile import rewrite
    from tilestack.compile.patterns import PASSES

    made = []
    real = rewrite.random_laid_out_like
    monkeypatch.setattr(rewrite, "random_laid_out_like", lambda f, g: made.append(real(f, g)) or made[-1])
    x, w, b = torch.randn(40, 6), torch.randn(40), torch.randn(40)
    gm = _grab(lambda x, w, b: torch.nn.functional.layer_norm(x.t(), (40,), w, b), x, w, b)
    with config.override(backend="reference"):
        matches, declined = PASSES["norm"](gm)
        assert len(matches) == 1, declined
        d = measure.swap(gm, matches[0])
    assert "float32[6, 40]/[1, 6];" in d.what, d.what
    assert [tuple(t.shape) for t in made] == [(6, 40), (40,), (40,)]
    assert made[0].stride() == (1, 6) and not made[0].is_contiguous()


def test_random_laid_out_like_keeps_strides_and_fills_every_element():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from tilestack.compile.rewrite import random_laid_out_like
    with FakeTensorMode():
        fakes = [torch.empty(2, 8, 3, 4).transpose(1, 2), torch.empty(5, 1).expand(5, 7), torch.empty(0, 3),
                 torch.empty(4, 6, dtype=torch.bfloat16)[:, ::2]]
    gen = torch.Generator().manual_seed(0)
    with unset_fake_temporarily():
        for f in fakes:
            r = random_laid_out_like(f, gen)
            assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype, (f.shape, f.stride())
            assert bool(r.isfinite().all()) and (r.numel() < 2 or float(r.float().std()) > 0)


def test_the_policy_measures_inference_swaps_on_a_gpu_only(monkeypatch):
    calls = []

    def fake_swap(gm, match):
        calls.append(match.pattern)
        return measure.Decision("k", 30e-6, 20e-6, "a GPU", "the original ops")

    monkeypatch.setattr(measure, "swap", fake_swap)
    with FakeTensorMode():
        x = torch.empty(8192, 768, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(768, device="cuda", dtype=torch.bfloat16)
        trained = torch.empty(8192, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        on_cpu = torch.empty(8192, 768, dtype=torch.bfloat16)
    m = Match("norm", ops.ts_rms_norm, [x, w], (1e-6,), [x], [], "rms_norm")
    why = policy.unpaid(m, gm=object())
    assert why is not None and "against the original ops 20.0 us" in why and calls == ["norm"]
    assert policy.unpaid(m) is None                                   # no graph given: not measured
    assert policy.unpaid(m, policy.Policy(measure=False), gm=object()) is None
    for out in (trained, on_cpu):                                     # a training graph, a CPU graph
        assert policy.unpaid(Match("norm", ops.ts_rms_norm, [x, w], (1e-6,), [out], [], "rms"), gm=object()) is None
    assert calls == ["norm"]


def test_a_measurement_that_fails_leaves_the_size_rule_with_a_warning(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(measure, "swap", broken)
    monkeypatch.setattr(measure, "linear_epilogue", broken)
    with FakeTensorMode():
        x = torch.empty(8192, 768, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(768, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="could not time the norm swap.*out of memory"):
        assert policy.unpaid(Match("norm", ops.ts_rms_norm, [x, w], (1e-6,), [x], [], "rms"), gm=object()) is None
    with pytest.warns(UserWarning, match="could not time the linear_epilogue swap"):
        assert policy.unpaid(_fake_match()) is None
