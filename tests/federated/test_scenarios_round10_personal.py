"""Federated scenarios, round 10: personalization with Ditto (a personal model per client beside FedAvg's global one).

What this round added: ``strategies.Ditto``. tilestack offered FedBN / FedPer (local layers) but no personal model
trained beside the global one, the personalization a researcher compares against most; the ClientApp now trains one
when the config carries ``tilestack.ditto-lambda`` (client.DITTO_KEY), keeps it in its node's state, and scores it in
federated evaluation. Checked here against softmax regression's SGD written out in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round9 import keep
from _fl_round10 import logreg_sgd_by_hand
from flwr.serverapp.strategy import FedAvg

from tilestack.errors import FederatedError
from tilestack.federated import ManagedGrid, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import Ditto

LAM = 0.5


def _task() -> Task:
    return Task(dataset="blobs", num_samples=400, num_features=5, num_classes=4, num_clients=6, local_steps=5,
                batch_size=8, lr=0.1, partitioner="dirichlet", partition_alpha=0.1, seed=4)  # fmt: skip


def _accuracy(model: dict, x: np.ndarray, y: np.ndarray) -> float:
    z = x.astype(np.float64) @ model["fc.weight"].astype(np.float64) + model["fc.bias"].astype(np.float64)
    return float(np.mean(z.argmax(axis=1) == y))


@pytest.mark.timeout(60)
def test_ditto_personal_models_follow_their_proximal_sgd_and_beat_the_global_model_under_label_skew():
    """Ditto(lambda 0.5) over 6 clients of Dirichlet(0.1) labels for 3 rounds. The global model is FedAvg's, bit for
    bit (the replies are the global-model updates). Each client's personal model v starts as the global model it first
    gets and then takes its 5 steps a round on its loss + (lambda / 2) ||v - w||^2, w that round's global model:
    replayed in float64 by hand, it is the model the client holds (to float32 rounding), federated evaluation scores
    it (each client's eval-acc is its personal model's accuracy on its own test split), and under this skew the
    personal models score above the global model on the clients' own data."""
    task = _task()
    ditto_models: list[dict] = []
    grid = ManagedGrid(InProcessGrid(tsclient.app, 6), task)
    res = run_rounds(Ditto(lam=LAM, fraction_train=1.0, fraction_evaluate=1.0), grid, initial_arrays(task),
                     num_rounds=3, extra_metrics=keep(ditto_models))  # fmt: skip
    plain = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), ManagedGrid(InProcessGrid(tsclient.app, 6),
                       task), initial_arrays(task), num_rounds=3)  # fmt: skip
    for k, v in np_(plain.arrays).items():
        np.testing.assert_array_equal(np_(res.arrays)[k], v)
    x = np_(initial_arrays(task))
    personal: dict[int, dict] = {}
    data = {p: task.client_data(p) for p in range(6)}
    for rnd, r in enumerate(res.history.rounds, start=1):
        for p in range(6):
            xs, ys, _, _ = data[p]
            rng = np.random.default_rng([task.seed, p, rnd, tsclient.DITTO_SEED])
            personal[p] = logreg_sgd_by_hand(xs, ys, personal.get(p, x), x, steps=task.steps_for(p),
                                             batch=task.batch_size, lr=task.lr, lam=LAM, rng=rng)  # fmt: skip
            assert r.client_eval[str(p)]["eval-acc"] == _accuracy(personal[p], data[p][2], data[p][3])
        x = ditto_models[rnd - 1]
    held = {grid.partition_of[nid]: tsclient._to_numpy(ctx.state[tsclient.DITTO_STATE])
            for nid, ctx in grid.inner.contexts.items()}  # fmt: skip
    for p in range(6):
        for k in x:
            np.testing.assert_allclose(held[p][k], personal[p][k], rtol=1e-4, atol=1e-5, err_msg=f"client {p} {k}")
    last = res.history.rounds[-1]
    own = np.mean([last.client_eval[str(p)]["eval-acc"] for p in range(6)])
    shared = np.mean([plain.history.rounds[-1].client_eval[str(p)]["eval-acc"] for p in range(6)])
    assert own > shared


@pytest.mark.timeout(60)
def test_ditto_personal_models_survive_a_resume_and_bad_lambdas_are_refused(tmp_path):
    """Personal models live in the nodes' state, which the in-process engine's checkpoint keeps: a run stopped after
    round 1 and resumed scores every client as the run never stopped. A negative lambda, and one whose step
    overshoots (lr x lambda >= 2), are refused before any work."""
    task = _task()

    def run(**kw):
        return simulate(Ditto(lam=LAM, fraction_train=0.5, fraction_evaluate=1.0), task, rounds=3, evaluate=False,
                        **kw)  # fmt: skip

    whole = run()
    run(checkpoint=tmp_path / "d.ckpt", stop_after=1)
    resumed = run(checkpoint=tmp_path / "d.ckpt")
    assert [r.client_eval for r in resumed.history.rounds] == [r.client_eval for r in whole.history.rounds]
    with pytest.raises(FederatedError, match=r"Ditto: lam=-1; expected a finite number >= 0"):
        Ditto(lam=-1)
    with pytest.raises(
        ValueError,
        match=r"Ditto: lam=25 with the task's lr=0.1: lr \* lam = 2.5 >= 2 makes every "
        r"personal step overshoot the global model; expected lam < 2 / lr = 20",
    ):
        simulate(Ditto(lam=25, fraction_train=1.0), task, rounds=1)
