"""Federated scenarios, round 26: a client's claimed local steps past the work it was asked for (FedNova), q-FedAvg at
settings where F_k^q leaves float64's range, and strategy arguments of the wrong type.

Scripted Flower ClientApps (``_fl_round5.scripted``) and tilestack's own ClientApp over tilestack's in-process Flower
``Grid``; the references are FedNova's and q-FedAvg's rules written out in float64 (q-FedAvg by dividing every term by
the largest F_k^q by hand, an independent route to the log-space sums the strategy now takes).

What this round found, fixed:

- *FedNova trusted a client's step count.* A training reply claiming ``num-steps`` = 1e30 (or 2**63, or 10**6 where
  the server asked for 2) passed every check (finite, > 0): FedNova's tau_eff = sum p_i tau_i grew with the claim and
  scaled every other client's normalised update by it, so 1e30 overflowed the aggregate (the round rejected as
  non-finite, every honest client's work lost) and 10**6 moved the model a million times too far. A client cannot have
  run more steps than the server asked of it (its full work: ``local_steps``, or ``local_epochs`` x its batches), so the
  grid now leaves such a reply out, naming the metric, the claim and the bound (``grid.check_reply``, ``max_steps``).
- *q-FedAvg's powers left float64.* F_k^q of a loss of 2.3 at q = 1000 overflowed (and of losses below 1
  underflowed to 0 / 0 at q = 1000): the aggregate was inf or NaN, every round rejected, the model never moved,
  although the rule is finite there (the highest-loss client takes the weight). QFFL now sums in log space with L
  divided out; q past ``qffl.Q_LIMIT`` (where rounding q ln F_k leaves F_k^q more than 1% off) is refused naming q and
  the range.
- *OortSelector and a str.* ``OortSelector(system, epsilon="0.2")`` raised "'<=' not supported between instances of
  'float' and 'str'", naming nothing; now the argument, the value and the range (and a system that is no SystemModel).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, scripted, update
from _fl_round16 import fednova
from _fl_round18 import EVERYONE
from flwr.serverapp.strategy import FedAvg

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import (
    QFFL,
    ClientSideAdaptiveClipping,
    FedNova,
    OortSelector,
    ServerSideAdaptiveClipping,
    make_strategy,
)
from tilestack.federated.strategies.qffl import Q_LIMIT

pytestmark = pytest.mark.timeout(60)

SL = tsclient.START_LOSS_METRIC


def _start(task: Task) -> dict[str, np.ndarray]:
    """A model that is not zero (softmax regression starts at zero, where a zeroed model would look right)."""
    return {k: v + np.float32(0.25) for k, v in np_(initial_arrays(task)).items()}


# ---- FedNova and a step count past the work asked for ---------------------------------------------------------------
@pytest.mark.parametrize("claim", [1e30, 2**63, 10**6, 3, math.inf])
def test_fednova_leaves_out_a_reply_claiming_more_steps_than_asked_naming_the_metric_and_the_bound(claim):
    """Three scripted clients asked for 2 local steps; client 0 claims ``claim`` of them (finite and > 0), clients 1 and
    2 ran 1 and 2. Client 0 is left out naming num-steps, its claim and the bound 2; the model is FedNova's rule over
    clients 1 and 2, by hand. Before, the claim entered tau_eff: 1e30 and 2**63 made the aggregate overflow (the round
    rejected, nothing aggregated), 10**6 and 3 moved the model by that much too far."""
    task = blobs(3)
    assert all(task.steps_for(p) == 2 for p in range(3))
    steps, sizes = {0: claim, 1: 1, 2: 2}, {0: 4, 1: 3, 2: 7}

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {
            "num-examples": sizes[pid], "num-steps": steps[pid]}  # fmt: skip

    x = _start(task)
    res = run_rounds(FedNova(**EVERYONE), make_grid(scripted(script), task), codec.to_record(x), num_rounds=1)
    r = res.history.rounds[0]
    assert set(r.excluded) == {"0"}, r.excluded
    assert f"num-steps={claim!r}" in r.excluded["0"] and "at most 2" in r.excluded["0"], r.excluded["0"]
    assert r.num_aggregated == 2 and not r.skipped and r.steps_done == 3
    ys = {p: {k: v + update(p, 1, v.shape, np.float32) for k, v in x.items()} for p in (1, 2)}
    want = fednova(x, ys, {p: sizes[p] for p in (1, 2)}, {p: steps[p] for p in (1, 2)})
    for k, v in np_(res.arrays).items():
        assert np.all(np.isfinite(v)), k
        np.testing.assert_allclose(v, want[k], rtol=2**-22, atol=1e-7, err_msg=k)


def test_the_step_bound_is_each_clients_own_full_work_of_epochs_times_batches():
    """Epoch-based work: client p is asked for local_epochs x ceil(n_p / batch_size) steps, which differ by client.
    A client claiming exactly its own full work is aggregated, one claiming one step more is left out naming that
    client's own bound."""
    task = Task(dataset="blobs", num_samples=160, num_features=3, num_classes=2, num_clients=3, partitioner="quantity",
                quantity_sigma=1.0, local_epochs=2, batch_size=5, lr=0.05, seed=3)  # fmt: skip
    full = {p: task.steps_for(p) for p in range(3)}
    assert len(set(full.values())) > 1, full  # (the bound is per client)
    claims = {0: full[0], 1: full[1] + 1, 2: full[2]}

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {
            "num-examples": task.num_train(pid), "num-steps": claims[pid]}  # fmt: skip

    res = run_rounds(FedNova(**EVERYONE), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    r = res.history.rounds[0]
    assert set(r.excluded) == {"1"} and f"at most {full[1]}," in r.excluded["1"], r.excluded
    assert r.num_aggregated == 2 and r.steps_done == full[0] + full[2]


@pytest.mark.parametrize("stragglers", ["partial", "stale"])
def test_honest_clients_doing_partial_or_late_work_are_never_caught_by_the_step_bound(stragglers):
    """tilestack's own ClientApp under FedNova with stragglers cut short by a deadline ('partial') or arriving late
    ('stale'): every reply's steps are within the work asked, so no client is left out for num-steps, and each reply's
    num-steps is at most the client's full work."""
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=4, local_epochs=1,
                batch_size=4, lr=0.05, seed=2)  # fmt: skip
    system = SystemModel(4, speeds=np.array([1000.0, 1000.0, 20.0, 5.0]), bandwidths=np.full(4, 1e9), deadline=1.0)
    res = simulate(FedNova(**EVERYONE), task, rounds=3, evaluate=False, system=system, stragglers=stragglers)
    for r in res.history.rounds:
        assert not any("num-steps" in why for why in r.excluded.values()), r.excluded
        for p, c in r.client_train.items():
            assert 0 < c["num-steps"] <= task.steps_for(int(p)), (p, c)
    assert sum(r.num_aggregated for r in res.history.rounds) >= 6
    if stragglers == "partial":  # (someone was cut short: the bound met partial work)
        done = [(int(p), c["num-steps"]) for r in res.history.rounds for p, c in r.client_train.items()]
        assert any(steps < task.steps_for(p) for p, steps in done), done
    else:  # (someone was late: the bound met a held-back reply)
        assert any(why.startswith("late") for r in res.history.rounds for why in r.excluded.values())


# ---- q-FedAvg where F_k^q leaves float64's range --------------------------------------------------------------------
def _qffl_scaled(w, models, losses, q, lr):
    """q-FedAvg's rule (Li et al. 2020, L = 1 / lr, F_k = loss + 1e-10) with every term divided by L F_max^q by hand:
    r_k = (F_k / F_max)^q, w - sum r_k (w - w_k) / sum (r_k + q r_k / F_k L ||w - w_k||^2), float64."""
    lip = 1.0 / lr
    f = {p: losses[p] + 1e-10 for p in models}
    top = max(f.values())
    num = {k: np.zeros(v.shape) for k, v in w.items()}
    den = 0.0
    for p, model in models.items():
        r = (f[p] / top) ** q
        move = {k: w[k].astype(np.float64) - model[k].astype(np.float64) for k in w}
        sq = sum(float((d**2).sum()) for d in move.values())
        for k in w:
            num[k] += r * move[k]
        den += r + q * r / f[p] * lip * sq
    return {k: w[k].astype(np.float64) - num[k] / den for k in w}


@pytest.mark.parametrize("q, losses", [(1000.0, {0: 2.3, 1: 2.2, 2: 1.9}),    # F^q overflows
                                       (1000.0, {0: 0.3, 1: 0.25, 2: 0.1}),   # every F^q underflows: 0 / 0
                                       (2.0, {0: 1e200, 1: 1.0, 2: 0.5})])    # one loss past the range at q = 2
def test_qffl_is_its_rule_where_the_loss_powers_leave_float64(q, losses):
    """Three scripted clients move by 0.1 (p + 1) and report the losses; two rounds. Flower's direct sums are not
    finite here (checked), so the round was rejected and the model never moved. Now each round aggregates all three
    and is the rule, computed by hand with every term divided by the largest F_k^q."""
    with np.errstate(over="ignore", under="ignore"):
        direct = [np.float_power(v + 1e-10, q) for v in losses.values()]
        assert not all(0 < d < math.inf for d in direct)

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + np.float32(0.1 * (pid + 1)) for k, v in got["arrays"].items()}, {SL: losses[pid]}

    task = blobs(3)
    models: list = []
    res = run_rounds(QFFL(q=q, client_learning_rate=0.05, **EVERYONE), make_grid(scripted(script), task),
                     initial_arrays(task), num_rounds=2,
                     extra_metrics=lambda s, a, r: models.append(np_(a)) or {})  # fmt: skip
    assert [(r.num_aggregated, r.skipped) for r in res.history.rounds] == [(3, ""), (3, "")]
    x = np_(initial_arrays(task))
    for got in models:
        ws = {p: {k: v + np.float32(0.1 * (p + 1)) for k, v in x.items()} for p in range(3)}
        want = _qffl_scaled(x, ws, losses, q, 0.05)
        for k, v in got.items():
            assert np.all(np.isfinite(v)), k
            np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        x = got


def test_qffl_at_q_zero_is_still_the_plain_mean_and_at_moderate_q_flowers_rule():
    """The log-space sums change no ordinary setting: q = 0 gives the plain mean of the client models; q = 0.5 equals
    Flower's own QFedAvg fed the same losses (its direct powers are finite here)."""
    from flwr.serverapp.strategy import QFedAvg

    losses = {0: 0.7, 1: 1.3, 2: 2.1}

    def script(pid, rnd, got, ctx, cfg):
        return {k: v + np.float32(0.1 * (pid + 1)) for k, v in got["arrays"].items()}, {SL: losses[pid]}

    task = blobs(3)
    x = np_(initial_arrays(task))
    mean = run_rounds(QFFL(q=0.0, client_learning_rate=0.05, **EVERYONE), make_grid(scripted(script), task),
                      initial_arrays(task), num_rounds=1)  # fmt: skip
    for k, v in np_(mean.arrays).items():
        np.testing.assert_allclose(v, x[k] + np.float32(0.2), rtol=1e-6, atol=1e-7, err_msg=k)
    ours = run_rounds(QFFL(q=0.5, client_learning_rate=0.05, **EVERYONE), make_grid(scripted(script), task),
                      initial_arrays(task), num_rounds=1)  # fmt: skip
    flower = run_rounds(QFedAvg(q=0.5, client_learning_rate=0.05, train_loss_key=SL, **EVERYONE),
                        make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)  # fmt: skip
    for k, v in np_(ours.arrays).items():
        np.testing.assert_allclose(v, np_(flower.arrays)[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("q", [1e12, 1e300, 2 * Q_LIMIT])
def test_a_q_whose_weights_are_rounding_is_refused_naming_q_and_the_range(q):
    """Past Q_LIMIT (~6e10) q ln F_k, rounded in float64, leaves F_k^q more than 1% off; refused on construction (so
    before any client runs), by QFFL and by make_strategy, naming q, the value and the range."""
    assert 1e10 < Q_LIMIT < 1e11
    with pytest.raises(FederatedError, match=re.escape(f"QFFL: q={q!r}; expected a number in [0, 6.15e+10]")):
        QFFL(q=q, client_learning_rate=0.1)
    with pytest.raises(ValueError, match=re.escape(f"q={q!r}")):
        make_strategy("qfedavg", clients_per_round=3, num_clients=3, q=q)
    QFFL(q=Q_LIMIT, client_learning_rate=0.1)  # (the limit itself is taken)


# ---- strategy arguments of the wrong type ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(epsilon="0.2"), "OortSelector: epsilon='0.2'; expected a number in [0, 1]"),
        (dict(alpha="2"), "OortSelector: alpha='2'; expected a finite number >= 0"),
        (dict(preferred_percentile="50"), "OortSelector: preferred_percentile='50'; expected a number in [0, 100]"),
        (dict(epsilon=float("nan")), "OortSelector: epsilon=nan"),
        (dict(epsilon=True), "OortSelector: epsilon=True"),
    ],
)
def test_oort_selector_names_an_argument_of_the_wrong_type(kw, needle):
    with pytest.raises(ValueError) as ex:
        OortSelector(SystemModel(4), **kw)
    assert needle in str(ex.value), str(ex.value)


def test_oort_selector_names_a_system_that_is_no_system_model():
    with pytest.raises(TypeError, match="OortSelector: system is a list; expected a tilestack SystemModel"):
        OortSelector([1.0, 2.0])


# ---- a client whose arrays change shape between rounds --------------------------------------------------------------
def test_a_client_whose_model_changes_shape_in_round_two_is_left_out_of_that_round_alone():
    """Client 0 answers round 1 with the model's shapes and round 2 with fc.weight one row short. Round 2 leaves it out
    naming the array and both shapes; the others are averaged (FedNova's rule, by hand) and round 3 takes client 0
    back."""
    task = blobs(3)
    sizes = {0: 4, 1: 3, 2: 7}

    def script(pid, rnd, got, ctx, cfg):
        out = {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}
        if (pid, rnd) == (0, 2):
            out["fc.weight"] = out["fc.weight"][:-1]
        return out, {"num-examples": sizes[pid], "num-steps": 1}

    models: list = []
    res = run_rounds(FedNova(**EVERYONE), make_grid(scripted(script), task), codec.to_record(_start(task)),
                     num_rounds=3, extra_metrics=lambda s, a, r: models.append(np_(a)) or {})  # fmt: skip
    r1, r2, r3 = res.history.rounds
    assert r1.excluded == {} and r3.excluded == {} and r1.num_aggregated == r3.num_aggregated == 3
    shape = tuple(_start(task)["fc.weight"].shape)
    short = (shape[0] - 1, *shape[1:])
    assert r2.excluded == {"0": f"shape: fc.weight is {short}, expected {shape}"} and r2.num_aggregated == 2
    ys = {p: {k: v + update(p, 2, v.shape, np.float32) for k, v in models[0].items()} for p in (1, 2)}
    want = fednova(models[0], ys, {p: sizes[p] for p in (1, 2)}, {1: 1, 2: 1})
    for k, v in models[1].items():
        np.testing.assert_allclose(v, want[k], rtol=2**-22, atol=1e-7, err_msg=k)


# ---- adaptive clipping that moves its norm towards the updates ------------------------------------------------------
def _unit_weight_fedavg() -> FedAvg:
    return FedAvg(**EVERYONE, weighted_by_key=tsclient.UNIT_WEIGHT)


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("c0", [1e-3, 1e2])
def test_tilestacks_adaptive_clipping_moves_its_norm_towards_the_updates(side, c0):
    """tilestack's subclasses of Flower's adaptive wrappers (Andrew et al. 2021): starting far below every update's
    norm (all clipped, target share 0.5) the norm grows by exp(lr x (1 - 0.5)) a round; far above (none clipped) it
    shrinks by exp(-lr x 0.5). Flower's own classes (round 19's strict xfail) move it the other way; the run's models
    stay finite and every round aggregates all four clients."""
    cls = {"server": ServerSideAdaptiveClipping, "client": ClientSideAdaptiveClipping}[side]
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=5, lr=0.1,
                seed=2)  # fmt: skip
    s = cls(_unit_weight_fedavg(), 0.0, 4, initial_clipping_norm=c0, target_clipped_quantile=0.5, clip_norm_lr=0.5,
            clipped_count_stddev=0.0)  # fmt: skip
    norms: list = []
    res = simulate(s, task, rounds=3, evaluate=False,
                   extra_metrics=lambda st, a, r: norms.append(s.clipping_norm) or {})
    sign = 1.0 if c0 < 1 else -1.0
    assert norms == pytest.approx([c0 * math.exp(sign * 0.5 * 0.5 * r) for r in (1, 2, 3)], rel=1e-12)
    assert [r.num_aggregated for r in res.history.rounds] == [4, 4, 4]
    assert all(np.all(np.isfinite(v)) for v in np_(res.arrays).values())


def test_tilestacks_adaptive_clipping_reaches_the_updates_where_flowers_runs_off_to_zero():
    """From a norm of 0.001, far below the updates' (about 0.1 to 0.4), target share clipped 0.5, lr 1, exact counts,
    16 rounds: tilestack's norm climbs to the updates and stays among them (its last four rounds between 0.05 and 1,
    having clipped all, then none, then some); Flower's own class shrinks it every round (all clipped) to below 1e-5."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=5, lr=0.1,
                seed=2)  # fmt: skip
    runs = {}
    for cls in (ServerSideAdaptiveClipping, DifferentialPrivacyServerSideAdaptiveClipping):
        s = cls(_unit_weight_fedavg(), 0.0, 4, initial_clipping_norm=1e-3, target_clipped_quantile=0.5,
                clip_norm_lr=1.0, clipped_count_stddev=0.0)  # fmt: skip
        norms: list = []
        simulate(s, task, rounds=16, evaluate=False,
                 extra_metrics=lambda st, a, r, s=s, n=norms: n.append(s.clipping_norm) or {})
        runs[cls] = norms
    ours, flowers = runs[ServerSideAdaptiveClipping], runs[DifferentialPrivacyServerSideAdaptiveClipping]
    assert all(0.05 < c < 1.0 for c in ours[-4:]), ours
    assert max(ours) < 1.0 and any(b < a for a, b in zip(ours, ours[1:], strict=False)), ours  # (it turned back)
    assert all(b < a for a, b in zip(flowers, flowers[1:], strict=False)) and flowers[-1] < 1e-5, flowers


# ---- a node that leaves mid-run under a deadline --------------------------------------------------------------------
class _LosingGrid(InProcessGrid):
    """tilestack's in-process grid whose node of partition ``gone`` stops answering training from round ``after`` on
    (its reply never comes back, as from a node that disconnected), whatever the timeout."""

    def __init__(self, app, num_nodes: int, gone: int, after: int):
        super().__init__(app, num_nodes)
        self.gone, self.after, self.rounds = gone, after, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        training = any(m.metadata.message_type == "train" for m in messages)
        self.rounds += int(training)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if not training or self.rounds < self.after:
            return replies
        return [r for r in replies if self.partitions[r.metadata.src_node_id] != self.gone]


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_node_gone_mid_run_under_a_deadline_is_waited_for_until_the_deadline(timeout):
    """Partition 1's node stops answering from round 2 on; the system model's deadline is 5 s and every client's work
    takes about 0.02 s. Round 1 lasts the clients' time; rounds 2 and 3 leave client 1 out as a timeout and last the
    deadline, as a client planned to time out does (the server cannot tell a node gone from one still working). Before,
    such a round was as short as its fastest clients, and with no timeout the reason read 'no reply within None s'."""
    task = blobs(3)
    system = SystemModel(3, speeds=np.full(3, 100.0), bandwidths=np.full(3, 1e9), deadline=5.0)
    grid = ManagedGrid(_LosingGrid(tsclient.app, 3, gone=1, after=2), task, system=system)
    res = run_rounds(FedAvg(**EVERYONE), grid, initial_arrays(task), num_rounds=3, timeout=timeout)
    r1, r2, r3 = res.history.rounds
    assert r1.excluded == {} and r1.sim_time < 0.1 and r1.num_aggregated == 3
    why = "timeout: no reply (the node left the run)" if timeout is None else "timeout: no reply within 30.0 s"
    for r in (r2, r3):
        assert r.excluded == {"1": why} and r.num_aggregated == 2 and r.sim_time == 5.0, (r.excluded, r.sim_time)


# ---- more arguments of the wrong type -------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint", [123, 1.5, object()])
def test_a_checkpoint_that_is_no_path_is_refused_naming_it_before_any_client_runs(checkpoint):
    calls: list = []
    with pytest.raises(TypeError, match=f"checkpoint is a {type(checkpoint).__name__}"):
        simulate(FedAvg(**EVERYONE), blobs(3), rounds=1, evaluate=False, checkpoint=checkpoint,
                 on_round=calls.append)  # fmt: skip
    assert calls == []


@pytest.mark.parametrize("ratio", ["0.1", True, [0.1]])
def test_a_topk_ratio_that_is_no_number_is_refused_naming_it(ratio):
    """``Compressed(s, "topk", ratio="0.1")`` was formatted into its spec and ran as 0.1; a str, a bool or a list is
    refused naming ratio, its value and type, and the range."""
    with pytest.raises(ValueError) as ex:
        Compressed(FedAvg(**EVERYONE), "topk", ratio=ratio)
    assert f"topk ratio={ratio!r} is a {type(ratio).__name__}; expected a number in (0, 1]" in str(ex.value)


@pytest.mark.parametrize("lr", [5e-324, 1e-309, 1e308])
def test_a_client_learning_rate_whose_lipschitz_estimate_is_no_normal_float_is_refused(lr):
    """L = 1 / client_learning_rate: a subnormal rate made L inf (Flower's QFedAvg: every aggregate NaN, round after
    round), past 1 / tiny L is subnormal. Refused by QFFL on construction and by the run's check of Flower's own
    QFedAvg before any client trains, naming the argument, the value and the range."""
    from flwr.serverapp.strategy import QFedAvg

    with pytest.raises(FederatedError, match=re.escape(f"QFFL: client_learning_rate={lr!r}; expected a number in [")):
        QFFL(q=1.0, client_learning_rate=lr)
    calls: list = []
    flower = QFedAvg(q=1.0, client_learning_rate=lr, train_loss_key=SL, **EVERYONE)
    want = f"QFedAvg: client_learning_rate={lr!r}; expected a number in ["
    with pytest.raises(FederatedError, match=re.escape(want)):
        simulate(flower, blobs(3), rounds=1, evaluate=False, on_round=calls.append)
    assert calls == []
    QFFL(q=1.0, client_learning_rate=1e-300)  # (L = 1e300: a normal float, taken)
