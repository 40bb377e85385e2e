"""Heterogeneous federated learning on Flower.

    from flwr.serverapp.strategy import FedProx
    from tilestack.federated import Task, SystemModel, simulate
    task = Task(dataset="synthetic", alpha=1, beta=1, num_clients=30)
    result = simulate(FedProx(fraction_train=1/3, proximal_mu=1.0), task, rounds=50,
                      system=SystemModel(30, straggler_fraction=0.5))

Layers: data (``synthetic``, ``partition``, ``task``), models and local training (``models``), the
ClientApp (``client``), strategies (``strategies``: Flower's own and tilestack's Flower subclasses),
system heterogeneity (``system``), transport (``engine`` in-process, Flower's simulation, or a
deployment, all under ``grid.ManagedGrid``), the round loop (``driver``), the argument checks every entry
point runs before any work (``checks``), ``metrics`` and ``plots``.
See docs/federated.md.
"""

from tilestack.federated.driver import RunResult, run_rounds
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.grid import ManagedGrid
from tilestack.federated.metrics import History, RoundMetrics, fairness
from tilestack.federated.simulation import initial_arrays, simulate
from tilestack.federated.synthetic import Synthetic
from tilestack.federated.system import SystemModel
from tilestack.federated.task import Task

__all__ = [
    "Evaluator", "History", "InProcessGrid", "ManagedGrid", "RoundMetrics", "RunResult", "Synthetic",
    "SystemModel", "Task", "fairness", "initial_arrays", "run_rounds", "simulate",
]  # fmt: skip
