"""Helpers of the round 17 federated scenario tests: scripted clients that send their arrays in an order of their own,
and Flower's position-pairing rules (FedAvgM, server-side fixed clipping, q-FedAvg) written out in float64 by name."""

from __future__ import annotations

import math

import numpy as np
from _fl_round5 import update

from tilestack.federated import Task


def tiny_task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=200, num_features=3, num_classes=3, num_clients=5, local_steps=2, lr=0.1)
    return Task(**(base | kw))


def client_models(x: dict[str, np.ndarray], rnd: int, pids) -> dict[int, dict[str, np.ndarray]]:
    """What the scripted clients of ``ordered_script`` send in round ``rnd`` from the global model ``x``."""
    return {p: {k: (x[k] + update(p, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x} for p in pids}


def ordered_script(reorder: bool, loss=lambda pid: 0.5 + pid):
    """A scripted client: the model it was sent plus a fixed update (``client_models``), weighted pid + 1, reporting
    ``train-loss`` ``loss(pid)``; with ``reorder`` the even partitions (0 first) send the arrays in the reverse of the
    order they were sent (fc.bias before fc.weight)."""

    def script(pid, rnd, got, context, config):
        x = got["arrays"]
        model = client_models(x, rnd, [pid])[pid]
        keys = list(x)[::-1] if reorder and pid % 2 == 0 else list(x)
        return {k: model[k] for k in keys}, {"num-examples": pid + 1, "train-loss": float(loss(pid))}

    return script


def wmean(models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = float(sum(weights[p] for p in models))
    keys = next(iter(models.values())).keys()
    return {k: sum(float(weights[p]) * models[p][k].astype(np.float64) for p in models) / total for k in keys}


def fedavgm(x: dict[str, np.ndarray], models, weights, momentum: dict | None, *, lr: float, beta: float):
    """One round of FedAvgM by name: m = beta m + (x - mean) (m = x - mean in the first round), x - lr m; and m."""
    mean = wmean(models, weights)
    grad = {k: x[k].astype(np.float64) - mean[k] for k in x}
    m = grad if momentum is None else {k: beta * momentum[k] + grad[k] for k in x}
    return {k: x[k].astype(np.float64) - lr * m[k] for k in x}, m


def clipped_mean(x: dict[str, np.ndarray], models, weights, clip: float) -> dict[str, np.ndarray]:
    """Server-side fixed clipping without noise: x + the weighted mean of each update scaled by min(1, C / ||u||)."""
    clipped = {}
    for p, y in models.items():
        u = {k: y[k].astype(np.float64) - x[k].astype(np.float64) for k in x}
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in u.values()))
        clipped[p] = {k: x[k].astype(np.float64) + u[k] * min(1.0, clip / norm) for k in x}
    return wmean(clipped, weights)


def qfedavg(x: dict[str, np.ndarray], models, losses: dict[int, float], *, q: float, client_lr: float):
    """q-FedAvg (Li et al. 2020) as Flower writes it: L = 1 / client_lr, g_k = L (x - w_k), delta_k = F_k^q g_k,
    h_k = q F_k^(q-1) ||g_k||^2 + L F_k^q; x - sum delta / sum h (F_k + 1e-10 as Flower)."""
    big_l = 1.0 / client_lr
    deltas, h = [], 0.0
    for p, w in models.items():
        g = {k: big_l * (x[k].astype(np.float64) - w[k].astype(np.float64)) for k in x}
        f = losses[p] + 1e-10
        deltas.append({k: f**q * v for k, v in g.items()})
        h += q * f ** (q - 1) * sum(float(np.sum(v**2)) for v in g.values()) + big_l * f**q
    return {k: x[k].astype(np.float64) - sum(d[k] for d in deltas) / h for k in x}
