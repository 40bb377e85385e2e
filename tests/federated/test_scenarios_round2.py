"""Federated scenarios tilestack had not been tried on (round 2), with real Flower strategies, ClientApps and grids.

Each test says what broke before: a hang in Flower's node sampling, a client that never returns, a crash on
clients without examples, a HeteroFL sub-model that cut the input layer, a Dirichlet split that could not be
made, SecAgg+ dropouts that were never simulated, bad arguments found only after work had started.
"""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedProx
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app as cli_app
from tilestack.errors import FederatedError
from tilestack.federated import ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated import partition as P
from tilestack.federated.client import TASK_KEY
from tilestack.federated.compression import Compressed, compress_update
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.models import SoftmaxRegression, evaluate, local_sgd
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import NAMES, HeteroFL, RandomSelector, Scaffold, Selected, make_strategy, sub_model

TINY = dict(dataset="synthetic", num_clients=6, max_samples=60, local_steps=2, lr=0.05)


def _np(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    x, y = _np(a), _np(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _fedavg(**kw) -> FedAvg:
    return FedAvg(**{"fraction_train": 1.0, "fraction_evaluate": 0.0, **kw})


# ---- sampling settings under which Flower's sample_nodes waits forever --------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make, num_clients, needle",
    [
        (lambda: FedAvg(fraction_train=1.5, fraction_evaluate=0.0), 6, "fraction_train=1.5; expected a number in"),
        (lambda: FedAvg(fraction_train=0.5, fraction_evaluate=-0.1), 6, "fraction_evaluate=-0.1; expected"),
        (lambda: _fedavg(min_train_nodes=9, min_available_nodes=1), 6, "min_train_nodes=9; expected <= 6"),
        (lambda: _fedavg(min_available_nodes=7), 6, "min_available_nodes=7; expected <= 6"),
        (lambda: FedAvg(fraction_evaluate=0.0), 1, "min_train_nodes=2; expected <= 1"),  # Flower's defaults, 1 client
        (lambda: FedAvg(fraction_train=0.5, fraction_evaluate=1.0, min_evaluate_nodes=8), 6, "min_evaluate_nodes=8"),
        (lambda: Selected(_fedavg(min_train_nodes=3, min_available_nodes=3), RandomSelector(0), per_round=3), 2,
         "min_train_nodes=3; expected <= 2"),
        (lambda: Compressed(_fedavg(min_available_nodes=10), "int8"), 6, "min_available_nodes=10"),
    ],
)  # fmt: skip
def test_sampling_that_would_wait_forever_is_refused_before_any_work(monkeypatch, make, num_clients, needle):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("tilestack.federated.simulation.Evaluator", no_work)
    monkeypatch.setattr("tilestack.federated.simulation.InProcessGrid", no_work)
    # nor a wait: Flower's sampling polls once a second for nodes (a bound on wall time instead moved with CI's load)
    monkeypatch.setattr("flwr.serverapp.strategy.strategy_utils.sleep", no_work)
    with pytest.raises(FederatedError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        simulate(make(), Task(**{**TINY, "num_clients": num_clients}), rounds=2)


@pytest.mark.timeout(60)
def test_run_rounds_checks_the_strategy_against_the_nodes_that_answered_the_roll_call():
    task = Task(**TINY)
    grid = ManagedGrid(InProcessGrid(tsclient.app, 6), task)
    with pytest.raises(FederatedError, match="min_available_nodes=8; expected <= 6"):
        run_rounds(_fedavg(min_available_nodes=8), grid, initial_arrays(task), num_rounds=1)


def test_a_round_that_samples_nobody_or_whose_clients_all_fail_keeps_the_model_and_says_why():
    task = Task(**TINY, faults=tuple((p, "crash") for p in range(6)))
    res = simulate(_fedavg(), task, rounds=2)
    assert all(r.skipped == "no replies to aggregate" and r.num_aggregated == 0 for r in res.history.rounds)
    assert all(len(r.excluded) == 6 and r.excluded["0"].startswith("error:") for r in res.history.rounds)
    assert _same(res.arrays, initial_arrays(task))
    none = simulate(FedAvg(fraction_train=0.0, fraction_evaluate=0.0), Task(**TINY), rounds=1)
    assert none.history.rounds[0].skipped == "no clients were sampled for training"


# ---- bad arguments: named, with the value and what was expected, before any work -----------------------
@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(rounds=-1), ValueError, "simulate: rounds=-1; expected an integer >= 0"),
        (dict(rounds=2.5), ValueError, "rounds=2.5; expected an integer"),
        (dict(rounds=True), ValueError, "rounds=True; expected an integer"),
        (dict(seed=-3), ValueError, "seed=-3; expected an integer >= 0"),
        (dict(timeout=-1.0), ValueError, "timeout=-1.0; expected None"),
        (dict(timeout=float("nan")), ValueError, "timeout=nan; expected None"),
        (dict(workers=0), ValueError, "workers=0; expected an integer >= 1"),
        (dict(eval_clients=0), ValueError, "eval_clients=0; expected an integer >= 1"),
        (dict(stragglers="wait"), ValueError, "stragglers='wait'; expected one of"),
        (dict(engine="ray"), ValueError, "engine='ray'; expected one of"),
        (dict(stop_after=-1), ValueError, "stop_after=-1; expected an integer >= 0"),
        (dict(system=SystemModel(5)), ValueError, "system.num_clients=5; expected task.num_clients=6"),
        (dict(strategy="fedavg"), TypeError, "strategy is a str; expected"),
        (dict(task={"dataset": "blobs"}), TypeError, "task is a dict; expected"),
    ],
)
def test_bad_simulate_arguments_are_named_before_any_work(monkeypatch, kwargs, error, needle):
    def no_work(*args, **kw):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("tilestack.federated.simulation.Evaluator", no_work)
    monkeypatch.setattr("tilestack.federated.simulation.InProcessGrid", no_work)
    call = dict(strategy=_fedavg(), task=Task(**TINY), rounds=1) | kwargs
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        simulate(call.pop("strategy"), call.pop("task"), **call)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(dataset="blobs", num_samples=10, num_clients=20), "num_samples=10 for num_clients=20; expected"),
        (dict(dataset="digits", num_clients=1000), "num_clients=1000 for the 1797 examples"),
        (dict(dataset="blobs", partitioner="dirichlet", partition_alpha=0.0), "partition_alpha=0.0; expected > 0"),
        (dict(dataset="blobs", partitioner="shards", classes_per_client=0), "classes_per_client=0; expected >= 1"),
        (dict(model="mlp", hidden=0), "hidden=0; expected >= 1"),
        (dict(dataset="blobs", num_classes=1), "num_classes=1; expected >= 2"),
        (dict(lr=float("nan")), "lr=nan; expected a finite number"),
        (dict(num_clients=2.5), "num_clients=2.5; expected an integer"),
        (dict(seed=-1), "seed=-1; expected >= 0"),
        (dict(max_samples=10), "max_samples=10; expected >= 50"),
        (dict(dataset="clustered", samples_per_client=1), "samples_per_client=1; expected >= 2"),
        (dict(model="cnn"), "model='cnn' on 60 features"),
        (dict(slow_seconds=-1), "slow_seconds=-1"),
        (dict(faults=((True, "crash"),)), "faults entry (True, 'crash')"),
    ],
)
def test_bad_task_arguments_are_named_on_creation(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Task(**kwargs)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--rounds", "-1"], "--rounds"),
        (["--strategy", "fedsgd"], "--strategy 'fedsgd'; expected one of"),
        (["--eval-fraction", "1.5"], "--eval-fraction 1.5; expected a share in [0, 1]"),
        (["--strategy", "fedprox", "--mu", "-1"], "proximal_mu=-1.0; expected"),
        (["--mu", "1"], "--mu 1 is a setting of --strategy fedprox; got --strategy fedavg"),
        (["--strategy", "fedprox", "--server-lr", "0.5"], "--server-lr 0.5 is a setting of --strategy fedadam or "
         "fedyogi"),
        (["--q", "2"], "--q 2 is a setting of --strategy qfedavg"),
        (["--strategy", "krum", "--noise", "2"], "--noise 2 is a setting of --strategy dp-fedavg"),
        (["--engine", "ray"], "engine='ray'; expected"),
        (["--straggler-policy", "wait"], "straggler_policy='wait'; expected"),
        (["--timeout", "-2"], "--timeout"),
        (["--trace", "/nonexistent/trace.csv"], "--trace '/nonexistent/trace.csv' is not there"),
        (["--model", "cnn"], "model='cnn' on 60 features"),
        (["--checkpoint", "/proc/no-such-dir/run.ckpt"], "--checkpoint '/proc/no-such-dir/run.ckpt' cannot be written"),
    ],
)
def test_fl_run_refuses_bad_arguments_before_any_round(extra, needle):
    args = ["fl", "run", "--clients", "6", "--per-round", "3", "--rounds", "1", "--local-steps", "2", *extra]
    res = CliRunner().invoke(cli_app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output
    assert needle in res.output and "test accuracy" not in res.output


# ---- stragglers that never return ---------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_that_never_returns_is_dropped_at_the_timeout(workers):
    task = Task(**TINY, faults=((1, "slow"),), slow_seconds=3600.0)
    t0 = time.perf_counter()
    res = simulate(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, timeout=2.0, workers=workers)
    assert time.perf_counter() - t0 < 30  # two rounds of one 2 s timeout, not an hour
    for r in res.history.rounds:
        assert r.excluded == {"1": "timeout: no reply within 2.0 s"} and r.num_aggregated == 5 and not r.skipped


def test_a_timeout_that_nobody_reaches_changes_nothing():
    """Under a timeout clients run on threads with a copy of their state: SCAFFOLD's c_i must still carry over."""
    task = Task(**TINY, faults=((2, "crash"),))
    plain = simulate(Scaffold(fraction_train=0.5, fraction_evaluate=0.5), task, rounds=3, seed=4)
    timed = simulate(Scaffold(fraction_train=0.5, fraction_evaluate=0.5), task, rounds=3, seed=4, timeout=60.0)
    assert _same(plain.arrays, timed.arrays)
    assert [r.excluded for r in plain.history.rounds] == [r.excluded for r in timed.history.rounds]


# ---- data edge cases ----------------------------------------------------------------------------------
def test_dirichlet_alpha_001_is_topped_up_so_every_client_can_train():
    y = np.random.default_rng(0).integers(0, 3, 300)
    parts = P.dirichlet(y, 40, 0.01, seed=1, min_size=2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))  # every sample once
    assert min(len(p) for p in parts) >= 2
    assert np.mean([len(np.unique(y[p])) for p in parts]) < 1.5  # still about one class per client
    again = P.dirichlet(y, 40, 0.01, seed=1, min_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # seeded
    task = Task(dataset="blobs", num_samples=240, num_features=5, num_classes=3, num_clients=40,
                partitioner="dirichlet", partition_alpha=0.01, local_steps=2, lr=0.05)  # fmt: skip
    res = simulate(FedAvg(fraction_train=0.25, fraction_evaluate=0.25), task, rounds=2)
    assert all(r.num_aggregated == 10 and not r.excluded for r in res.history.rounds)


def test_one_class_per_client_shards_run():
    task = Task(dataset="blobs", num_samples=40, num_features=5, num_classes=4, num_clients=20, partitioner="shards",
                classes_per_client=1, local_steps=2, lr=0.05)  # fmt: skip
    assert max(len(np.unique(task.client_data(p)[1])) for p in range(20)) == 1
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), task, rounds=2)
    assert all(r.num_aggregated == 20 for r in res.history.rounds)
    assert np.isfinite(res.history.rounds[-1].test_acc)


def test_local_training_and_evaluation_on_no_examples():
    model = SoftmaxRegression(3, 2)
    params = {k: v + 1.0 for k, v in model.init(np.random.default_rng(0)).items()}
    empty_x, empty_y = np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
    out, steps, loss = local_sgd(model, params, empty_x, empty_y, steps=5, batch_size=2, lr=0.1,
                                 rng=np.random.default_rng(0))  # fmt: skip
    assert steps == 0 and np.isnan(loss) and all(np.array_equal(out[k], params[k]) for k in params)
    assert all(np.isnan(v) for v in evaluate(model, params, empty_x, empty_y))
    one = local_sgd(model, params, np.ones((1, 3), np.float32), np.zeros(1, np.int64), steps=3, batch_size=4, lr=0.1,
                    rng=np.random.default_rng(0))  # fmt: skip
    assert one[1] == 3 and np.isfinite(one[2])


def _misbehaving_app(behaviour: dict[int, str]) -> ClientApp:
    """tilestack's real ClientApp, whose replies some partitions change: 'empty' (num-examples 0), 'inf', or
    the first array's bytes made malformed ('int8-short', 'topk-odd', 'npy-cut', 'stype')."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        reply = tsclient.train(msg, context)
        kind = behaviour.get(int(context.node_config["partition-id"]))
        if kind is None:
            return reply
        arrays = codec.to_numpy(reply.content["arrays"])
        metrics = dict(reply.content["metrics"])
        if kind == "empty":
            metrics["num-examples"] = 0
        if kind == "inf":
            arrays = {k: np.full_like(v, np.inf) for k, v in arrays.items()}
        record = codec.to_record(arrays)
        first = next(iter(record))
        a = record[first]
        malformed = {
            "int8-short": dict(stype=codec.INT8_STYPE, data=b"\x00\x01"),
            "topk-odd": dict(stype=codec.TOPK_STYPE, data=b"\x00" * 7),
            "npy-cut": dict(stype=a.stype, data=a.data[:-8]),
            "stype": dict(stype="no-such-serialisation", data=a.data),
        }
        if kind in malformed:
            record[first] = Array(dtype=a.dtype, shape=tuple(a.shape), **malformed[kind])
        content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


@pytest.mark.parametrize("behaviour, kept", [({0: "empty", 3: "inf"}, 4), ({p: "empty" for p in range(6)}, 0)])
def test_clients_without_examples_or_with_inf_weights_are_left_out(behaviour, kept):
    task = Task(**TINY)
    grid = ManagedGrid(InProcessGrid(_misbehaving_app(behaviour), 6), task)
    config = {TASK_KEY: task.to_json()}
    res = run_rounds(_fedavg(), grid, initial_arrays(task), num_rounds=2, train_config=config)
    for r in res.history.rounds:
        assert r.num_aggregated == kept
        for pid, kind in behaviour.items():
            want = "empty: num-examples=0, expected > 0" if kind == "empty" else "non-finite"
            assert r.excluded[str(pid)].startswith(want)
    assert all(np.all(np.isfinite(v)) for v in _np(res.arrays).values())
    assert _same(res.arrays, initial_arrays(task)) == (kept == 0)


@pytest.mark.parametrize("kind", ["int8-short", "topk-odd", "npy-cut", "stype"])
def test_a_reply_whose_bytes_do_not_decode_costs_that_client_not_the_run(kind):
    task = Task(**TINY)
    grid = ManagedGrid(InProcessGrid(_misbehaving_app({2: kind}), 6), task)
    config = {TASK_KEY: task.to_json()}
    res = run_rounds(_fedavg(), grid, initial_arrays(task), num_rounds=2, train_config=config)
    for r in res.history.rounds:
        assert r.num_aggregated == 5 and r.excluded["2"].startswith("malformed: fc.weight")


# ---- HeteroFL with odd widths and hidden == input or output size --------------------------------------
@pytest.mark.parametrize("features, hidden, classes", [(7, 7, 3), (6, 3, 3), (5, 5, 5)])
def test_heterofl_odd_widths_cut_only_hidden_units(features, hidden, classes):
    task = Task(dataset="blobs", num_samples=300, num_features=features, num_classes=classes, num_clients=3,
                model="mlp", hidden=hidden, local_steps=3, lr=0.05)  # fmt: skip
    widths = (1.0, 0.33, 0.17)
    sub = sub_model(task.initial_params(), hidden, 0.17)
    assert sub["fc1.weight"].shape == (features, 1) and sub["fc2.weight"].shape == (1, classes)
    assert sub["fc2.bias"].shape == (classes,)
    res = simulate(HeteroFL(width_of=lambda p: widths[p], hidden=hidden, fraction_train=1.0, fraction_evaluate=1.0,
                            min_available_nodes=3), task, rounds=2)  # fmt: skip
    assert all(r.num_aggregated == 3 and not r.excluded for r in res.history.rounds)
    assert res.arrays["fc1.weight"].numpy().shape == (features, hidden)


def test_heterofl_refuses_a_hidden_width_the_model_does_not_have():
    task = Task(dataset="blobs", num_samples=300, num_features=6, num_clients=3, model="mlp", hidden=16, local_steps=2)
    s = HeteroFL(width_of=lambda p: 0.5, hidden=32, fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3)
    with pytest.raises(ValueError, match=r"hidden=32; expected the global model's hidden width 16"):
        simulate(s, task, rounds=1)
    with pytest.raises(ValueError, match=r"width=1.5; expected in \(0, 1\]"):
        sub_model(task.initial_params(), 16, 1.5)


# ---- every named strategy with one client, and with every client failing ------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if n != "bulyan"])
def test_every_named_strategy_with_a_single_client_and_with_all_clients_failing(name):
    blobs = dict(dataset="blobs", num_samples=60, num_features=5, num_classes=3, local_steps=2, lr=0.05)
    if name == "fedbn":
        blobs |= dict(model="mlp", hidden=4, norm=True)
    for n, faults in ((1, ()), (3, ((0, "crash"), (1, "nan"), (2, "shape")))):
        task = Task(**blobs, num_clients=n, faults=faults)
        s = make_strategy(name, clients_per_round=n, num_clients=n, eval_fraction=1.0)
        initial = s.initial_arrays(task) if hasattr(s, "initial_arrays") else initial_arrays(task)
        res = simulate(s, task, rounds=2, initial=initial)
        assert all(np.all(np.isfinite(v)) for v in _np(res.arrays).values())
        if faults:
            assert all(r.num_aggregated == 0 and r.skipped for r in res.history.rounds)
            assert _same(res.arrays, initial)
        else:
            assert all(r.num_aggregated == 1 and not r.skipped for r in res.history.rounds)


# ---- resume after an interrupted run --------------------------------------------------------------------
class _InterruptedOnce(Scaffold):
    """SCAFFOLD whose aggregation is interrupted (Ctrl-C) in round 3 the first time."""

    armed = True

    def aggregate_train(self, server_round, replies):
        if server_round == 3 and _InterruptedOnce.armed:
            _InterruptedOnce.armed = False
            raise KeyboardInterrupt
        return super().aggregate_train(server_round, replies)


def test_a_run_interrupted_mid_round_resumes_to_the_same_model(tmp_path):
    task = Task(**TINY, faults=((4, "crash"),))

    def run(**kw):
        return simulate(_InterruptedOnce(fraction_train=0.5, fraction_evaluate=0.5), task, rounds=5, seed=2, **kw)

    _InterruptedOnce.armed = False
    full = run()
    ckpt = tmp_path / "new" / "folder" / "run.ckpt"  # a folder that does not exist yet is made
    _InterruptedOnce.armed = True
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=ckpt)
    assert ckpt.exists() and not list(ckpt.parent.glob("*.tmp"))  # no temporary left (save_checkpoint's own)
    resumed = run(checkpoint=ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4, 5]
    assert _same(full.arrays, resumed.arrays)
    assert [r.test_acc for r in full.history.rounds] == [r.test_acc for r in resumed.history.rounds]
    ckpt.write_bytes(ckpt.read_bytes()[:64])  # cut short, as by a full disk
    with pytest.raises(FederatedError, match="checkpoint=.*run.ckpt' cannot be read"):
        run(checkpoint=ckpt)


# ---- seeds ----------------------------------------------------------------------------------------------
def test_one_seed_reproduces_a_run_and_another_seed_samples_differently():
    task = Task(**TINY)
    system = SystemModel(6, straggler_fraction=0.5, dropout=0.2, seed=1)

    def run(seed):
        return simulate(FedProx(fraction_train=0.5, fraction_evaluate=0.5, proximal_mu=0.1), task, rounds=3,
                        system=system, seed=seed)  # fmt: skip

    a, b, c = run(5), run(5), run(6)
    assert _same(a.arrays, b.arrays) and a.history.to_dict() != {"rounds": []}
    assert [(r.test_acc, r.excluded, r.steps_done) for r in a.history.rounds] == [
        (r.test_acc, r.excluded, r.steps_done) for r in b.history.rounds
    ]
    assert not _same(a.arrays, c.arrays)


# ---- secure aggregation with a dropout ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_secure_aggregation_survives_a_dropout_and_refuses_what_it_cannot_do():
    from tilestack.federated.secagg import run_plain, run_secure

    base = dict(dataset="synthetic", num_clients=5, max_samples=80, local_steps=3, lr=0.05)
    dropped = Task(**base, faults=((1, "crash"),))
    secure = run_secure(dropped, rounds=2, per_round=5)
    plain = run_plain(dropped, rounds=2, per_round=5)
    everyone = run_plain(Task(**base), rounds=2, per_round=5)
    for k in plain:
        np.testing.assert_allclose(secure[k], plain[k], atol=1e-4)  # the survivors' average
    assert any(np.abs(plain[k] - everyone[k]).max() > 1e-3 for k in plain)  # the dropout really happened
    with pytest.raises(FederatedError, match="none of the 1 rounds reached the unmasked sum"):
        run_secure(Task(**base, faults=((0, "crash"), (1, "crash"), (2, "crash"))), rounds=1, per_round=5)
    with pytest.raises(ValueError, match=r"task.faults has \[\(2, 'nan'\)\]; expected only dropouts"):
        run_secure(Task(**base, faults=((2, "nan"),)), rounds=1, per_round=5)
    with pytest.raises(ValueError, match="rounds=-1; expected an integer >= 0"):
        run_secure(Task(**base), rounds=-1, per_round=5)


# ---- compression of tiny and empty tensors --------------------------------------------------------------
@pytest.mark.parametrize("spec", ["topk:0.01", "topk:1.0", "int8"])
@pytest.mark.parametrize("shape", [(0,), (), (1,), (0, 3), (1, 1)])
def test_compressing_tiny_and_empty_updates_round_trips(spec, shape):
    from flwr.app import Context

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    start = {"w": np.zeros(shape, np.float32)}
    trained = {"w": np.full(shape, 0.5, np.float32)}
    for _ in range(2):  # the second round adds what the first left out (nothing here: every entry fits)
        dense = codec.decode(compress_update(spec, start, trained, ctx)["w"])
        assert dense.shape == shape and dense.dtype == np.float32
        np.testing.assert_allclose(dense, trained["w"], atol=1e-6)


def test_compressed_training_with_a_single_client():
    task = Task(dataset="blobs", num_samples=40, num_features=3, num_classes=2, num_clients=1, local_steps=3)
    for method in ("topk", "int8"):
        s = Compressed(_fedavg(min_train_nodes=1, min_available_nodes=1), method, 1.0)
        res = simulate(s, task, rounds=2)
        assert all(r.num_aggregated == 1 for r in res.history.rounds)
        assert not _same(res.arrays, initial_arrays(task))


def test_initial_arrays_that_do_not_fit_the_task_are_refused_before_any_work():
    task = Task(**TINY)
    other = initial_arrays(Task(**{**TINY, "model": "mlp", "hidden": 4}))
    with pytest.raises(ValueError, match=r"simulate: initial has .*fc1.weight: \(60, 4\).*expected the task's model"):
        simulate(_fedavg(), task, rounds=1, initial=other)


def test_a_dp_round_short_of_its_accounted_sample_says_so():
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(1e-3, 4, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    s = make_strategy("dp-fedavg", clients_per_round=4, num_clients=4, accountant=RdpAccountant(config))
    res = simulate(s, Task(**{**TINY, "num_clients": 4}, faults=((0, "crash"),)), rounds=1)
    assert res.history.rounds[0].skipped.endswith("with a privacy accountant needs all 4 sampled replies "
                                                  "(the accounted sample size), got 3")  # fmt: skip


def test_run_rounds_without_a_config_sends_the_grids_task():
    task = Task(**TINY)
    grid = ManagedGrid(InProcessGrid(tsclient.app, 6), task)
    res = run_rounds(FedAvg(fraction_train=0.5, fraction_evaluate=1.0), grid, initial_arrays(task), num_rounds=2)
    assert all(r.num_aggregated == 3 and not r.excluded and r.client_acc["mean"] > 0 for r in res.history.rounds)


@pytest.mark.parametrize("spec", ["topk:0.5", "int8"])
def test_one_non_finite_update_does_not_poison_the_error_feedback(spec):
    from flwr.app import Context

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    start = {"w": np.zeros(4, np.float32)}
    bad = codec.decode(compress_update(spec, start, {"w": np.array([np.nan, 1, 2, np.inf], np.float32)}, ctx)["w"])
    assert not np.all(np.isfinite(bad))  # sent as it is: the server leaves it out
    good = codec.decode(compress_update(spec, start, {"w": np.array([0.5, 0.5, 0.5, 0.5], np.float32)}, ctx)["w"])
    assert np.all(np.isfinite(good))


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: RandomSelector(seed=-1), "RandomSelector: seed=-1; expected an integer >= 0"),
        (lambda: Selected(_fedavg(), RandomSelector(0), per_round=0), "Selected: per_round=0; expected an integer"),
        (lambda: make_strategy("fedavg", clients_per_round=2, num_clients=4, server_lr=0.0), "server_lr=0.0"),
        (lambda: make_strategy("fedprox", clients_per_round=2.5, num_clients=4), "clients_per_round=2.5"),
        (lambda: make_strategy("fedsgd", clients_per_round=2, num_clients=4), "name='fedsgd'; expected one of"),
    ],
)
def test_strategy_building_blocks_name_bad_arguments(make, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        make()


@pytest.mark.parametrize("nodes", [2, 7])
def test_a_grid_whose_nodes_do_not_match_the_task_is_refused_before_any_round(nodes):
    task = Task(**TINY)
    grid = ManagedGrid(InProcessGrid(tsclient.app, nodes), task)
    with pytest.raises(ValueError, match=f"grid's {nodes} nodes hold partition ids .*; expected each of 0..5 once"):
        run_rounds(_fedavg(min_train_nodes=1, min_available_nodes=1), grid, initial_arrays(task), num_rounds=1)
