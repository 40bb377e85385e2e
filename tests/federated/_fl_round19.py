"""Helpers of the round 19 federated scenario tests: Flower's server rules written out in float64 over replies the
clients' scripts fix, tilestack's ClientApp wrapped so that one client fails after its local training, and the local
SGD of a client given its own number of steps replayed by hand."""

from __future__ import annotations

import numpy as np
from _fl_round16 import ServerOptimizer
from _fl_round17 import fedavgm, wmean
from flwr.app import Message
from flwr.clientapp import ClientApp

from tilestack.federated import Task
from tilestack.federated import client as tsclient
from tilestack.federated.models import local_sgd

WEIGHTS = {0: 1, 1: 3, 2: 6, 3: 2, 4: 8}  # the scripted clients' num-examples


class Rule:
    """One of Flower's server rules over a sequence of rounds, float64: ``step(x, models)`` is the next global model
    from the float32 model ``x`` and the clients' float32 models (weights ``WEIGHTS``); state (moments) is chained."""

    def __init__(self, name: str):
        self.name = name
        kinds = {"fedadam": "adam", "fedyogi": "yogi"}
        self.opt = ServerOptimizer(kinds[name], eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3) if name in kinds else None
        self.momentum = None
        self.v: dict[str, np.ndarray] = {}

    def step(self, x: dict[str, np.ndarray], models: dict[int, dict[str, np.ndarray]], rnd: int) -> dict:
        mean = wmean(models, WEIGHTS)
        if self.name in ("fedavg", "fedprox"):
            return mean
        if self.opt is not None:
            return self.opt.step(x, mean, rnd)
        if self.name == "fedadagrad":  # beta_1 = 0: m = delta; v += delta^2; x + eta m / (sqrt(v) + tau)
            out = {}
            for k in x:
                d = mean[k] - x[k].astype(np.float64)
                self.v[k] = self.v.get(k, 0.0) + d**2
                out[k] = x[k].astype(np.float64) + 0.1 * d / (np.sqrt(self.v[k]) + 1e-3)
            return out
        if self.name == "fedavgm":
            out, self.momentum = fedavgm(x, models, WEIGHTS, self.momentum, lr=0.7, beta=0.5)
            return out
        stack = {k: np.stack([models[p][k].astype(np.float64) for p in sorted(models)]) for k in x}
        if self.name == "fedmedian":  # the element-wise median, weights ignored
            return {k: np.median(v, axis=0) for k, v in stack.items()}
        assert self.name == "fedtrimmedavg"  # beta 0.2 of 5: the lowest and highest value of each entry cut
        return {k: np.sort(v, axis=0)[1:-1].mean(axis=0) for k, v in stack.items()}


def failing_app(fail_at: set[tuple[int, int]]) -> ClientApp:
    """tilestack's ClientApp, except that client ``pid`` raises in round ``rnd`` for each (pid, rnd) in ``fail_at``
    after its local training has run (and changed its ``Context.state``): a client lost mid-round."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        reply = tsclient.app(msg, context)
        key = (int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"]))
        if key in fail_at:
            raise ConnectionError(f"client {key[0]} lost its connection after training in round {key[1]}")
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    @app.query()
    def query(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    return app


def replay(task: Task, pid: int, rnd: int, start: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """tilestack's client ``pid`` in round ``rnd`` from ``start`` doing ``steps`` SGD steps of the task's batch and lr,
    on its seeded minibatches (rng (seed, pid, round, 13)); float32 as it replies."""
    x, y, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    trained, done, _ = local_sgd(task.build_model(), start, x, y, steps=steps, batch_size=task.batch_size, lr=task.lr,
                                 rng=rng)  # fmt: skip
    assert done == steps
    return {k: v.astype(np.float32) for k, v in trained.items()}


def clip_update(x: dict[str, np.ndarray], y: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """``y`` with its update ``y - x`` scaled by min(1, clip / ||y - x||) (the norm over every array), float64."""
    u = {k: y[k].astype(np.float64) - x[k].astype(np.float64) for k in x}
    norm = float(np.sqrt(sum(float(np.sum(v**2)) for v in u.values())))
    scale = min(1.0, clip / norm)
    return {k: x[k].astype(np.float64) + u[k] * scale for k in x}
