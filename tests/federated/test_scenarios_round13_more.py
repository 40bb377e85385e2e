"""Federated scenarios, round 13 (2 of 2): clients replying in float16, float64 and float32 beside one another, a
float64 model's compressed updates (top-k of every entry, int8) against the uncompressed run and the bound of 8-bit
codes, and Bulyan at exactly 4f + 3 replies with a sign-flipping client.

tilestack's ClientApp (or a scripted Flower ClientApp) over tilestack's in-process Flower ``Grid``; the reference is the
clients' SGD replayed by hand in the model's precision and the server's rule written out in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import as_, check_model, make_grid, np_, scripted, update, wmean
from _fl_round7 import client_model
from _fl_round9 import keep, near
from _fl_round13 import bulyan, tiny_task
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian

from tilestack.federated import InProcessGrid, ManagedGrid, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import RESIDUAL_STATE, Compressed
from tilestack.federated.models import local_sgd
from tilestack.federated.simulation import initial_arrays

# ---- clients of three precisions in one round ------------------------------------------------------------------------
REPLY_DTYPES = {0: np.float16, 1: np.float64, 2: np.float32}
EXAMPLES = {0: 7, 1: 700, 2: 3}  # the float64 client holds 100x the float16 one's data (and 233x the float32 one's)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model_dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
def test_clients_replying_in_float16_float64_and_float32_are_averaged_as_sent_and_rounded_once(model_dtype):
    """Three clients answer in their own precision (a float16 phone, a float64 workstation, a float32 server) with
    700 : 7 : 3 examples. For a float32, float16 and float64 global model, FedAvg's two rounds are the float64 mean of
    the replies as sent, weighted by examples, rounded to the model's dtype once (bit for bit; float64 to 1e-15), and
    FedMedian's the element-wise median of the three as sent; nobody is left out."""
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=3, local_steps=2)
    sent: dict = {}

    def script(pid, rnd, got, ctx, cfg):
        x = got["arrays"]
        out = {k: (v.astype(np.float64) + update(pid, rnd, v.shape, np.float64)).astype(REPLY_DTYPES[pid])
               for k, v in x.items()}  # fmt: skip
        sent[(pid, rnd)] = out
        return out, {"num-examples": EXAMPLES[pid]}

    init = as_(initial_arrays(task), model_dtype)
    for make, rule in ((lambda: FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3), "mean"),
                       (lambda: FedMedian(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3), "median")):
        models: list = []
        res = run_rounds(make(), make_grid(scripted(script), task), init, num_rounds=2, extra_metrics=keep(models))
        for rnd, r in enumerate(res.history.rounds, start=1):
            assert r.excluded == {} and r.num_aggregated == 3
            got = {p: sent[(p, rnd)] for p in range(3)}
            if rule == "mean":
                want = wmean(got, EXAMPLES)
            else:
                want = {k: np.median(np.stack([got[p][k].astype(np.float64) for p in range(3)]), axis=0)
                        for k in got[0]}  # fmt: skip
            check_model(codec.to_record(models[rnd - 1]), want, model_dtype)


# ---- a float64 model's compressed updates ---------------------------------------------------------------------------
def _float64_start(task: Task) -> dict[str, np.ndarray]:
    """The task's model in float64, moved off zero by 1/3 (low bits float32 cannot hold)."""
    return {k: v.astype(np.float64) + 1 / 3 for k, v in np_(initial_arrays(task)).items()}


def _client_update64(task: Task, pid: int, rnd: int, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What tilestack's client trains from the float64 ``start`` in round ``rnd``, less ``start``: float64 SGD replayed
    (the same seeded minibatches)."""
    x, y, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    w, _, _ = local_sgd(task.build_model(), start, x, y, steps=task.steps_for(pid), batch_size=task.batch_size,
                        lr=task.lr, rng=rng)  # fmt: skip
    assert all(v.dtype == np.float64 for v in w.values())
    return {k: w[k] - start[k] for k in start}


def _fedavg4() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4, min_train_nodes=4)


@pytest.mark.timeout(60)
def test_topk_of_every_entry_of_a_float64_models_update_is_the_uncompressed_float64_run():
    """``Compressed(FedAvg, "topk", 1.0)`` keeps every entry: three rounds on a float64 model end at the uncompressed
    float64 run's model to float64's rounding (1e-15), the model stays float64, and each client's residual is 0.
    Before, each update crossed the wire as float32: the run drifted from the uncompressed one by 5e-9 (float32's
    precision) and the rounding was neither sent nor carried."""
    task = tiny_task()
    init = codec.to_record(_float64_start(task))
    plain = simulate(_fedavg4(), task, rounds=3, initial=init, evaluate=False)
    grid = InProcessGrid(tsclient.app, 4)
    comp = run_rounds(Compressed(_fedavg4(), "topk", 1.0), ManagedGrid(grid, task), init, num_rounds=3)
    for k, v in np_(plain.arrays).items():
        got = np_(comp.arrays)[k]
        assert v.dtype == got.dtype == np.float64
        np.testing.assert_allclose(got, v, rtol=1e-14, atol=1e-15, err_msg=k)
    for ctx in grid.contexts.values():
        assert all(np.all(r == 0) for r in codec.to_numpy(ctx.state[RESIDUAL_STATE]).values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,ratio", [("int8", 0.0), ("topk", 0.3)])
def test_a_float64_models_compressed_update_is_sent_plus_carried_exactly_and_int8_within_half_a_step(method, ratio):
    """One round of a float64 model's updates compressed to 8-bit codes (or the 30% largest entries): for every client,
    what the server took (its share of the new model) plus the residual the client keeps is the float64 update its SGD
    made, replayed by hand, to float64's rounding: nothing is lost, only delayed. The new model is x0 + the
    example-weighted mean of (update - residual); each int8 residual is within half a code step, (max - min) / 255 / 2,
    and top-k's is the update's smallest 70% of entries exactly. Before, the update was cut to float32 first: the sent
    plus the carried fell short of it by float32's rounding (1e-9), lost for good."""
    task = tiny_task()
    x0 = _float64_start(task)
    grid = InProcessGrid(tsclient.app, 4)
    strategy = Compressed(_fedavg4(), method, ratio) if method == "topk" else Compressed(_fedavg4(), "int8")
    res = run_rounds(strategy, ManagedGrid(grid, task), codec.to_record(x0), num_rounds=1)
    deltas = {p: _client_update64(task, p, 1, x0) for p in range(4)}
    residual = {grid.partitions[nid]: codec.to_numpy(ctx.state[RESIDUAL_STATE]) for nid, ctx in grid.contexts.items()}
    took = {p: {k: deltas[p][k] - residual[p][k] for k in x0} for p in range(4)}
    for p in range(4):
        for k, d in deltas[p].items():
            r = residual[p][k]
            assert r.dtype == np.float64, (p, k, r.dtype)
            if method == "int8":
                step = (d.max() - d.min()) / 255
                assert np.max(np.abs(r)) <= step / 2 * (1 + 1e-5) + 1e-12, (p, k)
                assert np.max(np.abs(r)) > 0  # (the codes are lossy here: the bound is not vacuous)
            else:
                kept = int(np.ceil(ratio * d.size))
                order = np.argsort(np.abs(d).ravel())
                np.testing.assert_array_equal(r.ravel()[order[: d.size - kept]], d.ravel()[order[: d.size - kept]])
                assert np.all(r.ravel()[order[d.size - kept :]] == 0)
    want = {k: x0[k] + wmean(took, {p: task.num_train(p) for p in range(4)})[k] for k in x0}
    for k, v in np_(res.arrays).items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(v, want[k], rtol=1e-13, atol=1e-14, err_msg=k)


# ---- Bulyan at exactly 4f + 3 ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_bulyan_at_exactly_4f_plus_3_replies_is_its_rule_by_hand_and_leaves_the_sign_flipper_out():
    """Seven clients, one of them flipping its update's sign x10 (``malicious_fraction``), Bulyan with f = 1 (4f + 3 =
    7: its bound exactly): two rounds, each the float64 Bulyan of the seven replies replayed by hand (the five of least
    Krum score, then per coordinate the mean of the three nearest their median), rounded to float32 once; the attacker
    is never among the five, and plain FedAvg over the same replies is pulled far off."""
    task = tiny_task(num_clients=7, num_samples=420, malicious_fraction=0.15)
    bad = [p for p in range(7) if task.is_malicious(p)]
    assert len(bad) == 1
    models: list = []
    make = lambda: Bulyan(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=7, min_train_nodes=7,  # noqa: E731
                          num_malicious_nodes=1)  # fmt: skip
    res = simulate(make(), task, rounds=2, evaluate=False, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        assert r.num_aggregated == 7 and not r.skipped
        replies = {}
        for p in range(7):
            y = client_model(task, p, rnd, x)[0]
            if p in bad:  # the client's own poisoning: start - scale (trained - start), in float32 as it sends it
                y = {k: (x[k] - task.attack_scale * (y[k] - x[k])).astype(np.float32) for k in y}
            replies[p] = y
        want, chosen = bulyan(replies, f=1)
        assert len(chosen) == 5 and bad[0] not in chosen
        near(models[rnd - 1], want, ulps=2)
        mean = wmean(replies, {p: task.num_train(p) for p in range(7)})
        step = max(np.max(np.abs(want[k] - x[k])) for k in want)  # how far Bulyan moved the model
        assert max(np.max(np.abs(mean[k] - want[k])) for k in want) > step  # FedAvg: pulled further off by the attacker
        x = models[rnd - 1]
    np.testing.assert_array_equal(np_(res.arrays)["fc.bias"], models[-1]["fc.bias"])
