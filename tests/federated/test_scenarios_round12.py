"""Federated scenarios, round 12 (1 of 2): federated training against centralized training written out — clients of
disjoint label sets and clients 1858 to 1 in size (one full-batch step each: FedAvg is gradient descent on the pooled
data), a single client (every aggregation rule that should reduce to it does), a single client of the PyTorch CNN in
float64, and a client whose own learning rate overflows.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` under ``ManagedGrid`` (``simulate`` and
``run_rounds``), Flower's own strategies and tilestack's; the reference is centralized training in float64 written
out here (``_fl_round12``), or the clients' own SGD replayed (``_fl_round7.client_model``).

What this round found, fixed:

- *A float64 PyTorch model trained in float32.* A float64 CNN or transformer model was loaded into the float32 torch
  module, trained in float32 and sent back as float64 holding float32's values, without a word (the numpy models
  train a float64 model in float64, as the docs say): a researcher checking against float64 centralized training
  saw errors of 1e-8 where 1e-15 was due. The module now trains in float64 for a float64 model
  (torch_models.TorchModel._module).
- *A dataset file written anew at the same path was not read anew.* The process cached a user's file by its path: a
  notebook that regenerated data.npz (other examples, features or classes) and ran again trained on the old file
  without a word, while clients in other processes read the new one. The caches are now keyed by the file's
  modification time and size too (task._file_stamp).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import logreg_sgd_by_hand
from _fl_round12 import OwnLearningRates, cnn_sgd_float64, disjoint_label_task, softmax_gd, softmax_scores
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx

from tilestack.federated import ManagedGrid, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import IFCA, FedNova, Scaffold

ROUNDS = 3


def _start64(task: Task, seed: int = 1) -> dict[str, np.ndarray]:
    """A float64 model away from softmax regression's zero start (where a model left unchanged would look right)."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.3, v.shape) for k, v in np_(initial_arrays(task)).items()}


def _pooled_train(task: Task) -> tuple[np.ndarray, np.ndarray]:
    parts = [task.client_data(p) for p in range(task.num_clients)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _close64(got, want: dict[str, np.ndarray], rtol: float = 1e-11) -> None:
    got = np_(got) if not isinstance(got, dict) else got
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == np.float64, (k, v.dtype)
        np.testing.assert_allclose(v, want[k], rtol=rtol, atol=1e-14, err_msg=k)


def _all(**kw) -> dict:
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1) | kw


# ---- FedSGD is gradient descent on the pooled data, whatever the partition ------------------------------------------
def _skewed_task() -> Task:
    """Four clients of IID labels and 278, 1858, 262 and 1 training examples (quantity skew, lognormal sigma 4)."""
    return Task(dataset="blobs", num_samples=3000, num_features=3, num_classes=3, num_clients=4, partitioner="quantity",
                quantity_sigma=4.0, seed=1)  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["disjoint labels", "sizes 1858 to 1"])
def test_one_full_batch_step_per_client_is_centralized_gradient_descent_on_the_pooled_data(tmp_path, case):
    """Each client takes one full-batch gradient step (local_steps=1, a batch larger than any client) from the global
    model, and FedAvg weights the results by training examples: sum_i n_i / N (x - lr g_i) = x - lr g, with g the
    gradient on the pooled data. So three rounds are three steps of centralized gradient descent, written out here in
    float64, to float64's precision, however the data is split: four clients each holding one class and none of the
    others (pathological non-IID), or four clients 1858 to 1 in size."""
    if case == "disjoint labels":
        task = disjoint_label_task(tmp_path, lr=0.5, local_steps=1, batch_size=1000)
        labels = [set(np.concatenate([task.client_data(p)[1], task.client_data(p)[3]]).tolist()) for p in range(4)]
        assert sorted(map(sorted, labels)) == [[0], [1], [2], [3]]  # one class each, disjoint, all four covered
    else:
        task = dataclasses.replace(_skewed_task(), lr=0.5, local_steps=1, batch_size=4000)
        sizes = sorted(task.num_train(p) for p in range(4))
        assert sizes[-1] >= 1000 * sizes[0], sizes
    start = _start64(task)
    res = simulate(FedAvg(**_all()), task, rounds=ROUNDS, initial=codec.to_record(start), evaluate=False)
    assert all(r.num_aggregated == 4 and r.steps_done == 4 for r in res.history.rounds)
    x, y = _pooled_train(task)
    _close64(res.arrays, softmax_gd(x, y, start, steps=ROUNDS, lr=task.lr))


@pytest.mark.timeout(60)
def test_with_disjoint_labels_several_local_steps_drift_from_centralized_descent_and_uniform_weights_do_too(tmp_path):
    """The controls of the identity above, on clients of disjoint labels. With three local steps each client runs
    towards a model that predicts its one class, and the average is no longer three steps of centralized descent
    (client drift: it differs by more than 1e-3). Under quantity skew, weighting every client alike (FedAvg's
    ``weighted_by_key='unit-weight'``) gives the 1-example client as much say as the 1858-example one: one full-batch
    step each is then the plain mean of the four clients' steps, written out, and not centralized descent."""
    task = disjoint_label_task(tmp_path, lr=0.5, local_steps=3, batch_size=1000)
    start = _start64(task)
    res = simulate(FedAvg(**_all()), task, rounds=1, initial=codec.to_record(start), evaluate=False)
    x, y = _pooled_train(task)
    centralized = softmax_gd(x, y, start, steps=3, lr=task.lr)
    drift = max(float(np.abs(np_(res.arrays)[k] - centralized[k]).max()) for k in start)
    assert drift > 1e-3, drift
    local = {p: softmax_gd(*task.client_data(p)[:2], start, steps=3, lr=task.lr) for p in range(4)}
    _close64(res.arrays, weighted_mean(local, {p: task.num_train(p) for p in range(4)}))

    skewed = dataclasses.replace(_skewed_task(), lr=0.5, local_steps=1, batch_size=4000)
    start = _start64(skewed)
    res = simulate(FedAvg(**_all(weighted_by_key=tsclient.UNIT_WEIGHT)), skewed, rounds=1,
                   initial=codec.to_record(start), evaluate=False)  # fmt: skip
    steps = {p: softmax_gd(*skewed.client_data(p)[:2], start, steps=1, lr=skewed.lr) for p in range(4)}
    _close64(res.arrays, weighted_mean(steps, dict.fromkeys(range(4), 1.0)))
    x, y = _pooled_train(skewed)
    centralized = softmax_gd(x, y, start, steps=1, lr=skewed.lr)
    gap = max(float(np.abs(np_(res.arrays)[k] - centralized[k]).max()) for k in start)
    assert gap > 1e-3, gap


# ---- a single client is centralized training ---------------------------------------------------------------------
SINGLE = {  # strategy, local steps: each rule reduces to the lone client's model
    "FedAvg": (lambda: FedAvg(**_all(fraction_evaluate=1.0, min_evaluate_nodes=1)), 4),
    "FedMedian": (lambda: FedMedian(**_all()), 4),  # the median of one model
    "FedNova": (lambda: FedNova(**_all()), 4),  # x - tau (x - y) / tau = y
    "Scaffold": (lambda: Scaffold(**_all()), 4),  # c = c_1 after round 1: the correction c - c_1 is 0
    "FedProx, one step": (lambda: FedProx(**_all(), proximal_mu=0.5), 1),  # mu (w - w_t) is 0 at the start
    "IFCA, one cluster": (lambda: IFCA(num_clusters=1, **_all()), 4),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(SINGLE))
def test_a_single_client_run_is_its_centralized_sgd_written_out(name):
    """One client holding all the data, three rounds of its minibatch SGD (batch 8, the client's seeded batches, each
    round a fresh walk): the model is the same SGD written out in float64 from the start, to float64's precision,
    under every rule that reduces to one client's model (FedAvg, the median, FedNova, SCAFFOLD whose correction
    cancels, FedProx for a single step, IFCA with one cluster). The server's scores are that model's on the client's
    data, computed here, and so is the client's own federated evaluation."""
    make, steps = SINGLE[name]
    task = Task(dataset="blobs", num_samples=80, num_features=3, num_classes=3, num_clients=1, local_steps=steps,
                batch_size=8, lr=0.2)  # fmt: skip
    start = _start64(task)
    initial = codec.to_record(start)
    if name.startswith("IFCA"):
        initial = codec.to_record({tsclient.cluster_key(0, k): v for k, v in start.items()})
    res = simulate(make(), task, rounds=ROUNDS, initial=initial)
    x, y, xt, yt = task.client_data(0)
    w = start
    for rnd in range(1, ROUNDS + 1):
        w = logreg_sgd_by_hand(x, y, w, w, steps=steps, batch=8, lr=task.lr, lam=0.0,
                               rng=np.random.default_rng([task.seed, 0, rnd, 13]))  # fmt: skip
    got = np_(res.arrays)
    if name.startswith("IFCA"):
        got = {k.rpartition(tsclient.CLUSTER_SEP)[2]: v for k, v in got.items()}
    _close64(got, w)
    last = res.history.rounds[-1]
    test_loss, test_acc = softmax_scores(w, xt, yt)
    assert last.test_acc == pytest.approx(test_acc, abs=1e-12)
    assert last.test_loss == pytest.approx(test_loss, rel=1e-9)
    assert last.train_loss == pytest.approx(softmax_scores(w, x, y)[0], rel=1e-9)
    if name == "FedAvg":
        assert last.client_eval["0"]["eval-acc"] == pytest.approx(test_acc, abs=1e-12)
        assert last.eval_metrics["eval-loss"] == pytest.approx(test_loss, rel=1e-9)


@pytest.mark.timeout(120)
def test_a_single_client_of_the_pytorch_cnn_in_float64_is_its_float64_sgd_written_out():
    """The CNN on digits, one client, a float64 model, two rounds of three SGD steps (batch 32): the model is the same
    SGD written out with torch.nn.functional in float64, to 1e-10. Before, the client loaded the float64 model into
    its float32 module, trained in float32 and sent float32's values back as float64: every weight was a float32
    number and the model 1e-8 away."""
    pytest.importorskip("torch")
    task = Task(dataset="digits", num_clients=1, model="cnn", local_steps=3, batch_size=32, lr=0.1)
    start = {k: v.astype(np.float64) for k, v in np_(initial_arrays(task)).items()}
    res = simulate(FedAvg(**_all()), task, rounds=2, initial=codec.to_record(start), evaluate=False)
    x, y, _, _ = task.client_data(0)
    w = start
    for rnd in (1, 2):
        w = cnn_sgd_float64(w, x, y, steps=3, batch=32, lr=task.lr, rng=np.random.default_rng([task.seed, 0, rnd, 13]))
    got = np_(res.arrays)
    assert any(np.any(v != v.astype(np.float32)) for v in got.values()), "trained in float32"
    for k, v in got.items():
        assert v.dtype == np.float64, (k, v.dtype)
        np.testing.assert_allclose(v, w[k], rtol=1e-10, atol=1e-12, err_msg=k)


# ---- a client whose own learning rate overflows ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_client_whose_own_learning_rate_overflows_float32_is_left_out_and_the_rest_are_averaged():
    """Four clients, each sent its own learning rate in the round config (0.1, 0.2, 3e38, 0.05): client 2's first step
    overflows float32 and its model holds inf. In both rounds client 2 is left out naming the array, and the global
    model is the example-weighted mean of the other three clients' SGD at their own rates, replayed by hand: the
    overflow never reaches it, and federated evaluation of every client stays finite."""
    rates = {0: 0.1, 1: 0.2, 2: 3e38, 3: 0.05}
    task = Task(dataset="blobs", num_samples=160, num_features=3, num_classes=3, num_clients=4, local_steps=3,
                batch_size=8, lr=0.1, partitioner="quantity", quantity_sigma=0.5)  # fmt: skip
    models: list[dict] = []
    with np.errstate(over="ignore", invalid="ignore"):
        res = run_rounds(OwnLearningRates(rates, fraction_train=1.0, fraction_evaluate=1.0),
                         ManagedGrid(InProcessGrid(tsclient.app, 4), task), initial_arrays(task), num_rounds=2,
                         extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        assert r.excluded == {"2": "non-finite: fc.weight"} and r.num_aggregated == 3 and not r.skipped
        ys = {p: client_model(dataclasses.replace(task, lr=rates[p]), p, rnd, x)[0] for p in (0, 1, 3)}
        near(models[rnd - 1], weighted_mean(ys, {p: task.num_train(p) for p in (0, 1, 3)}))
        x = models[rnd - 1]
        assert sorted(r.client_eval) == ["0", "1", "2", "3"]
        assert all(math.isfinite(c["eval-loss"]) for c in r.client_eval.values())


# ---- a dataset file written anew at the same path --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_dataset_file_written_anew_at_the_same_path_is_the_one_the_next_run_trains_on(tmp_path):
    """A notebook writes its data to data.npz (2 classes, 3 features), runs, regenerates the file (3 classes, 5
    features) and runs again with a Task naming the same path. The second Task has the new file's features and classes
    and its run ends at the model of the same run over a copy of the new file at another path, bit for bit. Before,
    the process kept the first file's examples for that path: the second run trained a (3, 2) model on the old data
    without a word, while clients in other processes (Flower's engine, a deployment) read the new file."""
    rng = np.random.default_rng(3)
    path, copy = tmp_path / "data.npz", tmp_path / "copy.npz"
    np.savez(path, x=rng.normal(size=(60, 3)).astype(np.float32), y=np.repeat([0, 1], 30))
    kw = dict(dataset="file", num_clients=3, local_steps=2, batch_size=8, lr=0.1)
    first = Task(data_path=str(path), **kw)
    assert (first.features, first.classes) == (3, 2)
    simulate(FedAvg(**_all()), first, rounds=1, evaluate=False)
    x, y = rng.normal(size=(90, 5)).astype(np.float32), np.repeat([0, 1, 2], 30)
    np.savez(path, x=x, y=y)
    np.savez(copy, x=x, y=y)
    again, fresh = Task(data_path=str(path), **kw), Task(data_path=str(copy), **kw)
    assert (again.features, again.classes) == (5, 3)
    for p in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(again.client_data(p), fresh.client_data(p), strict=True))
    res = simulate(FedAvg(**_all()), again, rounds=2)
    want = simulate(FedAvg(**_all()), fresh, rounds=2)
    assert {k: v.shape for k, v in np_(res.arrays).items()} == {"fc.weight": (5, 3), "fc.bias": (3,)}
    assert all(np.array_equal(v, np_(want.arrays)[k]) for k, v in np_(res.arrays).items())
    assert res.history.rounds[-1].test_acc == want.history.rounds[-1].test_acc
