"""Federated scenarios, round 5 (2 of 2): the edges of a run, on real Flower components.

Scripted ClientApps and tilestack's, Flower's strategies and SecAgg+ workflow, over tilestack's in-process Flower
``Grid``: faulty replies, 200 clients sampled with dropouts, SecAgg+ at its threshold, error feedback over many
rounds, Dirichlet(0.01), worker processes, late clients, deadlines, interrupts. What this half found, each fixed:

- A checkpointed run whose strategy holds a lambda (``HeteroFL(width_of=lambda p: ...)``) failed with a pickling
  error after its first round; such settings are now left out of the checkpoint and taken from the resuming
  strategy.
- A reply weighted (``weighted_by_key``) by a negative number was averaged in, and weights summing to zero ended the
  run inside Flower; such replies are now left out naming the weight.
- Under SecAgg+ a client whose local SGD diverged sent NaN, quantised to arbitrary integers inside the masked sum:
  the secure model was finite garbage. The client now drops out of the round.

Float64 truth for the strategies' rules and dtypes is in test_scenarios_round5.py.
"""

import math

import numpy as np
import pytest
from _fl_round5 import DC, blobs, check_model, json_equal, make_grid, np_, same, scripted, update, wmean
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedProx

from tilestack.errors import FederatedError
from tilestack.federated import ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import RESIDUAL_STATE, Compressed, compress_update
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.grid import payload_bytes
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import QFFL, FedBN, FedDF, FedNova, HeteroFL, Scaffold


# ---- non-finite and misshapen replies in SCAFFOLD, HeteroFL -----------------------------------------------------
@pytest.mark.timeout(60)
def test_non_finite_replies_anywhere_are_left_out_naming_the_client():
    """SCAFFOLD with six scripted clients: NaN in a model array, +inf in a control-variate change, an infinite
    weight, a NaN training loss; each is left out naming why, and the model and c are the rule over the other two
    (none of the non-finite values reaches x or c)."""
    task = blobs(6)
    bad = {1: "nan-model", 2: "inf-dc", 3: "inf-weight", 4: "nan-loss"}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        y = {k: v + update(pid, rnd, v.shape, np.float32) for k, v in x.items()}
        dc = {DC + k: update(pid + 10, rnd, v.shape, np.float32) for k, v in x.items()}
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

    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert r.excluded == {"1": "non-finite: fc.bias", "2": "non-finite: scaffold.dc.fc.weight",
                          "3": "non-finite metric: num-examples", "4": "non-finite metric: train-loss"}  # fmt: skip
    assert r.num_aggregated == 2
    x0 = np_(initial_arrays(task))
    want = wmean({p: {k: (v + update(p, 1, v.shape, np.float32)).astype(np.float32) for k, v in x0.items()}
                   for p in (0, 5)}, {0: 1, 5: 6})  # fmt: skip
    check_model(res.arrays, want, np.float32)
    for v in res.strategy.c.values():
        dcs = [update(p + 10, 1, v.shape, np.float32).astype(np.float64) for p in (0, 5)]
        np.testing.assert_array_equal(v, (2 / 6 * np.mean(dcs, axis=0)).astype(np.float32))


@pytest.mark.timeout(60)
def test_misshapen_replies_are_left_out_naming_the_client_and_the_array():
    """HeteroFL: client 1 (width 1/2) sends back a full-width model, client 2 a transposed fc2.weight; each is left
    out naming the array, its shape and the one sent; a round where every reply is misshapen keeps the model and
    says so."""
    task = blobs(4, features=3, classes=2, model="mlp", hidden=4)

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        if pid == 1:
            x = {k: np.zeros(v.shape, v.dtype) for k, v in np_(initial_arrays(task)).items()}
        if pid == 2:
            x = {**x, "fc2.weight": np.ascontiguousarray(x["fc2.weight"].T)}
        if rnd == 2:
            x = {**x, "fc2.bias": np.zeros(3, np.float32)}
        return x, {}

    s = HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, fraction_train=1.0, fraction_evaluate=0.0)
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2)
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
    task = blobs(3)
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

    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), make_grid(app, task), initial_arrays(task),
                     num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert list(r.excluded) == ["1"] and r.excluded["1"].startswith("malformed: fc.weight cannot be decoded")
    assert r.num_aggregated == 2
    check_model(res.arrays, {k: v + 1 for k, v in np_(initial_arrays(task)).items()}, np.float32)


# ---- many clients, a fraction each round, some dropping out -------------------------------------------------------
@pytest.mark.timeout(120)
def test_200_clients_a_twentieth_per_round_with_dropouts_weighted_exactly():
    """200 scripted clients of sizes 1 to 10**6, FedAvg samples 10 per round and 30% of those drop out: each round
    aggregates exactly the sampled clients that stayed, every round's model is their float64 weighted mean rounded
    once (the next round starts from it), bytes count only the clients asked, and over 12 rounds the samples
    spread over the population."""
    task = blobs(200, local_steps=1)
    rng = np.random.default_rng(8)
    n = {p: int(v) for p, v in enumerate(rng.integers(1, 10**6, 200))}
    trained: dict[int, set[int]] = {}
    starts: dict[int, dict[str, np.ndarray]] = {}

    def script(pid, rnd, got, context, config):
        trained.setdefault(rnd, set()).add(pid)
        starts[rnd] = got["arrays"]
        y = {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}
        return y, {"num-examples": n[pid]}

    grid = make_grid(scripted(script), task, system=SystemModel(200, dropout=0.3, seed=5))
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
        want = wmean({p: {k: (v + update(p, rnd, v.shape, np.float32)).astype(np.float32)
                           for k, v in starts[rnd].items()} for p in trained[rnd]}, n)  # fmt: skip
        got = res.arrays if rnd == 12 else codec.to_record(starts[rnd + 1])
        check_model(got, want, np.float32)
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


# ---- compression with error feedback: nothing is lost for good ----------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", [("topk", 0.1), ("int8", 0.0)])
def test_error_feedback_delivers_every_update_in_the_long_run(spec):
    """Two clients (weights 1 and 3) push the same update every round, sent compressed with error feedback
    (compression.compress_update, rebuilt by Compressed): after T rounds the model plus the weighted mean of the
    clients' residuals is x0 + T times the weighted mean update (the invariant of error feedback), the residuals
    stay bounded, and the model's distance to x0 + T u shrinks like 1/T."""
    task = blobs(2, features=20, classes=5)
    u = {p: {k: update(p, 0, v.shape, np.float32) for k, v in np_(initial_arrays(task)).items()} for p in (0, 1)}
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

    x0 = np_(initial_arrays(task))
    mean_u = wmean(u, n)
    errors = []
    inner = InProcessGrid(app, 2)
    grid = ManagedGrid(inner, task)
    s = Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), *spec)
    arrays = initial_arrays(task)
    for t in range(1, 31):
        arrays = run_rounds(s, grid, arrays, num_rounds=1).arrays
        x = np_(arrays)
        res = {p: codec.to_numpy(inner.contexts[nid].state[RESIDUAL_STATE]) for nid, p in inner.partitions.items()}
        mean_res = wmean(res, n)
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
    task = blobs(10, features=4, classes=4, num_samples=400, partitioner="dirichlet", partition_alpha=0.01,
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
    check_model(res.arrays, wmean(replies[-1], {p: task.num_train(p) for p in range(10)}), np.float32)


# ---- determinism: the same seed on one process or two -------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_seed_fixes_the_run_whatever_the_number_of_worker_processes():
    """FedProx on Dirichlet(0.01) with stragglers and dropouts: one worker process or two give the same rounds and
    model bit for bit; another seed gives another run."""
    task = blobs(8, features=4, classes=4, num_samples=320, partitioner="dirichlet", partition_alpha=0.01,
                  local_steps=4, lr=0.2)  # fmt: skip
    system = SystemModel(8, straggler_fraction=0.5, dropout=0.2, seed=2)

    def run(workers, seed=4):
        s = FedProx(fraction_train=0.5, fraction_evaluate=0.5, proximal_mu=0.1)
        return simulate(s, task, rounds=3, seed=seed, system=system, workers=workers)

    def rounds(res):
        return [{k: v for k, v in vars(r).items() if k != "wall_time"} for r in res.history.rounds]

    one, two = run(1), run(2)
    assert same(one.arrays, two.arrays)
    assert json_equal(rounds(one), rounds(two))
    assert any(r.excluded for r in one.history.rounds)
    assert not same(one.arrays, run(1, seed=5).arrays)


# ---- a client late on one round, with state ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_scaffold_client_late_on_one_round_rejoins_with_the_state_it_had():
    """SCAFFOLD, client 2 answers round 2 after the timeout (having trained and changed its c_i): the run equals
    the one in which it failed before training that round; its late c_i is not kept."""
    import time

    task = blobs(4, features=4, classes=3, local_steps=3, lr=0.2)

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
        return run_rounds(s, make_grid(app_for(how), task), initial_arrays(task), num_rounds=4, timeout=2.0)

    late, failed = run("late"), run("fail")
    assert late.history.rounds[1].excluded == {"2": "timeout: no reply within 2.0 s"}
    assert [r.num_aggregated for r in late.history.rounds] == [4, 3, 4, 4]
    assert same(late.arrays, failed.arrays)
    for k in late.strategy.c:
        np.testing.assert_array_equal(late.strategy.c[k], failed.strategy.c[k])


# ---- stragglers under a deadline, normalised by FedNova ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_fednova_under_a_deadline_normalises_the_partial_work_each_client_did():
    """Clients 100x apart in speed under a deadline do ceil(share x steps) of their 20 steps ("partial"); FedNova's
    model is its rule over what they sent and the steps they report, in float64, rounded once."""
    task = blobs(5, features=4, classes=3, local_steps=20, lr=0.05)
    system = SystemModel(5, speeds=np.array([200.0, 50.0, 20.0, 8.0, 2.0]), bandwidths=np.full(5, 1e9), deadline=1.0)
    seen = []

    class Seen(FedNova):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.append([(codec.to_numpy(m.content["arrays"]), dict(m.content["metrics"])) for m in replies])
            return super().aggregate_train(server_round, replies)

    x0 = np_(initial_arrays(task))
    res = simulate(Seen(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1, system=system, evaluate=False)
    steps = [int(m["num-steps"]) for _, m in seen[0]]
    assert steps == [20, 20, 20, 8, 2]
    n = np.array([m["num-examples"] for _, m in seen[0]], np.float64)
    p = n / n.sum()
    tau_eff = float(np.dot(p, steps))
    want = {k: x0[k] - tau_eff * sum(pi * (x0[k].astype(np.float64) - y[k]) / t
                                     for pi, t, (y, _) in zip(p, steps, seen[0], strict=True)) for k in x0}  # fmt: skip
    check_model(res.arrays, want, np.float32)


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
    task = blobs(6, features=4, classes=3, local_steps=3, lr=0.2, model="mlp", hidden=4, norm=name == "fedbn")
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
        grid = make_grid(app, task)
        return run_rounds(make(), grid, initial_arrays(task), num_rounds=4, checkpoint=ckpt, seed=2)

    full = run(_interrupting(99, 0))
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(_interrupting(3, 3), ckpt)
    resumed = run(_interrupting(99, 0), ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4]
    assert same(full.arrays, resumed.arrays)
    assert [r.eval_metrics for r in resumed.history.rounds] == [r.eval_metrics for r in full.history.rounds]


# ---- quantised and full-precision clients in one round ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_quantised_and_full_precision_clients_mix_in_one_round():
    """Under Compressed(FedAvg, int8), client 0 sends its model in float64 (it ignores the compression request),
    client 1 an int8 update, client 2 a top-k update: the server rebuilds each as a model (global + decoded
    update, or the model as sent) and averages them by examples, exactly in float64, rounded once."""
    task = blobs(3, features=6, classes=3)
    x0 = np_(initial_arrays(task))
    n = {0: 5, 1: 1000, 2: 7}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        y = {k: x[k] + update(pid, rnd, v.shape, np.float32) for k, v in x.items()}
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

    res = run_rounds(Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), "int8"), make_grid(app, task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    assert res.history.rounds[0].num_aggregated == 3
    models = {}
    for p in (0, 1, 2):
        u = {k: ((x0[k] + update(p, 1, v.shape, np.float32)) - x0[k]).astype(np.float32) for k, v in x0.items()}
        if p == 0:
            models[p] = {k: (x0[k] + update(p, 1, v.shape, np.float32)).astype(np.float64) for k, v in x0.items()}
        else:
            enc = codec.encode_int8 if p == 1 else (lambda a: codec.encode_topk(a, math.ceil(0.5 * a.size)))
            models[p] = {k: x0[k] + codec.decode(enc(u[k])).astype(np.float64) for k in x0}
    check_model(res.arrays, wmean(models, n), np.float32)


# ---- weights that are not weights ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_replies_whose_weight_is_not_positive_are_left_out_and_never_end_the_run():
    """FedAvg(weighted_by_key='unit-weight') with scripted clients reporting weights 1, -0.5, 0, -1.5 and 1, and one
    without the key: the four odd ones are left out naming the weight, and the model is the mean of the two valid
    replies. Before: -0.5 was used (the 'average' extrapolated past the replies), 0 counted as aggregated, and
    weights summing to 0 ended the run with a ZeroDivisionError inside Flower."""
    task = blobs(6)
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
    res = run_rounds(s, make_grid(app, task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert r.excluded == {
        "1": "weight: unit-weight=-0.5, expected > 0 (the strategy's weighted_by_key)",
        "2": "weight: unit-weight=0.0, expected > 0 (the strategy's weighted_by_key)",
        "3": "weight: unit-weight=-1.5, expected > 0 (the strategy's weighted_by_key)",
        "5": "metrics: no 'unit-weight' (the strategy's weighted_by_key)",
    }
    assert r.num_aggregated == 2 and not r.skipped
    x0 = np_(initial_arrays(task))
    check_model(res.arrays, {k: v + 2.0 for k, v in x0.items()}, np.float32)  # mean of +0 and +4
