"""Federated scenarios, round 5: tilestack's own strategies against float64 arithmetic, and the run's edges.

Real Flower strategies and tilestack's (SCAFFOLD, FedNova, HeteroFL, q-FFL, IFCA, CFL, FedBN, FedDF), tilestack's
ClientApp or scripted ClientApps, over tilestack's in-process Flower ``Grid`` (and Flower's SecAgg+ workflow).
Truth is numpy in float64 written out here from each method's update rule, or a second run that differs only where
the rule says it must not matter. What the round found, each now fixed:

- The f64 issue round 4 left open: tilestack's strategies re-encoded every array as float32 (``_util.to_record``),
  so SCAFFOLD averaged float32 replies in float32 (ulps from the exact mean) and a float64 global model came back
  rounded to float32 each round under SCAFFOLD, FedNova, HeteroFL, q-FFL, IFCA, CFL and FedDF; HeteroFL sent its
  clients float32 sub-models of a float64 model. Strategies now keep each array's dtype, accumulate in float64
  and round once to the global model's dtype.
- tilestack's ClientApp trained and replied in float32 whatever the server sent: a float64 model lost its low
  bits in every client. Clients now train a float64 model in float64 and reply in float64 (float16 and float32
  models still train and reply in float32, so the server rounds the float64 mean to float16 once).
- The federated metrics Flower's strategies aggregate (evaluation loss and accuracy weighted by each client's test
  examples, the training loss weighted by its training examples) were computed and thrown away by the round loop:
  ``RoundMetrics.train_metrics`` / ``eval_metrics`` now hold them.
- A checkpointed run whose strategy holds a lambda (``HeteroFL(width_of=lambda p: ...)``) failed with a pickling
  error after its first round; such settings are now left out of the checkpoint and taken from the resuming
  strategy. Resuming a float32 run's checkpoint with a float64 initial model returned the float32 model; the
  checkpoint now records dtypes and refuses it.
- A reply weighted (``weighted_by_key``) by a negative number was averaged in, and weights summing to zero ended the
  run inside Flower; such replies are now left out naming the weight.
- A bfloat16 model (numpy has no bfloat16) made every client fail and the server's evaluation raise after the first
  round; ``simulate`` and ``run_rounds`` now refuse it before any work, naming the array.
- Under SecAgg+ a client whose local SGD diverged sent NaN, quantised to arbitrary integers inside the masked sum:
  the secure model was finite garbage. The client now drops out of the round.
"""

import json
import math
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from tilestack.errors import FederatedError
from tilestack.federated import ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import RESIDUAL_STATE, Compressed, compress_update
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.grid import payload_bytes
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import QFFL, FedBN, FedDF, FedNova, HeteroFL, Scaffold, sub_model

SC, DC = tsclient.SCAFFOLD_C, tsclient.SCAFFOLD_DC_PREFIX


def _blobs(num_clients: int, features: int = 3, classes: int = 2, **kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=max(120, 4 * num_clients), num_features=features,
                          num_classes=classes, num_clients=num_clients, local_steps=2, lr=0.05), **kw})  # fmt: skip


def _np(arrays) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _same(a, b) -> bool:
    x, y = _np(a), _np(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _json_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN equals NaN here


def _as(arrays, dtype) -> ArrayRecord:
    return codec.to_record({k: v.astype(dtype) for k, v in _np(arrays).items()})


def _reply(msg: Message, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    base = {"num-examples": 1, tsclient.UNIT_WEIGHT: 1, "train-loss": 0.0, "num-steps": 1}
    return Message(RecordDict({"arrays": codec.to_record(arrays), "metrics": MetricRecord(base | metrics)}),
                   reply_to=msg)  # fmt: skip


def _scripted(script, evaluate_fn=None) -> ClientApp:
    """A ClientApp whose TRAIN reply is ``script(pid, round, content as numpy, context) -> (arrays, metrics)``;
    ``evaluate_fn(pid, round) -> metrics`` answers EVALUATE messages."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        got = {name: codec.to_numpy(rec) for name, rec in msg.content.array_records.items()}
        arrays, metrics = script(pid, rnd, got, context, msg.content["config"])
        return _reply(msg, arrays, {tsclient.PARTITION_METRIC: pid} | metrics)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        return Message(RecordDict({"metrics": MetricRecord(evaluate_fn(pid, rnd))}), reply_to=msg)

    return app


def _grid(app: ClientApp, task: Task, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(app, task.num_clients), task, **kw)


def _wmean(models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = float(sum(weights[p] for p in models))
    keys = next(iter(models.values())).keys()
    return {k: sum(float(weights[p]) * models[p][k].astype(np.float64) for p in models) / total for k in keys}


def _check_model(got: ArrayRecord, want: dict[str, np.ndarray], dtype) -> None:
    """The model is ``want`` (float64) rounded once to ``dtype``: bit for bit below float64, to 4 ulps in it."""
    for k, v in _np(got).items():
        assert v.dtype == dtype, (k, v.dtype)
        if dtype == np.float64:
            np.testing.assert_allclose(v, want[k], rtol=1e-15, atol=1e-300)
        else:
            np.testing.assert_array_equal(v, want[k].astype(dtype))


def _update(pid: int, rnd: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A scripted client's update: of both signs, with low bits float32 cannot hold (1/3, 1/7 in float64)."""
    rng = np.random.default_rng([pid, rnd, len(shape)])
    return (rng.normal(0, 1, shape) * (pid + 1) / 3 + 1 / 7).astype(dtype)


# ---- SCAFFOLD's server rule, in float64, with a float32 and a float64 model -------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scaffold_server_follows_its_rule_exactly(dtype):
    """Six clients of very unequal sizes, 30% dropout: x+ = x + g (sum_i n_i y_i / sum_i n_i - x), and
    c+ = c + |S| / N mean_i(dc_i) with |S| the clients that replied, N all six. Each round's model is that float64
    value rounded once to the model's dtype, and the clients receive c in the model's dtype. Before: SCAFFOLD
    re-encoded the replies as float32 and FedAvg summed them in float32 (ulps off); a float64 model came back
    rounded to float32 every round."""
    task = _blobs(6)
    n = {0: 1, 1: 10**9, 2: 3, 3: 77, 4: 12345, 5: 2}
    seen_c = []

    def script(pid, rnd, got, context, config):
        x, c = got["arrays"], got[SC]
        seen_c.append((rnd, pid, c))
        y = {k: (v + _update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()}
        dc = {DC + k: _update(pid + 10, rnd, v.shape, dtype) for k, v in x.items()}
        return y | dc, {"num-examples": n[pid]}

    g = 0.7
    grid = _grid(_scripted(script), task, system=SystemModel(6, dropout=0.3, seed=2))
    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0, global_lr=g), grid,
                     _as(initial_arrays(task), dtype), num_rounds=4)  # fmt: skip
    x = {k: v.astype(dtype) for k, v in _np(initial_arrays(task)).items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    assert any(r.excluded for r in res.history.rounds)
    for rnd, r in enumerate(res.history.rounds, start=1):
        stayed = [p for p in range(6) if str(p) not in r.excluded]
        for rr, _, got_c in seen_c:
            if rr == rnd:
                for k in c:
                    assert got_c[k].dtype == dtype
                    np.testing.assert_array_equal(got_c[k], c[k])
        ys = {p: {k: (x[k] + _update(p, rnd, x[k].shape, dtype)).astype(dtype) for k in x} for p in stayed}
        mean = _wmean(ys, n)
        x = {k: (x[k] + g * (mean[k] - x[k])).astype(dtype) for k in x}
        dcs = [{k: _update(p + 10, rnd, x[k].shape, dtype).astype(np.float64) for k in x} for p in stayed]
        c = {k: (c[k] + len(stayed) / 6 * np.mean([d[k] for d in dcs], axis=0)).astype(dtype) for k in c}
    _check_model(res.arrays, {k: v.astype(np.float64) for k, v in x.items()}, dtype)
    for k in c:
        assert res.strategy.c[k].dtype == dtype
        np.testing.assert_array_equal(res.strategy.c[k], c[k])


# ---- FedNova and HeteroFL against their rules, with a float64 model ---------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fednova_normalises_by_the_steps_each_client_reports(dtype):
    """Clients doing 1 to 40 local steps on 1 to 10**6 examples: x+ = x - tau_eff sum_i p_i (x - y_i) / tau_i with
    p_i = n_i / n and tau_eff = sum_i p_i tau_i, in float64, rounded once (a float64 model stayed float32-rounded)."""
    task = _blobs(5)
    n, tau = {0: 1, 1: 10**6, 2: 50, 3: 7, 4: 999}, {0: 40, 1: 1, 2: 3, 3: 17, 4: 8}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        return {k: (v + _update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()}, \
            {"num-examples": n[pid], "num-steps": tau[pid]}

    res = run_rounds(FedNova(fraction_train=1.0, fraction_evaluate=0.0), _grid(_scripted(script), task),
                     _as(initial_arrays(task), dtype), num_rounds=3)  # fmt: skip
    x = {k: v.astype(dtype) for k, v in _np(initial_arrays(task)).items()}
    total = sum(n.values())
    for rnd in (1, 2, 3):
        p = {i: n[i] / total for i in n}
        tau_eff = sum(p[i] * tau[i] for i in n)
        # (x - y_i) is minus the update exactly where y_i = x + update is exact (float64), else as the client rounded
        step = {k: sum(p[i] * (x[k].astype(np.float64) - (x[k] + _update(i, rnd, x[k].shape, dtype)).astype(dtype))
                       / tau[i] for i in n) for k in x}  # fmt: skip
        x = {k: (x[k] - tau_eff * step[k]).astype(dtype) for k in x}
    _check_model(res.arrays, {k: v.astype(np.float64) for k, v in x.items()}, dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_heterofl_averages_each_element_over_the_clients_that_hold_it(dtype):
    """Widths 1, 1/2, 1/4 of an 8-unit MLP: each client receives its sub-model in the model's dtype, and each element
    of the new model is the float64 weighted mean over the clients whose sub-model holds it, rounded once (a float64
    model was cut to float32 on the way to the clients and back)."""
    task = _blobs(6, features=3, classes=2, model="mlp", hidden=8)
    width = {p: (1.0, 0.5, 0.25)[p % 3] for p in range(6)}
    n = {p: 3**p for p in range(6)}
    received = {}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        received[pid] = {k: (v.dtype, v.shape) for k, v in x.items()}
        y = {k: (v + _update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()}
        return y, {"num-examples": n[pid]}

    s = HeteroFL(width_of=width.get, hidden=8, fraction_train=1.0, fraction_evaluate=0.0)
    res = run_rounds(s, _grid(_scripted(script), task), _as(initial_arrays(task), dtype), num_rounds=2)
    x = {k: v.astype(dtype) for k, v in _np(initial_arrays(task)).items()}
    for rnd in (1, 2):
        total = {k: np.zeros(v.shape) for k, v in x.items()}
        weight = {k: np.zeros(v.shape) for k, v in x.items()}
        for p in range(6):
            for k, v in sub_model(x, 8, width[p]).items():
                region = tuple(slice(0, m) for m in v.shape)
                total[k][region] += n[p] * (v + _update(p, rnd, v.shape, dtype)).astype(dtype).astype(np.float64)
                weight[k][region] += n[p]
        x = {k: np.where(weight[k] > 0, total[k] / np.maximum(weight[k], 1), x[k]).astype(dtype) for k in x}
    assert received[2]["fc1.weight"] == (np.dtype(dtype), (3, 2))
    assert all(d == np.dtype(dtype) for d, _ in received[1].values())
    _check_model(res.arrays, {k: v.astype(np.float64) for k, v in x.items()}, dtype)


# ---- tilestack's ClientApp on float64 and float16 models ---------------------------------------------------------
def _logreg_sgd_f64(task: Task, pid: int, rnd: int, w: dict[str, np.ndarray], mu: float = 0.0,
                    correction: dict | None = None) -> dict:  # fmt: skip
    """Softmax regression's local SGD written out in float64: minibatches walk the client's seeded permutation;
    ``mu`` adds FedProx's proximal gradient mu (w - w_start), ``correction`` SCAFFOLD's c - c_i."""
    x, y, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    order, pos = rng.permutation(len(y)), 0
    w = w0 = {k: v.astype(np.float64) for k, v in w.items()}
    for _ in range(task.local_steps):
        if pos >= len(y):
            order, pos = rng.permutation(len(y)), 0
        idx = order[pos : pos + task.batch_size]
        pos += task.batch_size
        xb = x[idx].astype(np.float64)
        z = xb @ w["fc.weight"] + w["fc.bias"]  # (B, C)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1.0
        p /= len(idx)
        grad = {"fc.weight": xb.T @ p, "fc.bias": p.sum(axis=0)}
        w = {k: w[k] - task.lr * (grad[k] + mu * (w[k] - w0[k]) + (0 if correction is None else correction[k]))
             for k in w}  # fmt: skip
    return w


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_a_float64_model_is_trained_and_averaged_in_float64(mu):
    """tilestack's ClientApp given a float64 model trains it in float64 and replies in float64: two rounds of FedAvg
    are the float64 weighted mean of local SGD written out here (with FedProx's proximal term for mu > 0), to
    1e-13 (clients trained in float32 and replied float32: 1e-8 off, and the model's low bits were lost)."""
    task = _blobs(4, features=5, classes=3, num_samples=200, partitioner="quantity", local_steps=3, lr=0.3)
    x0 = {k: v.astype(np.float64) + 1 / 3 for k, v in _np(initial_arrays(task)).items()}
    res = run_rounds(FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu), _grid(tsclient.app, task),
                     codec.to_record(x0), num_rounds=2)  # fmt: skip
    x = x0
    for rnd in (1, 2):
        n = {p: task.num_train(p) for p in range(4)}
        x = _wmean({p: _logreg_sgd_f64(task, p, rnd, x, mu) for p in range(4)}, n)
    for k, v in _np(res.arrays).items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(v, x[k], rtol=1e-13, atol=1e-15)


@pytest.mark.timeout(60)
def test_scaffold_clients_and_server_on_a_float64_model_follow_the_rule_written_out():
    """SCAFFOLD end to end on a float64 model with tilestack's clients: each client corrects its gradients by
    c - c_i, sets c_i+ = c_i - c + (x - y_i) / (K lr) and sends c_i+ - c_i; the server averages the models and
    moves c by the mean change. Three rounds, to 1e-12 of the float64 computation written out here."""
    task = _blobs(4, features=5, classes=3, num_samples=200, partitioner="quantity", local_steps=3, lr=0.3)
    x = {k: v.astype(np.float64) + 1 / 3 for k, v in _np(initial_arrays(task)).items()}
    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), _grid(tsclient.app, task),
                     codec.to_record(x), num_rounds=3)  # fmt: skip
    n = {p: task.num_train(p) for p in range(4)}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    ci = {p: {k: np.zeros_like(v) for k, v in x.items()} for p in range(4)}
    for rnd in (1, 2, 3):
        ys, dcs = {}, []
        for p in range(4):
            ys[p] = _logreg_sgd_f64(task, p, rnd, x, correction={k: c[k] - ci[p][k] for k in x})
            new = {k: ci[p][k] - c[k] + (x[k] - ys[p][k]) / (task.local_steps * task.lr) for k in x}
            dcs.append({k: new[k] - ci[p][k] for k in x})
            ci[p] = new
        x = _wmean(ys, n)
        c = {k: c[k] + np.mean([d[k] for d in dcs], axis=0) for k in c}
    for k, v in _np(res.arrays).items():
        assert v.dtype == np.float64 and res.strategy.c[k].dtype == np.float64
        np.testing.assert_allclose(v, x[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.strategy.c[k], c[k], rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(60)
def test_a_float16_model_is_averaged_from_float32_replies_and_rounded_once():
    """A float16 model: the clients train in float32 and reply in float32, and the new model is the float64 weighted
    mean of those replies rounded once to float16 (a float16 reply would round each client's model first)."""
    task = _blobs(4, features=5, classes=3, local_steps=3, lr=0.3)
    start = _as(initial_arrays(task), np.float16)
    replies = []

    class Seen(FedAvg):
        def aggregate_train(self, server_round, rs):
            rs = list(rs)
            replies.append({int(m.content["metrics"][tsclient.PARTITION_METRIC]): codec.to_numpy(m.content["arrays"])
                            for m in rs})  # fmt: skip
            return super().aggregate_train(server_round, rs)

    res = run_rounds(Seen(fraction_train=1.0, fraction_evaluate=0.0), _grid(tsclient.app, task), start,
                     num_rounds=2)  # fmt: skip
    r = res.history.rounds[-1]
    assert r.bytes_up == 4 * payload_bytes(RecordDict({"arrays": initial_arrays(task)}))  # float32 replies
    assert r.bytes_down == 4 * payload_bytes(RecordDict({"arrays": start}))  # the float16 model
    _check_model(res.arrays, _wmean(replies[-1], {p: task.num_train(p) for p in range(4)}), np.float16)
    assert not _same(res.arrays, start)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["scaffold", "fednova", "fedbn", "ifca", "cfl", "qfedavg", "heterofl", "feddf"])
def test_every_tilestack_strategy_keeps_a_float64_model_float64(name):
    """Two rounds of each of tilestack's strategies with tilestack's clients, from a float64 model: the model stays
    float64 and moves by amounts float32 cannot hold (every one of them rounded it to float32 each round)."""
    kw = dict(features=4, classes=3, num_samples=160, local_steps=3, lr=0.2)
    if name in ("fedbn", "heterofl"):
        kw |= dict(model="mlp", hidden=4, norm=name == "fedbn")
    task = _blobs(6, **kw)
    common = dict(fraction_train=1.0, fraction_evaluate=0.0)
    if name == "heterofl":
        s = HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, **common)
    elif name == "feddf":
        s = FedDF(model=task.build_model(), unlabeled=task.client_data(0)[2], steps=3, **common)
    else:
        from tilestack.federated.strategies import make_strategy

        s = make_strategy(name, clients_per_round=6, num_clients=6)
    start = s.initial_arrays(task) if hasattr(s, "initial_arrays") else initial_arrays(task)
    start = codec.to_record({k: v.astype(np.float64) + 1 / 3 for k, v in _np(start).items()})
    res = simulate(s, task, rounds=2, seed=1, evaluate=False, initial=start)
    assert all(r.num_aggregated == 6 for r in res.history.rounds)
    moved = 0
    for k, v in _np(res.arrays).items():
        assert v.dtype == np.float64, k
        if not k.startswith("bn."):  # FedBN's server copy of the local layers stays as sent
            moved += int(np.sum(v.astype(np.float32).astype(np.float64) != v))
    assert moved > 0


# ---- federated metrics, weighted by examples ---------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_federated_evaluation_and_training_metrics_are_weighted_by_examples():
    """FedAvg with federated evaluation over clients 30x apart in size: each round's ``eval_metrics`` are the test
    loss and accuracy of the new global model on each client's test split, weighted by its test examples, and
    ``train_metrics`` the training loss weighted by training examples (Flower aggregated both; the loop threw them
    away)."""
    from tilestack.federated.models import evaluate

    task = _blobs(8, features=4, classes=3, num_samples=1600, partitioner="quantity", local_steps=3, lr=0.2)
    sizes = [len(task.client_data(p)[3]) for p in range(8)]
    assert max(sizes) > 5 * min(sizes)
    losses = []

    class Seen(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            losses.append({int(m.content["metrics"][tsclient.PARTITION_METRIC]): m.content["metrics"]["train-loss"]
                           for m in replies})  # fmt: skip
            return super().aggregate_train(server_round, replies)

    res = simulate(Seen(fraction_train=1.0, fraction_evaluate=1.0), task, rounds=2, seed=3, evaluate=False)
    last = res.history.rounds[-1]
    params = _np(res.arrays)
    per_client = [evaluate(task.build_model(), params, *task.client_data(p)[2:]) for p in range(8)]
    n_test = np.array(sizes, np.float64)
    assert last.eval_metrics["eval-loss"] == pytest.approx(sum(n_test * [c[0] for c in per_client]) / n_test.sum(),
                                                           rel=1e-6)  # fmt: skip
    assert last.eval_metrics["eval-acc"] == pytest.approx(sum(n_test * [c[1] for c in per_client]) / n_test.sum(),
                                                          rel=1e-9)  # fmt: skip
    n_train = {p: task.num_train(p) for p in range(8)}
    want = sum(n_train[p] * losses[-1][p] for p in range(8)) / sum(n_train.values())
    assert last.train_metrics["train-loss"] == pytest.approx(want, rel=1e-12)
    assert "num-examples" not in last.eval_metrics  # the weight itself is not averaged


@pytest.mark.timeout(60)
def test_evaluation_replies_without_examples_or_with_nan_are_left_out_of_the_weighted_metrics():
    """Scripted evaluation: a client with no test examples and one reporting a NaN loss are left out (with their
    reasons); the aggregated accuracy is the weighted mean over the other four."""
    task = _blobs(6)
    evals = {0: (10, 0.5), 1: (0, 0.9), 2: (1000, 0.25), 3: (1, 1.0), 4: (30, float("nan")), 5: (7, 0.0)}

    def ev(pid, rnd):
        n, acc = evals[pid]
        return {"num-examples": n, "eval-acc": acc, "eval-loss": 1.0 if pid != 4 else float("nan")}

    app = _scripted(lambda pid, rnd, got, ctx, cfg: (got["arrays"], {"num-examples": 1}), evaluate_fn=ev)
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), _grid(app, task), initial_arrays(task),
                     num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert r.excluded["1"].startswith("empty: num-examples=0") and r.excluded["4"].startswith("non-finite metric")
    kept = [0, 2, 3, 5]
    want = sum(evals[p][0] * evals[p][1] for p in kept) / sum(evals[p][0] for p in kept)
    assert r.eval_metrics["eval-acc"] == pytest.approx(want, rel=1e-12)
    assert r.client_acc["mean"] == pytest.approx(np.mean([evals[p][1] for p in kept]))


# ---- Flower's server optimiser and plain averaging on float64 and float16 models --------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_fedavg_and_fedadam_keep_the_models_dtype_and_round_once(dtype):
    """Scripted clients, sizes 1 to 10**9: FedAvg's model is the float64 weighted mean rounded once to float16 (bit
    for bit) or kept in float64; FedAdam's three steps follow its rule written out in float64."""
    task = _blobs(5)
    n = {p: 10 ** (2 * p) for p in range(5)}

    def script(pid, rnd, got, context, config):
        y = {k: (v + _update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in got["arrays"].items()}
        return y, {"num-examples": n[pid]}

    x0 = {k: v.astype(dtype) for k, v in _np(initial_arrays(task)).items()}
    avg = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(_scripted(script), task),
                     codec.to_record(x0), num_rounds=1)  # fmt: skip
    want = _wmean({p: {k: (v + _update(p, 1, v.shape, dtype)).astype(dtype) for k, v in x0.items()} for p in n}, n)
    _check_model(avg.arrays, want, dtype)

    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    adam = run_rounds(FedAdam(fraction_train=1.0, fraction_evaluate=0.0, eta=eta, beta_1=b1, beta_2=b2, tau=tau),
                      _grid(_scripted(script), task), codec.to_record(x0), num_rounds=3)  # fmt: skip
    x = dict(x0)
    m = {k: np.zeros(v.shape) for k, v in x.items()}
    v2 = {k: np.zeros(v.shape) for k, v in x.items()}
    for rnd in (1, 2, 3):
        mean = _wmean({p: {k: (v + _update(p, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()} for p in n}, n)
        d = {k: mean[k] - x[k] for k in x}
        m = {k: b1 * m[k] + (1 - b1) * d[k] for k in x}
        v2 = {k: b2 * v2[k] + (1 - b2) * d[k] ** 2 for k in x}
        eta_t = eta * math.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))  # Flower's bias correction
        x = {k: (x[k] + eta_t * m[k] / (np.sqrt(v2[k]) + tau)).astype(dtype) for k in x}
    for k, got in _np(adam.arrays).items():
        assert got.dtype == dtype
        if dtype == np.float64:
            np.testing.assert_allclose(got, x[k], rtol=1e-12, atol=1e-14)
        else:
            np.testing.assert_array_equal(got, x[k])


# ---- non-finite and misshapen replies in SCAFFOLD, HeteroFL -----------------------------------------------------
@pytest.mark.timeout(60)
def test_non_finite_replies_anywhere_are_left_out_naming_the_client():
    """SCAFFOLD with six scripted clients: NaN in a model array, +inf in a control-variate change, an infinite
    weight, a NaN training loss; each is left out naming why, and the model and c are the rule over the other two
    (none of the non-finite values reaches x or c)."""
    task = _blobs(6)
    bad = {1: "nan-model", 2: "inf-dc", 3: "inf-weight", 4: "nan-loss"}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        y = {k: v + _update(pid, rnd, v.shape, np.float32) for k, v in x.items()}
        dc = {DC + k: _update(pid + 10, rnd, v.shape, np.float32) for k, v in x.items()}
        metrics = {"num-examples": pid + 1}
        if bad.get(pid) == "nan-model":
            y["fc.bias"][1] = np.nan
        if bad.get(pid) == "inf-dc":
            dc[DC + "fc.weight"][0, 0] = np.inf
        if bad.get(pid) == "inf-weight":
            metrics["num-examples"] = float("inf")
        if bad.get(pid) == "nan-loss":
            metrics["train-loss"] = float("nan")
        return y | dc, metrics

    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), _grid(_scripted(script), task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert r.excluded == {"1": "non-finite: fc.bias", "2": "non-finite: scaffold.dc.fc.weight",
                          "3": "non-finite metric: num-examples", "4": "non-finite metric: train-loss"}  # fmt: skip
    assert r.num_aggregated == 2
    x0 = _np(initial_arrays(task))
    want = _wmean({p: {k: (v + _update(p, 1, v.shape, np.float32)).astype(np.float32) for k, v in x0.items()}
                   for p in (0, 5)}, {0: 1, 5: 6})  # fmt: skip
    _check_model(res.arrays, want, np.float32)
    for v in res.strategy.c.values():
        dcs = [_update(p + 10, 1, v.shape, np.float32).astype(np.float64) for p in (0, 5)]
        np.testing.assert_array_equal(v, (2 / 6 * np.mean(dcs, axis=0)).astype(np.float32))


@pytest.mark.timeout(60)
def test_misshapen_replies_are_left_out_naming_the_client_and_the_array():
    """HeteroFL: client 1 (width 1/2) sends back a full-width model, client 2 a transposed fc2.weight; each is left
    out naming the array, its shape and the one sent; a round where every reply is misshapen keeps the model and
    says so."""
    task = _blobs(4, features=3, classes=2, model="mlp", hidden=4)

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        if pid == 1:
            x = {k: np.zeros(v.shape, v.dtype) for k, v in _np(initial_arrays(task)).items()}
        if pid == 2:
            x = {**x, "fc2.weight": np.ascontiguousarray(x["fc2.weight"].T)}
        if rnd == 2:
            x = {**x, "fc2.bias": np.zeros(3, np.float32)}
        return x, {}

    s = HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, fraction_train=1.0, fraction_evaluate=0.0)
    res = run_rounds(s, _grid(_scripted(script), task), initial_arrays(task), num_rounds=2)
    r1, r2 = res.history.rounds
    assert r1.excluded == {"1": "shape: fc1.weight is (3, 4), expected (3, 2)",
                           "2": "shape: fc2.weight is (2, 4), expected (4, 2)"}  # fmt: skip
    assert r1.num_aggregated == 2
    assert set(r2.excluded) == {"0", "1", "2", "3"} and r2.num_aggregated == 0
    assert r2.skipped == "no replies to aggregate"


@pytest.mark.timeout(60)
def test_a_reply_in_a_dtype_numpy_cannot_read_is_left_out_as_malformed():
    """A client that sends its float32 model as bfloat16 bytes (a torch user's ``.view(np.uint16)``; numpy has no
    bfloat16): left out as malformed, naming the array; the others are averaged."""
    task = _blobs(3)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        x = codec.to_numpy(msg.content["arrays"])
        rec = codec.to_record({k: v + 1 for k, v in x.items()})
        if pid == 1:
            w = (x["fc.weight"].view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits
            rec["fc.weight"] = Array(dtype="bfloat16", shape=w.shape, stype="numpy.ndarray", data=w.tobytes())
        metrics = MetricRecord({"num-examples": 1, tsclient.PARTITION_METRIC: pid})
        return Message(RecordDict({"arrays": rec, "metrics": metrics}), reply_to=msg)

    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(app, task), initial_arrays(task),
                     num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert list(r.excluded) == ["1"] and r.excluded["1"].startswith("malformed: fc.weight cannot be decoded")
    assert r.num_aggregated == 2
    _check_model(res.arrays, {k: v + 1 for k, v in _np(initial_arrays(task)).items()}, np.float32)


# ---- many clients, a fraction each round, some dropping out -------------------------------------------------------
@pytest.mark.timeout(120)
def test_200_clients_a_twentieth_per_round_with_dropouts_weighted_exactly():
    """200 scripted clients of sizes 1 to 10**6, FedAvg samples 10 per round and 30% of those drop out: each round
    aggregates exactly the sampled clients that stayed, every round's model is their float64 weighted mean rounded
    once (the next round starts from it), bytes count only the clients asked, and over 12 rounds the samples
    spread over the population."""
    task = _blobs(200, local_steps=1)
    rng = np.random.default_rng(8)
    n = {p: int(v) for p, v in enumerate(rng.integers(1, 10**6, 200))}
    trained: dict[int, set[int]] = {}
    starts: dict[int, dict[str, np.ndarray]] = {}

    def script(pid, rnd, got, context, config):
        trained.setdefault(rnd, set()).add(pid)
        starts[rnd] = got["arrays"]
        y = {k: v + _update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}
        return y, {"num-examples": n[pid]}

    grid = _grid(_scripted(script), task, system=SystemModel(200, dropout=0.3, seed=5))
    s = FedAvg(fraction_train=0.05, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    res = run_rounds(s, grid, initial_arrays(task), num_rounds=12)
    down = payload_bytes(RecordDict({"arrays": initial_arrays(task)}))
    sampled = set()
    for rnd, r in enumerate(res.history.rounds, start=1):
        dropped = {int(p) for p, why in r.excluded.items() if why == "dropout"}
        assert set(r.excluded.values()) <= {"dropout"}
        assert r.num_selected == 10 and len(trained[rnd]) + len(dropped) == 10 and not trained[rnd] & dropped
        assert r.num_aggregated == len(trained[rnd]) and r.bytes_down == down * len(trained[rnd])
        sampled |= trained[rnd] | dropped
        want = _wmean({p: {k: (v + _update(p, rnd, v.shape, np.float32)).astype(np.float32)
                           for k, v in starts[rnd].items()} for p in trained[rnd]}, n)  # fmt: skip
        got = res.arrays if rnd == 12 else codec.to_record(starts[rnd + 1])
        _check_model(got, want, np.float32)
    assert any(r.excluded for r in res.history.rounds)
    assert len(sampled) > 60


# ---- secure aggregation: dropouts below and above the reconstruction threshold -----------------------------------
@pytest.mark.timeout(120)
def test_secure_aggregation_survives_dropouts_down_to_its_threshold_and_not_below():
    """SecAgg+ over 5 clients with reconstruction_threshold 0.6 (3 shares): with 2 clients crashing each round the
    server still unmasks the sum of the 3 survivors (the plain FedAvg of the same survivors, to the quantisation
    step); with 3 crashing, no round can be unmasked and run_secure says so."""
    from tilestack.federated.secagg import run_plain, run_secure

    base = dict(dataset="synthetic", num_clients=5, max_samples=60, local_steps=2, lr=0.05)
    two = Task(**base, faults=((1, "crash"), (3, "crash")))
    secure, plain = run_secure(two, rounds=2, per_round=5), run_plain(two, rounds=2, per_round=5)
    start = two.initial_params()
    for k in secure:
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-4)
        assert np.abs(secure[k] - start[k]).max() > 1e-3  # it trained
    three = Task(**base, faults=((0, "crash"), (1, "crash"), (3, "crash")))
    with pytest.raises(FederatedError, match="none of the 2 rounds reached the unmasked sum"):
        run_secure(three, rounds=2, per_round=5)


# ---- compression with error feedback: nothing is lost for good ----------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", [("topk", 0.1), ("int8", 0.0)])
def test_error_feedback_delivers_every_update_in_the_long_run(spec):
    """Two clients (weights 1 and 3) push the same update every round, sent compressed with error feedback
    (compression.compress_update, rebuilt by Compressed): after T rounds the model plus the weighted mean of the
    clients' residuals is x0 + T times the weighted mean update (the invariant of error feedback), the residuals
    stay bounded, and the model's distance to x0 + T u shrinks like 1/T."""
    task = _blobs(2, features=20, classes=5)
    u = {p: {k: _update(p, 0, v.shape, np.float32) for k, v in _np(initial_arrays(task)).items()} for p in (0, 1)}
    n = {0: 1, 1: 3}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        packed = compress_update(str(config[tsclient.COMPRESS_KEY]), x, {k: x[k] + u[pid][k] for k in x}, context)
        return packed, {"num-examples": n[pid]}

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        packed, metrics = script(pid, rnd, {"arrays": codec.to_numpy(msg.content["arrays"])}, context,
                                 msg.content["config"])  # fmt: skip
        metrics |= {tsclient.PARTITION_METRIC: pid, "train-loss": 0.0, "num-steps": 1}
        return Message(RecordDict({"arrays": ArrayRecord(packed), "metrics": MetricRecord(metrics)}), reply_to=msg)

    x0 = _np(initial_arrays(task))
    mean_u = _wmean(u, n)
    errors = []
    inner = InProcessGrid(app, 2)
    grid = ManagedGrid(inner, task)
    s = Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), *spec)
    arrays = initial_arrays(task)
    for t in range(1, 31):
        arrays = run_rounds(s, grid, arrays, num_rounds=1).arrays
        x = _np(arrays)
        res = {p: codec.to_numpy(inner.contexts[nid].state[RESIDUAL_STATE]) for nid, p in inner.partitions.items()}
        mean_res = _wmean(res, n)
        for k in x0:
            np.testing.assert_allclose(x[k] + mean_res[k], x0[k] + t * mean_u[k], rtol=0, atol=2e-5 * t)
        bound = max(float(np.abs(v).max()) for v in mean_u.values())
        assert max(float(np.abs(v).max()) for v in mean_res.values()) <= (1 / 0.1 if spec[0] == "topk" else 1) * bound
        errors.append(max(float(np.abs(x[k] - x0[k] - t * mean_u[k]).max()) for k in x0) / t)
    assert errors[-1] < errors[4] / 3  # the relative shortfall decays


# ---- label skew by Dirichlet(0.01) with tilestack's clients -------------------------------------------------------
@pytest.mark.timeout(60)
def test_dirichlet_001_label_skew_trains_every_client_weighted_by_its_examples():
    """Dirichlet(0.01) over 4 classes and 10 clients: most clients hold one class, every client trains (none is
    empty), and FedAvg's model is the float64 mean of their models weighted by their training examples."""
    task = _blobs(10, features=4, classes=4, num_samples=400, partitioner="dirichlet", partition_alpha=0.01,
                  local_steps=3, lr=0.2)  # fmt: skip
    classes = [len(np.unique(task.client_data(p)[1])) for p in range(10)]
    assert np.median(classes) == 1
    replies = []

    class Seen(FedAvg):
        def aggregate_train(self, server_round, rs):
            rs = list(rs)
            replies.append({int(m.content["metrics"][tsclient.PARTITION_METRIC]): codec.to_numpy(m.content["arrays"])
                            for m in rs})  # fmt: skip
            return super().aggregate_train(server_round, rs)

    res = simulate(Seen(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, seed=1, evaluate=False)
    assert all(r.num_aggregated == 10 and not r.excluded for r in res.history.rounds)
    _check_model(res.arrays, _wmean(replies[-1], {p: task.num_train(p) for p in range(10)}), np.float32)


# ---- determinism: the same seed on one process or two -------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_seed_fixes_the_run_whatever_the_number_of_worker_processes():
    """FedProx on Dirichlet(0.01) with stragglers and dropouts: one worker process or two give the same rounds and
    model bit for bit; another seed gives another run."""
    task = _blobs(8, features=4, classes=4, num_samples=320, partitioner="dirichlet", partition_alpha=0.01,
                  local_steps=4, lr=0.2)  # fmt: skip
    system = SystemModel(8, straggler_fraction=0.5, dropout=0.2, seed=2)

    def run(workers, seed=4):
        s = FedProx(fraction_train=0.5, fraction_evaluate=0.5, proximal_mu=0.1)
        return simulate(s, task, rounds=3, seed=seed, system=system, workers=workers)

    def rounds(res):
        return [{k: v for k, v in vars(r).items() if k != "wall_time"} for r in res.history.rounds]

    one, two = run(1), run(2)
    assert _same(one.arrays, two.arrays)
    assert _json_equal(rounds(one), rounds(two))
    assert any(r.excluded for r in one.history.rounds)
    assert not _same(one.arrays, run(1, seed=5).arrays)


# ---- a client late on one round, with state ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_scaffold_client_late_on_one_round_rejoins_with_the_state_it_had():
    """SCAFFOLD, client 2 answers round 2 after the timeout (having trained and changed its c_i): the run equals
    the one in which it failed before training that round; its late c_i is not kept."""
    import time

    task = _blobs(4, features=4, classes=3, local_steps=3, lr=0.2)

    def app_for(how):
        app = ClientApp()

        @app.train()
        def train(msg, context):
            down = int(context.node_config["partition-id"]) == 2 and int(msg.content["config"]["server-round"]) == 2
            if down and how == "fail":
                raise ConnectionError("lost the server")
            reply = tsclient.train(msg, context)
            if down:
                time.sleep(3.0)
            return reply

        return app

    def run(how):
        s = Scaffold(fraction_train=1.0, fraction_evaluate=0.0)
        return run_rounds(s, _grid(app_for(how), task), initial_arrays(task), num_rounds=4, timeout=2.0)

    late, failed = run("late"), run("fail")
    assert late.history.rounds[1].excluded == {"2": "timeout: no reply within 2.0 s"}
    assert [r.num_aggregated for r in late.history.rounds] == [4, 3, 4, 4]
    assert _same(late.arrays, failed.arrays)
    for k in late.strategy.c:
        np.testing.assert_array_equal(late.strategy.c[k], failed.strategy.c[k])


# ---- stragglers under a deadline, normalised by FedNova ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_fednova_under_a_deadline_normalises_the_partial_work_each_client_did():
    """Clients 100x apart in speed under a deadline do ceil(share x steps) of their 20 steps ("partial"); FedNova's
    model is its rule over what they sent and the steps they report, in float64, rounded once."""
    task = _blobs(5, features=4, classes=3, local_steps=20, lr=0.05)
    system = SystemModel(5, speeds=np.array([200.0, 50.0, 20.0, 8.0, 2.0]), bandwidths=np.full(5, 1e9), deadline=1.0)
    seen = []

    class Seen(FedNova):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.append([(codec.to_numpy(m.content["arrays"]), dict(m.content["metrics"])) for m in replies])
            return super().aggregate_train(server_round, replies)

    x0 = _np(initial_arrays(task))
    res = simulate(Seen(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1, system=system, evaluate=False)
    steps = [int(m["num-steps"]) for _, m in seen[0]]
    assert steps == [20, 20, 20, 8, 2]
    n = np.array([m["num-examples"] for _, m in seen[0]], np.float64)
    p = n / n.sum()
    tau_eff = float(np.dot(p, steps))
    want = {k: x0[k] - tau_eff * sum(pi * (x0[k].astype(np.float64) - y[k]) / t
                                     for pi, t, (y, _) in zip(p, steps, seen[0], strict=True)) for k in x0}  # fmt: skip
    _check_model(res.arrays, want, np.float32)


# ---- resume after an interrupt in the middle of a round ---------------------------------------------------------
def _interrupting(at_round: int, pid: int) -> ClientApp:
    """tilestack's ClientApp, except that the process is interrupted (KeyboardInterrupt) when client ``pid`` starts
    round ``at_round``: the clients before it in that round have already trained (and changed their state)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == pid and int(msg.content["config"]["server-round"]) == at_round:
            raise KeyboardInterrupt
        return tsclient.train(msg, context)

    app.evaluate()(tsclient.evaluate_local)
    return app


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["heterofl", "fedbn", "qffl", "feddf"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_model(tmp_path, name):
    """The process stops while round 3's clients train (FedBN's clients 0-2 have already changed their local
    layers); the run resumed from the checkpoint ends at the uninterrupted run's model, rounds and metrics."""
    task = _blobs(6, features=4, classes=3, local_steps=3, lr=0.2, model="mlp", hidden=4, norm=name == "fedbn")
    common = dict(fraction_train=1.0, fraction_evaluate=0.5)

    def make():
        if name == "heterofl":
            return HeteroFL(width_of=lambda p: (1.0, 0.5, 0.25)[p % 3], hidden=4, **common)
        if name == "fedbn":
            return FedBN(**common)
        if name == "qffl":
            return QFFL(q=1.0, client_learning_rate=0.2, **common)
        return FedDF(model=task.build_model(), unlabeled=task.client_data(0)[2], steps=5, **common)

    def run(app, ckpt=None):
        grid = _grid(app, task)
        return run_rounds(make(), grid, initial_arrays(task), num_rounds=4, checkpoint=ckpt, seed=2)

    full = run(_interrupting(99, 0))
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(_interrupting(3, 3), ckpt)
    resumed = run(_interrupting(99, 0), ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4]
    assert _same(full.arrays, resumed.arrays)
    assert [r.eval_metrics for r in resumed.history.rounds] == [r.eval_metrics for r in full.history.rounds]


@pytest.mark.timeout(60)
def test_resuming_a_float32_run_with_a_float64_model_is_refused_naming_the_dtypes(tmp_path):
    """A checkpoint holds a float32 run; a call that passes a float64 initial model is another run (it returned the
    checkpoint's float32 model without a word)."""
    task = _blobs(4)
    ckpt = tmp_path / "run.ckpt"
    simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, evaluate=False, checkpoint=ckpt,
             stop_after=1)  # fmt: skip
    with pytest.raises(FederatedError, match=r"belongs to another run \(dtypes: checkpoint has .*float32.*, this run "
                                             r"has .*float64"):  # fmt: skip
        simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, evaluate=False, checkpoint=ckpt,
                 initial=_as(initial_arrays(task), np.float64))  # fmt: skip
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, evaluate=False, checkpoint=ckpt)
    assert [r.round for r in res.history.rounds] == [1, 2]


# ---- quantised and full-precision clients in one round ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_quantised_and_full_precision_clients_mix_in_one_round():
    """Under Compressed(FedAvg, int8), client 0 sends its model in float64 (it ignores the compression request),
    client 1 an int8 update, client 2 a top-k update: the server rebuilds each as a model (global + decoded
    update, or the model as sent) and averages them by examples, exactly in float64, rounded once."""
    task = _blobs(3, features=6, classes=3)
    x0 = _np(initial_arrays(task))
    n = {0: 5, 1: 1000, 2: 7}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        y = {k: x[k] + _update(pid, rnd, v.shape, np.float32) for k, v in x.items()}
        if pid == 0:
            return {k: v.astype(np.float64) for k, v in y.items()}, {"num-examples": n[pid]}
        return compress_update("int8" if pid == 1 else "topk:0.5", x, y, context), {"num-examples": n[pid]}

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        out, metrics = script(pid, 1, {"arrays": codec.to_numpy(msg.content["arrays"])}, context, None)
        rec = ArrayRecord(out) if pid else codec.to_record(out)
        metrics |= {tsclient.PARTITION_METRIC: pid, "train-loss": 0.0, "num-steps": 1}
        return Message(RecordDict({"arrays": rec, "metrics": MetricRecord(metrics)}), reply_to=msg)

    res = run_rounds(Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), "int8"), _grid(app, task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    assert res.history.rounds[0].num_aggregated == 3
    models = {}
    for p in (0, 1, 2):
        u = {k: ((x0[k] + _update(p, 1, v.shape, np.float32)) - x0[k]).astype(np.float32) for k, v in x0.items()}
        if p == 0:
            models[p] = {k: (x0[k] + _update(p, 1, v.shape, np.float32)).astype(np.float64) for k, v in x0.items()}
        else:
            enc = codec.encode_int8 if p == 1 else (lambda a: codec.encode_topk(a, math.ceil(0.5 * a.size)))
            models[p] = {k: x0[k] + codec.decode(enc(u[k])).astype(np.float64) for k in x0}
    _check_model(res.arrays, _wmean(models, n), np.float32)


# ---- Flower's own Simulation Engine ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flowers_simulation_engine_gives_the_same_float64_scaffold_run():
    """SCAFFOLD from a float64 model with dropouts and federated evaluation on Flower's Simulation Engine (Ray):
    the same model, dtypes and weighted evaluation metrics as the in-process engine, bit for bit (about 25 s,
    most of it Ray starting)."""
    task = _blobs(4, features=4, classes=3, local_steps=3, lr=0.2)
    start = codec.to_record({k: v.astype(np.float64) + 1 / 3 for k, v in _np(initial_arrays(task)).items()})

    def run(engine):
        return simulate(Scaffold(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=2, seed=1, initial=start,
                        engine=engine, system=SystemModel(4, dropout=0.3, seed=1))  # fmt: skip

    ray, ours = run("flower"), run("tilestack")
    assert all(v.dtype == np.float64 for v in _np(ray.arrays).values())
    assert _same(ray.arrays, ours.arrays)
    assert [r.eval_metrics for r in ray.history.rounds] == [r.eval_metrics for r in ours.history.rounds]
    assert all(r.eval_metrics["eval-acc"] > 0 for r in ours.history.rounds)


@pytest.mark.timeout(120)
def test_a_client_whose_training_diverges_drops_out_of_secure_aggregation(monkeypatch):
    """Client 2's local SGD diverges to NaN. The server sees only the masked sum, so it cannot leave the update out:
    the client must. Before, its NaN was quantised to arbitrary integers and the secure model was finite garbage
    (entries of 1630 with a clipping range of 8). Now the client drops out, and the secure model equals the plain
    run's in which client 2 crashed."""
    from tilestack.federated import secagg

    real = secagg.local_sgd

    def diverging(model, params, x, y, **kw):
        trained, steps, loss = real(model, params, x, y, **kw)
        if diverge[0] and np.array_equal(x, Task(**base).client_data(2)[0]):  # client 2, known by its data
            trained = {k: np.full_like(v, np.nan) for k, v in trained.items()}
        return trained, steps, loss

    base = dict(dataset="synthetic", num_clients=5, max_samples=60, local_steps=2, lr=0.05)
    diverge = [True]
    monkeypatch.setattr(secagg, "local_sgd", diverging)
    secure = secagg.run_secure(Task(**base), rounds=2, per_round=5)
    diverge[0] = False
    crashed = secagg.run_plain(Task(**base, faults=((2, "crash"),)), rounds=2, per_round=5)
    for k in secure:
        assert np.all(np.isfinite(secure[k]))
        np.testing.assert_allclose(secure[k], crashed[k], rtol=0, atol=1e-4)


# ---- weights that are not weights ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_replies_whose_weight_is_not_positive_are_left_out_and_never_end_the_run():
    """FedAvg(weighted_by_key='unit-weight') with scripted clients reporting weights 1, -0.5, 0, -1.5 and 1, and one
    without the key: the four odd ones are left out naming the weight, and the model is the mean of the two valid
    replies. Before: -0.5 was used (the 'average' extrapolated past the replies), 0 counted as aggregated, and
    weights summing to 0 ended the run with a ZeroDivisionError inside Flower."""
    task = _blobs(6)
    weights = {0: 1.0, 1: -0.5, 2: 0.0, 3: -1.5, 4: 1.0, 5: None}  # summing to 0

    def script(pid, rnd, got, context, config):
        metrics = {"num-examples": 5, tsclient.UNIT_WEIGHT: weights[pid]} if weights[pid] is not None else {}
        return {k: v + pid for k, v in got["arrays"].items()}, metrics

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        arrays, metrics = script(pid, 1, {"arrays": codec.to_numpy(msg.content["arrays"])}, context, None)
        metrics = {"num-examples": 5, tsclient.PARTITION_METRIC: pid} | metrics
        return Message(RecordDict({"arrays": codec.to_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    s = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=tsclient.UNIT_WEIGHT)
    res = run_rounds(s, _grid(app, task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert r.excluded == {
        "1": "weight: unit-weight=-0.5, expected > 0 (the strategy's weighted_by_key)",
        "2": "weight: unit-weight=0.0, expected > 0 (the strategy's weighted_by_key)",
        "3": "weight: unit-weight=-1.5, expected > 0 (the strategy's weighted_by_key)",
        "5": "metrics: no 'unit-weight' (the strategy's weighted_by_key)",
    }
    assert r.num_aggregated == 2 and not r.skipped
    x0 = _np(initial_arrays(task))
    _check_model(res.arrays, {k: v + 2.0 for k, v in x0.items()}, np.float32)  # mean of +0 and +4


# ---- bfloat16 -----------------------------------------------------------------------------------------------------
def _bf16(arrays) -> ArrayRecord:
    """``arrays`` as bfloat16 bytes (the upper half of each float32), as a torch user would put them on the wire."""
    out = {}
    for k, v in _np(arrays).items():
        bits = (np.ascontiguousarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        out[k] = Array(dtype="bfloat16", shape=tuple(v.shape), stype="numpy.ndarray", data=bits.tobytes())
    return ArrayRecord(out)


@pytest.mark.timeout(60)
def test_a_bfloat16_model_is_refused_before_any_work_naming_the_array(monkeypatch):
    """numpy has no bfloat16 (without ml_dtypes, not installed), so neither has Flower's Array: every client failed
    on such a model, and after the first round the server's evaluation raised TypeError. simulate and run_rounds
    now refuse it up front, naming the array and what to send instead."""
    task = _blobs(3)

    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    needle = "initial['fc.weight'] has dtype 'bfloat16', which numpy cannot hold; expected real numbers"
    with monkeypatch.context() as m:
        m.setattr("tilestack.federated.simulation.Evaluator", fail)
        m.setattr("tilestack.federated.simulation.InProcessGrid", fail)
        with pytest.raises(ValueError, match=re.escape("simulate: " + needle)):
            simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1,
                     initial=_bf16(initial_arrays(task)))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("run_rounds: " + needle)):
        run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(tsclient.app, task),
                   _bf16(initial_arrays(task)), num_rounds=1)  # fmt: skip
