"""Helpers shared by tilestack's Flower strategies: arrays <-> numpy, reply filtering, per-message content."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from tilestack.federated import codec
from tilestack.federated.client import CLUSTER_SEP

Params = dict[str, np.ndarray]


def to_numpy(record: ArrayRecord) -> Params:
    return codec.to_numpy(record)


def to_record(params: Params, like: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """``params`` as an ArrayRecord, each array in its own dtype; with ``like`` (the global model), a floating
    array in the dtype of ``like``'s array of the same name (IFCA's and CFL's ``cluster{j}/name`` by ``name``).
    Strategies compute in float64 and round once here to the model's dtype: a float64 model stays float64, and
    float64 replies are not cut to float32 before they are averaged."""
    out = {}
    for k, v in params.items():
        v = np.asarray(v)
        ref = None if like is None else like.get(k, like.get(k.rpartition(CLUSTER_SEP)[2]))
        if ref is not None and v.dtype.kind == "f" and v.dtype != ref.dtype:
            v = v.astype(ref.dtype)
        out[k] = v
    return codec.to_record(out)


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


def dp_top_up(model: Params, members: list[Message], weight_key: str, dp_noise: tuple[float, int] | None) -> Params:
    """``model``, the weighted mean of ``members``' replies, plus the DP noise it lacks under a client-side DP wrapper
    (``dp_noise``: noise_multiplier x clipping_norm and the replies m the wrapper averages, set by run_rounds). The
    wrapper adds noise of std sigma C / m, sized for a client's share 1 / m of one mean over all replies; in a mean over
    fewer (a cluster's members) one client's clipped update moves it by up to its weight share, so the noise is
    topped up to std sigma C x share (drawn from NumPy's stream, which run_rounds seeds per round)."""
    if dp_noise is None or not members:
        return model
    sigma_c, m = dp_noise
    weights = [metric(msg, weight_key) for msg in members]
    share = max(weights) / sum(weights)
    extra = sigma_c * math.sqrt(max(share**2 - 1.0 / m**2, 0.0))
    if extra == 0.0:
        return model
    return {k: v + np.random.normal(0.0, extra, np.shape(v)) for k, v in model.items()}
