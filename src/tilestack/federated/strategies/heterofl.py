"""HeteroFL (Diao et al., ICLR 2021): clients train sub-models of different widths of one global model.

    from tilestack.federated.strategies import HeteroFL
    strategy = HeteroFL(width_of=lambda pid: (1.0, 0.5, 0.25)[pid % 3], hidden=64, fraction_train=0.3)

Client ``pid`` receives the first ``round(width * hidden)`` hidden units of every layer (every axis of
length ``hidden`` is cut), trains that narrower MLP, and returns it. The server averages each element of
the global model over the clients whose sub-model holds it (weighted by examples); elements no client
held this round keep their value. Needs a grid that knows partitions (``ManagedGrid``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from tilestack.federated.strategies._util import metric, ok_replies, pid_of, to_numpy, to_record, with_content


def sub_model(params: dict[str, np.ndarray], hidden: int, width: float) -> dict[str, np.ndarray]:
    """The first ``round(width * hidden)`` units along every axis of length ``hidden``."""
    keep = max(1, int(round(width * hidden)))
    return {k: v[tuple(slice(0, keep) if n == hidden else slice(None) for n in v.shape)] for k, v in params.items()}


class HeteroFL(FedAvg):
    """Width-heterogeneous clients aggregated into one global MLP (see module doc)."""

    def __init__(self, *, width_of: Callable[[int], float], hidden: int, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        if hidden < 1:
            raise ValueError(f"HeteroFL: hidden={hidden!r}; expected >= 1")
        self.width_of, self.hidden = width_of, hidden
        self._x: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._x = to_numpy(arrays)
        out = []
        for m in super().configure_train(server_round, arrays, config, grid):
            width = float(self.width_of(pid_of(grid, m.metadata.dst_node_id)))
            if not 0.0 < width <= 1.0:
                raise ValueError(f"HeteroFL: width_of(...) = {width!r}; expected in (0, 1]")
            sub = to_record(sub_model(self._x, self.hidden, width))
            out.append(with_content(m, RecordDict({**m.content, self.arrayrecord_key: sub})))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ok_replies(replies)
        if not replies:
            return None, None
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in self._x.items()}
        weight = {k: np.zeros_like(v, dtype=np.float64) for k, v in self._x.items()}
        for m in replies:
            w = metric(m, self.weighted_by_key)
            for k, v in to_numpy(next(iter(m.content.array_records.values()))).items():
                region = tuple(slice(0, n) for n in v.shape)
                total[k][region] += w * v
                weight[k][region] += w
        x_new = {
            k: np.where(weight[k] > 0, total[k] / np.maximum(weight[k], 1e-30), self._x[k]).astype(np.float32)
            for k in self._x
        }
        return to_record(x_new), aggregate_metricrecords([m.content for m in replies], self.weighted_by_key)
