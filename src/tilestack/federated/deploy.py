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
``num-rounds``, ``clients-per-round``, ``seed``, ``proximal-mu``, ``eval-fraction``, ``timeout``, and
``result-path`` where the history and final model are written as JSON. They are checked before the roll call
(``read_run_config``): an unknown key (``num_rounds`` for ``num-rounds``) or a value of the wrong kind
(``num-rounds=2.5``) is a ``ValueError`` naming it, where it used to be ignored or truncated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tilestack.errors import FederatedError
from tilestack.federated.checks import check_proximal
from tilestack.federated.client import TASK_KEY
from tilestack.federated.driver import check_run_arguments, run_rounds
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.grid import ManagedGrid
from tilestack.federated.simulation import initial_arrays_for
from tilestack.federated.strategies import make_strategy
from tilestack.federated.task import Task
from tilestack.files import write_atomic

server_app = ServerApp()

# run-config key -> (kind, default; None: required)
RUN_CONFIG: dict[str, tuple[type, object]] = {
    "task": (str, None), "result-path": (str, None), "strategy": (str, "fedavg"), "num-rounds": (int, 3),
    "clients-per-round": (int, None), "seed": (int, 0), "proximal-mu": (float, 0.0), "eval-fraction": (float, 1.0),
    "timeout": (float, 120.0),
}  # fmt: skip
OPTIONAL = ("clients-per-round",)  # defaults to every client


def read_run_config(cfg) -> dict:
    """The run config with defaults filled in; a missing, unknown or mistyped key is a ValueError naming it."""
    unknown = sorted(set(cfg) - set(RUN_CONFIG))
    if unknown:
        raise ValueError(f"run config: unknown key(s) {unknown}; expected keys among {sorted(RUN_CONFIG)}")
    out = {}
    for key, (kind, default) in RUN_CONFIG.items():
        if key not in cfg:
            if default is None and key not in OPTIONAL:
                raise ValueError(f"run config: {key!r} is missing; expected a {kind.__name__}")
            out[key] = default
            continue
        value = cfg[key]
        ok = isinstance(value, str) if kind is str else not isinstance(value, bool) and (
            isinstance(value, int) if kind is int else isinstance(value, (int, float)))  # fmt: skip
        if not ok:
            raise ValueError(f"run config: {key}={value!r}; expected a{'n' if kind is int else ''} {kind.__name__}")
        out[key] = kind(value)
    folder = Path(out["result-path"]).parent
    if not out["result-path"] or not folder.is_dir():  # found now, not after the last round
        raise ValueError(f"run config: result-path={out['result-path']!r}; expected a file path in an existing folder")
    if Path(out["result-path"]).is_dir():   # (a folder there failed only at the write, after the last round)
        raise ValueError(f"run config: result-path={out['result-path']!r} is a folder; expected a file path")
    try:
        out["task"] = Task.from_json(out["task"])
    except (ValueError, TypeError) as ex:  # JSON errors are ValueErrors; unknown Task fields TypeErrors
        raise ValueError(f"run config: task is not a Task as JSON ({ex})") from ex
    return out


# the library argument a refusal names -> the run-config key the user set it with
CONFIG_KEY_OF = {"name": "strategy", "clients_per_round": "clients-per-round", "eval_fraction": "eval-fraction",
                 "proximal_mu": "proximal-mu", "num_rounds": "num-rounds", "seed": "seed", "timeout": "timeout"}


def _config_error(cfg: dict, ex: Exception) -> ValueError:
    """``ex`` (a refusal in the library's words: ``make_strategy: name='nope'``) as a ValueError (a FederatedError
    where it was one) naming the run-config key behind the first argument it names (``run config: strategy='nope':
    ...``): the deployment's user set ``strategy``, ``num-rounds`` or ``eval-fraction``, which the library's ``name``,
    ``num_rounds`` and ``eval_fraction`` did not say."""
    message = str(ex)
    key = next((CONFIG_KEY_OF[n] for n in re.findall(r"\b([a-z_]+)=", message) if n in CONFIG_KEY_OF), None)
    kind = FederatedError if isinstance(ex, FederatedError) else ValueError
    return kind(f"run config: {message}" if key is None else f"run config: {key}={cfg[key]!r}: {message}")


def build_strategy(cfg: dict):
    """The run's strategy and its settings checked against the task (FedProx's mu against its lr) and the round
    loop's own arguments, before the roll call; a refusal names the run-config key."""
    task = cfg["task"]
    try:
        strategy = make_strategy(
            cfg["strategy"],
            clients_per_round=task.num_clients if cfg["clients-per-round"] is None else cfg["clients-per-round"],
            num_clients=task.num_clients,
            eval_fraction=cfg["eval-fraction"],
            proximal_mu=cfg["proximal-mu"],
        )
        check_proximal(strategy, task)
        check_run_arguments("run_rounds", rounds_name="num_rounds", rounds=cfg["num-rounds"], seed=cfg["seed"],
                            timeout=cfg["timeout"], stop_after=None)  # fmt: skip
    except (ValueError, TypeError, FederatedError) as ex:
        raise _config_error(cfg, ex) from ex
    return strategy


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = read_run_config(context.run_config)
    task = cfg["task"]
    strategy = build_strategy(cfg)
    config = {TASK_KEY: task.to_json()}
    result = run_rounds(
        strategy,
        ManagedGrid(grid, task),
        initial_arrays_for(strategy, task),  # IFCA's and CFL's cluster models, else the task's
        num_rounds=cfg["num-rounds"],
        train_config=config,
        evaluate_config=config,
        evaluator=Evaluator(task),
        seed=cfg["seed"],
        timeout=cfg["timeout"],
    )
    out = result.history.to_dict() | {"arrays": {k: v.numpy().tolist() for k, v in result.arrays.items()}}
    write_atomic(cfg["result-path"], json.dumps(out))  # the launcher reads it after the run: whole or absent
