"""Federated scenarios, round 5 (1 of 2): tilestack's strategies and clients against float64 arithmetic, any dtype.

Real Flower strategies and tilestack's (SCAFFOLD, FedNova, HeteroFL, q-FFL, IFCA, CFL, FedBN, FedDF), tilestack's
ClientApp or scripted ClientApps, over tilestack's in-process Flower ``Grid`` (and once Flower's Simulation Engine).
Truth is numpy in float64 written out here from each method's update rule. What this half found, each now fixed:

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
- Resuming a float32 run's checkpoint with a float64 initial model returned the float32 model; the checkpoint now
  records dtypes and refuses it.
- A bfloat16 model (numpy has no bfloat16) made every client fail and the server's evaluation raise after the first
  round; ``simulate`` and ``run_rounds`` now refuse it before any work, naming the array.

The run's edges (faults, many clients, secure aggregation, compression, resume) are in test_scenarios_round5_runs.py.
"""

import math
import re

import numpy as np
import pytest
from _fl_round5 import DC, SC, as_, blobs, check_model, make_grid, np_, same, scripted, update, wmean
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from tilestack.errors import FederatedError
from tilestack.federated import SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.grid import payload_bytes
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedDF, FedNova, HeteroFL, Scaffold, sub_model


# ---- SCAFFOLD's server rule, in float64, with a float32 and a float64 model -------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scaffold_server_follows_its_rule_exactly(dtype):
    """Six clients of very unequal sizes, 30% dropout: x+ = x + g (sum_i n_i y_i / sum_i n_i - x), and
    c+ = c + |S| / N mean_i(dc_i) with |S| the clients that replied, N all six. Each round's model is that float64
    value rounded once to the model's dtype, and the clients receive c in the model's dtype. Before: SCAFFOLD
    re-encoded the replies as float32 and FedAvg summed them in float32 (ulps off); a float64 model came back
    rounded to float32 every round."""
    task = blobs(6)
    n = {0: 1, 1: 10**9, 2: 3, 3: 77, 4: 12345, 5: 2}
    seen_c = []

    def script(pid, rnd, got, context, config):
        x, c = got["arrays"], got[SC]
        seen_c.append((rnd, pid, c))
        y = {k: (v + update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()}
        dc = {DC + k: update(pid + 10, rnd, v.shape, dtype) for k, v in x.items()}
        return y | dc, {"num-examples": n[pid]}

    g = 0.7
    grid = make_grid(scripted(script), task, system=SystemModel(6, dropout=0.3, seed=2))
    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0, global_lr=g), grid,
                     as_(initial_arrays(task), dtype), num_rounds=4)  # fmt: skip
    x = {k: v.astype(dtype) for k, v in np_(initial_arrays(task)).items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    assert any(r.excluded for r in res.history.rounds)
    for rnd, r in enumerate(res.history.rounds, start=1):
        stayed = [p for p in range(6) if str(p) not in r.excluded]
        for rr, _, got_c in seen_c:
            if rr == rnd:
                for k in c:
                    assert got_c[k].dtype == dtype
                    np.testing.assert_array_equal(got_c[k], c[k])
        ys = {p: {k: (x[k] + update(p, rnd, x[k].shape, dtype)).astype(dtype) for k in x} for p in stayed}
        mean = wmean(ys, n)
        x = {k: (x[k] + g * (mean[k] - x[k])).astype(dtype) for k in x}
        dcs = [{k: update(p + 10, rnd, x[k].shape, dtype).astype(np.float64) for k in x} for p in stayed]
        c = {k: (c[k] + len(stayed) / 6 * np.mean([d[k] for d in dcs], axis=0)).astype(dtype) for k in c}
    check_model(res.arrays, {k: v.astype(np.float64) for k, v in x.items()}, dtype)
    for k in c:
        assert res.strategy.c[k].dtype == dtype
        np.testing.assert_array_equal(res.strategy.c[k], c[k])


# ---- FedNova and HeteroFL against their rules, with a float64 model ---------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fednova_normalises_by_the_steps_each_client_reports(dtype):
    """Clients doing 1 to 40 local steps on 1 to 10**6 examples: x+ = x - tau_eff sum_i p_i (x - y_i) / tau_i with
    p_i = n_i / n and tau_eff = sum_i p_i tau_i, in float64, rounded once (a float64 model stayed float32-rounded)."""
    task = blobs(5, local_steps=40)  # (the most steps a client may claim: the work the server asks of it)
    n, tau = {0: 1, 1: 10**6, 2: 50, 3: 7, 4: 999}, {0: 40, 1: 1, 2: 3, 3: 17, 4: 8}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        return {k: (v + update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()}, \
            {"num-examples": n[pid], "num-steps": tau[pid]}

    res = run_rounds(FedNova(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     as_(initial_arrays(task), dtype), num_rounds=3)  # fmt: skip
    x = {k: v.astype(dtype) for k, v in np_(initial_arrays(task)).items()}
    total = sum(n.values())
    for rnd in (1, 2, 3):
        p = {i: n[i] / total for i in n}
        tau_eff = sum(p[i] * tau[i] for i in n)
        # (x - y_i) is minus the update exactly where y_i = x + update is exact (float64), else as the client rounded
        step = {k: sum(p[i] * (x[k].astype(np.float64) - (x[k] + update(i, rnd, x[k].shape, dtype)).astype(dtype))
                       / tau[i] for i in n) for k in x}  # fmt: skip
        x = {k: (x[k] - tau_eff * step[k]).astype(dtype) for k in x}
    check_model(res.arrays, {k: v.astype(np.float64) for k, v in x.items()}, dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_heterofl_averages_each_element_over_the_clients_that_hold_it(dtype):
    """Widths 1, 1/2, 1/4 of an 8-unit MLP: each client receives its sub-model in the model's dtype, and each element
    of the new model is the float64 weighted mean over the clients whose sub-model holds it, rounded once (a float64
    model was cut to float32 on the way to the clients and back)."""
    task = blobs(6, features=3, classes=2, model="mlp", hidden=8)
    width = {p: (1.0, 0.5, 0.25)[p % 3] for p in range(6)}
    n = {p: 3**p for p in range(6)}
    received = {}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        received[pid] = {k: (v.dtype, v.shape) for k, v in x.items()}
        y = {k: (v + update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()}
        return y, {"num-examples": n[pid]}

    s = HeteroFL(width_of=width.get, hidden=8, fraction_train=1.0, fraction_evaluate=0.0)
    res = run_rounds(s, make_grid(scripted(script), task), as_(initial_arrays(task), dtype), num_rounds=2)
    x = {k: v.astype(dtype) for k, v in np_(initial_arrays(task)).items()}
    for rnd in (1, 2):
        total = {k: np.zeros(v.shape) for k, v in x.items()}
        weight = {k: np.zeros(v.shape) for k, v in x.items()}
        for p in range(6):
            for k, v in sub_model(x, 8, width[p]).items():
                region = tuple(slice(0, m) for m in v.shape)
                total[k][region] += n[p] * (v + update(p, rnd, v.shape, dtype)).astype(dtype).astype(np.float64)
                weight[k][region] += n[p]
        x = {k: np.where(weight[k] > 0, total[k] / np.maximum(weight[k], 1), x[k]).astype(dtype) for k in x}
    assert received[2]["fc1.weight"] == (np.dtype(dtype), (3, 2))
    assert all(d == np.dtype(dtype) for d, _ in received[1].values())
    check_model(res.arrays, {k: v.astype(np.float64) for k, v in x.items()}, dtype)


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
    task = blobs(4, features=5, classes=3, num_samples=200, partitioner="quantity", local_steps=3, lr=0.3)
    x0 = {k: v.astype(np.float64) + 1 / 3 for k, v in np_(initial_arrays(task)).items()}
    res = run_rounds(FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu), make_grid(tsclient.app, task),
                     codec.to_record(x0), num_rounds=2)  # fmt: skip
    x = x0
    for rnd in (1, 2):
        n = {p: task.num_train(p) for p in range(4)}
        x = wmean({p: _logreg_sgd_f64(task, p, rnd, x, mu) for p in range(4)}, n)
    for k, v in np_(res.arrays).items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(v, x[k], rtol=1e-13, atol=1e-15)


@pytest.mark.timeout(60)
def test_scaffold_clients_and_server_on_a_float64_model_follow_the_rule_written_out():
    """SCAFFOLD end to end on a float64 model with tilestack's clients: each client corrects its gradients by
    c - c_i, sets c_i+ = c_i - c + (x - y_i) / (K lr) and sends c_i+ - c_i; the server averages the models and
    moves c by the mean change. Three rounds, to 1e-12 of the float64 computation written out here."""
    task = blobs(4, features=5, classes=3, num_samples=200, partitioner="quantity", local_steps=3, lr=0.3)
    x = {k: v.astype(np.float64) + 1 / 3 for k, v in np_(initial_arrays(task)).items()}
    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), make_grid(tsclient.app, task),
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
        x = wmean(ys, n)
        c = {k: c[k] + np.mean([d[k] for d in dcs], axis=0) for k in c}
    for k, v in np_(res.arrays).items():
        assert v.dtype == np.float64 and res.strategy.c[k].dtype == np.float64
        np.testing.assert_allclose(v, x[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.strategy.c[k], c[k], rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(60)
def test_a_float16_model_is_averaged_from_float32_replies_and_rounded_once():
    """A float16 model: the clients train in float32 and reply in float32, and the new model is the float64 weighted
    mean of those replies rounded once to float16 (a float16 reply would round each client's model first)."""
    task = blobs(4, features=5, classes=3, local_steps=3, lr=0.3)
    start = as_(initial_arrays(task), np.float16)
    replies = []

    class Seen(FedAvg):
        def aggregate_train(self, server_round, rs):
            rs = list(rs)
            replies.append({int(m.content["metrics"][tsclient.PARTITION_METRIC]): codec.to_numpy(m.content["arrays"])
                            for m in rs})  # fmt: skip
            return super().aggregate_train(server_round, rs)

    res = run_rounds(Seen(fraction_train=1.0, fraction_evaluate=0.0), make_grid(tsclient.app, task), start,
                     num_rounds=2)  # fmt: skip
    r = res.history.rounds[-1]
    assert r.bytes_up == 4 * payload_bytes(RecordDict({"arrays": initial_arrays(task)}))  # float32 replies
    assert r.bytes_down == 4 * payload_bytes(RecordDict({"arrays": start}))  # the float16 model
    check_model(res.arrays, wmean(replies[-1], {p: task.num_train(p) for p in range(4)}), np.float16)
    assert not same(res.arrays, start)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["scaffold", "fednova", "fedbn", "ifca", "cfl", "qfedavg", "heterofl", "feddf"])
def test_every_tilestack_strategy_keeps_a_float64_model_float64(name):
    """Two rounds of each of tilestack's strategies with tilestack's clients, from a float64 model: the model stays
    float64 and moves by amounts float32 cannot hold (every one of them rounded it to float32 each round)."""
    kw = dict(features=4, classes=3, num_samples=160, local_steps=3, lr=0.2)
    if name in ("fedbn", "heterofl"):
        kw |= dict(model="mlp", hidden=4, norm=name == "fedbn")
    task = blobs(6, **kw)
    common = dict(fraction_train=1.0, fraction_evaluate=0.0)
    if name == "heterofl":
        s = HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, **common)
    elif name == "feddf":
        s = FedDF(model=task.build_model(), unlabeled=task.client_data(0)[2], steps=3, **common)
    else:
        from tilestack.federated.strategies import make_strategy

        s = make_strategy(name, clients_per_round=6, num_clients=6)
    start = s.initial_arrays(task) if hasattr(s, "initial_arrays") else initial_arrays(task)
    start = codec.to_record({k: v.astype(np.float64) + 1 / 3 for k, v in np_(start).items()})
    res = simulate(s, task, rounds=2, seed=1, evaluate=False, initial=start)
    assert all(r.num_aggregated == 6 for r in res.history.rounds)
    moved = 0
    for k, v in np_(res.arrays).items():
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

    task = blobs(8, features=4, classes=3, num_samples=1600, partitioner="quantity", local_steps=3, lr=0.2)
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
    params = np_(res.arrays)
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
    from tilestack.federated.plots import _values  # what plot_rounds draws for "eval_metrics.eval-acc"

    assert _values(res.history, "eval_metrics.eval-acc") == [r.eval_metrics["eval-acc"] for r in res.history.rounds]


@pytest.mark.timeout(60)
def test_evaluation_replies_without_examples_or_with_nan_are_left_out_of_the_weighted_metrics():
    """Scripted evaluation: a client with no test examples and one reporting a NaN loss are left out (with their
    reasons); the aggregated accuracy is the weighted mean over the other four."""
    task = blobs(6)
    evals = {0: (10, 0.5), 1: (0, 0.9), 2: (1000, 0.25), 3: (1, 1.0), 4: (30, float("nan")), 5: (7, 0.0)}

    def ev(pid, rnd):
        n, acc = evals[pid]
        return {"num-examples": n, "eval-acc": acc, "eval-loss": 1.0 if pid != 4 else float("nan")}

    app = scripted(lambda pid, rnd, got, ctx, cfg: (got["arrays"], {"num-examples": 1}), evaluate_fn=ev)
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), make_grid(app, task), initial_arrays(task),
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
    task = blobs(5)
    n = {p: 10 ** (2 * p) for p in range(5)}

    def script(pid, rnd, got, context, config):
        y = {k: (v + update(pid, rnd, v.shape, dtype)).astype(dtype) for k, v in got["arrays"].items()}
        return y, {"num-examples": n[pid]}

    x0 = {k: v.astype(dtype) for k, v in np_(initial_arrays(task)).items()}
    avg = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     codec.to_record(x0), num_rounds=1)  # fmt: skip
    want = wmean({p: {k: (v + update(p, 1, v.shape, dtype)).astype(dtype) for k, v in x0.items()} for p in n}, n)
    check_model(avg.arrays, want, dtype)

    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    adam = run_rounds(FedAdam(fraction_train=1.0, fraction_evaluate=0.0, eta=eta, beta_1=b1, beta_2=b2, tau=tau),
                      make_grid(scripted(script), task), codec.to_record(x0), num_rounds=3)  # fmt: skip
    x = dict(x0)
    m = {k: np.zeros(v.shape) for k, v in x.items()}
    v2 = {k: np.zeros(v.shape) for k, v in x.items()}
    for rnd in (1, 2, 3):
        mean = wmean({p: {k: (v + update(p, rnd, v.shape, dtype)).astype(dtype) for k, v in x.items()} for p in n}, n)
        d = {k: mean[k] - x[k] for k in x}
        m = {k: b1 * m[k] + (1 - b1) * d[k] for k in x}
        v2 = {k: b2 * v2[k] + (1 - b2) * d[k] ** 2 for k in x}
        eta_t = eta * math.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))  # Flower's bias correction
        x = {k: (x[k] + eta_t * m[k] / (np.sqrt(v2[k]) + tau)).astype(dtype) for k in x}
    for k, got in np_(adam.arrays).items():
        assert got.dtype == dtype
        if dtype == np.float64:
            np.testing.assert_allclose(got, x[k], rtol=1e-12, atol=1e-14)
        else:
            np.testing.assert_array_equal(got, x[k])


# ---- Flower's own Simulation Engine ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flowers_simulation_engine_gives_the_same_float64_scaffold_run():
    """SCAFFOLD from a float64 model with dropouts and federated evaluation on Flower's Simulation Engine (Ray):
    the same model, dtypes and weighted evaluation metrics as the in-process engine, bit for bit (about 25 s,
    most of it Ray starting)."""
    task = blobs(4, features=4, classes=3, local_steps=3, lr=0.2)
    start = codec.to_record({k: v.astype(np.float64) + 1 / 3 for k, v in np_(initial_arrays(task)).items()})

    def run(engine):
        return simulate(Scaffold(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=2, seed=1, initial=start,
                        engine=engine, system=SystemModel(4, dropout=0.3, seed=1))  # fmt: skip

    ray, ours = run("flower"), run("tilestack")
    assert all(v.dtype == np.float64 for v in np_(ray.arrays).values())
    assert same(ray.arrays, ours.arrays)
    assert [r.eval_metrics for r in ray.history.rounds] == [r.eval_metrics for r in ours.history.rounds]
    assert all(r.eval_metrics["eval-acc"] > 0 for r in ours.history.rounds)


# ---- bfloat16 -----------------------------------------------------------------------------------------------------
def _bf16(arrays) -> ArrayRecord:
    """``arrays`` as bfloat16 bytes (the upper half of each float32), as a torch user would put them on the wire."""
    out = {}
    for k, v in np_(arrays).items():
        bits = (np.ascontiguousarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        out[k] = Array(dtype="bfloat16", shape=tuple(v.shape), stype="numpy.ndarray", data=bits.tobytes())
    return ArrayRecord(out)


@pytest.mark.timeout(60)
def test_a_bfloat16_model_is_refused_before_any_work_naming_the_array(monkeypatch):
    """numpy has no bfloat16 (without ml_dtypes, not installed), so neither has Flower's Array: every client failed
    on such a model, and after the first round the server's evaluation raised TypeError. simulate and run_rounds
    now refuse it up front, naming the array and what to send instead."""
    task = blobs(3)

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
        run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), make_grid(tsclient.app, task),
                   _bf16(initial_arrays(task)), num_rounds=1)  # fmt: skip


# ---- the run signature keeps dtypes --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_resuming_a_float32_run_with_a_float64_model_is_refused_naming_the_dtypes(tmp_path):
    """A checkpoint holds a float32 run; a call that passes a float64 initial model is another run (it returned the
    checkpoint's float32 model without a word)."""
    task = blobs(4)
    ckpt = tmp_path / "run.ckpt"
    simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, evaluate=False, checkpoint=ckpt,
             stop_after=1)  # fmt: skip
    with pytest.raises(FederatedError, match=r"belongs to another run \(dtypes: checkpoint has .*float32.*, this run "
                                             r"has .*float64"):  # fmt: skip
        simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, evaluate=False, checkpoint=ckpt,
                 initial=as_(initial_arrays(task), np.float64))  # fmt: skip
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, evaluate=False, checkpoint=ckpt)
    assert [r.round for r in res.history.rounds] == [1, 2]
