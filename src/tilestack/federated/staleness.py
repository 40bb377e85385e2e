"""Late updates under a deadline: a client too slow for the round delivers its whole work rounds later, weighted down.

    from tilestack.federated import SystemModel, simulate
    system = SystemModel(30, speed_sigma=1.0, deadline=2.0)
    simulate(FedAvg(...), task, rounds=50, system=system, stragglers="stale", staleness_exponent=0.5, max_staleness=4)
    history.rounds[r].stale          # partition id -> rounds late, of the updates that joined round r

Under ``stragglers="stale"`` (semi-asynchronous FL: FedBuff, Nguyen et al. 2022; FedAsync's staleness weights, Xie
et al. 2019) a client whose full local work does not fit in the round's ``deadline`` is not cut to partial work or
dropped: it trains in full from the model of round r0 and its update arrives ``tau = ceil(its time / deadline) - 1``
rounds later, in round r0 + tau. There it joins the round's aggregation as ``x + (y - x0)``: its update ``y - x0``
applied to the current global model ``x`` (the model it trained from is tau rounds old), and its weight (the
strategy's ``weighted_by_key``: examples by default) is multiplied by ``(1 + tau) ** -staleness_exponent``. A
client is busy, not among the nodes the strategy samples from, until its update is in; one that would be more than
``max_staleness`` rounds late is left out as under ``"drop"``. A client offline (the system's ``availability``) in
the round its work ends in uploads in the first round it is back, one round later each time (lost past
``max_staleness``). Updates still in flight are part of the checkpoint.

It needs replies that are the global model's own arrays (an update can be moved onto the current model): strategies
whose replies hold other arrays (HeteroFL, IFCA, CFL, FedBN, SCAFFOLD) and DP wrappers (a weight share above one
client's 1/n) are refused before any work (``checks.check_stale``). Compressed updates (``Compressed``) are updates
already, which the wrapper adds to the current model: they arrive as sent.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from tilestack.federated import codec


@dataclasses.dataclass
class LateReply:
    """A reply held back until the round its client's work ends in."""

    pid: int
    started: int
    """The round whose model the client trained from."""
    due: int
    """The round whose aggregation it joins."""
    reply: Message
    """As the grid checked it, floating-point arrays in float64."""
    sent: dict[str, np.ndarray]
    """The model arrays it was sent (float64), from which its update is taken."""
    steps: int
    bytes_up: int

    @property
    def staleness(self) -> int:
        return self.due - self.started


LATE_CAP = 10**12  # rounds late past any run: work that long (or too long for a finite time) is counted as this


def rounds_late(duration: float, deadline: float) -> int:
    """Rounds after the one it started in that work of ``duration`` seconds ends in (rounds of ``deadline`` s), at
    most ``LATE_CAP``: a duration of 1e6 s over a deadline of 1e-300 s overflowed to inf, and math.ceil raised
    OverflowError mid-round (the run ended); one of 1e300 rounds was named digit by digit in the client's exclusion."""
    with np.errstate(over="ignore"):
        ratio = np.float64(duration) / np.float64(deadline)
    if not ratio < LATE_CAP:
        return LATE_CAP
    return max(1, math.ceil(ratio) - 1)


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedAsync's polynomial weight (1 + staleness) ** -exponent (1 for an update on time)."""
    return float((1.0 + staleness) ** -exponent)


def rebased(late: LateReply, current: dict[str, np.ndarray], weight_keys: frozenset[str], exponent: float) -> Message:
    """``late``'s reply with each model array y (trained from the arrays it was sent, x0) as x + (y - x0) on the
    ``current`` global model x, in float64, and each weight metric scaled by ``staleness_weight``. An array the
    client sent compressed is its update y - x0 already (``Compressed``, whose own base is this round's model only
    where it configured this round); arrays the global model lacks stay as they are."""
    weight = staleness_weight(late.staleness, exponent)
    content = RecordDict()
    for name, rec in late.reply.content.items():
        if isinstance(rec, ArrayRecord):
            out = {}
            for k, a in rec.items():
                if k in late.sent and k in current:
                    value = codec.decode(a).astype(np.float64)
                    update = value - late.sent[k] if a.stype == codec.NUMPY_STYPE else value  # y - x0
                    a = codec.encode(current[k].astype(np.float64) + update)
                out[k] = a
            rec = ArrayRecord(out)
        elif isinstance(rec, MetricRecord):
            rec = MetricRecord({k: (float(v) * weight if k in weight_keys else v) for k, v in rec.items()})
        content[name] = rec
    return Message(content=content, metadata=late.reply.metadata)
