"""Helpers of the round 9 federated scenario tests: the global models a run went through, the MLP's forward pass and
the robust rules (Krum's pick, the coordinate-wise trimmed mean) written out in float64."""

from __future__ import annotations

import numpy as np

from tilestack.federated.grid import ManagedGrid


def keep(models: list) -> callable:
    """``extra_metrics`` hook keeping the global model (numpy arrays) after each round."""

    def hook(strategy, arrays, server_round):
        models.append({k: v.numpy() for k, v in arrays.items()})
        return {}

    return hook


def near(got: dict[str, np.ndarray], want: dict[str, np.ndarray], ulps: float = 2.0) -> None:
    """The float32 model is the float64 ``want`` rounded (to ``ulps`` float32 ulps: Flower sums w_i / W * x_i)."""
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == np.float32, (k, v.dtype)
        np.testing.assert_allclose(v, want[k], rtol=ulps * 2**-23, atol=1e-12, err_msg=k)


def online_sets(grid: ManagedGrid, rounds: int) -> dict[int, set[int]]:
    """The partitions the grid's system model has online in each round 1..rounds (its public ``online``)."""
    return {r: {int(p) for p in np.flatnonzero(grid.system.online(r))} for r in range(1, rounds + 1)}


def mlp_logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """tilestack's MLP without normalisation, float64: relu(x W1 + b1) W2 + b2, (N, C)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    h = np.maximum(x.astype(np.float64) @ p["fc1.weight"] + p["fc1.bias"], 0.0)
    return h @ p["fc2.weight"] + p["fc2.bias"]


def flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([model[k].astype(np.float64).ravel() for k in sorted(model)])


def krum_pick(models: dict[int, dict[str, np.ndarray]], f: int) -> int:
    """Krum (Blanchard et al. 2017): the client whose model has the least sum of squared distances to its
    n - f - 2 nearest others."""
    pids = sorted(models)
    vecs = {p: flat(models[p]) for p in pids}
    score = {}
    for p in pids:
        d = sorted(float(np.sum((vecs[p] - vecs[q]) ** 2)) for q in pids if q != p)
        score[p] = sum(d[: len(pids) - f - 2])
    return min(pids, key=score.__getitem__)


def trimmed_mean(models: dict[int, dict[str, np.ndarray]], cut: int) -> dict[str, np.ndarray]:
    """Coordinate-wise mean of the models after dropping the ``cut`` smallest and ``cut`` largest values."""
    keys = next(iter(models.values())).keys()
    out = {}
    for k in keys:
        stack = np.sort(np.stack([models[p][k].astype(np.float64) for p in sorted(models)]), axis=0)
        out[k] = stack[cut : len(models) - cut].mean(axis=0)
    return out
