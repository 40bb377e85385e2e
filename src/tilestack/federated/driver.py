"""The round loop: Flower ``Strategy`` hooks over a ``ManagedGrid``, with metrics, checkpoints and resume.

    from tilestack.federated.driver import run_rounds
    result = run_rounds(strategy, grid, initial_arrays, num_rounds=50, train_config=cfg,
                        evaluator=Evaluator(task), checkpoint="run.ckpt", seed=0)
    result.arrays, result.history.rounds[-1].test_acc

It calls the strategy exactly as Flower's ``Strategy.start`` does (configure_train, send, aggregate_train,
configure_evaluate, send, aggregate_evaluate, then server-side evaluation), and adds what ``start`` lacks:

- Seeding: Flower's node sampling uses Python's global ``random`` and its differential-privacy noise
  NumPy's global ``np.random``, and neither takes a seed; the loop seeds both from (seed, round, phase)
  just before each configure and aggregate call, so a run (DP included) is reproducible, resumes bit for
  bit, and engines can be compared.
- Checks: the loop's arguments, the initial arrays (real numbers numpy can hold: not bfloat16), and the
  strategy's sampling settings against the nodes that answered the roll call (``checks.check_strategy``:
  Flower's ``sample_nodes`` would otherwise wait forever for nodes that never come), are checked before the
  first round.
- Round config: the local training settings ``train_config`` sets (``lr``, ``local-epochs``, ``local-steps``,
  ``batch-size``: what tilestack's ClientApp reads, ``client.CONFIG_OVERRIDES``) are checked as Task fields before
  any work, FedProx's step bound against them, and they are part of the run a checkpoint records; a key no client
  reads is named in a warning.
- Accounting: a round whose strategy returned no model (Bulyan with fewer than 4f + 3 replies, every
  reply left out) reports ``num_aggregated=0`` and why in ``RoundMetrics.skipped``; so does one where dropouts or
  faults leave a Krum / MultiKrum fewer than 2f + 3 replies or a FedTrimmedAvg too few to trim one
  (``checks.robust_short``: their tolerance would not hold, and Flower ran them anyway). A round with no replies at
  all (nobody sampled, every client failed) does not call ``aggregate_train``: there is nothing to aggregate, and
  Flower's adaptive-clipping DP wrappers ended the run dividing their clipped share by zero replies.
  The metrics the strategy aggregates (Flower's: weighted by each client's examples) are kept per round in
  ``RoundMetrics.train_metrics`` and ``eval_metrics``, each client's own in ``client_train`` and ``client_eval``.
- Availability: with clients offline by the system model's availability, a round whose strategy needs more nodes
  than are online (``min_available_nodes``, ``min_train_nodes``) is not configured: it is skipped saying so
  (``checks.nodes_short``), where Flower's sampling would poll for them forever; so is its federated evaluation.
- Safety: an aggregate with a non-finite value is rejected (the global model stays as it was, the reason
  is logged) - the server never adopts a NaN - and the strategy's own state goes back to what it was before
  that aggregation (FedAvgM's momentum and model, FedAdam's moments), so one overflow cannot make every
  later round NaN. An aggregate keeps the global model's dtypes (Flower's FedAdam returns float64 from a
  float32 model, which doubled every later round's download). Weights past 2**500 (the strategy's
  ``weighted_by_key``) are scaled by one power of two before the strategy aggregates, every share unchanged
  (``summable_weights``): two replies claiming 1e308 examples summed to inf in Flower's mean and zeroed the model.
- Privacy budget: a DP wrapper whose accountant's ``max_epsilon`` the next round would pass (Flower raises
  ``PrivacyBudgetExhausted`` in its configure_train) ends the run there: the result holds the rounds released and says
  why in ``RunResult.stopped``, where the exception ended the call and the model trained so far was lost with it.
- Resume: after every completed round the server state (round, global arrays, the strategy object with
  its own state such as server-optimiser moments or SCAFFOLD's c, metrics, and the in-process engine's
  per-client state) is written to ``checkpoint`` atomically (temporary file, fsync, rename); a later call
  with the same checkpoint starts after the last completed round. The checkpoint records what run it
  belongs to (strategy and its settings, task, system model, seed, node count, array names, shapes and
  dtypes); resuming another run (a changed ``proximal_mu`` or dropout rate too, a float64 model for a float32
  one), or a file that is not a whole checkpoint, is refused with a :class:`~tilestack.errors.FederatedError`
  naming what differs, and so is a checkpoint that already holds more rounds than asked for (its model is not the
  asked run's). A run interrupted mid-round (Ctrl-C, a crash) leaves the last completed round's checkpoint.
  A strategy setting that does not pickle (a lambda as HeteroFL's ``width_of``) is left out of the checkpoint
  and taken from the resuming call's strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import pickle
import random
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies, PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from tilestack.errors import FederatedError
from tilestack.federated import codec
from tilestack.federated.checks import (
    DP_WRAPPERS,
    PROXIMAL_STEP_LIMIT,
    check_availability,
    check_stale,
    check_strategy,
    nodes_short,
    require_float_model,
    require_int,
    require_real,
    require_real_arrays,
    require_timeout,
    robust_short,
    strategy_levels,
)
from tilestack.federated.client import CLUSTER_SEP, CONFIG_OVERRIDES, PARTITION_METRIC, TASK_KEY, task_from_config
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.grid import ManagedGrid
from tilestack.federated.metrics import History, RoundMetrics, fairness
from tilestack.federated.run_state import (  # noqa: F401  (save_checkpoint, load_checkpoint: the public names here too)
    _fresh_clients,
    _Pickler,
    _ran_round,
    _restore_strategy,
    _snapshot,
    _start_afresh,
    _strategy_state,
    load_checkpoint,
    save_checkpoint,
)
from tilestack.federated.task import Task
from tilestack.files import LockHeldError, held_lock

log = logging.getLogger("tilestack.federated")
ROUND_SEED_STRIDE = 1_000_003
AGGREGATE_PHASE = 2  # seeds of phases 0 (configure train) and 1 (configure evaluate) come from _round_seed


@dataclasses.dataclass
class RunResult:
    arrays: ArrayRecord
    history: History
    strategy: Strategy
    stopped: str = ""
    """Why the run ended before ``num_rounds`` ('' when it did not): a DP accountant's ``max_epsilon`` reached."""


def _round_seed(seed: int, server_round: int, phase: int) -> int:
    return (seed * ROUND_SEED_STRIDE + server_round) * 2 + phase


def _seed_global_rngs(seed: int, server_round: int, phase: int) -> None:
    """Seed Python's ``random`` (Flower's node sampling) and ``np.random`` (Flower's DP noise)."""
    if phase == AGGREGATE_PHASE:  # a stream apart from the configure phases' (their formula predates it)
        x = int(np.random.SeedSequence([seed, server_round, phase]).generate_state(1)[0])
    else:
        x = _round_seed(seed, server_round, phase)
    random.seed(x)
    np.random.seed(x % 2**32)


def strategy_name(strategy: Strategy) -> str:
    """The strategy's class, with those of the strategies it wraps: ``Selected(Scaffold)``."""
    inner = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    name = type(strategy).__name__
    return f"{name}({strategy_name(inner)})" if isinstance(inner, Strategy) else name


def _settings(strategy: Strategy) -> dict[str, str]:
    """The plain settings (numbers, strings) of the strategy and of the strategies it wraps, as text (NaN equals
    NaN). Taken before any round: the resumed strategy's state comes from the checkpoint, settings included, so a
    changed ``proximal_mu`` would have been replaced by the checkpoint's without a word. None is left out: it
    marks state not made yet (FedAdam's moments), which a strategy object run before no longer holds. The plain
    settings of the helpers a level holds (``Selected``'s selector: its seed, Oort's alpha) count too: the resumed
    strategy takes the checkpoint's helper whole, so a run resumed with ``RandomSelector(5)`` picked clients by the
    checkpoint's ``RandomSelector(0)`` without a word. So do the fields of a helper's ``config`` dataclass (Flower's
    privacy accountant: its target_delta, population and max_epsilon, which the checkpoint's accountant replaced)."""

    def plain(obj) -> dict[str, object]:
        return {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, (numbers.Number, str))}

    out = {}
    for s in strategy_levels(strategy):
        for k, v in plain(s).items():
            out[f"{type(s).__name__}.{k}"] = repr(v)
        for k, helper in vars(s).items():
            if k.startswith("_") or isinstance(helper, (Strategy, type, types.ModuleType)) or callable(helper):
                continue
            if hasattr(helper, "__dict__"):
                for hk, hv in plain(helper).items():
                    out[f"{type(s).__name__}.{k}.{hk}"] = repr(hv)
            config = getattr(helper, "config", None)
            if dataclasses.is_dataclass(config) and not isinstance(config, type):
                for field in dataclasses.fields(config):
                    out[f"{type(s).__name__}.{k}.config.{field.name}"] = repr(getattr(config, field.name))
    return out


SYSTEM_ARRAYS = ("speeds", "bandwidths")  # SystemModel fields recorded by digest, not value


def _system(grid: ManagedGrid) -> dict[str, str] | None:
    """The system model and straggler policy (what each client is asked to do and who drops out)."""
    system = grid.system
    if system is None:
        return None
    arrays = (*SYSTEM_ARRAYS, "availability")
    out = {f.name: repr(getattr(system, f.name)) for f in dataclasses.fields(system) if f.name not in arrays}
    digest = hashlib.sha256(b"".join(np.asarray(getattr(system, f), np.float64).tobytes() for f in SYSTEM_ARRAYS))
    out |= {"stragglers": grid.stragglers, "speeds and bandwidths (sha256)": digest.hexdigest()[:16]}
    if grid.stragglers == "stale":
        out |= {"staleness_exponent": repr(grid.staleness_exponent), "max_staleness": repr(grid.max_staleness)}
    if system.availability is not None:  # (a checkpoint of a run without it has no such entry)
        pattern = np.asarray(system.availability, np.float64)
        digest = hashlib.sha256(repr(pattern.shape).encode() + pattern.tobytes())
        out["availability (sha256)"] = digest.hexdigest()[:16]
    return out


def run_signature(strategy: Strategy, grid: ManagedGrid, arrays: ArrayRecord, seed: int, task=None) -> dict:
    """What a checkpoint must agree on with the run that resumes it (``task``: the one the train config sends, with
    its local training settings; the grid's by default)."""
    return {
        "strategy": strategy_name(strategy),
        "task": (task or grid.task).to_json(),
        "seed": seed,
        "nodes": len(list(grid.get_node_ids())),
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: str(v.dtype) for k, v in arrays.items()},  # a float64 model is another run than float32
        "settings": _settings(strategy),
        "system": _system(grid),
    }


def check_signature(saved: dict | None, now: dict, path: Path) -> None:
    if saved is None:
        raise FederatedError(f"checkpoint={str(path)!r} records no run signature; expected one written by this version")
    diff = [k for k in now if k in saved and saved[k] != now[k]]  # (older checkpoints lack settings and system)
    for part in diff:  # name the entries that differ (settings, the task's and system model's fields), not all
        a, b = saved[part], now[part]
        if part == "task" and isinstance(a, str) and isinstance(b, str):  # a Task as JSON
            with contextlib.suppress(ValueError):
                a, b = json.loads(a), json.loads(b)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            saved = {**saved, part: {k: a.get(k) for k in keys}}
            now = {**now, part: {k: b.get(k) for k in keys}}
    if diff:
        lines = "; ".join(f"{k}: checkpoint has {_short(saved.get(k))}, this run has {_short(now[k])}" for k in diff)
        raise FederatedError(f"checkpoint={str(path)!r} belongs to another run ({lines}); expected the same run")


def _short(v, limit: int = 160) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def skip_reason(strategy: Strategy, num_replies: int, num_sent: int | None = None) -> str:
    """Why ``strategy`` returned no model from ``num_replies`` replies (to ``num_sent`` messages, if known)."""
    if num_sent == 0:
        return "no clients were sampled for training"
    if num_replies == 0:
        return "no replies to aggregate"
    sampled = getattr(strategy, "num_sampled_clients", None)
    if getattr(strategy, "accountant", None) is not None and sampled is not None and num_replies != sampled:
        return (f"{strategy_name(strategy)} with a privacy accountant needs all {sampled} sampled replies "
                f"(the accounted sample size), got {num_replies}")  # fmt: skip
    f = getattr(strategy, "num_malicious_nodes", None)
    if type(strategy).__name__ == "Bulyan" and f is not None and num_replies < 4 * f + 3:
        return f"Bulyan needs >= 4f+3 = {4 * f + 3} replies (f={f}), got {num_replies}"
    return f"{strategy_name(strategy)}.aggregate_train returned no model from {num_replies} replies"


@contextlib.contextmanager
def _noise_for(strategy: Strategy, num_replies: int, server_round: int):
    """Flower's DP wrappers without an accountant draw noise of std noise_multiplier * C / num_sampled_clients and
    add it to the mean of the replies that came, whatever their number: with clients dropped out, crashed or left
    out, the mean of n < num_sampled_clients clipped updates moves by up to C / n per client, and the run was
    noised for fewer clients than it averaged (noise multiplier sigma * n / num_sampled_clients, without a word).
    While the round aggregates, each such wrapper is told the n replies it averages, so its noise keeps the
    configured multiplier. With an accountant a short round is skipped instead (Flower's strict check). A strategy
    under the wrapper whose means are over fewer replies (HeteroFL: units only wider clients hold) is told the noise,
    and adds what its elements lack (``_dp_noise``). Flower's server-side clipping is made safe for an update of norm 0
    meanwhile (``_clip_scale``)."""
    from flwr.serverapp.strategy import dp_adaptive_clipping, dp_fixed_clipping

    patched = [(dp_fixed_clipping, "compute_clip_model_update", _clip_model_update),
               (dp_adaptive_clipping, "adaptive_clip_inputs_inplace", _adaptive_clip_inplace)]  # fmt: skip
    saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
    changed, told = [], []
    try:
        for module, name, safe in patched:
            setattr(module, name, safe)
        levels = strategy_levels(strategy)
        for i, s in enumerate(levels):
            if not isinstance(s, DP_WRAPPERS):
                continue
            sampled = vars(s).get("num_sampled_clients")
            if getattr(s, "accountant", None) is None and isinstance(sampled, int) and 0 < num_replies < sampled:
                log.info("round %d: %s noised for the %d replies it averages (num_sampled_clients=%d)", server_round,
                         type(s).__name__, num_replies, sampled)  # fmt: skip
                changed.append((s, sampled))
                s.num_sampled_clients = num_replies
            for inner in levels[i + 1 :]:  # a strategy whose means are over fewer replies tops it up (HeteroFL)
                if "_dp_noise" in vars(inner):
                    inner._dp_noise = (float(s.noise_multiplier) * float(s.clipping_norm), int(s.num_sampled_clients))
                    told.append(inner)
        yield
    finally:
        for s, sampled in changed:
            s.num_sampled_clients = sampled
        for inner in told:
            inner._dp_noise = None
        for module, name, original in saved:
            setattr(module, name, original)


WEIGHT_LIMIT = 2.0**500  # no count of examples comes near it; a weight share w / sum is the same at any scale


def summable_weights(replies: list[Message], keys: frozenset[str]) -> list[Message]:
    """``replies`` with each weight metric (``keys``: the strategy's ``weighted_by_key``) scaled by one power of two
    (exact: each reply's share w / sum is unchanged) where the largest passes ``WEIGHT_LIMIT``: two replies claiming
    1e308 examples each summed to inf in Flower's mean, every share became w / inf = 0, and the global model was
    replaced by zeros, finite and without a word (tilestack's FedNova kept it, its weights dividing to 0); the
    evaluation metrics became 0 the same way."""
    for key in keys:
        weights = [float(rec[key]) for m in replies if not m.has_error()
                   for rec in m.content.metric_records.values() if key in rec]  # fmt: skip
        if not weights or max(weights) <= WEIGHT_LIMIT:
            continue
        shift = math.frexp(max(weights))[1]
        scale = 2.0**-shift  # the largest weight in [0.5, 1)
        log.warning("weights %r up to %g scaled by 2**-%d so that their sum is finite", key, max(weights), shift)
        out = []
        for m in replies:
            if m.has_error():
                out.append(m)
                continue
            content = RecordDict()
            for name, rec in m.content.items():
                if isinstance(rec, MetricRecord) and key in rec:
                    rec = MetricRecord({k: float(v) * scale if k == key else v for k, v in rec.items()})
                content[name] = rec
            out.append(Message(content=content, metadata=m.metadata))
        replies = out
    return replies


def _clip_scale(update: list[np.ndarray], clipping_norm: float) -> float:
    """Flower's FlatClip factor min(1, C / ||update||), 1 for an update of norm 0: Flower divided by the norm, so one
    client that sent the global model back unchanged (a free rider, a client with nothing to learn) ended a server-side
    DP run with ZeroDivisionError inside the wrapper's clipping."""
    from flwr.supercore.differential_privacy import get_norm

    norm = get_norm(update)
    return 1.0 if norm == 0 else min(1, clipping_norm / norm)


def _clip_model_update(param1: list[np.ndarray], param2: list[np.ndarray], clipping_norm: float) -> None:
    """Flower's ``compute_clip_model_update`` (param1 becomes param2 plus the clipped update), safe for a 0 update."""
    update = [np.subtract(x, y) for x, y in zip(param1, param2, strict=True)]
    scale = _clip_scale(update, clipping_norm)
    for array in update:
        array *= scale
    for i, _ in enumerate(param2):
        param1[i] = param2[i] + update[i]


def _adaptive_clip_inplace(input_arrays: list[np.ndarray], clipping_norm: float) -> bool:
    """Flower's ``adaptive_clip_inputs_inplace`` (clip in place; whether it scaled), safe for a zero update."""
    scale = _clip_scale(input_arrays, clipping_norm)
    for array in input_arrays:
        array *= scale
    return scale < 1


def _plain_metrics(record) -> dict:
    """A strategy's aggregated MetricRecord as plain numbers (JSON, checkpoints), less the clients' partition ids
    (their weighted mean means nothing)."""
    if record is None:
        return {}
    out = {}
    for k, v in record.items():
        if k != PARTITION_METRIC:
            out[k] = [float(x) for x in v] if isinstance(v, list) else float(v)
    return out


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.all(np.isfinite(codec.decode(a))) for a in arrays.values())


def _with_dtypes(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """``new`` with each array in the dtype of ``old``'s array of the same name (where it has one)."""
    want = {k: np.dtype(a.dtype) for k, a in old.items()}
    if all(k not in want or np.dtype(a.dtype) == want[k] for k, a in new.items()):
        return new
    with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes inf: rejected as non-finite
        return ArrayRecord(
            {k: codec.encode(codec.decode(a).astype(want[k])) if k in want else a for k, a in new.items()}
        )


# round-config keys tilestack's ClientApp, its strategies and Flower's read; another key in a train_config is read
# by nobody (``learning_rate`` for ``lr``) and is named in a warning
KNOWN_CONFIG_KEYS = frozenset({TASK_KEY, *CONFIG_OVERRIDES, "server-round", "proximal-mu", KEY_CLIPPING_NORM})


def _config_task(train_config: dict):
    """The task ``train_config`` sends the clients, its local training settings in; a setting the Task refuses (a
    negative ``lr``) is a FederatedError before any work, where every client's training failed on it, round after
    round."""
    text = train_config[TASK_KEY]
    if not isinstance(text, str):  # a Task object itself: the clients read JSON
        raise FederatedError(f"run_rounds: train_config[{TASK_KEY!r}] is a {type(text).__name__}; expected "
                             "task.to_json(), the Task as JSON")  # fmt: skip
    try:
        Task.from_json(text)
    except (ValueError, TypeError) as ex:  # JSON errors are ValueErrors; unknown Task fields TypeErrors
        raise FederatedError(f"run_rounds: train_config[{TASK_KEY!r}] is not a Task as JSON ({type(ex).__name__}: "
                             f"{ex}); expected task.to_json()") from None  # fmt: skip
    try:
        task = task_from_config(train_config)
    except (ValueError, TypeError) as ex:
        raise FederatedError(f"run_rounds: train_config: {ex}") from None
    if "proximal-mu" in train_config:  # the clients add FedProx's term whatever the strategy (FedProx sets its own)
        limit = PROXIMAL_STEP_LIMIT / task.lr
        require_real("run_rounds", "train_config['proximal-mu']", train_config["proximal-mu"], lambda v: 0 <= v < limit,
                     f"a number >= 0 and < {PROXIMAL_STEP_LIMIT:g} / lr = {limit:g} (lr * mu >= "
                     f"{PROXIMAL_STEP_LIMIT:g} makes every local step overshoot the global model; a negative mu pushes "
                     "each client away from it)")  # fmt: skip
    if KEY_CLIPPING_NORM in train_config:  # the clients clip their update to it (client-side DP) under any strategy:
        # NaN left every update unclipped, 0 zeroed it, a negative bound flipped it (each client refuses it now)
        require_real("run_rounds", f"train_config[{KEY_CLIPPING_NORM!r}]", train_config[KEY_CLIPPING_NORM],
                     lambda v: v > 0, "a finite number > 0 (the bound of each client's update's L2 norm)")  # fmt: skip
    unread = sorted(k for k in train_config if k not in KNOWN_CONFIG_KEYS and not k.startswith("tilestack."))
    if unread:
        log.warning("run_rounds: train_config keys %s are read by no tilestack client; the local training settings "
                    "it reads are %s (or the Task's own fields)", unread, sorted(CONFIG_OVERRIDES))  # fmt: skip
    return task


def check_run_arguments(where: str, *, rounds_name: str, rounds, seed, timeout, stop_after, on_round=None,
                        extra_metrics=None) -> None:  # fmt: skip
    """The loop's own arguments, checked before any work (``where`` and ``rounds_name`` as the caller calls them)."""
    require_int(where, rounds_name, rounds, low=0)
    require_int(where, "seed", seed, low=0)
    require_timeout(where, timeout)
    if stop_after is not None:
        require_int(where, "stop_after", stop_after, low=0)
    # the hooks are first called after round 1's clients trained: one that is no function ended the run there with
    # "'int' object is not callable", the round's work lost
    for name, hook in (("on_round", on_round), ("extra_metrics", extra_metrics)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{where}: {name} is a {type(hook).__name__}; expected a function (or None), called after "
                            "each round")  # fmt: skip


def check_evaluator(where: str, evaluator, arrays: ArrayRecord) -> None:
    """``evaluator`` scores the global model after each round: it must be an ``Evaluator`` (or an object with its
    ``__call__(arrays)`` and ``client_accuracies(arrays)``) of a task whose model is ``arrays``' (IFCA's cluster models
    by their names within a cluster). An Evaluator built for another task (other features, classes or hidden width)
    ended the run with numpy's matmul error after round 1's clients had trained, and one that was no evaluator with an
    AttributeError there."""
    if evaluator is None:
        return
    hooks = callable(evaluator) and callable(getattr(evaluator, "client_accuracies", None))
    if isinstance(evaluator, type) or not hooks:  # (the class itself has both, unbound: an instance is asked for)
        what = f"the class {evaluator.__name__}" if isinstance(evaluator, type) else f"a {type(evaluator).__name__}"
        raise TypeError(f"{where}: evaluator is {what}; expected a tilestack.federated.Evaluator (or None)")
    task = getattr(evaluator, "task", None)
    if not isinstance(task, Task):
        return
    if diff := model_difference(task, arrays):
        want, got = diff
        raise ValueError(
            f"{where}: evaluator scores the model of another task ({want}); expected an Evaluator of the run's task, "
            f"whose model is the initial arrays' ({got})"
        )


def model_difference(task: Task, arrays: ArrayRecord) -> tuple[str, str] | None:
    """Where ``arrays`` are not ``task``'s model (IFCA's cluster models by their names within a cluster): the task's
    names and shapes that differ, and the arrays' (None where they agree; arrays the task does not read are the
    caller's)."""
    want = {k: tuple(np.shape(v)) for k, v in task.initial_params().items()}
    got = {k.rpartition(CLUSTER_SEP)[2]: tuple(a.shape) for k, a in arrays.items()}
    diff = sorted(k for k in want if got.get(k) != want[k])[:4]
    if not diff:
        return None
    return ", ".join(f"{k}: {want.get(k)}" for k in diff), ", ".join(f"{k}: {got.get(k)}" for k in diff)


def check_extra_arrays(where: str, grid: ManagedGrid, task: Task, arrays: ArrayRecord) -> None:
    """Initial arrays the task's model lacks (IFCA's cluster models by their names within a cluster), sent to
    tilestack's own ClientApp: it trains the task's model and nothing else, so every client failed on the first such
    array with a bare KeyError, round after round, and the run ended with nothing aggregated and no error (``simulate``
    refused them; another ClientApp may read arrays of its own, and is left to)."""
    from tilestack.federated.client import app as tilestack_app

    if getattr(grid.inner, "client_app", None) is not tilestack_app:
        return
    names = sorted(task.initial_params())
    extra = sorted(k for k in arrays if k.rpartition(CLUSTER_SEP)[2] not in names)
    if extra:
        listed = ", ".join(repr(k) for k in extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise ValueError(
            f"{where}: initial_arrays hold {listed}, which the task's model ({', '.join(names)}) lacks; expected the "
            "task's model arrays only (tilestack's ClientApp trains exactly those)"
        )


def check_config_tasks(where: str, evaluate_config: Mapping, train_task: Task, arrays: ArrayRecord,
                       set_by: frozenset[str]) -> None:  # fmt: skip
    """The tasks the round configs send are tasks of the initial arrays' model (``set_by``: the configs whose task
    the caller gave, the others the grid's). Every client rebuilds its model from the task its message carries:
    initial arrays of another task (run_rounds, unlike simulate, never compared them), or a config's task with other
    features or classes, made every client's training (or evaluation) fail with numpy's matmul error, round after
    round, the run ending with nothing aggregated and no error; an evaluate_config whose task was no Task as JSON
    made every evaluation an error reply."""
    text = evaluate_config[TASK_KEY]
    if not isinstance(text, str):
        raise FederatedError(f"{where}: evaluate_config[{TASK_KEY!r}] is a {type(text).__name__}; expected "
                             "task.to_json(), the Task as JSON")  # fmt: skip
    try:
        eval_task = Task.from_json(text)
    except (ValueError, TypeError) as ex:  # JSON errors are ValueErrors; unknown Task fields TypeErrors
        raise FederatedError(f"{where}: evaluate_config[{TASK_KEY!r}] is not a Task as JSON ({type(ex).__name__}: "
                             f"{ex}); expected task.to_json()") from None  # fmt: skip
    for name, task in (("train_config", train_task), ("evaluate_config", eval_task)):
        if diff := model_difference(task, arrays):
            want, got = diff
            given = f"{name}[{TASK_KEY!r}]" if name in set_by else "the grid's task"
            raise ValueError(
                f"{where}: initial_arrays hold {got}; expected the model of the task the clients "
                f"{'train' if name == 'train_config' else 'evaluate'} ({given}: {want})"
            )


def checkpoint_path(checkpoint: str | Path | None) -> Path | None:
    """``checkpoint`` as a Path whose folder exists (made if missing), so the first save cannot fail on it."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):  # (an int ended in pathlib's TypeError, naming no argument)
        raise TypeError(f"checkpoint is a {type(checkpoint).__name__} ({checkpoint!r:.60}); expected a file path (str "
                        "or pathlib.Path), or None for no checkpoint")  # fmt: skip
    path = Path(checkpoint)
    if path.is_dir():
        raise FederatedError(f"checkpoint={str(path)!r} is a folder; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as ex:
        raise FederatedError(
            f"checkpoint={str(path)!r}: its folder cannot be made ({ex}); expected a writable path"
        ) from ex
    return path


def run_rounds(
    strategy: Strategy,
    grid: ManagedGrid,
    initial_arrays: ArrayRecord,
    *,
    num_rounds: int,
    train_config: dict | None = None,
    evaluate_config: dict | None = None,
    evaluator: Evaluator | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    timeout: float | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    extra_metrics: Callable[[Strategy, ArrayRecord, int], dict[str, float]] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Run rounds ``1..num_rounds`` (or resume after the checkpoint's last round); see module doc.

    ``stop_after`` ends the call after that many rounds of this call (to test resuming).
    """
    check_run_arguments("run_rounds", rounds_name="num_rounds", rounds=num_rounds, seed=seed, timeout=timeout,
                        stop_after=stop_after, on_round=on_round, extra_metrics=extra_metrics)  # fmt: skip
    if not isinstance(grid, ManagedGrid):
        raise TypeError(f"run_rounds: grid is a {type(grid).__name__}; expected a ManagedGrid")
    if not isinstance(initial_arrays, ArrayRecord):
        raise TypeError(f"run_rounds: initial_arrays is a {type(initial_arrays).__name__}; expected an ArrayRecord")
    require_real_arrays("run_rounds", "initial", initial_arrays)
    require_float_model("run_rounds", "initial", initial_arrays, grid.task)
    check_evaluator("run_rounds", evaluator, initial_arrays)
    # before round 1 every node counts (a grid run before was left at its last round, with its clients offline then),
    # and no late update is in flight (a resumed run loads its own from the checkpoint)
    grid.server_round = 0
    grid.load_state_dict({})
    # tilestack's ClientApp rebuilds the task from the config: the grid's task unless the caller names one, with the
    # local training settings the config sets (lr, local-epochs, ...), which the strategy is checked against
    for name, given in (("train_config", train_config), ("evaluate_config", evaluate_config)):
        if given is not None and (not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given)):
            raise TypeError(f"run_rounds: {name} is a {type(given).__name__}"
                            f"{' with keys that are not strings' if isinstance(given, Mapping) else ''}; expected a "
                            "dict or ConfigRecord of round-config values by name (or None)")  # fmt: skip
    given_train, given_eval = dict(train_config or {}), dict(evaluate_config or {})
    train_config = {TASK_KEY: grid.task.to_json(), **given_train}
    evaluate_config = {TASK_KEY: grid.task.to_json(), **given_eval}
    run_task = _config_task(train_config)
    check_config_tasks("run_rounds", evaluate_config, run_task, initial_arrays,
                       frozenset(n for n, c in (("train_config", given_train), ("evaluate_config", given_eval))
                                 if TASK_KEY in c))  # fmt: skip
    check_extra_arrays("run_rounds", grid, run_task, initial_arrays)
    check_strategy(strategy, len(list(grid.get_node_ids())), run_task)  # also the roll call, before any seeding: it
    # may draw random numbers on some engines
    check_availability("run_rounds", strategy, grid.system)
    if grid.stragglers == "stale":
        check_stale(strategy)
    ckpt = checkpoint_path(checkpoint)
    with checkpoint_held(ckpt):  # from before its resume is read until the last round's save
        return _rounds(
            strategy,
            grid,
            initial_arrays,
            ckpt,
            num_rounds=num_rounds,
            train_config=train_config,
            evaluate_config=evaluate_config,
            run_task=run_task,
            evaluator=evaluator,
            seed=seed,
            timeout=timeout,
            on_round=on_round,
            extra_metrics=extra_metrics,
            stop_after=stop_after,
        )


@contextlib.contextmanager
def checkpoint_held(ckpt: Path | None):
    """Hold ``<checkpoint>.lock`` (flock) while a run reads and writes ``ckpt``. Two runs of one checkpoint at once
    (two ``tilestack fl run --checkpoint run.ckpt`` started by mistake, a nested call) each resumed from it and saved
    over the other's rounds, the file ending as whichever run saved last, mixing their histories without a word; the
    second is refused now. The lock goes with the process (a killed run leaves none held); a file system without
    locks runs unheld, as before."""
    if ckpt is None:
        yield
        return
    lock = ckpt.with_name(ckpt.name + ".lock")
    try:
        with held_lock(lock):
            yield
    except LockHeldError:
        raise FederatedError(
            f"checkpoint={str(ckpt)!r} is in use by another run now (it holds {str(lock)!r}); expected a "
            "checkpoint no running run writes (wait for that run, or give this one another checkpoint)"
        ) from None
    except OSError as ex:
        if str(ex.filename) != str(lock):      # (an OSError of the run itself passes through)
            raise
        raise FederatedError(f"checkpoint={str(ckpt)!r}: its lock file {str(lock)!r} cannot be made ({ex}); expected "
                             "a writable folder") from ex  # fmt: skip


def _rounds(strategy: Strategy, grid: ManagedGrid, initial_arrays: ArrayRecord, ckpt: Path | None, *, num_rounds: int,
            train_config: dict, evaluate_config: dict, run_task: Task, evaluator: Evaluator | None, seed: int,
            timeout: float | None, on_round, extra_metrics, stop_after: int | None) -> RunResult:  # fmt: skip
    """run_rounds' rounds, its arguments checked (and ``ckpt`` held, if any)."""
    # replies whose weight is missing or not > 0 are left out by the grid, with the reason
    grid.weight_keys = frozenset(
        key for s in strategy_levels(strategy) if isinstance(key := vars(s).get("weighted_by_key"), str)
    )
    # and so are training replies without the loss the strategy reads (QFedAvg's train_loss_key)
    grid.loss_keys = frozenset(
        key for s in strategy_levels(strategy) if isinstance(key := vars(s).get("train_loss_key"), str)
    )
    # and those without the steps the strategy divides each update by (FedNova's STEPS_KEY), or with 0 of them
    grid.step_keys = frozenset(
        key for s in strategy_levels(strategy) if isinstance(key := getattr(type(s), "STEPS_KEY", None), str)
    )
    # and those a strategy's own check refuses (IFCA: a cluster-id naming no cluster model)
    grid.reply_checks = tuple(
        s.check_train_reply for s in strategy_levels(strategy) if callable(getattr(type(s), "check_train_reply", None))
    )
    # (a resumed run then takes the checkpoint's state, its clients' too); before the signature reads settings
    _start_afresh(strategy)
    _fresh_clients(grid, strategy)
    arrays, history, first = initial_arrays, History(), 1
    signature = run_signature(strategy, grid, initial_arrays, seed, run_task)
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        check_signature(state.get("signature"), signature, ckpt)
        arrays = ArrayRecord(state["arrays"])
        _restore_strategy(strategy, state["strategy"])
        history = History.from_dict(state["history"])
        if state.get("grid_state") is not None and hasattr(grid.inner, "load_state_dict"):
            grid.inner.load_state_dict(state["grid_state"])
        grid.load_state_dict(state.get("managed_grid", {}))  # late updates in flight
        if state["round"] > num_rounds:
            raise FederatedError(
                f"checkpoint={str(ckpt)!r} holds {state['round']} completed rounds; num_rounds={num_rounds} asks for "
                "fewer (its model is not that run's); expected num_rounds >= its rounds, or another checkpoint"
            )
        first = state["round"] + 1
        log.info("resuming after round %d from %s", state["round"], ckpt)
    done_now, stopped = 0, ""
    for r in range(first, num_rounds + 1):
        if stop_after is not None and done_now >= stop_after:
            break
        t0 = time.perf_counter()
        grid.server_round = r
        _seed_global_rngs(seed, r, 0)
        num_online = online = len(list(grid.get_node_ids()))  # all nodes, less those offline or busy
        short = nodes_short(strategy, online, grid.population, "train")  # Flower's sampling would wait forever
        try:
            messages = [] if short else list(strategy.configure_train(r, arrays, ConfigRecord(dict(train_config)),
                                                                      grid))  # fmt: skip
        except PrivacyBudgetExhausted as ex:  # the next release would pass max_epsilon: the run is over, not lost
            stopped = f"round {r} not run: the privacy budget is spent ({ex})"
            log.warning("%s", stopped)
            break
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        replies += grid.take_late_replies(arrays)  # updates of earlier rounds due now (stragglers="stale")
        if short and replies:  # (with no reply at all the round is skipped below, naming the same reason)
            log.warning("round %d: no client sampled for training: %s; the round aggregates only the %d late "
                        "update(s) due now", r, short, len(replies))  # fmt: skip
        replies = summable_weights(replies, grid.weight_keys)
        # DP noise is drawn here, after the clients ran (in this process or not)
        _seed_global_rngs(seed, r, AGGREGATE_PHASE)
        skipped = ""
        before = _snapshot(strategy)
        try:
            if replies and (too_few := robust_short(strategy, len(replies))):
                new_arrays, train_metrics, skipped = None, None, too_few  # the rule's tolerance would not hold
            elif replies:
                with _noise_for(strategy, len(replies), r):
                    new_arrays, train_metrics = strategy.aggregate_train(r, replies)
            else:  # nothing to aggregate: the strategy is not asked (Flower's adaptive clipping divided by zero)
                new_arrays, train_metrics = None, None
            if new_arrays is None and not skipped:
                skipped = short or skip_reason(strategy, len(replies), len(messages))
        except InconsistentMessageReplies as ex:
            new_arrays, train_metrics, skipped = None, None, f"inconsistent replies: {ex}"
        if new_arrays is not None:
            new_arrays = _with_dtypes(new_arrays, arrays)
        if new_arrays is not None and not _finite(new_arrays):
            new_arrays, skipped = None, "the aggregate has non-finite values; the global model is kept"
            if before is not None:  # and the strategy's state as it was before this aggregation
                strategy.__dict__.update(before)
        if skipped:
            log.warning("round %d: aggregation skipped: %s", r, skipped)
        if new_arrays is not None:
            arrays = new_arrays
        _seed_global_rngs(seed, r, 1)
        online = len(list(grid.get_node_ids()))  # less the clients whose late work started this round
        if eval_short := nodes_short(strategy, online, grid.population, "evaluate"):
            log.warning("round %d: federated evaluation skipped: %s", r, eval_short)
            eval_messages = []
        else:
            eval_messages = strategy.configure_evaluate(r, arrays, ConfigRecord(dict(evaluate_config)), grid)
        eval_replies = summable_weights(list(grid.send_and_receive(eval_messages, timeout=timeout)),
                                        grid.weight_keys)  # fmt: skip
        eval_metrics = None
        try:
            eval_metrics = strategy.aggregate_evaluate(r, eval_replies)
        except InconsistentMessageReplies as ex:  # as in training: say so and go on, the model is not at stake
            log.warning("round %d: evaluation not aggregated: inconsistent replies: %s", r, ex)
        rlog = grid.take_round_log()
        client_accs = [float(c["eval-acc"]) for c in rlog["client_metrics"] if "eval-acc" in c]
        if not client_accs and evaluator is not None:  # no federated evaluation: the server scores each client
            client_accs = evaluator.client_accuracies(arrays)
        m = RoundMetrics(
            round=r,
            client_acc=fairness(client_accs),
            num_online=num_online,
            num_selected=rlog["selected"],
            num_aggregated=0 if skipped else rlog["aggregated"],
            skipped=skipped,
            steps_done=rlog["steps_done"],
            steps_full=rlog["steps_full"],
            bytes_down=rlog["bytes_down"],
            bytes_up=rlog["bytes_up"],
            sim_time=rlog["sim_time"],
            excluded=rlog["excluded"],
            eval_excluded=rlog["eval_excluded"],
            client_train=rlog["client_train"],
            client_eval=rlog["client_eval"],
            stale=rlog["stale"],
            train_metrics=_plain_metrics(train_metrics),
            eval_metrics=_plain_metrics(eval_metrics),
        )
        if evaluator is not None:
            m.test_loss, m.test_acc, m.train_loss = evaluator(arrays)
        if extra_metrics is not None:
            m.extra = extra_metrics(strategy, arrays, r)
        m.wall_time = time.perf_counter() - t0
        history.rounds.append(m)
        done_now += 1
        _ran_round(strategy)
        if ckpt is not None:
            grid_state = grid.inner.state_dict() if hasattr(grid.inner, "state_dict") else None
            state = {"round": r, "arrays": {k: v for k, v in arrays.items()}, "strategy": strategy,
                     "history": history.to_dict(), "grid_state": grid_state, "signature": signature,
                     "managed_grid": grid.state_dict()}  # fmt: skip
            try:
                save_checkpoint(ckpt, state)
            except (pickle.PicklingError, AttributeError, TypeError):  # a lambda among the strategy's settings
                save_checkpoint(ckpt, state | {"strategy": _strategy_state(strategy)})
        if on_round is not None:
            on_round(m)
    if grid.late and (stop_after is None or done_now < stop_after):
        log.info("the run ended with late updates of clients %s still in flight", sorted(grid.late))
    return RunResult(arrays, history, strategy, stopped)
