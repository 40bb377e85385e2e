"""Helpers of the round 8 federated scenario tests: a Flower grid whose nodes come and go, and the arithmetic the
tests check runs against, written out here in float64 (softmax regression SGD with FedProx's term, the MLP's forward
pass with batch norm, FedAvg's weighted mean, Flower's flat clipping)."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Error, Message, MessageType
from flwr.common.constant import ErrorCode

from tilestack.federated.engine import InProcessGrid
from tilestack.federated.models import BN_EPS

# what Flower's SuperLink answers for a message whose destination stopped sending heartbeats
NODE_GONE = "Error: Node Unavailable - the destination node failed to report a heartbeat in time."


class ComingAndGoingGrid(InProcessGrid):
    """tilestack's in-process Flower grid whose nodes are not all there all the time, as SuperNodes of a deployment:
    partition ``p`` in ``joins`` connects only from round ``joins[p]`` on (before, Flower's SuperLink answers each
    message to it with a NODE_UNAVAILABLE error reply); ``leaves[p] = (r, back)``: the node trains in round ``r`` but
    disconnects before its reply gets out (the reply is that error), stays away (training and evaluation) until
    round ``back`` and then reconnects, its ``Context`` intact."""

    def __init__(self, client_app, num_nodes: int, *, joins: dict[int, int], leaves: dict[int, tuple[int, int]],
                 **kw):  # fmt: skip
        super().__init__(client_app, num_nodes, **kw)
        self.joins, self.leaves = joins, leaves
        self.trained: dict[int, set[int]] = {}  # round -> partitions whose ClientApp ran a TRAIN message

    def _away(self, pid: int, rnd: int, *, training: bool) -> bool:
        if rnd < self.joins.get(pid, 0):
            return True
        if pid in self.leaves:
            left, back = self.leaves[pid]
            return (left < rnd < back) or (rnd == left and not training)  # gone once its round-`left` work is lost
        return False

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        gone, here = [], []
        for m in messages:
            pid, rnd = self.partitions[m.metadata.dst_node_id], int(m.content["config"]["server-round"])
            (gone if self._away(pid, rnd, training=m.metadata.message_type == MessageType.TRAIN) else here).append(m)
        replies = list(super().send_and_receive(here, timeout=timeout))
        out = []
        sent = {m.metadata.dst_node_id: m for m in here}
        for r in replies:
            pid = self.partitions[r.metadata.src_node_id]
            rnd = int(sent[r.metadata.src_node_id].content["config"]["server-round"])
            if r.metadata.message_type == MessageType.TRAIN:
                self.trained.setdefault(rnd, set()).add(pid)
                if self.leaves.get(pid, (None,))[0] == rnd:  # it trained, then its connection went
                    r = _unavailable(sent[r.metadata.src_node_id])
            out.append(r)
        for i, m in enumerate(gone):
            m.metadata.__dict__["_message_id"] = f"gone{i}-{m.metadata.dst_node_id}"
            out.append(_unavailable(m))
        return out


def _unavailable(msg: Message) -> Message:
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_GONE), reply_to=msg)


def softmax_prox_sgd(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, *, steps: int, batch: int, lr: float,
                     mu: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``steps`` minibatch SGD steps of softmax regression (logits x w + b, w (D, C), b (C,)) on the mean
    cross-entropy plus FedProx's (mu / 2) ||(w, b) - (w0, b0)||^2, in float64. Minibatches walk permutations of the
    examples drawn from ``rng``, a fresh one each epoch (as a tilestack client draws them)."""
    w0, b0 = w.astype(np.float64), b.astype(np.float64)
    w, b = w0.copy(), b0.copy()
    n = len(y)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos >= n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        xb = x[idx].astype(np.float64)
        z = xb @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1.0
        p /= len(idx)  # d(mean cross-entropy)/dz, (B, C)
        gw = xb.T @ p + mu * (w - w0)
        gb = p.sum(axis=0) + mu * (b - b0)
        w, b = w - lr * gw, b - lr * gb
    return w, b


def mlp_bn_logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The MLP with batch norm at evaluation, float64: fc1, normalised by the running statistics (a running variance
    below 0 read as 0), scaled and shifted, relu, fc2. (N, C)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    h = x.astype(np.float64) @ p["fc1.weight"] + p["fc1.bias"]
    h = (h - p["bn.running_mean"]) / np.sqrt(np.maximum(p["bn.running_var"], 0.0) + BN_EPS)
    h = np.maximum(h * p["bn.weight"] + p["bn.bias"], 0.0)
    return h @ p["fc2.weight"] + p["fc2.bias"]


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def flat_clip(update: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """Flower's server-side clipping: every array of the update scaled by min(1, clip / ||update||) (one vector)."""
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    return {k: v.astype(np.float64) * min(1.0, clip / norm) for k, v in update.items()}


def weighted_mean(models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = float(sum(weights[p] for p in models))
    keys = next(iter(models.values())).keys()
    return {k: sum(float(weights[p]) * models[p][k].astype(np.float64) for p in models) / total for k in keys}
