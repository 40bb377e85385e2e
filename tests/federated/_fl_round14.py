"""Helpers of the round 14 federated scenario tests: softmax regression written out in float64 (loss, gradient,
Hessian, the minimiser of a weighted sum of client losses by Newton's method), FedAvg / FedProx rounds of full-batch
local gradient descent replayed in numpy, HeteroFL's per-element mean, and the ``.npy`` size of an array."""

from __future__ import annotations

import io

import numpy as np


def softmax_loss_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None):
    """Weighted mean cross-entropy of logits x W + b (float64) and its gradient (dW (D, C), db (C,)); ``weight`` (N,)
    per example (uniform: the mean)."""
    x = x.astype(np.float64)
    n, c = len(y), w.shape[1]
    weight = np.full(n, 1.0 / n) if weight is None else weight
    z = x @ w + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(c)[y]
    loss = float(-(weight * np.log(p[np.arange(n), y])).sum())
    dz = (p - onehot) * weight[:, None]
    return loss, x.T @ dz, dz.sum(axis=0)


def minimiser(xs: list[np.ndarray], ys: list[np.ndarray], client_weights: list[float], classes: int):
    """argmin over (W, b) of sum_i client_weights[i] * (mean cross-entropy of client i), float64, by Newton's method on
    the last class's logit fixed at 0, returned in the representative whose columns sum to zero over the classes (the
    one gradient descent from zero stays in: every gradient's class-sum is zero). Also returns the final gradient's
    norm."""
    x = np.concatenate([a.astype(np.float64) for a in xs])
    y = np.concatenate(ys)
    total = float(sum(client_weights))
    weight = np.concatenate([np.full(len(b), wi / total / len(b)) for wi, b in zip(client_weights, ys, strict=True)])
    d, k = x.shape[1], classes - 1
    xt = np.hstack([x, np.ones((len(x), 1))])  # (N, D + 1)
    theta = np.zeros((d + 1, k))
    for _ in range(100):
        z = np.hstack([xt @ theta, np.zeros((len(x), 1))])
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        r = (p - np.eye(classes)[y])[:, :k] * weight[:, None]  # (N, K)
        g = (xt.T @ r).ravel(order="F")  # column k's block after column k-1's
        pk = p[:, :k]
        hess = np.zeros(((d + 1) * k, (d + 1) * k))
        for a in range(k):
            for c in range(k):
                s = weight * pk[:, a] * ((a == c) - pk[:, c])
                hess[a * (d + 1) : (a + 1) * (d + 1), c * (d + 1) : (c + 1) * (d + 1)] = xt.T @ (xt * s[:, None])
        step = np.linalg.solve(hess, g)
        theta -= step.reshape(d + 1, k, order="F")
        if np.abs(step).max() < 1e-15:
            break
    full = np.hstack([theta, np.zeros((d + 1, 1))])
    full -= full.mean(axis=1, keepdims=True)
    w, b = full[:d], full[d]
    _, gw, gb = softmax_loss_grad(w, b, x, y, weight)
    return w, b, float(np.sqrt((gw**2).sum() + (gb**2).sum()))


def local_gd(w, b, x, y, *, steps: int, lr: float, mu: float = 0.0):
    """``steps`` full-batch gradient steps on the client's mean cross-entropy plus (mu / 2) ||(W, b) - start||^2."""
    w0, b0 = w.copy(), b.copy()
    for _ in range(steps):
        _, gw, gb = softmax_loss_grad(w, b, x, y)
        w = w - lr * (gw + mu * (w - w0))
        b = b - lr * (gb + mu * (b - b0))
    return w, b


def fedavg_rounds(xs, ys, *, rounds: int, steps: int, lr: float, mu: float = 0.0, classes: int):
    """``rounds`` rounds of FedAvg (FedProx with ``mu``) over every client from zero, each client taking ``steps``
    full-batch steps, the models averaged by training examples; float64. Returns (W, b)."""
    d = xs[0].shape[1]
    w, b = np.zeros((d, classes)), np.zeros(classes)
    n = np.array([len(a) for a in ys], np.float64)
    for _ in range(rounds):
        outs = [local_gd(w, b, x, y, steps=steps, lr=lr, mu=mu) for x, y in zip(xs, ys, strict=True)]
        w = sum(ni * o[0] for ni, o in zip(n, outs, strict=True)) / n.sum()
        b = sum(ni * o[1] for ni, o in zip(n, outs, strict=True)) / n.sum()
    return w, b


def npy_bytes(a: np.ndarray) -> int:
    """Bytes of ``a`` written as ``.npy`` (what a Flower ``Array`` of it carries)."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return len(buf.getvalue())


def heterofl_mean(x: dict[str, np.ndarray], models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]):
    """HeteroFL's aggregate written out: each element of the global model ``x`` the weighted mean of the clients whose
    (narrower, leading-slice) model holds it, else its old value; float64."""
    out = {}
    for k, v in x.items():
        total, weight = np.zeros(v.shape), np.zeros(v.shape)
        for p, m in models.items():
            region = tuple(slice(0, s) for s in m[k].shape)
            total[region] += weights[p] * m[k].astype(np.float64)
            weight[region] += weights[p]
        out[k] = np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), v.astype(np.float64))
    return out
