"""Fuzz round seventeen, part two: the planner's public functions (``describe_transformer``, ``describe_gpt``,
``search``, ``predict`` and ``Plan``) and the federated API (``Synthetic``, ``fairness``, ``Task``, ``SystemModel``)
under seeded bad arguments, with no multi-process run and no training.

Each argument in turn gets values drawn with a fixed seed from the wrong kinds (a str, a float, a bool, None, a list,
a NumPy array, NaN, inf, 1 << 70): a clear refusal naming it, before any work, or, for a NumPy integer where an int
is asked, the same answer as the int gives.

What this round found (each test below failed before its fix):
- ``search(world_size=1 << 70)`` hung: the divisors of the world size are found by trial division up to its square
  root (2**35 steps); world sizes past 2**40 are now refused by name;
- ``describe_transformer(n_layer=1 << 70)`` built one LayerDesc per layer until the machine ran out of memory (the
  process was killed); ``d``, ``vocab``, ``seq``, ``dtype_bytes`` past int64 were counted as given, and
  ``search(batch=1 << 70)`` / ``Plan(batch=1 << 70)`` planned them; ``describe_transformer(n_layer=np.int64(2))``
  and ``describe_gpt(seq=np.int64(16))`` were refused as "no positive int" where search takes NumPy ints;
- ``predict(recv_buffers="no")`` (any non-bool) was taken by its truth;
- ``Synthetic`` checked its fields with bare comparisons: a str or None alpha, beta, num_devices, test_fraction or
  max_samples failed with "'<' not supported", NaN or inf alpha, a float ``num_devices``, a str ``num_features``
  or ``seed`` and ``iid="no"`` were kept and failed (or ran otherwise) only when a device was drawn;
- ``fairness(1.5)`` failed in len(), ``fairness("abc")`` in float(), ``fairness(nan)`` inside numpy's sort,
  ``fairness(None)`` and ``fairness(0)`` answered ``{}`` as if no client had reported, a NaN accuracy gave NaN
  summaries;
- ``Task(norm="no")`` (any non-bool) trained a normed model; a NumPy array as ``dataset`` / ``model`` / ``attack``
  failed with "truth value of an array is ambiguous"; ``Task(num_clients=1 << 70)`` was taken;
- ``SystemModel(num_clients=1 << 70)`` failed inside numpy ("Maximum allowed dimension exceeded");
  ``SystemModel(speed_sigma=1e3)`` drew infinite speeds and the error named "speeds", an argument never given.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _fuzz_round17 import POOL, draws, refused
from tilestack import federated as F
from tilestack.parallel import TINY
from tilestack.parallel import plan as P

DESC = dict(n_layer=2, d=32, n_head=4, vocab=64, seq=16)


@pytest.fixture(scope="module")
def small():
    desc = P.describe_transformer(**DESC)
    return desc, P.RooflineCompute(desc, "h200"), P.h200_nccl()


# ---- describe_transformer / describe_gpt ----------------------------------------------------------------------------
DESCRIBE_BAD = ("str", "float", "bool", "none", "list", "nan", "inf", "neg", "zero", "huge", "array", "tensor")
DESCRIBE_CASES = [(arg, label) for arg in (*DESC, "dtype_bytes") for label in draws(arg, DESCRIBE_BAD, 5)]
DESCRIBE_CASES += [("n_layer", "huge")] if ("n_layer", "huge") not in DESCRIBE_CASES else []


@pytest.mark.parametrize("arg, label", DESCRIBE_CASES, ids=[f"{a}-{b}" for a, b in DESCRIBE_CASES])
def test_describe_transformer_refuses_a_bad_size_by_name(arg, label):
    refused(lambda: P.describe_transformer(**DESC | {arg: POOL[label]}), arg, POOL[label])


def test_describe_takes_numpy_ints_as_the_ints_they_are():
    as_int = P.describe_transformer(**DESC)
    as_numpy = P.describe_transformer(**{k: np.int64(v) for k, v in DESC.items()})
    assert as_numpy == as_int
    # by hand: embed (vocab + seq) * d, per block 12 d^2 + 13 d, final norm + head 2 d + vocab * d
    d, v, s = DESC["d"], DESC["vocab"], DESC["seq"]
    assert sum(layer.params for layer in as_int.layers) == (v + s) * d + 2 * (12 * d * d + 13 * d) + 2 * d + v * d
    assert P.describe_gpt(TINY, np.int64(16)) == P.describe_gpt(TINY, 16)


def test_a_layer_count_past_the_limit_is_refused_before_any_layer_is_built():
    message = refused(lambda: P.describe_transformer(**DESC | {"n_layer": 1 << 70}), "n_layer", 1 << 70)
    assert "up to 65536" in message


# ---- search / predict / Plan ---------------------------------------------------------------------------------------
SEARCH_BAD = {
    "world_size": ("str", "float", "bool", "none", "nan", "neg", "zero", "huge", "array", "tensor"),
    "batch": ("str", "float", "bool", "none", "nan", "neg", "zero", "huge", "tensor"),
}
SEARCH_CASES = [(arg, label) for arg, labels in SEARCH_BAD.items() for label in draws(arg, labels, 5)]
SEARCH_CASES += [(a, "huge") for a in SEARCH_BAD if (a, "huge") not in SEARCH_CASES]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arg, label", SEARCH_CASES, ids=[f"{a}-{b}" for a, b in SEARCH_CASES])
def test_search_refuses_a_bad_world_or_batch_by_name_without_hanging(small, arg, label):
    desc, compute, comm = small
    kw = dict(world_size=2, batch=8) | {arg: POOL[label]}
    refused(lambda: P.search(desc, compute, comm, **kw), arg, POOL[label])


def test_search_takes_numpy_ints_and_answers_as_for_ints(small):
    desc, compute, comm = small
    a = P.search(desc, compute, comm, world_size=2, batch=8)
    b = P.search(desc, compute, comm, world_size=np.int64(2), batch=np.int64(8))
    assert [r.prediction.plan for r in a] == [r.prediction.plan for r in b]
    assert [r.prediction.step_s for r in a] == [r.prediction.step_s for r in b]


@pytest.mark.parametrize("field", ["batch", "dp", "microbatches"])
def test_a_plan_size_past_int64_is_refused(small, field):
    desc, compute, comm = small
    plan = P.Plan(**{"batch": 8, field: 1 << 70})
    refused(lambda: P.predict(plan, desc, compute, comm), field, 1 << 70)


@pytest.mark.parametrize("label", ["str", "float", "none", "list", "zero", "array"])
def test_predict_refuses_recv_buffers_that_is_no_switch(small, label):
    desc, compute, comm = small
    refused(lambda: P.predict(P.Plan(batch=8), desc, compute, comm, recv_buffers=POOL[label]), "recv_buffers",
            POOL[label])


# ---- federated: Synthetic, fairness, Task, SystemModel -------------------------------------------------------------
SYNTHETIC_BAD = {
    "alpha": ("str", "none", "list", "nan", "inf", "neg", "array", "bool"),
    "beta": ("str", "none", "list", "nan", "inf", "neg", "array", "bool"),
    "num_devices": ("str", "float", "none", "list", "nan", "inf", "zero", "bool", "array"),
    "num_features": ("str", "float", "none", "list", "zero", "neg", "tensor"),
    "num_classes": ("str", "float", "none", "list", "zero", "neg", "tensor"),
    "seed": ("str", "float", "none", "list", "neg", "nan", "array"),
    "max_samples": ("str", "list", "nan", "inf", "zero", "array", "float"),
    "test_fraction": ("str", "none", "list", "nan", "zero", "inf", "array"),
    "iid": ("str", "float", "none", "list", "zero", "array"),
}
SYNTHETIC_CASES = [(arg, label) for arg, labels in SYNTHETIC_BAD.items() for label in draws(arg, labels, 3)]


@pytest.mark.parametrize("arg, label", SYNTHETIC_CASES, ids=[f"{a}-{b}" for a, b in SYNTHETIC_CASES])
def test_synthetic_refuses_a_bad_field_by_name_when_made(arg, label):
    refused(lambda: F.Synthetic(**{"num_devices": 4, arg: POOL[label]}), arg, POOL[label])


def test_synthetic_takes_numpy_ints_and_draws_the_same_devices():
    a = F.Synthetic(num_devices=3, seed=1, max_samples=60)
    b = F.Synthetic(num_devices=np.int64(3), seed=np.int64(1), max_samples=np.int64(60))
    for k in range(3):
        for x, y in zip(a.device(k), b.device(k), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("label", ["str", "float", "bool", "none", "nan", "zero", "huge", "tensor", "dict"])
def test_fairness_refuses_values_that_are_no_list_of_numbers(label):
    refused(lambda: F.fairness(POOL[label]), "values", POOL[label])


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", None, True])
def test_fairness_refuses_a_value_that_is_no_finite_number(bad):
    refused(lambda: F.fairness([0.5, bad, 0.7]), "values", bad)


def test_fairness_against_a_hand_computation():
    values = [0.2, 0.4, 0.6, 0.8]
    f = F.fairness(np.array(values))                        # a NumPy array of accuracies is a list of them
    mean = sum(values) / 4
    var = sum((v - mean) ** 2 for v in values) / 4
    jain = sum(values) ** 2 / (4 * sum(v * v for v in values))
    assert f["mean"] == pytest.approx(mean) and f["var"] == pytest.approx(var) and f["jain"] == pytest.approx(jain)
    assert f["worst"] == 0.2 and f["worst10"] == 0.2 and F.fairness([]) == {}
    assert F.fairness([np.float32(0.5), np.int64(1)])["mean"] == pytest.approx(0.75)


TASK_BAD = {
    "norm": ("str", "float", "none", "list", "zero", "array", "tensor"),
    "dataset": ("array", "list", "none", "float"),
    "model": ("array", "list", "none", "float"),
    "attack": ("array", "list", "none", "float"),
    "num_clients": ("huge", "zero", "neg", "float", "str"),
}
TASK_CASES = [(arg, label) for arg, labels in TASK_BAD.items() for label in draws(arg, labels, 3)]
TASK_CASES += [(a, b) for a, b in (("norm", "str"), ("num_clients", "huge")) if (a, b) not in TASK_CASES]


@pytest.mark.parametrize("arg, label", TASK_CASES, ids=[f"{a}-{b}" for a, b in TASK_CASES])
def test_task_refuses_a_bad_field_by_name(arg, label):
    refused(lambda: F.Task(**{"num_clients": 4, arg: POOL[label]}), arg, POOL[label])


SYSTEM_CASES = [("num_clients", 1 << 70), ("speed_sigma", 1e3), ("bandwidth_sigma", 1e3), ("speed_sigma", 1 << 70)]


@pytest.mark.parametrize("arg, value", SYSTEM_CASES, ids=[f"{a}-{v:.3g}" for a, v in SYSTEM_CASES])
def test_system_model_names_the_argument_that_cannot_be_drawn(arg, value):
    refused(lambda: F.SystemModel(**{"num_clients": 4, arg: value}), arg, value)


def test_system_model_speeds_against_a_hand_draw():
    sm = F.SystemModel(num_clients=np.int64(5), speed=100.0, speed_sigma=0.5, seed=3)
    rng = np.random.default_rng([3, 19])                    # the generator SystemModel draws from (system.py)
    np.testing.assert_allclose(sm.speeds, 100.0 * rng.lognormal(0.0, 0.5, 5))
    assert sm.speeds.shape == (5,) and sm.num_clients == 5
