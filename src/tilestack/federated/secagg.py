"""Secure aggregation with Flower's SecAgg+ (Bell et al., CCS 2020): the server only sees the sum.

    from tilestack.federated.secagg import run_secure
    arrays = run_secure(task, rounds=3, per_round=5, engine="tilestack")     # or engine="flower"

Flower implements SecAgg+ as a server workflow (``SecAggPlusWorkflow``) and a client mod
(``secaggplus_mod``) on its legacy ``NumPyClient`` API, so this module gives the task a ``NumPyClient``
(:data:`secure_client_app`, the same local SGD as :mod:`client`) and drives Flower's ``DefaultWorkflow``
with the SecAgg+ fit workflow and Flower's legacy ``FedAvg``. Clients mask their quantised weighted
updates pairwise; the server unmasks only the sum, and survives dropouts up to the reconstruction
threshold. It runs over tilestack's in-process grid or Flower's simulation engine. Clients send their update
(trained - received model), which the server adds to the global model; quantisation clips each weighted value
to ``clipping_range`` and maps it onto ``quantization_range`` integers, so the secure average differs from the
plain one by about clipping_range / quantization_range per parameter. A client whose weighted update reaches
past ``clipping_range`` drops out of the round rather than be clipped inside the sum: before, clients sent their
model, and a model with weights beyond 8 (Flower's default range) was cut to 8 without a word (the secure model
2.5 off the plain one).

Client sampling (``per_round`` of the task's clients) is seeded per round from the task's seed, as are the
SecAgg+ neighbour shuffle and the clients' stochastic rounding in this process, so a run repeats bit for bit on
tilestack's engine and the secure run trains the clients the plain run trains (on Flower's engine the clients'
rounding is drawn in Ray's processes: repeats agree to the quantisation step).

Dropouts are the task's ``crash`` and ``slow`` faults (a slow client misses ``timeout``); the server
only ever sees the masked sum, so faults that corrupt an update (``nan``, ``shape``, ...) cannot be left
out and are refused up front. A client whose own training diverged (a non-finite update) drops out of the
round instead of sending it: quantised, NaN became arbitrary integers that the secure sum averaged in.
The task's malicious clients (``malicious_fraction``) poison their update as tilestack's ClientApp does: SecAgg+
hides each update, it does not make one honest.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import time

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from tilestack.errors import FederatedError
from tilestack.federated.checks import require_int, require_timeout
from tilestack.federated.client import TASK_KEY, _poison
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.models import local_sgd
from tilestack.federated.task import Task

log = logging.getLogger("tilestack.federated")
PARAMS_RECORD = "parameters"  # where Flower's DefaultWorkflow keeps the global model in the context state
CLIP_KEY = "tilestack.secagg-clip"  # fit config: SecAgg+'s clipping range (absent: no secure aggregation)
MAX_WEIGHT_KEY = "tilestack.secagg-max-weight"  # fit config: SecAgg+'s max_weight (it scales by n / max_weight)
CLIPPING_RANGE = 8.0  # Flower's SecAggPlusWorkflow default


class _TaskClient(NumPyClient):
    def __init__(self, pid: int):
        self.pid = pid

    def fit(self, parameters, config):
        task = Task.from_json(str(config[TASK_KEY]))
        fault = task.fault(self.pid)
        if fault == "crash":
            raise RuntimeError("simulated client crash (task.faults)")
        if fault == "slow":
            time.sleep(task.slow_seconds)
        keys = list(task.initial_params())
        start = dict(zip(keys, parameters, strict=True))
        x, y, _, _ = task.client_data(self.pid)
        rng = np.random.default_rng([task.seed, self.pid, int(config.get("server-round", 0)), 41])
        trained, _, loss = local_sgd(task.build_model(), start, x, y, steps=task.steps_for(self.pid),
                                     batch_size=task.batch_size, lr=task.lr, rng=rng)  # fmt: skip
        if task.is_malicious(self.pid):
            # poisoned as tilestack's ClientApp poisons it (client._poison): the secure client ignored
            # task.malicious_fraction, so a secure run "with 20% attackers" averaged honest updates only, without a word
            trained = _poison(task, start, trained, rng)
        update = {k: (trained[k] - start[k]).astype(start[k].dtype) for k in keys}
        bad = [k for k in keys if not np.all(np.isfinite(update[k]))]
        if bad:  # the server sees only the masked sum and cannot leave this update out: the client drops out
            raise FederatedError(
                f"client {self.pid}: its update has non-finite values in {bad[:3]}; it drops out of the round "
                "(quantised, they would have become arbitrary integers inside the secure sum)"
            )
        if CLIP_KEY in config:  # SecAgg+ clips each value times n / max_weight to the range, silently
            clip, weight = float(config[CLIP_KEY]), len(y) / float(config[MAX_WEIGHT_KEY])
            top = max(float(np.abs(u).max(initial=0.0)) for u in update.values())
            if top * weight > clip:
                raise FederatedError(
                    f"client {self.pid}: its update reaches {top:.4g} (x {weight:.3g}, its weight), beyond "
                    f"clipping_range={clip:g}; it drops out of the round (SecAgg+ would have clipped it inside the "
                    "secure sum); expected a larger clipping_range"
                )
        return [update[k] for k in keys], len(y), {"train-loss": loss}


def _client_fn(context: Context):
    return _TaskClient(int(context.node_config["partition-id"])).to_client()


secure_client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
plain_client_app = ClientApp(client_fn=_client_fn)  # the same client without the SecAgg+ mod


DROPOUT_FAULTS = ("crash", "slow")


class _CountedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit workflow, counting the rounds that reached the unmasked sum: a round with fewer
    survivors than the reconstruction threshold halts, and the model stays as it was."""

    completed = 0

    def unmask_stage(self, grid: Grid, context: Context, state) -> bool:
        done = super().unmask_stage(grid, context, state)
        self.completed += int(bool(done))
        return done


class _SeededFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg that seeds Python's ``random`` (its client sampling, SecAgg+'s neighbour shuffle)
    and ``np.random`` (SecAgg+'s stochastic rounding) from (seed, round) before each round: unseeded, two runs of
    the same task sampled different clients."""

    def __init__(self, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self._global: list[np.ndarray] = []

    def configure_fit(self, server_round, parameters, client_manager):
        self._global = parameters_to_ndarrays(parameters)
        x = int(np.random.SeedSequence([self.seed, server_round, SAMPLING_STREAM]).generate_state(1)[0])
        random.seed(x)
        np.random.seed(x)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        """The clients sent updates: the new model is the global one plus their (weighted) mean, in its dtype."""
        mean, metrics = super().aggregate_fit(server_round, results, failures)
        if mean is None:
            return None, metrics
        new = [(g + u).astype(g.dtype) for g, u in zip(self._global, parameters_to_ndarrays(mean), strict=True)]
        return ndarrays_to_parameters(new), metrics


SAMPLING_STREAM = 43  # keeps these seeds apart from the clients' minibatch streams


def _strategy(task: Task, per_round: int, secure: dict | None = None) -> LegacyFedAvg:
    """Flower's legacy FedAvg over ``per_round`` clients; ``secure``: the SecAgg+ settings the clients check their
    update against (CLIP_KEY, MAX_WEIGHT_KEY)."""
    init = task.initial_params()
    return _SeededFedAvg(
        seed=task.seed,
        fraction_fit=per_round / task.num_clients,
        fraction_evaluate=0.0,
        min_fit_clients=per_round,
        min_available_clients=task.num_clients,
        initial_parameters=ndarrays_to_parameters(list(init.values())),
        on_fit_config_fn=lambda rnd: {TASK_KEY: task.to_json(), "server-round": rnd, **(secure or {})},
    )


def _secure_main(task: Task, rounds: int, per_round: int, secagg: SecAggPlusWorkflow, box: dict):
    secure = {CLIP_KEY: float(secagg.clipping_range), MAX_WEIGHT_KEY: float(secagg.max_weight)}

    def main(grid: Grid, context: Context) -> None:
        strategy = _strategy(task, per_round, secure)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
        params = legacy.state.array_records[PARAMS_RECORD]
        box["arrays"] = dict(zip(task.initial_params(), (a.numpy() for a in params.values()), strict=True))

    return main


def run_secure(
    task: Task,
    *,
    rounds: int,
    per_round: int,
    num_shares: float = 1.0,
    reconstruction_threshold: float = 0.6,
    engine: str = "tilestack",
    timeout: float | None = None,
    clipping_range: float = CLIPPING_RANGE,
) -> dict[str, np.ndarray]:
    """FedAvg with SecAgg+ for ``rounds`` rounds; returns the final global model (name -> array).

    ``timeout``: seconds each SecAgg+ stage waits for the clients (None: as long as it takes);
    ``clipping_range``: the largest weighted update value SecAgg+ quantises (a client past it drops out)."""
    if not isinstance(task, Task):
        raise TypeError(f"run_secure: task is a {type(task).__name__}; expected a tilestack.federated.Task")
    require_int("run_secure", "rounds", rounds, low=0)
    require_int("run_secure", "per_round", per_round, low=2, high=task.num_clients)
    require_timeout("run_secure", timeout)
    # any real number (np.float32(8.0) was refused as "not a finite number > 0")
    ok = isinstance(clipping_range, numbers.Real) and not isinstance(clipping_range, bool)
    if not ok or not 0 < clipping_range < float("inf"):
        raise ValueError(f"run_secure: clipping_range={clipping_range!r}; expected a finite number > 0")
    if engine not in ("tilestack", "flower"):
        raise ValueError(f"run_secure: engine={engine!r}; expected 'tilestack' or 'flower'")
    corrupting = [f for f in task.faults if f[1] not in DROPOUT_FAULTS]
    if corrupting:
        raise ValueError(
            f"run_secure: task.faults has {corrupting[:3]}; expected only dropouts {DROPOUT_FAULTS} (the server "
            "sees only the masked sum, so it cannot leave out a corrupted update)"
        )
    for name, value in (("num_shares", num_shares), ("reconstruction_threshold", reconstruction_threshold)):
        # (NaN passed Flower's own checks, every comparison False, and failed here in round() as "cannot convert
        # float NaN to integer", naming neither argument; inf as an OverflowError)
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise ValueError(f"run_secure: {name}={value!r}; expected a finite number (an integer count or a float "
                             "share of the sampled clients)")
    # NumPy numbers as the plain ones they are (Flower checks isinstance(x, int | float): np.int64(3) shares or an
    # np.float32(0.6) threshold read from a config array were refused as "must be of type int or float")
    def plain(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return value
        return int(value) if isinstance(value, numbers.Integral) else float(value)

    num_shares, reconstruction_threshold = plain(num_shares), plain(reconstruction_threshold)
    # the clients scale their update by num_examples / max_weight before quantising: keep the ratio <= 1
    max_weight = max(1.0, *(float(task.num_train(p)) for p in range(task.num_clients)))
    try:
        secagg = _CountedSecAggPlus(num_shares=num_shares, reconstruction_threshold=reconstruction_threshold,
                                    max_weight=max_weight, timeout=timeout,
                                    clipping_range=float(clipping_range))  # fmt: skip
    except (TypeError, ValueError) as ex:
        raise ValueError(
            f"run_secure: num_shares={num_shares!r}, reconstruction_threshold={reconstruction_threshold!r}: {ex}"
        ) from ex
    _check_threshold(secagg, num_shares, reconstruction_threshold, per_round)
    box: dict = {}
    main = _secure_main(task, rounds, per_round, secagg, box)
    if engine == "tilestack":
        grid = InProcessGrid(secure_client_app, task.num_clients, seed=task.seed)
        main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    elif engine == "flower":
        from flwr.simulation import run_simulation

        server_app = ServerApp()
        server_app.main()(main)
        run_simulation(server_app=server_app, client_app=secure_client_app, num_supernodes=task.num_clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip
    if "arrays" not in box:
        raise RuntimeError("run_secure: the SecAgg+ workflow ended without a model (see Flower's log)")
    if rounds and not secagg.completed:
        raise FederatedError(
            f"run_secure: none of the {rounds} rounds reached the unmasked sum: fewer clients than "
            f"reconstruction_threshold={reconstruction_threshold!r} of per_round={per_round} survived each round "
            f"(crashed, late, or dropped out: an update not finite or beyond clipping_range={clipping_range:g}); "
            "expected enough survivors (a smaller threshold, fewer dropouts or a larger clipping_range)"
        )
    if secagg.completed < rounds:
        log.warning("run_secure: %d of %d rounds halted (too few survivors); the model skipped them",
                    rounds - secagg.completed, rounds)  # fmt: skip
    return box["arrays"]


def _check_threshold(secagg: SecAggPlusWorkflow, num_shares, reconstruction_threshold, per_round: int) -> None:
    """The shares and the reconstruction threshold each round resolves to over ``per_round`` sampled clients (Flower's
    ``SecAggPlusWorkflow.setup_stage`` arithmetic), refused before any work where no round can reach the unmasked sum
    or the threshold protects nothing: a threshold of 5 of 4 sampled clients (or num_shares=2.5 of 4: 10 shares, a
    threshold of 6) halted every round and the run ended blaming survivors though no client dropped; an integer
    threshold of 0 (or True) was taken, each key recoverable from no share at all."""
    if isinstance(reconstruction_threshold, bool) or isinstance(num_shares, bool):
        raise ValueError(f"run_secure: num_shares={num_shares!r}, reconstruction_threshold="
                         f"{reconstruction_threshold!r}; expected numbers (an integer count or a float share of the "
                         "sampled clients), not booleans")  # fmt: skip
    shares = secagg.num_shares
    if isinstance(shares, float):
        shares = round(shares * per_round)
        if shares < per_round and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = per_round
    threshold = secagg.reconstruction_threshold
    if isinstance(threshold, float):
        threshold = max(round(threshold * shares), 2)
    if not 2 <= threshold <= min(shares, per_round):
        raise ValueError(
            f"run_secure: reconstruction_threshold={reconstruction_threshold!r} with num_shares={num_shares!r} and "
            f"per_round={per_round} asks for {threshold} surviving clients of {min(shares, per_round)} holding shares; "
            f"expected a threshold from 2 to {min(shares, per_round)} (an integer count, or a float share in (0, 1])"
        )


def run_plain(task: Task, *, rounds: int, per_round: int) -> dict[str, np.ndarray]:
    """The same rounds without secure aggregation (Flower's DefaultWorkflow), to compare against."""
    if not isinstance(task, Task):  # (an AttributeError on .num_clients before)
        raise TypeError(f"run_plain: task is a {type(task).__name__}; expected a tilestack.federated.Task")
    require_int("run_plain", "rounds", rounds, low=0)
    require_int("run_plain", "per_round", per_round, low=1, high=task.num_clients)
    box: dict = {}

    def main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=_strategy(task, per_round))
        DefaultWorkflow()(grid, legacy)
        params = legacy.state.array_records[PARAMS_RECORD]
        box["arrays"] = dict(zip(task.initial_params(), (a.numpy() for a in params.values()), strict=True))

    grid = InProcessGrid(plain_client_app, task.num_clients, seed=task.seed)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return box["arrays"]


__all__ = ["run_secure", "run_plain", "secure_client_app", "plain_client_app"]
