"""Helpers shared by tilestack's Flower strategies: arrays <-> numpy, reply filtering, per-message content."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from tilestack.federated import codec

Params = dict[str, np.ndarray]


def to_numpy(record: ArrayRecord) -> Params:
    return codec.to_numpy(record)


def to_record(params: Params) -> ArrayRecord:
    return codec.to_record({k: np.asarray(v, np.float32) for k, v in params.items()})


def ok_replies(replies: Iterable[Message]) -> list[Message]:
    """Replies that carry content (errors are left out, as Flower's strategies do)."""
    return [m for m in replies if not m.has_error()]


def metric(msg: Message, key: str, default: float = 0.0) -> float:
    rec = next(iter(msg.content.metric_records.values()))
    return float(rec[key]) if key in rec else default


def with_content(msg: Message, content: RecordDict) -> Message:
    """The same message (same metadata) carrying ``content`` instead."""
    return Message(content=content, metadata=msg.metadata)


def pid_of(grid, node_id: int) -> int:
    """Partition id of ``node_id`` as the (managed) grid knows it; a clear error where it cannot tell."""
    mapping = getattr(grid, "partition_of", None)
    if mapping is None or node_id not in mapping:
        raise ValueError(
            f"grid={type(grid).__name__} cannot tell the partition of node {node_id}; expected a ManagedGrid"
        )
    return mapping[node_id]
