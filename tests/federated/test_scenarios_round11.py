"""Federated scenarios, round 11 (1 of 2): what one client's metrics can do to a round, and Flower's own loop over
tilestack's grid.

Scripted Flower ClientApps (``_fl_round5.scripted``: each reply written here) and tilestack's ClientApp over
tilestack's in-process Flower ``Grid`` under ``ManagedGrid``; the server's rule in float64 (or exactly, in fractions)
by hand.

What this round found, fixed:

- *One client's odd metric ended the run.* Flower's metric mean adds each reply's value to the first reply's,
  element by element for a list: a client sending ``train-loss`` as a list where the others send a number (or a
  list of another length) raised TypeError or ValueError out of ``aggregate_train`` (``aggregate_evaluate`` the
  same), and the run ended there, every other client's work lost. Such a reply is now left out by the grid naming
  the metric and both layouts, as a reply with other metric keys was (grid._metric_layout).
- *A weight sent as a list skipped the whole round.* Flower's consistency check refuses a list under the weighting
  key for all replies at once ("inconsistent replies"): one client's reply threw away every other client's update.
  It is now that client's reply alone that is left out, naming the key (grid.check_reply).
- *Step counts a client sends as a list ended the run*: the grid counts each reply's ``num-steps`` (TypeError on a
  list), and a negative count was added to the round's steps (FedNova divides by it). A TRAIN reply's num-steps must
  be one number >= 0, else the reply is left out naming it (grid.check_reply).
- *Weights whose sum overflows zeroed the model.* Two replies claiming 1e308 examples each summed to inf in
  Flower's weighted mean; every share became w / inf = 0 and the global model was replaced by zeros, finite, so no
  check caught it (tilestack's FedNova divided to zero weights and kept the old model). Weights past 2**500 are now
  scaled by one power of two before the strategy aggregates (exact: every share w / sum is unchanged;
  driver.summable_weights).
- *Flower's own ``Strategy.start`` over a ManagedGrid* (the grid "stays a Grid, so the same strategy objects run over
  it"): a train config without ``tilestack.task`` (Flower's apps send ``{"lr": 0.1}``) made every client fail and
  the run end with an empty model; a float32 model came back float64 (the grid hands the strategy float64 replies
  to sum exactly, and nobody rounded the aggregate back), so from round 2 every client trained in float64; and the
  grid never learned the round, so the system model drew round 0's dropouts every round. The grid now sends its own
  task where the config has none, rounds each message's arrays to the run's model dtypes (those of its first
  message, as run_rounds rounds every aggregate), and takes the round from the messages' ``server-round``: under
  Flower's loop, FedAvg gives run_rounds' models bit for bit (a server optimiser keeps its state on Flower's float64
  model, within float32's rounding of run_rounds').
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from _fl_round5 import blobs, check_model, make_grid, np_, scripted, update, wmean
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, codec, run_rounds
from tilestack.federated import client as tsclient
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedNova, HeteroFL, Scaffold

SIZES = {0: 5, 1: 11, 2: 3, 3: 7}


def _start(task) -> dict[str, np.ndarray]:
    """A model that is not zero (softmax regression starts at zero, where a zeroed model would look right)."""
    return {k: v + np.float32(0.25) for k, v in np_(initial_arrays(task)).items()}


def _fedavg(**kw) -> FedAvg:
    return FedAvg(**{**dict(fraction_train=1.0, fraction_evaluate=0.0), **kw})


# ---- one client's metrics of another layout ------------------------------------------------------------------------
ODD_METRICS = {  # the odd client's training metrics, the others' train-loss
    "a list where the others send a number": ({"train-loss": [0.1, 0.2]}, 0.3,
                                              "train-loss is a list of 2 values where the other replies send a "
                                              "single number"),
    "a number where the others send a list": ({"train-loss": 0.1}, [0.3, 0.4],
                                              "train-loss is a single number where the other replies send a list of "
                                              "2 values"),
    "a list of another length": ({"train-loss": [0.1, 0.2, 0.3]}, [0.3, 0.4],
                                 "train-loss is a list of 3 values where the other replies send a list of 2 values"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("odd_pid", [0, 3])  # first in the mean (Flower starts from its value) and last
@pytest.mark.parametrize("case", sorted(ODD_METRICS))
def test_a_client_whose_metric_has_another_layout_is_left_out_and_the_round_is_the_mean_of_the_rest(case, odd_pid):
    """Four scripted clients over two rounds; one sends its train-loss in another layout than the other three. Before,
    Flower's metric mean raised TypeError or ValueError out of aggregate_train and the run ended in round 1. Now that
    client is left out naming the metric and both layouts, each round's model is the example-weighted mean of the
    other three, rounded once, and their train-loss is aggregated."""
    task = blobs(4)
    odd, usual, reason = ODD_METRICS[case]

    def script(pid, rnd, got, ctx, cfg):
        x = got["arrays"]
        metrics = odd if pid == odd_pid else {"train-loss": usual}
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in x.items()}, {"num-examples": SIZES[pid],
                                                                                        **metrics}  # fmt: skip

    x = _start(task)
    res = run_rounds(_fedavg(), make_grid(scripted(script), task), codec.to_record(x), num_rounds=2)
    for rnd, r in enumerate(res.history.rounds, start=1):
        assert r.excluded == {str(odd_pid): f"metrics: {reason}"}
        assert r.num_aggregated == 3 and not r.skipped
        assert r.train_metrics["train-loss"] == pytest.approx(usual)
        rest = {p: {k: v + update(p, rnd, v.shape, np.float32) for k, v in x.items()} for p in SIZES if p != odd_pid}
        x = {k: v.astype(np.float32) for k, v in wmean(rest, SIZES).items()}
    check_model(res.arrays, x, np.float32)


@pytest.mark.timeout(60)
def test_an_evaluation_metric_of_another_layout_costs_that_clients_score_not_the_run():
    """Federated evaluation where client 2 sends eval-acc as a list. Before, aggregate_evaluate raised TypeError and
    the run ended after round 1's training. Now client 2's evaluation is left out (its update is still aggregated),
    and eval-acc is the test-example-weighted mean of the other three."""
    task = blobs(4)
    accs = {0: 0.5, 1: 0.25, 2: 0.75, 3: 1.0}

    def evaluate_fn(pid, rnd):
        return {"num-examples": SIZES[pid], "eval-acc": [accs[pid]] * 2 if pid == 2 else accs[pid]}

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + 0.5 for k, v in got["arrays"].items()}, {"num-examples": SIZES[pid]}

    res = run_rounds(_fedavg(fraction_evaluate=1.0), make_grid(scripted(script, evaluate_fn), task),
                     initial_arrays(task), num_rounds=2)  # fmt: skip
    want = sum(accs[p] * SIZES[p] for p in (0, 1, 3)) / sum(SIZES[p] for p in (0, 1, 3))
    for r in res.history.rounds:
        assert r.num_aggregated == 4
        assert r.eval_excluded == {"2": "metrics: eval-acc is a list of 2 values where the other replies send a "
                                        "single number"}  # fmt: skip
        assert r.eval_metrics["eval-acc"] == pytest.approx(want, rel=1e-12)
        assert sorted(r.client_eval) == ["0", "1", "3"]
    check_model(res.arrays, {k: v + 1.0 for k, v in np_(initial_arrays(task)).items()}, np.float32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [_fedavg, lambda: FedNova(fraction_train=1.0, fraction_evaluate=0.0)],
                         ids=["FedAvg", "FedNova"])  # fmt: skip
def test_a_weight_sent_as_a_list_costs_that_client_alone_not_the_round(make):
    """Client 1 sends num-examples as a list. Before, Flower's consistency check skipped the whole round ("inconsistent
    replies") and tilestack's FedNova raised TypeError reading it. Now client 1 alone is left out, naming the key, and
    the model is the weighted mean of the other three."""
    task = blobs(4)

    def script(pid, rnd, got, ctx, cfg):
        n = [SIZES[pid], 1] if pid == 1 else SIZES[pid]
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {"num-examples": n}

    x = _start(task)
    res = run_rounds(make(), make_grid(scripted(script), task), codec.to_record(x), num_rounds=1)
    r = res.history.rounds[0]
    assert r.excluded == {"1": "weight: num-examples is a list of 2 values, expected one number > 0"}
    assert r.num_aggregated == 3 and not r.skipped
    rest = {p: {k: v + update(p, 1, v.shape, np.float32) for k, v in x.items()} for p in (0, 2, 3)}
    check_model(res.arrays, wmean(rest, SIZES), np.float32)


@pytest.mark.timeout(60)
def test_step_counts_that_are_lists_or_negative_are_left_out_and_fednova_normalises_the_rest():
    """FedNova over four scripted clients: client 0 reports num-steps as a list, client 1 as -3, clients 2 and 3 ran 2
    and 4 steps. Before, the grid's step count raised TypeError on the list (the run ended) and counted -3 steps. Now
    both are left out naming num-steps; the model is FedNova's x - tau_eff sum_i p_i (x - y_i) / tau_i over clients 2
    and 3 (p by examples), and the round counts their 6 steps."""
    task = blobs(4, local_steps=4)  # (the most steps a client may claim: the work the server asks of it)
    steps = {0: [2, 2], 1: -3, 2: 2, 3: 4}

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {
            "num-examples": SIZES[pid], "num-steps": steps[pid]}  # fmt: skip

    x = _start(task)
    res = run_rounds(FedNova(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     codec.to_record(x), num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert r.excluded == {
        "0": "metrics: num-steps=[2, 2], expected one number >= 0 (the local steps the client ran)",
        "1": "metrics: num-steps=-3, expected one number >= 0 (the local steps the client ran)",
    }
    assert r.num_aggregated == 2 and r.steps_done == 6
    n = SIZES[2] + SIZES[3]
    p = {2: SIZES[2] / n, 3: SIZES[3] / n}
    tau_eff = p[2] * 2 + p[3] * 4
    want = {k: v.astype(np.float64) - tau_eff * sum(p[c] * -update(c, 1, v.shape, np.float32).astype(np.float64)
                                                    / steps[c] for c in (2, 3)) for k, v in x.items()}  # fmt: skip
    for k, v in np_(res.arrays).items():
        np.testing.assert_allclose(v, want[k], rtol=2**-22, atol=1e-7, err_msg=k)


# ---- weights at the edge of float's range --------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [_fedavg, lambda: FedNova(fraction_train=1.0, fraction_evaluate=0.0)],
                         ids=["FedAvg", "FedNova"])  # fmt: skip
def test_two_clients_claiming_1e308_examples_give_their_mean_not_a_zeroed_model(make):
    """Clients 0 and 1 report 1e308 and 9e307 training examples (finite numbers, so no check leaves them out; their
    sum is not), clients 2 and 3 report 3 and 7. The example-weighted mean, computed exactly in fractions, is
    (10 y0 + 9 y1) / 19 to float32's precision. Before, Flower's sum of the weights overflowed to inf, every share
    w / inf was 0 and FedAvg's model became all zeros (FedNova kept the old model); the round reported four clients
    aggregated. The round's record keeps each client's claim as it was sent."""
    task = blobs(4)
    claims = {0: 1e308, 1: 9e307, 2: 3, 3: 7}

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {
            "num-examples": claims[pid]}  # fmt: skip

    x = _start(task)
    res = run_rounds(make(), make_grid(scripted(script), task), codec.to_record(x), num_rounds=1)
    r = res.history.rounds[0]
    assert r.num_aggregated == 4 and not r.skipped and not r.excluded
    assert [r.client_train[str(p)]["num-examples"] for p in claims] == list(claims.values())  # as the clients said
    total = sum(Fraction(w) for w in claims.values())
    got = np_(res.arrays)
    for k, v in x.items():
        ys = {p: v + update(p, 1, v.shape, np.float32) for p in claims}
        exact = np.array([float(sum(Fraction(claims[p]) * Fraction(float(ys[p].flat[i])) for p in claims) / total)
                          for i in range(v.size)]).reshape(v.shape)  # fmt: skip
        assert np.abs(exact).min() > 0.01  # nowhere near the zeros of before
        np.testing.assert_allclose(got[k], exact, rtol=2**-22, err_msg=k)


@pytest.mark.timeout(60)
def test_evaluation_weights_past_floats_range_give_the_weighted_accuracy_not_zero():
    """Federated evaluation where clients 0 and 1 claim 1e308 and 9e307 test examples (accuracies 0.5 and 0.25),
    clients 2 and 3 claim 3 and 7. eval-acc is (10 x 0.5 + 9 x 0.25) / 19 to float64's precision; before, the sum of
    the weights overflowed and every share was 0: eval-acc 0."""
    task = blobs(4)
    claims, accs = {0: 1e308, 1: 9e307, 2: 3, 3: 7}, {0: 0.5, 1: 0.25, 2: 1.0, 3: 1.0}

    def evaluate_fn(pid, rnd):
        return {"num-examples": claims[pid], "eval-acc": accs[pid]}

    def script(pid, rnd, got, ctx, cfg):
        return got["arrays"], {"num-examples": 1}

    res = run_rounds(_fedavg(fraction_evaluate=1.0), make_grid(scripted(script, evaluate_fn), task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    total = sum(Fraction(c) for c in claims.values())
    want = float(sum(Fraction(claims[p]) * Fraction(accs[p]) for p in claims) / total)
    assert r.eval_metrics["eval-acc"] == pytest.approx(want, rel=1e-12) and want == pytest.approx(7.25 / 19)
    assert r.client_eval["0"]["num-examples"] == 1e308  # as the client said


# ---- Flower's own Strategy.start over tilestack's grid -------------------------------------------------------------
def _system() -> SystemModel:
    return SystemModel(6, dropout=0.4, seed=5)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("with_task", [False, True], ids=["config-without-task", "config-with-task"])
def test_flowers_own_strategy_start_over_a_managed_grid_gives_run_rounds_models_bit_for_bit(with_task):
    """``FedAvg(...).start(grid=ManagedGrid(...), train_config=ConfigRecord({"lr": 0.2}))``, as a Flower user runs a
    strategy, over tilestack's ClientApp with a system model dropping 40% of the clients each round, three rounds.
    The model Flower's loop ends with, rounded to float32 once, is run_rounds' model bit for bit, and so is each
    round's aggregated training loss. Before: without the task in the config every client failed and the run ended
    with an empty model; with it, the clients trained in float64 from round 2 (the model came back float64), and the
    grid planned every round as round 0 (the same dropouts each time)."""
    task = blobs(6, features=4, classes=3, local_steps=3)
    config = {"lr": 0.2} | ({tsclient.TASK_KEY: task.to_json()} if with_task else {})
    ref = run_rounds(_fedavg(min_available_nodes=1, min_train_nodes=1),
                     ManagedGrid(InProcessGrid(tsclient.app, 6), task, system=_system()), initial_arrays(task),
                     num_rounds=3, train_config={"lr": 0.2})  # fmt: skip
    dropped = [sorted(r.excluded) for r in ref.history.rounds]
    assert len({tuple(d) for d in dropped}) > 1, dropped  # the dropouts differ from round to round
    assert all(r.num_aggregated > 0 for r in ref.history.rounds)
    grid = ManagedGrid(InProcessGrid(tsclient.app, 6), task, system=_system())
    res = _fedavg(min_available_nodes=1, min_train_nodes=1).start(
        grid=grid, initial_arrays=initial_arrays(task), num_rounds=3, train_config=ConfigRecord(config)
    )
    assert sorted(res.arrays) == sorted(np_(ref.arrays)), "every client failed: the model is empty"
    got = {k: v.astype(np.float32) for k, v in np_(res.arrays).items()}
    for k, v in np_(ref.arrays).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    for rnd, r in enumerate(ref.history.rounds, start=1):
        assert float(res.train_metrics_clientapp[rnd]["train-loss"]) == pytest.approx(r.train_metrics["train-loss"],
                                                                                        rel=1e-12)  # fmt: skip
    assert grid.server_round == 3


TILESTACK_STRATEGIES = {
    "FedNova": lambda: FedNova(fraction_train=1.0, fraction_evaluate=0.0),
    "Scaffold": lambda: Scaffold(fraction_train=1.0, fraction_evaluate=0.0),
    "HeteroFL": lambda: HeteroFL(width_of=lambda pid: (1.0, 0.5, 0.25)[pid % 3], hidden=8, fraction_train=1.0,
                                 fraction_evaluate=0.0),
}  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(TILESTACK_STRATEGIES))
def test_tilestacks_strategies_under_flowers_own_loop_give_run_rounds_models(name):
    """tilestack's FedNova, SCAFFOLD and HeteroFL (widths 1, 1/2, 1/4) run by Flower's own ``Strategy.start`` over the
    grid with an empty train config, on an MLP, half the clients stragglers doing part of their work: three rounds
    end at run_rounds' model (rounded to float32 once, bit for bit), each client's share of the work planned for its
    own round. Before, every client failed on the missing task and the run ended with an empty model."""
    task = blobs(6, features=4, classes=3, local_steps=4, model="mlp", hidden=8)

    def system() -> SystemModel:
        return SystemModel(6, straggler_fraction=0.5, straggler_epochs=4, seed=3)

    ref = run_rounds(TILESTACK_STRATEGIES[name](), ManagedGrid(InProcessGrid(tsclient.app, 6), task, system=system()),
                     initial_arrays(task), num_rounds=3)  # fmt: skip
    assert len({tuple(sorted(r.client_train)) for r in ref.history.rounds}) == 1  # (all train, some partly)
    assert len({r.steps_done for r in ref.history.rounds}) > 1  # the stragglers' work differs round to round
    res = TILESTACK_STRATEGIES[name]().start(grid=ManagedGrid(InProcessGrid(tsclient.app, 6), task, system=system()),
                                            initial_arrays=initial_arrays(task), num_rounds=3)  # fmt: skip
    assert sorted(res.arrays) == sorted(np_(ref.arrays)), "every client failed: the model is empty"
    for k, v in np_(ref.arrays).items():
        np.testing.assert_array_equal(res.arrays[k].numpy().astype(np.float32), v, err_msg=k)


@pytest.mark.timeout(60)
def test_a_float64_model_under_flowers_own_loop_stays_float64_and_the_clients_train_in_it():
    """The rounding goes to the run's model dtype, not to float32: a float64 model run with Flower's own loop over the
    grid is run_rounds' float64 model (to float64's last bits: Flower's sum of shares against tilestack's), and its
    clients report float64 training (their replies in float64)."""
    task = blobs(4)
    start = {k: v.astype(np.float64) + 0.125 for k, v in np_(initial_arrays(task)).items()}
    seen: list[np.dtype] = []

    def script(pid, rnd, got, ctx, cfg):
        seen.extend(v.dtype for v in got["arrays"].values())
        return {k: v + update(pid, rnd, v.shape, np.float64) for k, v in got["arrays"].items()}, {
            "num-examples": SIZES[pid]}  # fmt: skip

    res = _fedavg().start(grid=make_grid(scripted(script), task), initial_arrays=codec.to_record(start), num_rounds=2)
    assert set(seen) == {np.dtype(np.float64)}
    x = start
    for rnd in (1, 2):
        x = wmean({p: {k: v + update(p, rnd, v.shape, np.float64) for k, v in x.items()} for p in SIZES}, SIZES)
    for k, v in np_(res.arrays).items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(v, x[k], rtol=1e-14, err_msg=k)


@pytest.mark.timeout(90)
def test_a_second_run_of_flowers_loop_on_the_same_grid_starts_over_with_its_own_rounds_and_model():
    """One grid object, two runs of Flower's own loop: three rounds of a float32 model, then two of a float64 model.
    The second run's clients get float64 arrays (the first run's float32 is not forced on it) and its rounds are its
    own, 1 and 2, so its dropouts (40% a round, drawn per round) and model are those of the same run on a fresh grid,
    bit for bit."""
    task = blobs(6)
    system = SystemModel(6, dropout=0.4, seed=5)
    seen: list[np.dtype] = []

    def script(pid, rnd, got, ctx, cfg):
        seen.extend(v.dtype for v in got["arrays"].values())
        return {k: v + update(pid, rnd, v.shape, v.dtype) for k, v in got["arrays"].items()}, {
            "num-examples": pid + 1}  # fmt: skip

    grid = make_grid(scripted(script), task, system=system)
    strategy = _fedavg(min_available_nodes=1, min_train_nodes=1)
    strategy.start(grid=grid, initial_arrays=initial_arrays(task), num_rounds=3)
    start = {k: v.astype(np.float64) + 0.125 for k, v in np_(initial_arrays(task)).items()}
    seen.clear()
    again = strategy.start(grid=grid, initial_arrays=codec.to_record(start), num_rounds=2)
    assert set(seen) == {np.dtype(np.float64)}
    fresh = _fedavg(min_available_nodes=1, min_train_nodes=1).start(
        grid=make_grid(scripted(script), task, system=system), initial_arrays=codec.to_record(start), num_rounds=2
    )
    for k, v in np_(fresh.arrays).items():
        assert v.dtype == np.float64
        np.testing.assert_array_equal(again.arrays[k].numpy(), v, err_msg=k)
    assert grid.server_round == 2
