"""q-FedAvg (q-FFL, Li et al., ICLR 2020): fairer accuracy across clients by weighting high-loss clients up.

    from tilestack.federated.strategies import QFFL
    strategy = QFFL(q=1.0, client_learning_rate=task.lr, fraction_train=0.5, fraction_evaluate=0.0)

A subclass of Flower's ``QFedAvg`` (its sampling, configuration and metrics). The aggregation, with
L = 1 / lr and F_k the loss of the global model on client k's training data: Delta_k = F_k^q L (w - w_k),
h_k = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q, and w <- w - sum Delta_k / sum h_k (q = 0 is the plain
mean of the client models). It is Flower's formula, done here in float64 over tilestack's array codec
(Flower's own decoding runs a full ``gc.collect()`` per reply: half a second each once torch is loaded).
F_k must be the loss *before* local training: this subclass asks the ClientApp for it
(``tilestack.start-loss`` in the config; the client replies ``start-loss``), where Flower's default key
would be the mean loss during training.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import QFedAvg

from tilestack.federated.checks import require_real
from tilestack.federated.client import START_LOSS_KEY, START_LOSS_METRIC
from tilestack.federated.strategies._util import metric, to_numpy, to_record

LOSS_EPS = 1e-10  # as Flower's QFedAvg: F_k^(q-1) stays finite at zero loss


class QFFL(QFedAvg):
    """Flower's QFedAvg fed with each client's loss at the global model (see module doc)."""

    def __init__(self, *, q: float = 1.0, client_learning_rate: float, **kwargs):
        require_real("QFFL", "q", q, lambda v: v >= 0, "a finite number >= 0")
        require_real("QFFL", "client_learning_rate", client_learning_rate, lambda v: v > 0, "a finite number > 0")
        super().__init__(client_learning_rate=client_learning_rate, q=q, train_loss_key=START_LOSS_METRIC, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[START_LOSS_KEY] = 1
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.current_arrays is None:
            return None, None
        lipschitz = 1.0 / self.client_learning_rate
        model = to_numpy(self.current_arrays)
        w = {k: v.astype(np.float64) for k, v in model.items()}
        num = {k: np.zeros_like(v) for k, v in w.items()}
        den = 0.0
        for m in valid:
            local = to_numpy(next(iter(m.content.array_records.values())))
            f = np.float64(metric(m, self.train_loss_key) + LOSS_EPS)
            grad = {k: lipschitz * (w[k] - local[k]) for k in w}  # L (w - w_k)
            sq = sum(float(np.vdot(g, g)) for g in grad.values())
            # NumPy's power, as Flower's (np.float_power): Python's float ** raised OverflowError out of the run for a
            # finite loss of 1e200 at q = 2; an overflow now makes the aggregate inf, which the driver rejects
            with np.errstate(over="ignore", invalid="ignore"):
                fq, fq1 = np.float_power(f, self.q), np.float_power(f, self.q - 1)
                for k in w:
                    num[k] += fq * grad[k]
                den += self.q * fq1 * sq + lipschitz * fq
        with np.errstate(over="ignore", invalid="ignore"):  # (inf / inf: NaN, rejected by the driver)
            new = {k: w[k] - num[k] / den for k in w}  # float64, rounded once to the model's dtype
        return to_record(new, like=model), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
