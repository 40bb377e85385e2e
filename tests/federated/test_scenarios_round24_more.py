"""Federated scenarios, round 24 (2 of 2): SecAgg+ over clients far apart in size against the hand-weighted average, a
server crash during round 3's federated evaluation resumed to the uninterrupted run, evaluation-only rounds under an
availability pattern scored client by client, and bad configurations refused before any client runs, naming the
argument.

tilestack's ClientApp (or a counting wrapper of it) over tilestack's in-process Flower ``Grid`` under ``ManagedGrid``,
``simulate`` and ``secagg.run_secure`` (Flower's SecAgg+ workflow and mod); references written out here in float64
(``_fl_round18.secure_update``: a SecAgg+ client's update replayed on its seeded minibatches).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round11 import counting_app as _counting_app
from _fl_round18 import EVERYONE, secure_update
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

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
from tilestack.federated.models import evaluate
from tilestack.federated.strategies import HeteroFL, RandomSelector, Scaffold, Selected, make_strategy

pytestmark = pytest.mark.timeout(120)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=2,
                batch_size=8, lr=0.1, seed=5)  # fmt: skip
    return Task(**(base | kw))


# ---- SecAgg+ over clients of very different sizes ---------------------------------------------------------------
def test_secure_aggregation_over_clients_far_apart_in_size_is_the_examples_weighted_hand_average():
    """Quantity skew at sigma 2 (9 to 229 training examples): each round the secure model is the global model plus the
    examples-weighted mean of the clients' replayed updates, to SecAgg+'s quantisation step, and the plain run (the same
    clients without the mod) is it to float32 rounding; the unweighted mean is another model."""
    from tilestack.federated.secagg import run_plain, run_secure

    task = _task(num_samples=400, partitioner="quantity", quantity_sigma=2.0)
    n = {p: task.num_train(p) for p in range(4)}
    assert max(n.values()) >= 20 * min(n.values()), n
    x = {k: v.astype(np.float64) for k, v in task.initial_params().items()}
    for rnd in (1, 2):
        ups = {p: secure_update(task, p, rnd, {k: v.astype(np.float32) for k, v in x.items()}) for p in range(4)}
        total = sum(n.values())
        x = {k: (x[k] + sum(n[p] * ups[p][k] for p in ups) / total).astype(np.float32).astype(np.float64) for k in x}
        plain_mean = {k: sum(ups[p][k] for p in ups) / 4 for k in x}
    secure = run_secure(task, rounds=2, per_round=4)
    plain = run_plain(task, rounds=2, per_round=4)
    for k in x:
        np.testing.assert_allclose(plain[k], x[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(secure[k], x[k], atol=1e-4, err_msg=k)
    weighted_mean = {k: sum(n[p] * ups[p][k] for p in ups) / sum(n.values()) for k in x}
    assert max(float(np.abs(plain_mean[k] - weighted_mean[k]).max()) for k in x) > 1e-3


# ---- a crash during federated evaluation, resumed ----------------------------------------------------------------
class _EvalCrashOnce(Scaffold):
    """SCAFFOLD whose federated evaluation of round 3 raises once (the server going down after the round's model and
    control variate were aggregated and the clients' c_i had moved on)."""

    crashed = False

    def aggregate_evaluate(self, server_round, replies):
        if server_round == 3 and not type(self).crashed:
            type(self).crashed = True
            raise RuntimeError("the server went down during round 3's evaluation")
        return super().aggregate_evaluate(server_round, replies)


def test_a_server_crash_during_round_3s_evaluation_resumes_to_the_uninterrupted_run(tmp_path):
    """SCAFFOLD over five clients with dropouts and a selector of three per round: the server goes down while round 3's
    evaluation replies are aggregated, after its clients trained (their c_i moved) and the server's x and c were
    aggregated. The checkpoint holds round 2; resumed with the same strategy object, round 3 is replayed from the
    checkpoint's x, c and client states and the run ends where the uninterrupted one does, bit for bit."""
    task = _task(num_clients=5, local_steps=3, seed=2)
    system = SystemModel(5, dropout=0.25, seed=4)

    def strategy():
        return Selected(_EvalCrashOnce(**(EVERYONE | {"fraction_evaluate": 1.0})), RandomSelector(3), 3)

    _EvalCrashOnce.crashed = True  # the uninterrupted run does not crash
    whole = simulate(strategy(), task, rounds=5, system=system, seed=1)
    _EvalCrashOnce.crashed = False
    ckpt = tmp_path / "run.ckpt"
    s = strategy()
    with pytest.raises(RuntimeError, match="round 3's evaluation"):
        simulate(s, task, rounds=5, system=system, seed=1, checkpoint=ckpt)
    resumed = simulate(s, task, rounds=5, system=system, seed=1, checkpoint=ckpt)
    for k, v in np_(whole.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v, err_msg=k)
    fields = ("excluded", "client_train", "client_eval", "eval_metrics", "test_acc", "steps_done")
    assert [[getattr(m, f) for f in fields] for m in resumed.history.rounds] == \
           [[getattr(m, f) for f in fields] for m in whole.history.rounds]
    assert any(m.excluded for m in whole.history.rounds)  # the dropouts did something


# ---- evaluation-only rounds under an availability pattern ----------------------------------------------------------
def test_evaluation_only_rounds_score_exactly_the_online_clients_by_hand():
    """fraction_train 0 and fraction_evaluate 1 over five clients, two of which are offline in odd rounds (the system's
    availability): no round trains (the model stays bit for bit), each round evaluates exactly the clients online, each
    scored by hand on its own test split, the aggregate their mean weighted by test examples."""
    task = _task(num_clients=5, num_samples=300, partitioner="dirichlet", partition_alpha=0.5)
    availability = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=float)  # round r uses row (r - 1) % 2
    system = SystemModel(5, availability=availability, seed=0)
    rng = np.random.default_rng(8)
    start = {k: rng.normal(0, 1.0, v.shape).astype(np.float32) for k, v in task.initial_params().items()}
    strategy = FedAvg(fraction_train=0.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                      min_evaluate_nodes=1)  # fmt: skip
    res = simulate(strategy, task, rounds=3, system=system, initial=codec.to_record(start), evaluate=False)
    for k, v in np_(res.arrays).items():
        np.testing.assert_array_equal(v, start[k])
    scores = {}
    for p in range(5):
        _, _, xt, yt = task.client_data(p)
        loss, acc = evaluate(task.build_model(), start, xt, yt)
        scores[p] = (loss, acc, len(yt))
    for rnd, m in enumerate(res.history.rounds, 1):
        online = [p for p in range(5) if availability[(rnd - 1) % 2, p]]
        assert m.num_aggregated == 0 and m.num_selected == 0
        assert sorted(int(p) for p in m.client_eval) == online
        for p in online:
            assert m.client_eval[str(p)]["eval-acc"] == pytest.approx(scores[p][1], abs=1e-12)
            assert m.client_eval[str(p)]["eval-loss"] == pytest.approx(scores[p][0], rel=1e-5)
        total = sum(scores[p][2] for p in online)
        want = sum(scores[p][1] * scores[p][2] for p in online) / total
        assert m.eval_metrics["eval-acc"] == pytest.approx(want, abs=1e-12)


# ---- bad configurations: refused before any client runs, naming the argument ---------------------------------------


BAD_STRATEGIES = [
    (lambda: FedAvg(fraction_train=1.5), "fraction_train=1.5"),
    (lambda: FedAvg(fraction_train=-0.25), "fraction_train=-0.25"),
    (lambda: FedAvg(fraction_evaluate=math.nan), "fraction_evaluate=nan"),
    (lambda: FedAvg(min_train_nodes=9), "min_train_nodes=9"),
    (lambda: FedProx(proximal_mu=-1.0, **EVERYONE), "proximal_mu=-1.0"),
    (lambda: FedProx(proximal_mu=50.0, **EVERYONE), "proximal_mu"),  # lr 0.1 x 50 >= 2: every step overshoots
    (lambda: FedAvgM(server_momentum=1.0, **EVERYONE), "server_momentum=1.0"),
    (lambda: FedAdam(tau=0.0, **EVERYONE), "tau=0.0"),
    (lambda: FedAdam(beta_1=1.0, **EVERYONE), "beta_1=1.0"),
    (lambda: HeteroFL(width_of=lambda p: (1.0, 0.5, 0.0, 1.0)[p], hidden=32, **EVERYONE), "width_of(2)"),
]


@pytest.mark.parametrize("make, words", BAD_STRATEGIES)
def test_a_bad_strategy_setting_is_refused_before_any_client_runs_naming_it(make, words):
    task = _task(model="mlp") if "width_of" in words else _task()
    calls: list = []
    grid = ManagedGrid(InProcessGrid(_counting_app(calls), task.num_clients), task)
    with pytest.raises((ValueError, TypeError)) as ex:
        run_rounds(make(), grid, initial_arrays(task), num_rounds=2)
    assert words in str(ex.value)
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(rounds=-1), "rounds=-1"),
        (dict(rounds=1.5), "rounds=1.5"),
        (dict(stragglers="wait"), "stragglers='wait'"),
        (dict(eval_clients=0), "eval_clients=0"),
        (dict(system=SystemModel(5)), "num_clients=5"),
        (dict(timeout=-1.0), "timeout=-1.0"),
    ],
)
def test_a_bad_run_argument_is_refused_before_any_work_naming_it(kwargs, words):
    calls: list = []
    with pytest.raises((ValueError, TypeError)) as ex:
        simulate(FedAvg(**EVERYONE), _task(), **({"rounds": 1} | kwargs), on_round=calls.append)
    assert words in str(ex.value)
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(partitioner="dirichlet", partition_alpha=-0.5), "partition_alpha=-0.5"),
        (dict(partitioner="dirichlet", partition_alpha=0.0), "partition_alpha=0.0"),
        (dict(partitioner="dirichlet", partition_alpha=math.inf), "partition_alpha=inf"),
        (dict(partitioner="quantity", quantity_sigma=math.nan), "quantity_sigma=nan"),
        (dict(num_samples=20, num_clients=11), "num_samples=20"),
        (dict(dataset="digits", num_clients=1000, num_samples=6000, num_features=60, num_classes=10),
         "num_clients=1000"),
        (dict(partitioner="shards", classes_per_client=4), "classes_per_client=4"),
        (dict(num_clients=0), "num_clients=0"),
    ],
)
def test_a_bad_data_split_is_refused_when_the_task_is_made_naming_it(kwargs, words):
    with pytest.raises(ValueError) as ex:
        _task(**kwargs)
    assert words in str(ex.value)


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("fedfoo", {}, "name='fedfoo'"),
        ("FedAvg", {}, "name='FedAvg'"),
        ("fedavg", dict(clients_per_round=0), "clients_per_round=0"),
        ("fedavg", dict(clients_per_round=5), "clients_per_round=5"),
        ("fedavg", dict(proximal_mu=0.5), "proximal_mu=0.5"),
        ("fedadam", dict(server_lr=-0.1), "server_lr=-0.1"),
        ("ifca", dict(num_clusters=5), "num_clusters"),
    ],
)
def test_make_strategy_refuses_a_bad_name_or_setting_naming_it(name, kwargs, words):
    task = _task()
    with pytest.raises(ValueError) as ex:
        strategy = make_strategy(name, **({"clients_per_round": 2, "num_clients": 4} | kwargs))
        simulate(strategy, task, rounds=1)  # a setting only the run can judge (IFCA's clusters against the clients)
    assert words in str(ex.value)


def test_fedprox_with_mu_zero_from_make_strategy_is_its_fedavg_bit_for_bit():
    """make_strategy's fedprox at its default mu = 0 and its fedavg, same seed, half the clients per round over three
    rounds of label-skewed clients: the same model, bit for bit."""
    task = _task(num_clients=6, num_samples=300, partitioner="dirichlet", partition_alpha=0.05)
    a = simulate(make_strategy("fedavg", clients_per_round=3, num_clients=6), task, rounds=3, seed=4)
    b = simulate(make_strategy("fedprox", clients_per_round=3, num_clients=6), task, rounds=3, seed=4)
    for k, v in np_(a.arrays).items():
        np.testing.assert_array_equal(np_(b.arrays)[k], v, err_msg=k)
    assert [m.client_train for m in a.history.rounds] == [m.client_train for m in b.history.rounds]


@pytest.mark.parametrize("steps", [10**9 + 1, 2**63, 10**30])
def test_a_local_step_count_no_round_could_finish_is_refused_naming_local_steps(steps):
    """``local_epochs`` has been bounded (1e6) since its step count overflowed; ``local_steps`` of 2**63 or 1e30 was
    taken, in the Task and in a round config's ``local-steps``, and every client's round ran for ever. Refused before
    any client runs, naming it; the bound itself is taken."""
    with pytest.raises(ValueError, match=f"local_steps={steps}; expected at most"):
        _task(local_steps=steps)
    task = _task()
    calls: list = []
    grid = ManagedGrid(InProcessGrid(_counting_app(calls), task.num_clients), task)
    with pytest.raises(Exception, match=f"local-steps={steps}") as ex:
        run_rounds(FedAvg(**EVERYONE), grid, initial_arrays(task), num_rounds=1,
                   train_config={"local-steps": steps})  # fmt: skip
    assert "local_steps" in str(ex.value) and calls == []
    assert _task(local_steps=10**9).steps_for(0) == 10**9


def _all_late(exponent: float, **kw):
    """Three clients that each need more than two deadlines for their work (2 s of steps and the model's transfer, a 1 s
    deadline): every update is two rounds late, so the rounds that aggregate hold late updates only."""
    task = _task(num_clients=3, num_samples=120, local_steps=4)
    system = SystemModel(3, speeds=np.full(3, 2.0), bandwidths=np.full(3, 1e9), deadline=1.0)
    return simulate(FedAvg(**EVERYONE), task, rounds=4, system=system, stragglers="stale", staleness_exponent=exponent,
                    **kw)  # fmt: skip


@pytest.mark.parametrize("exponent, max_staleness", [(1100.0, 4), (1e6, 4), (60.0, 10**6)])
def test_a_staleness_exponent_under_which_a_late_update_weighs_nothing_is_refused_before_any_work(exponent,
                                                                                                max_staleness):
    """(1 + rounds late) ** -staleness_exponent underflowed to 0 for an update max_staleness rounds late (from ~440 at
    max_staleness 4): such updates counted for nothing, and a round whose replies were all late ended the run with a
    ZeroDivisionError inside Flower's weighted mean. Refused before any work, naming the exponent and the bound."""
    calls: list = []
    with pytest.raises(ValueError, match=f"staleness_exponent={exponent!r} with max_staleness={max_staleness}") as ex:
        _all_late(exponent, max_staleness=max_staleness, on_round=calls.append)
    assert "expected staleness_exponent <=" in str(ex.value) and calls == []


def test_late_updates_alone_at_a_steep_but_representable_staleness_weight_are_their_plain_mean():
    """At staleness_exponent 440 (a two-rounds-late weight of 3**-440, about 1e-210, still a normal float64) the rounds
    that aggregate hold late updates only: each such round's model is their mean (equal staleness: the weights
    cancel), the model of the run that does not weigh staleness at all."""
    whole = _all_late(440.0)
    rounds = whole.history.rounds
    assert any(r.stale and r.num_aggregated == 3 for r in rounds)
    assert all(set(r.stale.values()) <= {2} for r in rounds)
    assert all(np.isfinite(v).all() for v in np_(whole.arrays).values())
    plain = _all_late(0.0)
    for k, v in np_(plain.arrays).items():
        np.testing.assert_allclose(np_(whole.arrays)[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


# ---- the deployment ServerApp's run config: refusals name the key the user set -------------------------------------
class _Untouchable(InProcessGrid):
    """A Flower grid that fails the test if the ServerApp uses it (the roll call or a round's messages)."""

    def get_node_ids(self):
        raise AssertionError("the grid was used (roll call) before the run config was checked")

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the grid was used (messages) before the run config was checked")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"strategy": "nope"}, "run config: strategy='nope': make_strategy: name='nope'"),
        ({"strategy": "FedAvg"}, "run config: strategy='FedAvg'"),
        ({"eval-fraction": 1.5}, "run config: eval-fraction=1.5: make_strategy: eval_fraction=1.5"),
        ({"clients-per-round": 0}, "run config: clients-per-round=0: "),
        ({"clients-per-round": 5}, "run config: clients-per-round=5: "),
        ({"proximal-mu": 1.0}, "run config: proximal-mu=1.0: make_strategy: proximal_mu=1.0 is a setting of fedprox"),
        ({"strategy": "fedprox", "proximal-mu": 100.0}, "run config: proximal-mu=100.0: FedProx: proximal_mu=100.0"),
        ({"num-rounds": -1}, "run config: num-rounds=-1: "),
        ({"timeout": 0.0}, "run config: timeout=0.0: "),
        ({"timeout": math.inf}, "run config: timeout=inf: "),
        ({"seed": -2}, "run config: seed=-2: "),
    ],
)
def test_a_deployment_run_config_the_library_refuses_names_the_run_config_key_before_the_roll_call(tmp_path, change,
                                                                                                   words):
    """The deployment's user sets ``strategy``, ``num-rounds``, ``eval-fraction`` in ``flwr run --run-config``; the
    refusals named the library's arguments (``make_strategy: name='nope'``, ``run_rounds: num_rounds=-1``), and
    FedProx's mu against the task's lr was refused only after the roll call had asked every SuperNode. Each is refused
    before the grid is used, naming the run-config key and its value, the library's words kept."""
    from flwr.app import Context, RecordDict

    from tilestack.federated import deploy

    task = _task()
    cfg = {"task": task.to_json(), "result-path": str(tmp_path / "r.json"), "num-rounds": 1} | change
    with pytest.raises(ValueError) as ex:
        deploy.main(_Untouchable(tsclient.app, 4), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                          run_config=cfg))  # fmt: skip
    assert words in str(ex.value)
    assert not (tmp_path / "r.json").exists()


# ---- waits past what Python's threads can wait -------------------------------------------------------------------
@pytest.mark.parametrize("timeout", [1e10, 1e300])
def test_a_timeout_past_what_a_thread_can_wait_is_refused_before_any_client_runs(timeout):
    """``timeout`` is each client's reply deadline, waited for on a thread: 1e10 s ("no limit, really") passed the check
    (finite, > 0) and round 1 ended in the first client's wait with "OverflowError: timestamp out of range for platform
    time_t". Refused before any work, naming it and the bound, by simulate, run_rounds and SecAgg+'s run_secure; the
    bound itself runs."""
    import threading

    from tilestack.federated.secagg import run_secure

    task = _task()
    calls: list = []
    with pytest.raises(ValueError, match=re.escape(f"simulate: timeout={timeout!r}; expected at most")):
        simulate(FedAvg(**EVERYONE), task, rounds=1, timeout=timeout, on_round=calls.append)
    grid = ManagedGrid(InProcessGrid(_counting_app(calls), task.num_clients), task)
    with pytest.raises(ValueError, match=re.escape(f"run_rounds: timeout={timeout!r}; expected at most")):
        run_rounds(FedAvg(**EVERYONE), grid, initial_arrays(task), num_rounds=1, timeout=timeout)
    with pytest.raises(ValueError, match=re.escape(f"run_secure: timeout={timeout!r}")):
        run_secure(task, rounds=1, per_round=4, timeout=timeout)
    assert calls == []
    res = simulate(FedAvg(**EVERYONE), task, rounds=1, timeout=threading.TIMEOUT_MAX)
    assert res.history.rounds[0].num_aggregated == 4


def test_a_slow_fault_past_what_python_can_sleep_is_refused_naming_slow_seconds():
    """A 'slow' client sleeps ``slow_seconds`` before replying (to miss the timeout); 1e300 made it fail in time.sleep
    with an OverflowError, left out as an error instead of a late reply. Refused when the Task is made."""
    with pytest.raises(ValueError, match=r"slow_seconds=1e\+300; expected in \[0, "):
        _task(faults=((1, "slow"),), slow_seconds=1e300)


def test_feddf_server_distillation_steps_no_round_could_finish_are_refused_naming_steps():
    """FedDF distils the round's client ensemble into the global model for ``steps`` server steps after every round's
    training: 10**12 was taken and the server distilled for ever after round 1's clients trained. Bounded as a
    client's ``local_steps`` is; the bound is taken."""
    from tilestack.federated.strategies import FedDF

    task = _task()
    unlabeled = task.client_data(0)[2]
    with pytest.raises(ValueError, match=r"FedDF: steps=1000000000000; expected an integer in \[0, 1000000000\]"):
        FedDF(model=task.build_model(), unlabeled=unlabeled, steps=10**12, **EVERYONE)
    FedDF(model=task.build_model(), unlabeled=unlabeled, steps=10**9, **EVERYONE)


# ---- rates so small that a client's time is no finite number ------------------------------------------------------
@pytest.mark.parametrize("speed", [1e-310, 5e-324])
def test_a_subnormal_speed_is_refused_naming_the_client(speed):
    """A speed of 1e-310 steps/s is finite and > 0, but 1 / speed is inf: every duration of that client was inf, and
    an Oort selector's sampling odds over such clients were NaN ("Probabilities contain NaN" in round 1). Refused
    when the SystemModel is made, naming the entry and the least rate taken."""
    with pytest.raises(ValueError, match=re.escape(f"SystemModel: speeds[2]={speed!r} (client 2); expected (4,) "
                                                   "finite numbers > 0 (at least")):  # fmt: skip
        SystemModel(4, speeds=np.array([1.0, 2.0, speed, 1.0]))
    with pytest.raises(ValueError, match=r"bandwidths\[0\]"):
        SystemModel(4, bandwidths=np.array([speed, 1.0, 1.0, 1.0]))


def test_oort_over_clients_whose_full_work_takes_no_finite_time_still_picks_its_clients():
    """Speeds of 1e-300 steps/s and full work of 10**9 steps: Oort's expected times are inf for two of four clients
    (1e309 s). Its exploration odds (1 / time) were 0 for them and numpy refused to draw three distinct clients from
    two non-zero odds ("Fewer non-zero entries in p than size"), or NaN where every client was so slow; the run ended
    in round 1. Such clients now get uniform odds: each round trains three distinct clients."""
    from tilestack.federated.strategies import OortSelector

    task = _task()
    for speeds in ([1e-300, 1e-300, 1.0, 1.0], [1e-300] * 4):
        system = SystemModel(4, speeds=np.array(speeds), bandwidths=np.full(4, 1e9))
        strategy = Selected(FedAvg(**EVERYONE), OortSelector(system, full_steps=[10**9] * 4), 3)
        res = simulate(strategy, task, rounds=3, system=system)
        for m in res.history.rounds:
            assert m.num_selected == m.num_aggregated == 3 and len(m.client_train) == 3


def test_stale_work_too_long_for_the_round_arithmetic_is_left_out_naming_it_not_an_overflow():
    """``stragglers='stale'`` counts how many rounds late a cut client's whole work ends: at a 1e-300 s deadline a 1e6 s
    job is 1e306 rounds late, the quotient overflowed to inf and math.ceil raised OverflowError inside round 1 (the run
    ended); a 1e301-round lateness was spelled out digit by digit in the exclusion. The client is left out past
    max_staleness, its lateness given as "at least 1e+12 rounds", and the others' 10-round lateness as it is."""
    task = _task(local_steps=10)
    system = SystemModel(4, speeds=np.array([1e-300, 1.0, 1.0, 1.0]), bandwidths=np.full(4, 1e9), deadline=1.0)
    res = simulate(FedAvg(**EVERYONE), task, rounds=1, system=system, stragglers="stale")
    excluded = res.history.rounds[0].excluded
    assert excluded["0"] == "deadline: its update would arrive at least 1e+12 rounds late, past max_staleness=4"
    assert excluded["1"] == "deadline: its update would arrive 10 rounds late, past max_staleness=4"
    tiny = SystemModel(4, speeds=np.array([1e-5, 1.0, 1.0, 1.0]), bandwidths=np.full(4, 1e9), deadline=1e-300)
    res = simulate(FedAvg(**EVERYONE), task, rounds=1, system=tiny, stragglers="stale")
    assert all("at least 1e+12 rounds late" in why for why in res.history.rounds[0].excluded.values())
