"""Federated scenarios, round 7 (1 of 2): heterogeneous clients checked against the round written out by hand.

tilestack's own ClientApp over tilestack's in-process Flower ``Grid``; each client's training is replayed here
(``_fl_round7.client_model``: the same seeded minibatches) and the server's rule is written out in float64:

- clients that crash, answer after the timeout, cannot finish a step before the deadline or are cut by it, in one
  round: FedAvg is the example-weighted mean of the others' partial work, and the round reports each one;
- clients with their own learning rate, batch size and epochs (a strategy sending each its own task);
- HeteroFL widths with the full-width clients crashing: the units only they hold keep their value;
- 1-example clients, and a class with a single example in the whole dataset;
- partial participation at fractions that sample one client of 200;
- int8 and top-k updates under server-side DP with noise: the clipped mean of the rebuilt models plus the noise
  of the seeded stream, over two rounds of error feedback; SecAgg+ over a model beyond its clipping range;
- FedProx with a large mu; IFCA with faulty clients.

What this round found, fixed:

- FedProx with lr * proximal_mu >= 2 diverged on every client (each local step overshot the global model by more
  than the distance it corrected: FedProx(proximal_mu=1000) with lr 0.1 ended at test accuracy 0.0, every reply
  finite and averaged in); refused before any work, naming the bound (checks.check_proximal).
- SecAgg+ quantises what the clients send within a clipping range (8 by default), and clients sent their models:
  weights beyond 8 were cut to 8 inside the secure sum without a word (the secure model 2.4 off the plain one).
  Clients now send their updates, which the server adds to the global model (kept in its dtype: it came back
  float64), and a client whose weighted update passes the range drops out saying so (secagg).
- Flower's server-side DP wrappers over HeteroFL, IFCA, CFL, FedBN or SCAFFOLD let round 1's clients train, then
  ended the run with a numpy broadcasting or zip() error: server-side clipping takes each reply array by array
  against the global model, and these strategies' replies hold other arrays. Refused before any work, naming
  client-side clipping (checks.check_privacy, each strategy's REPLIES_HOLD). Client-side DP over SCAFFOLD ran
  under a guarantee that did not hold (the control-variate changes carry each client's unclipped update to
  everyone); refused too (Scaffold.UNCLIPPED).
- Compressed(CFL(...)) trained round 1's clients and ended with KeyError: 'fc1.weight' (CFL sends each client its
  cluster's model; Compressed refused IFCA, HeteroFL and FedDF only, and only unwrapped): refused on construction,
  at any depth of wrapping (compression.NOT_ONE_MODEL).
- simulate(IFCA(...), task) without an initial model ended the run in round 1 with "invalid literal for int() with
  base 10: 'fc.weight'": it started from the task's single model, in which IFCA looked for cluster numbers. simulate
  now starts from the strategy's own initial_arrays(task) where it has one, and IFCA given another model says what
  it expected.
"""

import math
import re

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, scripted, update
from _fl_round7 import client_model, weighted_mean
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedYogi,
    Krum,
)

from tilestack.errors import FederatedError
from tilestack.federated import SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.driver import AGGREGATE_PHASE
from tilestack.federated.grid import payload_bytes
from tilestack.federated.models import evaluate
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import IFCA, HeteroFL

UNIT = tsclient.UNIT_WEIGHT
CRASH = "error: RuntimeError: simulated client crash (task.faults)"


def _near(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The float32 model is the float64 ``want`` rounded once, to one float32 ulp: Flower sums w_i / W * x_i, whose
    float64 rounding can tip a value that lies on a float32 rounding boundary."""
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == np.float32, (k, v.dtype)
        np.testing.assert_allclose(v, want[k], rtol=2**-23, atol=1e-12, err_msg=k)


def _keep_models(models: list) -> callable:
    """An ``extra_metrics`` hook keeping the global model after each round (numpy), so that each round's aggregate
    is checked from the model that round really started with."""

    def keep(strategy, arrays, server_round):
        models.append(np_(arrays))
        return {}

    return keep


def _flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([model[k].astype(np.float64).ravel() for k in sorted(model)])


# ---- clients that fail, disconnect or run out of time, in one round ----------------------------------------------
@pytest.mark.timeout(90)
def test_fedavg_over_clients_that_crash_time_out_or_miss_the_deadline_is_the_mean_of_the_rest():
    """Six clients of quantity-skewed data and known speeds under a 1 s deadline (simulated) and a 2 s reply timeout
    (real): client 2 crashes, client 4 answers after 6 s, client 5 (1e-3 steps/s) cannot finish one step, clients 1
    and 3 are cut to the share of their epochs they can finish. Each round FedAvg is the float64 mean of clients 0, 1
    and 3's models (their partial work) weighted by their examples, rounded once; the round reports every client
    left out and why, the steps done and asked, the bytes and the deadline as its time."""
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6, local_epochs=2.0,
                batch_size=7, lr=0.05, partitioner="quantity", faults=((2, "crash"), (4, "slow")),
                slow_seconds=6.0)  # fmt: skip
    speeds = np.array([1000.0, 10.0, 50.0, 5.0, 200.0, 1e-3])
    bandwidth = 1e9
    system = SystemModel(6, speeds=speeds, bandwidths=np.full(6, bandwidth), deadline=1.0)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, system=system, timeout=2.0,
                   evaluate=False, extra_metrics=_keep_models(models))  # fmt: skip
    down = payload_bytes(RecordDict({"arrays": initial_arrays(task)}))
    full = {p: task.steps_for(p) for p in range(6)}
    share = {p: min(1.0, (1.0 - 2 * down / bandwidth) * speeds[p] / full[p]) for p in range(6)}
    assert share[5] * full[5] < 1 and share[1] < 1 and share[3] < 1 and share[0] == share[4] == 1.0
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        kept = {p: client_model(task, p, rnd, x, work=share[p]) for p in (0, 1, 3)}
        n = {p: task.num_train(p) for p in kept}
        _near(models[rnd - 1], weighted_mean({p: m for p, (m, _) in kept.items()}, n))
        x = models[rnd - 1]
        assert r.excluded == {"2": CRASH, "4": "timeout: no reply within 2.0 s", "5": "timeout"}
        assert (r.num_selected, r.num_aggregated) == (6, 3)
        assert (r.steps_done, r.steps_full) == (sum(s for _, s in kept.values()), sum(full.values()))
        assert (r.bytes_down, r.bytes_up) == (5 * down, 3 * down)  # client 5 was never sent the model
        assert r.sim_time == 1.0 and not r.skipped


# ---- clients with their own local settings -------------------------------------------------------------------------
LR = (0.01, 0.1, 0.3, 0.05)
BATCH = (1, 4, 50, 7)
EPOCHS = (0.5, 1.0, 3.0, 2.0)


class OwnSettings(FedAvg):
    """FedAvg sending client p a task with its own learning rate, batch size and local epochs."""

    def configure_train(self, server_round, arrays, config, grid):
        out = []
        for m in super().configure_train(server_round, arrays, config, grid):
            pid = grid.partition_of[m.metadata.dst_node_id]
            own = _own_task(Task.from_json(str(m.content["config"][tsclient.TASK_KEY])), pid)
            cfg = ConfigRecord(dict(m.content["config"]) | {tsclient.TASK_KEY: own.to_json()})
            out.append(Message(RecordDict({**m.content, "config": cfg}), m.metadata.dst_node_id,
                               m.metadata.message_type, group_id=m.metadata.group_id))  # fmt: skip
        return out


def _own_task(task: Task, pid: int) -> Task:
    import dataclasses

    return dataclasses.replace(task, lr=LR[pid], batch_size=BATCH[pid], local_epochs=EPOCHS[pid])


@pytest.mark.timeout(60)
def test_clients_with_their_own_lr_batch_and_epochs_each_run_their_own_sgd():
    """Four clients with learning rates 0.01..0.3, batches 1..50 (larger than some clients' data) and 0.5..3 local
    epochs: each trains by its own settings, FedAvg weights the models by examples (not by steps or learning
    rate), and the round counts each client's own steps, over three rounds."""
    task = Task(dataset="blobs", num_samples=200, num_features=5, num_classes=3, num_clients=4,
                partitioner="quantity", seed=1)  # fmt: skip
    own = {p: _own_task(task, p) for p in range(4)}
    steps = {p: own[p].steps_for(p) for p in range(4)}
    assert len(set(steps.values())) == 4, steps
    models: list[dict[str, np.ndarray]] = []
    res = simulate(OwnSettings(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=3, evaluate=False,
                   extra_metrics=_keep_models(models))  # fmt: skip
    x = np_(initial_arrays(task))
    n = {p: task.num_train(p) for p in range(4)}
    for rnd in (1, 2, 3):
        _near(models[rnd - 1], weighted_mean({p: client_model(own[p], p, rnd, x)[0] for p in range(4)}, n))
        x = models[rnd - 1]
    assert all(r.steps_done == r.steps_full == sum(steps.values()) for r in res.history.rounds)


# ---- non-finite updates ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", "1e39"])
@pytest.mark.parametrize(
    "make",
    [lambda: FedAvgM(fraction_train=1.0, fraction_evaluate=0.0, server_momentum=0.9),
     lambda: FedYogi(fraction_train=1.0, fraction_evaluate=0.0, eta=0.1),
     lambda: FedMedian(fraction_train=1.0, fraction_evaluate=0.0),
     lambda: Krum(fraction_train=1.0, fraction_evaluate=0.0, num_malicious_nodes=1)],
    ids=["fedavgm", "fedyogi", "fedmedian", "krum"],
)  # fmt: skip
def test_one_client_sending_a_non_finite_value_counts_as_one_that_crashed(make, bad):
    """Six scripted clients, client 3 putting +-inf, NaN or 1e39 (inf once read as the float32 sent) into one
    element of its model in rounds 1 and 3 of 3: that reply is left out naming the array, and the server's model
    (momentum, Yogi's moments, the median, Krum's pick) ends exactly where it ends when client 3 crashes in those
    rounds instead."""
    task = blobs(6, features=3)

    def client(kind: str):
        def script(pid, rnd, got, context, config):
            y = {k: (v + update(pid, rnd, v.shape, np.float32)).astype(np.float32) for k, v in got["arrays"].items()}
            if pid == 3 and rnd != 2:
                if kind == "crash":
                    raise ConnectionError("gone")
                y = {k: v.astype(np.float64) for k, v in y.items()}  # 1e39 is finite in float64
                y["fc.weight"][1, 0] = float(kind)
            return y, {"num-examples": 1 + pid}

        return scripted(script)

    runs = {kind: run_rounds(make(), make_grid(client(kind), task), initial_arrays(task), num_rounds=3)
            for kind in (bad, "crash")}  # fmt: skip
    left = [r.excluded for r in runs[bad].history.rounds]
    assert left == [{"3": "non-finite: fc.weight"}, {}, {"3": "non-finite: fc.weight"}]
    assert [r.excluded for r in runs["crash"].history.rounds] == [{"3": "error: ConnectionError: gone"}, {},
                                                                  {"3": "error: ConnectionError: gone"}]  # fmt: skip
    a, b = np_(runs[bad].arrays), np_(runs["crash"].arrays)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in b)


# ---- heterogeneous widths ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_heterofl_keeps_the_units_only_crashed_full_width_clients_hold():
    """An MLP of 6 hidden units, widths 1, 1/2, 1/6 by pid % 3, and both full-width clients (0 and 3) crash: hidden
    units 3..5 (fc1 columns, fc2 rows) keep their value, units 1..2 are the mean of the half-width clients' and unit
    0 and fc2.bias the mean of all four survivors', weighted by examples; the narrowest clients train one unit."""
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6, model="mlp",
                hidden=6, local_steps=3, lr=0.1, partitioner="quantity",
                faults=((0, "crash"), (3, "crash")))  # fmt: skip
    width = {p: (1.0, 0.5, 1 / 6)[p % 3] for p in range(6)}
    s = HeteroFL(width_of=width.get, hidden=6, fraction_train=1.0, fraction_evaluate=0.0)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(s, task, rounds=2, evaluate=False, extra_metrics=_keep_models(models))
    assert all(r.excluded == {"0": CRASH, "3": CRASH} and r.num_aggregated == 4 for r in res.history.rounds)
    x0 = np_(initial_arrays(task))
    start = x0
    for rnd in (1, 2):
        total = {k: np.zeros(v.shape) for k, v in start.items()}
        weight = {k: np.zeros(v.shape) for k, v in start.items()}
        for p in (1, 2, 4, 5):
            keep = max(1, round(width[p] * 6))
            sub = {"fc1.weight": start["fc1.weight"][:, :keep], "fc1.bias": start["fc1.bias"][:keep],
                   "fc2.weight": start["fc2.weight"][:keep], "fc2.bias": start["fc2.bias"]}  # fmt: skip
            trained, _ = client_model(task, p, rnd, sub)
            for k, v in trained.items():
                region = tuple(slice(0, m) for m in v.shape)
                total[k][region] += task.num_train(p) * v.astype(np.float64)
                weight[k][region] += task.num_train(p)
        _near(models[rnd - 1], {k: np.where(weight[k] > 0, total[k] / np.maximum(weight[k], 1), start[k])
                                for k in start})  # fmt: skip
        start = models[rnd - 1]
    got = np_(res.arrays)
    assert np.array_equal(got["fc1.weight"][:, 3:], x0["fc1.weight"][:, 3:])
    assert np.array_equal(got["fc2.weight"][3:], x0["fc2.weight"][3:])
    assert not np.array_equal(got["fc1.weight"][:, :3], x0["fc1.weight"][:, :3])


@pytest.mark.timeout(60)
def test_ifca_run_without_an_initial_model_starts_from_its_clusters_and_leaves_faulty_clients_out():
    """simulate(IFCA(...), task) with no initial model, client 0 crashing and client 5 sending NaN. Before, the run
    ended in round 1 (ValueError: invalid literal for int() with base 10: 'fc.weight': IFCA read cluster numbers
    out of the task's single model); now it starts from IFCA.initial_arrays(task). Each round every other client
    trains the cluster model that fits its training data best, and each cluster is the example-weighted mean of its
    members' models (a cluster nobody chose keeps its model); run_rounds given a single model names what it needs."""
    task = Task(dataset="clustered", groups=2, num_features=4, num_classes=3, num_clients=8, samples_per_client=40,
                local_steps=5, lr=0.1, faults=((0, "crash"), (5, "nan")))  # fmt: skip
    s = IFCA(num_clusters=2, reseed_after=0, fraction_train=1.0, fraction_evaluate=0.0)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(s, task, rounds=3, seed=1, evaluate=False, extra_metrics=_keep_models(models))
    x = np_(s.initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        assert r.num_aggregated == 6 and r.excluded["0"] == CRASH and r.excluded["5"].startswith("non-finite: ")
        clusters = [{k.partition("/")[2]: v for k, v in x.items() if k.startswith(f"cluster{j}/")} for j in (0, 1)]
        members: dict[int, dict[int, dict[str, np.ndarray]]] = {0: {}, 1: {}}
        for p in (1, 2, 3, 4, 6, 7):
            xs, ys, _, _ = task.client_data(p)
            j = int(np.argmin([evaluate(task.build_model(), c, xs, ys)[0] for c in clusters]))
            members[j][p] = client_model(task, p, rnd, clusters[j])[0]
        want = {}
        for j in (0, 1):
            mean = weighted_mean(members[j], {p: task.num_train(p) for p in members[j]}) if members[j] else clusters[j]
            want |= {f"cluster{j}/{k}": v for k, v in mean.items()}
        _near(models[rnd - 1], want)
        x = models[rnd - 1]
    assert set(s.assignments) == {1, 2, 3, 4, 6, 7}
    with pytest.raises(ValueError, match=r"IFCA: the model's array 'fc.weight' belongs to none of its 2 cluster "
                                         r"models .*expected the arrays of IFCA.initial_arrays\(task\)"):  # fmt: skip
        run_rounds(IFCA(num_clusters=2, fraction_train=1.0, fraction_evaluate=0.0), make_grid(tsclient.app, task),
                   initial_arrays(task), num_rounds=1)  # fmt: skip


# ---- the smallest clients ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_clients_of_one_training_example_and_a_class_of_one_example_in_the_dataset(tmp_path):
    """A user's file of 24 examples over 12 clients, class 2 held by a single example: every client has one example
    to train on (batch 10, three epochs: three steps on it) and one to test. FedAvg is the plain mean (one example
    each); federated evaluation is the mean of the clients' 0/1 accuracies; the class no client but one has is still
    a class of the model."""
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 11 + [0, 2])
    xs = rng.normal(0, 1, (24, 3)) + 2.0 * np.eye(3)[y]
    path = tmp_path / "tiny.npz"
    np.savez(path, x=xs, y=y)
    task = Task(dataset="file", data_path=str(path), num_clients=12, local_epochs=3.0, batch_size=10, lr=0.5)
    assert task.classes == 3 and all(task.num_train(p) == 1 and task.steps_for(p) == 3 for p in range(12))
    assert sum(int((task.client_data(p)[1] == 2).sum() + (task.client_data(p)[3] == 2).sum()) for p in range(12)) == 1
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), task, rounds=2, evaluate=False,
                   extra_metrics=_keep_models(models))  # fmt: skip
    x = np_(initial_arrays(task))
    accs = []
    model = task.build_model()
    for rnd in (1, 2):
        _near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(12)},
                                             dict.fromkeys(range(12), 1)))  # fmt: skip
        x = models[rnd - 1]
        accs.append([float(np.argmax(model.logits(x, task.client_data(p)[2]), axis=1)[0] == task.client_data(p)[3][0])
                     for p in range(12)])  # fmt: skip
    for r, acc in zip(res.history.rounds, accs, strict=True):
        assert r.num_aggregated == 12 and not r.excluded
        assert r.eval_metrics["eval-acc"] == pytest.approx(np.mean(acc), abs=1e-12)
        assert r.client_acc["mean"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert np_(res.arrays)["fc.weight"].shape == (3, 3)


# ---- partial participation at tiny fractions -----------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fraction, per_round", [(0.004, 1), (0.01, 2)])
def test_a_tiny_fraction_of_200_clients_samples_its_share_and_averages_only_them(fraction, per_round):
    """200 scripted clients, fraction_train 0.004 (0.8 of a client: the minimum of one) or 0.01 (two): each of ten
    rounds trains exactly that many, the model after a round is their example-weighted mean (one client: its model
    bit for bit), the clients change from round to round, and the same seed samples the same clients."""
    task = blobs(200, features=3)
    sizes = {p: 1 + p % 7 for p in range(200)}

    def run(seed):
        sent: dict[int, dict[int, dict[str, np.ndarray]]] = {}

        def script(pid, rnd, got, context, config):
            y = {k: (v + update(pid, rnd, v.shape, np.float32)).astype(np.float32) for k, v in got["arrays"].items()}
            sent.setdefault(rnd, {})[pid] = y
            return y, {"num-examples": sizes[pid]}

        s = FedAvg(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        return sent, run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=10, seed=seed)

    sent, res = run(5)
    assert [len(sent[r]) for r in range(1, 11)] == [per_round] * 10
    assert all(m.num_selected == m.num_aggregated == per_round for m in res.history.rounds)
    assert len({p for r in sent.values() for p in r}) > 5  # not the same few clients every round
    _near(np_(res.arrays), weighted_mean(sent[10], sizes))
    if per_round == 1:
        (only,) = sent[10].values()
        assert all(np.array_equal(np_(res.arrays)[k], only[k]) for k in only)
    again, _ = run(5)
    assert [sorted(again[r]) for r in again] == [sorted(sent[r]) for r in sent]
    other, _ = run(6)
    assert [sorted(other[r]) for r in other] != [sorted(sent[r]) for r in sent]


# ---- compression and differential privacy together ---------------------------------------------------------------
def _clip(update_: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    norm = math.sqrt(sum(float(np.sum(v**2)) for v in update_.values()))
    return {k: v * min(1.0, clip / norm) for k, v in update_.items()}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method, ratio", [("int8", 0.0), ("topk", 0.25)])
def test_compressed_updates_under_noisy_server_side_dp_are_the_clipped_mean_plus_the_seeded_noise(method, ratio):
    """Compressed(DP server-side fixed clipping(FedAvg)), noise 0.5, C = 0.05, four clients, two rounds: the server
    rebuilds each client's model as global + its decoded update (which carries what the previous round's encoding
    dropped: error feedback), clips the update to C, averages, and adds N(0, (0.5 C / 4)^2) drawn from NumPy's stream
    seeded by (seed, round, aggregate phase); float64 throughout, rounded once to the float32 model."""
    task = Task(dataset="blobs", num_samples=200, num_features=5, num_classes=3, num_clients=4, local_steps=4,
                lr=0.2, partitioner="quantity")  # fmt: skip
    noise, clip, seed = 0.5, 0.05, 7
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = Compressed(DifferentialPrivacyServerSideFixedClipping(inner, noise, clip, 4), method, ratio)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(s, task, rounds=2, seed=seed, evaluate=False, extra_metrics=_keep_models(models))
    assert all(r.num_aggregated == 4 and not r.skipped for r in res.history.rounds)
    x = np_(initial_arrays(task))
    residual: dict[int, dict[str, np.ndarray]] = {p: {} for p in range(4)}
    clipped_any = False
    for rnd in (1, 2):
        ups = {}
        for p in range(4):
            trained, _ = client_model(task, p, rnd, x)
            delta = {k: (trained[k] - x[k]).astype(np.float32) + residual[p].get(k, np.float32(0)) for k in x}
            sent = {k: codec.encode_int8(d) if method == "int8" else codec.encode_topk(d, math.ceil(ratio * d.size))
                    for k, d in delta.items()}  # fmt: skip
            decoded = {k: codec.decode(a) for k, a in sent.items()}
            residual[p] = {k: delta[k] - decoded[k] for k in x}
            rebuilt = {k: x[k] + decoded[k].astype(np.float64) for k in x}  # float64
            ups[p] = _clip({k: rebuilt[k] - x[k] for k in x}, clip)
            clipped_any |= math.sqrt(sum(float(np.sum((rebuilt[k] - x[k]) ** 2)) for k in x)) > clip
        mean = {k: x[k] + sum(ups[p][k] for p in range(4)) / 4 for k in x}
        state = int(np.random.SeedSequence([seed, rnd, AGGREGATE_PHASE]).generate_state(1)[0])
        stream = np.random.RandomState(state % 2**32)
        _near(models[rnd - 1], {k: v + stream.normal(0, noise * clip / 4, v.shape) for k, v in mean.items()})
        x = models[rnd - 1]
    assert clipped_any


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", ["DifferentialPrivacyServerSideFixedClipping",
                                     "DifferentialPrivacyServerSideAdaptiveClipping"])  # fmt: skip
@pytest.mark.parametrize("inner", ["HeteroFL", "IFCA", "CFL", "FedBN", "Scaffold"])
def test_server_side_dp_over_a_strategy_whose_replies_are_not_the_model_is_refused_before_any_work(wrapper, inner):
    """Server-side clipping takes each reply array by array against the global model. HeteroFL's replies are narrower
    sub-models, IFCA's and CFL's a single cluster of the packed record, FedBN's lack the local layers, SCAFFOLD's
    carry control-variate changes: before, round 1's clients trained and the run ended with a numpy broadcasting or
    zip() error. Now it is refused before any client trains, naming client-side clipping, which runs."""
    from flwr.serverapp import strategy as fl

    from tilestack.federated.strategies import CFL, FedBN, Scaffold

    task = blobs(6, features=3, classes=3, model="mlp", hidden=4, norm=True)
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    make = {"HeteroFL": lambda: HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, **kw),
            "IFCA": lambda: IFCA(num_clusters=2, **kw), "CFL": lambda: CFL(**kw), "FedBN": lambda: FedBN(**kw),
            "Scaffold": lambda: Scaffold(**kw)}[inner]  # fmt: skip
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    def dp(name: str, strategy):
        fixed = {"clipping_norm": 1.0} if "Fixed" in name else {}
        return getattr(fl, name)(strategy, noise_multiplier=0.1, num_sampled_clients=6, **fixed)

    s = dp(wrapper, make())
    client_side = wrapper.replace("Server", "Client")
    needle = (f"{wrapper} over {inner}: server-side clipping takes each reply array by array against the global "
              f"model's, and {inner}'s replies hold ")  # fmt: skip
    instead = "a strategy whose replies are the model alone" if inner == "Scaffold" else client_side
    with pytest.raises(FederatedError, match=re.escape(needle) + ".*expected " + re.escape(instead)):
        run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not trained
    with pytest.raises(FederatedError, match=re.escape(needle)):
        simulate(Compressed(dp(wrapper, make()), "int8") if inner == "Scaffold" else dp(wrapper, make()), task,
                 rounds=1)  # fmt: skip
    if inner == "Scaffold":  # client-side clipping is refused too: see the next test
        return
    res = simulate(dp(client_side, make()), task, rounds=2, evaluate=False)
    assert all(r.num_aggregated == 6 and not r.skipped for r in res.history.rounds)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", ["DifferentialPrivacyClientSideFixedClipping",
                                     "DifferentialPrivacyClientSideAdaptiveClipping"])  # fmt: skip
def test_client_side_dp_over_scaffold_is_refused_for_its_unclipped_control_variates(wrapper):
    """tilestack's SCAFFOLD clients clip the model update they upload, but also send c_i+ - c_i = (x - y_i) / (K lr)
    - c, their update unclipped, which the server averages into c and sends to every client with no noise. Before,
    the run went ahead under a guarantee that did not hold; now it is refused before any client trains."""
    from flwr.serverapp import strategy as fl

    from tilestack.federated.strategies import Scaffold

    fixed = {"clipping_norm": 1.0} if "Fixed" in wrapper else {}
    s = getattr(fl, wrapper)(Scaffold(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT),
                             noise_multiplier=0.1, num_sampled_clients=4, **fixed)  # fmt: skip
    needle = (f"{wrapper} over Scaffold: the clients clip their model update, but Scaffold also uploads its "
              "control-variate changes c_i+ - c_i = (x - y_i) / (K lr) - c: each client's unclipped")  # fmt: skip
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    task = blobs(4)
    with pytest.raises(FederatedError, match=re.escape(needle) + ".*privacy guarantee would not hold"):
        run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not trained


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inner", ["CFL", "Selected(CFL)", "Selected(IFCA)", "Selected(HeteroFL)"])
def test_compressing_updates_of_strategies_that_send_several_models_is_refused_at_any_depth(inner):
    """Compressed rebuilds each reply as the global model + its update, which needs one model sent to every client.
    CFL sends each client its cluster's model: before, a compressed CFL run trained round 1's clients and ended with
    KeyError: 'fc1.weight'; and IFCA or HeteroFL inside a Selected wrapper passed the check, which looked at the
    wrapped strategy only. Each is refused on construction; Compressed(Selected(FedAvg)) runs."""
    from tilestack.federated.strategies import CFL, RandomSelector, Selected

    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    make = {"CFL": lambda: CFL(**kw), "IFCA": lambda: IFCA(num_clusters=2, **kw),
            "HeteroFL": lambda: HeteroFL(width_of=lambda p: 0.5, hidden=4, **kw)}  # fmt: skip
    name = inner.removeprefix("Selected(").removesuffix(")")
    strategy = make[name]() if inner == name else Selected(make[name](), RandomSelector(0), per_round=4)
    needle = f"Compressed: inner={name}; expected a strategy that sends every client the same single model"
    with pytest.raises(ValueError, match=re.escape(needle)):
        Compressed(strategy, "int8")
    task = blobs(6, features=3, classes=3)
    res = simulate(Compressed(Selected(FedAvg(**kw), RandomSelector(0), per_round=4), "int8"), task, rounds=2)
    assert all(r.num_aggregated == 4 for r in res.history.rounds)


# ---- secure aggregation of large models -------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_secure_aggregation_of_a_model_beyond_secaggs_clipping_range_is_the_plain_average(tmp_path):
    """Features of scale 0.1 and lr 5: the logistic regression's weights grow past 10 over six rounds, beyond SecAgg+'s
    clipping range of 8, while each round's update stays inside it. Before, clients sent their models and SecAgg+ cut
    every weight to 8 without a word (the secure model 2.4 off the plain one); now they send updates, and the secure
    model is the plain one to the quantisation step, in the model's float32 (it came back float64). With a range
    smaller than the updates every client drops out and run_secure says which range to widen."""
    from tilestack.errors import FederatedError
    from tilestack.federated.secagg import run_plain, run_secure

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = 0.1 * (rng.normal(0, 1, (300, 4)) + 3.0 * np.eye(3, 4)[y])
    np.savez(tmp_path / "small.npz", x=x, y=y)
    task = Task(dataset="file", data_path=str(tmp_path / "small.npz"), num_clients=6, local_steps=30, lr=5.0)
    secure, plain = run_secure(task, rounds=6, per_round=6), run_plain(task, rounds=6, per_round=6)
    assert np.abs(plain["fc.weight"]).max() > 10.0
    for k in plain:
        assert secure[k].dtype == plain[k].dtype == np.float32
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-4, err_msg=k)
    needle = r"none of the 1 rounds reached the unmasked sum.*beyond clipping_range=0.01\); expected .* a larger"
    with pytest.raises(FederatedError, match=needle):
        run_secure(task, rounds=1, per_round=6, clipping_range=0.01)
    with pytest.raises(ValueError, match=r"run_secure: clipping_range=0; expected a finite number > 0"):
        run_secure(task, rounds=1, per_round=6, clipping_range=0)


# ---- FedProx with a large mu ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mu, lr", [(1000.0, 0.1), (20.0, 0.1), (40.0, 0.05)])
def test_fedprox_whose_proximal_step_overshoots_is_refused_before_any_work(mu, lr):
    """lr * mu >= 2: each local step moves the weights by lr * mu times their distance from the global model, past it
    by more than they were away, so every client's training diverges. Before, FedProx(proximal_mu=1000) with lr 0.1
    ran to test accuracy 0.0, every reply finite and averaged in; now it is refused before any client trains,
    naming the bound, through simulate and run_rounds alike."""
    task = Task(dataset="blobs", num_samples=200, num_features=4, num_classes=3, num_clients=4, local_steps=10, lr=lr)
    needle = (f"FedProx: proximal_mu={mu} with the task's lr={lr}: lr * proximal_mu = {lr * mu:g} >= 2 makes every "
              f"local step overshoot the global model (local training diverges); expected proximal_mu < 2 / lr = "
              f"{2 / lr:g}")  # fmt: skip
    s = FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu)
    with pytest.raises(FederatedError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        simulate(s, task, rounds=1)
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    with pytest.raises(FederatedError, match="expected proximal_mu < 2 / lr"):
        run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not trained


@pytest.mark.timeout(90)
def test_fedprox_with_a_large_mu_keeps_every_client_near_the_global_model_and_still_learns():
    """lr 0.1 and mu 0, 1, 5, 10 (lr * mu = 1: each step starts again from the global model): the larger mu, the less
    the model moves in a round, every reply is kept, and after five rounds even mu = 10 is above chance (1/3) on
    three blobs."""
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=5, local_steps=20,
                lr=0.1, separation=2.0)  # fmt: skip
    x0 = _flat(np_(initial_arrays(task)))
    moved, acc = [], []
    for mu in (0.0, 1.0, 5.0, 10.0):
        res = simulate(FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu), task, rounds=5)
        first = simulate(FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu), task, rounds=1,
                         evaluate=False)  # fmt: skip
        moved.append(float(np.linalg.norm(_flat(np_(first.arrays)) - x0)))
        acc.append(res.history.rounds[-1].test_acc)
        assert all(r.num_aggregated == 5 and not r.excluded for r in res.history.rounds)
    assert moved[0] > moved[1] > moved[2] > moved[3] > 0, moved
    assert min(acc) > 0.5, acc
