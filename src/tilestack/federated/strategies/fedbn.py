"""FedBN (Li et al., ICLR 2021): normalisation layers stay local, everything else is averaged.

    from tilestack.federated.strategies import FedBN
    strategy = FedBN(fraction_train=0.5, fraction_evaluate=1.0)     # with Task(model="mlp", norm=True)

Clients keep every array whose name starts with ``local_prefix`` (``bn.``: scale, shift and running
statistics) in their ``Context.state`` and do not upload it; the server averages the rest with Flower's
FedAvg and keeps its own copy of the normalisation arrays only so the global record stays complete.
Judge FedBN by federated evaluation (each client with its own normalisation), not by the server's model.
Any prefix works the same way: ``local_prefix='fc2.'`` keeps the MLP's head on each client (FedPer's
personalisation: a shared body, a head per client), scored per client in ``RoundMetrics.client_eval``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from tilestack.federated.client import LOCAL_PREFIX_KEY
from tilestack.federated.models import NORM_PREFIX


class FedBN(FedAvg):
    """FedAvg that leaves the normalisation layers (``local_prefix``) on the clients."""

    # what a training reply holds where it is not the global model's arrays (checks.check_privacy reads it)
    REPLIES_HOLD = "the global model's arrays less the local normalisation layers"

    def __init__(self, *, local_prefix: str = NORM_PREFIX, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        if not isinstance(local_prefix, str) or not local_prefix:  # (3 failed in str.startswith at check_task)
            raise ValueError(f"FedBN: local_prefix={local_prefix!r}; expected the name prefix of the local layers (a "
                             "non-empty str), e.g. 'bn.'")  # fmt: skip
        self.local_prefix = local_prefix
        self._local: dict = {}

    def check_task(self, task) -> None:
        """Refuse a ``local_prefix`` that names none of the task's model arrays, or all of them (run by ``simulate``
        and ``run_rounds`` before any work). Before, a prefix naming none (``'head.'`` for the MLP's ``fc2.``, the
        default ``'bn.'`` on a model without batch norm) ran as plain FedAvg, and one naming all (``'fc'``) kept
        every array on the clients: replies of no arrays, "aggregated", and nothing was ever federated."""
        names = sorted(task.initial_params())
        local = [k for k in names if k.startswith(self.local_prefix)]
        if not local:
            raise ValueError(
                f"FedBN: local_prefix={self.local_prefix!r} names none of the model's arrays {names} "
                f"(task.model={task.model!r}, norm={task.norm}); expected the prefix of the layers to keep on each "
                "client, e.g. 'bn.' (an MLP with norm=True) or 'fc2.' (the MLP's head, FedPer-style)"
            )
        if len(local) == len(names):
            raise ValueError(
                f"FedBN: local_prefix={self.local_prefix!r} names every array of the model {names}; expected a "
                "prefix that leaves some arrays to average (else each client trains alone)"
            )

    def _with_prefix(self, config: ConfigRecord) -> ConfigRecord:
        config[LOCAL_PREFIX_KEY] = self.local_prefix
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._local = {k: v for k, v in arrays.items() if k.startswith(self.local_prefix)}
        return super().configure_train(server_round, arrays, self._with_prefix(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self._with_prefix(config), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        return ArrayRecord({**{k: v for k, v in arrays.items()}, **self._local}), metrics
