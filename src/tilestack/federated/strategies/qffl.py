"""q-FedAvg (q-FFL, Li et al., ICLR 2020): fairer accuracy across clients by weighting high-loss clients up.

    from tilestack.federated.strategies import QFFL
    strategy = QFFL(q=1.0, client_learning_rate=task.lr, fraction_train=0.5, fraction_evaluate=0.0)

A subclass of Flower's ``QFedAvg`` (its sampling, configuration and metrics). The aggregation, with
L = 1 / lr and F_k the loss of the global model on client k's training data: Delta_k = F_k^q L (w - w_k),
h_k = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q, and w <- w - sum Delta_k / sum h_k (q = 0 is the plain
mean of the client models). It is Flower's formula, done here in float64 over tilestack's array codec
(Flower's own decoding runs a full ``gc.collect()`` per reply: half a second each once torch is loaded).
The sums are taken in log space, the common factor L divided out: Delta / h = sum_k c_k (w - w_k) with
c_k = exp(q ln F_k - ln sum_j (F_j^q + q F_j^(q-1) L ||w - w_j||^2)), each in [0, 1]. F_k^q of a loss of 1e200 at
q = 2, or of 2.3 at q = 1000, overflowed float64 (and losses below 1 at q = 1000 underflowed to 0 / 0), the round
rejected as non-finite: the rule itself is finite there (the client of the largest loss takes the weight). ``q`` is
refused past ``Q_LIMIT``, where q ln F_k, rounded in float64, leaves F_k^q more than 1% off for losses in float's range.
F_k must be the loss *before* local training: this subclass asks the ClientApp for it
(``tilestack.start-loss`` in the config; the client replies ``start-loss``), where Flower's default key
would be the mean loss during training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import QFedAvg

from tilestack.federated.checks import QFFL_LR_EXPECTED, QFFL_LR_RANGE, require_real
from tilestack.federated.client import START_LOSS_KEY, START_LOSS_METRIC
from tilestack.federated.strategies._util import metric, to_numpy, to_record

LOSS_EPS = 1e-10  # as Flower's QFedAvg: F_k^(q-1) stays finite at zero loss
# |ln F| of a loss F + LOSS_EPS in float64's range is at most ln(max / LOSS_EPS) (~733); q ln F is rounded to a relative
# eps(float64), so F^q = exp(q ln F) is off by a factor exp(q x 733 x eps): past this q that is more than 1%
WEIGHT_REL_ERROR = 0.01
LOG_LOSS_SPAN = math.log(float(np.finfo(np.float64).max)) - math.log(LOSS_EPS)
Q_LIMIT = WEIGHT_REL_ERROR / (float(np.finfo(np.float64).eps) * LOG_LOSS_SPAN)


class QFFL(QFedAvg):
    """Flower's QFedAvg fed with each client's loss at the global model (see module doc)."""

    def __init__(self, *, q: float = 1.0, client_learning_rate: float, **kwargs):
        require_real("QFFL", "q", q, lambda v: 0 <= v <= Q_LIMIT,
                     f"a number in [0, {Q_LIMIT:.3g}] (past it the weights F_k^q carry over 1% float64 rounding)")
        low, high = QFFL_LR_RANGE
        require_real("QFFL", "client_learning_rate", client_learning_rate, lambda v: low <= v <= high, QFFL_LR_EXPECTED)
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
        log_lipschitz = -math.log(self.client_learning_rate)  # ln L, L = 1 / lr (finite for any lr > 0)
        model = to_numpy(self.current_arrays)
        w = {k: v.astype(np.float64) for k, v in model.items()}
        moves, log_fq, log_h = [], [], []  # per client: w - w_k, ln F_k^q, ln (h_k / L)
        # (an infinite move or loss, outside run_rounds' checks: NaN or inf in the aggregate, which the driver rejects)
        with np.errstate(over="ignore", invalid="ignore"):
            for m in valid:
                local = to_numpy(next(iter(m.content.array_records.values())))
                move = {k: w[k] - local[k] for k in w}
                log_f = math.log(metric(m, self.train_loss_key) + LOSS_EPS)
                sq = sum(float(np.vdot(d, d)) for d in move.values())  # ||w - w_k||^2
                a = self.q * log_f if self.q > 0 else 0.0  # ln F_k^q
                # ln (q F_k^(q-1) L ||w - w_k||^2): -inf where q = 0 or the client did not move
                moved = self.q > 0 and sq > 0
                b = math.log(self.q) + (self.q - 1) * log_f + log_lipschitz + math.log(sq) if moved else -math.inf
                moves.append(move)
                log_fq.append(a)
                log_h.append(np.logaddexp(a, b))
            coef = np.exp(np.array(log_fq) - np.logaddexp.reduce(log_h))  # (K,) F_k^q / (sum_j h_j / L), in [0, 1]
            new = {k: w[k] - sum(c * mv[k] for c, mv in zip(coef, moves, strict=True)) for k in w}  # float64, rounded
        # once to the model's dtype
        return to_record(new, like=model), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
