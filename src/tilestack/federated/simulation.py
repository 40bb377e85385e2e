"""Run a federated task with a Flower strategy, on tilestack's in-process engine or on Flower's own.

    from flwr.serverapp.strategy import FedProx
    from tilestack.federated import Task, SystemModel, simulate
    task = Task(dataset="synthetic", alpha=1, beta=1, num_clients=30)
    result = simulate(FedProx(fraction_train=1/3, fraction_evaluate=0.0, proximal_mu=1.0), task, rounds=50,
                      engine="tilestack", system=SystemModel(30, straggler_fraction=0.5), seed=0)
    result.history.rounds[-1].test_acc

``engine="tilestack"`` runs the ``ClientApp`` in this process through :class:`InProcessGrid` (or in
``workers`` forked processes, no Ray);
``engine="flower"`` runs the same ``ServerApp`` logic and ``ClientApp`` in Flower's Simulation Engine
(``flwr.simulation.run_simulation`` on Ray). Both go through the same :class:`ManagedGrid` and
:func:`run_rounds`, and with the same seed they produce the same rounds, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from tilestack.errors import FederatedError
from tilestack.federated import client
from tilestack.federated.checks import (
    check_availability,
    check_stale,
    check_strategy,
    require_float_model,
    require_int,
    require_real_arrays,
    strategy_levels,
)
from tilestack.federated.client import TASK_KEY
from tilestack.federated.driver import RunResult, check_run_arguments, checkpoint_path, run_rounds
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.grid import ManagedGrid, check_straggler_policy
from tilestack.federated.metrics import RoundMetrics
from tilestack.federated.strategies.qffl import QFFL
from tilestack.federated.system import SystemModel
from tilestack.federated.task import Task

ENGINES = ("tilestack", "flower")


def initial_arrays(task: Task) -> ArrayRecord:
    """The task's initial global model as a Flower ``ArrayRecord``."""
    return client._to_record(task.initial_params())


def simulate(
    strategy: Strategy,
    task: Task,
    *,
    rounds: int,
    engine: str = "tilestack",
    system: SystemModel | None = None,
    stragglers: str = "partial",
    staleness_exponent: float = 0.5,
    max_staleness: int = 4,
    seed: int = 0,
    eval_clients: int = 200,
    evaluate: bool = True,
    checkpoint: str | Path | None = None,
    timeout: float | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    extra_metrics: Callable | None = None,
    stop_after: int | None = None,
    initial: ArrayRecord | None = None,
    flower_backend: dict | None = None,
    workers: int = 1,
) -> RunResult:
    """Run ``rounds`` rounds of ``strategy`` on ``task``; see the module doc for the engines. The run starts from
    ``initial``, or else the strategy's own ``initial_arrays(task)`` where it has one (IFCA, CFL), or the task's.
    ``stragglers`` says what becomes of a client the system's deadline cuts: 'partial' (its partial work), 'drop'
    (left out) or 'stale' (its whole work joins a later round, weighted by ``(1 + rounds late) **
    -staleness_exponent``, at most ``max_staleness`` rounds late: see ``staleness``)."""
    check_arguments(strategy, task, rounds=rounds, engine=engine, system=system, stragglers=stragglers, seed=seed,
                    eval_clients=eval_clients, timeout=timeout, stop_after=stop_after, initial=initial,
                    workers=workers, checkpoint=checkpoint, staleness_exponent=staleness_exponent,
                    max_staleness=max_staleness, on_round=on_round, extra_metrics=extra_metrics,
                    flower_backend=flower_backend)  # fmt: skip
    config = {TASK_KEY: task.to_json()}
    evaluator = Evaluator(task, eval_clients) if evaluate else None
    arrays = initial if initial is not None else initial_arrays_for(strategy, task)

    def drive(inner) -> RunResult:
        grid = ManagedGrid(inner, task, system=system, stragglers=stragglers, staleness_exponent=staleness_exponent,
                           max_staleness=max_staleness)  # fmt: skip
        return run_rounds(
            strategy, grid, arrays, num_rounds=rounds, train_config=config, evaluate_config=config,
            evaluator=evaluator, checkpoint=checkpoint, seed=seed, timeout=timeout, on_round=on_round,
            extra_metrics=extra_metrics, stop_after=stop_after,
        )  # fmt: skip

    if engine == "tilestack":
        grid = InProcessGrid(client.app, task.num_clients, seed=seed, workers=workers)
        try:
            return drive(grid)
        finally:
            grid.close()
    return _run_on_flower(drive, task.num_clients, flower_backend)


def initial_arrays_for(strategy: Strategy, task: Task) -> ArrayRecord:
    """The initial model of the first strategy in the chain that builds its own from the task (IFCA's K cluster
    models, CFL's one cluster), else the task's: IFCA started from the task's single model ended the run in round 1
    reading cluster numbers out of its array names."""
    for s in strategy_levels(strategy):
        if callable(getattr(type(s), "initial_arrays", None)):
            return s.initial_arrays(task)
    return initial_arrays(task)


def check_arguments(strategy: Strategy, task: Task, *, rounds, engine="tilestack", system=None, stragglers="partial",
                    seed=0, eval_clients=200, timeout=None, stop_after=None, initial=None, workers=1,
                    checkpoint=None, staleness_exponent=0.5, max_staleness=4, on_round=None, extra_metrics=None,
                    flower_backend=None) -> None:  # fmt: skip
    """Every argument of ``simulate`` (same names and defaults), before any data is built or any engine starts."""
    if not isinstance(task, Task):
        raise TypeError(f"simulate: task is a {type(task).__name__}; expected a tilestack.federated.Task")
    if engine not in ENGINES:
        raise ValueError(f"simulate: engine={engine!r}; expected one of {ENGINES}")
    check_run_arguments("simulate", rounds_name="rounds", rounds=rounds, seed=seed, timeout=timeout,
                        stop_after=stop_after, on_round=on_round, extra_metrics=extra_metrics)  # fmt: skip
    if flower_backend is not None and not isinstance(flower_backend, dict):  # (3 was ignored by the tilestack
        # engine and handed to Ray's backend by the flower one)
        raise TypeError(f"simulate: flower_backend is a {type(flower_backend).__name__}; expected a dict of Flower's "
                        "backend_config (e.g. {'client_resources': {'num_cpus': 1}}) or None")  # fmt: skip
    require_int("simulate", "eval_clients", eval_clients, low=1)
    require_int("simulate", "workers", workers, low=1)
    if workers != 1 and engine != "tilestack":  # (Flower's engine ran its own Ray workers, these ignored)
        raise ValueError(f"simulate: workers={workers} with engine={engine!r}, which runs its clients on Ray's own "
                         "workers (it was ignored); expected workers=1, or engine='tilestack' for worker processes")
    if system is not None and not isinstance(system, SystemModel):
        raise TypeError(f"simulate: system is a {type(system).__name__}; expected a SystemModel or None")
    check_straggler_policy("simulate", system, task, stragglers, staleness_exponent, max_staleness)
    if initial is not None and not isinstance(initial, ArrayRecord):
        raise TypeError(f"simulate: initial is a {type(initial).__name__}; expected an ArrayRecord or None")
    if initial is not None:
        require_real_arrays("simulate", "initial", initial)
        require_float_model("simulate", "initial", initial, task)
    check_strategy(strategy, task.num_clients, task)
    check_availability("simulate", strategy, system)
    if stragglers == "stale":
        check_stale(strategy)
    _check_weighting(strategy)
    if initial is not None:
        _check_initial(strategy, task, initial)
    checkpoint_path(checkpoint)


def _check_weighting(strategy: Strategy) -> None:
    """A ``weighted_by_key`` that tilestack's clients do not report made every round's aggregation fail in
    Flower (and, with federated evaluation, stopped the run after the first round); a ``train_loss_key`` they do
    not report (Flower's QFedAvg reads 'train_loss') stopped the run with an AggregationError after round 1's
    clients trained."""
    for s in strategy_levels(strategy):
        loss_key = vars(s).get("train_loss_key")
        reported = client.TRAIN_METRICS + ((client.START_LOSS_METRIC,) if isinstance(s, QFFL) else ())  # QFFL asks
        if isinstance(loss_key, str) and loss_key not in reported:
            raise FederatedError(
                f"{type(s).__name__}: train_loss_key={loss_key!r}; expected a metric tilestack's clients report in "
                f"every training reply: {'start-loss' if isinstance(s, QFFL) else 'train-loss'}"
            )
        key = vars(s).get("weighted_by_key")
        if key is None:
            continue
        evaluates = getattr(s, "fraction_evaluate", 0.0) > 0
        both = [k for k in client.TRAIN_METRICS if k in client.EVALUATE_METRICS]
        if key not in client.TRAIN_METRICS or (evaluates and key not in client.EVALUATE_METRICS):
            expected = both if evaluates else list(client.TRAIN_METRICS)
            raise FederatedError(
                f"{type(s).__name__}: weighted_by_key={key!r}; expected a metric tilestack's clients report in every "
                f"{'reply' if evaluates else 'training reply'}: one of {expected}"
            )


def _shapes(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(a.shape) for k, a in arrays.items()}


def _check_initial(strategy: Strategy, task: Task, initial: ArrayRecord) -> None:
    """``initial`` must be the task's model, or what the strategy builds from it (IFCA's and CFL's clusters):
    other arrays would make every client fail on them, round after round."""
    want = [_shapes(initial_arrays(task))]
    if hasattr(strategy, "initial_arrays"):
        want.append(_shapes(strategy.initial_arrays(task)))
    got = _shapes(initial)
    if got not in want:
        diff = sorted(k for k in got.keys() | want[0].keys() if got.get(k) != want[0].get(k))
        raise ValueError(
            f"simulate: initial has {', '.join(f'{k}: {got.get(k)}' for k in diff[:4])}; expected the task's model "
            f"({', '.join(f'{k}: {want[0].get(k)}' for k in diff[:4])})"
            + (" or the strategy's initial_arrays(task)" if len(want) > 1 else "")
        )


def _run_on_flower(drive: Callable, num_nodes: int, backend: dict | None) -> RunResult:
    """Run ``drive`` as the main of a Flower ``ServerApp`` in Flower's Simulation Engine (Ray)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    box: dict[str, RunResult] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        box["result"] = drive(grid)

    backend_config = backend or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(server_app=server_app, client_app=client.app, num_supernodes=num_nodes,
                   backend_config=backend_config)  # fmt: skip
    if "result" not in box:
        raise RuntimeError("simulate(engine='flower'): the ServerApp ended without a result (see Flower's log)")
    return box["result"]
