"""Helpers of the round 10 federated scenario tests: messages re-configured per client, SCAFFOLD's client written out,
one SGD step of logistic regression from zero in closed form, and a file dataset."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from tilestack.federated import Task
from tilestack.federated.models import local_sgd


def with_config(msg: Message, **entries) -> Message:
    """``msg`` with ``entries`` added to its round config (a strategy's per-client or per-round settings)."""
    cfg = ConfigRecord(dict(msg.content["config"]) | entries)
    return Message(RecordDict({**msg.content, "config": cfg}), msg.metadata.dst_node_id, msg.metadata.message_type,
                   group_id=msg.metadata.group_id)  # fmt: skip


def scaffold_client(task: Task, pid: int, rnd: int, x: dict, c: dict, ci: dict) -> tuple[dict, dict, int]:
    """SCAFFOLD's client (option II) from the global model ``x``, the server's variate ``c`` and its own ``ci`` (all
    float32, as the client holds them): local SGD on the gradient corrected by c - c_i (tilestack's seeded
    minibatches), then c_i+ = c_i - c + (x - y) / (K lr). Returns (y, c_i+, K)."""
    xs, ys, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    y, steps, _ = local_sgd(task.build_model(), x, xs, ys, steps=task.steps_for(pid), batch_size=task.batch_size,
                            lr=task.lr, rng=rng, correction={k: c[k] - ci[k] for k in c})  # fmt: skip
    ci_new = {k: ci[k] - c[k] + (x[k] - y[k]) / np.float32(steps * task.lr) for k in c}
    return y, ci_new, steps


def logreg_one_step_from_zero(x: np.ndarray, y: np.ndarray, classes: int, lr: float) -> dict[str, np.ndarray]:
    """Softmax regression after one SGD step on the batch (x, y) from all-zero weights, in closed form (float64):
    at zero every class has probability 1/C, so the gradient of the mean cross-entropy is x^T (1/C - onehot(y)) / B
    for the weight and the column mean of (1/C - onehot(y)) for the bias."""
    b = len(y)
    dz = np.full((b, classes), 1.0 / classes)  # (B, C)
    dz[np.arange(b), y] -= 1.0
    dz /= b
    return {"fc.weight": -lr * (x.astype(np.float64).T @ dz), "fc.bias": -lr * dz.sum(axis=0)}


def dp_epsilon_by_hand(noise: float, releases: int, delta: float, orders) -> tuple[float, float]:
    """Two numbers bracketing the epsilon of ``releases`` Gaussian mechanisms of noise multiplier ``noise`` (no
    sampling), each of Renyi DP alpha / (2 sigma^2) at order alpha: the classic conversion
    min_a R a / (2 s^2) + log(1/delta) / (a - 1) (an upper bound), and the same less log(a) / (a - 1) - log1p(-1/a)
    (the tighter conversion accountants use, Canonne et al. 2020, a lower bound of the first)."""
    classic, tight = math.inf, math.inf
    for a in orders:
        rdp = releases * a / (2 * noise**2)
        classic = min(classic, rdp + math.log(1 / delta) / (a - 1))
        tight = min(tight, rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return tight, classic


def save_npz(path, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(path, x=x, y=y)
    return str(path)


def logreg_sgd_by_hand(x, y, start: dict, anchor: dict, *, steps: int, batch: int, lr: float, lam: float,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:  # fmt: skip
    """Softmax regression by minibatch SGD in float64, batches walking a fresh permutation each epoch (as tilestack's
    clients draw them from ``rng``): the gradient of the batch's mean cross-entropy, x^T (p - onehot(y)) / B, plus
    lam (w - anchor) (Ditto's pull of the personal model towards the global one)."""
    w = {k: v.astype(np.float64) for k, v in start.items()}
    n = len(y)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos >= n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        xb = x[idx].astype(np.float64)  # (B, D)
        z = xb @ w["fc.weight"] + w["fc.bias"]  # (B, C)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1.0
        p /= len(idx)
        grads = {"fc.weight": xb.T @ p, "fc.bias": p.sum(axis=0)}
        for k in w:
            w[k] = w[k] - lr * (grads[k] + lam * (w[k] - anchor[k].astype(np.float64)))
    return w
