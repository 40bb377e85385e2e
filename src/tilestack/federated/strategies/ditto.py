"""Ditto (Li et al., ICML 2021): a global model by FedAvg, and on each client a personal model pulled towards it.

    from tilestack.federated.strategies import Ditto
    strategy = Ditto(lam=0.1, fraction_train=0.5, fraction_evaluate=1.0)
    result = simulate(strategy, task, rounds=50)
    result.history.rounds[-1].client_eval        # each client's accuracy with its own personal model

A Flower ``FedAvg`` subclass: the global model is trained and averaged exactly as FedAvg's (the replies are the
clients' global-model updates). It puts ``tilestack.ditto-lambda`` in the train and evaluate configs; each sampled
client then also runs as many SGD steps on its personal model v_k (kept in its ``Context.state``, starting as the
global model it first receives) on F_k(v) + (lambda / 2) ||v - w||^2, w the global model of the round, and federated
evaluation scores v_k (a client that never trained scores the global model). lambda = 0 trains each personal model
alone; a large lambda keeps it at the global model. Personal models never leave the clients: they are not in the
server's model, and in a checkpoint only with the in-process engine's per-node state.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from tilestack.federated.checks import PROXIMAL_STEP_LIMIT, require_real
from tilestack.federated.client import DITTO_KEY


class Ditto(FedAvg):
    """FedAvg's global model, and a personal model per client (see module doc)."""

    def __init__(self, *, lam: float = 0.1, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        require_real("Ditto", "lam", lam, lambda v: v >= 0,
                     "a finite number >= 0 (the pull of each personal model towards the global one)")  # fmt: skip
        self.lam = float(lam)

    def check_task(self, task) -> None:
        """The personal step multiplies v - w by 1 - lr * lambda: from lr * lambda >= 2 on it overshoots the global
        model every step and the personal models diverge (the bound FedProx's term has)."""
        if task.lr * self.lam >= PROXIMAL_STEP_LIMIT:
            raise ValueError(
                f"Ditto: lam={self.lam:g} with the task's lr={task.lr:g}: lr * lam = {task.lr * self.lam:g} >= "
                f"{PROXIMAL_STEP_LIMIT:g} makes every personal step overshoot the global model; expected lam < "
                f"{PROXIMAL_STEP_LIMIT:g} / lr = {PROXIMAL_STEP_LIMIT / task.lr:g}"
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[DITTO_KEY] = self.lam
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[DITTO_KEY] = self.lam
        return super().configure_evaluate(server_round, arrays, config, grid)
