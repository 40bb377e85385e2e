"""Federated scenarios, round 10 (2 of 2): a privacy accountant's epsilon against the RDP arithmetic, a privacy
budget that runs out mid-training, a SCAFFOLD client whose control-variate change alone is NaN, and top-k error
feedback over a sample of the clients written out.

What this round found, fixed:

- *A privacy budget running out ended the run and lost it.* Flower's DP wrappers raise ``PrivacyBudgetExhausted`` in
  ``configure_train`` when the next release would pass the accountant's ``max_epsilon``; ``run_rounds`` let it
  through, so ``simulate`` ended with the exception and the model and history of the rounds released were lost (a
  checkpoint kept them). The run now ends there: the result holds the rounds released, their model and epsilon, and
  ``RunResult.stopped`` says which round was not run and why (driver.run_rounds).
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import make_grid, np_, scripted, update
from _fl_round10 import dp_epsilon_by_hand
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from tilestack.federated import Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import Scaffold

dp_accounting = pytest.importorskip("dp_accounting")  # Flower's RdpAccountant needs it too
DELTA, SIGMA = 1e-5, 1.5


def _task(**kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=4,
                          local_steps=3, lr=0.1, seed=1), **kw})  # fmt: skip


def _accounted(wrapper, max_epsilon=None):
    config = PrivacyConfig(DELTA, 4, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION,
                           max_epsilon=max_epsilon)  # fmt: skip
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=tsclient.UNIT_WEIGHT)
    return wrapper(inner, noise_multiplier=SIGMA, clipping_norm=1.0, num_sampled_clients=4,
                   accountant=RdpAccountant(config))  # fmt: skip


def _spent(strategy, arrays, r) -> dict:
    spent = strategy.privacy_spent()
    return {"epsilon": spent.epsilon, "releases": spent.num_releases}


# ---- the accountant's epsilon ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", [DifferentialPrivacyServerSideFixedClipping,
                                     DifferentialPrivacyClientSideFixedClipping])  # fmt: skip
def test_the_accountants_epsilon_is_that_of_r_gaussian_releases_and_survives_a_resume(wrapper, tmp_path):
    """Four rounds of noisy FedAvg over all 4 clients (sigma 1.5, no sampling credit): after round r the epsilon at
    delta 1e-5 is that of r Gaussian mechanisms composed, computed here with Google's dp_accounting directly (same
    RDP orders) and bracketed by the RDP conversions written out (alpha r / (2 sigma^2) per order). A run stopped
    after 2 rounds and resumed from its checkpoint reports the same epsilons and ends on the same model, bit for bit
    (the accountant's compositions travel in the checkpoint)."""
    task = _task()
    whole = simulate(_accounted(wrapper), task, rounds=4, extra_metrics=_spent, evaluate=False)
    orders = list(whole.strategy.accountant._orders)
    eps = [r.extra["epsilon"] for r in whole.history.rounds]
    assert [r.extra["releases"] for r in whole.history.rounds] == [1, 2, 3, 4]
    for releases, got in enumerate(eps, start=1):
        direct = dp_accounting.rdp.RdpAccountant(orders)
        direct.compose(dp_accounting.GaussianDpEvent(SIGMA), releases)
        assert got == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12)
        low, high = dp_epsilon_by_hand(SIGMA, releases, DELTA, orders)
        assert low - 1e-9 <= got <= high + 1e-9
    assert eps == sorted(eps) and eps[0] > 0
    ckpt = tmp_path / "dp.ckpt"
    simulate(_accounted(wrapper), task, rounds=4, extra_metrics=_spent, evaluate=False, checkpoint=ckpt, stop_after=2)
    resumed = simulate(_accounted(wrapper), task, rounds=4, extra_metrics=_spent, evaluate=False, checkpoint=ckpt)
    assert [r.extra["epsilon"] for r in resumed.history.rounds] == eps
    assert resumed.strategy.privacy_spent().num_releases == 4
    for k, v in np_(whole.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v)


@pytest.mark.timeout(60)
def test_a_privacy_budget_that_runs_out_ends_the_run_with_the_rounds_released(tmp_path):
    """max_epsilon = 5: two releases spend 4.42, a third would spend 5.58. Before, Flower's PrivacyBudgetExhausted
    (raised while round 3 was configured) ended ``simulate`` and the two rounds' model and history were lost. Now the
    run ends there: two rounds on record, the model of a run asked for two rounds (bit for bit), epsilon within the
    budget, and ``stopped`` naming round 3 and the budget. A run resumed from its checkpoint stops at the same place;
    no client is asked to train for a round that cannot be released."""
    task = _task()
    ckpt = tmp_path / "budget.ckpt"
    res = simulate(_accounted(DifferentialPrivacyServerSideFixedClipping, 5.0), task, rounds=6, extra_metrics=_spent,
                   evaluate=False, checkpoint=ckpt)  # fmt: skip
    assert [r.round for r in res.history.rounds] == [1, 2]
    assert res.history.rounds[-1].extra["epsilon"] < 5.0
    assert res.stopped.startswith("round 3 not run: the privacy budget is spent (The next private release would "
                                  "exceed max_epsilon")  # fmt: skip
    two = simulate(_accounted(DifferentialPrivacyServerSideFixedClipping), task, rounds=2, evaluate=False)
    for k, v in np_(two.arrays).items():
        np.testing.assert_array_equal(np_(res.arrays)[k], v)
    again = simulate(_accounted(DifferentialPrivacyServerSideFixedClipping, 5.0), task, rounds=6, evaluate=False,
                     checkpoint=ckpt)  # fmt: skip
    assert again.stopped == res.stopped and [r.round for r in again.history.rounds] == [1, 2]
    unlimited = simulate(_accounted(DifferentialPrivacyServerSideFixedClipping), task, rounds=3, evaluate=False)
    assert unlimited.stopped == "" and len(unlimited.history.rounds) == 3


# ---- SCAFFOLD: a NaN control-variate change --------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_scaffold_client_whose_control_variate_change_alone_is_nan_is_left_out_of_x_and_c():
    """Four scripted SCAFFOLD clients of 5, 10, 15, 20 examples; in round 1 client 2 sends a finite model but a NaN
    in its ``scaffold.dc.fc.bias``. It is left out naming that array; x is the example-weighted mean of the other
    three models and c moves by |S| / N = 3/4 of the mean of their changes, in float64 by hand; in round 2 it sends a
    finite change and counts again (4/4). Nothing NaN reaches x or c."""
    task = _task()
    sizes = {0: 5, 1: 10, 2: 15, 3: 20}
    sent: dict[int, dict] = {}

    def script(pid, rnd, got, context, cfg):
        model = {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}
        dc = {tsclient.SCAFFOLD_DC_PREFIX + k: update(pid + 10, rnd, v.shape, np.float32) / 5
              for k, v in got["arrays"].items()}  # fmt: skip
        if pid == 2 and rnd == 1:
            dc[tsclient.SCAFFOLD_DC_PREFIX + "fc.bias"][1] = np.nan
        sent[(pid, rnd)] = (model, dc)
        return model | dc, {"num-examples": sizes[pid]}

    cs, xs = [], []

    def hook(strategy, arrays, r):
        cs.append({k: v.copy() for k, v in strategy.c.items()})
        xs.append(np_(arrays))
        return {}

    res = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), make_grid(scripted(script), task),
                     initial_arrays(task), num_rounds=2, extra_metrics=hook)  # fmt: skip
    r1, r2 = res.history.rounds
    assert r1.excluded == {"2": "non-finite: scaffold.dc.fc.bias"} and r1.num_aggregated == 3
    assert not r2.excluded and r2.num_aggregated == 4
    c = {k: np.zeros(v.shape) for k, v in np_(initial_arrays(task)).items()}
    for rnd, kept in ((1, (0, 1, 3)), (2, (0, 1, 2, 3))):
        total = sum(sizes[p] for p in kept)
        x = {k: sum(sizes[p] * sent[(p, rnd)][0][k].astype(np.float64) for p in kept) / total for k in c}
        c = {k: c[k] + len(kept) / 4 * np.mean([sent[(p, rnd)][1][tsclient.SCAFFOLD_DC_PREFIX + k] for p in kept],
                                                axis=0, dtype=np.float64) for k in c}  # fmt: skip
        for k in c:
            np.testing.assert_allclose(xs[rnd - 1][k], x[k], rtol=3e-7, atol=1e-7, err_msg=f"round {rnd} x[{k}]")
            np.testing.assert_allclose(cs[rnd - 1][k], c[k], rtol=3e-7, atol=1e-7, err_msg=f"round {rnd} c[{k}]")
            assert np.all(np.isfinite(cs[rnd - 1][k])) and np.all(np.isfinite(xs[rnd - 1][k]))


# ---- top-k updates with error feedback, over a sample ----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_topk_error_feedback_over_half_the_clients_keeps_each_residual_until_that_client_is_sampled_again():
    """Compressed(FedAvg over 3 of 6 clients a round, top-30%) for 4 rounds, written out in float64: a sampled client
    adds the residual it kept from the last round it was sampled in (however long ago) to its new update y - x, sends
    the ceil(0.3 n) entries largest in magnitude and keeps the rest; the server rebuilds x + sent for each and takes
    the example-weighted mean. The bytes it counts up are those of the kept entries (index + value)."""
    from _fl_round7 import client_model, weighted_mean
    from _fl_round9 import keep, near

    from tilestack.federated.compression import Compressed

    task = _task(num_clients=6, partitioner="quantity")
    models: list[dict] = []
    res = simulate(Compressed(FedAvg(fraction_train=0.5, fraction_evaluate=0.0), "topk", 0.3), task, rounds=4,
                   evaluate=False, extra_metrics=keep(models), seed=3)  # fmt: skip
    x = np_(initial_arrays(task))
    residual = {p: {k: np.zeros(v.shape, np.float32) for k, v in x.items()} for p in range(6)}
    sampled = []
    for rnd, r in enumerate(res.history.rounds, start=1):
        s = sorted(int(p) for p in r.client_train)
        sampled.append(s)
        rebuilt, kept = {}, 0
        for p in s:
            y = client_model(task, p, rnd, x)[0]
            rebuilt[p] = {}
            for k in x:
                delta = ((y[k] - x[k]).astype(np.float32) + residual[p][k]).ravel()
                top = np.argsort(-np.abs(delta), kind="stable")[: int(np.ceil(0.3 * delta.size))]
                sent = np.zeros_like(delta)
                sent[top] = delta[top]
                residual[p][k] = (delta - sent).reshape(x[k].shape)
                rebuilt[p][k] = x[k].astype(np.float64) + sent.reshape(x[k].shape)
                kept += len(top)
        near(models[rnd - 1], weighted_mean(rebuilt, {p: task.num_train(p) for p in s}))
        assert r.bytes_up == 8 * kept  # a uint32 index and a float32 value per kept entry
        x = models[rnd - 1]
    came_back = [p for p in range(6) for i in range(len(sampled) - 2)
                 if p in sampled[i] and p not in sampled[i + 1] and any(p in s for s in sampled[i + 2 :])]  # fmt: skip
    assert came_back  # a client carried its residual across a round it was not sampled in
