"""Federated scenarios, round 24 (1 of 2): a client lost mid-round and back under server momentum, clients a million
to one apart in size, Dirichlet label skew at alpha 0.05 and 100 scored client by client, FedProx mu = 0 against FedAvg
bit for bit, FedAdam over partial work, HeteroFL at widths that do not divide the hidden layer, a personal head kept on
each client; and generated data whose settings overflow float32 or the partitioner's sizes.

tilestack's ClientApp (or scripted ones) over tilestack's in-process Flower ``Grid`` under ``ManagedGrid``
(``run_rounds``), or ``simulate``; Flower 1.41's FedAvg, FedAvgM, FedProx and FedAdam. References independent of the
code under test: each client's local SGD replayed on its seeded minibatches (``_fl_round7.client_model``), the server
rules written out in float64 (``_fl_round17.fedavgm``, ``_fl_round16.ServerOptimizer``), the models scored by
``models.evaluate`` on each client's own split.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import check_model, np_, scripted, update, wmean
from _fl_round7 import client_model, weighted_mean
from _fl_round8 import NODE_GONE, ComingAndGoingGrid
from _fl_round9 import keep, near
from _fl_round14 import heterofl_mean
from _fl_round16 import ServerOptimizer
from _fl_round17 import fedavgm
from _fl_round18 import EVERYONE
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from tilestack.federated import (
    InProcessGrid,
    ManagedGrid,
    SystemModel,
    Task,
    codec,
    initial_arrays,
    partition,
    run_rounds,
    simulate,
)
from tilestack.federated import client as tsclient
from tilestack.federated.models import evaluate
from tilestack.federated.strategies import FedBN, HeteroFL, sub_model

pytestmark = pytest.mark.timeout(120)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=2,
                batch_size=8, lr=0.1, seed=5)  # fmt: skip
    return Task(**(base | kw))


def _grid(task: Task, app=tsclient.app, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(app, task.num_clients), task, **kw)


# ---- a client lost mid-round, away, and back: server momentum carried over by hand ---------------------------------
def test_a_client_lost_mid_round_and_back_two_rounds_later_under_fedavgm_is_the_momentum_rule_by_hand():
    """Five clients of quantity-skewed sizes under Flower's FedAvgM (server lr 0.7, momentum 0.9): client 2 trains in
    round 2 but its connection goes before the reply is out, it stays away in round 3 and reconnects in round 4. Each
    round is FedAvgM written out (m = 0.9 m + (x - mean), x - 0.7 m) over exactly the clients that replied, replayed
    from the round's model: client 2 restarts in round 4 from round 3's model, not from the model it last saw."""
    task = _task(num_clients=5, partitioner="quantity", quantity_sigma=1.0, num_samples=300)
    inner = ComingAndGoingGrid(tsclient.app, 5, joins={}, leaves={2: (2, 4)})
    models: list = []
    res = run_rounds(FedAvgM(server_learning_rate=0.7, server_momentum=0.9, **EVERYONE), ManagedGrid(inner, task),
                     initial_arrays(task), num_rounds=4, extra_metrics=keep(models))  # fmt: skip
    there = {1: {0, 1, 2, 3, 4}, 2: {0, 1, 3, 4}, 3: {0, 1, 3, 4}, 4: {0, 1, 2, 3, 4}}
    assert inner.trained[2] == {0, 1, 2, 3, 4}  # it did round 2's work; only the reply was lost
    n = {p: task.num_train(p) for p in range(5)}
    x, m = np_(initial_arrays(task)), None
    for rnd, r in enumerate(res.history.rounds, 1):
        ups = {p: client_model(task, p, rnd, x)[0] for p in there[rnd]}
        want, m = fedavgm(x, ups, n, m, lr=0.7, beta=0.9)
        near(models[rnd - 1], want, ulps=8)
        x = models[rnd - 1]
        assert r.num_aggregated == len(there[rnd])
        assert set(r.excluded) == ({"2"} if rnd in (2, 3) else set())
        assert all(NODE_GONE in why for why in r.excluded.values())
    assert sorted(int(p) for p in res.history.rounds[3].client_train) == [0, 1, 2, 3, 4]


# ---- clients of very different sizes: weighted by examples, checked against the hand-weighted average -------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clients_a_million_to_one_apart_in_examples_get_the_hand_weighted_average_of_their_parameters(dtype):
    """Scripted clients return fixed parameters with 1, 7, 1000 and 10**6 examples. The new model is the mean of
    the returned parameters weighted by those counts (float64, rounded once to the model's dtype), twice in a row; the
    plain mean is far from it (the one-example client counts for nothing beside the million)."""
    weights = {0: 1, 1: 7, 2: 1000, 3: 10**6}
    task = _task()
    shapes = {k: v.shape for k, v in np_(initial_arrays(task)).items()}

    def script(pid, rnd, got, context, config):
        return {k: update(pid, rnd, s, dtype) for k, s in shapes.items()}, {"num-examples": weights[pid]}

    start = ArrayRecord({k: codec.encode(v.astype(dtype)) for k, v in np_(initial_arrays(task)).items()})
    models: list = []
    res = run_rounds(FedAvg(**EVERYONE), _grid(task, scripted(script)), start, num_rounds=2,
                     extra_metrics=keep(models))  # fmt: skip
    for rnd, r in enumerate(res.history.rounds, 1):
        replies = {p: {k: update(p, rnd, s, dtype) for k, s in shapes.items()} for p in range(4)}
        want = wmean(replies, weights)
        check_model(ArrayRecord({k: codec.encode(v) for k, v in models[rnd - 1].items()}), want, dtype)
        plain = wmean(replies, dict.fromkeys(range(4), 1))
        assert max(float(np.abs(plain[k] - want[k]).max()) for k in want) > 0.1
        assert {p: int(c["num-examples"]) for p, c in r.client_train.items()} == {str(p): w for p, w in weights.items()}


def test_stragglers_doing_part_of_their_work_still_weigh_by_their_examples_not_their_steps():
    """Quantity skew at sigma 2 and four epochs of local work; the system model makes every client a straggler for one
    round (ceil(k/E x its steps), k drawn per client), kept under ``partial``. The model is the examples-weighted mean
    of the replayed partial work (each client's own step count, as it reports it), not the steps-weighted one."""
    task = _task(partitioner="quantity", quantity_sigma=2.0, local_steps=None, local_epochs=4.0, num_clients=5,
                 num_samples=300)  # fmt: skip
    system = SystemModel(5, straggler_fraction=1.0, seed=3)
    models: list = []
    res = run_rounds(FedAvg(**EVERYONE), _grid(task, system=system, stragglers="partial"), initial_arrays(task),
                     num_rounds=1, extra_metrics=keep(models))  # fmt: skip
    r = res.history.rounds[0]
    steps = {int(p): int(c["num-steps"]) for p, c in r.client_train.items()}
    assert sorted(steps) == list(range(5)) and r.steps_done < r.steps_full
    x = np_(initial_arrays(task))
    ups = {}
    for p, s in steps.items():
        full = task.steps_for(p)
        assert 1 <= s <= full
        up, done = client_model(task, p, 1, x, work=s / full)
        assert done == s
        ups[p] = up
    sizes = {p: task.num_train(p) for p in range(5)}
    assert sum(s < task.steps_for(p) for p, s in steps.items()) >= 3
    near(models[0], weighted_mean(ups, sizes), ulps=4)
    by_steps = weighted_mean(ups, steps)
    assert max(float(np.abs(by_steps[k] - models[0][k]).max()) for k in x) > 1e-5


# ---- label skew: Dirichlet at alpha 0.05 and 100 ----------------------------------------------------------------
def _class_counts(task: Task, pid: int) -> np.ndarray:
    _, y, _, yt = task.client_data(pid)
    return np.bincount(np.concatenate([y, yt]), minlength=task.classes)


@pytest.mark.parametrize("alpha", [0.05, 100.0])
def test_dirichlet_label_skew_splits_every_example_once_and_federated_evaluation_scores_each_client(alpha):
    """Blobs of 4 classes over 6 clients split by Dirichlet(alpha). Every example is on exactly one client (the class
    totals add up to the pooled set's); at alpha 0.05 some client holds no example of some class (most hold one or two
    classes), at alpha 100 every client holds every class near its pooled share. FedAvg for two rounds with federated
    evaluation of every client: each client's eval-acc and eval-loss are the new model scored on its own test split by
    hand, and the aggregated accuracy is their mean weighted by test examples."""
    task = _task(num_clients=6, num_classes=4, num_samples=480, partitioner="dirichlet", partition_alpha=alpha,
                 seed=1)  # fmt: skip
    counts = np.stack([_class_counts(task, p) for p in range(6)])  # (clients, classes)
    from tilestack.federated.task import _pooled

    pooled_y = _pooled(task)[1]
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(pooled_y, minlength=4))
    assert counts.sum(axis=1).min() >= 2
    if alpha < 1:
        assert (counts == 0).any(axis=1).sum() >= 3  # several clients lack some class entirely
    else:
        shares = counts / counts.sum(axis=1, keepdims=True)
        assert np.abs(shares - np.bincount(pooled_y) / len(pooled_y)).max() < 0.25
        assert (counts > 0).all()
    models: list = []
    everyone = EVERYONE | {"fraction_evaluate": 1.0}
    res = run_rounds(FedAvg(**everyone), _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models),
                     train_config={tsclient.TASK_KEY: task.to_json()},
                     evaluate_config={tsclient.TASK_KEY: task.to_json()})  # fmt: skip
    for rnd, r in enumerate(res.history.rounds, 1):
        model = task.build_model()
        scores = {}
        for p in range(6):
            _, _, xt, yt = task.client_data(p)
            loss, acc = evaluate(model, models[rnd - 1], xt, yt)
            scores[p] = (loss, acc, len(yt))
            got = r.client_eval[str(p)]
            assert got["eval-acc"] == pytest.approx(acc, abs=1e-12)
            assert got["eval-loss"] == pytest.approx(loss, rel=1e-5)
            assert int(got["num-examples"]) == len(yt)
        total = sum(s[2] for s in scores.values())
        assert r.eval_metrics["eval-acc"] == pytest.approx(sum(s[1] * s[2] for s in scores.values()) / total, abs=1e-12)


# ---- FedProx with mu = 0 is FedAvg --------------------------------------------------------------------------------
def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit_under_stragglers_dropouts_and_label_skew():
    """Same seeds, same system model (half the clients stragglers each round, 20% dropout, partial work kept), an MLP
    with batch norm on Dirichlet(0.05) blobs, half the clients sampled, federated evaluation: FedProx(mu=0) gives
    FedAvg's model bit for bit and the same rounds (selection, exclusions, steps, client metrics); FedProx(mu=1) does
    not."""
    task = _task(num_clients=6, num_classes=3, num_samples=300, model="mlp", hidden=6, norm=True, local_steps=None,
                 local_epochs=2.0, partitioner="dirichlet", partition_alpha=0.05, seed=3)  # fmt: skip
    system = SystemModel(6, straggler_fraction=0.5, dropout=0.2, seed=1)
    kw = dict(fraction_train=0.67, fraction_evaluate=0.5, min_available_nodes=1, min_train_nodes=1,
              min_evaluate_nodes=1)  # fmt: skip

    def run(strategy):
        return simulate(strategy, task, rounds=3, system=system, stragglers="partial", seed=2)

    avg, prox0, prox1 = run(FedAvg(**kw)), run(FedProx(proximal_mu=0.0, **kw)), run(FedProx(proximal_mu=1.0, **kw))
    a, b = np_(avg.arrays), np_(prox0.arrays)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for ra, rb in zip(avg.history.rounds, prox0.history.rounds, strict=True):
        assert (ra.excluded, ra.steps_done, ra.client_train, ra.client_eval) == (
            rb.excluded, rb.steps_done, rb.client_train, rb.client_eval)  # fmt: skip
    assert sum(r.steps_done for r in avg.history.rounds) < sum(r.steps_full for r in avg.history.rounds)
    c = np_(prox1.arrays)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


# ---- server optimiser over partial work -------------------------------------------------------------------------
def test_fedadam_over_two_rounds_of_partial_work_is_flowers_rule_written_out():
    """A round deadline cuts the slow clients to the share of their local steps they finish (partial work kept), and
    Flower's FedAdam (eta 0.3, tau 1e-3) steps from the examples-weighted mean of what came back: two rounds of the
    bias-corrected Adam rule in float64 over the replayed partial updates."""
    task = _task(num_clients=4, local_steps=10, seed=7)
    system = SystemModel(4, speeds=np.array([1000.0, 8.0, 4.0, 1000.0]), bandwidths=np.full(4, 1e9), deadline=1.0)
    models: list = []
    strategy = FedAdam(eta=0.3, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, **EVERYONE)
    res = run_rounds(strategy, _grid(task, system=system, stragglers="partial"), initial_arrays(task), num_rounds=2,
                     extra_metrics=keep(models))  # fmt: skip
    opt = ServerOptimizer("adam", eta=0.3, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x = np_(initial_arrays(task))
    n = {p: task.num_train(p) for p in range(4)}
    for rnd, r in enumerate(res.history.rounds, 1):
        steps = {int(p): int(c["num-steps"]) for p, c in r.client_train.items()}
        assert steps[0] == steps[3] == 10 and steps[1] < 10 and steps[2] < steps[1]
        ups = {p: client_model(task, p, rnd, x, work=s / 10)[0] for p, s in steps.items()}
        want = opt.step(x, weighted_mean(ups, n), rnd)
        near(models[rnd - 1], want, ulps=16)
        x = models[rnd - 1]


# ---- HeteroFL widths that do not divide the hidden layer ---------------------------------------------------------
@pytest.mark.parametrize("norm", [False, True])
def test_heterofl_widths_that_do_not_divide_the_hidden_layer_average_each_element_over_its_holders(norm):
    """hidden = 10 and widths 1, 0.25, 0.35, 0.05: the clients hold 10, 2 (round(2.5), to even), 4 (round(3.5)) and 1
    (at least one) hidden units. Over two rounds each element of the global model is the examples-weighted mean over
    the clients whose leading slice holds it (replayed from the narrower model each was sent), else unchanged."""
    task = _task(model="mlp", hidden=10, norm=norm)
    widths = {0: 1.0, 1: 0.25, 2: 0.35, 3: 0.05}
    models: list = []
    res = run_rounds(HeteroFL(width_of=widths.__getitem__, hidden=10, **EVERYONE), _grid(task), initial_arrays(task),
                     num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    n = {p: task.num_train(p) for p in range(4)}
    for rnd, r in enumerate(res.history.rounds, 1):
        assert r.excluded == {} and r.num_aggregated == 4
        ups = {p: client_model(task, p, rnd, sub_model(x, 10, widths[p]))[0] for p in range(4)}
        assert [ups[p]["fc1.weight"].shape[1] for p in range(4)] == [10, 2, 4, 1]
        want = heterofl_mean(x, ups, n)
        near(models[rnd - 1], want, ulps=4)
        # hidden units 4..9 only client 0 holds: its values alone
        np.testing.assert_allclose(models[rnd - 1]["fc2.weight"][4:], ups[0]["fc2.weight"][4:], rtol=2**-22)
        x = models[rnd - 1]


# ---- personalisation layers kept local --------------------------------------------------------------------------
def test_a_personal_head_stays_on_each_client_and_each_is_scored_with_its_own():
    """FedBN(local_prefix='fc2.'): an MLP whose head (fc2) each client keeps (FedPer). The server's fc2 never moves and
    no reply carries it; the body (fc1) is the examples-weighted mean of the replayed bodies, each client having
    trained from the global body and its own head of the round before; federated evaluation scores each client with
    the global body and its own head, by hand."""
    task = _task(model="mlp", hidden=5, partitioner="dirichlet", partition_alpha=0.3, seed=2)
    models: list = []
    strategy = FedBN(local_prefix="fc2.", **(EVERYONE | {"fraction_evaluate": 1.0}))
    res = run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models),
                     evaluate_config={tsclient.TASK_KEY: task.to_json()})  # fmt: skip
    x = np_(initial_arrays(task))
    heads: dict[int, dict[str, np.ndarray]] = {}
    n = {p: task.num_train(p) for p in range(4)}
    body_bytes = sum(len(codec.encode(v.astype(np.float32)).data) for k, v in x.items() if k.startswith("fc1."))
    for rnd, r in enumerate(res.history.rounds, 1):
        trained = {}
        for p in range(4):
            start = x | heads.get(p, {})
            trained[p] = client_model(task, p, rnd, start)[0]
            heads[p] = {k: v for k, v in trained[p].items() if k.startswith("fc2.")}
        body = weighted_mean({p: {k: v for k, v in t.items() if k.startswith("fc1.")} for p, t in trained.items()}, n)
        got = models[rnd - 1]
        near({k: v for k, v in got.items() if k.startswith("fc1.")}, body, ulps=4)
        for k in ("fc2.weight", "fc2.bias"):
            np.testing.assert_array_equal(got[k], np_(initial_arrays(task))[k])
        assert r.bytes_up == 4 * body_bytes
        for p in range(4):
            _, _, xt, yt = task.client_data(p)
            own = {k: v for k, v in got.items() if k.startswith("fc1.")} | heads[p]
            loss, acc = evaluate(task.build_model(), own, xt, yt)
            assert r.client_eval[str(p)]["eval-acc"] == pytest.approx(acc, abs=1e-12)
            assert r.client_eval[str(p)]["eval-loss"] == pytest.approx(loss, rel=1e-5)
        x = got


# ---- generated data whose settings overflow -----------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [50.0, 1e3, 1e6, 1e300])
def test_quantity_skew_of_a_huge_sigma_gives_every_client_its_minimum_and_loses_no_example(sigma):
    """Client sizes proportional to lognormal(0, sigma) draws: from sigma ~ 700 on the draws overflowed to inf (or
    underflowed to 0) and the shares became NaN: clients got no examples while others were lost (sigma 1e6 over 120
    samples: sizes 0, 0, 9, 111 less the lost). Every client now has min_size, the largest draw's client the rest, and
    every sample is on exactly one client; the draws are the same (the largest stays the largest)."""
    parts = partition.quantity_skew(120, 4, sigma, seed=0, min_size=2)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(120))
    sizes = [len(p) for p in parts]
    logs = np.random.default_rng(0).normal(0.0, sigma, 4)
    assert sizes[int(np.argmax(logs))] == 120 - 2 * 3 and sorted(sizes)[:3] == [2, 2, 2]
    task = _task(partitioner="quantity", quantity_sigma=sigma, num_samples=120)
    assert sum(len(task.client_data(p)[1]) + len(task.client_data(p)[3]) for p in range(4)) == 120
    assert min(len(task.client_data(p)[1]) for p in range(4)) >= 1


def test_quantity_skew_of_an_ordinary_sigma_is_unchanged_by_the_overflow_guard():
    """The log-domain path runs only where the lognormal weights overflow: at sigma 2 the sizes are those of the
    lognormal shares written out (floor, then one each to the largest remainders)."""
    parts = partition.quantity_skew(100, 5, 2.0, seed=4, min_size=1)
    w = np.random.default_rng(4).lognormal(0.0, 2.0, 5)
    exact = w / w.sum() * (100 - 5)
    sizes = 1 + np.floor(exact).astype(int)
    extra = np.argsort(-(exact - np.floor(exact)), kind="stable")[: 100 - int(sizes.sum())]
    sizes[extra] += 1
    assert [len(p) for p in parts] == sizes.tolist()


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(separation=1e40), "separation=1e+40"),
        (dict(separation=1e300), "separation=1e+300"),
    ],
)
def test_blobs_whose_class_means_overflow_float32_are_refused_on_construction_naming_separation(kw, words):
    """The generated set's class means are drawn at scale ``separation``: past float32's range they became inf and
    every client trained on inf features (NaN updates) without a word. Refused when the Task is made."""
    with pytest.raises(ValueError, match=words.replace("+", r"\+")) as ex:
        _task(**kw)
    assert "float32" in str(ex.value)
    assert np.isfinite(_task(separation=1e30).client_data(0)[0]).all()


@pytest.mark.parametrize("dataset", ["blobs", "digits"])
def test_a_feature_shift_that_overflows_float32_is_refused_naming_it_before_any_round(dataset):
    """Each client's features are scaled by exp(N(0, feature_shift)): at feature_shift 100 the scale overflows and the
    client's features were inf or NaN (digits' zero pixels times inf), trained on without a word. Building the client's
    data now raises naming feature_shift and the client; ``simulate`` builds the server's evaluation data first, so the
    run is refused before any client trains."""
    kw = dict(num_samples=6000, num_features=60, num_classes=10) if dataset == "digits" else {}
    task = _task(dataset=dataset, feature_shift=100.0, **kw)
    with pytest.raises(ValueError, match="feature_shift=100.0") as ex:
        task.client_data(0)
    assert "float32" in str(ex.value)
    calls: list = []

    def count(metrics):
        calls.append(metrics)

    with pytest.raises(ValueError, match="feature_shift"):
        simulate(FedAvg(**EVERYONE), task, rounds=1, on_round=count)
    assert calls == []
    ok = _task(dataset=dataset, feature_shift=2.0, **kw)
    assert np.isfinite(ok.client_data(0)[0]).all()


def test_synthetic_of_a_beta_whose_features_overflow_float32_is_refused_naming_beta():
    """Synthetic(alpha, beta): device k's feature means are drawn around B_k ~ N(0, beta); at beta 1e200 the features
    reached 1e99, inf in float32, without a word. Building the device's data raises naming beta; alpha, which moves
    only the labelling model, is taken at any finite size."""
    with pytest.raises(ValueError, match=r"beta=1e\+200") as ex:
        Task(alpha=1.0, beta=1e200, num_clients=3).client_data(0)
    assert "float32" in str(ex.value)
    x = Task(alpha=1e200, beta=1.0, num_clients=3).client_data(0)[0]
    assert np.isfinite(x).all() and math.isfinite(float(np.abs(x).max()))


# ---- the same refusals through `tilestack fl run` ---------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--beta", "1e200", "--clients", "4", "--per-round", "2"], ["Invalid value for --beta", "beta=1e+200"]),
        (["--dataset", "blobs", "--clients", "4", "--per-round", "2", "--local-steps", "99999999999"],
         ["Invalid value for --local-steps", "local_steps=99999999999"]),
        (["--dataset", "blobs", "--clients", "4", "--per-round", "2", "--straggler-policy", "stale", "--deadline", "1",
          "--staleness-exponent", "2000"], ["Invalid value for --staleness-exponent", "staleness_exponent=2000.0"]),
    ],
)
def test_fl_run_refuses_data_or_work_settings_that_overflow_naming_the_option(args, needles):
    """Synthetic's beta past float32, a local step count no round could finish and a staleness weight that underflows,
    given on the command line: a usage error (exit 2) naming the option, no traceback and no run."""
    import re

    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["fl", "run", "--rounds", "1", *args], env={"COLUMNS": "400"})
    out = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and "test accuracy" not in res.output
    for needle in needles:
        assert needle in out, (needle, out)


# ---- client-side DP clipping: each upload's norm bound checked by hand --------------------------------------------
def _recording_app(uploads: dict) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        reply = tsclient.app(msg, context)
        key = (int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"]))
        uploads[key] = (codec.to_numpy(reply.content["arrays"]), dict(reply.content["metrics"]))
        return reply

    @app.query()
    def query(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    return app


def test_client_side_fixed_clipping_bounds_every_upload_by_hand_and_the_noiseless_mean_is_theirs():
    """Flower's DifferentialPrivacyClientSideFixedClipping (noise 0, clip 0.5) over clients of 12 to 148 examples and
    two local epochs, so that their updates' norms (0.29 to 1.12 in round 1) straddle the bound. Each upload is the
    replayed model with its update scaled by min(1, C / ||update||) (all arrays as one vector), its norm at most C, and
    ``norm_bit`` says whether it was scaled, by hand; the new model is the plain (unit-weight) mean of the uploads."""
    from _fl_round19 import clip_update
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.differential_privacy import KEY_NORM_BIT

    clip = 0.5
    task = _task(partitioner="quantity", quantity_sigma=1.5, local_steps=None, local_epochs=2.0, num_samples=300)
    inner = FedAvg(**EVERYONE, weighted_by_key=tsclient.UNIT_WEIGHT)
    strategy = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clip,
                                                          num_sampled_clients=4)  # fmt: skip
    uploads: dict = {}
    models: list = []
    run_rounds(strategy, _grid(task, _recording_app(uploads)), initial_arrays(task), num_rounds=2,
               extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    bits = []
    for rnd in (1, 2):
        clipped = {}
        for p in range(4):
            trained = client_model(task, p, rnd, x)[0]
            norm = math.sqrt(sum(float(np.sum((trained[k].astype(np.float64) - x[k]) ** 2)) for k in x))
            got, metrics = uploads[(p, rnd)]
            up = math.sqrt(sum(float(np.sum((got[k].astype(np.float64) - x[k]) ** 2)) for k in x))
            assert up <= clip * (1 + 1e-5), (p, rnd, up)
            assert metrics[KEY_NORM_BIT] == int(norm > clip)
            bits.append(norm > clip)
            clipped[p] = clip_update(x, trained, clip)
            for k in x:
                np.testing.assert_allclose(got[k], clipped[p][k], rtol=1e-5, atol=1e-7, err_msg=(p, rnd, k))
        want = weighted_mean({p: {k: v.astype(np.float32) for k, v in c.items()} for p, c in clipped.items()},
                             dict.fromkeys(range(4), 1.0))  # fmt: skip
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=1e-5, atol=1e-7, err_msg=(rnd, k))
        x = models[rnd - 1]
    assert any(bits) and not all(bits)  # the bound cut some updates and left others as they were
