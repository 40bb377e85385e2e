"""The ServerApp for a real Flower deployment (SuperLink + SuperNodes), driven by the run config.

    # pyproject.toml of a Flower App:
    #   [tool.flwr.app.components]
    #   serverapp = "tilestack.federated.deploy:server_app"
    #   clientapp = "tilestack.federated.client:app"
    flwr run . local --run-config 'task="<Task JSON>" strategy="fedprox" num-rounds=5 clients-per-round=3
                                   result-path="/tmp/result.json"'

The same round loop, ``ManagedGrid`` and ClientApp as in simulation, over Flower's deployment grid: the
roll call really asks every SuperNode for its ``partition-id`` (set with ``--node-config``). Run-config
keys: ``task`` (a :class:`Task` as JSON), ``strategy`` (a name from ``strategies.NAMES``),
``num-rounds``, ``clients-per-round``, ``seed``, ``proximal-mu``, ``timeout``, and ``result-path``
where the history and final model are written as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tilestack.federated.client import TASK_KEY
from tilestack.federated.driver import run_rounds
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.grid import ManagedGrid
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import make_strategy
from tilestack.federated.task import Task

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    task = Task.from_json(str(cfg["task"]))
    strategy = make_strategy(
        str(cfg.get("strategy", "fedavg")),
        clients_per_round=int(cfg.get("clients-per-round", task.num_clients)),
        num_clients=task.num_clients,
        eval_fraction=float(cfg.get("eval-fraction", 1.0)),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
    )
    config = {TASK_KEY: task.to_json()}
    result = run_rounds(
        strategy,
        ManagedGrid(grid, task),
        initial_arrays(task),
        num_rounds=int(cfg.get("num-rounds", 3)),
        train_config=config,
        evaluate_config=config,
        evaluator=Evaluator(task),
        seed=int(cfg.get("seed", 0)),
        timeout=float(cfg.get("timeout", 120.0)),
    )
    out = result.history.to_dict() | {"arrays": {k: v.numpy().tolist() for k, v in result.arrays.items()}}
    Path(str(cfg["result-path"])).write_text(json.dumps(out))
