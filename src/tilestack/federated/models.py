"""Small numpy models with hand-written gradients, and the local SGD every client runs.

    from tilestack.federated.models import SoftmaxRegression, MLP, local_sgd, evaluate
    model = MLP(num_features=60, hidden=32, num_classes=10, norm=True)
    params = model.init(np.random.default_rng(0))              # {"fc1.weight": (60, 32), ...}
    params, steps, loss = local_sgd(model, params, x, y, steps=20, batch_size=10, lr=0.05, rng=rng)
    loss, acc = evaluate(model, params, x_test, y_test)

Parameters are a ``dict[str, np.ndarray]`` (float32; a float64 model trains in float64, see ``train_dtype``),
the same names a Flower ``ArrayRecord`` carries.
Numpy, not torch: the federated models are tiny, so per-step framework overhead would dominate, and the
clients of a 10,000-client simulation must cost microseconds. Keys starting with ``bn.`` belong to the
normalisation layer (FedBN keeps them local); ``bn.running_*`` are statistics, not trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Params = dict[str, np.ndarray]
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # running = (1 - m) * running + m * batch
NORM_PREFIX = "bn."
# lr * mu at which the explicit step on a proximal term (mu / 2) ||w - w_t||^2 (FedProx, Ditto) stops contracting:
# w - w_t is multiplied by 1 - lr * mu each step, which is <= -1 from here on
PROXIMAL_STEP_LIMIT = 2.0


def _softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient w.r.t. the logits. logits (B, C), overwritten; y (B,) labels or
    (B, C) soft targets (distillation: the gradient is then (p - y) / B, that of KL(y || p))."""
    p = logits
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)  # (B, C) softmax
    b = len(y)
    if y.ndim == 2:
        loss = float(-(y * np.log(p + 1e-12)).sum()) / b
        p -= y
        p /= b
        return loss, p
    rows = np.arange(b)
    loss = float(-np.log(p[rows, y] + 1e-12).sum()) / b
    if loss < 0:  # at least 0, as a cross-entropy is: -log(p + 1e-12) is -1e-12 where a float64 model gives p = 1
        loss = 0.0  # exactly, and a negative loss is refused where q-FedAvg reads it (grid.check_reply); NaN stays NaN
    p[rows, y] -= 1.0
    p /= b
    return loss, p


class SoftmaxRegression:
    """Multinomial logistic regression, logits = x W + b; zero init as in the FedProx paper."""

    def __init__(self, num_features: int, num_classes: int):
        self.num_features, self.num_classes = num_features, num_classes

    def init(self, rng: np.random.Generator) -> Params:
        return {
            "fc.weight": np.zeros((self.num_features, self.num_classes), np.float32),  # (D, C)
            "fc.bias": np.zeros(self.num_classes, np.float32),
        }

    def logits(self, params: Mapping[str, np.ndarray], x: np.ndarray, train: bool = False) -> np.ndarray:
        return x @ params["fc.weight"] + params["fc.bias"]

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        loss, dz = _softmax_xent(self.logits(params, x), y)  # dz (B, C)
        return loss, {"fc.weight": x.T @ dz, "fc.bias": dz.sum(axis=0)}


class MLP:
    """x -> fc1 -> [batch norm] -> relu -> fc2. ``width`` in (0, 1] keeps the first hidden units (HeteroFL)."""

    def __init__(self, num_features: int, hidden: int, num_classes: int, norm: bool = False):
        self.num_features, self.hidden, self.num_classes, self.norm = num_features, hidden, num_classes, norm

    def init(self, rng: np.random.Generator) -> Params:
        d, h, c = self.num_features, self.hidden, self.num_classes
        p = {
            "fc1.weight": (rng.normal(0, 1, (d, h)) * np.sqrt(2.0 / d)).astype(np.float32),  # He init
            "fc1.bias": np.zeros(h, np.float32),
        }
        if self.norm:
            p |= {
                "bn.weight": np.ones(h, np.float32),
                "bn.bias": np.zeros(h, np.float32),
                "bn.running_mean": np.zeros(h, np.float32),
                "bn.running_var": np.ones(h, np.float32),
            }
        p |= {
            "fc2.weight": (rng.normal(0, 1, (h, c)) * np.sqrt(1.0 / h)).astype(np.float32),
            "fc2.bias": np.zeros(c, np.float32),
        }
        return p

    def _forward(self, params: Mapping[str, np.ndarray], x: np.ndarray, train: bool):
        h = x @ params["fc1.weight"] + params["fc1.bias"]  # (B, H)
        cache: dict[str, np.ndarray] = {"x": x}
        if self.norm:
            if train:
                mean, var = h.mean(axis=0), h.var(axis=0)
                cache["batch_mean"], cache["batch_var"] = mean, var
            else:  # a running variance below 0 is no variance: DP noise on the aggregate (or a lossy update) made
                # it so, and its square root made every logit NaN; it is read as 0 (BN_EPS keeps the scale finite)
                mean, var = params["bn.running_mean"], np.maximum(params["bn.running_var"], 0)
            inv = 1.0 / np.sqrt(var + BN_EPS)
            hn = (h - mean) * inv  # (B, H)
            cache["hn"], cache["inv"] = hn, inv
            h = hn * params["bn.weight"] + params["bn.bias"]
        r = np.maximum(h, 0.0)
        cache["r"] = r
        return r @ params["fc2.weight"] + params["fc2.bias"], cache

    def logits(self, params: Mapping[str, np.ndarray], x: np.ndarray, train: bool = False) -> np.ndarray:
        return self._forward(params, x, train)[0]

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        z, cache = self._forward(params, x, train=True)
        loss, dz = _softmax_xent(z, y)  # (B, C)
        r = cache["r"]
        grads: Params = {"fc2.weight": r.T @ dz, "fc2.bias": dz.sum(axis=0)}
        dh = (dz @ params["fc2.weight"].T) * (r > 0)  # (B, H), through the relu
        if self.norm:
            hn, inv = cache["hn"], cache["inv"]
            grads["bn.weight"] = (dh * hn).sum(axis=0)
            grads["bn.bias"] = dh.sum(axis=0)
            dhn = dh * params["bn.weight"]
            b = len(x)
            dh = inv / b * (b * dhn - dhn.sum(axis=0) - hn * (dhn * hn).sum(axis=0))  # batch-norm backward
            grads["bn.running_mean"] = np.zeros_like(params["bn.running_mean"])
            grads["bn.running_var"] = np.zeros_like(params["bn.running_var"])
            m = BN_MOMENTUM  # running statistics are updated in place of a gradient step
            for stat, batch in (("bn.running_mean", cache["batch_mean"]), ("bn.running_var", cache["batch_var"])):
                params[stat] = ((1 - m) * params[stat] + m * batch).astype(params[stat].dtype)
        grads["fc1.weight"] = cache["x"].T @ dh
        grads["fc1.bias"] = dh.sum(axis=0)
        return loss, grads


Model = SoftmaxRegression | MLP


def train_dtype(array: np.ndarray) -> np.dtype:
    """The dtype local SGD runs in for a parameter of ``array``'s dtype: float64 for float64 (a float64 model must
    not lose its low bits in every client), float32 otherwise (float16 steps would round most updates away)."""
    return np.dtype(np.float64) if np.asarray(array).dtype == np.float64 else np.dtype(np.float32)


def is_statistic(key: str) -> bool:
    """Arrays updated by the forward pass, not by gradients (batch-norm running statistics)."""
    return key.startswith(NORM_PREFIX + "running_")


def local_sgd(
    model: Model,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
    prox_mu: float = 0.0,
    correction: Mapping[str, np.ndarray] | None = None,
    anchor: Mapping[str, np.ndarray] | None = None,
) -> tuple[Params, int, float]:
    """``steps`` minibatch SGD steps from ``params``; returns (new params, steps done, mean loss).

    Minibatches walk a fresh permutation of the data (epochs), so ``steps = epochs * ceil(n / batch)``.
    ``prox_mu`` adds FedProx's (mu / 2) ||w - w_anchor||^2, the anchor being ``params`` unless ``anchor`` is given
    (Ditto: a personal model pulled towards the global one); ``correction`` is added to every gradient
    (SCAFFOLD's c - c_i). With no examples there is nothing to step on: ``params`` come back after 0 steps.
    """
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"local_sgd: steps={steps}, batch_size={batch_size}, lr={lr}; expected >= 0, >= 1, > 0")
    if len(y) == 0:
        return {k: np.array(v, train_dtype(v)) for k, v in params.items()}, 0, float("nan")
    if hasattr(model, "local_sgd"):  # a PyTorch model (torch_models.TorchModel) trains itself
        return model.local_sgd(params, x, y, steps=steps, batch_size=batch_size, lr=lr, rng=rng, prox_mu=prox_mu,
                               correction=correction, anchor=anchor)  # fmt: skip
    w = {k: np.array(v, train_dtype(v)) for k, v in params.items()}
    start = {k: np.asarray(anchor[k] if anchor is not None else v, w[k].dtype) for k, v in params.items()}
    trained = [k for k in w if not is_statistic(k)]
    n = len(y)
    order = rng.permutation(n)
    pos, total = 0, 0.0
    for _ in range(steps):
        if pos >= n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss, g = model.loss_and_grads(w, x[idx], y[idx])
        total += loss
        for k in trained:
            gk = g[k]  # a fresh array: safe to scale in place
            if prox_mu:
                gk += prox_mu * (w[k] - start[k])
            if correction is not None:
                gk += correction[k]
            gk *= lr
            w[k] -= gk  # in place: w[k] keeps its dtype
    return w, steps, total / steps if steps else float("nan")


def evaluate(model: Model, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``params`` on ``(x, y)``; both NaN on no examples."""
    if len(y) == 0:
        return float("nan"), float("nan")
    z = model.logits(params, x, train=False)
    acc = float((z.argmax(axis=1) == y).mean())
    loss, _ = _softmax_xent(z, y)
    return loss, acc
