"""Federated scenarios, round 12 (2 of 2): a finished run extended from its checkpoint, Oort's selection stopped and
resumed, federated evaluation of a sample scored by hand, FedNova over clients of 1 to 1858 examples training by
epochs, fifty tiny FedProx clients a tenth per round with dropouts, and one seed fixing a heterogeneous run.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``, ``run_rounds`` with ``ManagedGrid``),
with Flower's strategies and tilestack's; the reference is the clients' SGD replayed by hand
(``_fl_round7.client_model``: the same seeded minibatches) and the server's rule, or the scores, written out in float64.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from _fl_round5 import json_equal, np_, same
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round12 import softmax_scores
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from tilestack.federated import ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedNova, HeteroFL, OortSelector, Scaffold, Selected


def _rounds(history) -> list[dict]:
    """Every field of every round but the wall time (NaN equal to NaN: ``json_equal``)."""
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history.to_dict()["rounds"]]


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=6, local_steps=3,
                batch_size=8, lr=0.2, partitioner="dirichlet", partition_alpha=0.5)  # fmt: skip
    return Task(**(base | kw))


# ---- a finished run extended from its checkpoint --------------------------------------------------------------------
EXTEND = {  # strategy, system: state that must carry over the end of the first call
    "SCAFFOLD, stragglers": (lambda: Scaffold(fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=1),
                             SystemModel(6, straggler_fraction=0.5, straggler_epochs=3, seed=2)),
    "FedAdam, nobody online in round 3": (
        lambda: FedAdam(fraction_train=0.5, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1, eta=0.05),
        SystemModel(6, availability=[[1.0] * 6, [0.5] * 6, [0.0] * 6], seed=4)),
}  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(EXTEND))
def test_a_finished_run_extended_from_its_checkpoint_is_the_longer_run(tmp_path, name):
    """A researcher runs three rounds, looks, and asks for five with the same checkpoint: the call trains rounds 4 and
    5 only, and ends at the model and rounds of a five-round run made at once, bit for bit (SCAFFOLD's server and
    client control variates and the stragglers' draws; FedAdam's moments across a round 3 in which nobody was online,
    skipped saying so, at the very end of the first call)."""
    make, system = EXTEND[name]
    task = _task()
    straight = simulate(make(), task, rounds=5, system=system, seed=4)
    ckpt = tmp_path / "run.ckpt"
    first = simulate(make(), task, rounds=3, system=system, seed=4, checkpoint=ckpt)
    assert [r.round for r in first.history.rounds] == [1, 2, 3]
    trained: list[int] = []
    more = simulate(make(), task, rounds=5, system=system, seed=4, checkpoint=ckpt,
                    on_round=lambda m: trained.append(m.round))  # fmt: skip
    assert trained == [4, 5]
    assert same(straight.arrays, more.arrays)
    assert json_equal(_rounds(straight.history), _rounds(more.history))
    if name.startswith("FedAdam"):
        r3 = straight.history.rounds[2]
        assert r3.num_online == 0 and r3.num_aggregated == 0 and "nodes" in r3.skipped, r3.skipped
        assert all(r.num_aggregated > 0 for r in straight.history.rounds if r.round != 3)
    else:
        assert any(r.steps_done < r.steps_full for r in straight.history.rounds)  # somebody straggled


# ---- Oort's selection stopped and resumed ----------------------------------------------------------------------------
def _oort_run(system: SystemModel) -> Selected:
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    return Selected(inner, OortSelector(system, full_steps=[3] * 8, seed=2), per_round=3)


@pytest.mark.timeout(90)
def test_oort_selection_stopped_after_three_rounds_resumes_to_the_run_never_stopped(tmp_path):
    """``Selected(FedAvg, OortSelector)`` over eight clients of lognormal speeds and quantity skew, 20% dropping out
    each round, six rounds. Oort's choice depends on what it has learned (each client's utility, examples x loss, and
    the round it last trained). Stopped after round 3 and resumed from the checkpoint by a new strategy object, the run
    picks the same clients and ends at the same model, bit for bit, as the run never stopped; a resumed run whose
    selector forgot what it learned picks otherwise."""
    task = _task(num_clients=8, partitioner="quantity", quantity_sigma=1.0)
    system = SystemModel(8, speed_sigma=1.0, dropout=0.2, seed=1)
    kw = dict(rounds=6, system=system, seed=1, evaluate=False)
    full = simulate(_oort_run(system), task, **kw)
    picks = [sorted(r.client_train) for r in full.history.rounds]
    assert len({tuple(p) for p in picks}) > 2, picks  # the selection moves
    ckpt = tmp_path / "run.ckpt"
    simulate(_oort_run(system), task, checkpoint=ckpt, stop_after=3, **kw)
    resumed = simulate(_oort_run(system), task, checkpoint=ckpt, **kw)
    assert [sorted(r.client_train) for r in resumed.history.rounds] == picks
    assert same(full.arrays, resumed.arrays)
    assert json_equal(_rounds(full.history), _rounds(resumed.history))

    from tilestack.federated.driver import load_checkpoint, save_checkpoint

    state = load_checkpoint(ckpt)
    forgot = tmp_path / "forgot.ckpt"
    simulate(_oort_run(system), task, checkpoint=forgot, stop_after=3, **kw)
    state = load_checkpoint(forgot)
    state["strategy"].selector.utility, state["strategy"].selector.last_round = {}, {}
    save_checkpoint(forgot, state)
    amnesic = simulate(_oort_run(system), task, checkpoint=forgot, **kw)
    assert [sorted(r.client_train) for r in amnesic.history.rounds] != picks


# ---- federated evaluation of a sample, scored by hand ----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_sampled_federated_evaluation_is_weighted_by_test_examples_and_its_fairness_is_that_of_the_sample():
    """Six clients under label skew; each round FedAvg trains on all of them and evaluates on half (fraction_evaluate
    0.5: three sampled). For every round, each sampled client's accuracy and loss are computed here on its test split
    with that round's model; eval-acc and eval-loss are their means weighted by the clients' test examples, client_acc
    is the fairness of those three accuracies (mean, Jain's index (sum a)^2 / (n sum a^2), the worst), and the server's
    own scores are the model's on all six clients' pooled test and training data. The sample moves from round to
    round."""
    task = _task(num_samples=300, partition_alpha=0.3)
    models: list[dict] = []
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.5, min_available_nodes=1),
                     ManagedGrid(InProcessGrid(tsclient.app, 6), task), initial_arrays(task), num_rounds=3,
                     evaluator=Evaluator(task), extra_metrics=keep(models))  # fmt: skip
    data = {p: task.client_data(p) for p in range(6)}
    sampled = [sorted(r.client_eval) for r in res.history.rounds]
    assert all(len(s) == 3 for s in sampled) and len({tuple(s) for s in sampled}) > 1, sampled
    for r, w in zip(res.history.rounds, models, strict=True):
        scores = {int(p): softmax_scores(w, *data[int(p)][2:]) for p in r.client_eval}
        n = {p: len(data[p][3]) for p in scores}
        for p, (loss, acc) in scores.items():
            assert r.client_eval[str(p)]["num-examples"] == n[p]
            assert r.client_eval[str(p)]["eval-acc"] == pytest.approx(acc, abs=1e-12)
            assert r.client_eval[str(p)]["eval-loss"] == pytest.approx(loss, rel=1e-5)
        total = sum(n.values())
        assert r.eval_metrics["eval-acc"] == pytest.approx(sum(n[p] * scores[p][1] for p in n) / total, rel=1e-12)
        assert r.eval_metrics["eval-loss"] == pytest.approx(sum(n[p] * scores[p][0] for p in n) / total, rel=1e-5)
        accs = [scores[p][1] for p in sorted(scores)]
        assert r.client_acc["mean"] == pytest.approx(sum(accs) / 3, abs=1e-12)
        assert r.client_acc["jain"] == pytest.approx(sum(accs) ** 2 / (3 * sum(a * a for a in accs)), rel=1e-12)
        assert r.client_acc["worst"] == pytest.approx(min(accs), abs=1e-12)
        xt = np.concatenate([data[p][2] for p in range(6)])
        yt = np.concatenate([data[p][3] for p in range(6)])
        test_loss, test_acc = softmax_scores(w, xt, yt)
        assert r.test_acc == pytest.approx(test_acc, abs=1e-12)
        assert r.test_loss == pytest.approx(test_loss, rel=1e-5)


# ---- FedNova over clients of 1 to 1858 examples, each one epoch ----------------------------------------------------
@pytest.mark.timeout(90)
def test_fednova_over_clients_1858_to_1_in_size_training_one_epoch_each_is_its_rule_written_out():
    """Four clients of 278, 1858, 262 and 1 training examples each run one local epoch of batch 10, so 28, 186, 27 and 1
    SGD steps: FedAvg would let the big client's long run pull the model. FedNova's model is x - tau_eff sum_i p_i
    (x - y_i) / tau_i with p_i = n_i / n and tau_eff = sum_i p_i tau_i, written out in float64 from the clients' SGD
    replayed by hand, for two rounds; the round counts the 242 steps, and FedAvg's model over the same replies is
    elsewhere."""
    task = Task(dataset="blobs", num_samples=3000, num_features=3, num_classes=3, num_clients=4, partitioner="quantity",
                quantity_sigma=4.0, seed=1, local_epochs=1.0, batch_size=10, lr=0.05)  # fmt: skip
    n = {p: task.num_train(p) for p in range(4)}
    tau = {p: task.steps_for(p) for p in range(4)}
    assert list(n.values()) == [278, 1858, 262, 1] and list(tau.values()) == [28, 186, 27, 1]
    models: list[dict] = []
    run_rounds(FedNova(fraction_train=1.0, fraction_evaluate=0.0), ManagedGrid(InProcessGrid(tsclient.app, 4), task),
               initial_arrays(task), num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    total = sum(n.values())
    for rnd in (1, 2):
        ys = {p: client_model(task, p, rnd, x)[0] for p in range(4)}
        tau_eff = sum(n[p] / total * tau[p] for p in range(4))
        want = {k: x[k].astype(np.float64) - tau_eff * sum(n[p] / total * (x[k].astype(np.float64) - ys[p][k]) / tau[p]
                                                            for p in range(4)) for k in x}  # fmt: skip
        for k, v in models[rnd - 1].items():
            np.testing.assert_allclose(v, want[k], rtol=2**-21, atol=1e-7, err_msg=k)
        fedavg = weighted_mean(ys, n)
        assert max(float(np.abs(fedavg[k] - want[k]).max()) for k in x) > 1e-3
        x = models[rnd - 1]


# ---- fifty tiny FedProx clients, a tenth per round, with dropouts ---------------------------------------------------
@pytest.mark.timeout(90)
def test_fifty_tiny_fedprox_clients_a_tenth_per_round_with_dropouts_are_averaged_over_who_replied():
    """Fifty clients of 4 to 6 examples, FedProx (mu 0.5) sampling five a round, each sampled client dropping out with
    chance 0.3, eight rounds. Each round the strategy samples exactly five, the dropouts among them are left out as
    such, and the model is the example-weighted mean of the others' proximal SGD replayed by hand (a round whose five
    all drop out keeps the model, saying so); over the run more than half the clients have trained."""
    task = Task(dataset="blobs", num_samples=250, num_features=3, num_classes=3, num_clients=50, local_steps=2,
                batch_size=4, lr=0.2)  # fmt: skip
    assert {task.num_train(p) + len(task.client_data(p)[3]) for p in range(50)} == {5}
    system = SystemModel(50, dropout=0.3, seed=7)
    models: list[dict] = []
    res = run_rounds(FedProx(fraction_train=0.1, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1,
                             proximal_mu=0.5), ManagedGrid(InProcessGrid(tsclient.app, 50), task, system=system),
                     initial_arrays(task), num_rounds=8, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    seen: set[str] = set()
    for r, w in zip(res.history.rounds, models, strict=True):
        assert r.num_selected == 5
        kept = sorted(int(p) for p in r.client_train)
        dropped = {p: why for p, why in r.excluded.items()}
        assert len(kept) + len(dropped) == 5 and all(why.startswith("dropout") for why in dropped.values()), dropped
        seen |= set(r.client_train)
        if not kept:
            assert r.skipped and r.num_aggregated == 0
            near(w, {k: v.astype(np.float64) for k, v in x.items()})
            continue
        ys = {p: client_model(task, p, r.round, x, mu=0.5)[0] for p in kept}
        near(w, weighted_mean(ys, {p: task.num_train(p) for p in kept}))
        x = w
    assert sum(r.num_aggregated for r in res.history.rounds) < 5 * 8  # some dropped out
    assert len(seen) > 25, sorted(seen)


# ---- one seed fixes a heterogeneous run ------------------------------------------------------------------------------
def _heterogeneous(task: Task, seed: int):
    system = SystemModel(8, speed_sigma=1.0, dropout=0.2, straggler_fraction=0.4, straggler_epochs=3, seed=seed)
    inner = HeteroFL(width_of=lambda p: (1.0, 0.5, 0.25)[p % 3], hidden=8, fraction_train=1.0, fraction_evaluate=0.5,
                     min_available_nodes=1, min_train_nodes=1)  # fmt: skip
    strategy = Selected(inner, OortSelector(system, full_steps=[task.steps_for(p) for p in range(8)], seed=seed), 4)
    return strategy, system


@pytest.mark.timeout(120)
def test_one_seed_fixes_a_run_of_widths_speeds_dropouts_stragglers_and_oort_and_another_seed_changes_it():
    """HeteroFL (widths 1, 1/2, 1/4) under Oort's selection of four of eight clients of lognormal speeds, 20% dropouts
    and 40% stragglers, federated evaluation of half, four rounds, on one process and on two worker processes: with one
    seed every round (who was picked, who dropped, the steps done, the bytes, the metrics) and the model are identical,
    bit for bit; another seed picks other clients and ends elsewhere."""
    task = _task(num_clients=8, model="mlp", hidden=8, partitioner="quantity", quantity_sigma=0.5)
    runs = []
    for seed, workers in ((5, 1), (5, 2), (6, 1)):
        strategy, system = _heterogeneous(dataclasses.replace(task), seed)
        runs.append(simulate(strategy, task, rounds=4, system=system, seed=seed, workers=workers))
    a, b, other = runs
    assert same(a.arrays, b.arrays) and json_equal(_rounds(a.history), _rounds(b.history))
    assert any(r.excluded for r in a.history.rounds) and any(r.steps_done < r.steps_full for r in a.history.rounds)
    assert not same(a.arrays, other.arrays)
    assert [sorted(r.client_train) for r in a.history.rounds] != [sorted(r.client_train) for r in other.history.rounds]
    assert all(math.isfinite(r.test_acc) for r in a.history.rounds)
