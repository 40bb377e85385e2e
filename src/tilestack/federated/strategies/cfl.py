"""CFL (Sattler, Mueller, Samek, IEEE TNNLS 2020): clustered FL by bipartitioning clients on update similarity.

    from tilestack.federated.strategies import CFL
    strategy = CFL(fraction_train=1.0, fraction_evaluate=0.0)
    initial = strategy.initial_arrays(task)            # one cluster to begin with
    strategy.assignments                               # partition id -> cluster

Where IFCA (``ifca.py``) lets each client pick the best of K models by its loss, CFL decides on the server:
all clients start in one cluster; each round every client trains its cluster's model and the server
averages each cluster's updates. When a cluster's federation has nearly converged while some of its
clients still move far, i.e. ``||mean update|| < eps1 * max ||update_i||`` (the paper's eps1 / eps2 test,
made scale-free) after ``warmup`` rounds, and the best bipartition of its clients by the cosine similarity
of their updates (complete linkage) has a maximum cross-similarity below ``max_cross_similarity``, the
cluster splits in two, both children starting from the parent's model. The clusters travel in one
ArrayRecord as IFCA's do (``cluster{j}/<name>``), so the server's evaluator, checkpoints and resume work
unchanged; each client is sent only its own cluster's model. A client that did not take part in the round
of a split stays with the first child.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords

from tilestack.federated.checks import require_int, require_real
from tilestack.federated.client import PARTITION_METRIC, _split_clusters, cluster_key
from tilestack.federated.strategies._util import (
    dp_top_up,
    metric,
    ok_replies,
    pid_of,
    to_numpy,
    to_record,
    with_content,
)
from tilestack.federated.strategies.ifca import adjusted_rand_index
from tilestack.federated.task import Task


def _flat(params: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([params[k].ravel() for k in keys]).astype(np.float64)


def bipartition(similarity: np.ndarray) -> tuple[list[int], list[int]]:
    """Two groups by complete-linkage agglomeration of an (n, n) similarity matrix (n >= 2)."""
    groups = [[i] for i in range(len(similarity))]
    while len(groups) > 2:
        best, pair = -np.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                link = similarity[np.ix_(groups[a], groups[b])].min()  # complete linkage: the least similar pair
                if link > best:
                    best, pair = link, (a, b)
        a, b = pair
        groups[a] += groups.pop(b)
    return sorted(groups[0]), sorted(groups[1])


class CFL(FedAvg):
    """Clustered federated learning by recursive bipartitioning (see module doc)."""

    # what a training reply holds where it is not the global model's arrays (checks.check_privacy reads it)
    REPLIES_HOLD = "one cluster model each, not the cluster models the global record packs"

    def __init__(self, *, eps1: float = 0.4, max_cross_similarity: float = 0.0, warmup: int = 5,
                 max_clusters: int = 8, min_cluster_size: int = 2, **fedavg_kwargs):  # fmt: skip
        super().__init__(**fedavg_kwargs)
        require_real("CFL", "eps1", eps1, lambda v: 0 < v < 1, "a number in (0, 1)")
        # a cosine similarity: NaN (every comparison False) would never split, a bound past 1 always would
        require_real("CFL", "max_cross_similarity", max_cross_similarity, lambda v: -1 <= v <= 1,
                     "a number in [-1, 1] (a cosine similarity)")
        require_int("CFL", "max_clusters", max_clusters, low=1)
        require_int("CFL", "min_cluster_size", min_cluster_size, low=1)
        require_int("CFL", "warmup", warmup, low=0)
        self.eps1, self.max_cross, self.warmup = eps1, max_cross_similarity, warmup
        self.max_clusters, self.min_size = max_clusters, min_cluster_size
        self.assignments: dict[int, int] = {}
        self.splits: list[tuple[int, int, int]] = []  # (round, parent cluster, new cluster)
        self._clusters: list[dict[str, np.ndarray]] = []
        self._pid_of_node: dict[int, int] = {}
        self._dp_noise: tuple[float, int] | None = None  # a client-side DP wrapper's noise (run_rounds; dp_top_up)

    def _pid(self, msg: Message) -> int:
        """The partition of the client that sent ``msg``: by its node (as the model was sent), else as the reply says.
        A ClientApp that does not report tilestack's partition id (Flower's own apps) had every reply taken for
        partition 0's: one membership for all, the clusters' means over whoever that was."""
        pid = self._pid_of_node.get(msg.metadata.src_node_id)
        return int(metric(msg, PARTITION_METRIC)) if pid is None else pid

    def initial_arrays(self, task: Task) -> ArrayRecord:
        return to_record({cluster_key(0, k): v for k, v in task.initial_params().items()})

    def _unpack(self, arrays: ArrayRecord) -> list[dict[str, np.ndarray]]:
        params = to_numpy(arrays)
        if not all(k.startswith("cluster") and "/" in k for k in params):
            return [params]  # a plain model: one cluster
        return _split_clusters(params, 1 + max(int(k.partition("/")[0].removeprefix("cluster")) for k in params))

    def _per_client(self, messages: Iterable[Message], grid: Grid) -> list[Message]:
        out = []
        for m in messages:
            pid = pid_of(grid, m.metadata.dst_node_id)
            self._pid_of_node[m.metadata.dst_node_id] = pid  # the reply's client, by the node it comes from
            model = to_record(self._clusters[self.assignments.get(pid, 0)])
            out.append(with_content(m, RecordDict({**m.content, self.arrayrecord_key: model})))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._clusters = self._unpack(arrays)
        return self._per_client(super().configure_train(server_round, arrays, config, grid), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._clusters = self._unpack(arrays)
        return self._per_client(super().configure_evaluate(server_round, arrays, config, grid), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ok_replies(replies)
        if not replies:
            return None, None
        for m in replies:
            self.assignments.setdefault(self._pid(m), 0)
        models = [dict(c) for c in self._clusters]
        for j, start in enumerate(self._clusters):
            members = [m for m in replies if self.assignments.get(self._pid(m), 0) == j]
            if not members:
                continue
            models[j] = to_numpy(aggregate_arrayrecords([m.content for m in members], self.weighted_by_key))
            if server_round > self.warmup and len(members) >= 2 * self.min_size and len(models) < self.max_clusters:
                self._maybe_split(server_round, j, start, members, models)
        for j, model in enumerate(models):  # each cluster's mean is over its members only: under DP topped up
            members = [m for m in replies if self.assignments.get(self._pid(m), 0) == j]
            models[j] = dp_top_up(model, members, self.weighted_by_key, self._dp_noise)
        packed = {cluster_key(j, k): v for j, model in enumerate(models) for k, v in model.items()}
        metrics = aggregate_metricrecords([m.content for m in replies], self.weighted_by_key)
        return to_record(packed, like=self._clusters[0]), metrics

    def _maybe_split(self, server_round: int, j: int, start: dict, members: list[Message], models: list) -> None:
        keys = sorted(start)
        base = _flat(start, keys)
        updates = np.stack([_flat(to_numpy(m.content[self.arrayrecord_key]), keys) - base for m in members])  # (n, P)
        norms = np.linalg.norm(updates, axis=1)
        if not norms.max() > 0 or np.linalg.norm(updates.mean(axis=0)) >= self.eps1 * norms.max():
            return  # the cluster's clients still agree on a direction: not yet at a stationary point
        unit = updates / np.maximum(norms[:, None], 1e-12)
        sim = unit @ unit.T  # (n, n) cosine similarities
        a, b = bipartition(sim)
        if min(len(a), len(b)) < self.min_size or sim[np.ix_(a, b)].max() >= self.max_cross:
            return
        new = len(models)
        # each child: the parent plus the mean update of its own members
        child_a, child_b = (
            to_numpy(aggregate_arrayrecords([members[i].content for i in group], self.weighted_by_key))
            for group in (a, b)
        )
        models[j] = child_a
        models.append(child_b)
        for i in b:
            self.assignments[self._pid(members[i])] = new
        for i in a:
            self.assignments[self._pid(members[i])] = j
        self.splits.append((server_round, j, new))

    def agreement(self, task: Task) -> float:
        """Adjusted Rand index between the clusters and the task's planted groups (clients seen so far)."""
        pids = sorted(self.assignments) or list(range(task.num_clients))
        return adjusted_rand_index([task.group(p) for p in pids], [self.assignments.get(p, 0) for p in pids])
