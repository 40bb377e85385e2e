"""The tilestack ClientApp: one Flower ``ClientApp`` for every strategy, engine and deployment.

    flower-supernode ... (runs ``tilestack.federated.client:app``)
    from tilestack.federated.client import app          # run_simulation(client_app=app, ...)

A client learns everything from the message: the task (``tilestack.task``, a :class:`Task` as JSON) with the
local training settings the config may also carry as Flower's own apps send them (``lr``, ``local-epochs``,
``local-steps``, ``batch-size``: ``CONFIG_OVERRIDES``, for that message only), its
share of the round's work (``tilestack.work``, set by the system simulator), FedProx's ``proximal-mu``,
``tilestack.compress`` (send compressed updates, see ``compression``), Flower's ``clipping_norm`` (client-side
DP: the update is clipped as ``fixedclipping_mod`` / ``adaptiveclipping_mod`` would, and ``norm_bit`` says
whether it was), and the records that select a method: ``scaffold-c`` (SCAFFOLD), ``tilestack.ifca-k`` (IFCA
cluster models), ``tilestack.local-prefix`` (FedBN), ``tilestack.ditto-lambda`` (Ditto: a personal model
beside the global one, in the node's state, scored in evaluation). Its partition is ``partition-id`` from the
node config. Clients flagged by the task as malicious or faulty misbehave on purpose, so that the server's defences
can be tested against a real ClientApp.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from tilestack.federated import codec
from tilestack.federated.compression import COMPRESS_KEY, compress_update
from tilestack.federated.models import MLP, PROXIMAL_STEP_LIMIT, Model, Params, evaluate, local_sgd, train_dtype
from tilestack.federated.task import Task

app = ClientApp()

TASK_KEY = "tilestack.task"
WORK_KEY = "tilestack.work"
IFCA_KEY = "tilestack.ifca-k"
LOCAL_PREFIX_KEY = "tilestack.local-prefix"
DITTO_KEY = "tilestack.ditto-lambda"  # config: also train the client's personal model, pulled towards the global one
DITTO_STATE = "tilestack.ditto-personal"  # the personal model, in the node's Context.state
DITTO_SEED = 17  # the personal model's minibatches: rng (seed, pid, round, DITTO_SEED), apart from the global model's
SCAFFOLD_C = "scaffold-c"
SCAFFOLD_DC_PREFIX = "scaffold.dc."
PARTITION_METRIC = "tilestack.partition"
CLUSTER_SEP = "/"
START_LOSS_KEY = "tilestack.start-loss"  # config: also report the loss at the received model (q-FFL's F_k)
START_LOSS_METRIC = "start-loss"
UNIT_WEIGHT = "unit-weight"  # weighting key for equal client weights (DP accounting requires them)
# Local training settings a round config may carry, as Flower's own apps send them (``ConfigRecord({"lr": 0.01})``):
# config key -> the Task field it sets for that message (a learning-rate schedule, each client its own epochs). They
# were ignored without a word: the task's own lr trained every round.
CONFIG_OVERRIDES = {"lr": "lr", "local-epochs": "local_epochs", "local-steps": "local_steps",
                    "batch-size": "batch_size"}  # fmt: skip
# the metrics of every TRAIN and EVALUATE reply (a strategy's weighted_by_key must be one of both)
TRAIN_METRICS = ("num-examples", UNIT_WEIGHT, "train-loss", "num-steps", "full-steps", PARTITION_METRIC)
EVALUATE_METRICS = ("num-examples", UNIT_WEIGHT, "eval-loss", "eval-acc", PARTITION_METRIC)


def cluster_key(j: int, key: str) -> str:
    """Name of array ``key`` of IFCA cluster model ``j`` inside one ArrayRecord."""
    return f"cluster{j}{CLUSTER_SEP}{key}"


def task_from_config(config) -> Task:
    """The task a round config carries (``TASK_KEY``, as JSON) with the local training settings it also carries
    (``CONFIG_OVERRIDES``) put in: ``"local-epochs"`` counts epochs even where the task fixed ``local_steps``, and
    ``"local-steps"`` wins over both. A value the Task refuses is a ValueError naming the config key."""
    text = str(config[TASK_KEY])
    changes = tuple((key, _hashable(config[key])) for key in CONFIG_OVERRIDES if key in config)
    return _task_with(text, changes) if changes else Task.from_json(text)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value  # a ConfigRecord list (refused by the Task all the same)


@functools.lru_cache(maxsize=256)
def _task_with(text: str, changes: tuple[tuple[str, object], ...]) -> Task:
    task = Task.from_json(text)
    for key, value in changes:
        fields = {CONFIG_OVERRIDES[key]: value}
        if key == "local-epochs" and "local-steps" not in dict(changes):
            fields["local_steps"] = None  # epochs asked for: not the task's fixed steps
        try:
            task = dataclasses.replace(task, **fields)
        except ValueError as ex:
            raise ValueError(f"config {key}={value!r}: {ex}") from None
    return task


def _to_numpy(record: ArrayRecord) -> Params:
    return codec.to_numpy(record)


def _to_record(params: Params, dtypes: dict[str, np.dtype] | None = None) -> ArrayRecord:
    """``params`` as float32 arrays, or those named in ``dtypes`` in that dtype (the client's training precision)."""
    dtypes = dtypes or {}
    return codec.to_record({k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in params.items()})


def _model_for(task: Task, params: Params) -> Model:
    """The task's model, at the width the server sent (HeteroFL sends narrower MLPs)."""
    if task.model == "mlp" and "fc1.weight" in params:
        return MLP(task.features, params["fc1.weight"].shape[1], task.classes, norm=task.norm)
    return task.build_model()


@functools.lru_cache(maxsize=64)
def _model_names(task: Task) -> frozenset[str]:
    return frozenset(task.initial_params())


def _require_model_arrays(task: Task, params: Params) -> None:
    """The arrays the server sent are the task's model's (by name): an array more ended every client's training with
    a bare ``KeyError: 'extra'``, round after round."""
    names = _model_names(task)
    if extra := sorted(k for k in params if k not in names):
        raise ValueError(f"arrays {extra[:4]} are not in the task's model ({', '.join(sorted(names))}); expected the "
                         "model's arrays only (tilestack's ClientApp trains and scores exactly those)")  # fmt: skip


def _split_clusters(arrays: Params, k: int) -> list[Params]:
    out: list[Params] = [{} for _ in range(k)]
    for name, v in arrays.items():
        head, _, key = name.partition(CLUSTER_SEP)
        out[int(head.removeprefix("cluster"))][key] = v
    return out


def _pick_cluster(task: Task, clusters: list[Params], x: np.ndarray, y: np.ndarray) -> int:
    losses = [evaluate(_model_for(task, p), p, x, y)[0] for p in clusters]
    return int(np.argmin(losses))


def _with_local(params: Params, context: Context, prefix: str) -> Params:
    """FedBN: replace the keys under ``prefix`` by this client's own, once it has them."""
    if not prefix or "fedbn-local" not in context.state:
        return params
    local = _to_numpy(context.state["fedbn-local"])
    return {k: (local[k] if k.startswith(prefix) and k in local else v) for k, v in params.items()}


def _personal(context: Context, model: Params) -> Params:
    """Ditto: this client's personal model, or ``model`` where it has none of that model's names and shapes."""
    if DITTO_STATE not in context.state:
        return model
    personal = _to_numpy(context.state[DITTO_STATE])
    same = personal.keys() == model.keys() and all(personal[k].shape == np.shape(model[k]) for k in model)
    return personal if same else model


def _poison(task: Task, start: Params, trained: Params, rng: np.random.Generator) -> Params:
    if task.attack == "signflip":  # send the update reversed and scaled up
        return {k: start[k] - task.attack_scale * (trained[k] - start[k]) for k in trained}
    return {k: (v + rng.normal(0, task.attack_scale, v.shape)).astype(v.dtype) for k, v in trained.items()}


def clip_update(start: Params, model: Params, clipping_norm: float) -> tuple[Params, bool]:
    """``model`` moved back towards ``start`` so that the update ``model - start`` (all arrays as one vector) has
    L2 norm at most ``clipping_norm`` (Flower's FlatClip: scaled by min(1, C / norm)); and whether it was scaled."""
    norm = math.sqrt(sum(float(np.sum((model[k].astype(np.float64) - start[k]) ** 2)) for k in model))
    if not norm > clipping_norm:  # within the bound (or non-finite: left for the server to refuse)
        return model, False
    scale = clipping_norm / norm
    return {k: (start[k] + scale * (model[k].astype(np.float64) - start[k])).astype(model[k].dtype)
            for k in model}, True  # fmt: skip


def _apply_fault(kind: str | None, task: Task, params: Params) -> Params:
    if kind == "crash":
        raise RuntimeError("simulated client crash (task.faults)")
    if kind == "slow":
        time.sleep(task.slow_seconds)
    if kind == "nan":
        first = next(iter(params))
        params = dict(params)
        params[first] = np.full_like(params[first], np.nan)
    if kind == "shape":
        first = next(iter(params))
        params = dict(params)
        params[first] = np.zeros((*params[first].shape[:-1], params[first].shape[-1] + 1), np.float32)
    if kind == "missing":  # one array left out of the reply
        params = dict(params)
        del params[next(iter(params))]
    if kind == "extra":  # an array the server never sent
        params = {**params, "extra.weight": np.zeros(1, np.float32)}
    return params


def check_pull(config, lr: float) -> None:
    """Refuse a proximal pull (FedProx's ``proximal-mu``, Ditto's lambda) that the message's lr makes diverge.

    The run checks them against its task's lr before any work (``checks.check_proximal``, Ditto, ``run_rounds``), but
    a strategy may set ``lr`` or ``proximal-mu`` for one client in its configure_train: lr 0.6 with mu 4 made that
    client's proximal steps grow w - w_t by 1.4x each and its model was averaged in without a word. The client's
    error names both; it is left out of the round, saying why."""
    for key in ("proximal-mu", DITTO_KEY):
        if key not in config:
            continue
        mu = config[key]
        ok = isinstance(mu, (int, float)) and not isinstance(mu, bool) and math.isfinite(mu) and mu >= 0
        if not ok or lr * mu >= PROXIMAL_STEP_LIMIT:
            raise ValueError(
                f"config {key}={mu!r} with lr={lr:g}; expected a number >= 0 and < {PROXIMAL_STEP_LIMIT:g} / lr = "
                f"{PROXIMAL_STEP_LIMIT / lr:g} (lr * mu >= {PROXIMAL_STEP_LIMIT:g} makes every local step overshoot "
                "the model it pulls towards)"
            )


def check_clipping(config) -> None:
    """Refuse a client-side DP bound (``clipping_norm``) no update can be clipped to. Flower's wrappers check their
    own, but a strategy may set one per message: NaN left every update unclipped (norm > NaN is False) and a negative
    bound flipped the update's sign, without a word."""
    if KEY_CLIPPING_NORM not in config:
        return
    bound = config[KEY_CLIPPING_NORM]
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"config {KEY_CLIPPING_NORM}={bound!r}; expected a finite number > 0 (the bound of the "
                         "update's L2 norm)")  # fmt: skip


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this client's partition; replies with its model and how much work it did."""
    config = msg.content["config"]
    task = task_from_config(config)
    check_pull(config, task.lr)
    check_clipping(config)
    pid = int(context.node_config["partition-id"])
    server_round = int(config.get("server-round", 0))
    x, y, _, _ = task.client_data(pid)
    rng = np.random.default_rng([task.seed, pid, server_round, 13])
    arrays = _to_numpy(msg.content["arrays"])
    metrics: dict[str, float | int] = {}

    ifca_k = int(config.get(IFCA_KEY, 0))
    if ifca_k:
        clusters = _split_clusters(arrays, ifca_k)
        j = _pick_cluster(task, clusters, x, y)
        arrays = clusters[j]
        metrics["cluster-id"] = j
    _require_model_arrays(task, arrays)
    prefix = str(config.get(LOCAL_PREFIX_KEY, ""))
    start = _with_local(arrays, context, prefix)

    correction, c = None, None
    if SCAFFOLD_C in msg.content:
        c = _to_numpy(msg.content[SCAFFOLD_C])
        ci = _to_numpy(context.state[SCAFFOLD_C]) if SCAFFOLD_C in context.state else None
        ci = ci if ci is not None else {k: np.zeros_like(v) for k, v in c.items()}
        correction = {k: c[k] - ci[k] for k in c}

    if START_LOSS_KEY in config:
        metrics[START_LOSS_METRIC] = evaluate(_model_for(task, start), start, x, y)[0]
    full_steps = task.steps_for(pid)
    work = float(config.get(WORK_KEY, 1.0))
    steps = max(1, math.ceil(work * full_steps)) if work > 0 else 0
    model = _model_for(task, start)
    trained, steps, loss = local_sgd(
        model, start, x, y, steps=steps, batch_size=task.batch_size, lr=task.lr, rng=rng,
        prox_mu=float(config.get("proximal-mu", 0.0)), correction=correction,
    )  # fmt: skip

    reply = dict(trained)
    if correction is not None and steps > 0:
        # SCAFFOLD option II: c_i+ = c_i - c + (x - y) / (K lr); the server receives c_i+ - c_i.
        ci_new = {k: ci[k] - c[k] + (start[k] - trained[k]) / (steps * task.lr) for k in c}
        context.state[SCAFFOLD_C] = _to_record(ci_new, {k: train_dtype(v) for k, v in c.items()})
        reply |= {SCAFFOLD_DC_PREFIX + k: (ci_new[k] - ci[k]).astype(train_dtype(c[k])) for k in c}
    if DITTO_KEY in config and steps > 0:  # Ditto: the personal model v takes as many steps of its own, pulled
        # towards the global model it was sent by (lambda / 2) ||v - w||^2; it starts as that model
        personal = _personal(context, start)
        v, _, _ = local_sgd(model, personal, x, y, steps=steps, batch_size=task.batch_size, lr=task.lr,
                            rng=np.random.default_rng([task.seed, pid, server_round, DITTO_SEED]),
                            prox_mu=float(config[DITTO_KEY]), anchor=start)  # fmt: skip
        context.state[DITTO_STATE] = _to_record(v, {k: train_dtype(a) for k, a in start.items()})
    if prefix:  # FedBN: the local layers stay here and are not uploaded
        local = {k: v for k, v in trained.items() if k.startswith(prefix)}
        context.state["fedbn-local"] = _to_record(local, {k: train_dtype(start[k]) for k in local})
        reply = {k: v for k, v in reply.items() if not k.startswith(prefix)}
    if KEY_CLIPPING_NORM in config:  # client-side DP: an honest client clips the model update it uploads
        model = {k: v for k, v in reply.items() if k in start}
        clipped, was_clipped = clip_update(start, model, float(config[KEY_CLIPPING_NORM]))
        reply |= clipped
        metrics[KEY_NORM_BIT] = int(was_clipped)  # adaptive clipping moves its norm by the share clipped
    if task.is_malicious(pid):  # poison what is uploaded (FedBN's local layers stay local)
        reply |= _poison(task, start, {k: v for k, v in trained.items() if k in reply}, rng)
    reply = _apply_fault(task.fault(pid), task, reply)

    metrics |= {
        "num-examples": len(y),
        UNIT_WEIGHT: 1,
        "train-loss": loss,
        "num-steps": steps,
        "full-steps": full_steps,
        PARTITION_METRIC: pid,
    }
    # in the precision it trained in (train_dtype: float64 for a float64 model, else float32), so that the server's
    # float64 mean is rounded to the model's dtype once (a float16 reply would round every client's model first)
    sent = dict(start) | {SCAFFOLD_DC_PREFIX + k: v for k, v in (c or {}).items()}
    record = _to_record(reply, {k: train_dtype(v) for k, v in sent.items()})
    if COMPRESS_KEY in config:  # send model updates compressed, with error feedback (compression.py)
        # model arrays as updates from the start; SCAFFOLD's control-variate changes are updates from zero
        base = start | {k: np.zeros_like(v) for k, v in reply.items() if k.startswith(SCAFFOLD_DC_PREFIX)}
        same = {k: v for k, v in reply.items() if k in base and np.shape(v) == base[k].shape}
        packed = compress_update(str(config[COMPRESS_KEY]), base, same, context)
        record = ArrayRecord({k: packed[k] if k in packed else record[k] for k in reply})
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    if task.fault(pid) == "nometrics":
        content = RecordDict({"arrays": content["arrays"]})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the global model (the best cluster model under IFCA) on this client's test split."""
    config = msg.content["config"]
    task = Task.from_json(str(config[TASK_KEY]))
    pid = int(context.node_config["partition-id"])
    x, y, x_test, y_test = task.client_data(pid)
    arrays = _to_numpy(msg.content["arrays"])
    ifca_k = int(config.get(IFCA_KEY, 0))
    if ifca_k:
        clusters = _split_clusters(arrays, ifca_k)
        arrays = clusters[_pick_cluster(task, clusters, x, y)]
    _require_model_arrays(task, arrays)
    params = _with_local(arrays, context, str(config.get(LOCAL_PREFIX_KEY, "")))
    if DITTO_KEY in config:  # Ditto scores the client's personal model (the global one until it has trained)
        params = _personal(context, params)
    loss, acc = evaluate(_model_for(task, params), params, x_test, y_test)
    metrics = MetricRecord(
        {"num-examples": len(y_test), UNIT_WEIGHT: 1, "eval-loss": loss, "eval-acc": acc, PARTITION_METRIC: pid}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's roll call with this node's partition id (used to order nodes reproducibly)."""
    pid = int(context.node_config.get("partition-id", -1))
    return Message(content=RecordDict({"metrics": MetricRecord({PARTITION_METRIC: pid})}), reply_to=msg)
