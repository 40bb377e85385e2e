"""Federated scenarios, round 9 (2 of 2): personal heads, robust rules at their tolerance limit, and settings that
silently did nothing.

tilestack's ClientApp on real data (scikit-learn's digits) and blobs, replayed here with ``_fl_round7.client_model``
(the same seeded minibatches); Krum's pick and the trimmed mean are written out in float64 (``_fl_round9``):

- FedPer-style personalisation (``FedBN(local_prefix='fc2.')``: a shared body, a head per client) on digits split
  two classes per client, with a client offline for a round: each client's own accuracy, by partition id, is the
  hand-computed score of the shared body with its own head, well above FedAvg's;
- Krum at its limit n = 2f + 3 with f real sign-flipping clients: the model is exactly the honest model Krum's
  score picks; FedTrimmedAvg trimming exactly the one attacker: the coordinate-wise trimmed mean of the replies;
  both learn where FedAvg collapses; a round that a client offline leaves short of the rule's tolerance is skipped.

What this round found, fixed:

- ``FedBN(local_prefix=...)`` naming no array of the model ('head.' for the MLP's 'fc2.', the default 'bn.' on a
  model without batch norm) ran as plain FedAvg, and one naming every array ('fc') kept the whole model on the
  clients while the run reported every reply "aggregated". Both are refused before any client trains, naming the
  model's arrays (FedBN.check_task).
- ``FedTrimmedAvg(beta=0.1)`` over 5 sampled clients trims int(0.1 x 5) = 0 replies from each end: it ran as the
  plain mean, which one sign-flipping client drove to test accuracy 0.05. A beta that trims nothing for the nodes
  sampled is refused, naming the smallest beta that trims one (checks.check_robust); ``make_strategy('trimmedmean')``
  no longer builds such a beta (0 when no client is malicious and too few are sampled to trim one), and refuses
  more attackers than its trimming removes (it trimmed 1 of 4 with num_malicious=2).
- A round that dropouts, faults or clients offline left short of a robust rule's tolerance ran it anyway: Krum and
  MultiKrum with f = 1 over 4 replies (2f + 3 = 5 needed) scored each update by one neighbour where the rule assumes
  two, FedTrimmedAvg(beta=0.2) over 4 trimmed nothing (the plain mean, which the attacker drives). Such a round is
  now skipped, the model kept, naming the need (checks.robust_short), as Flower's own Bulyan skips.
- A checkpoint refused as another run's named only the first 160 characters of the system model's fields (or of
  the task's JSON), not the field that differed; the settings, the task and the system model now name just the
  entries that differ (driver.check_signature; tested in test_scenarios_round9.py).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, scripted
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, krum_pick, mlp_logits, near, trimmed_mean
from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg, Krum, MultiKrum

from tilestack.errors import FederatedError
from tilestack.federated import SystemModel, Task, run_rounds, simulate
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedBN, make_strategy


def _np(arrays) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


# ---- personal heads (FedPer) on digits ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_personal_heads_on_digits_are_scored_per_client_and_beat_one_global_head():
    """Digits over ten clients of two classes each, an MLP whose head (fc2.*) stays on each client, four rounds,
    client 3 offline in round 2. By hand: each client trains from the shared body and its own head (the initial one
    until it has trained), the body is the example-weighted mean of the online clients' bodies, the head never leaves
    a client (the server's fc2 stays the initial one; fewer bytes up than down), and client 3 comes back with the head
    it left with. Each client's accuracy in RoundMetrics.client_eval is its own test split scored by the shared body
    and its own head; their mean passes 0.8 and FedAvg's (one head for all) by far."""
    task = Task(dataset="digits", num_clients=10, model="mlp", hidden=16, partitioner="shards", classes_per_client=2,
                local_steps=20, batch_size=16, lr=0.1)  # fmt: skip
    pattern = np.ones((4, 10))
    pattern[1, 3] = 0
    system = SystemModel(10, availability=pattern)
    models: list[dict[str, np.ndarray]] = []
    kw = dict(fraction_train=1.0, fraction_evaluate=1.0)
    res = simulate(FedBN(local_prefix="fc2.", **kw), task, rounds=4, system=system, evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    x0 = x = _np(initial_arrays(task))
    head = {"fc2.weight", "fc2.bias"}
    own: dict[int, dict[str, np.ndarray]] = {}
    for rnd, r in enumerate(res.history.rounds, start=1):
        there = [p for p in range(10) if pattern[rnd - 1, p]]
        trained = {p: client_model(task, p, rnd, x | own.get(p, {}))[0] for p in there}
        own |= {p: {k: trained[p][k] for k in head} for p in there}
        body = weighted_mean({p: {k: v for k, v in trained[p].items() if k not in head} for p in there},
                             {p: task.num_train(p) for p in there})  # fmt: skip
        near({k: v for k, v in models[rnd - 1].items() if k not in head}, body)
        assert all(np.array_equal(models[rnd - 1][k], x0[k]) for k in head)
        x = models[rnd - 1]
        assert set(r.client_eval) == {str(p) for p in there} and r.bytes_up < r.bytes_down
        for p in there:
            _, _, xt, yt = task.client_data(p)
            want = float((mlp_logits(x | own[p], xt).argmax(axis=1) == yt).mean())
            assert r.client_eval[str(p)]["eval-acc"] == pytest.approx(want, abs=1e-12), (rnd, p)
    personal = res.history.rounds[-1].client_acc["mean"]
    shared = simulate(FedAvg(**kw), task, rounds=4, evaluate=False).history.rounds[-1].client_acc["mean"]
    assert personal > 0.8 and personal > shared + 0.3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model, norm, prefix, needle", [
    ("mlp", False, "head.", "names none of the model's arrays ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']"),
    ("logreg", False, "bn.", "names none of the model's arrays ['fc.bias', 'fc.weight'] (task.model='logreg'"),
    ("mlp", False, "bn.", "names none of the model's arrays"),
    ("logreg", False, "fc", "names every array of the model ['fc.bias', 'fc.weight']; expected a prefix that leaves"),
    ("mlp", True, "", None),
])  # fmt: skip
def test_a_local_prefix_that_keeps_nothing_or_everything_local_is_refused_before_any_client_trains(model, norm, prefix,
                                                                                                  needle):  # fmt: skip
    """Before, FedBN with a prefix naming no array ran as plain FedAvg without a word, and one naming every array
    kept the whole model on each client (replies of no arrays, counted as aggregated). Both are refused by simulate
    and run_rounds before any client trains, naming the prefix and the model's arrays; an empty prefix is refused
    when the strategy is made."""
    task = blobs(4, features=3, classes=3, model=model, hidden=4, norm=norm)
    if needle is None:
        with pytest.raises(ValueError, match=r"FedBN: local_prefix=''; expected the name prefix of the local layers"):
            FedBN(local_prefix=prefix)
        return
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    def make():
        return FedBN(local_prefix=prefix, fraction_train=1.0, fraction_evaluate=0.0)

    full = re.escape(f"FedBN: local_prefix={prefix!r} {needle}")
    with pytest.raises(ValueError, match=full):
        simulate(make(), task, rounds=1)
    with pytest.raises(ValueError, match=full):
        run_rounds(make(), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not trained


# ---- robust rules at their tolerance limit -----------------------------------------------------------------------
def _attacked(n: int, attackers: int, **kw) -> Task:
    task = Task(**{**dict(dataset="blobs", num_samples=60 * n, num_features=5, num_classes=3, num_clients=n,
                          local_steps=5, batch_size=8, lr=0.1, malicious_fraction=attackers / n, attack_scale=10.0,
                          seed=3), **kw})  # fmt: skip
    assert sum(task.is_malicious(p) for p in range(n)) == attackers
    return task


def _replies(task: Task, rnd: int, x: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """What each client sends in round ``rnd`` from ``x``: its replayed model, or, from an attacker, the update
    reversed and scaled (``start - scale (trained - start)``, in float32 as the client computes it)."""
    out = {}
    for p in range(task.num_clients):
        trained = client_model(task, p, rnd, x)[0]
        if task.is_malicious(p):
            trained = {k: x[k] - task.attack_scale * (v - x[k]) for k, v in trained.items()}
        out[p] = trained
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("f", [1, 2])
def test_krum_at_n_equal_2f_plus_3_with_f_attackers_adopts_the_honest_model_its_score_picks(f):
    """n = 2f + 3 clients, f of them sending their update reversed and scaled by 10, Krum(num_malicious_nodes=f),
    three rounds: each round's model is, bit for bit, the reply whose summed squared distance to its n - f - 2
    nearest others is least, computed here from the replayed replies, and that reply is an honest client's. The
    test accuracy rises, where FedAvg over the same clients is driven below it."""
    n = 2 * f + 3
    task = _attacked(n, f)
    models: list[dict[str, np.ndarray]] = []
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    res = simulate(Krum(num_malicious_nodes=f, **kw), task, rounds=3, extra_metrics=keep(models))
    x = _np(initial_arrays(task))
    for rnd in (1, 2, 3):
        sent = _replies(task, rnd, x)
        pick = krum_pick(sent, f)
        assert not task.is_malicious(pick)
        for k, v in models[rnd - 1].items():
            assert np.array_equal(v, sent[pick][k]), (rnd, k)
        x = models[rnd - 1]
    krum = res.history.column("test_acc")
    plain = simulate(FedAvg(**kw), task, rounds=3).history.column("test_acc")
    assert krum[-1] > 0.8 and krum[-1] > plain[-1] + 0.3


@pytest.mark.timeout(60)
def test_a_trimmed_mean_that_trims_exactly_the_attacker_is_the_hand_computed_trimmed_mean():
    """Five clients, one sign-flipping: FedTrimmedAvg(beta=0.2) cuts int(0.2 x 5) = 1 reply from each end of every
    coordinate. Three rounds, each model the coordinate-wise trimmed mean of the replayed replies (to float32
    rounding); the test accuracy passes 0.8 where FedAvg's collapses."""
    task = _attacked(5, 1)
    models: list[dict[str, np.ndarray]] = []
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    res = simulate(FedTrimmedAvg(beta=0.2, **kw), task, rounds=3, extra_metrics=keep(models))
    x = _np(initial_arrays(task))
    for rnd in (1, 2, 3):
        near(models[rnd - 1], trimmed_mean(_replies(task, rnd, x), cut=1))
        x = models[rnd - 1]
    trimmed = res.history.column("test_acc")
    plain = simulate(FedAvg(**kw), task, rounds=3).history.column("test_acc")
    assert trimmed[-1] > 0.8 and plain[-1] < 0.5


@pytest.mark.timeout(60)
def test_a_trimmed_mean_that_trims_nothing_is_refused_before_any_client_trains():
    """FedTrimmedAvg(beta=0.1) over the 5 clients it samples trims int(0.5) = 0 replies: it ran as the plain mean, and
    one attacker drove it to accuracy 0.05. Refused before any work, naming beta, the sample and the least beta that
    trims one; beta=0 (the plain mean, asked for) runs. make_strategy('trimmedmean') builds no such beta, and refuses
    more attackers than its trimming removes."""
    task = _attacked(5, 1)
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    needle = ("FedTrimmedAvg: beta=0.1 trims int(beta x 5) = 0 replies from each end of the 5 nodes it samples each "
              "round (fraction_train=1.0 of the 5 nodes of the run, min_train_nodes=2): it would be the plain mean, "
              "which one Byzantine client moves as far as it likes; expected beta >= 1/5 = 0.2")  # fmt: skip
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        simulate(FedTrimmedAvg(beta=0.1, **kw), task, rounds=1)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        run_rounds(FedTrimmedAvg(beta=0.1, **kw), make_grid(scripted(script), task), initial_arrays(task),
                   num_rounds=1)  # fmt: skip
    assert not trained
    assert simulate(FedTrimmedAvg(beta=0.0, **kw), task, rounds=1).history.rounds[0].num_aggregated == 5

    assert make_strategy("trimmedmean", clients_per_round=4, num_clients=8).beta == 0.0  # too few to trim one
    s = make_strategy("trimmedmean", clients_per_round=5, num_clients=8, num_malicious=2)
    assert int(s.beta * 5) == 2
    with pytest.raises(ValueError, match=re.escape(
            "make_strategy: clients_per_round=4 with num_malicious=2; the trimmed mean cuts 1 replies from each end, "
            "fewer than the attackers; expected clients_per_round >= 5")):  # fmt: skip
        make_strategy("trimmedmean", clients_per_round=4, num_clients=8, num_malicious=2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rule", ["Krum", "MultiKrum", "FedTrimmedAvg"])
def test_a_round_left_short_of_a_robust_rules_tolerance_is_skipped_and_the_model_kept(rule):
    """Five clients, one sign-flipping; Krum and MultiKrum with f = 1 need 2f + 3 = 5 replies, FedTrimmedAvg(0.2)
    five to trim one from each end. In round 2 an honest client is offline: four replies. Before, Flower ran the
    rule anyway (Krum scoring each update by one neighbour where it assumes two; the trimmed mean trimming nothing:
    the plain mean, which the attacker drives). The round is now skipped naming the rule's need, the model stays
    round 1's, and round 3 (all five back) aggregates again."""
    task = _attacked(5, 1)
    honest = next(p for p in range(5) if not task.is_malicious(p))
    pattern = np.ones((3, 5))
    pattern[1, honest] = 0
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    make = {"Krum": lambda: Krum(num_malicious_nodes=1, **kw),
            "MultiKrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3, **kw),
            "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.2, **kw)}[rule]  # fmt: skip
    models: list[dict[str, np.ndarray]] = []
    res = simulate(make(), task, rounds=3, system=SystemModel(5, availability=pattern), extra_metrics=keep(models))
    r1, r2, r3 = res.history.rounds
    want = ("FedTrimmedAvg with beta=0.2 trims int(beta x 4) = 0 of 4 replies (it would be the plain mean); the global "
            "model is kept") if rule == "FedTrimmedAvg" else (
            f"{rule} needs 2f + 3 = 5 replies (num_malicious_nodes=1) to tolerate f attackers, got 4; the global model "
            "is kept")  # fmt: skip
    assert r2.skipped == want and r2.num_aggregated == 0 and r2.num_selected == 4
    assert all(np.array_equal(models[1][k], models[0][k]) for k in models[0])
    assert not r1.skipped and not r3.skipped and r3.num_aggregated == 5
    assert r3.test_acc > 0.8
