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
