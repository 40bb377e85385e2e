"""Synthetic(alpha, beta), the FedProx paper's benchmark, generated locally, one device at a time.

    from tilestack.federated.synthetic import Synthetic
    data = Synthetic(alpha=1.0, beta=1.0, num_devices=30, seed=0)
    x_train, y_train, x_test, y_test = data.device(3)     # (n, 60) float32, (n,) int64, ...
    data.num_samples(3)                                    # power-law size of device 3

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), section 5.1: device k draws
u_k ~ N(0, alpha), B_k ~ N(0, beta); its model W_k, b_k ~ N(u_k, 1); its inputs x ~ N(v_k, Sigma) with
v_k ~ N(B_k, 1) and Sigma diagonal, Sigma_jj = j^-1.2; labels y = argmax(softmax(W_k x + b_k)).
alpha controls how much the local models differ, beta how much the local data differ. Sizes follow a
power law (lognormal(4, 2) + 50, as in the LEAF generator). Every device is generated from its own seed,
so 10,000 devices cost nothing until a device is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import numpy as np

SIGMA_DECAY = 1.2  # Sigma_jj = j ** -SIGMA_DECAY
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the clients' features are float32
SIZE_LOG_MEAN, SIZE_LOG_STD, SIZE_MIN = 4.0, 2.0, 50  # lognormal(4, 2) + 50 samples per device


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """Synthetic(alpha, beta) over ``num_devices`` devices; each device split into train and test."""

    alpha: float = 1.0
    beta: float = 1.0
    num_devices: int = 30
    num_features: int = 60
    num_classes: int = 10
    seed: int = 0
    max_samples: int | None = None
    """Cap on one device's size (the lognormal tail reaches 10^4); None keeps the paper's sizes."""
    test_fraction: float = 0.2
    iid: bool = False
    """Synthetic-IID of the paper: one shared model and input distribution for every device."""

    def __post_init__(self) -> None:
        # Every field by type and range: a str or None failed in a bare comparison, NaN or inf alpha, a float
        # num_devices, a str num_features or seed, iid="no" were kept and failed (or ran otherwise) only when a
        # device was drawn.
        def real(v: object) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: object) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        for name in ("alpha", "beta"):
            if not (real(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"Synthetic: {name}={getattr(self, name)!r}; expected a finite number >= 0")
        for name in ("num_devices", "num_features", "num_classes"):
            if not (integer(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"Synthetic: {name}={getattr(self, name)!r}; expected an integer >= 1")
        if not (integer(self.seed) and self.seed >= 0):
            raise ValueError(f"Synthetic: seed={self.seed!r}; expected an integer >= 0")
        if not (real(self.test_fraction) and 0.0 < self.test_fraction < 1.0):
            raise ValueError(f"Synthetic: test_fraction={self.test_fraction!r}; expected in (0, 1)")
        if self.max_samples is not None and not (integer(self.max_samples) and self.max_samples >= SIZE_MIN):
            raise ValueError(f"Synthetic: max_samples={self.max_samples!r}; expected >= {SIZE_MIN} or None")
        if not isinstance(self.iid, bool):
            raise ValueError(f"Synthetic: iid={self.iid!r}; expected True or False")

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_devices:
            raise ValueError(f"Synthetic.device: k={k!r}; expected 0 <= k < num_devices={self.num_devices}")

    def num_samples(self, k: int) -> int:
        """Total samples (train + test) on device ``k``."""
        self._check(k)
        rng = np.random.default_rng([self.seed, k, 0])
        n = int(rng.lognormal(SIZE_LOG_MEAN, SIZE_LOG_STD)) + SIZE_MIN
        return min(n, self.max_samples) if self.max_samples is not None else n

    def device(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_test, y_test)`` of device ``k``; the same arrays on every call and process."""
        return _device(self, k)


@functools.lru_cache(maxsize=4096)
def _device(spec: Synthetic, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    spec._check(k)
    n = spec.num_samples(k)
    d, c = spec.num_features, spec.num_classes
    rng = np.random.default_rng([spec.seed, k, 1])
    if spec.iid:
        shared = np.random.default_rng([spec.seed, 0, 2])
        w, b, v = shared.normal(0, 1, (c, d)), shared.normal(0, 1, c), np.zeros(d)
    else:
        u = rng.normal(0, np.sqrt(spec.alpha))  # N(0, alpha): alpha is a variance
        big_b = rng.normal(0, np.sqrt(spec.beta))
        w = rng.normal(u, 1, (c, d))  # (C, D)
        b = rng.normal(u, 1, c)  # (C,)
        v = rng.normal(big_b, 1, d)  # (D,)
    std = np.arange(1, d + 1, dtype=np.float64) ** (-SIGMA_DECAY / 2)  # sqrt of Sigma_jj
    x = rng.normal(v, std, (n, d))  # (N, D)
    y = np.argmax(x @ w.T + b, axis=1)  # softmax is monotone: argmax of the logits
    n_test = max(1, int(round(spec.test_fraction * n)))
    if (big := float(np.abs(x).max(initial=0.0))) > FLOAT32_MAX:  # (inf in float32 without a word: every step NaN)
        raise ValueError(
            f"Synthetic: beta={spec.beta!r} gives device {k} features of magnitude {big:.3g} (their means are drawn "
            f"around B_k ~ N(0, beta)), beyond the float32 range the models train in ({FLOAT32_MAX:.3g}); expected a "
            "smaller beta (the FedProx paper uses 0 to 1)"
        )
    x, y = x.astype(np.float32), y.astype(np.int64)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
