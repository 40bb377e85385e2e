"""Helpers of the round 5 federated scenario tests: tiny tasks, scripted Flower ClientApps, float64 truth."""

import json

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tilestack.federated import ManagedGrid, Task, codec
from tilestack.federated import client as tsclient
from tilestack.federated.engine import InProcessGrid

SC, DC = tsclient.SCAFFOLD_C, tsclient.SCAFFOLD_DC_PREFIX


def blobs(num_clients: int, features: int = 3, classes: int = 2, **kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=max(120, 4 * num_clients), num_features=features,
                          num_classes=classes, num_clients=num_clients, local_steps=2, lr=0.05), **kw})  # fmt: skip


def np_(arrays) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def same(a, b) -> bool:
    x, y = np_(a), np_(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def json_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN equals NaN here


def as_(arrays, dtype) -> ArrayRecord:
    return codec.to_record({k: v.astype(dtype) for k, v in np_(arrays).items()})


def reply(msg: Message, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    base = {"num-examples": 1, tsclient.UNIT_WEIGHT: 1, "train-loss": 0.0, "num-steps": 1}
    return Message(RecordDict({"arrays": codec.to_record(arrays), "metrics": MetricRecord(base | metrics)}),
                   reply_to=msg)  # fmt: skip


def scripted(script, evaluate_fn=None) -> ClientApp:
    """A ClientApp whose TRAIN reply is ``script(pid, round, content as numpy, context) -> (arrays, metrics)``;
    ``evaluate_fn(pid, round) -> metrics`` answers EVALUATE messages."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        got = {name: codec.to_numpy(rec) for name, rec in msg.content.array_records.items()}
        arrays, metrics = script(pid, rnd, got, context, msg.content["config"])
        return reply(msg, arrays, {tsclient.PARTITION_METRIC: pid} | metrics)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        return Message(RecordDict({"metrics": MetricRecord(evaluate_fn(pid, rnd))}), reply_to=msg)

    return app


def make_grid(app: ClientApp, task: Task, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(app, task.num_clients), task, **kw)


def wmean(models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = float(sum(weights[p] for p in models))
    keys = next(iter(models.values())).keys()
    return {k: sum(float(weights[p]) * models[p][k].astype(np.float64) for p in models) / total for k in keys}


def check_model(got: ArrayRecord, want: dict[str, np.ndarray], dtype) -> None:
    """The model is ``want`` (float64) rounded once to ``dtype``: bit for bit below float64, to 4 ulps in it."""
    for k, v in np_(got).items():
        assert v.dtype == dtype, (k, v.dtype)
        if dtype == np.float64:
            np.testing.assert_allclose(v, want[k], rtol=1e-15, atol=1e-300)
        else:
            np.testing.assert_array_equal(v, want[k].astype(dtype))


def update(pid: int, rnd: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A scripted client's update: of both signs, with low bits float32 cannot hold (1/3, 1/7 in float64)."""
    rng = np.random.default_rng([pid, rnd, len(shape)])
    return (rng.normal(0, 1, shape) * (pid + 1) / 3 + 1 / 7).astype(dtype)

