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



def replay_stale(task, x0: dict[str, np.ndarray], models: list[dict[str, np.ndarray]], late_by: dict[int, int],
                 exponent: float, out_of_time: frozenset[int] = frozenset()) -> list[dict]:  # fmt: skip
    """Each round of FedAvg over every idle client under ``stragglers='stale'``, written out from the run's own models
    (``models[r - 1]`` after round r, ``x0`` before round 1): client p in ``late_by`` trains in full from the model of
    the round it starts in, r0, and its update y - x0 joins round r0 + late_by[p] as x + (y - x0) on the model x that
    round starts from, weighted by its examples x (1 + late_by[p]) ** -exponent; it is busy (not sampled) in rounds
    r0 + 1 .. r0 + late_by[p]. Clients in ``out_of_time`` train but are never averaged. Per round: the float64
    aggregate ('model'), the late updates it took in ('joined') and the clients it sampled ('idle')."""
    from _fl_round7 import client_model

    flight, out = {}, []
    for rnd in range(1, len(models) + 1):
        x = x0 if rnd == 1 else models[rnd - 2]
        busy = {p for p, (started, due, _, _) in flight.items() if started < rnd <= due}
        idle = [p for p in range(task.num_clients) if p not in busy]
        replies, weights = {}, {}
        for p in idle:
            if p in out_of_time:
                continue
            y = client_model(task, p, rnd, x)[0]
            if p in late_by:
                flight[p] = (rnd, rnd + late_by[p], y, x)
            else:
                replies[p], weights[p] = y, task.num_train(p)
        joined = sorted(p for p, (_, due, _, _) in flight.items() if due == rnd)
        for p in joined:
            started, due, y, xs = flight.pop(p)
            replies[p] = {k: x[k].astype(np.float64) + (y[k].astype(np.float64) - xs[k].astype(np.float64)) for k in y}
            weights[p] = task.num_train(p) * (1.0 + due - started) ** -exponent
        total = sum(weights.values())
        model = {k: sum(weights[p] * replies[p][k].astype(np.float64) for p in replies) / total for k in x0}
        out.append({"model": model, "joined": joined, "idle": idle})
    return out
