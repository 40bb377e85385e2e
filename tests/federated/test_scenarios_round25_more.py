"""Federated scenarios, round 25 (2 of 2): initial arrays the clients' model lacks refused by ``run_rounds``; FedProx
mu = 0 against FedAvg on a float64 model to float64 precision; 200 clients of a tiny model; FedYogi beside a client
that sends NaN every round; a round in which every client fails under SCAFFOLD and under FedAdam (resumed across it);
example counts whose sum passes int64.

tilestack's ClientApp (or scripted ones) over tilestack's in-process Flower ``Grid`` under ``ManagedGrid``
(``run_rounds``) or ``simulate``; Flower 1.41's FedAvg, FedProx, FedAdam and FedYogi. References independent of the
code under test: each client's local SGD replayed on its seeded minibatches (``_fl_round7.client_model``, or
``models.local_sgd`` in float64 here), server rules written out in float64 (``_fl_round16.ServerOptimizer``,
SCAFFOLD's x + g (mean - x) and c + |S|/N mean(dc)), weighted means by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import DC, SC, make_grid, np_, scripted, update, wmean
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round11 import counting_app as _counting_app
from _fl_round16 import ServerOptimizer
from _fl_round18 import EVERYONE
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from tilestack.federated import InProcessGrid, ManagedGrid, Task, codec, initial_arrays, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.models import local_sgd
from tilestack.federated.strategies import Scaffold

pytestmark = pytest.mark.timeout(120)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=2,
                batch_size=8, lr=0.1, seed=5)  # fmt: skip
    return Task(**(base | kw))




# ---- initial arrays the clients' model lacks -----------------------------------------------------------------------
@pytest.mark.parametrize("extra", ["extra", "scaffold.dc.fc.bias", "fc.weight_old"])
def test_initial_arrays_with_one_the_tasks_model_lacks_are_refused_by_run_rounds_before_any_client_runs(extra):
    """Found here: ``run_rounds`` over tilestack's ClientApp with initial arrays holding one array more than the task's
    model ran every round with every client failing on it ("error: KeyError: 'extra'"), nothing aggregated and no
    error (``simulate`` refused the same arrays). Refused now before round 1, naming the array and the model's."""
    task = _task()
    arrays = codec.to_record(task.initial_params() | {extra: np.zeros(3, np.float32)})
    rounds: list = []
    with pytest.raises(ValueError) as ex:
        run_rounds(FedAvg(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 4), task), arrays, num_rounds=2,
                   on_round=rounds.append)  # fmt: skip
    assert f"initial_arrays hold {extra!r}" in str(ex.value) and "fc.bias, fc.weight" in str(ex.value), str(ex.value)
    assert rounds == []


def test_a_wrapper_of_tilestacks_clientapp_sent_an_array_the_model_lacks_says_which_in_each_clients_reason():
    """Through a wrapper of tilestack's ClientApp (which run_rounds cannot tell from a ClientApp of one's own) each
    client refuses the array by name, in training and in evaluation, where each failed with a bare KeyError: 'extra';
    nothing is averaged in and the model is kept."""
    task, calls = _task(), []
    arrays = codec.to_record(task.initial_params() | {"extra": np.zeros(3, np.float32)})
    grid = ManagedGrid(InProcessGrid(_counting_app(calls), task.num_clients), task)
    res = run_rounds(FedAvg(**(EVERYONE | dict(fraction_evaluate=1.0))), grid, arrays, num_rounds=1)
    r = res.history.rounds[0]
    assert r.num_aggregated == 0 and r.skipped == "no replies to aggregate"
    assert set(r.excluded) == {"0", "1", "2", "3"} and set(r.eval_excluded) == set(r.excluded)
    for reason in r.excluded.values():
        assert "arrays ['extra'] are not in the task's model (fc.bias, fc.weight)" in reason, reason
        assert "in evaluation" in reason and "KeyError" not in reason, reason
    assert calls.count("train") == calls.count("evaluate") == 4
    for k, v in np_(arrays).items():
        np.testing.assert_array_equal(np_(res.arrays)[k], v)


def test_a_clientapp_of_ones_own_still_gets_arrays_of_its_own_beside_the_model():
    """Another ClientApp may read arrays the task's model lacks (a scripted client here, sending its model back one
    step on and the extra array untouched): run_rounds leaves it to, and the model is the clients' mean by hand."""
    task = _task()
    start = task.initial_params() | {"extra": np.full(3, 2.0, np.float32)}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        assert "extra" in x
        moved = {k: (v + (pid + 1) * 0.25).astype(np.float32) if k != "extra" else v for k, v in x.items()}
        return moved, {"num-examples": pid + 1}

    res = run_rounds(FedAvg(**EVERYONE), make_grid(scripted(script), task), codec.to_record(start), num_rounds=1)
    assert res.history.rounds[0].num_aggregated == 4
    want = wmean({p: {k: (v + (p + 1) * 0.25 if k != "extra" else v) for k, v in start.items()} for p in range(4)},
                 {p: p + 1 for p in range(4)})  # fmt: skip
    near(np_(res.arrays), want)
    np.testing.assert_array_equal(np_(res.arrays)["extra"], 2.0)


# ---- FedProx mu = 0 on a float64 model -----------------------------------------------------------------------------
def _sgd64(task: Task, pid: int, rnd: int, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Client ``pid``'s local SGD in float64 on its seeded minibatches (rng (seed, pid, round, 13))."""
    x, y, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    trained, _, _ = local_sgd(task.build_model(), start, x, y, steps=task.steps_for(pid), batch_size=task.batch_size,
                              lr=task.lr, rng=rng)  # fmt: skip
    return trained


def test_fedprox_mu_zero_on_a_float64_model_is_fedavg_bit_for_bit_and_the_float64_weighted_mean_of_replayed_sgd():
    """A float64 model under quantity skew (clients of different sizes): FedProx(proximal_mu=0) and FedAvg give the
    same arrays bit for bit, three rounds, kept in float64 (bytes up are float64's); each round is the
    examples-weighted mean of the clients' float64 SGD replayed from the round's model, to float64 rounding."""
    task = _task(partitioner="quantity", quantity_sigma=1.0)
    start = {k: v.astype(np.float64) for k, v in task.initial_params().items()}
    n = {p: task.num_train(p) for p in range(4)}
    assert len(set(n.values())) > 1, n
    runs = {}
    for name, strategy in (("fedavg", FedAvg(**EVERYONE)), ("fedprox", FedProx(proximal_mu=0.0, **EVERYONE))):
        models: list = []
        runs[name] = run_rounds(strategy, ManagedGrid(InProcessGrid(tsclient.app, 4), task), codec.to_record(start),
                                num_rounds=3, extra_metrics=keep(models)), models  # fmt: skip
    (avg, avg_models), (_, prox_models) = runs["fedavg"], runs["fedprox"]
    for a, b in zip(avg_models, prox_models, strict=True):
        for k in a:
            assert a[k].dtype == b[k].dtype == np.float64
            np.testing.assert_array_equal(a[k], b[k])
    x = start
    for rnd, got in enumerate(avg_models, 1):
        want = weighted_mean({p: _sgd64(task, p, rnd, x) for p in range(4)}, n)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-13, atol=1e-15, err_msg=f"round {rnd}: {k}")
        x = got
    per_value = sum(v.size for v in start.values())
    assert avg.history.rounds[0].bytes_up >= 4 * 8 * per_value  # float64 uploads, not float32


# ---- 200 clients ----------------------------------------------------------------------------------------------------
def test_two_hundred_clients_of_a_tiny_model_sampled_by_half_are_the_weighted_mean_of_the_sampled_clients():
    """200 clients (10 examples each, logistic regression of 3 features), Flower's FedAvg sampling half of them each
    round, two rounds: 100 distinct clients train each round, and the model is the examples-weighted mean of exactly
    those clients' SGD replayed from the round's model."""
    task = Task(dataset="blobs", num_samples=2000, num_features=3, num_classes=2, num_clients=200, local_steps=1,
                batch_size=4, lr=0.1, seed=3)  # fmt: skip
    models: list = []
    res = simulate(FedAvg(**(EVERYONE | dict(fraction_train=0.5))), task, rounds=2, evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    sampled = []
    for rnd, r in enumerate(res.history.rounds, 1):
        trained = sorted(int(p) for p in r.client_train)
        assert r.num_selected == r.num_aggregated == len(trained) == 100 and not r.excluded
        sampled.append(set(trained))
        ups = {p: client_model(task, p, rnd, x)[0] for p in trained}
        near(models[rnd - 1], weighted_mean(ups, {p: task.num_train(p) for p in trained}), ulps=8)
        x = models[rnd - 1]
    assert sampled[0] != sampled[1]  # each round samples afresh


# ---- FedYogi beside a NaN client -------------------------------------------------------------------------------------
def test_fedyogi_beside_a_client_sending_nan_every_round_is_yogis_rule_over_the_others_by_hand():
    """Client 2 sends a NaN in its model every round. Under FedYogi it is left out each round naming it, never
    averaged in: the model is Yogi's rule (v - (1 - b2) d^2 sign(v - d^2), x + eta m / (sqrt(v) + tau)) over the
    examples-weighted mean of the other three clients' replayed SGD, three rounds; no round skipped, all finite."""
    task = _task(partitioner="quantity", quantity_sigma=0.5, faults=((2, "nan"),))
    opts = dict(eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    models: list = []
    res = run_rounds(FedYogi(**opts, **EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 4), task),
                     initial_arrays(task), num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    server = ServerOptimizer("yogi", **{k: v for k, v in opts.items() if k != "eta_l"})
    x = np_(initial_arrays(task))
    honest = (0, 1, 3)
    for rnd, r in enumerate(res.history.rounds, 1):
        assert set(r.excluded) == {"2"} and "non-finite" in r.excluded["2"], r.excluded
        assert r.num_aggregated == 3 and not r.skipped
        mean = weighted_mean({p: client_model(task, p, rnd, x)[0] for p in honest},
                             {p: task.num_train(p) for p in honest})  # fmt: skip
        want = server.step(x, mean, rnd)
        near(models[rnd - 1], want, ulps=64)
        assert all(np.all(np.isfinite(v)) for v in models[rnd - 1].values())
        x = models[rnd - 1]


# ---- a round in which every client fails ---------------------------------------------------------------------------
def _scaffold_script(fail_round: int):
    def script(pid, rnd, got, context, config):
        if rnd == fail_round:
            raise RuntimeError(f"client {pid} lost its data in round {rnd}")
        x = got["arrays"]
        model = {k: (v + 0.01 * update(pid, rnd, v.shape, np.float32)).astype(np.float32) for k, v in x.items()}
        dc = {DC + k: update(pid + 10, rnd, v.shape, np.float32) for k, v in x.items()}
        return model | dc, {"num-examples": 2 * pid + 1}

    return script


def test_a_round_where_every_client_fails_under_scaffold_keeps_model_and_control_variate_and_round_3_is_the_rule():
    """Three scripted SCAFFOLD clients (1, 3 and 5 examples); every one raises in round 2. Round 2 aggregates nothing
    and says why, each client named with its error; the model and the server's c stay round 1's; round 3 is
    SCAFFOLD's rule (global_lr 0.5) from round 1's model and c, written out in float64."""
    task = _task(num_clients=3)
    g = 0.5
    strategy = Scaffold(global_lr=g, **EVERYONE)
    models, cs = [], []

    def hook(s, arrays, rnd):
        models.append(np_(arrays))
        cs.append({k: v.copy() for k, v in s.c.items()})
        return {}

    res = run_rounds(strategy, make_grid(scripted(_scaffold_script(2)), task), initial_arrays(task), num_rounds=3,
                     extra_metrics=hook)  # fmt: skip
    r2 = res.history.rounds[1]
    assert r2.num_aggregated == 0 and r2.skipped == "no replies to aggregate", r2.skipped
    assert set(r2.excluded) == {"0", "1", "2"} and all("lost its data in round 2" in v for v in r2.excluded.values())
    for k in models[0]:
        np.testing.assert_array_equal(models[1][k], models[0][k])
        np.testing.assert_array_equal(cs[1][k], cs[0][k])
    x = {k: v.astype(np.float64) for k, v in np_(initial_arrays(task)).items()}
    c = {k: np.zeros_like(v, dtype=np.float32) for k, v in x.items()}
    weights = {p: 2 * p + 1 for p in range(3)}
    for rnd, at in ((1, 0), (3, 2)):
        x32 = {k: v.astype(np.float32) for k, v in x.items()}
        ups = {p: _scaffold_script(2)(p, rnd, {"arrays": x32, SC: c}, None, None)[0] for p in range(3)}
        mean = wmean({p: {k: u[k] for k in x} for p, u in ups.items()}, weights)
        want = {k: (x32[k].astype(np.float64) + g * (mean[k] - x32[k])).astype(np.float32) for k in x}
        c = {k: (c[k] + np.mean([ups[p][DC + k].astype(np.float64) for p in range(3)], axis=0)).astype(np.float32)
             for k in c}  # fmt: skip
        for k in x:
            np.testing.assert_array_equal(models[at][k], want[k], err_msg=f"round {rnd}: {k}")
            np.testing.assert_array_equal(cs[at][k], c[k], err_msg=f"round {rnd}: c {k}")
        x = {k: v.astype(np.float64) for k, v in want.items()}


def test_fedadam_resumed_after_a_round_where_every_client_failed_equals_the_uninterrupted_run(tmp_path):
    """Every client crashes in round 2 (task faults on all four, round 2 only, by a scripted wrapper of tilestack's
    ClientApp); FedAdam's moments pass the empty round untouched. A run stopped after round 2 (its checkpoint holding
    the empty round) and resumed to round 4 has the uninterrupted run's model and history bit for bit, and round 3
    is Flower's Adam rule from round 1's moments (``ServerOptimizer``, bias correction at server_round 3)."""
    task = _task()

    def app_failing_round_2() -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(msg: Message, context) -> Message:
            if int(msg.content["config"]["server-round"]) == 2:
                raise RuntimeError("the data store is down")
            return tsclient.app(msg, context)

        @app.query()
        def query(msg: Message, context) -> Message:
            return tsclient.app(msg, context)

        return app

    opts = dict(eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)

    def run(**kw):
        models: list = []
        res = run_rounds(FedAdam(**opts, **EVERYONE), ManagedGrid(InProcessGrid(app_failing_round_2(), 4), task),
                         initial_arrays(task), num_rounds=4, extra_metrics=keep(models), **kw)  # fmt: skip
        return res, models

    whole, models = run()
    ckpt = tmp_path / "run.ckpt"
    first, _ = run(checkpoint=ckpt, stop_after=2)
    assert [r.num_aggregated for r in first.history.rounds] == [4, 0]
    resumed, _ = run(checkpoint=ckpt)
    assert [r.num_aggregated for r in whole.history.rounds] == [4, 0, 4, 4]
    assert whole.history.rounds[1].skipped == "no replies to aggregate"
    for k, v in np_(whole.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v)
    assert [r.train_metrics for r in resumed.history.rounds] == [r.train_metrics for r in whole.history.rounds]
    server = ServerOptimizer("adam", **{k: v for k, v in opts.items() if k != "eta_l"})
    n = {p: task.num_train(p) for p in range(4)}
    x = np_(initial_arrays(task))
    for rnd in (1, 3, 4):
        mean = weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(4)}, n)
        near(models[rnd - 1], server.step(x, mean, rnd), ulps=64)
        x = models[rnd - 1]
    for k in x:
        np.testing.assert_array_equal(models[1][k], models[0][k])


# ---- example counts whose sum passes int64 --------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [(2**62, 2**62, 2**62), (2**63 - 1, 2**63 - 1, 1), (2**62, 3 * 2**60, 2**61)])
def test_example_counts_whose_sum_passes_int64_weigh_each_client_by_its_share(counts):
    """Three scripted clients claim example counts whose sum passes int64 (and each at most int64's largest): the model
    is the count-weighted mean of their models by hand, in exact rational weights rounded once to float64 and the
    model's float32, no wrap-around to negative weights, nothing left out."""
    task = _task(num_clients=3)

    def script(pid, rnd, got, context, config):
        moved = {k: (v + (pid + 1) * 0.5).astype(np.float32) for k, v in got["arrays"].items()}
        return moved, {"num-examples": counts[pid]}

    assert sum(counts) > 2**63 - 1
    res = run_rounds(FedAvg(**EVERYONE), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert r.num_aggregated == 3 and not r.excluded and not r.skipped
    x = np_(initial_arrays(task))
    total = sum(counts)
    for k, v in np_(res.arrays).items():
        want = sum((x[k].astype(np.float64) + (p + 1) * 0.5) * (counts[p] / total) for p in range(3))
        np.testing.assert_allclose(v, want.astype(np.float32), rtol=2 * 2**-23, err_msg=k)
    assert [r.client_train[str(p)]["num-examples"] for p in range(3)] == list(counts)
    assert math.isfinite(sum(float(c) for c in counts))
    assert isinstance(res.arrays, ArrayRecord)


# ---- FedNova beside a reply that claims no steps ---------------------------------------------------------------------
def test_fednova_leaves_out_a_reply_of_zero_steps_by_name_and_is_its_rule_over_the_others_by_hand():
    """Found here: client 0 replies with a model it moved but reports ``num-steps`` 0 (FedNova divides its update by
    it). FedNova dropped the reply inside its aggregation without a word: the round said 3 clients aggregated, none left
    out. The grid leaves it out now naming num-steps, and the model is FedNova's rule (p_i = n_i / n, tau_eff =
    sum p_i tau_i, x - tau_eff sum p_i (x - y_i) / tau_i) over clients 1 and 2, by hand."""
    from _fl_round16 import fednova

    from tilestack.federated.strategies import FedNova

    task = _task(num_clients=3, local_steps=5)  # (the most steps a client may claim: the work the server asks)
    steps, sizes = {0: 0, 1: 2, 2: 5}, {0: 4, 1: 3, 2: 7}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        moved = {k: (v + 0.01 * update(pid, rnd, v.shape, np.float32)).astype(np.float32) for k, v in x.items()}
        return moved, {"num-examples": sizes[pid], "num-steps": steps[pid]}

    res = run_rounds(FedNova(**EVERYONE), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert set(r.excluded) == {"0"} and "num-steps=0" in r.excluded["0"], r.excluded
    assert r.num_aggregated == 2 and not r.skipped
    x = np_(initial_arrays(task))
    ups = {p: script(p, 1, {"arrays": x}, None, None)[0] for p in (1, 2)}
    want = fednova(x, ups, {p: sizes[p] for p in (1, 2)}, {p: steps[p] for p in (1, 2)})
    near(np_(res.arrays), want, ulps=4)


def test_fednova_over_replies_without_their_steps_leaves_each_out_naming_num_steps():
    """A ClientApp of one's own that reports its examples but not ``num-steps`` (as Flower's quickstart apps do):
    under FedNova every reply is left out naming the missing metric, and the round keeps the model saying no reply was
    left to aggregate (it said FedNova returned no model from 3 replies, each counted as aggregated)."""
    from flwr.app import MetricRecord, RecordDict

    from tilestack.federated.strategies import FedNova

    task = _task(num_clients=3)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = {k: v + 0.5 for k, v in codec.to_numpy(msg.content["arrays"]).items()}
        metrics = MetricRecord({"num-examples": 5, tsclient.UNIT_WEIGHT: 1, tsclient.PARTITION_METRIC: pid})
        return Message(RecordDict({"arrays": codec.to_record(arrays), "metrics": metrics}), reply_to=msg)

    res = run_rounds(FedNova(**EVERYONE), make_grid(app, task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert set(r.excluded) == {"0", "1", "2"} and all("no 'num-steps'" in v for v in r.excluded.values()), r.excluded
    assert r.num_aggregated == 0 and r.skipped == "no replies to aggregate"
    for k, v in np_(initial_arrays(task)).items():
        np.testing.assert_array_equal(np_(res.arrays)[k], v)


# ---- IFCA beside a reply naming no cluster ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [7, -1, 0.5, 2])
def test_ifca_leaves_out_a_reply_whose_cluster_id_names_no_cluster_model_and_each_cluster_is_its_members_mean(bad):
    """Found here: under IFCA (two cluster models) a reply with ``cluster-id`` 7 joined no cluster's mean and was
    dropped without a word, the round counting it as aggregated. It is left out naming the id and the clusters; each
    cluster model is the examples-weighted mean of the replies that named it, by hand (clients 0 and 3 train cluster
    0, client 1 cluster 1; client 2 names ``bad``)."""
    from tilestack.federated.client import CLUSTER_SEP
    from tilestack.federated.strategies import IFCA

    task = _task()
    strategy = IFCA(num_clusters=2, reseed_after=0, **EVERYONE)
    start = strategy.initial_arrays(task)
    chosen = {0: 0, 1: 1, 2: bad, 3: 0}

    def script(pid, rnd, got, context, config):
        j = chosen[pid] if chosen[pid] in (0, 1) else 0
        model = {k.partition(CLUSTER_SEP)[2]: (v + 0.25 * (pid + 1)).astype(np.float32)
                 for k, v in got["arrays"].items() if k.startswith(f"cluster{j}{CLUSTER_SEP}")}  # fmt: skip
        return model, {"num-examples": pid + 1, "cluster-id": chosen[pid]}

    res = run_rounds(strategy, make_grid(scripted(script), task), start, num_rounds=1)
    r = res.history.rounds[0]
    assert set(r.excluded) == {"2"} and f"cluster-id={bad!r}" in r.excluded["2"] and "0..1" in r.excluded["2"]
    assert r.num_aggregated == 3 and not r.skipped
    x = np_(start)
    for j, members in ((0, (0, 3)), (1, (1,))):
        mine = {k.partition(CLUSTER_SEP)[2]: v for k, v in x.items() if k.startswith(f"cluster{j}{CLUSTER_SEP}")}
        want = wmean(
            {p: {k: v + 0.25 * (p + 1) for k, v in mine.items()} for p in members}, {p: p + 1 for p in members}
        )
        got = {k.partition(CLUSTER_SEP)[2]: v for k, v in np_(res.arrays).items() if k.startswith(f"cluster{j}")}
        near(got, want)
    assert 2 not in strategy.assignments


# ---- a reply that names another client's partition -------------------------------------------------------------------
def test_a_reply_naming_another_clients_partition_is_left_out_and_ifca_files_no_client_under_it():
    """Found here: client 2's reply said its partition (``tilestack.partition``) was 0. IFCA (as CFL and Oort) files
    each reply under the partition it names: client 2's cluster choice was recorded as client 0's, without a word. The
    grid leaves out a reply naming another partition than its node's, in training and in evaluation, saying so; IFCA's
    clusters are the other clients' means by hand and no assignment comes from the reply."""
    from tilestack.federated.client import CLUSTER_SEP, PARTITION_METRIC
    from tilestack.federated.strategies import IFCA

    task = _task(num_clients=3)
    strategy = IFCA(num_clusters=2, reseed_after=0, **(EVERYONE | dict(fraction_evaluate=1.0)))
    start = strategy.initial_arrays(task)
    chosen = {0: 0, 1: 1, 2: 1}

    def script(pid, rnd, got, context, config):
        j = chosen[pid]
        model = {k.partition(CLUSTER_SEP)[2]: (v + 0.25 * (pid + 1)).astype(np.float32)
                 for k, v in got["arrays"].items() if k.startswith(f"cluster{j}{CLUSTER_SEP}")}  # fmt: skip
        return model, {"num-examples": pid + 1, "cluster-id": j} | ({PARTITION_METRIC: 0} if pid == 2 else {})

    def evaluate_fn(pid, rnd):
        return {"num-examples": 1, "eval-acc": 0.5, "eval-loss": 1.0, PARTITION_METRIC: 0 if pid == 2 else pid}

    res = run_rounds(strategy, make_grid(scripted(script, evaluate_fn), task), start, num_rounds=1)
    r = res.history.rounds[0]
    assert set(r.excluded) == {"2"} and f"{PARTITION_METRIC}=0, from the node of partition 2" in r.excluded["2"]
    assert set(r.eval_excluded) == {"2"} and "in evaluation" in r.excluded["2"]
    assert r.num_aggregated == 2 and strategy.assignments == {0: 0, 1: 1}
    x = np_(start)
    for j, p in ((0, 0), (1, 1)):
        mine = {k.partition(CLUSTER_SEP)[2]: v for k, v in x.items() if k.startswith(f"cluster{j}{CLUSTER_SEP}")}
        got = {k.partition(CLUSTER_SEP)[2]: v for k, v in np_(res.arrays).items() if k.startswith(f"cluster{j}")}
        near(got, {k: v.astype(np.float64) + 0.25 * (p + 1) for k, v in mine.items()})


# ---- Oort over a ClientApp that does not report its partition ------------------------------------------------------
def test_oort_files_each_reply_of_a_clientapp_without_partition_ids_under_its_own_client():
    """Found here: a ClientApp that reports its examples and loss but not tilestack's partition id (as Flower's own apps
    do): Oort filed every reply under partition 0 (``metric(m, PARTITION_METRIC)`` defaulting to 0), each picked
    client's utility written over the last, and the others never counted as tried. Each reply is filed under the
    partition of the node that sent it: after round 1 the utility of exactly the clients picked is n x loss, by hand;
    the inner FedAvg's model is their weighted mean."""
    from flwr.app import MetricRecord, RecordDict

    from tilestack.federated import SystemModel
    from tilestack.federated.strategies import OortSelector, Selected

    task = _task()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = {k: v + 0.5 * (pid + 1) for k, v in codec.to_numpy(msg.content["arrays"]).items()}
        metrics = MetricRecord({"num-examples": pid + 1, "train-loss": 0.25 * (pid + 1)})
        return Message(RecordDict({"arrays": codec.to_record(arrays), "metrics": metrics}), reply_to=msg)

    selector = OortSelector(SystemModel(4, seed=2), seed=1)
    res = run_rounds(Selected(FedAvg(**EVERYONE), selector, 3), make_grid(app, task), initial_arrays(task),
                     num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    picked = sorted(int(p) for p in r.client_train)
    assert len(picked) == 3 and r.num_aggregated == 3 and not r.excluded
    assert selector.utility == {p: (p + 1) * 0.25 * (p + 1) for p in picked}, (selector.utility, picked)
    assert selector.last_round == {p: 1 for p in picked}
    x = np_(initial_arrays(task))
    near(np_(res.arrays), wmean({p: {k: v + 0.5 * (p + 1) for k, v in x.items()} for p in picked},
                                {p: p + 1 for p in picked}))  # fmt: skip


def test_cfl_files_each_reply_of_a_clientapp_without_partition_ids_under_its_own_client():
    """The same for CFL: every reply of a ClientApp without tilestack's partition id was taken for partition 0's (one
    membership for all clients). Each is filed under the node that sent it: after a round every client is a member of
    cluster 0, and its model is the examples-weighted mean of all four, by hand."""
    from flwr.app import MetricRecord, RecordDict

    from tilestack.federated.client import CLUSTER_SEP
    from tilestack.federated.strategies import CFL

    task = _task()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = {k: v + 0.5 * (pid + 1) for k, v in codec.to_numpy(msg.content["arrays"]).items()}
        metrics = MetricRecord({"num-examples": pid + 1, "train-loss": 0.25})
        return Message(RecordDict({"arrays": codec.to_record(arrays), "metrics": metrics}), reply_to=msg)

    strategy = CFL(**EVERYONE)
    start = strategy.initial_arrays(task)
    res = run_rounds(strategy, make_grid(app, task), start, num_rounds=1)
    r = res.history.rounds[0]
    assert r.num_aggregated == 4 and not r.excluded
    assert strategy.assignments == {0: 0, 1: 0, 2: 0, 3: 0}, strategy.assignments
    x = {k.partition(CLUSTER_SEP)[2]: v for k, v in np_(start).items()}
    got = {k.partition(CLUSTER_SEP)[2]: v for k, v in np_(res.arrays).items() if k.startswith("cluster0")}
    near(got, wmean({p: {k: v + 0.5 * (p + 1) for k, v in x.items()} for p in range(4)}, {p: p + 1 for p in range(4)}))


def test_ifca_records_the_cluster_choice_of_a_clientapp_without_partition_ids_under_each_client():
    """And IFCA: a ClientApp reporting its cluster-id but not tilestack's partition id had every choice recorded as
    partition 0's ({0: the last reply's cluster}). Each choice is recorded under the node that sent it, and each
    cluster model is its members' weighted mean, by hand."""
    from flwr.app import MetricRecord, RecordDict

    from tilestack.federated.client import CLUSTER_SEP
    from tilestack.federated.strategies import IFCA

    task = _task()
    chosen = {0: 1, 1: 0, 2: 1, 3: 0}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        j = chosen[pid]
        got = codec.to_numpy(msg.content["arrays"])
        model = {k.partition(CLUSTER_SEP)[2]: v + 0.5 * (pid + 1) for k, v in got.items()
                 if k.startswith(f"cluster{j}{CLUSTER_SEP}")}  # fmt: skip
        metrics = MetricRecord({"num-examples": pid + 1, "cluster-id": j})
        return Message(RecordDict({"arrays": codec.to_record(model), "metrics": metrics}), reply_to=msg)

    strategy = IFCA(num_clusters=2, reseed_after=0, **EVERYONE)
    start = strategy.initial_arrays(task)
    res = run_rounds(strategy, make_grid(app, task), start, num_rounds=1)
    assert res.history.rounds[0].num_aggregated == 4 and strategy.assignments == chosen, strategy.assignments
    x = np_(start)
    for j in (0, 1):
        members = [p for p, c in chosen.items() if c == j]
        mine = {k.partition(CLUSTER_SEP)[2]: v for k, v in x.items() if k.startswith(f"cluster{j}{CLUSTER_SEP}")}
        want = wmean({p: {k: v + 0.5 * (p + 1) for k, v in mine.items()} for p in members}, {p: p + 1 for p in members})
        got = {k.partition(CLUSTER_SEP)[2]: v for k, v in np_(res.arrays).items() if k.startswith(f"cluster{j}")}
        near(got, want)
