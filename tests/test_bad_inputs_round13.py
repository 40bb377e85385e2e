"""Round thirteen of the bad-input sweep: the parallel trainer's batch (``Trainer.step``, ``make_batch``) and the
tuning API (``tune.tune``, ``tune.SearchSpace``, ``tune.ConfigCache``, ``tune.size_bucket``).

What rounds 1-12 did not reach, and what it found (each test failed before its fix):
- ``Trainer.step(idx, targets)`` checked only the batch's size against the plan: a token id past the vocabulary (or
  below 0) in one data-parallel rank's rows failed that rank alone, inside the embedding or the loss (a bare
  IndexError), while the other rank, waiting in the gradient all-reduce, got gloo's "Connection closed by peer" (on
  NCCL it may wait until its timeout); a float or bool batch, int32 targets, a 1-d or 3-d batch, targets of another
  shape than idx, a NumPy array or a list each failed inside torch or with an AttributeError, an empty batch in a
  reshape ("ambiguous"). Every rank now checks the global batch it holds, so all refuse it together, by name,
  before any work (``parallel.engine.check_batch``); ``make_batch(seq=-1)`` (or 0) made an empty batch without a
  word, a float or bool size failed inside torch.randint;
- ``tune.tune``: a time function returning NaN for the first config made it the winner (NaN never compares
  smaller), a negative or zero time won, a str or None "seconds" were compared as they came; ``candidates`` given
  as one config (a dict) searched its keys as configs; ``tol=nan`` failed every config as "a wrong result";
  ``kernel_name=3`` was taken. A time that is no measurement (NaN, <= 0, inf) is now a failed trial, never chosen;
  one that is no number, and each bad argument, a TunableError naming it;
- ``tune.SearchSpace``: ``fixed=dict(BM=32)`` (a tunable, or a launch option such as num_warps) failed in
  ``configs()`` with a bare TypeError ("got multiple values for keyword argument"), ``fixed='BM=64'`` the same way,
  ``device='sm90-132sm-227kb'`` with an AttributeError, ``kernel=None`` too; ``restrict=dict(BM=())`` searched no
  config and ``tune`` then blamed "the device's limits", ``restrict=dict(BM=32)`` was a TypeError;
  ``configs(shared_limit=nan)`` kept no config without a word;
- ``tune.size_bucket('100')`` (or 100.5) answered 128, ``size_bucket(-1)`` 4, NaN failed in int();
  ``ConfigCache.put`` / ``get`` with a str device key failed with "'str' object has no attribute 'meta'", a
  config that is no dict with "'NoneType' object has no attribute 'items'".

(A tile-language kernel's output that requires grad, part of this round's work, is in
``test_bad_inputs_round12_lang.py``.)
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tilestack.errors import TunableError
from tilestack.kernels import gemm_kernel
from tilestack.parallel import GPT, TINY, ModelConfigError, lm_loss, make_batch, run_local
from tilestack.tune import ConfigCache, SearchSpace, size_bucket, tune
from tilestack.tune.devices import DeviceKey

H100 = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H100")


# ---- Trainer.step's batch ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["idx", "targets"])
def test_a_bad_token_in_one_ranks_rows_is_refused_by_every_rank_before_any_work(where):
    import _bad_inputs_workers_round13 as W  # tests/ is on the path (conftest); spawned ranks inherit it

    ranks = run_local(W.bad_token_in_one_rank, 2, (where,), timeout_s=300)
    for rank, (kind, message, unchanged) in enumerate(ranks):
        assert kind == "ParallelConfigError", (rank, kind, message)
        assert f"Trainer.step: {where} holds token id {TINY.vocab}; expected ids in [0, {TINY.vocab})" in message
        assert unchanged, f"rank {rank} changed its parameters before refusing"


REFUSED_BATCHES = {
    "idx float": "idx has dtype torch.float32; expected token ids of dtype torch.int64 or torch.int32",
    "idx bool": "idx has dtype torch.bool",
    "targets int32": "targets has dtype torch.int32; expected token ids of dtype torch.int64",
    "idx numpy": "idx is ndarray; expected a torch.Tensor of token ids",
    "targets list": "targets is list; expected a torch.Tensor",
    "idx 1-d": "idx has shape (8,); expected (B, N)",
    "idx 3-d": "idx has shape (1, 2, 8); expected (B, N)",
    "no rows": "idx has shape (0, 8); expected (B, N), B sequences of N tokens, both >= 1",
    "no tokens": "idx has shape (2, 0)",
    "shapes differ": "targets has shape (2, 4) and idx (2, 8); expected one shape",
    "idx meta": "idx is a meta tensor, which holds no token ids",
    "idx -1": f"idx holds token id -1; expected ids in [0, {TINY.vocab})",
    "idx vocab": f"idx holds token id {TINY.vocab}; expected ids in [0, {TINY.vocab})",
    "targets -1": f"targets holds token id -1; expected ids in [0, {TINY.vocab}) (the model's vocab) or -100",
    "targets vocab": f"targets holds token id {TINY.vocab}",
}


@pytest.mark.slow
def test_bad_batches_are_refused_by_name_and_good_ones_train():
    import _bad_inputs_workers_round13 as W

    (rows,) = run_local(W.batch_refusals, 1, timeout_s=300)
    refused = {case: (kind, message, unchanged) for case, kind, message, unchanged in rows if case in REFUSED_BATCHES}
    assert refused.keys() == REFUSED_BATCHES.keys()
    for case, fragment in REFUSED_BATCHES.items():
        kind, message, unchanged = refused[case]
        assert kind == "ParallelConfigError" and fragment in message, (case, kind, message)
        assert unchanged, f"{case}: parameters changed before the refusal"
    accepted = {case: (kind, value) for case, kind, value, _ in rows if case not in REFUSED_BATCHES}
    assert {kind for kind, _ in accepted.values()} == {"ok"}
    # the first step that ran (int32 ids) is the first step of a fresh model: its loss, against plain torch's
    idx, targets = make_batch(TINY, batch=2, seq=8)
    with torch.no_grad():
        expected = lm_loss(GPT(TINY, seed=0).double()(idx), targets).item()
    assert float(accepted["idx int32"][1]) == pytest.approx(expected, rel=1e-5)
    assert all(math.isfinite(float(v)) for _, v in accepted.values())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(batch=0, seq=8), "make_batch: batch=0; expected an int >= 1"),
    (dict(batch=2, seq=-1), "make_batch: seq=-1; expected an int >= 1"),
    (dict(batch=2, seq=0), "make_batch: seq=0"),
    (dict(batch=2, seq=8.0), "make_batch: seq=8.0"),
    (dict(batch=True, seq=8), "make_batch: batch=True"),
    (dict(batch=2, seq=8, seed=-1), "make_batch: seed=-1; expected an int >= 0"),
])
def test_make_batch_refuses_sizes_that_are_no_sizes(kwargs, fragment):
    with pytest.raises(ModelConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_batch(TINY, **kwargs)


def test_make_batch_still_makes_next_token_pairs():
    idx, targets = make_batch(TINY, batch=3, seq=5, seed=np.int64(4).item())
    assert idx.shape == targets.shape == (3, 5) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 1:], targets[:, :-1])          # targets are idx shifted by one
    assert 0 <= int(idx.min()) and int(idx.max()) < TINY.vocab


# ---- tune.tune -----------------------------------------------------------------------------------------------------
CANDIDATES = [dict(BM=16), dict(BM=32), dict(BM=64), dict(BM=128)]


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, float("inf")])
def test_a_time_that_is_no_measurement_is_never_the_winner(bad):
    seconds = {16: bad, 32: 3.0, 64: 2.0, 128: 2.5}            # BM=16, tried first, measured nothing
    res = tune("gemm_kernel", CANDIDATES, time=lambda c: seconds[c["BM"]])
    assert res.best == dict(BM=64) and res.seconds == 2.0
    assert res.trials[0].seconds is None and f"time returned {bad!r}" in res.trials[0].error
    with pytest.raises(RuntimeError, match=rf"every config of gemm_kernel failed; first error: time returned "
                       rf"{re.escape(repr(bad))}"):
        tune("gemm_kernel", CANDIDATES, time=lambda c: bad)



@pytest.mark.parametrize("value", ["1.0", None, True, torch.tensor(1.0)])
def test_a_time_function_returning_no_number_is_refused(value):
    with pytest.raises(TunableError, match=r"tune: time\(\{'BM': 16\}\) returned .*expected the config's seconds"):
        tune("gemm_kernel", CANDIDATES, time=lambda c: value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(candidates=dict(BM=16)), "candidates is dict"),
    (dict(candidates="BM=16"), "candidates is str"),
    (dict(candidates=[dict(BM=16), ("BM", 32)]), r"candidate \('BM', 32\) \(tuple\) of gemm_kernel"),
    (dict(candidates=5), "candidates is int"),
    (dict(kernel_name=3), "kernel_name=3 .int.; expected the kernel's name"),
    (dict(time=2.0), "time=2.0; expected a function of a config"),
    (dict(check="tight"), "check='tight'"),
    (dict(tol=float("nan")), "tol=nan; expected a relative error >= 0"),
    (dict(tol=-0.1), "tol=-0.1"),
    (dict(tol="1e-2"), "tol='1e-2'"),
    (dict(samples=0, strategy="random"), "samples=0; expected an int >= 1"),
    (dict(samples=True, strategy="random"), "samples=True"),
    (dict(deadline=float("nan")), "deadline=nan; expected a clock.. value or None"),
])
def test_tune_refuses_its_bad_arguments_by_name_before_timing_anything(kwargs, fragment):
    timed = []
    args = dict(kernel_name="gemm_kernel", candidates=CANDIDATES, time=lambda c: timed.append(c) or 1.0) | kwargs
    with pytest.raises(TunableError, match=fragment):
        tune(args.pop("kernel_name"), args.pop("candidates"), **args)
    assert timed == []


def test_tune_takes_any_iterable_of_configs():
    res = tune("gemm_kernel", (c for c in CANDIDATES), time=lambda c: 1.0 / c["BM"])
    assert res.best == dict(BM=128) and len(res.trials) == 4


# ---- tune.SearchSpace ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    (dict(kernel=None), "kernel is NoneType None; expected a tile-language kernel"),
    (dict(kernel=lambda A: A), "kernel is function"),
    (dict(fixed="BM=64"), r"fixed='BM=64' \(str\); expected a dict of constants"),
    (dict(fixed=dict(BM=32)), r"fixed=\{'BM': 32\} names a value the search chooses .*restrict=dict\(BM=\(32,\)\)"),
    (dict(fixed=dict(num_warps=4)), r"fixed=\{'num_warps': 4\} names a value the search chooses"),
    (dict(restrict="BM"), r"restrict='BM' \(str\); expected a dict"),
    (dict(restrict=dict(BM=32)), r"restrict\['BM'\]=32; expected a non-empty tuple .*one value: \(32,\)"),
    (dict(restrict=dict(BM="32")), r"restrict\['BM'\]='32'; .*a str is not split into characters"),
    (dict(restrict=dict(BM=())), r"restrict\['BM'\]=\(\); .*none would leave no config to search"),
    (dict(device="sm90-132sm-227kb"), r"device='sm90-132sm-227kb' \(str\); expected a DeviceKey .*DeviceKey.parse"),
])
def test_search_space_refuses_what_configs_would_fail_on(kwargs, fragment):
    with pytest.raises(TunableError, match=fragment):
        SearchSpace(**(dict(kernel=gemm_kernel) | kwargs))


@pytest.mark.parametrize("limit", [float("nan"), -5, float("inf"), True, "48k"])
def test_search_space_configs_refuses_a_limit_that_is_no_byte_count(limit):
    a = torch.randn(64, 64)
    space = SearchSpace(gemm_kernel, restrict=dict(BM=(32,), BN=(32,), BK=(32,), GROUP_M=(1,), num_warps=(4,),
                                                   num_stages=(1, 2)), device=H100)
    with pytest.raises(TunableError, match=r"SearchSpace.configs: shared_limit=.*; expected bytes >= 0, or None"):
        space.configs((a, a, a), shared_limit=limit)
    # what it counts, against the hand count: A and B tiles of 32x32 f32, 4 KiB each, a second copy per stage
    assert space.shared_bytes((a, a, a), space.all_configs()[0]) == 2 * 32 * 32 * 4
    assert space.shared_bytes((a, a, a), space.all_configs()[1]) == 2 * 2 * 32 * 32 * 4
    assert [c["num_stages"] for c in space.configs((a, a, a), shared_limit=2 * 32 * 32 * 4)] == [1]


# ---- tune.size_bucket, tune.ConfigCache --------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["100", 100.5, -1, float("nan"), True, None])
def test_size_bucket_refuses_what_is_no_size(n):
    with pytest.raises(TunableError, match=r"size_bucket: n=.*; expected a size, an int >= 0"):
        size_bucket(n)


def test_size_bucket_rounds_up_to_a_power_of_two():
    assert [size_bucket(n) for n in (1, 2, 3, 3000, 4096, 4097)] == [1, 2, 4, 4096, 4096, 8192]
    assert size_bucket(np.int64(3000)) == 4096


@pytest.mark.parametrize("method, kwargs, fragment", [
    ("put", dict(device="sm90-132sm-227kb"), r"ConfigCache.put: device='sm90-132sm-227kb' \(str\); expected a "
                                             r"DeviceKey"),
    ("get", dict(device="sm90-132sm-227kb"), r"ConfigCache.get: device='sm90-132sm-227kb'"),
    ("put", dict(config=None), r"ConfigCache.put: config=None \(NoneType\); expected a dict"),
    ("put", dict(config=[("BM", 64)]), r"config=\[\('BM', 64\)\] \(list\)"),
    ("put", dict(options="num_warps=4"), r"options='num_warps=4' \(str\)"),
    ("put", dict(kernel=None), r"kernel=None; expected a str without '\|'"),
    ("put", dict(signature="f32|D64"), r"signature='f32\|D64'; expected a str without '\|'"),
    ("put", dict(bucket=0), r"bucket=0; expected a size bucket, an int >= 1"),
    ("get", dict(bucket="4096"), r"ConfigCache.get: bucket='4096'"),
    ("get", dict(bucket=True), r"bucket=True"),
])
def test_config_cache_refuses_what_cannot_key_an_entry(tmp_path, method, kwargs, fragment):
    cache = ConfigCache(tmp_path, tables_dir=None)
    args = dict(kernel="gemm", signature="float32", device=H100, bucket=1024) | kwargs
    with pytest.raises(TunableError, match=fragment):
        if method == "put":
            cache.put(args["kernel"], args["signature"], args["device"], args["bucket"],
                      kwargs.get("config", dict(BM=64)), options=kwargs.get("options"))
        else:
            cache.get(args["kernel"], args["signature"], args["device"], args["bucket"])
    assert not (tmp_path / "tuned").exists() or not any((tmp_path / "tuned").iterdir())   # nothing written
    cache.put("gemm", "float32", H100, 1024, dict(BM=64, num_warps=8))
    assert ConfigCache(tmp_path, tables_dir=None).get("gemm", "float32", H100, 1024) == dict(BM=64, num_warps=8)
