"""Federated scenarios, round 20 (2 of 2): each client its own number of local epochs under FedNova, HeteroFL's
three widths with the narrowest client lost mid-round, Krum left with too few replies by a NaN client, every client a
straggler under ``drop``, a client slower than the reply deadline, and bad settings refused before any work (API and
``tilestack fl run``), among them top-k's ratio given to int8.

References, independent of the code under test: tilestack's local SGD replayed on the client's seeded minibatches
(``_fl_round19.replay``, ``_fl_round7.client_model``), FedNova, HeteroFL and Krum written out in float64
(``_fl_round16.fednova``, ``_fl_round14.heterofl_mean``, ``_fl_round9.krum_pick``).

What this round found, fixed:

- *top-k's ratio given to int8.* ``tilestack fl run --compress int8:0.05`` ran plain 8-bit updates, the ratio
  dropped without a word (``compression.parse`` read only the method for int8). Refused before any work, naming the
  spec, saying int8 takes no ratio and what to write instead.
- *DP-FedAvg without noise.* ``tilestack fl run --strategy dp-fedavg --noise 0`` (which always keeps an RDP
  accountant) and ``make_strategy("dp-fedavg", noise_multiplier=0, accountant=...)`` failed in Flower's words, "The
  noise multiplier must be positive when accounting is enabled", naming no argument (an accountant of the sampling
  model Flower's accounted path refuses, likewise). ``make_strategy`` refuses both naming the argument and its value.
- *HeteroFL resumed with other widths.* The checkpoint's ``width_of`` replaced the caller's where it pickled
  (``widths.__getitem__``) and not where it did not (a lambda): a run resumed with other widths trained by the old or
  the new ones depending on how the function was written, without a word. A resumed strategy keeps the caller's
  functions (``run_state._restore_strategy``), and HeteroFL's widths per partition are a plain setting the checkpoint
  signature compares: other widths are refused by name, the same widths resume to the uninterrupted run.
- *``fl run --dataset clustered --clients 1``* was refused as "Task: groups=2", a name no option has: ``--clusters``
  (default 2) is also the planted groups. Refused naming ``--clusters``, its value and the range.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, scripted, update
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, krum_pick, near
from _fl_round10 import with_config
from _fl_round14 import heterofl_mean
from _fl_round16 import fednova
from _fl_round18 import EVERYONE, fedavg
from _fl_round19 import failing_app, replay
from flwr.serverapp.strategy import FedAvg, Krum
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app as cli_app
from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, initial_arrays, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed, parse
from tilestack.federated.models import MLP
from tilestack.federated.partition import dirichlet, quantity_skew
from tilestack.federated.strategies import FedNova, HeteroFL, make_strategy

pytestmark = pytest.mark.timeout(120)


# ---- each client its own local epochs, FedNova ----------------------------------------------------------------------
EPOCHS = {0: 0.5, 1: 2.0, 2: 1.5}


class OwnEpochs(FedNova):
    """FedNova giving client p ``EPOCHS[p]`` local epochs in its own message (``local-epochs``)."""

    def configure_train(self, server_round, arrays, config, grid):
        return [with_config(m, **{"local-epochs": EPOCHS[grid.partition_of[m.metadata.dst_node_id]]})
                for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip


def test_fednova_over_clients_given_their_own_local_epochs_normalises_by_the_steps_each_ran():
    """The task fixes 3 local steps; the strategy gives clients 0, 1, 2 half an epoch, two and one and a half (their
    message's ``local-epochs``, which wins over the task's steps): max(1, round(E x ceil(n / batch))) steps each. The
    grid plans and counts exactly those (steps_full = steps_done), each reply says its own, and each round's model is
    FedNova written out over the replayed SGD of those lengths (p_i = n_i / n, tau_eff = sum p_i tau_i)."""
    task = Task(dataset="blobs", num_samples=150, num_features=3, num_classes=3, num_clients=3, partitioner="quantity",
                quantity_sigma=0.8, local_steps=3, batch_size=7, lr=0.05, seed=6)  # fmt: skip
    n = {p: task.num_train(p) for p in range(3)}
    steps = {p: max(1, int(round(EPOCHS[p] * math.ceil(n[p] / 7)))) for p in range(3)}
    assert len(set(steps.values())) == 3, steps  # the scenario: three different amounts of local work
    models: list = []
    res = run_rounds(OwnEpochs(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
                     num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(res.history.rounds, models, strict=True), start=1):
        assert r.steps_full == r.steps_done == sum(steps.values())
        assert {p: int(r.client_train[str(p)]["num-steps"]) for p in range(3)} == steps
        ys = {p: replay(task, p, rnd, x, steps[p]) for p in range(3)}
        near(got, fednova(x, ys, n, steps), ulps=8)
        x = got


def test_fedavg_over_the_same_replies_would_be_another_model():
    """The FedNova reference differs from the weighted mean where the clients' step counts differ."""
    x = {"w": np.zeros(3, np.float32)}
    ys = {0: {"w": np.full(3, 1.0, np.float32)}, 1: {"w": np.full(3, 4.0, np.float32)}}
    nova = fednova(x, ys, {0: 1, 1: 1}, {0: 1, 1: 8})["w"][0]
    assert nova == pytest.approx((1 + 8) / 2 * (1 / 1 + 4 / 8) / 2) and nova != 2.5


# ---- HeteroFL: three widths, the narrowest client lost mid-round -----------------------------------------------------
WIDTHS = {0: 1.0, 1: 0.5, 2: 0.25}


def _cut(x: dict[str, np.ndarray], width: float, hidden: int) -> dict[str, np.ndarray]:
    """The leading ``round(width x hidden)`` hidden units of tilestack's MLP, written out."""
    k = max(1, int(round(width * hidden)))
    return {"fc1.weight": x["fc1.weight"][:, :k], "fc1.bias": x["fc1.bias"][:k], "fc2.weight": x["fc2.weight"][:k],
            "fc2.bias": x["fc2.bias"]}  # fmt: skip


def test_heterofl_three_widths_with_the_narrowest_client_lost_in_round_two_is_the_holders_mean_by_hand():
    """An MLP of 8 hidden units; clients train widths 1, 1/2 and 1/4 (8, 4 and 2 units). Client 2 (the narrowest)
    loses its connection after training in round 2: left out by name, and in that round hidden units 0-1 are the
    mean of clients 0 and 1 only. Each element of each round's model is the num_train-weighted mean of the clients
    whose sub-model holds it (units 4-7: client 0 alone; fc2.bias: everyone), by hand from each client's replayed SGD
    of its own narrow model."""
    hidden = 8
    task = Task(dataset="blobs", num_samples=150, num_features=3, num_classes=3, num_clients=3, model="mlp",
                hidden=hidden, local_steps=3, batch_size=8, lr=0.1, seed=7)  # fmt: skip
    n = {p: task.num_train(p) for p in range(3)}
    strategy = HeteroFL(width_of=WIDTHS.__getitem__, hidden=hidden, **EVERYONE)
    models: list = []
    res = run_rounds(strategy, ManagedGrid(InProcessGrid(failing_app({(2, 2)}), 3), task), initial_arrays(task),
                     num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    assert [list(r.excluded) for r in res.history.rounds] == [[], ["2"], []]
    assert "lost its connection after training in round 2" in res.history.rounds[1].excluded["2"]
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        kept = [p for p in range(3) if (p, rnd) != (2, 2)]
        outs = {p: client_model(task, p, rnd, _cut(x, WIDTHS[p], hidden))[0] for p in kept}
        assert {p: outs[p]["fc1.weight"].shape[1] for p in kept} == {p: {0: 8, 1: 4, 2: 2}[p] for p in kept}
        near(got, heterofl_mean(x, outs, n), ulps=8)
        if rnd == 2:  # units 0-1 without client 2: the two wider clients' mean there
            want = weighted_mean({p: {"b": outs[p]["fc1.bias"][:2]} for p in (0, 1)}, n)["b"]
            np.testing.assert_allclose(got["fc1.bias"][:2], want, rtol=8 * 2**-23)
        np.testing.assert_array_equal(got["fc1.bias"][4:], outs[0]["fc1.bias"][4:])  # client 0 alone holds 4-7
        x = got


def test_heterofl_sub_models_are_the_leading_units():
    """The reference's cut against tilestack's MLP built narrow: the shapes a width-1/4 client of 8 units trains."""
    x = MLP(3, 8, 3).init(np.random.default_rng(0))
    cut = _cut(x, 0.25, 8)
    narrow = MLP(3, 2, 3).init(np.random.default_rng(0))
    assert {k: v.shape for k, v in cut.items()} == {k: v.shape for k, v in narrow.items()}


# ---- a NaN client leaves Krum too few replies ------------------------------------------------------------------------
def test_krum_left_with_fewer_than_2f_plus_3_replies_by_a_nan_client_keeps_the_model_saying_so():
    """Krum with f = 1 over five scripted clients (2f + 3 = 5, the run's check passes). Round 1 is the model of the
    client Krum's rule picks (written out); in round 2 client 3 sends NaN: it is left out by name and the four replies
    left cannot tolerate one attacker, so the round is skipped naming the rule's need, and round 1's model is kept bit
    for bit; round 3 (all five back) is again Krum's pick."""
    task = blobs(5, features=3, classes=2)

    def model(pid, rnd, x):
        return {k: (x[k] + update(pid, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x}

    def script(pid, rnd, got, context, config):
        out = model(pid, rnd, got["arrays"])
        if (pid, rnd) == (3, 2):
            out["fc.bias"][0] = np.nan
        return out, {"num-examples": 1 + pid}

    models: list = []
    strategy = Krum(**EVERYONE, num_malicious_nodes=1)
    res = run_rounds(strategy, make_grid(scripted(script), task), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    r1, r2, r3 = res.history.rounds
    assert r1.excluded == {} and r3.excluded == {} and list(r2.excluded) == ["3"]
    assert r2.skipped.startswith("Krum needs 2f + 3 = 5 replies (num_malicious_nodes=1)") and "got 4" in r2.skipped
    assert r2.num_aggregated == 0
    x = np_(initial_arrays(task))
    sent = {p: model(p, 1, x) for p in range(5)}
    pick = krum_pick(sent, 1)
    assert all(np.array_equal(models[0][k], sent[pick][k]) for k in x)
    assert all(np.array_equal(models[1][k], models[0][k]) for k in x)
    sent = {p: model(p, 3, models[1]) for p in range(5)}
    assert all(np.array_equal(models[2][k], sent[krum_pick(sent, 1)][k]) for k in x)


# ---- every client a straggler, stragglers dropped --------------------------------------------------------------------
def test_every_client_a_straggler_under_drop_aggregates_nothing_and_under_partial_keeps_their_share():
    """straggler_fraction 1: each selected client does k/E of its 10 steps (k from the system's seeded draw). Under
    ``drop`` all are left out as stragglers, each round skipped and the model kept; under ``partial`` each client's
    ceil(k/E x 10) steps are counted and aggregated (the num_train-weighted mean of the replayed partial SGD)."""
    task = Task(dataset="blobs", num_samples=90, num_features=3, num_classes=2, num_clients=3, local_steps=10,
                batch_size=5, lr=0.1, seed=8)  # fmt: skip
    system = SystemModel(3, straggler_fraction=1.0, straggler_epochs=4, seed=2)
    dropped = simulate(fedavg(), task, rounds=2, system=system, stragglers="drop", evaluate=False)
    for r in dropped.history.rounds:
        assert sorted(r.excluded) == ["0", "1", "2"] and all(v.startswith("straggler") for v in r.excluded.values())
        assert r.num_aggregated == 0 and r.skipped and r.steps_done == 0
    x0 = np_(initial_arrays(task))
    assert all(np.array_equal(np_(dropped.arrays)[k], x0[k]) for k in x0)
    models: list = []
    kept = simulate(fedavg(), task, rounds=2, system=system, stragglers="partial", evaluate=False,
                    extra_metrics=keep(models))  # fmt: skip
    n = {p: task.num_train(p) for p in range(3)}
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(kept.history.rounds, models, strict=True), start=1):
        plans = {p: system.plan(rnd, p, 10, 0) for p in range(3)}
        assert all(pl.reason == "straggler" and 0 < pl.work < 1 for pl in plans.values())
        outs = {p: client_model(task, p, rnd, x, work=plans[p].work) for p in range(3)}
        assert r.steps_done == sum(o[1] for o in outs.values()) < r.steps_full == 30
        near(got, weighted_mean({p: o[0] for p, o in outs.items()}, n), ulps=4)
        x = got


# ---- a client slower than the reply deadline -------------------------------------------------------------------------
def test_a_client_slower_than_the_timeout_is_left_out_and_the_round_is_the_others_mean():
    """Client 1 sleeps 1.5 s before replying; the run waits 1 s for replies. Client 1 is left out as a timeout in
    each round, and each round's model is the num_train-weighted mean of clients 0 and 2's replayed SGD. 1 s (was
    0.4 s): the others' replies, a few ms of work, must come back in it on a loaded 2-core CI machine too (as in
    test_engine_faults_resume); client 1's sleep outlasts any wait of 1 s however busy the machine."""
    task = Task(dataset="blobs", num_samples=90, num_features=3, num_classes=2, num_clients=3, local_steps=2,
                batch_size=5, lr=0.1, faults=((1, "slow"),), slow_seconds=1.5, seed=9)  # fmt: skip
    models: list = []
    res = simulate(fedavg(), task, rounds=2, timeout=1.0, evaluate=False, extra_metrics=keep(models))
    n = {p: task.num_train(p) for p in range(3)}
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(res.history.rounds, models, strict=True), start=1):
        assert list(r.excluded) == ["1"] and r.excluded["1"].startswith("timeout")
        near(got, weighted_mean({p: client_model(task, p, rnd, x)[0] for p in (0, 2)}, n), ulps=4)
        x = got


# ---- bad settings, refused before any work ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["int8:0.05", "int8:1", "int8:abc"])
def test_a_ratio_given_to_int8_is_refused_naming_the_spec(spec):
    with pytest.raises(ValueError, match=rf"compression: '{spec}'; int8 sends every entry and takes no ratio"):
        parse(spec)
    assert parse("int8") == ("int8", 0.0) and parse("topk:0.05") == ("topk", 0.05)


def _fl_run(*extra):
    args = ["fl", "run", "--dataset", "blobs", "--clients", "4", "--per-round", "2", "--rounds", "1",
            "--local-steps", "1", *extra]  # fmt: skip
    return CliRunner().invoke(cli_app, args, env={"COLUMNS": "400"})


@pytest.mark.parametrize("extra, needles", [
    (["--compress", "int8:0.05"], ["--compress", "int8:0.05", "takes no ratio"]),
    (["--partitioner", "dirichlet", "--partition-alpha", "0"], ["partition_alpha=0.0", "> 0"]),
    (["--partitioner", "dirichlet", "--partition-alpha", "-0.5"], ["partition_alpha=-0.5"]),
    (["--strategy", "fedsgd"], ["--strategy", "'fedsgd'", "fedavg"]),
    (["--rounds", "-2"], ["--rounds"]),
    (["--strategy", "fedprox", "--mu", "-1"], ["proximal_mu=-1.0"]),
    (["--strategy", "dp-fedavg", "--clip", "0"], ["clipping_norm=0.0"]),
    (["--strategy", "dp-fedavg", "--noise", "nan"], ["noise_multiplier=nan"]),
    (["--deadline", "-1"], ["deadline=-1.0"]),
    (["--dataset", "clustered", "--clients", "1", "--per-round", "1"],
     ["--clusters 2 plants that many groups of --dataset clustered among --clients 1; expected 1 to 1"]),
    (["--dataset", "clustered", "--clusters", "0"], ["--clusters 0", "expected 1 to 4"]),
])  # fmt: skip
def test_fl_run_refuses_bad_settings_before_any_round_naming_them(extra, needles):
    res = _fl_run(*extra)
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    for needle in needles:
        assert needle in out, (needle, res.output)
    assert "test accuracy" not in res.output


def test_fl_run_with_int8_alone_still_runs():
    res = _fl_run("--compress", "int8")
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output


@pytest.mark.parametrize("call, needle", [
    (lambda t, g: run_rounds(fedavg(), g, initial_arrays(t), num_rounds=-1), "num_rounds=-1"),
    (lambda t, g: run_rounds(fedavg(), g, initial_arrays(t), num_rounds=2.0), "num_rounds=2.0"),
    (lambda t, g: run_rounds(fedavg(), g, initial_arrays(t), num_rounds=1, seed=-3), "seed=-3"),
    (lambda t, g: run_rounds(fedavg(), g, initial_arrays(t), num_rounds=1, timeout=0), "timeout=0"),
    (lambda t, g: run_rounds(FedAvg(fraction_train=-0.1, fraction_evaluate=0.0), g, initial_arrays(t), num_rounds=1),
     "fraction_train=-0.1"),
    (lambda t, g: run_rounds(FedAvg(**EVERYONE, evaluate_metrics_aggr_fn=3), g, initial_arrays(t), num_rounds=1),
     "evaluate_metrics_aggr_fn"),
    (lambda t, g: run_rounds(Compressed(fedavg(), "topk", 0.0), g, initial_arrays(t), num_rounds=1), "ratio"),
])  # fmt: skip
def test_bad_run_settings_are_refused_naming_the_argument_before_any_client_runs(call, needle):
    task = blobs(3, features=3, classes=2)
    ran: list = []

    def script(pid, rnd, got, context, config):
        ran.append(pid)
        return got["arrays"], {"num-examples": 1}

    with pytest.raises((ValueError, TypeError, FederatedError), match=needle.replace("(", r"\(")):
        call(task, make_grid(scripted(script), task))
    assert not ran


@pytest.mark.parametrize("make, needle", [
    (lambda: make_strategy("fedsgd", clients_per_round=2, num_clients=4), "name='fedsgd'"),
    (lambda: make_strategy("fedavg", clients_per_round=2, num_clients=4, eval_fraction=1.5), "eval_fraction=1.5"),
    (lambda: make_strategy("fedadam", clients_per_round=2, num_clients=4, server_lr=-0.1), "server_lr=-0.1"),
    (lambda: Task(dataset="blobs", partitioner="dirichlet", partition_alpha=0.0), "partition_alpha=0.0"),
    (lambda: Task(dataset="blobs", partitioner="dirichlet", partition_alpha=float("nan")), "partition_alpha=nan"),
    (lambda: Task(dataset="blobs", local_epochs=-1.0), "local_epochs=-1.0"),
    (lambda: Task(dataset="blobs", num_clients=0), "num_clients=0"),
    (lambda: dirichlet(np.zeros(10, np.int64), 2, 0.0), "alpha=0.0"),
    (lambda: dirichlet(np.zeros(10, np.int64), 2, -1.0), "alpha=-1.0"),
    (lambda: dirichlet(np.zeros(10, np.int64), 20, 0.5, min_size=1), "num_clients=20"),
    (lambda: quantity_skew(10, 3, sigma=-1.0), "sigma=-1.0"),
    (lambda: SystemModel(3, dropout=1.5), "dropout=1.5"),
    (lambda: SystemModel(3, deadline=0.0), "deadline=0.0"),
    (lambda: HeteroFL(width_of=lambda p: 1.0, hidden=0), "hidden=0"),
])  # fmt: skip
def test_bad_constructor_settings_are_refused_naming_the_argument(make, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        make()


def test_a_heterofl_width_outside_zero_one_is_refused_before_any_client_runs():
    """A width of 0 for one partition: refused naming that partition before round 1 (simulate's check_task)."""
    task = Task(dataset="blobs", num_samples=60, num_features=3, num_classes=2, num_clients=3, model="mlp", hidden=4,
                local_steps=1)  # fmt: skip
    strategy = HeteroFL(width_of=lambda p: 0.0 if p == 2 else 1.0, hidden=4, **EVERYONE)
    with pytest.raises(ValueError, match=r"width_of\(2\) = 0.0; expected a number in \(0, 1\]"):
        simulate(strategy, task, rounds=1)


# ---- each client its own learning rate and batch size ----------------------------------------------------------------
LR_BATCH = {0: (0.3, 1), 1: (0.05, 16), 2: (0.1, 5)}


class OwnLrBatch(FedAvg):
    """FedAvg giving client p the lr and batch size ``LR_BATCH[p]`` in its own message (``lr``, ``batch-size``)."""

    def configure_train(self, server_round, arrays, config, grid):
        out = []
        for m in super().configure_train(server_round, arrays, config, grid):
            lr, batch = LR_BATCH[grid.partition_of[m.metadata.dst_node_id]]
            out.append(with_config(m, lr=lr, **{"batch-size": batch}))
        return out


def test_each_clients_own_lr_and_batch_size_are_its_replayed_sgd_in_the_weighted_mean():
    """Three clients of quantity skew trained with their own message's lr and batch size (batch 1, 16 larger than a
    small client's data, 5): each round is the num_train-weighted mean of each client's SGD replayed with those
    settings; the same run with the task's settings for all is another model (the settings are not ignored)."""
    import dataclasses

    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=3, num_clients=3, partitioner="quantity",
                quantity_sigma=1.5, local_steps=4, batch_size=8, lr=0.1, seed=11)  # fmt: skip
    n = {p: task.num_train(p) for p in range(3)}
    models: list = []
    run_rounds(OwnLrBatch(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
               num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        own = {p: dataclasses.replace(task, lr=LR_BATCH[p][0], batch_size=LR_BATCH[p][1]) for p in range(3)}
        near(got, weighted_mean({p: replay(own[p], p, rnd, x, 4) for p in range(3)}, n), ulps=4)
        x = got
    plain = simulate(fedavg(), task, rounds=2, evaluate=False)
    assert not np.allclose(np_(plain.arrays)["fc.weight"], models[-1]["fc.weight"])


# ---- q-FedAvg with a one-example client ------------------------------------------------------------------------------
def test_qfedavg_with_a_client_of_one_training_example_is_flowers_rule_by_hand():
    """q-FedAvg (q = 2, L = 1 / 0.3) over four clients of quantity skew, one of them training on a single example:
    each round is x - sum F_k^q L (x - w_k) / sum (q F_k^(q-1) ||L (x - w_k)||^2 + L F_k^q), with F_k each client's
    loss at the global model (recorded by the client as start-loss: checked by hand too) and w_k its replayed SGD."""
    from _fl_round17 import qfedavg

    from tilestack.federated.models import evaluate as model_eval

    task = Task(dataset="blobs", num_samples=40, num_features=3, num_classes=3, num_clients=4, partitioner="quantity",
                quantity_sigma=4.0, local_steps=3, batch_size=4, lr=0.1, seed=1)  # fmt: skip
    assert min(task.num_train(p) for p in range(4)) == 1
    strategy = make_strategy("qfedavg", clients_per_round=4, num_clients=4, q=2.0, client_lr=0.3)
    models: list = []
    res = simulate(strategy, task, rounds=2, evaluate=False, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(res.history.rounds, models, strict=True), start=1):
        losses = {}
        for p in range(4):
            xs, ys = task.client_data(p)[:2]
            losses[p] = model_eval(task.build_model(), x, xs, ys)[0]
            assert r.client_train[str(p)]["start-loss"] == pytest.approx(losses[p], rel=1e-6)
        ws = {p: client_model(task, p, rnd, x)[0] for p in range(4)}
        near(got, qfedavg(x, ws, losses, q=2.0, client_lr=0.3), ulps=16)
        x = got


# ---- SecAgg+ with a one-example client -------------------------------------------------------------------------------
def test_secure_aggregation_with_a_one_example_client_is_the_weighted_mean_to_the_quantisation_step():
    """SecAgg+ (Flower's workflow) over four clients of 1 to 182 training examples, all sampled, two rounds: the model
    is x + the num_train-weighted mean of the clients' updates (each replayed from its seeded minibatches), to 1e-4
    (SecAgg+'s quantisation), round by round; the one-example client's update, scaled by 1/182 before quantising, is
    not lost (leaving it out moves the mean by more than the tolerance)."""
    from _fl_round18 import secure_update

    from tilestack.federated.secagg import run_secure

    task = Task(dataset="blobs", num_samples=300, num_features=3, num_classes=3, num_clients=4, partitioner="quantity",
                quantity_sigma=4.0, local_steps=3, batch_size=4, lr=0.2, seed=1)  # fmt: skip
    n = {p: task.num_train(p) for p in range(4)}
    assert min(n.values()) == 1 and max(n.values()) > 100
    small = min(n, key=n.get)
    x = {k: v.astype(np.float64) for k, v in task.initial_params().items()}
    for rnd in (1, 2):
        ups = {p: secure_update(task, p, rnd, {k: v.astype(np.float32) for k, v in x.items()}) for p in range(4)}
        mean = {k: sum(n[p] * ups[p][k] for p in range(4)) / sum(n.values()) for k in x}
        rest = {k: sum(n[p] * ups[p][k] for p in range(4) if p != small) / (sum(n.values()) - n[small]) for k in x}
        assert max(float(np.abs(mean[k] - rest[k]).max()) for k in x) > 5e-4  # the reference sees the small client
        x = {k: x[k] + mean[k] for k in x}
    got = run_secure(task, rounds=2, per_round=4)
    for k in x:
        np.testing.assert_allclose(got[k], x[k], atol=1e-4, err_msg=k)


# ---- `fl run` with faulty clients, history written -------------------------------------------------------------------
def test_fl_run_with_a_nan_client_and_a_crashing_client_writes_who_was_left_out_each_round(tmp_path):
    """``tilestack fl run --faults 1:nan,2:crash`` over four clients, all per round: the history JSON has both left out
    in every round with their reasons, two of four aggregated, and the report names both kinds."""
    import json

    out = tmp_path / "run.json"
    res = _fl_run("--per-round", "4", "--rounds", "2", "--faults", "1:nan,2:crash", "--out", str(out))
    assert res.exit_code == 0, res.output
    rounds = json.loads(out.read_text())["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert sorted(r["excluded"]) == ["1", "2"]
        assert r["excluded"]["1"].startswith("non-finite") and r["excluded"]["2"].startswith("error")
        assert r["num_aggregated"] == 2 and r["num_selected"] == 4 and not r["skipped"]
    report = " ".join(res.output.split())
    assert "non-finite" in report and "error" in report


# ---- DP-FedAvg without noise -----------------------------------------------------------------------------------------
def _accountant(sampling):
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(PrivacyConfig(0.5, 4, NeighboringRelation.ADD_OR_REMOVE_ONE, sampling))


def test_dp_fedavg_without_noise_under_an_accountant_is_refused_naming_the_noise_multiplier():
    from flwr.supercore.privacy_accounting import SamplingMethod

    acc = _accountant(SamplingMethod.NO_AMPLIFICATION)
    with pytest.raises(ValueError, match=r"make_strategy: noise_multiplier=0.0 with an accountant; expected a number "
                                         r"> 0"):  # fmt: skip
        make_strategy("dp-fedavg", clients_per_round=2, num_clients=4, noise_multiplier=0.0, accountant=acc)
    make_strategy("dp-fedavg", clients_per_round=2, num_clients=4, noise_multiplier=0.0)  # no accountant: taken
    s = make_strategy("dp-fedavg", clients_per_round=2, num_clients=4, noise_multiplier=0.5, accountant=acc)
    assert s.noise_multiplier == 0.5 and s.accountant is acc
    other = next(m for m in SamplingMethod if m is not SamplingMethod.NO_AMPLIFICATION)
    with pytest.raises(ValueError, match=r"make_strategy: accountant=.*no-amplification"):
        make_strategy("dp-fedavg", clients_per_round=2, num_clients=4, accountant=_accountant(other))


def test_fl_run_dp_fedavg_with_noise_0_is_refused_naming_it_and_with_noise_runs_reporting_epsilon():
    res = _fl_run("--strategy", "dp-fedavg", "--noise", "0", "--clip", "0.5")
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "noise_multiplier=0.0 with an accountant" in out and "test accuracy" not in out
    res = _fl_run("--strategy", "dp-fedavg", "--noise", "0.5", "--clip", "0.5")
    assert res.exit_code == 0 and "epsilon" in res.output, res.output


# ---- a client whose process dies mid-round ---------------------------------------------------------------------------
def _dying_app():
    """tilestack's ClientApp, except that client 1's process ends abruptly (os._exit) in round 1's training."""
    import os

    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 1:
            os._exit(3)
        return tsclient.app(msg, context)

    @app.query()
    def query(msg, context):
        return tsclient.app(msg, context)

    return app


def test_a_client_whose_worker_process_dies_mid_round_is_left_out_and_the_others_aggregate():
    """Four clients on two worker processes; client 1's process ends abruptly while training in round 1. It is left
    out of that round by name (the process died), the round is the num_train-weighted mean of clients 0, 2 and 3's
    replayed SGD, and rounds 2 and 3 (the worker replaced) aggregate all four."""
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=3, num_clients=4, local_steps=2, lr=0.1,
                partitioner="quantity", quantity_sigma=1.0, seed=12)  # fmt: skip
    grid = InProcessGrid(_dying_app(), 4, workers=2)
    models: list = []
    try:
        res = run_rounds(fedavg(), ManagedGrid(grid, task), initial_arrays(task), num_rounds=3, timeout=60,
                         extra_metrics=keep(models))  # fmt: skip
    finally:
        grid.close()
    r1, r2, r3 = res.history.rounds
    assert list(r1.excluded) == ["1"] and "ended abruptly" in r1.excluded["1"]
    assert (r1.num_aggregated, r2.num_aggregated, r3.num_aggregated) == (3, 4, 4) and not r2.excluded
    n = {p: task.num_train(p) for p in range(4)}
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        kept = [0, 2, 3] if rnd == 1 else [0, 1, 2, 3]
        near(got, weighted_mean({p: client_model(task, p, rnd, x)[0] for p in kept}, n), ulps=4)
        x = got


# ---- HeteroFL resumed with other widths ------------------------------------------------------------------------------
def test_heterofl_resumed_with_other_widths_is_refused_and_with_the_same_ones_equals_the_uninterrupted_run(tmp_path):
    """Widths given as a dict's ``__getitem__`` (a function that pickles, unlike a lambda). Resumed with every client
    at full width it used to train by the checkpoint's widths without a word; now refused naming HeteroFL.widths and
    both. Resumed with the same widths, by a lambda this time, it is the uninterrupted run bit for bit."""
    task = Task(dataset="blobs", num_samples=150, num_features=3, num_classes=3, num_clients=3, model="mlp", hidden=8,
                local_steps=3, batch_size=8, lr=0.1, seed=7)  # fmt: skip
    full_width = {0: 1.0, 1: 1.0, 2: 1.0}

    def make(width_of):
        return HeteroFL(width_of=width_of, hidden=8, **EVERYONE)

    ckpt = tmp_path / "heterofl.ckpt"
    simulate(make(WIDTHS.__getitem__), task, rounds=3, checkpoint=ckpt, stop_after=1, evaluate=False)
    with pytest.raises(FederatedError, match=r"'HeteroFL.widths': \"'1 0.5 0.25'\"\}, this run has "
                                             r"\{'HeteroFL.widths': \"'1 1 1'\"\}"):  # fmt: skip
        simulate(make(full_width.__getitem__), task, rounds=3, checkpoint=ckpt, evaluate=False)
    strategy = make(lambda p: WIDTHS[p])
    resumed = simulate(strategy, task, rounds=3, checkpoint=ckpt, evaluate=False)
    assert strategy.width_of(2) == 0.25 and not hasattr(strategy.width_of, "__self__")  # the caller's function
    full = simulate(make(WIDTHS.__getitem__), task, rounds=3, evaluate=False)
    a, b = np_(resumed.arrays), np_(full.arrays)
    assert all(np.array_equal(a[k], b[k]) for k in a)
