"""q-FedAvg (q-FFL, Li et al., ICLR 2020): fairer accuracy across clients by weighting high-loss clients up.

    from tilestack.federated.strategies import QFFL
    strategy = QFFL(q=1.0, client_learning_rate=task.lr, fraction_train=0.5, fraction_evaluate=0.0)

Flower's ``QFedAvg`` does the aggregation: with L = 1 / lr and F_k the loss of the global model on client
k's training data, Delta_k = F_k^q L (w - w_k), h_k = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q, and
w <- w - sum Delta_k / sum h_k (q = 0 is FedAvg with a step set by L). F_k must be the loss *before*
local training: this subclass asks the ClientApp for it (``tilestack.start-loss`` in the config; the
client replies ``start-loss``), where Flower's default key would be the mean loss during training.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import QFedAvg

from tilestack.federated.client import START_LOSS_KEY, START_LOSS_METRIC


class QFFL(QFedAvg):
    """Flower's QFedAvg fed with each client's loss at the global model (see module doc)."""

    def __init__(self, *, q: float = 1.0, client_learning_rate: float, **kwargs):
        if q < 0:
            raise ValueError(f"QFFL: q={q!r}; expected >= 0")
        if not client_learning_rate > 0:
            raise ValueError(f"QFFL: client_learning_rate={client_learning_rate!r}; expected > 0")
        super().__init__(client_learning_rate=client_learning_rate, q=q, train_loss_key=START_LOSS_METRIC, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[START_LOSS_KEY] = 1
        return super().configure_train(server_round, arrays, config, grid)
