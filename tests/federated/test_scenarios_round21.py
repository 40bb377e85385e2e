"""Federated scenarios, round 21 (1 of 2): byzantine clients (sign flip, Gaussian noise) against Flower's robust
aggregators with the aggregate written out by hand, and ``Compressed(inner, 'int8', ratio=...)`` in Python.

tilestack's ClientApp on tilestack's in-process Flower ``Grid`` (``simulate``); Flower 1.41's FedMedian,
FedTrimmedAvg and Krum unchanged. Reference, independent of the code under test: each honest client's SGD replayed
on its seeded minibatches (``_fl_round7.client_model``), the attack applied in float64, the robust rule in float64.

What this round found, fixed:

- *int8 given a ratio in Python.* ``Compressed(s, "int8", ratio=0.05)`` ran plain int8, the ratio dropped without a
  word (the CLI spec ``int8:0.05`` was already refused). Refused naming ``ratio``; ``None`` (the default now), 0.0
  (what ``compression.parse("int8")`` gives) and 1.0 (every entry, what int8 sends) are accepted; top-k's default
  ratio stays 0.01.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model
from _fl_round9 import keep
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum

from tilestack.federated import Task, initial_arrays, simulate
from tilestack.federated.compression import Compressed

pytestmark = pytest.mark.timeout(120)

ALL = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=5, min_available_nodes=5)


def _task(attack: str, scale: float) -> Task:
    return Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=5, local_steps=3,
                lr=0.2, malicious_fraction=0.2, attack=attack, attack_scale=scale)  # fmt: skip


def _honest(task: Task, x0: dict[str, np.ndarray], n: int = 5) -> dict[int, dict[str, np.ndarray]]:
    return {p: {k: v.astype(np.float64) for k, v in client_model(task, p, 1, x0)[0].items()} for p in range(n)}


# ---- byzantine clients against robust aggregation, by hand ----------------------------------------------------------
@pytest.mark.parametrize("rule", ["median", "trimmed"])
def test_a_sign_flipping_client_moves_neither_the_median_nor_the_trimmed_mean_off_their_hand_values(rule):
    """Five clients, one of them (task.is_malicious) sends start - 10 (trained - start). FedMedian's aggregate is the
    coordinate-wise median of the five uploads and FedTrimmedAvg(beta=0.2)'s the mean of the middle three, both
    written out here in float64 from the replayed honest models and the flipped one; FedAvg is pulled far away."""
    task = _task("signflip", 10.0)
    bad = [p for p in range(5) if task.is_malicious(p)]
    assert len(bad) == 1
    x0 = np_(initial_arrays(task))
    ups = _honest(task, x0)
    ups[bad[0]] = {k: x0[k] - 10.0 * (ups[bad[0]][k] - x0[k]) for k in x0}
    stack = {k: np.stack([ups[p][k] for p in range(5)]) for k in x0}
    if rule == "median":
        strategy, want = FedMedian(**ALL), {k: np.median(s, axis=0) for k, s in stack.items()}
    else:
        strategy = FedTrimmedAvg(**ALL, beta=0.2)
        want = {k: np.sort(s, axis=0)[1:4].mean(axis=0) for k, s in stack.items()}
    models: list = []
    res = simulate(strategy, task, rounds=1, evaluate=False, extra_metrics=keep(models))
    assert res.history.rounds[-1].num_aggregated == 5
    for k in x0:
        np.testing.assert_allclose(models[-1][k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    mean = {k: s.mean(axis=0) for k, s in stack.items()}  # what FedAvg over equal sizes would take instead
    assert max(np.abs(mean[k] - want[k]).max() for k in x0) > 3 * max(np.abs(want[k] - x0[k]).max() for k in x0)


def test_krum_under_a_gaussian_noise_attacker_picks_the_honest_client_with_the_smallest_score_exactly():
    """One client adds N(0, 10^2) to its model. Krum(f = 1) over five uploads scores each by the squared distances to
    its n - f - 2 = 2 nearest; the noisy upload is far from all, so the pick is the honest client whose two nearest
    honest neighbours are closest (computed here from the replayed honest models), and the global model is that
    client's upload, unchanged."""
    task = _task("noise", 10.0)
    bad = next(p for p in range(5) if task.is_malicious(p))
    x0 = np_(initial_arrays(task))
    ups = _honest(task, x0)
    honest = [p for p in range(5) if p != bad]
    flat = {p: np.concatenate([ups[p][k].ravel() for k in sorted(x0)]) for p in honest}
    score = {p: sum(sorted(float(np.sum((flat[p] - flat[q]) ** 2)) for q in honest if q != p)[:2]) for p in honest}
    pick = min(score, key=score.get)
    models: list = []
    simulate(Krum(**ALL, num_malicious_nodes=1), task, rounds=1, evaluate=False, extra_metrics=keep(models))
    for k in x0:
        np.testing.assert_allclose(models[-1][k], ups[pick][k], rtol=1e-6, atol=1e-7, err_msg=k)


# ---- Compressed(inner, 'int8', ratio) -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.05, 0.5, math.nan, 2.0, True, "0.5"])
def test_compressed_int8_refuses_a_ratio_naming_it(ratio):
    with pytest.raises(ValueError, match=r"ratio=.*int8"):
        Compressed(FedAvg(), "int8", ratio)
    with pytest.raises(ValueError, match="ratio="):
        Compressed(FedAvg(), method="int8", ratio=ratio)


def test_compressed_int8_without_a_ratio_and_topk_default_are_unchanged():
    for ratio in (None, 0.0, 1.0):
        assert Compressed(FedAvg(), "int8", ratio).spec == "int8"
    assert Compressed(FedAvg(), "int8").spec == "int8"
    assert Compressed(FedAvg()).spec == "topk:0.01"
    assert Compressed(FedAvg(), "topk", 0.25).spec == "topk:0.25"
    with pytest.raises(ValueError, match="ratio"):
        Compressed(FedAvg(), "topk", 0.0)


def test_bulyan_under_a_sign_flipping_client_stays_inside_the_honest_clients_range_coordinate_by_coordinate():
    """Seven clients (Bulyan with f = 1 needs 4f + 3 = 7), one flips its update x10: every coordinate of Bulyan's
    aggregate lies within the range of the six honest uploads (replayed here), while the plain mean leaves it."""
    task = Task(dataset="blobs", num_samples=420, num_features=4, num_classes=3, num_clients=7, local_steps=3, lr=0.2,
                malicious_fraction=1 / 7, attack="signflip", attack_scale=10.0)  # fmt: skip
    bad = [p for p in range(7) if task.is_malicious(p)]
    assert len(bad) == 1
    x0 = np_(initial_arrays(task))
    ups = _honest(task, x0, 7)
    honest = [ups[p] for p in range(7) if p != bad[0]]
    ups[bad[0]] = {k: x0[k] - 10.0 * (ups[bad[0]][k] - x0[k]) for k in x0}
    models: list = []
    all7 = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=7, min_available_nodes=7)
    simulate(Bulyan(**all7, num_malicious_nodes=1), task, rounds=1, evaluate=False, extra_metrics=keep(models))
    tol = 1e-6
    for k in x0:
        lo = np.min([h[k] for h in honest], axis=0) - tol
        hi = np.max([h[k] for h in honest], axis=0) + tol
        assert np.all((models[-1][k] >= lo) & (models[-1][k] <= hi)), k
    mean = {k: np.mean([ups[p][k] for p in range(7)], axis=0) for k in x0}
    outside = [np.any(mean[k] < np.min([h[k] for h in honest], axis=0)) or
               np.any(mean[k] > np.max([h[k] for h in honest], axis=0)) for k in x0]  # fmt: skip
    assert any(outside)


# ---- evaluation-only rounds -----------------------------------------------------------------------------------------
def test_rounds_that_train_nobody_evaluate_the_model_they_were_given_on_every_client_by_hand():
    """FedAvg(fraction_train=0, fraction_evaluate=1) from a random initial model: each round says no client was
    sampled for training and keeps the model; federated evaluation scores it on all 4 clients, and its eval-acc is
    the examples-weighted accuracy of that model on the clients' test splits, computed here."""
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=1,
                partitioner="quantity")  # fmt: skip
    rng = np.random.default_rng(4)
    init = {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in np_(initial_arrays(task)).items()}
    res = simulate(FedAvg(fraction_train=0.0, fraction_evaluate=1.0), task, rounds=2,
                   initial=ArrayRecord({k: Array(v) for k, v in init.items()}))
    right = total = 0
    for p in range(4):
        _, _, x, y = task.client_data(p)
        right += int(((x.astype(np.float64) @ init["fc.weight"] + init["fc.bias"]).argmax(1) == y).sum())
        total += len(y)
    for r in res.history.rounds:
        assert r.num_aggregated == 0 and "no clients" in r.skipped
        assert sorted(r.client_eval) == ["0", "1", "2", "3"]
        assert r.eval_metrics["eval-acc"] == pytest.approx(right / total, abs=1e-9)
    for k, v in np_(res.arrays).items():
        np.testing.assert_array_equal(v, init[k])


# ---- feature shift -------------------------------------------------------------------------------------------------
def test_feature_shift_is_each_clients_own_affine_map_of_the_unshifted_data():
    """Task(feature_shift=s): client p's inputs are its unshifted inputs times exp(N(0, s)) plus N(0, 3s) per feature,
    drawn from (seed, 6, p) (the module's documented distortion), labels unchanged; two clients get different maps."""
    kw = dict(dataset="blobs", num_samples=200, num_features=5, num_classes=2, num_clients=3, local_steps=1)
    plain, shifted = Task(**kw), Task(**kw, feature_shift=0.5)
    maps = []
    for p in range(3):
        x0, y0, xt0, yt0 = plain.client_data(p)
        x1, y1, xt1, yt1 = shifted.client_data(p)
        rng = np.random.default_rng([0, 6, p])
        scale = np.exp(rng.normal(0, 0.5, 5)).astype(np.float32)
        shift = rng.normal(0, 1.5, 5).astype(np.float32)
        np.testing.assert_allclose(x1, x0 * scale + shift, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(xt1, xt0 * scale + shift, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(yt1, yt0)
        maps.append(scale)
    assert not np.allclose(maps[0], maps[1])
