"""tune(): times every candidate with the given function, skips configs that raise or compute a wrong result,
and keeps the fastest of the rest. Time functions here are fakes: a table of seconds per config."""

import math

import pytest

from tilestack.kernels import gemm_kernel
from tilestack.tune import SearchSpace, TuneResult, tune


def cfg(bm, bn, stages=1):
    return dict(BM=bm, BN=bn, num_stages=stages)


CANDIDATES = [cfg(32, 32), cfg(64, 32), cfg(64, 64), cfg(128, 64), cfg(128, 128, 3)]
SECONDS = {(32, 32): 5.0, (64, 32): 3.0, (64, 64): 2.0, (128, 64): 1.0, (128, 128): 0.5}


def fake_time(c):
    return SECONDS[c["BM"], c["BN"]]


def test_picks_the_fastest():
    res = tune("gemm_kernel", CANDIDATES, time=fake_time)
    assert isinstance(res, TuneResult)
    assert res.best == cfg(128, 128, 3) and res.seconds == 0.5
    assert [t.seconds for t in res.trials] == [5.0, 3.0, 2.0, 1.0, 0.5]
    assert all(t.error is None for t in res.trials)


def test_skips_configs_that_raise_and_that_are_wrong():
    """The two fastest configs fail: one does not compile, one computes garbage. Neither may win."""
    logged = []

    def time(c):
        if c["BM"] == 128 and c["BN"] == 128:
            raise RuntimeError("out of resources: shared memory, required: 262144")
        return fake_time(c)

    def check(c):
        return {(128, 64): 0.5, (64, 32): math.nan}.get((c["BM"], c["BN"]), 1e-3)

    res = tune("gemm_kernel", CANDIDATES, time=time, check=check, tol=1e-2, log=logged.append)
    assert res.best == cfg(64, 64) and res.seconds == 2.0
    errors = {(t.config["BM"], t.config["BN"]): t.error for t in res.trials}
    assert errors[128, 128].startswith("RuntimeError: out of resources")
    assert errors[128, 64] == "wrong result (rel err 5.0e-01)"
    assert errors[64, 32].startswith("wrong result")           # NaN is never within tolerance
    assert errors[32, 32] is None and errors[64, 64] is None
    assert len(logged) == 3 and any("out of resources" in line for line in logged)


def test_a_wrong_config_is_not_timed():
    timed = []

    def time(c):
        timed.append(c)
        return fake_time(c)

    tune("gemm_kernel", CANDIDATES, time=time, check=lambda c: 1.0 if c["BM"] == 32 else 0.0)
    assert cfg(32, 32) not in timed and len(timed) == 4


def test_every_config_failing_is_an_error():
    def time(c):
        raise ValueError("no")

    with pytest.raises(RuntimeError, match=r"every config of gemm_kernel failed; first error: ValueError: no"):
        tune("gemm_kernel", CANDIDATES, time=time)
    with pytest.raises(RuntimeError, match=r"first error: wrong result"):
        tune("gemm_kernel", CANDIDATES, time=fake_time, check=lambda c: 1.0)


def test_no_candidates_and_bad_strategy():
    with pytest.raises(ValueError, match="no candidate configs for gemm_kernel"):
        tune("gemm_kernel", [], time=fake_time)
    with pytest.raises(ValueError, match="strategy='grid'; expected 'exhaustive', 'random', 'local' or a function"):
        tune("gemm_kernel", CANDIDATES, time=fake_time, strategy="grid")


def test_random_strategy_samples_a_seeded_subset():
    space = SearchSpace(gemm_kernel, restrict=dict(BM=(32, 64, 128), BN=(32, 64, 128), BK=(32,), GROUP_M=(4,),
                                                   num_warps=(4,), num_stages=(1, 2)))
    candidates = space.all_configs()
    seen = []

    def time(c):
        seen.append(c)
        return c["BM"] * c["BN"] / c["num_stages"]

    a = tune("gemm_kernel", candidates, time=time, strategy="random", samples=5, seed=7)
    first = list(seen)
    seen.clear()
    b = tune("gemm_kernel", candidates, time=time, strategy="random", samples=5, seed=7)
    assert len(first) == 5 and first == seen and a.best == b.best
    assert all(c in candidates for c in first)
    assert a.best == min(first, key=time)
    c = tune("gemm_kernel", candidates, time=lambda c: 1.0, strategy="random", samples=100)
    assert len(c.trials) == len(candidates)


def test_as_code():
    res = tune("attention_fwd_kernel", [dict(BM=128, BN=64, num_warps=8, num_stages=3)], time=lambda c: 1e-3)
    assert res.as_code() == "attention_fwd_kernel(..., BM=128, BN=64, num_warps=8, num_stages=3)"
