"""Helpers of the round 12 federated scenario tests: centralized training written out in float64 (softmax regression by
full-batch gradient descent, tilestack's CNN by torch.nn.functional), a dataset whose classes split into disjoint
clients, and a FedAvg that gives each client its own learning rate."""

from __future__ import annotations

import numpy as np
from _fl_round10 import save_npz, with_config
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task


def disjoint_label_task(tmp_path, classes: int = 4, per_class: int = 25, **kw) -> Task:
    """``classes`` clients, each holding every example of one class and none of any other (pathological non-IID): a
    user's file of ``per_class`` examples of each class, cut by ``partitioner='shards'`` into one label-sorted shard
    per client (equal classes: each shard is exactly one class)."""
    rng = np.random.default_rng(0)
    features = 3
    means = rng.normal(0, 2.0, (classes, features))  # (C, D)
    y = np.repeat(np.arange(classes), per_class)  # (N,)
    x = (means[y] + rng.normal(0, 1, (len(y), features))).astype(np.float32)  # (N, D)
    path = save_npz(tmp_path / "disjoint.npz", x, y)
    return Task(**{**dict(dataset="file", data_path=path, num_clients=classes, partitioner="shards",
                          classes_per_client=1), **kw})  # fmt: skip


def softmax_gd(x: np.ndarray, y: np.ndarray, start: dict, *, steps: int, lr: float) -> dict[str, np.ndarray]:
    """Softmax regression by full-batch gradient descent on (x, y) in float64: each step moves by lr times the gradient
    of the mean cross-entropy over all examples, x^T (p - onehot(y)) / N and its column sum."""
    w = {k: v.astype(np.float64) for k, v in start.items()}
    xs = x.astype(np.float64)  # (N, D)
    for _ in range(steps):
        z = xs @ w["fc.weight"] + w["fc.bias"]  # (N, C)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        w = {"fc.weight": w["fc.weight"] - lr * (xs.T @ p), "fc.bias": w["fc.bias"] - lr * p.sum(axis=0)}
    return w


def softmax_scores(params: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of softmax regression on (x, y), float64."""
    z = x.astype(np.float64) @ params["fc.weight"].astype(np.float64) + params["fc.bias"].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # (N, C)
    return float(-logp[np.arange(len(y)), y].mean()), float(np.mean(np.argmax(z, axis=1) == y))


def cnn_sgd_float64(params: dict, x: np.ndarray, y: np.ndarray, *, steps: int, batch: int, lr: float,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:  # fmt: skip
    """tilestack's CNN (conv3x3(16) relu, conv3x3(32) relu, maxpool 2, linear relu, linear) trained by minibatch SGD in
    float64 with torch.nn.functional and autograd, batches walking a fresh permutation each epoch drawn from ``rng``
    (as tilestack's clients draw them)."""
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in params.items()}
    side = int(round(x.shape[1] ** 0.5))
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.long)

    def logits(xb):
        h = xb.view(-1, 1, side, side)  # (B, 1, S, S)
        h = F.relu(F.conv2d(h, p["conv1.weight"], p["conv1.bias"], padding=1))
        h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)), 2)
        h = F.relu(F.linear(h.flatten(1), p["fc1.weight"], p["fc1.bias"]))
        return F.linear(h, p["fc2.weight"], p["fc2.bias"])  # (B, C)

    n = len(y)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos >= n:
            order, pos = rng.permutation(n), 0
        idx = torch.as_tensor(order[pos : pos + batch])
        pos += batch
        loss = F.cross_entropy(logits(xt[idx]), yt[idx])
        grads = torch.autograd.grad(loss, list(p.values()))
        with torch.no_grad():
            for t, g in zip(p.values(), grads, strict=True):
                t -= lr * g
    return {k: v.detach().numpy() for k, v in p.items()}


class OwnLearningRates(FedAvg):
    """FedAvg that sends client ``pid`` the learning rate ``rates[pid]`` in its round config (a researcher's per-client
    hyperparameters; tilestack's clients read ``lr`` there)."""

    def __init__(self, rates: dict[int, float], **kw):
        super().__init__(**kw)
        self.rates = dict(rates)

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        return [with_config(m, lr=self.rates[grid.partition_of[m.metadata.dst_node_id]]) for m in messages]
