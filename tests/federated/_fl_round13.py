"""Helpers of the round 13 federated scenario tests: Flower's server optimisers (FedAvgM, FedAdam, FedYogi) and Bulyan
written out in float64 from their papers' rules, the clients' rounds replayed by hand, and a tiny task."""

from __future__ import annotations

import numpy as np
from _fl_round7 import client_model, weighted_mean

from tilestack.federated import Task


def tiny_task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=3,
                batch_size=8, lr=0.2, partitioner="dirichlet", partition_alpha=0.5)  # fmt: skip
    return Task(**(base | kw))


def fedavg_round(task: Task, rnd: int, x: dict[str, np.ndarray], pids) -> dict[str, np.ndarray]:
    """The float64 mean of what clients ``pids`` send in round ``rnd`` from the float32 model ``x``, weighted by their
    training examples (tilestack's clients replayed: the same seeded minibatches)."""
    models = {p: client_model(task, p, rnd, x)[0] for p in pids}
    return weighted_mean(models, {p: task.num_train(p) for p in pids})


def f32(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in model.items()}


class ServerOpt:
    """One server optimiser's state and step, float64: the pseudo-gradient is the mean of the replies less the model
    the strategy holds (``x``), as Reddi et al. 2021 (FedAdam, FedYogi) and Hsu et al. 2019 (FedAvgM) write it."""

    def __init__(self, kind: str, *, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, lr=1.0, momentum=0.0):
        self.kind, self.eta, self.b1, self.b2, self.tau = kind, eta, beta_1, beta_2, tau
        self.lr, self.momentum = lr, momentum
        self.m: dict | None = None
        self.v: dict | None = None

    def step(self, rnd: int, x: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = {k: v.astype(np.float64) for k, v in x.items()}
        delta = {k: mean[k] - x[k] for k in x}  # (the negative of a gradient)
        if self.kind == "fedavgm":  # SGD with heavy-ball momentum on -delta, the buffer starting at the first step
            grad = {k: -d for k, d in delta.items()}
            self.m = grad if self.m is None else {k: self.momentum * self.m[k] + grad[k] for k in x}
            return {k: x[k] - self.lr * self.m[k] for k in x}
        m0 = self.m or {k: np.zeros_like(v) for k, v in x.items()}
        v0 = self.v or {k: np.zeros_like(v) for k, v in x.items()}
        self.m = {k: self.b1 * m0[k] + (1 - self.b1) * delta[k] for k in x}
        if self.kind == "fedadam":
            self.v = {k: self.b2 * v0[k] + (1 - self.b2) * delta[k] ** 2 for k in x}
            # Adam's bias correction of the step size, at step rnd + 1 as Flower counts it
            eta = self.eta * np.sqrt(1 - self.b2 ** (rnd + 1)) / (1 - self.b1 ** (rnd + 1))
        else:  # fedyogi: v moves towards delta^2 by (1 - beta_2) delta^2, never past it
            self.v = {k: v0[k] - (1 - self.b2) * delta[k] ** 2 * np.sign(v0[k] - delta[k] ** 2) for k in x}
            eta = self.eta
        return {k: x[k] + eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau) for k in x}


def flat(model: dict[str, np.ndarray], keys) -> np.ndarray:
    return np.concatenate([model[k].astype(np.float64).ravel() for k in keys])


def bulyan(models: dict[int, dict[str, np.ndarray]], f: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Bulyan (El Mhamdi et al. 2018) as Flower runs it: of n replies, the theta = n - 2f with the least Krum scores
    (the sum of squared distances to the n - f - 2 nearest others), then per coordinate the mean of the beta = theta -
    2f selected values nearest to their median. Returns the float64 model and the selected partition ids."""
    pids = sorted(models)
    keys = list(models[pids[0]])
    vec = {p: flat(models[p], keys) for p in pids}
    n = len(pids)
    score = {}
    for p in pids:
        d = sorted(float(np.sum((vec[p] - vec[q]) ** 2)) for q in pids if q != p)
        score[p] = sum(d[: max(1, n - f - 2)])
    theta = n - 2 * f
    chosen = sorted(sorted(pids, key=score.__getitem__)[:theta])
    beta = theta - 2 * f
    out = {}
    for k in keys:
        stack = np.stack([models[p][k].astype(np.float64) for p in chosen])  # (theta, ...)
        med = np.median(stack, axis=0)
        order = np.argsort(np.abs(stack - med), axis=0, kind="stable")[:beta]
        out[k] = np.take_along_axis(stack, order, axis=0).mean(axis=0)
    return out, chosen
