"""Helpers of the round 11 federated scenario tests: a ClientApp whose replies are written array by array (compressed
arrays where the server asked for none), and tilestack's own ClientApp counting the messages it is given."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tilestack.federated import client as tsclient
from tilestack.federated import codec


def array_app(encode) -> ClientApp:
    """A ClientApp whose TRAIN reply holds ``encode(pid, name, start, trained)`` for each array (an ``Array``), where
    the client's model is start + 0.1 (pid + 1), and metrics of ``3 (pid + 1)`` examples and one step."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        start = codec.to_numpy(msg.content["arrays"])
        arrays = {k: encode(pid, k, v, v + np.float32(0.1 * (pid + 1))) for k, v in start.items()}
        metrics = MetricRecord({"num-examples": 3 * (pid + 1), "train-loss": 0.0, "num-steps": 1,
                                tsclient.PARTITION_METRIC: pid})  # fmt: skip
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    return app


def counting_app(calls: list) -> ClientApp:
    """tilestack's ClientApp, noting each training and evaluation message it is given in ``calls``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        calls.append("train")
        return tsclient.app(msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context) -> Message:
        calls.append("evaluate")
        return tsclient.app(msg, context)

    @app.query()
    def query(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    return app
