"""Federated scenarios, round 10 (1 of 2): local training set by the round config, FedProx with each client its own
epochs, SCAFFOLD over a sample, 200 clients of one example, label skew at alpha -> 0, a dataset of one class.

tilestack's ClientApp (replayed with ``_fl_round7.client_model`` and ``_fl_round10.scaffold_client``: the same seeded
minibatches) over tilestack's in-process Flower ``Grid`` under ``ManagedGrid``; the server's rule in float64, or the
model in closed form where one exists (one SGD step of logistic regression from zero).

What this round found, fixed:

- *The round config's training settings were ignored.* Flower's own apps send local hyperparameters in the round
  config (``train_config=ConfigRecord({"lr": 0.01})``, a strategy setting a learning-rate schedule or each client's
  epochs in ``configure_train``); tilestack's ClientApp trained every round by the task's own lr and steps without a
  word (``run_rounds(..., train_config={"lr": 0.3})`` gave the model of lr 0.01). The client now reads ``lr``,
  ``local-epochs``, ``local-steps`` and ``batch-size`` from the config (client.task_from_config), the grid plans each
  client's work (and a straggler's share of it) from them, a value the Task refuses is refused before any work
  naming the config key, FedProx's step bound is checked against the config's lr, a checkpoint records them, and a
  config key no client reads (``learning_rate``) is named in a warning.
- *A dataset of one class.* A user's file whose labels are all one class made a one-output model that scored every
  example right (test accuracy 1.0 of nothing learned), and NaN labels became a class of their own; both are
  refused naming the file (task.load_file).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import numpy as np
import pytest
from _fl_round5 import np_, scripted
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import logreg_one_step_from_zero, save_npz, scaffold_client, with_config
from flwr.serverapp.strategy import FedAvg, FedProx

from tilestack.errors import FederatedError
from tilestack.federated import ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import Scaffold


def _task(**kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=5,
                          local_steps=2, batch_size=8, lr=0.05, partitioner="quantity", seed=3), **kw})  # fmt: skip


def _grid(task: Task, system: SystemModel | None = None) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(tsclient.app, task.num_clients), task, system=system)


# ---- local training set by the round config --------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("config, fields", [
    ({"lr": 0.3, "local-steps": 4, "batch-size": 5}, dict(lr=0.3, local_steps=4, batch_size=5)),
    ({"local-epochs": 2.0}, dict(local_epochs=2.0, local_steps=None)),   # epochs where the task fixed its steps
])  # fmt: skip
def test_training_settings_in_the_round_config_train_the_clients_as_flowers_apps_send_them(config, fields):
    """``run_rounds(..., train_config={"lr": 0.3, ...})``, as Flower's quickstart sends its learning rate. Before, the
    clients trained by the task's lr 0.05 and 2 steps whatever the config said (the model was the run without it).
    Now each client runs the SGD of the task with the config's settings, replayed by hand, the round's model is the
    example-weighted mean of those, and the grid counts the steps the config asks for."""
    task = _task()
    asked = dataclasses.replace(task, **fields)
    models: list[dict] = []
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task),
                     num_rounds=2, train_config=config, extra_metrics=keep(models))  # fmt: skip
    plain = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task),
                       num_rounds=2)  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        near(models[rnd - 1], weighted_mean({p: client_model(asked, p, rnd, x)[0] for p in range(5)},
                                            {p: task.num_train(p) for p in range(5)}))  # fmt: skip
        x = models[rnd - 1]
        full = sum(asked.steps_for(p) for p in range(5))
        assert r.steps_done == r.steps_full == full != sum(task.steps_for(p) for p in range(5))
        assert [r.client_train[str(p)]["num-steps"] for p in range(5)] == [asked.steps_for(p) for p in range(5)]
    assert not np.allclose(np_(res.arrays)["fc.weight"], np_(plain.arrays)["fc.weight"])


@pytest.mark.timeout(60)
def test_a_learning_rate_schedule_set_by_the_strategy_each_round_is_the_one_the_clients_use():
    """A FedAvg that halves the clients' learning rate every round (``config["lr"]`` in its configure_train, as a
    Flower user writes a schedule). Each round's model is the weighted mean of the clients' SGD at that round's lr,
    replayed by hand; before, all three rounds trained at the task's lr."""
    task = _task(num_clients=4)
    rates = {1: 0.4, 2: 0.2, 3: 0.1}

    class Halving(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            return [with_config(m, lr=rates[server_round])
                    for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip

    models: list[dict] = []
    run_rounds(Halving(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task), num_rounds=3,
               extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd in range(1, 4):
        at = dataclasses.replace(task, lr=rates[rnd])
        near(models[rnd - 1], weighted_mean({p: client_model(at, p, rnd, x)[0] for p in range(4)},
                                            {p: task.num_train(p) for p in range(4)}))  # fmt: skip
        x = models[rnd - 1]


@pytest.mark.timeout(60)
def test_fedprox_with_each_client_its_own_epochs_and_stragglers_doing_part_of_them_is_replayed_by_hand():
    """FedProx (mu = 0.5) whose strategy gives client p ``local-epochs`` 1, 2, 3, 4, 5 (a researcher's heterogeneous
    local work), with half the clients stragglers that do a random k/4 of it (stragglers='partial'). Each client runs
    proximal SGD for ceil(work x its own full steps) from the global model, replayed by hand; the grid plans the
    straggler's share from the client's own epochs (steps_full is their sum), and the model is the example-weighted
    mean. Before, every client trained the task's 2 steps and the grid planned from them."""
    task = _task(lr=0.1)
    epochs = {p: float(p + 1) for p in range(5)}
    system = SystemModel(5, straggler_fraction=0.5, straggler_epochs=4, seed=1)

    class OwnEpochs(FedProx):
        def configure_train(self, server_round, arrays, config, grid):
            return [with_config(m, **{"local-epochs": epochs[grid.partition_of[m.metadata.dst_node_id]]})
                    for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip

    own = {p: dataclasses.replace(task, local_epochs=epochs[p], local_steps=None) for p in range(5)}
    models: list[dict] = []
    res = run_rounds(OwnEpochs(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=0.5), _grid(task, system),
                     initial_arrays(task), num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    cut = 0
    for rnd, r in enumerate(res.history.rounds, start=1):
        plans = {p: system.plan(rnd, p, own[p].steps_for(p), 0) for p in range(5)}
        cut += sum(plan.reason == "straggler" for plan in plans.values())
        sent = {p: client_model(own[p], p, rnd, x, work=plans[p].work, mu=0.5) for p in range(5)}
        near(models[rnd - 1], weighted_mean({p: sent[p][0] for p in sent}, {p: task.num_train(p) for p in sent}))
        x = models[rnd - 1]
        assert r.steps_full == sum(own[p].steps_for(p) for p in range(5))
        assert r.steps_done == sum(sent[p][1] for p in sent) < r.steps_full
    assert cut >= 2  # stragglers were there to plan for


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config, needle", [
    ({"lr": -0.1}, "run_rounds: train_config: config lr=-0.1: Task: lr=-0.1; expected > 0"),
    ({"lr": True}, "run_rounds: train_config: config lr=True: Task: lr=True; expected a finite number"),
    ({"local-steps": 0}, "run_rounds: train_config: config local-steps=0: Task: local_steps=0; expected >= 1 or None"),
    ({"batch-size": 2.5}, "run_rounds: train_config: config batch-size=2.5: Task: batch_size=2.5; expected an integer"),
    ({"local-epochs": float("nan")}, "config local-epochs=nan: Task: local_epochs=nan; expected a finite number"),
    ({"lr": 0.5, "proximal": True}, "FedProx: proximal_mu=10.0 with the task's lr=0.5: lr * proximal_mu = 5 >= 2"),
    ({"proximal-mu": -1.0}, "run_rounds: train_config['proximal-mu']=-1.0; expected a number >= 0 and < 2 / lr = 40"),
    ({"proximal-mu": 50, "lr": 0.1}, "train_config['proximal-mu']=50; expected a number >= 0 and < 2 / lr = 20 (lr"),
])  # fmt: skip
def test_round_config_training_settings_that_cannot_be_right_are_refused_before_any_client_trains(config, needle):
    """A negative or boolean learning rate, zero steps, a fractional batch, NaN epochs in ``train_config``, a FedProx
    mu that the config's lr (not the task's 0.05) makes overshoot, and a ``proximal-mu`` in the config (which the
    clients apply under any strategy) below 0 or past 2 / lr: refused naming the key and value before any client is
    asked. Before, every client's training failed on them, ran by the task's settings, or diverged."""
    task = _task(num_clients=3)
    trained = []

    def script(pid, rnd, got, context, cfg):
        trained.append(pid)
        return got["arrays"], {"num-examples": 1}

    proximal = config.pop("proximal", False)
    strategy = (FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=10.0) if proximal
                else FedAvg(fraction_train=1.0, fraction_evaluate=0.0))  # fmt: skip
    grid = ManagedGrid(InProcessGrid(scripted(script), 3), task)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        run_rounds(strategy, grid, initial_arrays(task), num_rounds=1, train_config=config)
    assert not trained
    if proximal:  # the task's own lr passes the same mu's bound: the config's lr was checked
        run_rounds(strategy, ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task), num_rounds=1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("given, needle", [
    ("object", "train_config['tilestack.task'] is a Task; expected task.to_json(), the Task as JSON"),
    ("{not json", "train_config['tilestack.task'] is not a Task as JSON (JSONDecodeError: Expecting property name"),
    ('{"nope": 1}', "train_config['tilestack.task'] is not a Task as JSON (TypeError: Task.__init__() got an "
                    "unexpected keyword argument 'nope')"),
])  # fmt: skip
def test_a_round_config_whose_task_the_clients_cannot_read_is_refused_before_any_work(given, needle):
    """The task a caller puts in ``train_config`` (another task than the grid's, as run_rounds allows) must be a Task
    as JSON: a Task object, broken JSON or an unknown field made every client fail in every round, and the run went
    on aggregating nothing. Refused before any client is asked, naming the entry."""
    task = _task(num_clients=3)
    trained = []

    def script(pid, rnd, got, context, cfg):
        trained.append(pid)
        return got["arrays"], {"num-examples": 1}

    config = {tsclient.TASK_KEY: task if given == "object" else given}
    with pytest.raises(FederatedError, match=re.escape(f"run_rounds: {needle}")):
        run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), ManagedGrid(InProcessGrid(scripted(script), 3),
                   task), initial_arrays(task), num_rounds=1, train_config=config)  # fmt: skip
    assert not trained


@pytest.mark.timeout(30)
@pytest.mark.parametrize("config, needle", [
    ([("lr", 0.3)], "train_config is a list; expected a dict or ConfigRecord of round-config values by name"),
    ("lr=0.3", "train_config is a str; expected a dict or ConfigRecord"),
    ({1: 2}, "train_config is a dict with keys that are not strings; expected a dict or ConfigRecord"),
])  # fmt: skip
def test_a_round_config_that_is_no_mapping_of_names_is_refused_and_a_config_record_is_taken(config, needle):
    """A list of pairs, a string or integer keys as ``train_config`` are refused before any work naming what was
    given (before: Python's bare "'list' object is not a mapping"); Flower's own ``ConfigRecord`` trains as the same
    dict does."""
    from flwr.app import ConfigRecord

    task = _task(num_clients=3)
    with pytest.raises(TypeError, match=f"run_rounds: {needle}"):
        run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task), num_rounds=1,
                   train_config=config)  # fmt: skip
    runs = [run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task),
                       num_rounds=1, train_config=cfg) for cfg in ({"lr": 0.3}, ConfigRecord({"lr": 0.3}))]  # fmt: skip
    for k, v in np_(runs[0].arrays).items():
        np.testing.assert_array_equal(np_(runs[1].arrays)[k], v)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make, needle", [
    (lambda: FedAvg(arrayrecord_key="model"), "FedAvg: arrayrecord_key='model'; expected 'arrays', the record "
                                              "tilestack's ClientApp reads the model from"),
    (lambda: Scaffold(configrecord_key="cfg"), "Scaffold: configrecord_key='cfg'; expected 'config', the record "
                                               "tilestack's ClientApp reads the round config from"),
])  # fmt: skip
def test_a_strategy_sending_its_model_or_config_under_another_record_name_is_refused_before_any_work(make, needle):
    """Flower lets a strategy name the records it sends (``arrayrecord_key``, ``configrecord_key``); tilestack's
    ClientApp reads 'arrays' and 'config', as Flower's own apps do. Before, every client failed on the missing record
    (``KeyError: 'arrays'``) in every round, and the run went on aggregating nothing; now it is refused naming the
    setting, through simulate and run_rounds."""
    task = _task(num_clients=3)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        simulate(make(), task, rounds=2)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        run_rounds(make(), _grid(task), initial_arrays(task), num_rounds=1)


@pytest.mark.timeout(30)
def test_a_round_config_key_no_client_reads_is_named_in_a_warning(caplog):
    """``learning_rate`` (Flower's examples say ``lr``) is read by nobody: the run goes on, and a warning names it and
    the keys the clients do read."""
    task = _task(num_clients=2)
    with caplog.at_level(logging.WARNING, logger="tilestack.federated"):
        run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task), num_rounds=1,
                   train_config={"learning_rate": 0.3, "lr": 0.1})  # fmt: skip
    text = caplog.text
    assert "train_config keys ['learning_rate'] are read by no tilestack client" in text
    assert "['batch-size', 'local-epochs', 'local-steps', 'lr']" in text


@pytest.mark.timeout(60)
def test_resuming_with_another_learning_rate_in_the_round_config_is_refused_naming_it(tmp_path):
    """The config's settings are part of the run: a checkpoint of lr 0.3 resumed with lr 0.2 is another run, refused
    naming the lr of each; resumed with the same config it completes."""
    task = _task(num_clients=3)
    ckpt = tmp_path / "run.ckpt"

    def go(lr, rounds, stop_after=None):
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        return run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=rounds, train_config={"lr": lr},
                          checkpoint=ckpt, stop_after=stop_after)  # fmt: skip

    go(0.3, 3, stop_after=1)
    with pytest.raises(FederatedError, match=r"task: checkpoint has \{'lr': 0.3\}, this run has \{'lr': 0.2\}"):
        go(0.2, 3)
    resumed = go(0.3, 3)
    whole = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task),
                       num_rounds=3, train_config={"lr": 0.3})  # fmt: skip
    for k, v in np_(whole.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("entry", ["simulate", "run_rounds"])
@pytest.mark.parametrize("bad", ["int64", "nan"])
def test_an_integer_or_nan_initial_model_is_refused_before_any_work(entry, bad):
    """An initial model of int64 zeros (built with np.zeros(shape, int), a quantised checkpoint): before, the clients
    trained it in float32 and every aggregate was cast back to int64: three rounds of a model that stayed 0 and
    scored chance, nothing said. One NaN in the initial model: every reply was non-finite and left out, each round
    skipped. Both refused naming the array; the same zeros as float32 learn."""
    from tilestack.federated import codec

    task = _task(num_clients=3, local_steps=5, lr=0.1)
    zeros = {k: np.zeros(v.shape, np.int64 if bad == "int64" else np.float32)
             for k, v in np_(initial_arrays(task)).items()}  # fmt: skip
    if bad == "nan":
        zeros["fc.weight"][1, 2] = np.nan
    needle = f"{entry}: initial['fc.weight'] " + (
        "has dtype int64; expected floating point (float16, float32 or float64): every aggregate is stored in the "
        "model's dtype, and an integer model stays whole numbers" if bad == "int64"
        else "holds 1 non-finite value of 12; expected finite numbers")  # fmt: skip
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3)
    with pytest.raises(ValueError, match=re.escape(needle)):
        if entry == "simulate":
            simulate(strategy, task, rounds=3, initial=codec.to_record(zeros))
        else:
            run_rounds(strategy, _grid(task), codec.to_record(zeros), num_rounds=3)
    as_float = codec.to_record({k: np.nan_to_num(v).astype(np.float32) for k, v in zeros.items()})
    res = simulate(strategy, task, rounds=3, initial=as_float)
    assert np.any(np_(res.arrays)["fc.weight"] != 0) and res.history.rounds[-1].test_acc > 0.5


@pytest.mark.timeout(30)
def test_a_selector_that_is_none_or_models_another_population_is_refused_before_any_work():
    """Selected over a string for a selector (an AttributeError in round 1's configure_train before), and over an
    OortSelector whose SystemModel has 3 or 7 clients for a task of 4: with 3, the run ended with an IndexError in the
    first round that picked client 3; with 7, it ranked the 4 against 3 clients that do not exist. Refused naming
    the numbers; a system of 4 runs."""
    from tilestack.federated.strategies import OortSelector, Selected

    task = _task(num_clients=4)

    def make(selector):
        return Selected(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), selector, per_round=2)

    with pytest.raises(TypeError, match="Selected: selector is a str; expected an object with select"):
        make("oort")
    for n in (3, 7):
        with pytest.raises(ValueError, match=f"Selected: OortSelector's system has num_clients={n}; expected the "
                                             "task's num_clients=4"):  # fmt: skip
            simulate(make(OortSelector(SystemModel(n))), task, rounds=3)
    res = simulate(make(OortSelector(SystemModel(4, speed_sigma=1.0))), task, rounds=3, evaluate=False)
    assert [r.num_aggregated for r in res.history.rounds] == [2, 2, 2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what, needle", [
    ("width", "FedDF: unlabeled has 7 features per input; expected the task's 4 (dataset='blobs')"),
    ("mlp", "FedDF: model has arrays {'fc1.weight': (4, 8), 'fc1.bias': (8,), 'fc2.weight': (8, 3), 'fc2.bias': (3,)}; "
            "expected the task's model {'fc.weight': (4, 3), 'fc.bias': (3,)} (task.build_model())"),
])  # fmt: skip
def test_feddf_with_server_inputs_or_a_model_that_are_not_the_tasks_is_refused_before_any_client_trains(what, needle):
    """FedDF distils on the server's own unlabeled inputs with the model it was given. Before, inputs of 7 features
    for a task of 4 let round 1's clients train and then ended the run in the distillation (numpy's matmul error), and
    an MLP given for a logistic-regression task ended it with a KeyError on 'fc1.weight'. Now refused naming the
    numbers before any client is asked; the task's own model on inputs of its width runs."""
    from tilestack.federated.models import MLP
    from tilestack.federated.strategies import FedDF

    task = _task(num_clients=3, num_classes=3)
    rng = np.random.default_rng(0)
    model, width = (task.build_model(), 7) if what == "width" else (MLP(4, 8, 3), 4)
    trained = []

    def script(pid, rnd, got, context, cfg):
        trained.append(pid)
        return got["arrays"], {"num-examples": 1}

    with pytest.raises(ValueError, match=re.escape(needle)):
        strategy = FedDF(model=model, unlabeled=rng.normal(size=(10, width)), fraction_train=1.0, fraction_evaluate=0.0)
        grid = ManagedGrid(InProcessGrid(scripted(script), 3), task)
        run_rounds(strategy, grid, initial_arrays(task), num_rounds=1)
    assert not trained
    ok = FedDF(model=task.build_model(), unlabeled=rng.normal(size=(10, 4)), steps=5, fraction_train=1.0,
               fraction_evaluate=0.0)  # fmt: skip
    assert simulate(ok, task, rounds=1, evaluate=False).history.rounds[0].num_aggregated == 3


# ---- SCAFFOLD over a sample of the clients ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_scaffold_over_half_the_clients_each_round_keeps_every_clients_variate_as_written_out():
    """SCAFFOLD sampling 3 of 6 clients a round for 4 rounds: each sampled client corrects its gradients by c - c_i
    with the c_i it left the last time it was sampled (zero before), the server moves x to the weighted mean and c by
    |S| / N = 3/6 times the mean change of the c_i. Replayed by hand from the clients the run sampled; the server's
    c after every round is the one written out, and so is the model."""
    task = _task(num_clients=6, local_steps=3, lr=0.1)
    cs: list[dict] = []
    models: list[dict] = []

    def hook(strategy, arrays, r):
        cs.append({k: v.copy() for k, v in strategy.c.items()})
        return keep(models)(strategy, arrays, r)

    res = run_rounds(Scaffold(fraction_train=0.5, fraction_evaluate=0.0), _grid(task), initial_arrays(task),
                     num_rounds=4, extra_metrics=hook, seed=5)  # fmt: skip
    x = np_(initial_arrays(task))
    c = {k: np.zeros_like(v) for k, v in x.items()}
    ci = {p: {k: np.zeros_like(v) for k, v in x.items()} for p in range(6)}
    sampled = set()
    for rnd, r in enumerate(res.history.rounds, start=1):
        s = sorted(int(p) for p in r.client_train)
        assert len(s) == 3 and r.num_aggregated == 3
        sampled |= set(s)
        ys, dcs = {}, []
        for p in s:
            ys[p], new, _ = scaffold_client(task, p, rnd, x, c, ci[p])
            dcs.append({k: (new[k] - ci[p][k]).astype(np.float64) for k in new})
            ci[p] = new
        mean = weighted_mean(ys, {p: task.num_train(p) for p in s})
        near(models[rnd - 1], mean)
        c = {k: (c[k] + 3 / 6 * np.mean([d[k] for d in dcs], axis=0)).astype(np.float32) for k in c}
        for k in c:
            np.testing.assert_allclose(cs[rnd - 1][k], c[k], rtol=1e-6, atol=1e-7, err_msg=f"round {rnd} c[{k}]")
        x = models[rnd - 1]
    assert len(sampled) >= 5  # clients came back after rounds away, with the c_i they had


# ---- 200 clients of one training example -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_200_clients_of_one_example_each_give_the_closed_form_mean_of_their_single_sgd_steps(tmp_path):
    """200 clients, each with 2 examples (one to train on, one to test), one SGD step of batch 1 from the zero model:
    each client's model is -lr x its gradient at 1/C probabilities, in closed form, and FedAvg's is their plain mean
    (every client weighs 1 example). Federated evaluation over all 200 reports the share of test examples the model
    gets right, computed here from the model by hand. The round takes seconds."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    x = (rng.normal(0, 1, (400, 5)) + 2.0 * np.eye(3, 5)[y]).astype(np.float32)
    task = Task(dataset="file", data_path=save_npz(tmp_path / "tiny.npz", x, y), num_clients=200, local_steps=1,
                batch_size=1, lr=0.5)  # fmt: skip
    t0 = time.perf_counter()
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=200), task, rounds=1,
                   evaluate=False)  # fmt: skip
    assert time.perf_counter() - t0 < 30
    data = [task.client_data(p) for p in range(200)]
    assert all(len(d[1]) == 1 and len(d[3]) == 1 for d in data)
    want = {k: np.mean([logreg_one_step_from_zero(d[0], d[1], 3, 0.5)[k] for d in data], axis=0)
            for k in ("fc.weight", "fc.bias")}  # fmt: skip
    got = np_(res.arrays)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    r = res.history.rounds[0]
    assert (r.num_selected, r.num_aggregated, len(r.client_eval)) == (200, 200, 200)
    hits = [float(np.argmax(d[2] @ want["fc.weight"] + want["fc.bias"]) == d[3][0]) for d in data]
    assert r.eval_metrics["eval-acc"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert r.eval_metrics["eval-acc"] > 0.5  # one step from 200 examples already separates the classes


# ---- label skew at alpha -> 0 ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_dirichlet_label_skew_near_zero_leaves_most_clients_one_class_and_fedavg_weights_them_exactly():
    """Dirichlet(1e-6) over 12 clients and 4 classes: each class lands on about one client, so most clients hold a
    single class (topped up to 2 examples where the draw left them none) and a few hold the rest. Every example is
    on exactly one client, and FedAvg's model over two rounds is the example-weighted mean replayed by hand."""
    task = _task(num_samples=400, num_classes=4, num_clients=12, partitioner="dirichlet", partition_alpha=1e-6,
                 lr=0.1)  # fmt: skip
    data = [task.client_data(p) for p in range(12)]
    sizes = [len(d[1]) + len(d[3]) for d in data]
    assert sum(sizes) == 400 and min(sizes) >= 2
    single = [p for p, d in enumerate(data) if len(np.unique(np.concatenate([d[1], d[3]]))) == 1]
    assert len(single) >= 8 and max(sizes) > 100
    models: list[dict] = []
    run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), _grid(task), initial_arrays(task), num_rounds=2,
               extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd in (1, 2):
        near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(12)},
                                            {p: task.num_train(p) for p in range(12)}))  # fmt: skip
        x = models[rnd - 1]


# ---- a partitioner asked of a dataset that generates each client's data -------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kw, needle", [
    (dict(partitioner="dirichlet", partition_alpha=0.1), "Task: partitioner='dirichlet' with dataset='synthetic', "
     "which generates each client's own data (it was ignored); expected partitioner='iid', or a pooled dataset"),
    (dict(dataset="clustered", feature_shift=0.5), "Task: feature_shift=0.5 with dataset='clustered', which generates "
     "each client's own data (it was ignored); expected feature_shift=0.0"),
])  # fmt: skip
def test_label_skew_or_feature_shift_asked_of_a_generated_dataset_is_refused_not_ignored(kw, needle):
    """``Task(partitioner="dirichlet", partition_alpha=0.1)`` without a dataset is Synthetic(1, 1) (the default),
    whose clients each generate their own data: the Dirichlet label skew asked for was ignored, every client the same
    as under 'iid', and so was a feature shift for 'clustered'. Refused naming the setting and the datasets it
    splits; on blobs the same partitioner gives the skew."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        Task(**kw, num_clients=10)
    skewed = Task(dataset="blobs", partitioner="dirichlet", partition_alpha=0.1, num_clients=10, num_samples=600)
    assert np.mean([len(np.unique(skewed.client_data(p)[1])) for p in range(10)]) < 0.7 * skewed.num_classes


# ---- a dataset of one class ------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("labels, needle", [
    ("ones", "has the single label 3; expected examples of at least 2 classes"),
    ("names", "has the single label 'cat'; expected examples of at least 2 classes"),
    ("nan", "has non-finite labels; expected a class label in every row"),
    ("reals", "has a label 0.25 that is not a whole number; expected class labels (integers or names), not a "
              "regression target"),
])  # fmt: skip
def test_a_users_dataset_of_one_class_or_with_nan_labels_is_refused_naming_the_file(tmp_path, labels, needle):
    """Before, a file whose labels are all 3 made a task of one class: a one-output model that scored every example
    right (test accuracy 1.0 of nothing learned); NaN labels became a class of their own, and so did every distinct
    value of a regression target (0, 0.25, 0.5, ...: 20 classes of one example)."""
    x = np.random.default_rng(0).normal(size=(20, 3))
    if labels == "names":
        path = tmp_path / "one.csv"
        path.write_text("".join(f"{a},{b},{c},cat\n" for a, b, c in x))
    else:
        y = {"ones": np.full(20, 3), "nan": np.where(np.arange(20) % 5, np.arange(20) % 2, np.nan),
             "reals": np.arange(20) * 0.25}[labels]  # fmt: skip
        path = save_npz(tmp_path / "one.npz", x, y)
    with pytest.raises(ValueError, match=re.escape(f"Task: data_path='{path}' {needle}")):
        Task(dataset="file", data_path=str(path), num_clients=2)


# ---- on Flower's own Simulation Engine -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_schedule_and_each_clients_epochs_from_the_config_run_the_same_on_flowers_simulation_engine():
    """FedProx whose configure_train sets lr 0.4 / round for everyone and ``local-epochs`` 1..4 by client, with
    stragglers: on Flower's Simulation Engine (Ray workers read the same config) the model is bit for bit the
    in-process engine's, and so is the record (work planned from each client's own epochs, its evaluation)."""
    import json

    task = _task(num_clients=4)

    class Scheduled(FedProx):
        def configure_train(self, server_round, arrays, config, grid):
            return [with_config(m, lr=0.4 / server_round,
                                **{"local-epochs": float(1 + grid.partition_of[m.metadata.dst_node_id])})
                    for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip

    system = SystemModel(4, straggler_fraction=0.5, straggler_epochs=4, seed=1)

    def run(engine):
        return simulate(Scheduled(fraction_train=1.0, fraction_evaluate=0.5, proximal_mu=0.5), task, rounds=2,
                        engine=engine, system=system)  # fmt: skip

    ours, flower = run("tilestack"), run("flower")
    x, y = np_(ours.arrays), np_(flower.arrays)
    assert all(np.array_equal(x[k], y[k]) for k in x)

    def record(res):
        return json.dumps([{k: v for k, v in r.items() if k != "wall_time"} for r in res.history.to_dict()["rounds"]])

    assert record(ours) == record(flower)
    full = sum(dataclasses.replace(task, local_epochs=1.0 + p, local_steps=None).steps_for(p) for p in range(4))
    assert [r.steps_full for r in flower.history.rounds] == [full, full]
    assert all(r.steps_done < r.steps_full for r in flower.history.rounds)  # stragglers did part of their own epochs
