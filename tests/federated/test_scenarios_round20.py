"""Federated scenarios, round 20 (1 of 2): clients of very different sizes down to one training example, label skew
at Dirichlet alpha 0.01, clients whose replies weigh nothing, a NaN update under a server optimiser, a client lost
mid-run under FedYogi with the run interrupted and resumed, fractions that sample nobody under a server optimiser,
more clients asked for than exist, and DP noise measured against its documented size.

tilestack's ClientApp (and scripted Flower ClientApps, ``_fl_round5.scripted``) over tilestack's in-process Flower
``Grid`` under ``ManagedGrid`` (``run_rounds``, ``simulate``); Flower 1.41's FedAvg, FedProx, FedAdam, FedYogi and
its server-side DP wrapper unchanged. References, independent of the code under test: tilestack's client SGD replayed
on its seeded minibatches (``_fl_round7.client_model``), the weighted means and Flower's server optimisers written
out in float64 (``_fl_round16.ServerOptimizer``), each client's test split scored by hand.

What this round found, fixed:

- *top-k's ratio given to int8.* ``--compress int8:0.05`` (or ``compression.parse("int8:0.05")``) ran plain int8,
  the ratio dropped without a word. Refused naming the spec and what int8 takes (``_more``).
- *A resumed run's client selector.* A checkpoint keeps the strategy whole, ``Selected``'s selector with it, and the
  run signature compared only the strategies' own plain settings: a run resumed with ``RandomSelector(5)`` (or an
  ``OortSelector`` of another alpha) picked its clients by the checkpoint's ``RandomSelector(0)`` without a word. The
  signature now holds the plain settings of the helpers a strategy holds (``driver._settings``): refused, naming
  ``Selected.selector.seed`` and both values; the same selector resumes to the uninterrupted run. Likewise Flower's
  privacy accountant: a DP run resumed with another target delta reported the checkpoint's accountant's epsilons;
  the fields of a helper's ``config`` dataclass are in the signature too.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import blobs, check_model, make_grid, np_, scripted, update
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round16 import ServerOptimizer
from _fl_round17 import wmean
from _fl_round18 import EVERYONE, fedavg
from _fl_round19 import failing_app
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
)

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, Task, initial_arrays, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.strategies import RandomSelector, Selected, make_strategy

pytestmark = pytest.mark.timeout(120)


def _scores(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of softmax regression, float64."""
    logits = x.astype(np.float64) @ params["fc.weight"].astype(np.float64) + params["fc.bias"].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


# ---- clients of very different sizes, the smallest with one training example ----------------------------------------
def _skewed_task() -> Task:
    return Task(dataset="blobs", num_samples=40, num_features=3, num_classes=3, num_clients=4, partitioner="quantity",
                quantity_sigma=4.0, local_steps=3, batch_size=4, lr=0.2, seed=1)  # fmt: skip


def test_the_scenario_has_a_client_of_one_training_example_beside_one_of_dozens():
    task = _skewed_task()
    sizes = sorted(task.num_train(p) for p in range(4))
    assert sizes[0] == 1 and sizes[-1] >= 20, sizes
    assert sum(len(task.client_data(p)[1]) + len(task.client_data(p)[3]) for p in range(4)) == 40


def test_fedavg_over_clients_of_one_to_dozens_of_examples_is_the_examples_weighted_mean_and_so_is_its_evaluation():
    """Four clients of quantity skew (sigma 4: one client trains on a single example), FedAvg over all, two rounds.
    Each round's model is the num_train-weighted mean of the clients' replayed SGD (the one-example client's share is
    1 / total, its batches the same example over and over); the federated evaluation of the new model is each client's
    own test split scored by hand, Flower's aggregate their mean weighted by test examples."""
    task = _skewed_task()
    n = {p: task.num_train(p) for p in range(4)}
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                      min_evaluate_nodes=1)  # fmt: skip
    models: list = []
    res = simulate(strategy, task, rounds=2, evaluate=False, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(res.history.rounds, models, strict=True), start=1):
        assert r.excluded == {} and r.num_aggregated == 4 and r.steps_done == 12
        near(got, weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(4)}, n), ulps=4)
        x = got
        tests = {p: task.client_data(p)[2:] for p in range(4)}
        by_hand = {p: _scores(got, *tests[p]) for p in range(4)}
        m = {p: len(tests[p][1]) for p in range(4)}
        for p in range(4):
            assert r.client_eval[str(p)]["eval-acc"] == pytest.approx(by_hand[p][1], abs=1e-12)
            assert r.client_eval[str(p)]["eval-loss"] == pytest.approx(by_hand[p][0], rel=1e-5)
        want_acc = sum(m[p] * by_hand[p][1] for p in range(4)) / sum(m.values())
        want_loss = sum(m[p] * by_hand[p][0] for p in range(4)) / sum(m.values())
        assert r.eval_metrics["eval-acc"] == pytest.approx(want_acc, abs=1e-9)
        assert r.eval_metrics["eval-loss"] == pytest.approx(want_loss, rel=1e-5)
    assert not np.allclose(models[-1]["fc.weight"], np_(initial_arrays(task))["fc.weight"])


def test_without_the_one_example_client_the_round_would_differ():
    """The reference can tell the smallest client's share: leaving it out moves the mean."""
    task = _skewed_task()
    n = {p: task.num_train(p) for p in range(4)}
    small = min(n, key=n.get)
    x = np_(initial_arrays(task))
    out = {p: client_model(task, p, 1, x)[0] for p in range(4)}
    rest = {p: v for p, v in out.items() if p != small}
    a, b = weighted_mean(out, n), weighted_mean(rest, n)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 1e-4


# ---- label skew at Dirichlet alpha 0.01 ------------------------------------------------------------------------------
def test_dirichlet_alpha_001_gives_each_client_about_one_class_and_fedprox_is_its_replayed_proximal_sgd():
    """Five clients over three classes at alpha 0.01: every example is on exactly one client (train + test splits add
    up to the dataset), every client can train (the top-up), most clients hold a single class. FedProx (mu 0.5, lr 0.1)
    for two rounds is the num_train-weighted mean of each client's replayed proximal SGD."""
    task = Task(dataset="blobs", num_samples=150, num_features=4, num_classes=3, num_clients=5, partitioner="dirichlet",
                partition_alpha=0.01, local_steps=4, batch_size=5, lr=0.1, seed=2)  # fmt: skip
    labels = {p: np.concatenate([task.client_data(p)[1], task.client_data(p)[3]]) for p in range(5)}
    assert sum(len(v) for v in labels.values()) == 150
    assert all(task.num_train(p) >= 1 for p in range(5))
    dominant = [np.bincount(v, minlength=3).max() / len(v) for v in labels.values()]
    assert sum(d > 0.9 for d in dominant) >= 3, dominant
    n = {p: task.num_train(p) for p in range(5)}
    models: list = []
    simulate(FedProx(**EVERYONE, proximal_mu=0.5), task, rounds=2, evaluate=False, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        near(got, weighted_mean({p: client_model(task, p, rnd, x, mu=0.5)[0] for p in range(5)}, n), ulps=4)
        x = got


# ---- replies that weigh nothing --------------------------------------------------------------------------------------
def test_a_client_reporting_zero_examples_is_left_out_by_name_and_a_round_where_all_do_keeps_the_model():
    """Scripted clients send x + a fixed update; client 1 reports num-examples 0 in every round, all three do in round
    2. Round 1 is the mean of clients 0 and 2 weighted 2 : 5 (client 1 left out saying why), round 2 aggregates
    nothing and keeps round 1's model, round 3 is again clients 0 and 2."""
    task = blobs(3, features=3, classes=2)

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        weight = 0 if pid == 1 or rnd == 2 else {0: 2, 2: 5}[pid]
        return {k: (x[k] + update(pid, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x}, {
            "num-examples": weight}

    models: list = []
    res = run_rounds(fedavg(), make_grid(scripted(script), task), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    r1, r2, r3 = res.history.rounds
    assert r1.excluded == {"1": "empty: num-examples=0, expected > 0 (the client has no training examples)"}
    assert sorted(r2.excluded) == ["0", "1", "2"] and r2.num_aggregated == 0 and r2.skipped
    x = np_(initial_arrays(task))
    for rnd, got in ((1, models[0]), (3, models[2])):
        sent = {p: {k: (x[k] + update(p, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x} for p in (0, 2)}
        near(got, wmean(sent, {0: 2, 2: 5}), ulps=4)
        x = got
        if rnd == 1:  # round 2 aggregated nothing: round 1's model, bit for bit
            assert all(np.array_equal(models[1][k], got[k]) for k in got)


# ---- a NaN update under a server optimiser ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_a_nan_update_under_a_server_optimiser_is_left_out_and_the_moments_follow_the_other_clients(name):
    """Four scripted clients of weights 1, 2, 3, 4; client 2 sends NaN in round 2 only. Every round's model is Flower's
    rule (written out in float64, moments chained) over the finite replies alone: round 2 over clients 0, 1, 3, and
    round 3 (client 2 back) from moments that never saw a NaN; the model stays finite."""
    task = blobs(4, features=3, classes=2)
    weights = {0: 1, 1: 2, 2: 3, 3: 4}
    kw = dict(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        out = {k: (x[k] + update(pid, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x}
        if pid == 2 and rnd == 2:
            out["fc.weight"][0, 0] = np.nan
        return out, {"num-examples": weights[pid]}

    models: list = []
    strategy = (FedAdam if name == "fedadam" else FedYogi)(**EVERYONE, **kw)
    res = run_rounds(strategy, make_grid(scripted(script), task), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    assert [list(r.excluded) for r in res.history.rounds] == [[], ["2"], []]
    assert res.history.rounds[1].excluded["2"] == "non-finite: fc.weight"
    opt = ServerOptimizer("adam" if name == "fedadam" else "yogi", **kw)
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        kept = [p for p in range(4) if (p, rnd) != (2, 2)]
        sent = {p: {k: (x[k] + update(p, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x} for p in kept}
        near(got, opt.step(x, wmean(sent, weights), rnd), ulps=8)
        assert all(np.isfinite(v).all() for v in got.values())
        x = got
    assert all(np.isfinite(v).all() for v in strategy.m_t.values()) and all(
        np.isfinite(v).all() for v in strategy.v_t.values())


# ---- a client lost mid-run, the run interrupted and resumed ----------------------------------------------------------
def test_fedyogi_with_a_client_lost_mid_round_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """tilestack's clients under FedYogi; client 1 trains in round 2 and then loses its connection (left out by name).
    The run stops after round 2 (stop_after) and resumes from its checkpoint for rounds 3-4: the model and FedYogi's
    moments are bit for bit those of the run that was never interrupted, and the history says the same per round
    (wall time aside)."""
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=3, num_clients=3, local_steps=3,
                batch_size=6, lr=0.1, partitioner="dirichlet", partition_alpha=0.5, seed=4)  # fmt: skip

    def run(**kw):
        strategy = FedYogi(**EVERYONE, eta=0.05, tau=1e-2)
        grid = ManagedGrid(InProcessGrid(failing_app({(1, 2)}), 3, seed=0), task)
        return strategy, run_rounds(strategy, grid, initial_arrays(task), num_rounds=4, seed=3, **kw)

    s_full, full = run()
    ckpt = tmp_path / "yogi.ckpt"
    _, first = run(checkpoint=ckpt, stop_after=2)
    assert len(first.history.rounds) == 2 and ckpt.exists()
    s_res, resumed = run(checkpoint=ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4]
    a, b = np_(full.arrays), np_(resumed.arrays)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for k in s_full.m_t:
        assert np.array_equal(s_full.m_t[k], s_res.m_t[k]) and np.array_equal(s_full.v_t[k], s_res.v_t[k])
    for ra, rb in zip(full.history.rounds, resumed.history.rounds, strict=True):
        da, db = vars(ra), vars(rb)
        for key in da:
            if key != "wall_time":
                assert repr(da[key]) == repr(db[key]), (ra.round, key)
    assert list(full.history.rounds[1].excluded) == ["1"]
    assert "lost its connection" in full.history.rounds[1].excluded["1"]


# ---- fractions that sample nobody ------------------------------------------------------------------------------------
def test_a_training_fraction_that_rounds_to_no_client_leaves_fedadam_and_its_model_untouched():
    """FedAdam with fraction_train 0.2 of 4 nodes and no minimum samples int(0.8) = 0 clients each round: every round
    says so, no client trains or uploads, the model is the initial one bit for bit and FedAdam's moments were never
    made (a first aggregate would make them)."""
    task = blobs(4, features=3, classes=2)
    sent: list = []

    def script(pid, rnd, got, context, config):
        sent.append((pid, rnd))
        return got["arrays"], {"num-examples": 1}

    strategy = FedAdam(fraction_train=0.2, fraction_evaluate=0.0, min_train_nodes=0, min_available_nodes=0, eta=0.1)
    res = run_rounds(strategy, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2)
    for r in res.history.rounds:
        assert r.num_selected == 0 and r.num_aggregated == 0 and r.bytes_up == 0 and r.steps_done == 0
        assert r.skipped == "no clients were sampled for training"
    assert not sent and strategy.m_t is None and strategy.v_t is None
    check_model(res.arrays, np_(initial_arrays(task)), np.float32)


def test_an_evaluation_fraction_that_rounds_to_no_client_falls_back_to_the_servers_own_scores():
    """fraction_evaluate 0.2 of 4 nodes and no minimum: no client is asked to evaluate (no eval metrics, no per-client
    scores), and the fairness figures come from the server scoring each client's test split with the global model,
    by hand here."""
    task = Task(dataset="blobs", num_samples=80, num_features=3, num_classes=2, num_clients=4, local_steps=2, lr=0.1)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.2, min_available_nodes=1, min_train_nodes=1,
                      min_evaluate_nodes=0)  # fmt: skip
    models: list = []
    res = simulate(strategy, task, rounds=1, extra_metrics=keep(models))
    r = res.history.rounds[0]
    assert r.client_eval == {} and not r.eval_metrics
    accs = sorted(_scores(models[0], *task.client_data(p)[2:])[1] for p in range(4))
    assert r.client_acc["worst"] == pytest.approx(accs[0], abs=1e-12)
    assert r.client_acc["mean"] == pytest.approx(float(np.mean(accs)), abs=1e-12)


# ---- more clients asked for than exist -------------------------------------------------------------------------------
@pytest.mark.parametrize("make, needle", [
    (lambda: FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=5, min_available_nodes=1),
     "min_train_nodes=5"),
    (lambda: FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=7, min_train_nodes=1),
     "min_available_nodes=7"),
    (lambda: FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=6,
                    min_available_nodes=1), "min_evaluate_nodes=6"),
    (lambda: Selected(FedAvg(**EVERYONE), RandomSelector(0), per_round=6), "per_round=6"),
    (lambda: FedAvg(fraction_train=1.5, fraction_evaluate=0.0), "fraction_train=1.5"),
])  # fmt: skip
def test_more_clients_asked_for_than_the_four_that_exist_is_refused_before_any_client_runs(make, needle):
    task = blobs(4, features=3, classes=2)
    sent: list = []

    def script(pid, rnd, got, context, config):
        sent.append(pid)
        return got["arrays"], {"num-examples": 1}

    with pytest.raises(FederatedError, match=needle.replace("(", r"\(")):
        run_rounds(make(), make_grid(scripted(script), task), initial_arrays(task), num_rounds=2)
    assert not sent
    with pytest.raises(ValueError, match=r"clients_per_round=5; expected an integer in \[1, 4\]"):
        make_strategy("fedavg", clients_per_round=5, num_clients=4)


# ---- DP noise of its documented size ---------------------------------------------------------------------------------
def test_server_side_dp_noise_has_std_noise_multiplier_times_clip_over_the_sampled_clients():
    """Flower's server-side fixed clipping over four scripted clients whose updates are far longer than the clipping
    norm C = 0.5 (each is cut to C); noise multiplier 2: the aggregate minus the clipped mean (by hand, unit weights)
    is Gaussian noise of std 2 x 0.5 / 4 = 0.25 over the model's 610 entries (estimate within 15 percent, mean near 0),
    the same under the same seed and other noise under another."""
    task = blobs(4, features=60, classes=10)
    unit = tsclient.UNIT_WEIGHT

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        return {k: (x[k] + 10 * update(pid, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x}, {
            unit: 1, "num-examples": pid + 1}

    def run(seed):
        inner = FedAvg(**EVERYONE, weighted_by_key=unit)
        dp = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=2.0, clipping_norm=0.5,
                                                        num_sampled_clients=4)  # fmt: skip
        return np_(run_rounds(dp, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1,
                              seed=seed).arrays)  # fmt: skip

    x = np_(initial_arrays(task))
    clipped = {}
    for p in range(4):
        u = {k: 10 * update(p, 1, x[k].shape, np.float32).astype(np.float64) for k in x}
        norm = np.sqrt(sum(float(np.sum(v**2)) for v in u.values()))
        assert norm > 0.5
        clipped[p] = {k: x[k] + u[k] * (0.5 / norm) for k in x}
    mean = wmean(clipped, {p: 1 for p in range(4)})
    got = run(0)
    noise = np.concatenate([(got[k].astype(np.float64) - mean[k]).ravel() for k in x])
    assert noise.size == 610
    assert 0.85 * 0.25 < noise.std() < 1.15 * 0.25, noise.std()
    assert abs(noise.mean()) < 4 * 0.25 / np.sqrt(noise.size)
    again, other = run(0), run(1)
    assert all(np.array_equal(got[k], again[k]) for k in x)
    assert not np.allclose(got["fc.weight"], other["fc.weight"])


# ---- a resumed run's client selector ---------------------------------------------------------------------------------
def _selected(selector):
    return Selected(FedAvg(**EVERYONE), selector, per_round=2)


def test_a_run_resumed_with_another_selector_seed_is_refused_naming_it_and_the_same_one_resumes_exactly(tmp_path):
    """Two of six clients a round picked by RandomSelector(0); the run stops after round 2. Resumed with
    RandomSelector(5) it used to pick by the checkpoint's seed 0 without a word; now it is refused before any work,
    naming the selector's seed and both values. Resumed with RandomSelector(0) it equals the uninterrupted run: the
    same clients each round (seed 0's picks, which seed 5's differ from) and the same model bit for bit."""
    task = Task(dataset="blobs", num_samples=180, num_features=3, num_classes=3, num_clients=6, local_steps=2, lr=0.1)
    ckpt = tmp_path / "selected.ckpt"
    simulate(_selected(RandomSelector(0)), task, rounds=4, checkpoint=ckpt, stop_after=2, evaluate=False)
    with pytest.raises(FederatedError, match=r"belongs to another run \(settings: checkpoint has "
                                             r"\{'Selected.selector.seed': '0'\}, this run has "
                                             r"\{'Selected.selector.seed': '5'\}\)"):  # fmt: skip
        simulate(_selected(RandomSelector(5)), task, rounds=4, checkpoint=ckpt, evaluate=False)
    resumed = simulate(_selected(RandomSelector(0)), task, rounds=4, checkpoint=ckpt, evaluate=False)
    full = simulate(_selected(RandomSelector(0)), task, rounds=4, evaluate=False)
    other = simulate(_selected(RandomSelector(5)), task, rounds=4, evaluate=False)
    picks = [[sorted(r.client_train) for r in res.history.rounds] for res in (resumed, full, other)]
    assert picks[0] == picks[1] != picks[2]
    a, b = np_(resumed.arrays), np_(full.arrays)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_an_oort_selector_of_another_alpha_is_refused_on_resume(tmp_path):
    from tilestack.federated import SystemModel
    from tilestack.federated.strategies import OortSelector

    task = Task(dataset="blobs", num_samples=180, num_features=3, num_classes=3, num_clients=6, local_steps=2, lr=0.1)
    system = SystemModel(6, speed_sigma=1.0, seed=2)
    ckpt = tmp_path / "oort.ckpt"
    simulate(_selected(OortSelector(system, alpha=2.0)), task, rounds=3, system=system, checkpoint=ckpt,
             stop_after=1, evaluate=False)  # fmt: skip
    with pytest.raises(FederatedError, match=r"'Selected.selector.alpha': '2.0'\}, this run has "
                                             r"\{'Selected.selector.alpha': '5.0'\}"):  # fmt: skip
        simulate(_selected(OortSelector(system, alpha=5.0)), task, rounds=3, system=system, checkpoint=ckpt,
                 evaluate=False)  # fmt: skip
    res = simulate(_selected(OortSelector(system, alpha=2.0)), task, rounds=3, system=system, checkpoint=ckpt,
                   evaluate=False)  # fmt: skip
    assert [r.round for r in res.history.rounds] == [1, 2, 3]


# ---- the same scenario on Flower's Simulation Engine -----------------------------------------------------------------
@pytest.mark.timeout(300)
def test_the_skewed_clients_with_a_nan_client_and_dropouts_run_bit_for_bit_alike_on_flowers_engine():
    """The quantity-skewed clients (one trains on a single example), client 2 sending NaN, the system dropping clients
    with chance 0.3: Flower's Ray engine and tilestack's in-process engine leave out the same clients for the same
    reasons each round and end on the same model bit for bit, which is the replayed weighted mean of the kept ones."""
    import dataclasses

    from tilestack.federated import SystemModel

    task = dataclasses.replace(_skewed_task(), faults=((2, "nan"),))
    system = SystemModel(4, dropout=0.3, seed=2)
    strategy = dict(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                    min_evaluate_nodes=1)  # fmt: skip
    models: list = []
    ours = simulate(FedAvg(**strategy), task, rounds=2, system=system, extra_metrics=keep(models))
    flower = simulate(FedAvg(**strategy), task, rounds=2, system=system, engine="flower")
    assert [r.excluded for r in ours.history.rounds] == [r.excluded for r in flower.history.rounds]
    assert any(v.startswith("non-finite") for r in ours.history.rounds for v in r.excluded.values())
    a, b = np_(ours.arrays), np_(flower.arrays)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    n = {p: task.num_train(p) for p in range(4)}
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(ours.history.rounds, models, strict=True), start=1):
        kept = [p for p in range(4) if str(p) not in r.excluded]
        assert kept and r.num_aggregated == len(kept)
        near(got, weighted_mean({p: client_model(task, p, rnd, x)[0] for p in kept}, n), ulps=4)
        x = got


def test_a_dp_run_resumed_with_another_accountant_delta_is_refused_and_the_same_one_resumes_its_epsilons(tmp_path):
    """DP-FedAvg with an RDP accountant (delta 0.01) stopped after round 1. Resumed with delta 0.5 it used to go on
    with the checkpoint's accountant (delta 0.01) without a word; now refused naming target_delta and both values.
    Resumed with the same accountant, rounds 2 and 3 report the uninterrupted run's epsilons."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=3, num_clients=4, local_steps=2, lr=0.1)

    def make(delta):
        acc = RdpAccountant(PrivacyConfig(delta, 4, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          SamplingMethod.NO_AMPLIFICATION))  # fmt: skip
        return make_strategy("dp-fedavg", clients_per_round=4, num_clients=4, noise_multiplier=1.0, clipping_norm=1.0,
                             accountant=acc)  # fmt: skip

    def epsilon(strategy, arrays, rnd):
        return {"epsilon": strategy.privacy_spent().epsilon}

    ckpt = tmp_path / "dp.ckpt"
    simulate(make(0.01), task, rounds=3, checkpoint=ckpt, stop_after=1, evaluate=False, extra_metrics=epsilon)
    with pytest.raises(FederatedError, match=r"accountant.config.target_delta': '0.01'\}, this run has .*"
                                             r"accountant.config.target_delta': '0.5'\}"):  # fmt: skip
        simulate(make(0.5), task, rounds=3, checkpoint=ckpt, evaluate=False, extra_metrics=epsilon)
    resumed = simulate(make(0.01), task, rounds=3, checkpoint=ckpt, evaluate=False, extra_metrics=epsilon)
    full = simulate(make(0.01), task, rounds=3, evaluate=False, extra_metrics=epsilon)
    got = [r.extra["epsilon"] for r in resumed.history.rounds]
    assert got == [r.extra["epsilon"] for r in full.history.rounds] and got[0] < got[1] < got[2]
