"""Federated scenarios, round 14 (2 of 2): secure aggregation with poisoning clients, q-FedAvg fed losses that cannot
be (negative, or so large that their power overflows), weighting keys that are no names, wrappers around nothing, a
NumPy server learning rate, runs of seven strategy combinations stopped mid-run under a harsh system and resumed, and
the compressed encodings' bytes written out in numpy.

tilestack's ClientApp (or a scripted Flower ClientApp) over tilestack's in-process Flower ``Grid``, Flower's SecAgg+
workflow (``secagg.run_secure``), Flower's QFedAvg and tilestack's strategies; the references are the clients' SGD
replayed, q-FedAvg's rule from its paper written out in float64, and the documented byte layouts built in numpy.

What this round found, fixed:

- *Secure aggregation ignored the task's attackers.* ``run_secure`` / ``run_plain`` clients never poisoned their
  update: a secure run of a task with ``malicious_fraction=0.25`` averaged honest updates only, without a word, where
  ``simulate`` of the same task is pulled by the attacker. The secure client now poisons as tilestack's ClientApp does.
- *q-FedAvg and a loss that cannot be.* A reply whose loss (the strategy's ``train_loss_key``) was negative ended the
  run with numpy's UFuncTypeError (a complex power, q = 0.5), and one of 1e200 at q = 2 with Python's OverflowError
  (tilestack's QFFL). A negative loss is now left out of the round naming it (``grid.check_reply``), QFFL powers as
  Flower does (an overflow made the aggregate inf, rejected by the driver; since round 26 QFFL sums in log space and
  the aggregate is the rule's finite value), and the numpy models'
  cross-entropy is never below 0 (-log(p + 1e-12) was -1e-12 where a float64 model fits an example exactly).
- *A weighting key that is no name.* ``FedAvg(weighted_by_key=None)`` trained every client in every round and skipped
  every aggregation as "inconsistent replies"; ``''`` under ``run_rounds`` left every reply out. Refused before any
  work, naming the attribute (``checks.check_record_keys``), as is a ``train_loss_key`` of None.
- *Wrappers around nothing.* ``Compressed(None)`` and ``Selected("fedavg", ...)`` were built and ran until round 1
  raised AttributeError on them; refused on construction naming ``inner``.
- *A NumPy server learning rate.* ``Scaffold(global_lr=np.float32(0.5))`` was refused as "expected a finite number
  > 0"; NumPy numbers are taken.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, same, scripted
from flwr.serverapp.strategy import FedAvg, QFedAvg

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.models import SoftmaxRegression, evaluate, local_sgd
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import (
    CFL,
    IFCA,
    QFFL,
    Ditto,
    FedBN,
    FedNova,
    HeteroFL,
    OortSelector,
    RandomSelector,
    Scaffold,
    Selected,
)

ALL = dict(fraction_train=1.0, fraction_evaluate=0.0)
SL = tsclient.START_LOSS_METRIC


# ---- secure aggregation with poisoning clients ----------------------------------------------------------------------
def _secure_round(task: Task, rnd: int, start: dict[str, np.ndarray], honest: bool = False) -> dict[str, np.ndarray]:
    """One round of the secure client's FedAvg replayed: each client's local SGD (its rng (seed, pid, round, 41)), a
    malicious client's update reversed and scaled (sign flip) or its model plus N(0, scale^2) noise drawn from the same
    stream after training, the updates' mean weighted by training examples added to ``start``; float64. ``honest``:
    as if nobody attacked."""
    updates, weights = {}, {}
    for p in range(task.num_clients):
        x, y, _, _ = task.client_data(p)
        rng = np.random.default_rng([task.seed, p, rnd, 41])
        trained, _, _ = local_sgd(task.build_model(), start, x, y, steps=task.steps_for(p), batch_size=task.batch_size,
                                  lr=task.lr, rng=rng)  # fmt: skip
        u = {k: trained[k].astype(np.float64) - start[k] for k in start}
        if task.is_malicious(p) and not honest:
            if task.attack == "signflip":
                u = {k: -task.attack_scale * v for k, v in u.items()}
            else:
                u = {k: (trained[k] + rng.normal(0, task.attack_scale, trained[k].shape)).astype(np.float32)
                     .astype(np.float64) - start[k] for k in start}  # fmt: skip
        updates[p], weights[p] = u, float(len(y))
    total = sum(weights.values())
    return {k: start[k] + sum(weights[p] * updates[p][k] for p in updates) / total for k in start}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack,scale", [("signflip", 3.0), ("noise", 0.5)])
def test_secure_aggregation_of_a_task_with_an_attacker_averages_the_poisoned_update_as_plain_fedavg_does(attack, scale):
    """Four clients, one of them malicious (task.malicious_fraction 0.25). The plain run (the same secure client without
    SecAgg+) is two rounds of the poisoned updates' weighted mean written out (to 1e-6, float32), and the secure run is
    the plain one to the quantisation step (1e-4): SecAgg+ hides each update, it does not clean one. Before, the secure
    and plain clients ignored the attack, and the run was the honest mean, which here lies farther than 0.01 away."""
    from tilestack.federated.secagg import run_plain, run_secure

    task = Task(dataset="blobs", num_samples=160, num_features=3, num_classes=2, num_clients=4, local_steps=3, lr=0.1,
                malicious_fraction=0.25, attack=attack, attack_scale=scale)  # fmt: skip
    assert sum(task.is_malicious(p) for p in range(4)) == 1
    x = {k: v.astype(np.float64) for k, v in task.initial_params().items()}
    want, honest = x, x
    for rnd in (1, 2):
        want = {k: v.astype(np.float32).astype(np.float64) for k, v in _secure_round(task, rnd, want).items()}
        honest = {k: v.astype(np.float32).astype(np.float64) for k, v in _secure_round(task, rnd, honest, True).items()}
    plain = run_plain(task, rounds=2, per_round=4)
    secure = run_secure(task, rounds=2, per_round=4)
    for k in want:
        np.testing.assert_allclose(plain[k], want[k], rtol=0, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-4, err_msg=k)
    assert max(float(np.abs(want[k] - honest[k]).max()) for k in want) > 0.01  # the attack shows


# ---- q-FedAvg fed losses that cannot be --------------------------------------------------------------------------
def _qffl_by_hand(w: dict[str, np.ndarray], models: dict[int, dict], losses: dict[int, float], q: float, lr: float):
    """q-FedAvg (Li et al. 2020, Algorithm 2 with L = 1 / lr) in float64: Delta_k = L (w - w_k), F_k = loss + 1e-10,
    w <- w - sum_k F_k^q Delta_k / sum_k (q F_k^(q-1) ||Delta_k||^2 + L F_k^q)."""
    lip = 1.0 / lr
    w = {k: v.astype(np.float64) for k, v in w.items()}
    num = {k: np.zeros_like(v) for k, v in w.items()}
    den = 0.0
    for p, model in models.items():
        f = losses[p] + 1e-10
        delta = {k: lip * (w[k] - model[k].astype(np.float64)) for k in w}
        sq = sum(float((d**2).sum()) for d in delta.values())
        for k in w:
            num[k] += f**q * delta[k]
        den += q * f ** (q - 1) * sq + lip * f**q
    return {k: w[k] - num[k] / den for k in w}


def _loss_script(loss_of):
    """Client p moves every weight by 0.1 (p + 1) and reports ``loss_of(p, round)`` as its loss at the global model."""

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + np.float32(0.1 * (pid + 1)) for k, v in got["arrays"].items()}, {SL: loss_of(pid, rnd)}

    return script


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["QFFL", "QFedAvg"])
def test_a_negative_loss_is_left_out_of_q_fedavg_naming_it_and_the_rest_follow_the_rule(strategy):
    """Three clients, q = 0.5; client 0 reports a loss of -5 (a cross-entropy never is). It is left out naming the
    key and the value, and the round is q-FedAvg's rule over clients 1 and 2 (losses 1 and 2) written out. Before,
    F^q of a negative loss was complex and numpy's UFuncTypeError ended the run (QFFL; Flower's QFedAvg made the
    aggregate NaN)."""
    task = blobs(3)
    losses = {0: -5.0, 1: 1.0, 2: 2.0}
    make = {"QFFL": lambda: QFFL(q=0.5, client_learning_rate=0.05, **ALL),
            "QFedAvg": lambda: QFedAvg(q=0.5, client_learning_rate=0.05, train_loss_key=SL, **ALL)}  # fmt: skip
    make = make[strategy]
    grid = make_grid(scripted(_loss_script(lambda p, r: losses[p])), task)
    res = run_rounds(make(), grid, initial_arrays(task), num_rounds=1)
    m = res.history.rounds[0]
    assert m.excluded == {"0": f"metrics: {SL}=-5.0, expected a loss >= 0 (the strategy's train_loss_key)"}
    assert m.num_aggregated == 2 and not m.skipped
    x = np_(initial_arrays(task))
    models = {p: {k: v + np.float32(0.1 * (p + 1)) for k, v in x.items()} for p in (1, 2)}
    want = _qffl_by_hand(x, models, losses, 0.5, 0.05)
    for k, v in np_(res.arrays).items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.timeout(60)
def test_a_loss_whose_power_overflows_costs_qffl_that_round_not_the_run():
    """q = 2, client 0 reports a loss of 1e200 in round 1 (F^q passes float's range) and 1 in round 2. Before,
    Python's float power raised OverflowError out of the run; then round 1's aggregate was inf and rejected. QFFL now
    sums in log space (round 26): round 1 is the rule's finite value, where client 0 takes all the weight
    (c_0 = 1 / (1 + q L ||w - w_0||^2 / F_0) = 1 - 1e-199) and the model is client 0's; round 2 is q-FedAvg's rule over
    all three from that model."""
    task = blobs(3)
    losses = {0: 1.0, 1: 1.5, 2: 2.0}
    script = _loss_script(lambda p, r: 1e200 if (p, r) == (0, 1) else losses[p])
    res = run_rounds(QFFL(q=2.0, client_learning_rate=0.05, **ALL), make_grid(scripted(script), task),
                     initial_arrays(task), num_rounds=2)  # fmt: skip
    first, second = res.history.rounds
    assert first.num_aggregated == 3 and not first.skipped, first.skipped
    assert second.num_aggregated == 3 and not second.skipped
    x = np_(initial_arrays(task))
    x = {k: v + np.float32(0.1) for k, v in x.items()}  # client 0's model: round 1's aggregate
    models = {p: {k: v + np.float32(0.1 * (p + 1)) for k, v in x.items()} for p in range(3)}
    want = _qffl_by_hand(x, models, losses, 2.0, 0.05)
    for k, v in np_(res.arrays).items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _far_apart_task() -> Task:
    return Task(dataset="blobs", num_samples=60, num_features=2, num_classes=2, num_clients=2, separation=50.0,
                local_steps=1, lr=0.1)  # fmt: skip


def _nearest_mean_model(task: Task) -> dict[str, np.ndarray]:
    """A float64 softmax regression scoring each class by 1000 (x . mu_c - |mu_c|^2 / 2): every training example's
    probability of its own class is 1.0 exactly (the other logits are thousands below)."""
    xs, ys = zip(*[task.client_data(p)[:2] for p in range(task.num_clients)], strict=True)
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
    mu = np.stack([x[y == c].mean(axis=0) for c in range(task.num_classes)])  # (C, D)
    return {"fc.weight": 1000.0 * mu.T, "fc.bias": -500.0 * (mu**2).sum(axis=1)}


@pytest.mark.timeout(60)
def test_a_float64_model_that_fits_every_example_has_a_loss_of_zero_and_its_clients_stay_in_q_fedavg():
    """A float64 model that gives every example probability 1.0 of its class: the numpy models' cross-entropy is 0.0,
    not -1e-12 (-log(1 + 1e-12), which a negative loss check would have taken for a lie), while a NaN model's stays
    NaN; under QFFL both of tilestack's clients report a start loss of 0 and are averaged in."""
    task = _far_apart_task()
    model = _nearest_mean_model(task)
    for p in range(task.num_clients):
        x, y, _, _ = task.client_data(p)
        z = x.astype(np.float64) @ model["fc.weight"] + model["fc.bias"]
        assert np.all(np.exp(np.sort(z, axis=1)[:, 0] - z.max(axis=1)) == 0.0)  # (p is 1.0 exactly)
        loss, acc = evaluate(SoftmaxRegression(2, 2), model, x, y)
        assert loss == 0.0 and acc == 1.0, loss
        nan_loss, _ = evaluate(SoftmaxRegression(2, 2), {k: v * np.nan for k, v in model.items()}, x, y)
        assert np.isnan(nan_loss)  # (a diverged model's loss stays NaN: floored at 0, it would look perfect)
    res = simulate(QFFL(q=0.5, client_learning_rate=0.1, **ALL), task, rounds=1, evaluate=False,
                   initial=codec.to_record(model))  # fmt: skip
    m = res.history.rounds[0]
    assert m.excluded == {} and m.num_aggregated == 2
    assert [c[SL] for c in m.client_train.values()] == [0.0, 0.0]


# ---- weighting keys that are no names, wrappers around nothing -----------------------------------------------------
NO_NAMES = {
    "FedAvg(weighted_by_key=None)": (lambda: FedAvg(**ALL, weighted_by_key=None), "weighted_by_key=None"),
    "FedAvg(weighted_by_key='')": (lambda: FedAvg(**ALL, weighted_by_key=""), "weighted_by_key=''"),
    "FedAvg(weighted_by_key=5)": (lambda: FedAvg(**ALL, weighted_by_key=5), "weighted_by_key=5"),
    "QFedAvg(train_loss_key=None)": (lambda: QFedAvg(client_learning_rate=0.05, train_loss_key=None, **ALL),
                                     "train_loss_key=None"),
    "Selected(FedAvg(weighted_by_key=None))": (
        lambda: Selected(FedAvg(**ALL, weighted_by_key=None), RandomSelector(0), 2), "weighted_by_key=None"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(NO_NAMES))
@pytest.mark.parametrize("entry", ["simulate", "run_rounds"])
def test_a_weighting_or_loss_key_that_is_no_metric_name_is_refused_before_any_client_trains(case, entry):
    """Before, ``weighted_by_key=None`` trained every client every round and skipped every aggregation ("Missing
    required key `None`"), and ``''`` under run_rounds left every reply out: a run of nothing. Now both entry points
    refuse it naming the attribute, before any client trains."""
    make, named = NO_NAMES[case]
    task = blobs(4)
    trained: list[int] = []

    def counting(msg, context):
        trained.append(int(context.node_config["partition-id"]))
        return tsclient.train(msg, context)

    with pytest.raises(FederatedError, match="expected the name of a metric") as info:
        if entry == "simulate":
            simulate(make(), task, rounds=2, evaluate=False)
        else:
            app = tsclient.ClientApp()
            app.train()(counting)
            run_rounds(make(), ManagedGrid(InProcessGrid(app, 4), task), initial_arrays(task), num_rounds=2)
    assert named in str(info.value)
    assert trained == []


@pytest.mark.parametrize("build", [
    lambda: Compressed(None, "int8"), lambda: Compressed("fedavg", "topk", 0.1),
    lambda: Selected(None, RandomSelector(0), 2), lambda: Selected("fedavg", RandomSelector(0), 2),
], ids=["Compressed(None)", "Compressed('fedavg')", "Selected(None)", "Selected('fedavg')"])  # fmt: skip
def test_a_wrapper_around_something_that_is_no_strategy_is_refused_on_construction_naming_inner(build):
    with pytest.raises(TypeError, match=r"inner is a (NoneType|str); expected a flwr Strategy"):
        build()


@pytest.mark.timeout(60)
def test_scaffold_takes_a_numpy_server_learning_rate_and_runs_as_with_the_float():
    """``global_lr`` read from a config array (np.float32(0.5), np.float64(0.5), np.int64(1)) is the run of the same
    Python number, bit for bit; NaN and 0 as NumPy numbers are still refused."""
    task = blobs(4)
    for given, plain in ((np.float32(0.5), 0.5), (np.float64(0.5), 0.5), (np.int64(1), 1.0)):
        a = simulate(Scaffold(global_lr=given, **ALL), task, rounds=2, evaluate=False)
        b = simulate(Scaffold(global_lr=plain, **ALL), task, rounds=2, evaluate=False)
        assert same(a.arrays, b.arrays), given
    for bad in (np.float32("nan"), np.float64(0.0), np.float32("inf")):
        with pytest.raises(ValueError, match="Scaffold: global_lr="):
            Scaffold(global_lr=bad, **ALL)


# ---- seven combinations stopped mid-run and resumed -----------------------------------------------------------------
HALF = dict(fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
_LR = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=6, local_steps=4, batch_size=8,
           lr=0.2)  # fmt: skip
COMBOS = {  # name: (strategy factory, task)
    "CFL (warm-up 1)": (lambda: CFL(warmup=1, **ALL),
                        Task(dataset="clustered", groups=2, num_clients=6, num_features=3, num_classes=3,
                             samples_per_client=40, local_steps=4, batch_size=8, lr=0.2)),
    "IFCA over half": (lambda: IFCA(num_clusters=2, **HALF),
                       Task(dataset="clustered", groups=2, num_clients=6, num_features=3, num_classes=3,
                            samples_per_client=40, local_steps=4, batch_size=8, lr=0.2)),
    "Compressed(Ditto), int8": (lambda: Compressed(Ditto(lam=0.5, **HALF), "int8"), Task(**_LR)),
    "Compressed(FedBN), top-k": (lambda: Compressed(FedBN(**HALF), "topk", 0.3),
                                 Task(**_LR, model="mlp", hidden=8, norm=True)),
    "Selected(HeteroFL), Oort": (lambda: Selected(HeteroFL(width_of=lambda p: (1, 0.5, 0.25)[p % 3], hidden=8, **ALL),
                                                  OortSelector(_harsh()), 3), Task(**_LR, model="mlp", hidden=8)),
    "Compressed(FedNova), top-k": (lambda: Compressed(FedNova(**HALF), "topk", 0.2), Task(**_LR)),
    "QFFL": (lambda: QFFL(q=1.0, client_learning_rate=0.2, **HALF), Task(**_LR, partitioner="dirichlet",
                                                                          partition_alpha=0.1)),
}  # fmt: skip


def _harsh() -> SystemModel:
    """Six clients: speeds spread lognormally (log-std 1.5), a 0.3 s deadline, 20% dropouts, 30% stragglers, and an
    availability pattern of three rounds (client 5 joins in round 2; client 0 leaves in round 3; client 3 is online
    half the time in round 3)."""
    availability = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0.5, 1, 1]]
    return SystemModel(6, speed=20.0, speed_sigma=1.5, deadline=0.3, dropout=0.2, straggler_fraction=0.3,
                       availability=availability, seed=2)  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(COMBOS))
def test_a_combination_stopped_after_three_of_seven_rounds_under_a_harsh_system_resumes_to_the_run_never_stopped(
    name, tmp_path
):
    """Each combination runs 7 rounds under dropouts, stragglers' partial work, deadline timeouts and clients coming
    and going; the same run stopped after round 3 (its checkpoint holding the strategy's state: clusters, personal
    models, error-feedback residuals, local batch-norm layers, Oort's statistics) and resumed ends at the same model
    bit for bit, with the same clients aggregated and left out each round. The system does hit: some rounds leave
    clients out."""
    make, task = COMBOS[name]
    full = simulate(make(), task, rounds=7, system=_harsh(), seed=3)
    ckpt = tmp_path / "run.ckpt"
    simulate(make(), task, rounds=7, system=_harsh(), seed=3, checkpoint=ckpt, stop_after=3)
    resumed = simulate(make(), task, rounds=7, system=_harsh(), seed=3, checkpoint=ckpt)
    assert same(full.arrays, resumed.arrays)

    def story(result):
        return [(m.num_aggregated, m.excluded, m.skipped, m.test_acc) for m in result.history.rounds]

    assert story(full) == story(resumed)
    assert any(m.excluded for m in full.history.rounds), "the system never left a client out"
    assert any(m.num_aggregated for m in full.history.rounds)


# ---- compressed encodings against their byte layouts written out --------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_topk_bytes_are_the_sorted_indices_of_the_largest_magnitudes_then_their_values(dtype):
    """Top-k of a (7, 9) update at k = 10: the payload is the 10 flat indices of the largest |values| in increasing
    order (uint32), then those values (float64 for a float64 update, else float32), built here with numpy's sort; the
    decoded array is those entries and zeros. Ties (every magnitude 1) keep exactly k entries, each as sent."""
    rng = np.random.default_rng(14)
    u = rng.normal(0, 1, (7, 9)).astype(dtype)
    idx = np.sort(np.argsort(-np.abs(u.ravel()), kind="stable")[:10]).astype(np.uint32)
    a = codec.encode_topk(u, 10)
    assert a.data == idx.tobytes() + u.ravel()[idx].astype(dtype).tobytes()
    assert a.dtype == np.dtype(dtype).name and tuple(a.shape) == (7, 9)
    dense = np.zeros(63, dtype)
    dense[idx] = u.ravel()[idx]
    np.testing.assert_array_equal(codec.decode(a), dense.reshape(7, 9))

    ties = np.where(rng.random(40) < 0.5, -1.0, 1.0).astype(dtype)
    back = codec.decode(codec.encode_topk(ties, 7))
    kept = np.flatnonzero(back)
    assert len(kept) == 7 and np.array_equal(back[kept], ties[kept])


def test_int8_bytes_are_low_and_step_then_one_rounded_code_per_value():
    """8-bit codes of a (5, 13) update: float32 low = min and step = (max - min) / 255, then per value the nearest
    level's code, computed here in float64; decoding gives low + code x step within half a step. A constant update
    is exact (step 1, every code 0), and an update with one value is that value."""
    rng = np.random.default_rng(41)
    u = (rng.normal(0, 2, (5, 13)) + 0.3).astype(np.float32)
    flat = u.ravel().astype(np.float64)
    low, step = flat.min(), (flat.max() - flat.min()) / 255
    codes = np.clip(np.rint((flat - low) / step), 0, 255).astype(np.uint8)
    a = codec.encode_int8(u)
    assert a.data[:8] == np.array([low, step], np.float32).tobytes()
    assert np.array_equal(np.frombuffer(a.data, np.uint8, offset=8), codes)
    back = codec.decode(a).astype(np.float64)
    assert np.abs(back - u).max() <= step / 2 * (1 + 1e-5) + 1e-6
    for const in (np.full((3, 4), -2.75, np.float32), np.array([1e-30], np.float32)):
        enc = codec.encode_int8(const)
        assert enc.data == np.array([const.min(), 1.0], np.float32).tobytes() + bytes(const.size)
        np.testing.assert_array_equal(codec.decode(enc), const)
