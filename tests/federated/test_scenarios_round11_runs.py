"""Federated scenarios, round 11 (2 of 2): a client compressing where nobody asked, clients that only evaluate, a
compressed, selected, momentum run stopped and resumed, and a trimmed mean at its breaking point under Flower's own
loop.

Written ClientApps (``_fl_round11.array_app``: each reply array chosen here) and tilestack's ClientApp (replayed with
``_fl_round7.client_model``: the same seeded minibatches) over tilestack's in-process Flower ``Grid`` under
``ManagedGrid``.

What this round found, fixed:

- *A compressed reply where the server asked for models.* A client sending its update top-k or int8 encoded (a
  client left configured for compression, or one that always compresses) to a strategy with no ``Compressed``
  wrapper ended the run with Flower's TypeError ("Unsupported serialization type") inside FedAvg's mean, and was
  taken by tilestack's strategies (FedNova, HeteroFL, ...) for a model: its decoded update, near zero, averaged in
  as if it were the client's weights. Such a reply is now left out naming the array and its encoding
  (grid.check_reply); under ``Compressed`` it is what the server asked for, and a client sending its plain model
  there is still taken (tested in round 5).
- *A selector asked for more clients than the run has* (``Selected(..., per_round=5)`` over 4) picked all of them
  every round without a word, where ``make_strategy`` refuses ``clients_per_round > num_clients``: refused before any
  work (checks.check_strategy).
- *Shards of more classes than the dataset has* (``classes_per_client=11`` of 10) were taken, every client a near-IID
  mix; more shards than examples failed only when a client built its data, naming ``num_clients=30`` (the shard
  count) in a run of 10. Both are refused when the Task is made, naming ``classes_per_client``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import blobs, check_model, make_grid, np_, same, scripted, wmean
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round11 import array_app
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.driver import load_checkpoint, save_checkpoint
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedNova, RandomSelector, Selected


# ---- a compressed reply where the server asked for models ----------------------------------------------------------
def _plain(pid, name, start, trained):
    return codec.encode(trained)


def _topk_update(pid, name, start, trained):
    """Client 1 sends its update top-k encoded (every entry kept: nothing is lost, only the encoding is other)."""
    if pid != 1:
        return codec.encode(trained)
    return codec.encode_topk(trained - start, trained.size)


def _int8_update(pid, name, start, trained):
    return codec.encode_int8(trained - start) if pid == 1 else codec.encode(trained)


STRATEGIES = {
    "FedAvg": lambda: FedAvg(fraction_train=1.0, fraction_evaluate=0.0),
    "FedMedian": lambda: FedMedian(fraction_train=1.0, fraction_evaluate=0.0),
    "FedNova": lambda: FedNova(fraction_train=1.0, fraction_evaluate=0.0),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("encode", [_topk_update, _int8_update], ids=["topk", "int8"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_client_sending_a_compressed_update_where_models_were_asked_for_is_left_out_naming_it(name, encode):
    """Four clients, each sending the model start + 0.1 (pid + 1) with 3 (pid + 1) examples; client 1 sends its
    update compressed although the strategy has no Compressed wrapper. Before, FedAvg and FedMedian ended the run
    with Flower's TypeError on the encoding, and FedNova took client 1's decoded update (0.2 everywhere) for its
    model. Now client 1 is left out naming the array and the encoding, and the model is the strategy's rule over the
    other three: the weighted mean (FedNova with one step each is the same), or the median."""
    task = blobs(4)
    x = np_(initial_arrays(task))
    res = run_rounds(STRATEGIES[name](), make_grid(array_app(encode), task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    stype = codec.TOPK_STYPE if encode is _topk_update else codec.INT8_STYPE
    assert r.excluded == {"1": f"malformed: fc.weight is sent compressed ({stype}), expected the model's array as "
                               "numpy (the server asked for no compression: no Compressed strategy)"}  # fmt: skip
    assert r.num_aggregated == 3 and not r.skipped
    models = {p: {k: v + np.float32(0.1 * (p + 1)) for k, v in x.items()} for p in (0, 2, 3)}
    if name == "FedMedian":  # the middle of clients 0, 2, 3: client 2's model
        check_model(res.arrays, {k: v.astype(np.float64) for k, v in models[2].items()}, np.float32)
    else:
        near(np_(res.arrays), wmean(models, {p: 3 * (p + 1) for p in (0, 2, 3)}))


@pytest.mark.timeout(60)
def test_the_same_compressed_replies_under_compressed_are_rebuilt_and_averaged():
    """The control: with ``Compressed(FedAvg, 'topk:1.0')`` asking for updates, client 1's top-k update (every entry)
    is rebuilt as start + update and averaged with the others' plain models, none left out."""
    task = blobs(4)
    x = np_(initial_arrays(task))
    res = run_rounds(Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), "topk", 1.0),
                     make_grid(array_app(_topk_update), task), initial_arrays(task), num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert r.num_aggregated == 4 and not r.excluded
    models = {p: {k: v + np.float32(0.1 * (p + 1)) for k, v in x.items()} for p in range(4)}
    models[1] = {k: x[k] + (models[1][k] - x[k]).astype(np.float64) for k in x}  # start + the update as sent
    near(np_(res.arrays), wmean(models, {p: 3 * (p + 1) for p in range(4)}))


# ---- clients that only evaluate ------------------------------------------------------------------------------------
class TrainOn(FedAvg):
    """FedAvg that trains on the clients whose partition is in ``trainers`` and evaluates on every client: the others
    hold only data to score the model on (a hospital that validates, a held-out population)."""

    def __init__(self, trainers: set[int], **kw):
        super().__init__(**kw)
        self.trainers = frozenset(trainers)

    def configure_train(self, server_round, arrays, config, grid):
        from tilestack.federated.strategies import SubsetGrid

        ids = [n for n in grid.get_node_ids() if grid.partition_of[n] in self.trainers]
        return super().configure_train(server_round, arrays, config, SubsetGrid(grid, ids))


def _accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Softmax regression's accuracy, float64: argmax of x W + b."""
    logits = x.astype(np.float64) @ params["fc.weight"].astype(np.float64) + params["fc.bias"]
    return float(np.mean(np.argmax(logits, axis=1) == y))


@pytest.mark.timeout(90)
def test_evaluation_only_clients_never_train_and_score_the_model_the_trainers_made():
    """Six clients under label skew (Dirichlet 0.3); clients 0-3 train, clients 4 and 5 only evaluate, three rounds.
    Each round's model is the example-weighted mean of the four trainers' SGD, replayed by hand; clients 4 and 5
    never appear among the training replies, every client scores the round's model on its own test split (its
    accuracy computed here), and the federated eval-acc is their test-example-weighted mean."""
    task = blobs(6, features=4, classes=3, local_steps=3, lr=0.2, partitioner="dirichlet", partition_alpha=0.3,
                 num_samples=300)  # fmt: skip
    models: list[dict] = []
    res = run_rounds(TrainOn({0, 1, 2, 3}, fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1),
                     ManagedGrid(InProcessGrid(tsclient.app, 6), task), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    tests = {p: task.client_data(p)[2:] for p in range(6)}
    for rnd, r in enumerate(res.history.rounds, start=1):
        assert sorted(r.client_train) == ["0", "1", "2", "3"] and r.num_selected == r.num_aggregated == 4
        x = weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(4)},
                          {p: task.num_train(p) for p in range(4)})  # fmt: skip
        near(models[rnd - 1], x)
        x = models[rnd - 1]
        assert sorted(r.client_eval) == [str(p) for p in range(6)]
        for p, (xt, yt) in tests.items():
            assert r.client_eval[str(p)]["eval-acc"] == pytest.approx(_accuracy(x, xt, yt), abs=1e-12)
        n = {p: len(tests[p][1]) for p in range(6)}
        want = sum(_accuracy(x, *tests[p]) * n[p] for p in range(6)) / sum(n.values())
        assert r.eval_metrics["eval-acc"] == pytest.approx(want, rel=1e-9)


# ---- a compressed, selected, momentum run stopped and resumed ------------------------------------------------------
def _momentum_run(method: str, ratio: float):
    inner = FedAvgM(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1,
                    server_momentum=0.8, server_learning_rate=1.0)  # fmt: skip
    return Compressed(Selected(inner, RandomSelector(seed=4), per_round=3), method, ratio)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method, ratio", [("topk", 0.25), ("int8", 0.0)])
def test_a_compressed_selected_momentum_run_stopped_after_two_rounds_resumes_to_the_run_never_stopped(
    tmp_path, method, ratio
):
    """Compressed(Selected(FedAvgM(momentum 0.8)), 3 of 6 clients a round), half the clients stragglers doing part of
    their work, five rounds. Stopped after round 2 and resumed from the checkpoint, the run ends at the model of the
    run never stopped, bit for bit, with the same rounds (who was selected, who straggled, the bytes sent): the
    server's momentum, the selector's state and each client's error-feedback residual (what compression has not sent
    yet, kept by the client across the rounds it is not selected) all come back. A run whose clients lose their
    residuals (a fresh engine without the checkpoint's client state) ends elsewhere."""
    task = blobs(6, features=4, classes=3, local_steps=3, lr=0.2)
    system = SystemModel(6, straggler_fraction=0.5, straggler_epochs=4, seed=6)
    kw = dict(rounds=5, system=system, evaluate=False, seed=3)
    full = simulate(_momentum_run(method, ratio), task, **kw)
    ckpt = tmp_path / "run.ckpt"
    first = simulate(_momentum_run(method, ratio), task, checkpoint=ckpt, stop_after=2, **kw)
    assert len(first.history.rounds) == 2
    resumed = simulate(_momentum_run(method, ratio), task, checkpoint=ckpt, **kw)
    assert same(full.arrays, resumed.arrays)
    keys = ("num_selected", "num_aggregated", "steps_done", "bytes_up", "client_train")
    assert [[getattr(r, k) for k in keys] for r in resumed.history.rounds] == [
        [getattr(r, k) for k in keys] for r in full.history.rounds
    ]
    assert len({tuple(sorted(r.client_train)) for r in full.history.rounds}) > 1  # the selection moves
    assert any(r.steps_done < r.steps_full for r in full.history.rounds)  # somebody straggled
    # the residuals matter: resumed from a copy of the checkpoint without the clients' state, the run ends elsewhere
    state = load_checkpoint(ckpt)
    assert state["round"] == 5
    first = simulate(_momentum_run(method, ratio), task, checkpoint=tmp_path / "lost.ckpt", stop_after=2, **kw)
    state = load_checkpoint(tmp_path / "lost.ckpt")
    save_checkpoint(tmp_path / "lost.ckpt", state | {"grid_state": None})
    lost = simulate(_momentum_run(method, ratio), task, checkpoint=tmp_path / "lost.ckpt", **kw)
    assert not same(lost.arrays, full.arrays)


# ---- a trimmed mean at its breaking point under Flower's own loop ---------------------------------------------------
@pytest.mark.timeout(90)
def test_a_trimmed_mean_trimming_two_of_seven_keeps_two_sign_flippers_out_under_flowers_own_loop():
    """Seven of tilestack's clients, clients 0 and 1 sign-flipping attackers (malicious_fraction 2/7, scale 10),
    ``FedTrimmedAvg(beta=2/7)`` trimming int(2/7 x 7) = 2 replies from each end, run by Flower's own
    ``Strategy.start`` over the grid for three rounds. Each round's model is the coordinate-wise mean of the middle
    three replies, replayed by hand from the clients' SGD and the attackers' flipped updates; plain FedAvg under the
    same attack is dragged far from it."""
    beta = 2 / 7
    task = blobs(7, features=4, classes=3, local_steps=3, lr=0.2, malicious_fraction=beta, attack_scale=10.0,
                 num_samples=280)  # fmt: skip
    attackers = [p for p in range(7) if task.is_malicious(p)]
    assert len(attackers) == 2
    res = FedTrimmedAvg(fraction_train=1.0, fraction_evaluate=0.0, beta=beta).start(
        grid=ManagedGrid(InProcessGrid(tsclient.app, 7), task), initial_arrays=initial_arrays(task), num_rounds=3
    )
    x = np_(initial_arrays(task))
    for rnd in range(1, 4):
        ys = {}
        for p in range(7):
            y, _ = client_model(task, p, rnd, x)
            ys[p] = {k: x[k] - task.attack_scale * (y[k] - x[k]) for k in x} if p in attackers else y
        x = {}
        for k in ys[0]:
            stack = np.sort(np.stack([ys[p][k].astype(np.float32).astype(np.float64) for p in range(7)]), axis=0)
            x[k] = stack[2:5].mean(axis=0).astype(np.float32)
    got = np_(res.arrays)
    for k in x:
        np.testing.assert_allclose(got[k], x[k], rtol=1e-5, atol=1e-6, err_msg=k)
    plain = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid=ManagedGrid(InProcessGrid(tsclient.app, 7), task), initial_arrays=initial_arrays(task), num_rounds=3
    )
    gap = max(float(np.abs(np_(plain.arrays)[k] - x[k]).max()) for k in x)
    assert math.isfinite(gap) and gap > 1.0, gap


# ---- asking a selector or a partitioner for more than there is ------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("entry", ["simulate", "run_rounds"])
def test_a_selector_asked_for_more_clients_than_the_run_has_is_refused_before_any_work(entry):
    """``Selected(..., per_round=5)`` over a run of 4 clients. Before, it picked all 4 every round without a word (as
    ``make_strategy(clients_per_round=5, num_clients=4)`` would be refused); now the run is refused before any client
    trains, naming per_round and the nodes there are."""
    task = blobs(4)
    trained: list[int] = []

    def script(pid, rnd, got, ctx, cfg):
        trained.append(pid)
        return got["arrays"], {}

    strategy = Selected(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1),
                        RandomSelector(seed=0), per_round=5)  # fmt: skip
    needle = r"Selected: per_round=5; expected at most the 4 nodes of the run \(it would pick all 4 each round\)"
    with pytest.raises(FederatedError, match=needle):
        if entry == "simulate":
            simulate(strategy, task, rounds=1)
        else:
            run_rounds(strategy, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not trained


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kw, needle", [
    (dict(num_classes=3, classes_per_client=4),
     "classes_per_client=4 with partitioner='shards' over the 3 classes of dataset='blobs'; expected at most 3"),
    (dict(dataset="digits", classes_per_client=11),
     "classes_per_client=11 with partitioner='shards' over the 10 classes of dataset='digits'; expected at most 10"),
    (dict(num_samples=20, classes_per_client=3),
     "classes_per_client=3 with partitioner='shards' for num_clients=10 cuts the 20 examples into 30 shards; expected "
     r"at most 20 shards \(classes_per_client <= 2\)"),
])  # fmt: skip
def test_shards_of_more_classes_than_the_dataset_has_or_more_shards_than_examples_are_refused_on_creation(kw, needle):
    """``partitioner='shards'`` cuts the label-sorted data into num_clients x classes_per_client shards. Before, more
    classes per client than the dataset has were taken (each client a near-IID mix of up to 10 classes when 11 were
    asked), and more shards than examples failed only once a client built its data, saying 'num_clients=30' of a
    run of 10. Both are refused when the Task is made, naming classes_per_client."""
    base = dict(dataset="blobs", num_samples=200, num_features=3, num_classes=3, num_clients=10, partitioner="shards")
    with pytest.raises(ValueError, match=f"Task: {needle}"):
        Task(**{**base, **kw})


@pytest.mark.timeout(60)
def test_shards_at_the_limit_give_each_client_its_classes_per_client_examples():
    """At the limit, 30 examples for 10 clients of 3 shards each: every shard is one example and every client holds
    exactly three, all of the dataset between them; and classes_per_client equal to the classes (3 of 3) is taken."""
    task = Task(dataset="blobs", num_samples=30, num_features=3, num_classes=3, num_clients=10, partitioner="shards",
                classes_per_client=3)  # fmt: skip
    sizes = [len(task.client_data(p)[1]) + len(task.client_data(p)[3]) for p in range(10)]
    assert sizes == [3] * 10
    labels = np.concatenate([np.concatenate([task.client_data(p)[1], task.client_data(p)[3]]) for p in range(10)])
    assert np.bincount(labels, minlength=3).sum() == 30
