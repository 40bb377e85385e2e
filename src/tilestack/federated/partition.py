"""Non-IID partitioners over any labelled array dataset: each returns one index array per client.

    from tilestack.federated.partition import dirichlet, shards, quantity_skew
    parts = dirichlet(labels, num_clients=100, alpha=0.3, seed=0)   # label skew, concentration alpha
    parts = shards(labels, num_clients=100, classes_per_client=2)    # pathological k-class shards
    parts = quantity_skew(len(labels), num_clients=100, sigma=1.0)   # lognormal sizes, IID labels
    x_client, y_client = x[parts[7]], labels[parts[7]]

Every partitioner gives each sample to exactly one client and every client at least ``min_size``
samples (it raises a ``ValueError`` naming the argument when that cannot be done: fewer than
``num_clients * min_size`` samples).
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _require_int(where: str, name: str, value, low: int) -> int:
    """``value`` as an int, refused unless it is an integer (not a bool; numpy integers are) >= ``low``. A float
    (``num_clients=2.0``), a bool or a string failed deep in numpy ("'float' object cannot be interpreted as an
    integer", an AxisError, "slice indices must be integers"), naming no argument; ``min_size=1.5`` was taken."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{where}: {name}={value!r}; expected an integer >= {low}")
    return int(value)


def _require_real(where: str, name: str, value, ok, expected: str) -> float:
    """``value`` as a float, refused unless it is a real number (not a bool) for which ``ok`` holds: a string or None
    failed in a comparison ("'<' not supported between instances of 'int' and 'str'")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"{where}: {name}={value!r}; expected {expected}")
    return float(value)


def _check_common(num_samples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}; expected >= 1")
    if min_size < 0:
        raise ValueError(f"min_size={min_size!r}; expected >= 0")
    if num_clients * min_size > num_samples:
        raise ValueError(
            f"num_clients={num_clients} x min_size={min_size} > {num_samples} samples; "
            "expected fewer clients or a smaller min_size"
        )


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: shape {labels.shape}, dtype {labels.dtype}; expected a 1-D integer array")
    return labels


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Label skew: for each class, its samples are split over clients by proportions ~ Dir(alpha).

    Small alpha (0.1) gives clients few classes; large alpha (100) is close to IID. Draws again (up to
    ``max_tries``) until every client holds ``min_size`` samples; where no draw does (alpha 0.01 puts each
    class on about one client), the last draw is topped up: each short client takes the samples it lacks
    from the client that holds the most, so the skew stays and every client can train.
    """
    labels = _labels(labels)
    num_clients = _require_int("dirichlet", "num_clients", num_clients, 1)
    # inf made every draw NaN, and the fallback put each class on one client
    alpha = _require_real("dirichlet", "alpha", alpha, lambda v: 0 < v < math.inf,
                          "a finite number > 0 (large: close to IID)")  # fmt: skip
    seed = _require_int("dirichlet", "seed", seed, 0)
    min_size = _require_int("dirichlet", "min_size", min_size, 0)
    max_tries = _require_int("dirichlet", "max_tries", max_tries, 1)
    _check_common(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            with np.errstate(divide="ignore", invalid="ignore"):
                props = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(props)):  # a tiny alpha can underflow every gamma draw to 0 (0 / 0)
                props = np.eye(num_clients)[rng.integers(num_clients)]  # the limit: the class on one client
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    return _top_up(out, min_size, rng)


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move samples from the largest client to each client short of ``min_size`` (enough exist: checked)."""
    parts = list(parts)
    for i in range(len(parts)):
        need = min_size - len(parts[i])
        while need > 0:
            donor = int(np.argmax([len(p) for p in parts]))
            give = min(need, len(parts[donor]) - min_size)
            if give <= 0:  # cannot happen after _check_common; never loop on it
                raise ValueError(f"min_size={min_size}: too few samples for {len(parts)} clients")
            moved = rng.choice(len(parts[donor]), size=give, replace=False)
            parts[i] = np.sort(np.concatenate([parts[i], parts[donor][moved]]))
            parts[donor] = np.delete(parts[donor], moved)
            need -= give
    return parts


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int = 2, *, seed: int = 0) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into ``num_clients * classes_per_client``
    shards, give each client ``classes_per_client`` random shards, so most clients see that many classes."""
    labels = _labels(labels)
    num_clients = _require_int("shards", "num_clients", num_clients, 1)  # (-1 was named as num_clients=-2, the shards)
    classes_per_client = _require_int("shards", "classes_per_client", classes_per_client, 1)
    seed = _require_int("shards", "seed", seed, 0)
    num_shards = num_clients * classes_per_client
    # (named the shard count as "num_clients=60 x min_size=1", where the caller gave num_clients=30)
    if num_shards > len(labels):
        raise ValueError(
            f"shards: num_clients={num_clients} x classes_per_client={classes_per_client} = {num_shards} shards > "
            f"{len(labels)} samples; expected at most one shard per sample (fewer clients or classes per client)"
        )
    classes = len(np.unique(labels))
    if classes_per_client > classes:  # (each client took shards of every class: the split was not pathological)
        raise ValueError(f"shards: classes_per_client={classes_per_client} over labels of {classes} classes; "
                         f"expected at most {classes}")  # fmt: skip
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards)
    return [
        np.sort(np.concatenate([pieces[s] for s in owner[i * classes_per_client : (i + 1) * classes_per_client]]))
        for i in range(num_clients)
    ]


def quantity_skew(
    num_samples: int, num_clients: int, sigma: float = 1.0, *, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: IID samples, client sizes proportional to lognormal(0, sigma) draws (sigma=0: equal)."""
    num_samples = _require_int("quantity_skew", "num_samples", num_samples, 0)
    num_clients = _require_int("quantity_skew", "num_clients", num_clients, 1)
    # NaN or inf made the sizes garbage (clients below min_size, samples lost)
    sigma = _require_real("quantity_skew", "sigma", sigma, lambda v: 0 <= v < math.inf, "a finite number >= 0")
    seed = _require_int("quantity_skew", "seed", seed, 0)
    min_size = _require_int("quantity_skew", "min_size", min_size, 0)
    _check_common(num_samples, num_clients, min_size)
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, num_clients)
    total = weights.sum()
    if not (np.isfinite(total) and total > 0):
        # exp of the normal draws overflowed (or all underflowed) from sigma ~ 100 on: the shares became inf / inf =
        # NaN, and clients got no examples while others were lost. The same draws (a lognormal is exp of the normal
        # draw of the same stream) in the log domain, scaled by the largest, give the shares they stand for
        logs = np.random.default_rng(seed).normal(0.0, sigma, num_clients)
        weights = np.exp(logs - logs.max())  # (num_clients,) in (0, 1], the largest 1
    spare = num_samples - num_clients * min_size
    exact = weights / weights.sum() * spare  # (num_clients,) each client's share of the spare samples
    sizes = min_size + np.floor(exact).astype(int)
    # the rounding remainder (< num_clients samples), one each to the clients with the largest fractions left: it
    # all went to the largest client, so that "IID" 220 samples over 50 clients gave one client 24 and the rest 4
    extra = np.argsort(-(exact - np.floor(exact)), kind="stable")[: max(0, num_samples - int(sizes.sum()))]
    sizes[extra] += 1
    idx = rng.permutation(num_samples)
    return [np.sort(chunk) for chunk in np.split(idx, np.cumsum(sizes)[:-1])]
