"""FedNova (Wang et al., NeurIPS 2020): normalised averaging for clients that do unequal local work.

    from tilestack.federated.strategies import FedNova
    strategy = FedNova(fraction_train=1/3, fraction_evaluate=0.0)

Clients report ``num-steps`` (tau_i, the SGD steps they actually ran). FedAvg's plain average lets the
clients that ran more steps pull the model towards their own optimum (objective inconsistency). FedNova
averages the normalised updates d_i = (x - y_i) / tau_i with weights p_i = n_i / n and takes a step of
tau_eff = sum_i p_i tau_i: x+ = x - tau_eff * sum_i p_i d_i.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from tilestack.federated.strategies._util import metric, ok_replies, to_numpy, to_record


class FedNova(FedAvg):
    """FedNova over Flower's FedAvg sampling and messaging (vanilla local SGD: a_i = tau_i)."""

    # why a DP wrapper's noise (sized for one client's share of a mean) does not cover this aggregate
    # (checks.check_privacy reads it)
    NOT_A_MEAN = ("scales each client's update by tau_eff / its own steps, so a client that ran fewer steps than the "
                  "average (a straggler) moves the aggregate by more than clipping_norm / n")  # fmt: skip

    # the metric each update is divided by: ManagedGrid leaves out a training reply without it > 0, naming it
    # (run_rounds tells the grid); FedNova dropped such a reply itself, while the round counted it as aggregated. So is
    # one claiming more steps than the server asked of that client: tau_eff grows with the claim and scales every
    # other client's normalised update (1e30 overflowed the aggregate)
    STEPS_KEY = "num-steps"

    def __init__(self, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self._x: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._x = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in ok_replies(replies) if metric(m, self.STEPS_KEY) > 0]  # (outside run_rounds too)
        if not replies:
            return None, None
        n = np.array([metric(m, self.weighted_by_key) for m in replies])
        p = n / n.sum()
        tau = np.array([metric(m, self.STEPS_KEY) for m in replies])
        tau_eff = float((p * tau).sum())
        step = {k: np.zeros_like(v, dtype=np.float64) for k, v in self._x.items()}
        for pi, ti, m in zip(p, tau, replies, strict=True):
            y = to_numpy(next(iter(m.content.array_records.values())))
            for k in step:
                step[k] += pi * (self._x[k] - y[k]) / ti
        x_new = {k: self._x[k] - tau_eff * step[k] for k in self._x}  # float64, rounded once to the model's dtype
        metrics = aggregate_metricrecords([m.content for m in replies], self.weighted_by_key)
        return to_record(x_new, like=self._x), metrics
