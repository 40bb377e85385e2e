"""Helpers of the round 16 federated scenario tests: Flower's server optimisers (FedAdam with its bias correction,
FedYogi) and FedNova written out in float64, 8-bit update quantisation with error feedback written out in numpy, and
the share of local work a round deadline leaves a client (``SystemModel``'s documented arithmetic)."""

from __future__ import annotations

import math

import numpy as np

INT8_LEVELS = 255


def int8_round_trip(delta: np.ndarray) -> np.ndarray:
    """What the server decodes of an update sent as 8-bit codes: 256 evenly spaced levels between the update's minimum
    and maximum (the level spacing a Python float, kept as float32 on the wire), each float32 value's distance from
    the minimum in steps rounded to the nearest level (in float32, as numpy computes a float32 array with Python
    floats), decoded in float32 as low + code x step."""
    flat = np.asarray(delta, np.float32).ravel()
    low = float(flat.min())
    span = float(flat.max()) - low
    step = span / INT8_LEVELS if span > 0 else 1.0
    codes = np.clip(np.rint((flat - low) / step), 0, INT8_LEVELS)
    return (np.float32(low) + codes.astype(np.float32) * np.float32(step)).reshape(np.shape(delta))


class ServerOptimizer:
    """Flower 1.41's FedAdam / FedYogi over a sequence of aggregates, float64: delta = mean - x, m = b1 m + (1 - b1)
    delta; Adam: v = b2 v + (1 - b2) delta^2, x + eta sqrt(1 - b2^(r+1)) / (1 - b1^(r+1)) m / (sqrt(v) + tau); Yogi:
    v = v - (1 - b2) delta^2 sign(v - delta^2), x + eta m / (sqrt(v) + tau). A round with no aggregate leaves m, v."""

    def __init__(self, kind: str, *, eta: float, beta_1: float, beta_2: float, tau: float):
        self.kind, self.eta, self.b1, self.b2, self.tau = kind, eta, beta_1, beta_2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, x: dict[str, np.ndarray], mean: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        out = {}
        for k in x:
            xk = x[k].astype(np.float64)
            d = mean[k].astype(np.float64) - xk
            m = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * d
            v = self.v.get(k, np.zeros_like(d))
            if self.kind == "adam":
                v = self.b2 * v + (1 - self.b2) * d**2
                lr = self.eta * math.sqrt(1 - self.b2 ** (server_round + 1.0)) / (1 - self.b1 ** (server_round + 1.0))
            else:
                v = v - (1 - self.b2) * d**2 * np.sign(v - d**2)
                lr = self.eta
            self.m[k], self.v[k] = m, v
            out[k] = xk + lr * m / (np.sqrt(v) + self.tau)
        return out


def fednova(x: dict[str, np.ndarray], replies: dict[int, dict[str, np.ndarray]], weights: dict[int, float],
            steps: dict[int, int]) -> dict[str, np.ndarray]:  # fmt: skip
    """FedNova (Wang et al. 2020) written out: p_i = n_i / sum n, tau_eff = sum p_i tau_i, and
    x - tau_eff sum_i p_i (x - y_i) / tau_i, float64."""
    total = float(sum(weights[p] for p in replies))
    tau_eff = sum(weights[p] / total * steps[p] for p in replies)
    out = {}
    for k, v in x.items():
        x64 = v.astype(np.float64)
        d = sum(weights[p] / total * (x64 - replies[p][k].astype(np.float64)) / steps[p] for p in replies)
        out[k] = x64 - tau_eff * d
    return out


def deadline_share(deadline: float, model_bytes: int, bandwidth: float, speed: float, full_steps: int):
    """The share of its ``full_steps`` a client finishes before ``deadline`` (its reply taken as large as the model it
    was sent: 2 x model_bytes over its link), as ``SystemModel.plan`` documents it: (share, steps), or None for a
    client that cannot finish one step (a timeout)."""
    affordable = (deadline - 2 * model_bytes / bandwidth) * speed / full_steps
    if affordable * full_steps < 1:
        return None
    share = min(1.0, affordable)
    return share, max(1, math.ceil(share * full_steps))
