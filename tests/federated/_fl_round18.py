"""Helpers of the round 18 federated scenario tests: the system model's documented arithmetic for a handful of clients,
SecAgg+'s clients replayed, and tilestack's MLP with batch norm scored in float64."""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task
from tilestack.federated.models import local_sgd

EVERYONE = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1,
                min_evaluate_nodes=1)  # fmt: skip


def fedavg(**kw) -> FedAvg:
    return FedAvg(**(EVERYONE | kw))


def npy_bytes(params: dict[str, np.ndarray]) -> int:
    """Bytes of a model's arrays written as ``.npy`` (what Flower ``Array`` payloads carry)."""
    total = 0
    for a in params.values():
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        total += len(buf.getvalue())
    return total


def draws(seed: int, rnd: int, pid: int, dropout: float, straggler_fraction: float, epochs: int):
    """``SystemModel.plan``'s documented draws for (seed, round, client): ('dropout', 0) or ('straggler', k / E) or
    ('', 1.0)."""
    rng = np.random.default_rng([seed, rnd, pid, 23])
    if dropout and rng.random() < dropout:
        return "dropout", 0.0
    if straggler_fraction and rng.random() < straggler_fraction:
        return "straggler", int(rng.integers(1, epochs)) / epochs
    return "", 1.0


def deadline_plan(deadline: float, model_bytes: int, bandwidth: float, speed: float, full: int):
    """(reason, share, steps) of a client under a round deadline: its reply as large as the model, the share of its
    ``full`` steps that fits after both transfers, 'timeout' under one step, ceil(share x full) steps."""
    share = (deadline - 2 * model_bytes / bandwidth) * speed / full
    if share * full < 1:
        return "timeout", 0.0, 0
    if share < 1:
        return "deadline", share, math.ceil(share * full)
    return "", 1.0, full


def secure_update(task: Task, pid: int, rnd: int, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a SecAgg+ client of ``secagg.py`` sends in round ``rnd`` from ``x``: its trained model minus ``x``, from
    its own seeded minibatches (rng (seed, pid, round, 41))."""
    xs, ys, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, rnd, 41])
    y, _, _ = local_sgd(task.build_model(), x, xs, ys, steps=task.steps_for(pid), batch_size=task.batch_size,
                        lr=task.lr, rng=rng)  # fmt: skip
    return {k: (y[k] - x[k]).astype(np.float64) for k in x}


def bn_mlp_scores(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of tilestack's MLP with batch norm in evaluation mode (running statistics,
    eps 1e-5), in float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    h = x.astype(np.float64) @ p["fc1.weight"] + p["fc1.bias"]
    h = (h - p["bn.running_mean"]) / np.sqrt(np.maximum(p["bn.running_var"], 0) + 1e-5) * p["bn.weight"] + p["bn.bias"]
    logits = np.maximum(h, 0) @ p["fc2.weight"] + p["fc2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())
