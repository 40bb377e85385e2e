"""IFCA (Ghosh et al., NeurIPS 2020): K cluster models; each client trains the one that fits it best.

    from tilestack.federated.strategies import IFCA
    strategy = IFCA(num_clusters=2, fraction_train=0.5, fraction_evaluate=0.0)
    initial = strategy.initial_arrays(task)            # K differently seeded models in one ArrayRecord
    strategy.assignments                               # partition id -> cluster, from the last round

The K models travel in one ArrayRecord (keys ``cluster{j}/<name>``) with ``tilestack.ifca-k`` = K in
the config; a client scores every model on its own training data, trains the best, and reports
``cluster-id``. The server averages each cluster's replies with Flower's weighted averaging; a cluster
nobody chose keeps its model. ``agreement(task)`` measures how well the clusters recover planted groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from math import comb

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords

from tilestack.federated.checks import require_int
from tilestack.federated.client import CLUSTER_SEP, IFCA_KEY, PARTITION_METRIC, cluster_key
from tilestack.federated.strategies._util import dp_top_up, metric, ok_replies, to_numpy, to_record
from tilestack.federated.task import Task

INIT_STD = 0.1  # spread of the random initial cluster models (zero init would make them identical)


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """Agreement of two labelings up to renaming: 1 identical, about 0 for chance."""
    n = len(a)
    if n < 2:
        return 1.0
    pairs = {}
    for x, y in zip(a, b, strict=True):
        pairs[(x, y)] = pairs.get((x, y), 0) + 1
    rows = np.bincount(np.unique(a, return_inverse=True)[1])
    cols = np.bincount(np.unique(b, return_inverse=True)[1])
    index = sum(comb(v, 2) for v in pairs.values())
    sum_r, sum_c = sum(comb(int(v), 2) for v in rows), sum(comb(int(v), 2) for v in cols)
    expected = sum_r * sum_c / comb(n, 2)
    top = (sum_r + sum_c) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


class IFCA(FedAvg):
    """Iterative Federated Clustering over Flower's FedAvg sampling and averaging."""

    # what a training reply holds where it is not the global model's arrays (checks.check_privacy reads it)
    REPLIES_HOLD = "one cluster model each, not the cluster models the global record packs"

    def __init__(self, *, num_clusters: int, reseed_after: int = 3, seed: int = 0, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        require_int("IFCA", "num_clusters", num_clusters, low=1)
        require_int("IFCA", "seed", seed, low=0)
        require_int("IFCA", "reseed_after", reseed_after, low=0)   # 0: never re-seed
        self.num_clusters, self.reseed_after, self.seed = num_clusters, reseed_after, seed
        self._idle = [0] * num_clusters
        self.assignments: dict[int, int] = {}
        self._clusters: list[dict[str, np.ndarray]] = []
        self._dp_noise: tuple[float, int] | None = None  # a client-side DP wrapper's noise (run_rounds; dp_top_up)

    def check_task(self, task: Task) -> None:
        """Refuse more cluster models than clients: each client trains one cluster model a round, so with K above
        the client count some models could never be trained (re-seeded round after round, sent to every client)
        and the run said nothing."""
        if self.num_clusters > task.num_clients:
            raise ValueError(f"IFCA: num_clusters={self.num_clusters} with num_clients={task.num_clients}; expected "
                             f"at most one cluster model per client (num_clusters <= {task.num_clients})")

    def check_train_reply(self, metrics: MetricRecord) -> str:
        """Why a training reply must be left out ('' when it is fine; ManagedGrid asks, run_rounds tells it to): a
        ``cluster-id`` that names none of the cluster models. Such a reply joined no cluster's mean, dropped without a
        word while the round counted it as aggregated (and a missing id was recorded as cluster 0)."""
        j = metrics.get("cluster-id")
        number = isinstance(j, (int, float)) and not isinstance(j, bool) and math.isfinite(j)
        if not number or j != int(j) or not 0 <= j < self.num_clusters:
            return (f"metrics: cluster-id={j!r}, expected an integer in 0..{self.num_clusters - 1} (the cluster model "
                    "the client trained)")  # fmt: skip
        return ""

    def initial_arrays(self, task: Task) -> ArrayRecord:
        base = task.initial_params()
        packed = {}
        for j in range(self.num_clusters):
            rng = np.random.default_rng([task.seed, 31, j])
            for k, v in base.items():
                packed[cluster_key(j, k)] = (v + rng.normal(0, INIT_STD, v.shape)).astype(v.dtype)
        return to_record(packed)

    def _unpack(self, arrays: ArrayRecord) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.num_clusters)]
        for name, v in to_numpy(arrays).items():
            head, sep, key = name.partition(CLUSTER_SEP)
            j = head.removeprefix("cluster")
            if not sep or not j.isdigit() or int(j) >= self.num_clusters:
                raise ValueError(
                    f"IFCA: the model's array {name!r} belongs to none of its {self.num_clusters} cluster models "
                    f"('cluster{{j}}{CLUSTER_SEP}<name>', j < {self.num_clusters}); expected the arrays of "
                    "IFCA.initial_arrays(task)"
                )
            out[int(j)][key] = v
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._clusters = self._unpack(arrays)
        self._pid_of_node = dict(getattr(grid, "partition_of", None) or {})  # node -> partition (_pid)
        config[IFCA_KEY] = self.num_clusters
        return super().configure_train(server_round, arrays, config, grid)

    def _pid(self, msg: Message) -> int:
        """The partition of the client that sent ``msg``: by its node, else as the reply says. A ClientApp that does
        not report tilestack's partition id had every cluster choice recorded as partition 0's."""
        pid = vars(self).get("_pid_of_node", {}).get(msg.metadata.src_node_id)
        return int(metric(msg, PARTITION_METRIC)) if pid is None else pid

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[IFCA_KEY] = self.num_clusters
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ok_replies(replies)
        if not replies:
            return None, None
        for m in replies:
            self.assignments[self._pid(m)] = int(metric(m, "cluster-id"))
        held = set(self.assignments.values())  # clusters some client chose last: this round's or an absent one's
        models, sizes = [], []
        for j in range(self.num_clusters):
            members = [m for m in replies if int(metric(m, "cluster-id", -1)) == j]
            sizes.append(len(members))
            # idle (re-seeded after reseed_after rounds) only while no client holds it: a cluster whose clients were
            # not sampled or were offline is not empty, and re-seeding it lost its model before they came back
            self._idle[j] = 0 if members or j in held else self._idle[j] + 1
            models.append(  # a cluster's mean is over its members only: under DP its noise is topped up
                dp_top_up(to_numpy(aggregate_arrayrecords([m.content for m in members], self.weighted_by_key)),
                          members, self.weighted_by_key, self._dp_noise)
                if members
                else self._clusters[j]
            )  # fmt: skip
        self._reseed(server_round, models, sizes)
        packed = {cluster_key(j, k): v for j, model in enumerate(models) for k, v in model.items()}
        metrics = aggregate_metricrecords([m.content for m in replies], self.weighted_by_key)
        return to_record(packed, like=self._clusters[0]), metrics

    def _reseed(self, server_round: int, models: list[dict[str, np.ndarray]], sizes: list[int]) -> None:
        """A cluster no client has chosen (last) for ``reseed_after`` rounds restarts next to the most chosen one (as
        k-means implementations re-seed empty clusters), so that two groups stuck in one cluster can split."""
        if not self.reseed_after:
            return
        biggest = int(np.argmax(sizes))
        for j in range(self.num_clusters):
            if self._idle[j] >= self.reseed_after and sizes[biggest] >= 2:
                rng = np.random.default_rng([self.seed, server_round, j, 43])
                models[j] = {k: (v + rng.normal(0, INIT_STD, v.shape)).astype(self._clusters[0][k].dtype)
                             for k, v in models[biggest].items()}  # fmt: skip
                self._idle[j] = 0

    def agreement(self, task: Task) -> float:
        """Adjusted Rand index between the last cluster choices and the task's planted groups."""
        pids = sorted(self.assignments)
        return adjusted_rand_index([task.group(p) for p in pids], [self.assignments[p] for p in pids])
