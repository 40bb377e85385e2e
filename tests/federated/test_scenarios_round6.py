"""Federated scenarios, round 6: robust aggregation, privacy and Flower's own strategies through tilestack's driver.

Scripted Flower ClientApps (``_fl_round5.scripted``) over tilestack's in-process ``Grid``; every aggregate is
checked against the rule written out in float64 from the float32 replies the strategy saw:

- Flower 1.41's built-in rules (FedAvg, FedProx, FedAvgM, FedAdam, FedMedian, FedTrimmedAvg, Krum, MultiKrum,
  Bulyan) over two rounds, the second starting from the first's model;
- Byzantine clients (sign-flipped, scaled, random noise): the robust rules stay near the honest mean while FedAvg
  is pulled away;
- differential privacy with fixed clipping: the clipped bound holds against a scaled attacker, the noise has
  standard deviation sigma * C / n, and a seed reproduces it;
- sampling fractions that round to no client or ask for more than there are, an evaluation-only round, clients
  of different local work, and a round in which every client fails.

What this round found, each fixed:

- A DP wrapper over a fraction that samples no node was refused with "expected num_sampled_clients=0", a value
  Flower's wrapper itself refuses; it now says the strategy samples no node (checks.check_privacy).
- DP with a privacy accountant over replies weighted by examples let round 1's clients train, then ended the run
  with Flower's bare ValueError ("requires equal client weights"); refused before any work (checks.check_privacy).
- Flower's QFedAvg with its default train_loss_key='train_loss' (tilestack's clients report 'train-loss') ended a
  simulate run with an AggregationError after round 1; refused before any work (simulation._check_weighting).
- Under run_rounds, one reply without QFedAvg's loss key ended the whole run with Flower's AggregationError; the
  grid now leaves that reply out naming the key, as it does a missing weight (grid.check_reply, loss_keys).
- A round where every client failed under Flower's adaptive-clipping DP wrappers ended the run with a
  ZeroDivisionError (the clipped share of no replies); the driver no longer asks a strategy to aggregate nothing.
- A strategy giving each client its own local work (a task per message) was accounted by the grid's task:
  steps_full 8 while the clients did 22; the grid now plans by the task the message carries.
"""

import math
import re

import numpy as np
import pytest
from _fl_round5 import blobs, check_model, make_grid, np_, scripted, update, wmean
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from tilestack.errors import FederatedError
from tilestack.federated import Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.simulation import initial_arrays

UNIT = tsclient.UNIT_WEIGHT


def _flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([model[k].astype(np.float64).ravel() for k in sorted(model)])


def _norm(model: dict[str, np.ndarray]) -> float:
    return float(np.linalg.norm(_flat(model)))


def _sizes(n: int) -> dict[int, int]:
    return {p: 1 + 3 * p for p in range(n)}


def _plain_client(sizes):
    """Each client adds its own ``update`` to the model it got and reports ``sizes[pid]`` examples; the models
    each client sent, per round, are kept for the float64 truth."""
    sent: dict[int, dict[int, dict[str, np.ndarray]]] = {}

    def script(pid, rnd, got, context, config):
        y = {k: (v + update(pid, rnd, v.shape, np.float32)).astype(v.dtype) for k, v in got["arrays"].items()}
        sent.setdefault(rnd, {})[pid] = y
        return y, {"num-examples": sizes[pid]}

    return script, sent


# ---- Flower's own rules, written out in float64 --------------------------------------------------------------------
def _krum_pick(models: dict[int, dict], f: int, m: int) -> list[int]:
    """MultiKrum: each model's score is the sum of its squared distances to its n - f - 2 nearest others; the m
    lowest scores win."""
    pids = sorted(models)
    flat = {p: _flat(models[p]) for p in pids}
    k = max(1, len(pids) - f - 2)
    scores = {p: sum(sorted(float(np.sum((flat[p] - flat[q]) ** 2)) for q in pids if q != p)[:k]) for p in pids}
    return sorted(pids, key=lambda p: scores[p])[:m]


def _by_hand(name: str, models: dict[int, dict], sizes: dict[int, int], start: dict, state: dict) -> dict:
    keys = start.keys()
    if name in ("FedAvg", "FedProx"):
        return wmean(models, sizes)
    if name == "FedMedian":
        return {k: np.median(np.stack([models[p][k].astype(np.float64) for p in models]), axis=0) for k in keys}
    if name == "FedTrimmedAvg":  # beta 0.2 of 5 replies: the lowest and highest value of each element are cut
        return {k: np.sort(np.stack([models[p][k].astype(np.float64) for p in models]), axis=0)[1:-1].mean(axis=0)
                for k in keys}  # fmt: skip
    if name == "Krum":
        return {k: models[_krum_pick(models, 1, 1)[0]][k].astype(np.float64) for k in keys}
    if name == "MultiKrum":
        picked = _krum_pick(models, 1, 3)
        return wmean({p: models[p] for p in picked}, sizes)
    if name == "Bulyan":  # f=1 of 7: MultiKrum keeps theta = 5, then per element the beta = 3 nearest the median
        picked = _krum_pick(models, 1, 5)
        out = {}
        for k in keys:
            stack = np.stack([models[p][k].astype(np.float64) for p in picked])
            med = np.median(stack, axis=0)
            idx = np.argsort(np.abs(stack - med), axis=0, kind="stable")[:3]
            out[k] = np.take_along_axis(stack, idx, axis=0).mean(axis=0)
        return out
    avg = wmean(models, sizes)
    if name == "FedAvgM":  # lr 1, momentum 0.9: v = 0.9 v + (x - avg), x - v
        grad = {k: start[k].astype(np.float64) - avg[k] for k in keys}
        state["v"] = grad if "v" not in state else {k: 0.9 * state["v"][k] + grad[k] for k in keys}
        return {k: start[k] - state["v"][k] for k in keys}
    if name == "FedAdam":  # eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3, Flower's bias correction by round + 1
        rnd = state["round"]
        delta = {k: avg[k] - start[k].astype(np.float64) for k in keys}
        state["m"] = {k: 0.9 * state.get("m", {}).get(k, 0.0) + 0.1 * delta[k] for k in keys}
        state["v"] = {k: 0.99 * state.get("v", {}).get(k, 0.0) + 0.01 * delta[k] ** 2 for k in keys}
        eta = 0.1 * math.sqrt(1 - 0.99 ** (rnd + 1)) / (1 - 0.9 ** (rnd + 1))
        return {k: start[k] + eta * state["m"][k] / (np.sqrt(state["v"][k]) + 1e-3) for k in keys}
    raise AssertionError(name)


FLOWER_RULES = {
    "FedAvg": (lambda **kw: FedAvg(**kw), 5),
    "FedProx": (lambda **kw: FedProx(proximal_mu=0.1, **kw), 5),
    "FedAvgM": (lambda **kw: FedAvgM(server_learning_rate=1.0, server_momentum=0.9, **kw), 5),
    "FedAdam": (lambda **kw: FedAdam(eta=0.1, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, **kw), 5),
    "FedMedian": (lambda **kw: FedMedian(**kw), 5),
    "FedTrimmedAvg": (lambda **kw: FedTrimmedAvg(beta=0.2, **kw), 5),
    "Krum": (lambda **kw: Krum(num_malicious_nodes=1, **kw), 5),
    "MultiKrum": (lambda **kw: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3, **kw), 5),
    "Bulyan": (lambda **kw: Bulyan(num_malicious_nodes=1, **kw), 7),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(FLOWER_RULES))
def test_flowers_strategy_through_the_driver_follows_its_rule_in_float64(name):
    """Two rounds of Flower's strategy over scripted clients of unequal sizes: each round's model is the rule
    applied in float64 to the float32 models the clients sent (to float32 rounding), from the model the round
    started with; the model stays float32."""
    make, n = FLOWER_RULES[name]
    task = blobs(n, features=4)
    sizes = _sizes(n)
    script, sent = _plain_client(sizes)
    strategy = make(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n, min_train_nodes=n)
    x0 = np_(initial_arrays(task))
    res = run_rounds(strategy, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2)
    assert [r.num_aggregated for r in res.history.rounds] == [n, n]
    state: dict = {}
    start = x0
    for rnd in (1, 2):
        state["round"] = rnd
        want = _by_hand(name, sent[rnd], sizes, start, state)
        got = np_(res.arrays) if rnd == 2 else sent[2][0]  # round 2's clients started from round 1's model
        if rnd == 1:  # client 0 sent start + its update: recover the start it got
            got = {k: (v.astype(np.float64) - update(0, 2, v.shape, np.float32)) for k, v in got.items()}
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-6, err_msg=f"{name} round {rnd} {k}")
        start = {k: want[k].astype(np.float32) for k in want}
    for v in np_(res.arrays).values():
        assert v.dtype == np.float32


@pytest.mark.timeout(60)
def test_fedmedian_of_an_odd_count_is_one_clients_value_bit_for_bit():
    """FedMedian over 5 replies: every element is one of the replies' float32 values, exactly."""
    task = blobs(5, features=6)
    script, sent = _plain_client(_sizes(5))
    res = run_rounds(FedMedian(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    want = {k: np.median(np.stack([m[k].astype(np.float64) for m in sent[1].values()]), axis=0)
            for k in sent[1][0]}  # fmt: skip
    check_model(res.arrays, want, np.float32)


# ---- Byzantine clients ---------------------------------------------------------------------------------------------
HONEST, BYZANTINE = 9, 2
DIRECTION = 0.5


def _byzantine_client(attack: str | None):
    """Nine honest clients send x + 0.5 + N(0, 0.05^2); clients 9 and 10 attack: ``sign`` sends x - 10 * 0.5,
    ``scaled`` 100 times an honest update, ``noise`` x + N(0, 50^2); with no attack every client is honest."""
    honest: dict[int, dict[str, np.ndarray]] = {}

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        rng = np.random.default_rng([pid, rnd, 6])
        step = {k: (DIRECTION + 0.05 * rng.normal(0, 1, v.shape)) for k, v in x.items()}
        if attack is not None and pid >= HONEST:
            if attack == "sign":
                step = {k: np.full(v.shape, -10 * DIRECTION) for k, v in x.items()}
            elif attack == "scaled":
                step = {k: 100 * v for k, v in step.items()}
            else:
                step = {k: rng.normal(0, 50, v.shape) for k, v in x.items()}
        else:
            honest[pid] = step
        return {k: (v + step[k]).astype(np.float32) for k, v in x.items()}, {}

    return script, honest


ROBUST = {
    "FedMedian": lambda kw: FedMedian(**kw),
    "FedTrimmedAvg": lambda kw: FedTrimmedAvg(beta=0.2, **kw),
    "Krum": lambda kw: Krum(num_malicious_nodes=BYZANTINE, **kw),
    "MultiKrum": lambda kw: MultiKrum(num_malicious_nodes=BYZANTINE, num_nodes_to_select=5, **kw),
    "Bulyan": lambda kw: Bulyan(num_malicious_nodes=BYZANTINE, **kw),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["sign", "scaled", "noise"])
def test_robust_rules_stay_near_the_honest_mean_while_fedavg_is_pulled_away(attack):
    """11 clients, 2 Byzantine: after one round every robust rule's step is within a quarter of the honest step's
    norm of the honest mean step; FedAvg's is more than the honest step's norm away."""
    n = HONEST + BYZANTINE
    task = blobs(n, features=10)
    x0 = np_(initial_arrays(task))
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT, min_available_nodes=n,
              min_train_nodes=n)  # fmt: skip
    honest_step = {k: np.full(v.shape, DIRECTION) for k, v in x0.items()}
    scale = _norm(honest_step)
    for name, make in [("FedAvg", lambda kw: FedAvg(**kw)), *ROBUST.items()]:
        script, honest = _byzantine_client(attack)
        res = run_rounds(make(kw), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
        assert res.history.rounds[0].num_aggregated == n, name
        mean = {k: np.mean([honest[p][k] for p in honest], axis=0) for k in x0}
        off = _norm({k: v.astype(np.float64) - x0[k] - mean[k] for k, v in np_(res.arrays).items()})
        if name == "FedAvg":
            assert off > scale, (attack, off, scale)
        else:
            assert off < 0.25 * scale, (name, attack, off, scale)


@pytest.mark.timeout(60)
def test_krum_never_picks_a_byzantine_client_over_rounds():
    """Over 4 rounds of Krum with 2 sign-flipping clients, the model moves by an honest step each round."""
    n = HONEST + BYZANTINE
    task = blobs(n, features=5)
    script, honest = _byzantine_client("sign")
    s = Krum(num_malicious_nodes=BYZANTINE, fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=4)
    step = np.mean(_flat(np_(res.arrays)) - _flat(np_(initial_arrays(task)))) / 4
    assert abs(step - DIRECTION) < 0.05


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["signflip", "noise"])
def test_tilestacks_malicious_clients_pull_fedavg_away_but_not_the_median_or_krum(attack):
    """tilestack's own clients, 3 of 12 attacking (Task.malicious_fraction): after 4 rounds FedMedian and Krum are
    near the model of a run without attackers and FedAvg is far from it."""
    base = dict(dataset="blobs", num_samples=480, num_features=4, num_classes=2, num_clients=12, local_steps=4,
                lr=0.1, attack=attack, attack_scale=10.0)  # fmt: skip
    clean, bad = Task(**base), Task(**base, malicious_fraction=0.25)
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    ref = _flat(np_(simulate(FedAvg(**kw), clean, rounds=4, evaluate=False).arrays))
    x0 = _flat(np_(initial_arrays(clean)))
    off = {}
    for name, make in [("FedAvg", FedAvg), ("FedMedian", FedMedian),
                       ("Krum", lambda **k: Krum(num_malicious_nodes=3, **k))]:  # fmt: skip
        got = _flat(np_(simulate(make(**kw), bad, rounds=4, evaluate=False).arrays))
        off[name] = np.linalg.norm(got - ref) / np.linalg.norm(ref - x0)
    assert off["FedAvg"] > 1.0, off
    assert off["FedMedian"] < 0.5 and off["Krum"] < 0.5, off


# ---- differential privacy ------------------------------------------------------------------------------------------
def _dp_run(noise: float, clip: float, n: int, seed: int, attack: str | None = None, features: int = 50,
            wrapper=DifferentialPrivacyServerSideFixedClipping):
    task = blobs(n, features=features, classes=10)
    script, _ = _byzantine_client(attack)
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT, min_available_nodes=n,
                   min_train_nodes=n)  # fmt: skip
    s = wrapper(inner, noise_multiplier=noise, clipping_norm=clip, num_sampled_clients=n)
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1, seed=seed)
    return task, res


@pytest.mark.timeout(60)
def test_server_side_clipping_bounds_a_scaled_attacker_to_its_share_of_the_norm():
    """DP fixed clipping without noise and 2 attackers scaling by 100: every update is clipped to C, so the
    model moves by at most C, and the attackers' pull is at most 2C/11 beyond the clipped honest mean."""
    clip, n = 0.5, HONEST + BYZANTINE
    task, res = _dp_run(0.0, clip, n, seed=0, attack="scaled")
    x0 = np_(initial_arrays(task))
    step = {k: v.astype(np.float64) - x0[k] for k, v in np_(res.arrays).items()}
    assert _norm(step) <= clip * (1 + 1e-5)
    assert _norm(step) > 0.9 * clip  # all updates point the same way, each clipped to norm C


@pytest.mark.timeout(90)
@pytest.mark.parametrize("wrapper, clip", [(DifferentialPrivacyServerSideFixedClipping, 0.2),
                                           (DifferentialPrivacyClientSideFixedClipping, 50.0)])  # fmt: skip
def test_dp_noise_std_is_sigma_clip_over_n_and_a_seed_reproduces_it(wrapper, clip):
    """Noise multiplier 1.5, 8 clients: the model less the noise-free run's has std 1.5 * C / 8 (to 8% over 510
    parameters) and mean 0; the same seed gives the same model bit for bit, another seed another. (Client-side: the
    scripted updates are within C = 50, so the clients need not clip.)"""
    sigma, n = 1.5, 8
    task, plain = _dp_run(0.0, clip, n, seed=3, wrapper=wrapper)
    _, noisy = _dp_run(sigma, clip, n, seed=3, wrapper=wrapper)
    _, again = _dp_run(sigma, clip, n, seed=3, wrapper=wrapper)
    _, other = _dp_run(sigma, clip, n, seed=4, wrapper=wrapper)
    residual = _flat(np_(noisy.arrays)) - _flat(np_(plain.arrays))
    want = sigma * clip / n
    assert abs(residual.std() / want - 1) < 0.08
    assert abs(residual.mean()) < 4 * want / math.sqrt(residual.size)
    assert np.array_equal(_flat(np_(noisy.arrays)), _flat(np_(again.arrays)))
    assert not np.array_equal(_flat(np_(noisy.arrays)), _flat(np_(other.arrays)))


@pytest.mark.timeout(90)
def test_client_side_fixed_clipping_with_tilestack_clients_keeps_every_update_within_the_norm():
    """Flower's client-side fixed clipping over tilestack's real clients (lr 5, so unclipped updates are large):
    without noise the model moves by at most C; the run's seed reproduces the noisy model."""
    task = Task(dataset="blobs", num_samples=120, num_features=4, num_classes=2, num_clients=4, local_steps=3, lr=5.0)
    x0 = np_(initial_arrays(task))

    def run(noise, seed):
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
        s = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=noise, clipping_norm=0.1,
                                                       num_sampled_clients=4)  # fmt: skip
        return np_(simulate(s, task, rounds=1, seed=seed, evaluate=False).arrays)

    clean = run(0.0, 0)
    assert _norm({k: v.astype(np.float64) - x0[k] for k, v in clean.items()}) <= 0.1 * (1 + 1e-5)
    a, b = run(1.0, 7), run(1.0, 7)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---- sampling edges ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_fraction_that_rounds_to_no_client_skips_the_round_saying_so_and_keeps_the_model():
    """fraction_train=0.05 of 10 nodes with no minimum: int(0.5) = 0 clients; the round reports it, the model is
    the initial one and no client trained."""
    task = blobs(10)
    script, sent = _plain_client(_sizes(10))
    s = FedAvg(fraction_train=0.05, fraction_evaluate=0.0, min_train_nodes=0, min_available_nodes=0)
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2)
    for r in res.history.rounds:
        assert r.num_selected == 0 and r.num_aggregated == 0
        assert r.skipped == "no clients were sampled for training"
    assert not sent
    check_model(res.arrays, np_(initial_arrays(task)), np.float32)


@pytest.mark.timeout(60)
def test_a_small_fraction_is_lifted_to_the_strategys_minimum():
    """fraction_train=0.05 of 10 nodes with Flower's default min_train_nodes=2: 2 clients train each round."""
    task = blobs(10)
    script, sent = _plain_client(_sizes(10))
    s = FedAvg(fraction_train=0.05, fraction_evaluate=0.0)
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2)
    assert [r.num_aggregated for r in res.history.rounds] == [2, 2]
    assert [len(sent[r]) for r in (1, 2)] == [2, 2]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(fraction_train=1.5), "fraction_train=1.5; expected a number in [0, 1]"),
        (dict(fraction_train=1.0, min_train_nodes=12), "min_train_nodes=12"),
        (dict(fraction_train=1.0, min_available_nodes=11), "min_available_nodes=11"),
    ],
    ids=["fraction-above-one", "minimum-above-the-nodes", "available-above-the-nodes"],
)
def test_asking_for_more_clients_than_there_are_is_refused_before_any_work(kw, needle):
    task = blobs(10)
    script, sent = _plain_client(_sizes(10))
    with pytest.raises(FederatedError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        run_rounds(FedAvg(fraction_evaluate=0.0, **kw), make_grid(scripted(script), task), initial_arrays(task),
                   num_rounds=1)  # fmt: skip
    assert not sent


# ---- evaluation-only rounds, unequal local work, failing rounds ---------------------------------------------------
@pytest.mark.timeout(60)
def test_an_evaluation_only_round_keeps_the_model_and_weights_the_clients_metrics():
    """fraction_train=0 and fraction_evaluate=1: nobody trains, the model is the initial one, and the round's
    evaluation metrics are the clients' losses weighted by their examples."""
    task = blobs(4)
    script, sent = _plain_client(_sizes(4))
    losses = {p: 0.1 * (p + 1) for p in range(4)}

    def evaluate_fn(pid, rnd):
        return {"num-examples": _sizes(4)[pid], "eval-loss": losses[pid], "eval-acc": 0.5}

    s = FedAvg(fraction_train=0.0, fraction_evaluate=1.0, min_train_nodes=0)
    res = run_rounds(s, make_grid(scripted(script, evaluate_fn), task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert not sent and r.num_aggregated == 0 and r.skipped == "no clients were sampled for training"
    check_model(res.arrays, np_(initial_arrays(task)), np.float32)
    want = sum(losses[p] * _sizes(4)[p] for p in range(4)) / sum(_sizes(4).values())
    assert r.eval_metrics["eval-loss"] == pytest.approx(want, rel=1e-12)
    assert r.client_acc  # the clients' accuracies are in the fairness summary


@pytest.mark.timeout(90)
def test_clients_with_different_local_epochs_do_their_own_work_and_are_weighted_by_examples():
    """tilestack's clients under local_epochs=1 with quantity-skewed data: each client does its own number of
    SGD steps (its batches per epoch), the round counts them all, and FedAvg weights the models by examples."""
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=2, num_clients=4, local_epochs=1.0,
                batch_size=8, lr=0.05, partitioner="quantity", partition_alpha=0.5)  # fmt: skip
    steps = [task.steps_for(p) for p in range(4)]
    assert len(set(steps)) > 1, steps  # the clients' work differs
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1, evaluate=False)
    r = res.history.rounds[0]
    assert r.steps_done == r.steps_full == sum(steps)
    assert r.num_aggregated == 4


@pytest.mark.timeout(60)
def test_clients_reporting_different_local_steps_are_averaged_by_examples_not_steps():
    """Scripted clients doing 1, 2, 4, 8 local steps of +0.1 each: FedAvg's model is the example-weighted mean,
    and the aggregated num-steps metric is the example-weighted mean of the steps."""
    task = blobs(4, local_steps=8)  # (the most steps a client may claim: the work the server asks of it)
    sizes = _sizes(4)

    def script(pid, rnd, got, context, config):
        k = 2**pid
        return {n: (v + np.float32(0.1) * k).astype(np.float32) for n, v in got["arrays"].items()}, {
            "num-examples": sizes[pid], "num-steps": k}

    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    x0 = np_(initial_arrays(task))
    want = wmean({p: {n: (v + np.float32(0.1) * 2**p).astype(np.float32) for n, v in x0.items()} for p in range(4)},
                 sizes)  # fmt: skip
    check_model(res.arrays, want, np.float32)
    steps = sum(2**p * sizes[p] for p in range(4)) / sum(sizes.values())
    assert res.history.rounds[0].train_metrics["num-steps"] == pytest.approx(steps, rel=1e-12)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["FedAvg", "FedAdam", "FedAvgM", "FedMedian", "Krum"])
def test_a_round_where_every_client_fails_keeps_the_model_and_state_and_the_run_goes_on(name):
    """Every client raises in round 2 of 3: round 2 reports no model and why, each client named; the model and the
    strategy's state are those of round 1, and round 3 is the rule applied from them: the same model and state as
    a run in which round 2 never happened (FedAdam's bias correction counts rounds: its moments are compared)."""
    make, _ = FLOWER_RULES[name]
    task = blobs(5, features=3)
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)

    def client(fail_round: int | None):
        def script(pid, rnd, got, context, config):
            if rnd == fail_round:
                raise RuntimeError("boom")
            rnd = 3 if fail_round is None and rnd == 2 else rnd  # the reference's round 2 does round 3's work
            return {k: (v + update(pid, rnd, v.shape, np.float32)).astype(np.float32)
                    for k, v in got["arrays"].items()}, {}  # fmt: skip

        return scripted(script)

    res = run_rounds(make(**kw), make_grid(client(2), task), initial_arrays(task), num_rounds=3)
    r1, r2, r3 = res.history.rounds
    assert r1.num_aggregated == 5 and r3.num_aggregated == 5 and not r3.skipped
    assert r2.num_aggregated == 0 and r2.skipped == "no replies to aggregate"
    assert r2.excluded == {str(p): "error: RuntimeError: boom" for p in range(5)}
    ref = run_rounds(make(**kw), make_grid(client(None), task), initial_arrays(task), num_rounds=2)
    if name == "FedAdam":
        for moment in ("m_t", "v_t"):
            a, b = getattr(res.strategy, moment), getattr(ref.strategy, moment)
            assert all(np.array_equal(a[k], b[k]) for k in b), moment
    else:
        got, want = np_(res.arrays), np_(ref.arrays)
        assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.timeout(60)
def test_dp_over_a_fraction_that_samples_no_client_is_refused_saying_so():
    """A DP wrapper over FedAvg(fraction_train=0.05) of 10 nodes with no minimum samples nobody. Before, the refusal
    said 'expected 0' sampled clients, a value Flower's wrapper itself refuses: a dead end. Now it says the strategy
    samples no node and what to change."""
    task = blobs(10)
    script, sent = _plain_client(_sizes(10))
    inner = FedAvg(fraction_train=0.05, fraction_evaluate=0.0, min_train_nodes=0, min_available_nodes=0)
    s = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=1.0, clipping_norm=1.0,
                                                   num_sampled_clients=1)  # fmt: skip
    with pytest.raises(FederatedError, match=r"FedAvg samples no node each round \(fraction_train=0.05 of the 10 "
                                             r"nodes of the run, min_train_nodes=0\); expected a fraction_train or "
                                             r"min_train_nodes that samples at least one"):  # fmt: skip
        run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", [DifferentialPrivacyServerSideFixedClipping,
                                     DifferentialPrivacyClientSideFixedClipping])  # fmt: skip
def test_an_accounted_dp_run_over_example_weights_is_refused_before_any_work(wrapper):
    """Flower's accountant needs equal client weights. Before, DP with an accountant over FedAvg weighted by
    num-examples let every client train, then ended the run inside Flower's aggregation with a bare ValueError
    ('Accounted aggregation requires equal client weights'). Now it is refused before the first round, naming the
    weight to use; over the unit weight the run goes through."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    def accounted(weight_key):
        acc = RdpAccountant(PrivacyConfig(1e-3, 4, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          SamplingMethod.NO_AMPLIFICATION))  # fmt: skip
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=weight_key)
        return wrapper(inner, noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=4, accountant=acc)

    task = blobs(4)
    script, sent = _plain_client(_sizes(4))
    needle = f"{wrapper.__name__} with a privacy accountant: FedAvg weights the replies by 'num-examples'; expected"
    with pytest.raises(FederatedError, match=re.escape(f"{needle} weighted_by_key='{UNIT}'")):
        run_rounds(accounted("num-examples"), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert not sent
    res = run_rounds(accounted(UNIT), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    assert res.history.rounds[0].num_aggregated == 4


@pytest.mark.timeout(60)
def test_flowers_qfedavg_with_a_loss_key_tilestacks_clients_do_not_report_is_refused_before_any_work():
    """Flower's QFedAvg reads each client's loss under train_loss_key ('train_loss' by default); tilestack's clients
    report 'train-loss'. Before, simulate trained round 1's clients and then stopped with Flower's AggregationError;
    now it is refused before any work naming the key to use, and with that key the run goes through."""
    from flwr.serverapp.strategy import QFedAvg

    task = Task(dataset="blobs", num_samples=140, num_features=3, num_classes=2, num_clients=4, local_steps=2, lr=0.1)
    needle = "QFedAvg: train_loss_key='train_loss'; expected a metric tilestack's clients report in every training"
    with pytest.raises(FederatedError, match=re.escape(f"{needle} reply: train-loss")):
        simulate(QFedAvg(client_learning_rate=0.1, fraction_evaluate=0.0), task, rounds=1, evaluate=False)
    s = QFedAvg(client_learning_rate=0.1, train_loss_key="train-loss", fraction_evaluate=0.0)
    res = simulate(s, task, rounds=1, evaluate=False)
    assert res.history.rounds[0].num_aggregated == 4 and not res.history.rounds[0].skipped


@pytest.mark.timeout(60)
def test_a_reply_without_the_loss_qfedavg_reads_is_left_out_naming_the_key():
    """Flower's QFedAvg(train_loss_key='loss') over scripted clients, client 2 reporting no 'loss'. Before, Flower's
    AggregationError ended the whole run; now that reply is left out naming the key, as a missing weight is, and
    the others are aggregated; a round where no reply has it keeps the model."""
    from flwr.serverapp.strategy import QFedAvg

    task = blobs(4)
    script, sent = _plain_client(_sizes(4))

    def with_loss(pid, rnd, got, context, config):
        arrays, metrics = script(pid, rnd, got, context, config)
        return arrays, metrics | ({} if pid == 2 or rnd == 2 else {"loss": 0.5 + pid})

    s = QFedAvg(client_learning_rate=0.1, train_loss_key="loss", fraction_train=1.0, fraction_evaluate=0.0)
    res = run_rounds(s, make_grid(scripted(with_loss), task), initial_arrays(task), num_rounds=2)
    r1, r2 = res.history.rounds
    assert r1.excluded == {"2": "metrics: no 'loss' (the strategy's train_loss_key)"} and r1.num_aggregated == 3
    assert len(r2.excluded) == 4 and r2.num_aggregated == 0 and r2.skipped == "no replies to aggregate"
    assert not np.array_equal(_flat(np_(res.arrays)), _flat(np_(initial_arrays(task))))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wrapper", [DifferentialPrivacyServerSideFixedClipping,
                                     DifferentialPrivacyClientSideFixedClipping])  # fmt: skip
def test_a_noisy_dp_run_resumed_or_on_two_workers_is_the_same_run_bit_for_bit(wrapper, tmp_path):
    """Noise 1.0 with C = 0.5 over tilestack's clients, 4 rounds with seed 3: stopped after 2 and resumed from the
    checkpoint, or run on two worker processes, it ends with the same noisy model as the run in one go."""
    task = Task(dataset="blobs", num_samples=140, num_features=3, num_classes=2, num_clients=4, local_steps=2, lr=0.1)

    def run(**kw):
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
        s = wrapper(inner, noise_multiplier=1.0, clipping_norm=0.5, num_sampled_clients=4)
        return _flat(np_(simulate(s, task, rounds=4, seed=3, evaluate=False, **kw).arrays))

    whole = run()
    assert np.abs(whole - _flat(np_(initial_arrays(task)))).max() > 0.01  # it moved (noise std 0.125 per round)
    run(checkpoint=tmp_path / "dp.ckpt", stop_after=2)
    assert np.array_equal(run(checkpoint=tmp_path / "dp.ckpt"), whole)
    assert np.array_equal(run(workers=2), whole)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", ["DifferentialPrivacyServerSideAdaptiveClipping",
                                     "DifferentialPrivacyClientSideAdaptiveClipping"])  # fmt: skip
def test_a_round_where_every_client_fails_under_adaptive_clipping_dp_is_skipped_and_the_run_goes_on(wrapper):
    """Every client raises in round 2 of 3 under Flower's adaptive-clipping DP. Before, the run ended with a
    ZeroDivisionError inside Flower (the clipped share of no replies); now the round reports that it had no
    replies, the model and the clipping norm stay those of round 1, and round 3 aggregates all four."""
    from flwr.serverapp import strategy as fl
    from flwr.supercore.differential_privacy import KEY_NORM_BIT

    task = blobs(4)

    def script(pid, rnd, got, context, config):
        if rnd == 2:
            raise RuntimeError("boom")
        return {k: (v + update(pid, rnd, v.shape, np.float32)).astype(np.float32)
                for k, v in got["arrays"].items()}, {KEY_NORM_BIT: 1}  # fmt: skip

    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = getattr(fl, wrapper)(inner, noise_multiplier=0.1, num_sampled_clients=4)
    norms = []
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=3,
                     on_round=lambda m: norms.append(s.clipping_norm))  # fmt: skip
    r1, r2, r3 = res.history.rounds
    assert r2.num_aggregated == 0 and r2.skipped == "no replies to aggregate" and len(r2.excluded) == 4
    assert r1.num_aggregated == 4 and r3.num_aggregated == 4
    assert norms[1] == norms[0] != norms[2]


@pytest.mark.timeout(90)
def test_a_strategy_giving_each_client_its_own_local_work_is_accounted_by_that_work():
    """A FedAvg that sends each client a task with its own local_steps (1, 4, 7, 10 by node). Before, the grid
    planned every client's full work from its own task (2 steps): steps_full was 8 while the clients did 22. Now the
    full work of each client is that of the task its message carries: steps_done == steps_full == 22."""
    import dataclasses

    from flwr.app import ConfigRecord, Message, RecordDict

    task = Task(dataset="blobs", num_samples=140, num_features=3, num_classes=2, num_clients=4, local_steps=2, lr=0.1)
    planned = []

    class OwnWork(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            out = []
            for i, m in enumerate(super().configure_train(server_round, arrays, config, grid)):
                sent = Task.from_json(str(m.content["config"][tsclient.TASK_KEY]))
                own = dataclasses.replace(sent, local_steps=1 + 3 * i)
                planned.append(own.local_steps)
                cfg = ConfigRecord(dict(m.content["config"]) | {tsclient.TASK_KEY: own.to_json()})
                out.append(Message(RecordDict({**m.content, "config": cfg}), m.metadata.dst_node_id,
                                   m.metadata.message_type, group_id=m.metadata.group_id))  # fmt: skip
            return out

    r = simulate(OwnWork(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1, evaluate=False).history.rounds[0]
    assert sum(planned) == 22 and r.steps_done == r.steps_full == 22
