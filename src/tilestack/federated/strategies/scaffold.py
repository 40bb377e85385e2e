"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift.

    from tilestack.federated.strategies import Scaffold
    strategy = Scaffold(fraction_train=0.1, fraction_evaluate=0.0, global_lr=1.0)

A Flower ``FedAvg`` subclass. Each round the server sends its control variate ``c`` beside the model
(a second ArrayRecord, ``scaffold-c``); the ClientApp keeps its own ``c_i`` in its ``Context.state``,
corrects every local gradient by ``c - c_i``, and returns its model with ``c_i+ - c_i`` (keys
``scaffold.dc.*``). The server moves x by ``global_lr`` times the mean update and
c by ``|S| / N`` times the mean of the ``c_i`` changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from tilestack.federated.checks import SERVER_STEP_LIMIT
from tilestack.federated.client import SCAFFOLD_C, SCAFFOLD_DC_PREFIX
from tilestack.federated.strategies._util import ok_replies, to_numpy, to_record, with_content


def _check_global_lr(global_lr) -> None:
    """A finite number in (0, SERVER_STEP_LIMIT): a NumPy scalar (np.float32(1.0), read from a config array) is a
    number too; at 1e300 every aggregate overflowed and was rejected, the model never moving."""
    number = isinstance(global_lr, numbers.Real) and not isinstance(global_lr, bool) and math.isfinite(global_lr)
    if not number or not 0 < global_lr < SERVER_STEP_LIMIT:
        raise ValueError(f"Scaffold: global_lr={global_lr!r}; expected a finite number > 0 and < 2**23 = "
                         f"{SERVER_STEP_LIMIT:.0f} (past it the server step is float32 rounding)")  # fmt: skip


class Scaffold(FedAvg):
    """SCAFFOLD on top of Flower's FedAvg (sampling, message construction, weighted averaging)."""

    # what a training reply holds where it is not the global model's arrays (checks.check_privacy reads it)
    REPLIES_HOLD = "the model and the client's control-variate change (scaffold.dc.*)"
    # what client-side DP clipping leaves unprotected (checks.check_privacy reads it)
    UNCLIPPED = ("control-variate changes c_i+ - c_i = (x - y_i) / (K lr) - c: each client's unclipped update, "
                 "averaged into c and sent to every client without noise")  # fmt: skip

    def __init__(self, *, global_lr: float = 1.0, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        _check_global_lr(global_lr)
        self.global_lr = global_lr
        self.c: dict[str, np.ndarray] | None = None
        self._x: dict[str, np.ndarray] = {}
        self._population = 1

    def check_task(self, task) -> None:
        """``global_lr`` again before any work (run by ``simulate`` and ``run_rounds``): set after construction, 1e300
        overflowed every aggregate, each rejected, the model never moving."""
        _check_global_lr(self.global_lr)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._x = to_numpy(arrays)
        if self.c is None:
            self.c = {k: np.zeros_like(v) for k, v in self._x.items()}
        # N of |S| / N is every node, also when a selector shows this strategy only the chosen ones.
        self._population = getattr(grid, "population", None) or len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        c_record = to_record(self.c)
        return [with_content(m, RecordDict({**m.content, SCAFFOLD_C: c_record})) for m in messages]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ok_replies(replies)
        model_replies, deltas = [], []
        for m in replies:
            arrays = to_numpy(next(iter(m.content.array_records.values())))
            deltas.append(
                {k.removeprefix(SCAFFOLD_DC_PREFIX): v for k, v in arrays.items() if k.startswith(SCAFFOLD_DC_PREFIX)}
            )
            model = {k: v for k, v in arrays.items() if not k.startswith(SCAFFOLD_DC_PREFIX)}
            metrics = next(iter(m.content.metric_records.values()))
            model_replies.append(with_content(m, RecordDict({"arrays": to_record(model), "metrics": metrics})))
        avg, metrics = super().aggregate_train(server_round, model_replies)
        if avg is None:
            return None, metrics
        mean = to_numpy(avg)
        x_new = {k: self._x[k] + self.global_lr * (mean[k] - self._x[k]) for k in self._x}
        if deltas and self.c is not None and all(deltas):
            share = len(deltas) / self._population
            # c keeps the model's dtype: the replies reach the strategy in float64 (grid.for_aggregation), and
            # stay float64 through the inner FedAvg (to_record keeps dtypes), so the mean is exact to float64
            self.c = {k: (self.c[k] + share * np.mean([d[k] for d in deltas], axis=0)).astype(self.c[k].dtype)
                      for k in self.c}  # fmt: skip
        return to_record(x_new, like=self._x), metrics  # computed in float64, rounded once
