"""Federated scenarios, round 23 (1 of 2): clients of very different sizes and speeds weighted by their examples, a
client that fails every other round under a server optimiser, FedProx with mu > 0 under partial participation, one
client alone, fifty small clients, replies of the wrong dtype, shape or values named by client, and seeded sampling;
each aggregate written out by hand in float64.

tilestack's ClientApp (wrapped here where a client misbehaves) over tilestack's in-process Flower ``Grid`` under
``ManagedGrid`` (``run_rounds``), or ``simulate``; Flower 1.41's FedAvg, FedProx and FedAdam. References independent of
the code under test: each client's local SGD replayed on its seeded minibatches (``_fl_round7.client_model``), the
server rules in float64 (``_fl_round16.ServerOptimizer``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round16 import ServerOptimizer
from _fl_round18 import EVERYONE
from _fl_round19 import failing_app
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

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

pytestmark = pytest.mark.timeout(120)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=2,
                batch_size=8, lr=0.1, seed=5)  # fmt: skip
    return Task(**(base | kw))


def _grid(task: Task, app: ClientApp = tsclient.app, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(app, task.num_clients), task, **kw)


def _pids(metrics) -> list[int]:
    return sorted(int(p) for p in metrics.client_train)


# ---- sizes and speeds far apart: weighted by examples, whatever the speed -------------------------------------------
def test_clients_of_very_different_sizes_and_speeds_are_weighted_by_their_examples_not_their_steps():
    """Quantity skew (sigma 2: a few examples beside hundreds) and local epochs, so each client runs its own number of
    steps, on a system model whose speeds span orders of magnitude but with no deadline: every client does its whole
    work, and the new model is the mean of the replayed uploads weighted by each client's training examples. The mean
    weighted by steps, or the plain mean, is another model."""
    task = _task(partitioner="quantity", quantity_sigma=2.0, local_steps=None, local_epochs=1.0, num_clients=5,
                 num_samples=400)  # fmt: skip
    sizes = {p: task.num_train(p) for p in range(5)}
    assert max(sizes.values()) >= 8 * min(sizes.values()), sizes
    system = SystemModel(5, speeds=np.array([0.01, 1.0, 100.0, 1e4, 3.0]), bandwidths=np.full(5, 1e6))
    models: list = []
    res = run_rounds(FedAvg(**EVERYONE), _grid(task, system=system), initial_arrays(task), num_rounds=2,
                     extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(res.history.rounds, 1):
        assert m.excluded == {} and m.num_aggregated == 5
        ups = {p: client_model(task, p, rnd, x) for p in range(5)}
        assert {int(p): int(c["num-steps"]) for p, c in m.client_train.items()} == {p: ups[p][1] for p in ups}
        assert m.steps_done == m.steps_full == sum(task.steps_for(p) for p in range(5))
        want = weighted_mean({p: u[0] for p, u in ups.items()}, sizes)
        near(models[rnd - 1], want, ulps=4)
        by_steps = weighted_mean({p: u[0] for p, u in ups.items()}, {p: u[1] for p, u in ups.items()})
        assert max(float(np.abs(by_steps[k] - want[k]).max()) for k in x) > 1e-4
        x = models[rnd - 1]


def test_a_deadline_cuts_the_slow_clients_work_but_not_their_weight():
    """With a deadline only the fast clients finish; the slow ones send partial work (stragglers='partial'). Each
    client's steps are what the grid planned (``num-steps`` in its reply), its upload that many replayed steps, and
    its weight is still its examples."""
    task = _task(partitioner="quantity", quantity_sigma=1.5, local_steps=8, num_clients=4)
    system = SystemModel(4, speeds=np.array([1.0, 2.0, 1000.0, 1000.0]), bandwidths=np.full(4, 1e9), deadline=3.0)
    models: list = []
    res = run_rounds(FedAvg(**EVERYONE), _grid(task, system=system), initial_arrays(task), num_rounds=1,
                     extra_metrics=keep(models))  # fmt: skip
    m = res.history.rounds[0]
    steps = {int(p): int(c["num-steps"]) for p, c in m.client_train.items()}
    assert sorted(steps) == [0, 1, 2, 3], (steps, m.excluded)
    assert steps[2] == steps[3] == 8 and 1 <= steps[0] < steps[1] < 8, steps
    assert m.steps_done == sum(steps.values()) and m.steps_full == 32
    x = np_(initial_arrays(task))
    ups = {p: client_model(task, p, 1, x, work=steps[p] / 8) for p in range(4)}
    assert {p: u[1] for p, u in ups.items()} == steps
    near(models[0], weighted_mean({p: u[0] for p, u in ups.items()}, {p: task.num_train(p) for p in range(4)}), 4)


# ---- a client that fails every other round, under FedAdam ------------------------------------------------------------
def test_a_client_failing_every_other_round_is_named_and_fedadam_steps_over_the_rest():
    """Client 1 raises after its local training in rounds 1 and 3 (an error reply): those rounds aggregate clients 0,
    2, 3 and name client 1 with its error; rounds 2 and 4 aggregate all four. FedAdam's moments carry across the short
    rounds, and every round's model is the Adam step, written out, over the examples-weighted mean of the kept uploads.
    """
    task = _task(partitioner="quantity", quantity_sigma=0.8)
    strategy = FedAdam(eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, **EVERYONE)
    models: list = []
    res = run_rounds(strategy, _grid(task, failing_app({(1, 1), (1, 3)})), initial_arrays(task), num_rounds=4,
                     extra_metrics=keep(models))  # fmt: skip
    opt = ServerOptimizer("adam", eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(res.history.rounds, 1):
        kept = [0, 2, 3] if rnd % 2 else [0, 1, 2, 3]
        if rnd % 2:
            assert list(m.excluded) == ["1"] and "lost its connection after training in round" in m.excluded["1"]
        else:
            assert m.excluded == {}
        assert m.num_aggregated == len(kept) and _pids(m) == kept and m.skipped == ""
        ups = {p: client_model(task, p, rnd, x)[0] for p in kept}
        want = opt.step(x, weighted_mean(ups, {p: task.num_train(p) for p in kept}), rnd)
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=2e-5, atol=1e-6, err_msg=(rnd, k))
        x = models[rnd - 1]


def test_a_client_failing_every_round_of_a_one_client_round_leaves_the_model_and_says_why():
    """With one client sampled per round and that client failing, the round has nothing to aggregate: the model stays,
    ``skipped`` says there were no replies, and the client's error is named."""
    task = _task(num_clients=2)
    strategy = FedAvg(**(EVERYONE | dict(fraction_train=0.5)))
    models: list = []
    res = run_rounds(strategy, _grid(task, failing_app({(0, 1), (1, 1), (0, 2), (1, 2)})), initial_arrays(task),
                     num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for m, got in zip(res.history.rounds, models, strict=True):
        assert m.num_selected == 1 and m.num_aggregated == 0 and m.skipped == "no replies to aggregate", m
        (pid, why), = m.excluded.items()
        assert f"client {pid} lost its connection" in why
        for k in x:
            np.testing.assert_array_equal(got[k], x[k])


# ---- FedProx with mu > 0 under partial participation ---------------------------------------------------------------
def test_fedprox_with_mu_under_partial_participation_is_the_proximal_sgd_of_the_sampled_clients():
    """FedProx(mu=0.7) sampling half of eight clients (fraction_train 0.5, min_train_nodes 3: four a round) through
    ``simulate``: each round's sampled clients are four, and the model is the examples-weighted mean of their proximal
    local SGD replayed by hand; without the proximal term it would be another model."""
    task = _task(num_clients=8, num_samples=320, partitioner="quantity", quantity_sigma=0.7, local_steps=5)
    models: list = []
    strategy = FedProx(fraction_train=0.5, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=8,
                       proximal_mu=0.7)  # fmt: skip
    res = simulate(strategy, task, rounds=2, evaluate=False, extra_metrics=keep(models), seed=2)
    x = np_(initial_arrays(task))
    seen = []
    for rnd, m in enumerate(res.history.rounds, 1):
        pids = _pids(m)
        seen.append(pids)
        assert m.num_selected == m.num_aggregated == 4 and len(pids) == 4, m
        ups = {p: client_model(task, p, rnd, x, mu=0.7)[0] for p in pids}
        want = weighted_mean(ups, {p: task.num_train(p) for p in pids})
        near(models[rnd - 1], want, ulps=4)
        plain = weighted_mean({p: client_model(task, p, rnd, x)[0] for p in pids}, {p: task.num_train(p) for p in pids})
        assert max(float(np.abs(plain[k] - want[k]).max()) for k in x) > 1e-5
        x = models[rnd - 1]
    again = simulate(FedProx(fraction_train=0.5, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=8,
                             proximal_mu=0.7), task, rounds=2, evaluate=False, seed=2)  # fmt: skip
    assert [_pids(m) for m in again.history.rounds] == seen


# ---- one client, and fifty -------------------------------------------------------------------------------------------
def test_one_client_alone_is_its_own_local_sgd_round_after_round():
    """A federation of one: FedAvg's model after each round is exactly that client's upload (weight 1 of 1)."""
    task = _task(num_clients=1, num_samples=60, local_steps=3)
    models: list = []
    res = simulate(FedAvg(**EVERYONE), task, rounds=3, evaluate=False, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, m in enumerate(res.history.rounds, 1):
        assert m.num_aggregated == 1 and _pids(m) == [0]
        up, _ = client_model(task, 0, rnd, x)
        for k in x:
            np.testing.assert_array_equal(models[rnd - 1][k], up[k], err_msg=(rnd, k))
        x = models[rnd - 1]


def test_fifty_small_clients_aggregate_by_hand_within_seconds():
    """Fifty clients of 4-8 examples each, two rounds of two local steps, every client each round: the model is the
    examples-weighted mean of 50 replayed uploads, and the run takes seconds."""
    task = _task(num_clients=50, num_samples=600, partitioner="quantity", quantity_sigma=0.3, local_steps=2,
                 batch_size=4)  # fmt: skip
    models: list = []
    t0 = time.perf_counter()
    res = simulate(FedAvg(**EVERYONE), task, rounds=2, evaluate=False, extra_metrics=keep(models))
    assert time.perf_counter() - t0 < 30
    x = np_(initial_arrays(task))
    sizes = {p: task.num_train(p) for p in range(50)}
    for rnd, m in enumerate(res.history.rounds, 1):
        assert m.num_aggregated == 50 and m.excluded == {}
        want = weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(50)}, sizes)
        near(models[rnd - 1], want, ulps=8)
        x = models[rnd - 1]


# ---- replies of the wrong dtype, shape or values, each named by client -----------------------------------------------
def _corrupting_app(pid_bad: int, corrupt) -> ClientApp:
    """tilestack's ClientApp, except that client ``pid_bad``'s training reply carries ``corrupt(arrays)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        reply = tsclient.app(msg, context)
        if int(context.node_config["partition-id"]) != pid_bad:
            return reply
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        content = RecordDict({"arrays": codec.to_record(corrupt(arrays)), "metrics": reply.content["metrics"]})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    @app.query()
    def query(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    return app


def _with(arrays, name, value):
    return {**arrays, name: value}


def _nan_at(a):
    a = a.copy()
    a.flat[1] = np.nan
    return a


def _f16(a):
    with np.errstate(over="ignore"):  # values past float16's range become inf on purpose
        return a.astype(np.float16)


CORRUPTIONS = {
    "int32": (lambda a: _with(a, "fc.weight", a["fc.weight"].astype(np.int32)), "fc.weight"),
    "complex": (lambda a: _with(a, "fc.bias", a["fc.bias"].astype(np.complex64)), "fc.bias"),
    "bool": (lambda a: _with(a, "fc.bias", a["fc.bias"] > 0), "fc.bias"),
    "transposed": (lambda a: _with(a, "fc.weight", np.ascontiguousarray(a["fc.weight"].T)), "fc.weight"),
    "flattened": (lambda a: _with(a, "fc.weight", a["fc.weight"].ravel()), "fc.weight"),
    "scalar": (lambda a: _with(a, "fc.bias", np.float32(1.0)), "fc.bias"),
    "nan": (lambda a: _with(a, "fc.weight", _nan_at(a["fc.weight"])), "fc.weight"),
    "inf": (lambda a: _with(a, "fc.bias", np.full_like(a["fc.bias"], -np.inf)), "fc.bias"),
    "float16 overflow": (lambda a: _with(a, "fc.weight", _f16(a["fc.weight"] * 1e6)), "fc.weight"),
    "renamed": (lambda a: {("w" if k == "fc.weight" else k): v for k, v in a.items()}, "fc.weight"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_reply_of_the_wrong_dtype_shape_or_values_is_left_out_naming_the_client_and_the_array(kind):
    """Client 2 of four sends a corrupted upload: it is left out with a reason naming the array, the round's model is
    the examples-weighted mean of the other three replayed uploads, and the model stays finite float32."""
    corrupt, name = CORRUPTIONS[kind]
    task = _task(partitioner="quantity", quantity_sigma=0.5, num_features=4)  # fc.weight (4, 3): its transpose differs
    models: list = []
    res = run_rounds(FedAvg(**EVERYONE), _grid(task, _corrupting_app(2, corrupt)), initial_arrays(task),
                     num_rounds=1, extra_metrics=keep(models))  # fmt: skip
    m = res.history.rounds[0]
    assert list(m.excluded) == ["2"] and name in m.excluded["2"], m.excluded
    assert m.num_aggregated == 3 and _pids(m) == [0, 1, 3]
    x = np_(initial_arrays(task))
    near(models[0], weighted_mean({p: client_model(task, p, 1, x)[0] for p in (0, 1, 3)},
                                  {p: task.num_train(p) for p in (0, 1, 3)}), 4)  # fmt: skip


def test_a_float64_or_float16_upload_of_finite_values_is_taken_at_the_models_dtype():
    """An upload in float64 (or float16, in range) is not an error: it is averaged at its value and the global model
    stays float32."""
    task = _task()
    for dtype in (np.float64, np.float16):
        models: list = []
        app = _corrupting_app(1, lambda a, d=dtype: {k: v.astype(d) for k, v in a.items()})
        res = run_rounds(FedAvg(**EVERYONE), _grid(task, app), initial_arrays(task), num_rounds=1,
                         extra_metrics=keep(models))  # fmt: skip
        m = res.history.rounds[0]
        assert m.excluded == {} and m.num_aggregated == 4, (dtype, m.excluded)
        x = np_(initial_arrays(task))
        ups = {p: client_model(task, p, 1, x)[0] for p in range(4)}
        ups[1] = {k: v.astype(dtype) for k, v in ups[1].items()}
        want = weighted_mean(ups, {p: task.num_train(p) for p in range(4)})
        near(models[0], want, ulps=4)


# ---- sampling seeds -------------------------------------------------------------------------------------------------
def test_client_sampling_follows_the_seed_and_only_the_seed():
    """FedAvg sampling 3 of 10 clients for four rounds: the same seed picks the same clients round by round (and the
    same models), another seed other clients in some round."""
    task = _task(num_clients=10, num_samples=300, local_steps=1)

    def run(seed):
        s = FedAvg(fraction_train=0.3, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=10)
        res = simulate(s, task, rounds=4, evaluate=False, seed=seed)
        return [_pids(m) for m in res.history.rounds], np_(res.arrays)

    a, a_model = run(3)
    b, b_model = run(3)
    c, _ = run(4)
    assert all(len(p) == 3 for p in a) and a == b and a != c
    for k in a_model:
        np.testing.assert_array_equal(a_model[k], b_model[k])


# ---- settings no run can use, refused before any work ---------------------------------------------------------------
def test_ifca_with_more_cluster_models_than_clients_is_refused_naming_num_clusters():
    """Each client trains one cluster model a round: with K above the client count some models could never train.
    Found here: IFCA(num_clusters=5) over four clients ran, a model re-seeded round after round, without a word."""
    from tilestack.federated.strategies import IFCA

    task = _task()
    strategy = IFCA(num_clusters=5, **EVERYONE)
    with pytest.raises(ValueError, match=r"num_clusters=5 with num_clients=4.*num_clusters <= 4"):
        simulate(strategy, task, rounds=1, evaluate=False)
    with pytest.raises(ValueError, match=r"num_clusters=5"):
        run_rounds(strategy, _grid(task), strategy.initial_arrays(task), num_rounds=1)
    ok = simulate(IFCA(num_clusters=4, **EVERYONE), task, rounds=1, evaluate=False)  # one per client: taken
    assert ok.history.rounds[0].num_aggregated == 4


def test_fl_run_ifca_with_more_clusters_than_clients_is_refused_naming_clusters():
    import re

    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["fl", "run", "--dataset", "blobs", "--clients", "4", "--per-round", "2",
                                       "--rounds", "1", "--local-steps", "1", "--strategy", "ifca", "--clusters", "5"],
                             env={"COLUMNS": "400"})  # fmt: skip
    out = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value for --clusters" in out and "num_clusters=5" in out, out
    assert "test accuracy" not in out


@pytest.mark.parametrize("pattern", [np.zeros((1, 4)), np.zeros((3, 4)), np.zeros(4)])
def test_an_availability_pattern_with_no_client_ever_online_is_refused(pattern):
    """Found here: SystemModel(availability=0 everywhere) was taken, and every round of the run was skipped, short of
    nodes, one warning a round. Refused naming availability; a pattern with one chance > 0 somewhere is taken."""
    with pytest.raises(ValueError, match=r"availability is 0 for every client in every round"):
        SystemModel(4, availability=pattern)
    some = pattern.copy()
    some.flat[-1] = 0.5
    assert SystemModel(4, availability=some).availability.shape[1] == 4


# ---- FedProx against an autograd reference, independent of tilestack's local SGD -----------------------------------
def _torch_client(task: Task, pid: int, rnd: int, start: dict[str, np.ndarray], mu: float) -> dict[str, np.ndarray]:
    """Client ``pid``'s local work in round ``rnd`` written with torch autograd in float64: cross-entropy plus
    (mu / 2) ||w - w_start||^2 over every array, plain SGD on minibatches that walk a fresh permutation of its data
    each epoch, drawn from numpy's Generator seeded (task seed, pid, round, 13) as the clients document."""
    torch = pytest.importorskip("torch")
    x, y, _, _ = task.client_data(pid)
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.long)
    w = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in start.items()}
    w0 = {k: torch.tensor(v.astype(np.float64)) for k, v in start.items()}
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    order, pos = rng.permutation(len(y)), 0
    for _ in range(task.steps_for(pid)):
        if pos >= len(y):
            order, pos = rng.permutation(len(y)), 0
        idx = torch.tensor(order[pos : pos + task.batch_size])
        pos += task.batch_size
        if task.model == "logreg":
            z = xs[idx] @ w["fc.weight"] + w["fc.bias"]  # (B, C)
        else:
            z = torch.relu(xs[idx] @ w["fc1.weight"] + w["fc1.bias"]) @ w["fc2.weight"] + w["fc2.bias"]
        loss = torch.nn.functional.cross_entropy(z, ys[idx]) + mu / 2 * sum(((w[k] - w0[k]) ** 2).sum() for k in w)
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for v, g in zip(w.values(), grads, strict=True):
                v -= task.lr * g
    return {k: v.detach().numpy() for k, v in w.items()}


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_fedprox_round_is_the_weighted_mean_of_autograd_proximal_sgd(model):
    """FedProx(mu=0.8) for two rounds over four clients of skewed sizes (7 local steps of batch 8, lr 0.2): each
    round's model is the examples-weighted mean of the clients' proximal SGD written with torch autograd in float64,
    to float32 precision."""
    task = _task(model=model, hidden=5, local_steps=7, lr=0.2, partitioner="quantity", quantity_sigma=0.9, seed=3)
    rng = np.random.default_rng(1)
    start = {k: (rng.normal(0, 1, v.shape) if model == "logreg" else v).astype(np.float32)
             for k, v in task.initial_params().items()}  # fmt: skip
    models: list = []
    simulate(FedProx(proximal_mu=0.8, **EVERYONE), task, rounds=2, initial=codec.to_record(start), evaluate=False,
             extra_metrics=keep(models))  # fmt: skip
    x = start
    for rnd in (1, 2):
        ups = {p: _torch_client(task, p, rnd, x, 0.8) for p in range(4)}
        want = weighted_mean(ups, {p: task.num_train(p) for p in range(4)})
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=1e-5, atol=2e-6, err_msg=(model, rnd, k))
        x = models[rnd - 1]


def test_fl_run_with_two_faults_for_one_client_is_refused_naming_faults():
    """Found here: the refusal read "Invalid value: Task: faults gives partition 1 two faults" with no option (the
    library's "faults gives" was not mapped to ``--faults``, as "faults entry" was)."""
    import re

    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["fl", "run", "--dataset", "blobs", "--clients", "4", "--per-round", "2",
                                       "--rounds", "1", "--local-steps", "1", "--faults", "1:crash,1:nan"],
                             env={"COLUMNS": "400"})  # fmt: skip
    out = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value for --faults" in out and "two faults, 'crash' and 'nan'" in out, out


def _fl(*extra: str):
    import re

    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["fl", "run", "--clients", "4", "--per-round", "2", "--rounds", "1",
                                       "--local-steps", "1", *extra], env={"COLUMNS": "400"})  # fmt: skip
    return res, " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())


def test_fl_run_plot_in_a_format_matplotlib_cannot_write_is_refused_before_the_run(tmp_path):
    """Found here: ``--plot run.txt`` ran every round, then failed in matplotlib's savefig ("Format 'txt' is not
    supported"), exit 1 with a traceback after the work. Refused before any round naming --plot and the formats;
    ``.svg`` and no suffix (PNG) are written."""
    res, out = _fl("--dataset", "blobs", "--plot", str(tmp_path / "run.txt"))
    assert res.exit_code == 2 and "Invalid value for --plot" in out and "cannot write '.txt'" in out, out
    assert ".png" in out and "test accuracy" not in out and not (tmp_path / "run.txt").exists()
    for name in ("run.svg", "run"):
        res, out = _fl("--dataset", "blobs", "--plot", str(tmp_path / name))
        assert res.exit_code == 0, out
        assert any(tmp_path.glob(name + "*")), list(tmp_path.iterdir())


def test_fl_run_data_with_another_dataset_named_is_refused(tmp_path):
    """Found here: ``--dataset digits --data mine.csv`` trained on the file without a word about digits. Refused naming
    --dataset; ``--data`` alone (or with ``--dataset file``) trains on the file."""
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(f"{i * 0.1:.1f},{i % 3 * 0.5},{('cat', 'dog')[i % 2]}" for i in range(40)))
    res, out = _fl("--dataset", "digits", "--data", str(path))
    assert res.exit_code == 2 and "Invalid value for --dataset" in out and "--dataset digits with --data" in out, out
    for extra in ((), ("--dataset", "file")):
        res, out = _fl(*extra, "--data", str(path))
        assert res.exit_code == 0, out
