"""Federated scenarios, round 23 (2 of 2): HeteroFL's overlapping slices with batch norm, evaluation-only rounds under
quantity skew, client-side DP clipping with the noise off and a bound at its edge, a run with a client failing every
other round and stragglers resumed from its checkpoint, Dirichlet splits so skewed that no draw fills them, the
aggregated training metrics, and ``tilestack fl run`` with one client and with fifty.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` under ``ManagedGrid`` (``run_rounds``), or
``simulate`` and the CLI; Flower 1.41's FedAvg, FedYogi and DifferentialPrivacyClientSideFixedClipping, tilestack's
HeteroFL. References independent of the code under test: each client's local SGD replayed on its seeded minibatches
(``_fl_round7.client_model``), the softmax cross-entropy and the server rules in float64.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round16 import ServerOptimizer
from _fl_round18 import EVERYONE
from _fl_round19 import clip_update, failing_app
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedYogi
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app as cli_app
from tilestack.federated import (
    InProcessGrid,
    ManagedGrid,
    SystemModel,
    Task,
    codec,
    initial_arrays,
    run_rounds,
    simulate,
)
from tilestack.federated import client as tsclient
from tilestack.federated.strategies import HeteroFL

pytestmark = pytest.mark.timeout(120)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=2,
                batch_size=8, lr=0.1, seed=6, partitioner="quantity", quantity_sigma=0.8)  # fmt: skip
    return Task(**(base | kw))


def _grid(task: Task, app=tsclient.app, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(app, task.num_clients), task, **kw)


def _pids(metrics) -> list[int]:
    return sorted(int(p) for p in metrics.client_train)


# ---- HeteroFL: overlapping slices, batch norm included ---------------------------------------------------------------
WIDTHS = (1.0, 0.5, 0.25, 0.75)
HIDDEN = 4


def _slice(params: dict[str, np.ndarray], keep_units: int) -> dict[str, np.ndarray]:
    """The first ``keep_units`` hidden units of tilestack's MLP (with batch norm), written out by name."""
    h = slice(0, keep_units)
    every = slice(None)
    cuts = {"fc1.weight": (every, h), "fc1.bias": (h,), "fc2.weight": (h, every), "fc2.bias": (every,),
            "bn.weight": (h,), "bn.bias": (h,), "bn.running_mean": (h,), "bn.running_var": (h,)}  # fmt: skip
    return {k: v[cuts[k]] for k, v in params.items()}


@pytest.mark.parametrize("norm", [False, True])
def test_heterofl_averages_each_element_over_the_clients_whose_slice_holds_it(norm):
    """Widths 1, 1/2, 1/4, 3/4 of four hidden units: unit 0 is held by all four clients, unit 1 by three, unit 2 by
    two, unit 3 by client 0 alone; fc2.bias by everyone. Each element of the new model is the examples-weighted mean
    of the replayed uploads of the clients that hold it (batch norm's weights and running statistics too)."""
    task = _task(model="mlp", hidden=HIDDEN, norm=norm)
    strategy = HeteroFL(width_of=WIDTHS.__getitem__, hidden=HIDDEN, **EVERYONE)
    models: list = []
    res = run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    if norm:
        assert {"bn.running_mean", "bn.running_var", "bn.weight"} <= x.keys()
    sizes = {p: task.num_train(p) for p in range(4)}
    units = {p: max(1, round(WIDTHS[p] * HIDDEN)) for p in range(4)}
    for rnd, m in enumerate(res.history.rounds, 1):
        assert m.num_aggregated == 4 and m.excluded == {}
        ups = {p: client_model(task, p, rnd, _slice(x, units[p]))[0] for p in range(4)}
        for p in range(4):
            assert ups[p]["fc1.weight"].shape == (3, units[p])
        want = {}
        for k, v in x.items():
            total, weight = np.zeros(v.shape), np.zeros(v.shape)
            for p, up in ups.items():
                region = tuple(slice(0, n) for n in up[k].shape)
                total[region] += sizes[p] * up[k].astype(np.float64)
                weight[region] += sizes[p]
            want[k] = total / weight  # every element is held by client 0 (width 1)
        near(models[rnd - 1], want, ulps=4)
        # unit 3 is client 0's alone: its column is client 0's upload exactly
        np.testing.assert_array_equal(models[rnd - 1]["fc1.weight"][:, 3], ups[0]["fc1.weight"][:, 3])
        x = models[rnd - 1]


# ---- evaluation-only rounds under quantity skew ----------------------------------------------------------------------
def _xent_acc(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    z = x.astype(np.float64) @ params["fc.weight"].astype(np.float64) + params["fc.bias"].astype(np.float64)  # (N, C)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((z.argmax(axis=1) == y).mean())


def test_evaluation_only_rounds_score_each_client_and_weight_the_mean_by_test_examples():
    """fraction_train 0, fraction_evaluate 1 from a random model: no round trains (the model stays bit for bit), and
    each round's evaluation metrics are the per-client cross-entropy and accuracy on each test split, computed here in
    float64, their mean weighted by each client's test examples (quantity skew: far apart); client_acc is the
    distribution of the per-client accuracies."""
    task = _task(num_clients=5, num_samples=300, quantity_sigma=1.5)
    rng = np.random.default_rng(3)
    start = {k: rng.normal(0, 1.0, v.shape).astype(np.float32) for k, v in task.initial_params().items()}
    strategy = FedAvg(fraction_train=0.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                      min_evaluate_nodes=1)  # fmt: skip
    res = simulate(strategy, task, rounds=2, initial=codec.to_record(start), evaluate=False)
    for k, v in np_(res.arrays).items():
        np.testing.assert_array_equal(v, start[k])
    scores, tests = {}, {}
    for p in range(5):
        _, _, xt, yt = task.client_data(p)
        scores[p], tests[p] = _xent_acc(start, xt, yt), len(yt)
    assert max(tests.values()) >= 4 * min(tests.values()), tests
    total = sum(tests.values())
    for m in res.history.rounds:
        assert m.num_aggregated == 0 and m.skipped == "no clients were sampled for training"
        assert sorted(int(p) for p in m.client_eval) == list(range(5))
        for p in range(5):
            ce = m.client_eval[str(p)]
            assert ce["num-examples"] == tests[p]
            assert ce["eval-loss"] == pytest.approx(scores[p][0], rel=1e-5)
            assert ce["eval-acc"] == pytest.approx(scores[p][1], abs=1e-12)
        assert m.eval_metrics["eval-loss"] == pytest.approx(sum(tests[p] * scores[p][0] for p in tests) / total, 1e-5)
        assert m.eval_metrics["eval-acc"] == pytest.approx(sum(tests[p] * scores[p][1] for p in tests) / total, 1e-9)
        assert m.client_acc["worst"] == pytest.approx(min(s[1] for s in scores.values()))


def test_the_aggregated_training_metrics_are_the_examples_weighted_means_of_the_clients_own():
    """``train_metrics`` (Flower's aggregation) against ``client_train`` (each reply's own): train-loss and num-steps
    weighted by each client's training examples, under quantity skew and local epochs."""
    task = _task(num_clients=5, num_samples=300, quantity_sigma=1.5, local_steps=None, local_epochs=1.0)
    res = simulate(FedAvg(**EVERYONE), task, rounds=2, evaluate=False)
    for m in res.history.rounds:
        n = {p: float(c["num-examples"]) for p, c in m.client_train.items()}
        assert {int(p): int(v) for p, v in n.items()} == {p: task.num_train(p) for p in range(5)}
        for key in ("train-loss", "num-steps"):
            want = sum(n[p] * float(c[key]) for p, c in m.client_train.items()) / sum(n.values())
            assert m.train_metrics[key] == pytest.approx(want, rel=1e-9), key


# ---- client-side DP clipping, noise off ------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [1e-6, 0.05, 1e6])
def test_client_side_fixed_clipping_with_no_noise_is_the_mean_of_the_clipped_updates(clip):
    """Flower's client-side fixed clipping with noise multiplier 0 over FedAvg weighted by ``unit-weight``: each client
    clips its own update to ``clip`` (a bound far below any update, a middle one, one above all: no clipping), and the
    new model is the plain mean of the clipped models, written out here."""
    task = _task()
    inner = FedAvg(**EVERYONE, weighted_by_key=tsclient.UNIT_WEIGHT)
    strategy = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clip,
                                                          num_sampled_clients=4)  # fmt: skip
    models: list = []
    res = run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(res.history.rounds, 1):
        assert m.num_aggregated == 4 and m.excluded == {}
        ups = {p: clip_update(x, client_model(task, p, rnd, x)[0], clip) for p in range(4)}
        want = weighted_mean(ups, dict.fromkeys(range(4), 1.0))
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=1e-5, atol=max(1e-7, 1e-5 * clip),
                                       err_msg=(clip, rnd, k))  # fmt: skip
        moved = np.sqrt(sum(float(np.sum((models[rnd - 1][k].astype(np.float64) - x[k]) ** 2)) for k in x))
        assert moved <= clip * (1 + 1e-4) + 1e-6
        x = models[rnd - 1]


# ---- resume a run with a flaky client and stragglers -----------------------------------------------------------------
def test_a_run_with_a_client_failing_every_other_round_and_stragglers_resumes_to_the_uninterrupted_run(tmp_path):
    """FedYogi over five clients of skewed sizes, client 3 raising after training in rounds 1 and 3, a deadline that
    cuts the slow ones (partial work): stopped after round 2 and resumed from the checkpoint, the run ends where the
    uninterrupted one does, bit for bit, with the same clients left out for the same reasons; and its model is the
    Yogi step over the kept partial uploads, written out."""
    task = _task(num_clients=5, num_samples=300, local_steps=6)
    system = SystemModel(5, speeds=np.array([1.0, 3.0, 100.0, 100.0, 2.5]), bandwidths=np.full(5, 1e9), deadline=2.0)
    fails = {(3, 1), (3, 3)}

    def run(**kw):
        models: list = []
        strategy = FedYogi(eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, **EVERYONE)
        res = run_rounds(strategy, _grid(task, failing_app(fails), system=system), initial_arrays(task),
                         num_rounds=4, extra_metrics=keep(models), **kw)  # fmt: skip
        return res, models

    whole, models = run()
    ckpt = tmp_path / "run.ckpt"
    first, _ = run(checkpoint=ckpt, stop_after=2)
    assert len(first.history.rounds) == 2
    resumed, _ = run(checkpoint=ckpt)
    assert [m.round for m in resumed.history.rounds] == [1, 2, 3, 4]
    for k, v in np_(whole.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v, err_msg=k)
    for a, b in zip(whole.history.rounds, resumed.history.rounds, strict=True):
        assert (a.excluded, a.client_train, a.steps_done) == (b.excluded, b.client_train, b.steps_done)
    opt = ServerOptimizer("yogi", eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(whole.history.rounds, 1):
        kept = [0, 1, 2, 4] if rnd % 2 else [0, 1, 2, 3, 4]
        assert _pids(m) == kept and ("3" in m.excluded) == bool(rnd % 2)
        steps = {int(p): int(c["num-steps"]) for p, c in m.client_train.items()}
        assert steps[0] < 6 and steps[2] == 6, steps
        ups = {p: client_model(task, p, rnd, x, work=steps[p] / 6)[0] for p in kept}
        want = opt.step(x, weighted_mean(ups, {p: task.num_train(p) for p in kept}), rnd)
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=2e-5, atol=1e-6, err_msg=(rnd, k))
        x = models[rnd - 1]


# ---- Dirichlet splits no draw can fill -------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, clients", [(1e-3, 12), (0.01, 30), (1e-6, 7)])
def test_a_dirichlet_split_with_tiny_alpha_gives_every_client_examples_and_loses_none(alpha, clients):
    """With alpha this small most clients draw no example of any class; the split is topped up so that each client
    has at least one example to train on and one to test, every example is in exactly one client, and the skew stays:
    most clients hold only the few examples they were topped up with, a handful hold the classes."""
    task = Task(dataset="blobs", num_samples=400, num_features=3, num_classes=4, num_clients=clients,
                partitioner="dirichlet", partition_alpha=alpha, seed=1, local_steps=1)  # fmt: skip
    rows, sizes = [], []
    for p in range(clients):
        x, y, xt, yt = task.client_data(p)
        assert len(y) >= 1 and len(yt) >= 1, (p, len(y), len(yt))
        rows.append(np.concatenate([x, xt]))
        sizes.append(len(y) + len(yt))
    pooled = np.concatenate(rows)
    assert len(pooled) == 400
    assert len(np.unique(pooled, axis=0)) == 400  # no example twice
    assert np.median(sizes) <= 3 and sum(n >= 30 for n in sizes) <= 6, sizes
    res = simulate(FedAvg(**EVERYONE), task, rounds=1, evaluate=False)
    assert res.history.rounds[0].num_aggregated == clients


# ---- the CLI: one client, fifty --------------------------------------------------------------------------------------
def _fl_run(tmp_path, *extra: str):
    out = tmp_path / "run.json"
    res = CliRunner().invoke(cli_app, ["fl", "run", "--dataset", "blobs", "--rounds", "2", "--local-steps", "1",
                                       "--out", str(out), *extra], env={"COLUMNS": "400"})  # fmt: skip
    return res, out


@pytest.mark.parametrize("extra, clients", [
    (["--clients", "1", "--per-round", "1"], 1),
    (["--clients", "1", "--per-round", "1", "--strategy", "fedadam", "--eval-fraction", "1"], 1),
    (["--clients", "50", "--per-round", "50", "--partitioner", "quantity"], 50),
    (["--clients", "50", "--per-round", "7", "--strategy", "fedprox", "--mu", "0.5", "--seed", "3"], 7),
])  # fmt: skip
def test_fl_run_with_one_client_and_with_fifty(tmp_path, extra, clients):
    res, out = _fl_run(tmp_path, *extra)
    assert res.exit_code == 0, (res.output, res.exception)
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["num_aggregated"] for r in rounds] == [clients, clients]
    assert all(r["excluded"] == {} and np.isfinite(r["test_acc"]) for r in rounds)


def test_fl_run_one_client_asked_for_two_per_round_is_refused_naming_per_round(tmp_path):
    res, out = _fl_run(tmp_path, "--clients", "1", "--per-round", "2")
    text = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "--per-round" in text and "per_round=2 > clients=1" in text, text
    assert "expected at most --clients 1" in text  # found here: the message said what was wrong, not what was expected
    assert not out.exists()


# ---- partial participation no availability pattern can meet ---------------------------------------------------------
PATTERN = np.array([[1, 1, 0, 0], [0, 0, 1, 0.5]])  # at most two clients online in any round (one by chance)


@pytest.mark.parametrize("kw, named", [
    (dict(min_train_nodes=3), "min_train_nodes=3"),
    (dict(min_available_nodes=3), "min_available_nodes=3"),
    (dict(min_train_nodes=2, min_available_nodes=4), "min_available_nodes=4"),
])  # fmt: skip
def test_a_strategy_needing_more_nodes_than_the_availability_ever_has_online_is_refused(kw, named):
    """Found here: FedAvg(min_train_nodes=3) over a pattern with at most two clients online ran every round skipped
    ('2 of 4 clients available ...'), a warning a round and nothing trained. Refused before any work, by simulate and by
    run_rounds, naming the setting and the most clients the pattern has online."""
    task = _task()
    settings = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1) | kw
    system = SystemModel(4, availability=PATTERN)
    for call in (lambda: simulate(FedAvg(**settings), task, rounds=2, system=system, evaluate=False),
                 lambda: run_rounds(FedAvg(**settings), _grid(task, system=system), initial_arrays(task),
                                    num_rounds=2)):  # fmt: skip
        with pytest.raises(Exception, match=r"availability has at most 2 of 4 clients online") as info:
            call()
        assert named in str(info.value)


def test_a_strategy_the_availability_can_meet_in_some_round_runs_and_skips_only_the_short_rounds():
    """min_train_nodes=2 over the same pattern: round 1 (clients 0 and 1) trains both; in round 2 client 3 is online by
    chance (0.5) or not, and the round trains clients 2 and 3 or is skipped saying how many were online."""
    task = _task()
    system = SystemModel(4, availability=PATTERN)
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=1), task,
                   rounds=4, system=system, evaluate=False)  # fmt: skip
    r1 = res.history.rounds[0]
    assert _pids(r1) == [0, 1] and r1.skipped == ""
    for m in res.history.rounds[1::2]:
        online = {int(p) for p in np.flatnonzero(system.online(m.round))}
        if online == {2, 3}:
            assert _pids(m) == [2, 3] and m.skipped == ""
        else:
            assert online == {2} and m.num_aggregated == 0 and m.skipped.startswith("1 of 4 clients available")


def test_federated_evaluation_needing_more_nodes_than_the_availability_ever_has_online_is_refused():
    """The same for evaluation: fraction_evaluate 0.5 with min_evaluate_nodes=3 over a pattern with at most two
    clients online skipped every round's evaluation. Refused naming min_evaluate_nodes; with fraction_evaluate 0 (no
    evaluation) the same minimum is not read, and the run goes on."""
    task = _task()
    system = SystemModel(4, availability=PATTERN)
    settings = dict(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=3)
    with pytest.raises(Exception, match=r"min_evaluate_nodes=3.*at most 2 of 4 clients online.*evaluation"):
        simulate(FedAvg(fraction_evaluate=0.5, **settings), task, rounds=1, system=system, evaluate=False)
    res = simulate(FedAvg(fraction_evaluate=0.0, **settings), task, rounds=1, system=system, evaluate=False)
    assert res.history.rounds[0].num_aggregated == 1


# ---- the same run on Flower's Simulation Engine ----------------------------------------------------------------------
def test_fedadam_with_faulty_clients_stragglers_and_dropouts_is_the_same_on_flowers_engine_and_by_hand():
    """FedAdam sampling 3 of 5 clients of skewed sizes, client 1 crashing and client 3 sending NaN whenever sampled,
    a deadline that cuts the slow ones and 20% dropouts, federated evaluation of 2: tilestack's engine and Flower's
    Ray engine give the same rounds bit for bit (who was sampled, left out and why, the model, the evaluation), and
    each round's model is the Adam step over the examples-weighted mean of the kept partial uploads, replayed here."""
    task = _task(num_clients=5, local_steps=3, faults=((1, "crash"), (3, "nan")), seed=3, quantity_sigma=1.0)
    system = SystemModel(5, speeds=np.array([1.0, 2.0, 100.0, 100.0, 3.0]), bandwidths=np.full(5, 1e9), deadline=2.0,
                         dropout=0.2)  # fmt: skip

    def run(engine):
        models: list = []
        strategy = FedAdam(fraction_train=0.6, fraction_evaluate=0.4, min_train_nodes=1, min_available_nodes=5,
                           min_evaluate_nodes=1, eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)  # fmt: skip
        res = simulate(strategy, task, rounds=3, engine=engine, system=system, seed=7, extra_metrics=keep(models))
        return res, models

    ours, models = run("tilestack")
    flower, _ = run("flower")
    for k, v in np_(ours.arrays).items():
        np.testing.assert_array_equal(np_(flower.arrays)[k], v, err_msg=k)
    for a, b in zip(ours.history.rounds, flower.history.rounds, strict=True):
        assert (a.excluded, a.client_train, a.client_eval, a.eval_metrics, a.test_acc) == \
               (b.excluded, b.client_train, b.client_eval, b.eval_metrics, b.test_acc)
    reasons = {why.split(":")[0] for m in ours.history.rounds for why in m.excluded.values()}
    assert {"error", "non-finite"} <= reasons, reasons
    opt = ServerOptimizer("adam", eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(ours.history.rounds, 1):
        assert "1" not in m.client_train and "3" not in m.client_train
        for p, why in m.excluded.items():
            fault = {"1": "error: RuntimeError", "3": "non-finite: fc.weight"}.get(p)
            assert why == "dropout" or (fault is not None and why.startswith(fault)), (p, why)
        kept = _pids(m)
        if not kept:
            assert m.skipped and all(np.array_equal(models[rnd - 1][k], x[k]) for k in x)
            continue
        steps = {int(p): int(c["num-steps"]) for p, c in m.client_train.items()}
        ups = {p: client_model(task, p, rnd, x, work=steps[p] / 3)[0] for p in kept}
        assert {p: client_model(task, p, rnd, x, work=steps[p] / 3)[1] for p in kept} == steps
        want = opt.step(x, weighted_mean(ups, {p: task.num_train(p) for p in kept}), rnd)
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=2e-5, atol=1e-6, err_msg=(rnd, k))
        x = models[rnd - 1]


# ---- a run that crashed inside a round, resumed ----------------------------------------------------------------------
def _selected_ditto(system):
    from tilestack.federated.strategies import Ditto, RandomSelector, Selected

    return Selected(Ditto(lam=0.5, **(EVERYONE | dict(fraction_evaluate=1.0))), RandomSelector(2), 3)


def _oort_fednova(system):
    from tilestack.federated.strategies import FedNova, OortSelector, Selected

    return Selected(FedNova(**(EVERYONE | dict(fraction_evaluate=1.0))), OortSelector(system), 3)


@pytest.mark.parametrize("make", [_selected_ditto, _oort_fednova])
def test_a_run_that_crashed_after_round_3_aggregated_resumes_to_the_uninterrupted_run(tmp_path, make):
    """The server crashes in round 3 after its clients trained and the strategy aggregated (a hook raising): the
    checkpoint holds round 2, while the strategy object (Ditto's, Oort's utilities, FedNova's) and the clients'
    personal state have moved on. Resumed with that same strategy object, the run replays round 3 and ends where the
    uninterrupted one does: the model, who trained, who was left out, each client's evaluation."""
    task = _task(num_clients=5, local_steps=3, seed=3)
    system = SystemModel(5, speeds=np.array([1.0, 2.0, 100.0, 100.0, 3.0]), bandwidths=np.full(5, 1e9), deadline=2.0,
                         dropout=0.2)  # fmt: skip
    whole = simulate(make(system), task, rounds=5, system=system, seed=1)
    ckpt = tmp_path / "run.ckpt"

    def crash(strategy, arrays, server_round):
        if server_round == 3:
            raise RuntimeError("the server went down in round 3")
        return {}

    strategy = make(system)
    with pytest.raises(RuntimeError, match="went down in round 3"):
        simulate(strategy, task, rounds=5, system=system, seed=1, checkpoint=ckpt, extra_metrics=crash)
    resumed = simulate(strategy, task, rounds=5, system=system, seed=1, checkpoint=ckpt)
    for k, v in np_(whole.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v, err_msg=k)
    fields = ("excluded", "client_train", "client_eval", "eval_metrics", "test_acc")
    assert [[getattr(m, f) for f in fields] for m in resumed.history.rounds] == \
           [[getattr(m, f) for f in fields] for m in whole.history.rounds]
    assert any(m.excluded for m in whole.history.rounds)  # the dropouts and deadline did something


# ---- server-side DP clipping and SecAgg+ at their edges -----------------------------------------------------------
@pytest.mark.parametrize("clip", [1e-6, 0.05, 1e6])
def test_server_side_fixed_clipping_with_no_noise_is_the_mean_of_the_clipped_updates(clip):
    """Flower's server-side fixed clipping, noise multiplier 0, over FedAvg weighted by ``unit-weight``: the server
    clips each upload's update to ``clip`` (a bound below any update, a middle one, one above all) and the new model is
    the plain mean of the clipped models; with faults a crashed client is left out and the mean is over the rest."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    task = _task(faults=((2, "crash"),))
    inner = FedAvg(**EVERYONE, weighted_by_key=tsclient.UNIT_WEIGHT)
    strategy = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clip,
                                                          num_sampled_clients=4)  # fmt: skip
    models: list = []
    res = run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(res.history.rounds, 1):
        assert _pids(m) == [0, 1, 3] and list(m.excluded) == ["2"]
        ups = {p: clip_update(x, client_model(task, p, rnd, x)[0], clip) for p in (0, 1, 3)}
        want = weighted_mean(ups, dict.fromkeys(ups, 1.0))
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=1e-5, atol=max(1e-7, 1e-5 * clip),
                                       err_msg=(clip, rnd, k))  # fmt: skip
        x = models[rnd - 1]


def test_secure_aggregation_of_two_clients_both_holding_every_share_is_the_plain_average():
    """SecAgg+ at its smallest: two clients, both sampled, each holding the other's share and a threshold of both
    (reconstruction_threshold 1.0): the secure model after two rounds is Flower's plain FedAvg's to quantisation
    precision; a threshold that cannot be met (3 of 2) is refused before any work."""
    from tilestack.federated.secagg import run_plain, run_secure

    task = _task(num_clients=2, num_samples=120)
    secure = run_secure(task, rounds=2, per_round=2, num_shares=1.0, reconstruction_threshold=1.0)
    plain = run_plain(task, rounds=2, per_round=2)
    for k, v in plain.items():
        np.testing.assert_allclose(secure[k], v, atol=1e-4, err_msg=k)
    assert max(float(np.abs(plain[k] - np_(initial_arrays(task))[k]).max()) for k in plain) > 1e-2
    with pytest.raises(ValueError, match="reconstruction_threshold=3"):
        run_secure(task, rounds=1, per_round=2, num_shares=2, reconstruction_threshold=3)


def test_a_trace_without_a_bandwidth_column_is_refused_naming_the_file_the_column_and_the_header_expected(tmp_path):
    """Found here: the refusal named the missing columns but not what was expected."""
    path = tmp_path / "trace.csv"
    path.write_text("client,speed\n0,1.0\n1,2.0\n")
    with pytest.raises(ValueError, match=r"trace\.csv.*lacks columns \['bandwidth'\]; expected a header naming the "
                                         r"columns client,speed,bandwidth"):  # fmt: skip
        SystemModel.from_trace(path)
    path.write_text("client,speed,bandwidth\n0,1.0,1e6\n1,2.0,1e6\n")
    assert SystemModel.from_trace(path).num_clients == 2


# ---- a user's .npz whose arrays no model can train on ----------------------------------------------------------------
_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(60, 3)).astype(np.float32)
_Y = _RNG.integers(0, 3, 60)


@pytest.mark.parametrize("x, y, words", [
    (_X, _RNG.integers(0, 2, (60, 2)), "labels y of shape (60, 2); expected one label per row"),
    (_X, np.array(1), "y of shape (); expected x (N, D) and y (N,)"),
    (np.array(2.0), _Y, "x of shape () and y of shape (60,)"),
    (_X.astype(np.complex64), _Y, "x of dtype complex64; expected real numbers"),
    (_X, _Y.astype(np.complex128), "y of dtype complex128; expected real numbers (class labels"),
    (_X.astype(object), _Y, "Object arrays cannot be loaded"),
    (np.full((60, 3), "a"), _Y, "features that are not numbers"),
])  # fmt: skip
def test_an_npz_whose_arrays_cannot_be_trained_on_is_refused_naming_the_file(tmp_path, x, y, words):
    """Found here: an .npz with y of shape (N, 2) failed inside the partitioner with numpy's broadcast error, a scalar y
    with "len() of unsized object", object arrays with numpy's "allow_pickle=False" (no file named), and complex
    features trained on their real part without a word. Each is refused by the Task, naming data_path and what was
    expected; ``fl run --data`` names the option."""
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(ValueError, match="data_path=") as info:
        Task(dataset="file", data_path=str(path), num_clients=3, local_steps=1)
    assert words in str(info.value), str(info.value)
    res = CliRunner().invoke(cli_app, ["fl", "run", "--data", str(path), "--clients", "3", "--per-round", "3",
                                       "--rounds", "1", "--local-steps", "1"], env={"COLUMNS": "400"})  # fmt: skip
    text = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value for --data" in text and "test accuracy" not in text, text


def test_an_npz_with_a_column_of_labels_images_or_numeric_text_is_taken(tmp_path):
    """What stays taken: y of shape (N, 1), x of images (N, 2, 2) flattened to 4 features, features as numeric text."""
    for x, y, features in ((_X, _Y[:, None], 3), (_RNG.normal(size=(60, 2, 2)), _Y, 4), (_X.astype(str), _Y, 3)):
        path = tmp_path / f"ok{features}{x.dtype.kind}.npz"
        np.savez(path, x=x, y=y)
        task = Task(dataset="file", data_path=str(path), num_clients=3, local_steps=1)
        assert (task.features, task.classes) == (features, 3)
        res = simulate(FedAvg(**EVERYONE), task, rounds=1, evaluate=False)
        assert res.history.rounds[0].num_aggregated == 3


# ---- a user's CSV: a byte-order mark, empty labels, another encoding ------------------------------------------------
_ROWS = [f"{i * 0.1:.1f},{i % 3 * 0.5},{('cat', 'dog')[i % 2]}" for i in range(20)]


def test_a_csv_with_a_byte_order_mark_is_read_as_without_it(tmp_path):
    """Found here: Excel's "CSV UTF-8" starts with a byte-order mark, which made the first value '\\ufeff0.0' and the
    file was refused as having a feature that is not a number. Read as the same file without it, header or not."""
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    for rows in (_ROWS, ["f1,f2,label", *_ROWS]):
        plain.write_text("\n".join(rows), encoding="utf-8")
        marked.write_text("\n".join(rows), encoding="utf-8-sig")
        a = Task(dataset="file", data_path=str(plain), num_clients=2, local_steps=1)
        b = Task(dataset="file", data_path=str(marked), num_clients=2, local_steps=1)
        for p in range(2):
            for u, v in zip(a.client_data(p), b.client_data(p), strict=True):
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("rows, words", [
    (["0.1,0.2,", *_ROWS], "1 data row(s) with an empty last value, the first data row 1"),
    ([*_ROWS[:5], "0.3,0.4, ", *_ROWS[5:]], "the first data row 6"),
    ([r + "," for r in _ROWS], "20 data row(s) with an empty last value"),
])  # fmt: skip
def test_a_csv_row_with_an_empty_label_is_refused_naming_the_row(tmp_path, rows, words):
    """Found here: '0.1,0.2,' made the empty string a class of its own (three classes from cat and dog), and a
    trailing comma on every row was refused as "'cat' is not a number". Refused naming the file and the row."""
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(rows))
    with pytest.raises(ValueError, match=r"expected a class label last in every row") as info:
        Task(dataset="file", data_path=str(path), num_clients=2, local_steps=1)
    assert words in str(info.value) and "mine.csv" in str(info.value)


def test_a_csv_in_another_encoding_is_refused_naming_the_file(tmp_path):
    """Found here: a Latin-1 file ('café' labels) failed with the codec's UnicodeDecodeError, naming no file or
    argument. Refused as not UTF-8; the same text in UTF-8 is read, two classes."""
    names = ("caf\u00e9", "th\u00e9")
    text = "\n".join(f"{i * 0.1:.1f},{i % 3},{names[i % 2]}" for i in range(20))
    path = tmp_path / "latin.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv' is not UTF-8 text .*expected a CSV file in UTF-8"):
        Task(dataset="file", data_path=str(path), num_clients=2, local_steps=1)
    path.write_bytes(text.encode("utf-8"))
    assert Task(dataset="file", data_path=str(path), num_clients=2, local_steps=1).classes == 2


def test_a_data_file_named_in_capitals_is_read_and_one_of_another_kind_is_named_for_its_suffix(tmp_path):
    """Found here: DATA.CSV was refused as neither .npz nor .csv, and a data.txt that exists was refused as "is not a
    file". The suffix is read in any case; another suffix is named as such; a missing file is still "not a file"."""
    upper = tmp_path / "DATA.CSV"
    upper.write_text("\n".join(_ROWS))
    assert Task(dataset="file", data_path=str(upper), num_clients=2, local_steps=1).classes == 2
    txt = tmp_path / "data.txt"
    txt.write_text("\n".join(_ROWS))
    with pytest.raises(ValueError, match=r"data\.txt' has the suffix '\.txt'; expected an \.npz \(x, y\) or a \.csv"):
        Task(dataset="file", data_path=str(txt), num_clients=2, local_steps=1)
    with pytest.raises(ValueError, match=r"missing\.csv' is not a file"):
        Task(dataset="file", data_path=str(tmp_path / "missing.csv"), num_clients=2, local_steps=1)


def test_a_feature_beyond_float32s_range_is_refused_as_such_not_as_non_finite(tmp_path):
    """Found here: a finite 1e300 in a user's file became inf in the float32 the models train in, and was refused as
    "non-finite features"; it is named with its magnitude and the range expected. 1e30 is taken."""
    path = tmp_path / "big.csv"
    path.write_text("\n".join(["1e300,0.5,cat", *_ROWS]))
    with pytest.raises(ValueError, match=r"magnitude 1e\+300, beyond the float32 range"):
        Task(dataset="file", data_path=str(path), num_clients=2, local_steps=1)
    path.write_text("\n".join(["1e30,0.5,cat", *_ROWS]))
    task = Task(dataset="file", data_path=str(path), num_clients=2, local_steps=1)
    pooled = np.concatenate([task.client_data(p)[0] for p in range(2)] + [task.client_data(p)[2] for p in range(2)])
    assert pooled.dtype == np.float32 and float(np.abs(pooled).max()) == pytest.approx(1e30, rel=1e-6)
    assert np.isfinite(pooled).all()


def test_a_device_trace_with_a_byte_order_mark_is_read_as_without_it(tmp_path):
    """Found here: a trace saved as Excel's "CSV UTF-8" starts with a byte-order mark, which made its first column
    '\\ufeffclient' and the trace was refused as lacking a 'client' column (here and in ``fl run --trace``)."""
    text = "client,speed,bandwidth\n1,2.0,1e6\n0,0.5,2e6\n"
    path = tmp_path / "trace.csv"
    path.write_text(text, encoding="utf-8-sig")
    system = SystemModel.from_trace(path)
    np.testing.assert_array_equal(system.speeds, [0.5, 2.0])
    np.testing.assert_array_equal(system.bandwidths, [2e6, 1e6])
    res = CliRunner().invoke(cli_app, ["fl", "run", "--dataset", "blobs", "--clients", "2", "--per-round", "2",
                                       "--rounds", "1", "--local-steps", "1", "--trace", str(path)],
                             env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, res.output


# ---- the partitioners called directly -------------------------------------------------------------------------------
def test_shards_refuses_more_shards_than_samples_naming_the_callers_arguments():
    """Found here: ``partition.shards(labels, 30, 2)`` over 30 samples was refused as "num_clients=60 x min_size=1 >
    30 samples" (the shard count, under a name the caller did not give); and ``classes_per_client=5`` over three
    classes was taken, each client given shards of every class (no longer pathological). Both refused by name."""
    from tilestack.federated import partition

    labels = np.random.default_rng(0).integers(0, 3, 30)
    with pytest.raises(ValueError, match=r"shards: num_clients=30 x classes_per_client=2 = 60 shards > 30 samples"):
        partition.shards(labels, 30, 2)
    with pytest.raises(ValueError, match=r"shards: classes_per_client=5 over labels of 3 classes; expected at most 3"):
        partition.shards(labels, 4, 5)
    parts = partition.shards(labels, 15, 2)  # 30 shards of one sample: taken, every sample once
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    parts = partition.shards(labels, 4, 1)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)  # one shard each: one class, or two at a boundary
