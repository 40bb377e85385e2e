"""A Grid wrapper that adds what real heterogeneous clients bring: ordering, system effects, faults, accounting.

    from tilestack.federated.grid import ManagedGrid
    grid = ManagedGrid(inner_grid, task, system=SystemModel(...), stragglers="partial")
    replies = grid.send_and_receive(strategy.configure_train(r, arrays, config, grid), timeout=60)
    grid.take_round_log()     # bytes each way, simulated time, excluded clients and why, per-client metrics

It wraps any Flower ``Grid`` (tilestack's :class:`InProcessGrid`, Flower's simulation grid, a deployment's
SuperLink grid) and stays a ``Grid``, so the same strategy objects run over it:

- Order: nodes are listed in partition order (a roll call with QUERY messages learns each node's
  partition where the inner grid cannot tell), and replies come back in that order, so that a seeded run
  samples and sums identically on every engine.
- System: each TRAIN message gets the share of local work its client finishes under the
  :class:`SystemModel` (``tilestack.work``); dropped-out or timed-out clients are not asked;
  ``stragglers="drop"`` leaves out clients that cannot finish (FedAvg in the FedProx paper),
  ``"partial"`` keeps their partial work, ``"stale"`` has a client the deadline cuts do its whole work and holds
  its update back until the round that work ends in (``staleness``: moved onto that round's model, weighted down
  by how late it is; the client busy until then). Clients offline by the system's ``availability`` (or busy) are
  not listed by ``get_node_ids``, so the strategy samples from the others.
- Faults: a reply that is an error (crash), arrives late (timeout), lacks its MetricRecord, misses an
  array or carries an extra one, has no examples or a weight not > 0 (the strategy's ``weighted_by_key``, which
  ``run_rounds`` tells the grid), carries a non-finite value, an array of the wrong shape,
  integers where the server sent floating point, bytes that do not decode, an array compressed where the server
  asked for none, a weight or step count that is a list (or a negative count), or a metric whose layout (a number,
  a list of some length) differs from the other replies' is left out with its reason logged; the round goes on
  with the rest (which Flower's strategies would refuse whole, or raise on). A kept reply's floating-point arrays
  reach the strategy in float64 (``for_aggregation``): Flower's weighted average sums
  ``value * weight`` in the dtype of the first reply, so float32 replies drifted from the exact weighted mean
  (12 float32 ulps over 100 clients of unequal sizes) and one float16 reply rounded every contribution to
  float16; the driver stores the aggregate in the global model's dtype, rounded once.
- Flower's own loop: under ``Strategy.start`` (no ``run_rounds``) the grid sends its task where a message's config
  has none, rounds each message's floating-point arrays to the dtypes of the run's first message (the model's: the
  aggregate of float64 replies is float64) and takes the round from the messages' ``server-round`` (the system
  model's dropouts are drawn per round). Availability and late updates need ``run_rounds``, which tells the grid the
  round before the strategy samples and takes the late updates in.
- Accounting: bytes each way (array payloads), simulated round time (slowest kept client, or deadline), and
  each kept reply's own metrics by partition id (``RoundMetrics.client_train`` / ``client_eval``).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import strategy_utils
from flwr.supercore.run import Run

from tilestack.errors import FederatedError
from tilestack.federated import codec
from tilestack.federated.checks import require_int
from tilestack.federated.client import (
    CLUSTER_SEP,
    CONFIG_OVERRIDES,
    LOCAL_PREFIX_KEY,
    PARTITION_METRIC,
    SCAFFOLD_C,
    SCAFFOLD_DC_PREFIX,
    TASK_KEY,
    WORK_KEY,
    task_from_config,
)  # fmt: skip
from tilestack.federated.compression import COMPRESS_KEY, COMPRESSED_STYPES
from tilestack.federated.staleness import LATE_CAP, LateReply, rebased, rounds_late, staleness_weight
from tilestack.federated.system import ClientPlan, SystemModel
from tilestack.federated.task import Task

log = logging.getLogger("tilestack.federated")
STRAGGLER_POLICIES = ("drop", "partial", "stale")
ROLL_CALL_TIMEOUT = 600.0
NODE_POLL_INTERVAL = 0.2


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the array payload of a message (what dominates the wire)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def _canonical(name: str) -> str:
    return name.rpartition(CLUSTER_SEP)[2].removeprefix(SCAFFOLD_DC_PREFIX)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REASON_CHARS = 200


def error_reason(text: str) -> str:
    """A client error's reason in one clean line: ANSI colour codes removed, and of a traceback (Ray wraps
    the client's exception in its own, chained) only the first exception line with a message, the cause."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).strip().splitlines() if ln.strip()]
    if not lines:
        return "(no reason given)"
    exc = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): *\S", ln)]
    return (exc[0] if exc else lines[-1])[:REASON_CHARS]


def expected_train_keys(sent: RecordDict) -> set[str]:
    """Array names a correct ClientApp sends back for the TRAIN content ``sent``: the model's names (one
    model under IFCA, whose ``cluster{j}/`` prefix the client drops), less FedBN's local layers, plus
    SCAFFOLD's ``scaffold.dc.*`` control-variate changes."""
    prefix = str(sent["config"].get(LOCAL_PREFIX_KEY, "")) if "config" in sent.config_records else ""
    keys = {
        k.rpartition(CLUSTER_SEP)[2]
        for name, rec in sent.array_records.items()
        if name != SCAFFOLD_C
        for k in rec
    }
    keys = {k for k in keys if not (prefix and k.startswith(prefix))}
    if SCAFFOLD_C in sent.array_records:
        keys |= {SCAFFOLD_DC_PREFIX + k for k in sent[SCAFFOLD_C]}
    return keys


def check_reply(
    sent: RecordDict,
    reply: Message,
    weight_keys: Iterable[str] = (),
    loss_keys: Iterable[str] = (),
    step_keys: Iterable[str] = (),
    max_steps: int | None = None,
) -> str:
    """Why ``reply`` must be left out ('' when it is fine): an error; no (or more than one) MetricRecord;
    for TRAIN, not exactly one ArrayRecord or missing or extra arrays; no examples (``num-examples`` 0);
    a weight (``weight_keys``: the strategy's ``weighted_by_key``) not > 0, or missing from TRAIN (Flower averaged
    with a negative weight, and weights summing to 0 raised ZeroDivisionError in the server); a TRAIN reply without
    the loss the strategy reads (``loss_keys``: QFedAvg's ``train_loss_key``; Flower's AggregationError ended the
    run), or with that loss below 0; a TRAIN reply without the steps the strategy divides its update by
    (``step_keys``: FedNova's ``STEPS_KEY``), or with not > 0 of them (FedNova dropped it without a word, while the
    round counted it as aggregated); a TRAIN reply claiming more steps (``num-steps`` or a ``step_keys`` metric) than
    ``max_steps``, the full local work the server asked of it (FedNova scales every other client's update by the mean
    of the steps: a claim of 1e30 made the round's aggregate overflow, and one of 1e6 moved the model a million times
    too far, each claim finite and > 0); a wrong shape; a non-finite value."""
    if reply.has_error():
        return f"error: {error_reason(reply.error.reason)}"
    content, kind = reply.content, reply.metadata.message_type
    if kind in (MessageType.TRAIN, MessageType.EVALUATE) and len(content.metric_records) != 1:
        return f"metrics: {len(content.metric_records)} MetricRecords in the reply, expected 1"
    if kind == MessageType.TRAIN:
        if len(content.array_records) != 1:
            return f"keys: {len(content.array_records)} ArrayRecords in the reply, expected 1"
        got = {k for rec in content.array_records.values() for k in rec}
        want = expected_train_keys(sent)
        if missing := sorted(want - got):
            return f"keys: missing {missing[:5]}"
        if extra := sorted(got - want):
            return f"keys: unexpected {extra[:5]}"
        metrics = next(iter(content.metric_records.values()))
        if "num-examples" not in metrics:
            return "metrics: no 'num-examples'"
    if kind in (MessageType.TRAIN, MessageType.EVALUATE):
        n = next(iter(content.metric_records.values())).get("num-examples")
        # a weight is one number: Flower skipped the whole round over a list, tilestack's strategies raised. In a
        # fixed order (a set's order of strings changes with each process's hash seed: which key was named moved)
        for key in dict.fromkeys(("num-examples", *weight_keys)):
            w = next(iter(content.metric_records.values())).get(key)
            if isinstance(w, list):
                return f"weight: {key} is a list of {len(w)} values, expected one number > 0"
        steps = next(iter(content.metric_records.values())).get("num-steps")
        if kind == MessageType.TRAIN and (isinstance(steps, list) or isinstance(steps, (int, float)) and steps < 0):
            # the grid counts the steps (a list ended the run with TypeError), FedNova divides by them
            return f"metrics: num-steps={steps!r}, expected one number >= 0 (the local steps the client ran)"
        if kind == MessageType.TRAIN and max_steps is not None:
            for key in dict.fromkeys(("num-steps", *step_keys)):
                tau = next(iter(content.metric_records.values())).get(key)
                if isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > max_steps:  # (NaN: below)
                    return (f"metrics: {key}={tau!r}, expected at most {max_steps}, the local steps the server asked "
                            "of the client (its full work: local_steps, or local_epochs x its batches)")  # fmt: skip
        if isinstance(n, (int, float)) and n <= 0:  # weight 0: nothing to average with (NaN: caught below)
            what = "training" if kind == MessageType.TRAIN else "test"
            return f"empty: num-examples={n}, expected > 0 (the client has no {what} examples)"
        metrics = next(iter(content.metric_records.values()))
        for key in weight_keys:
            w = metrics.get(key)
            if w is None and kind == MessageType.TRAIN:  # (an evaluation is only not aggregated: the driver says so)
                return f"metrics: no {key!r} (the strategy's weighted_by_key)"
            if isinstance(w, (int, float)) and w <= 0:
                return f"weight: {key}={w}, expected > 0 (the strategy's weighted_by_key)"
        for key in loss_keys:
            loss = metrics.get(key)
            if kind == MessageType.TRAIN and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
                return f"metrics: no {key!r} (the strategy's train_loss_key)"
            if kind == MessageType.TRAIN and loss < 0:  # q-FedAvg raises it to the power q: a negative loss ended the
                # run with numpy's UFuncTypeError on a complex number (q = 0.5); a cross-entropy is never below 0
                return f"metrics: {key}={loss!r}, expected a loss >= 0 (the strategy's train_loss_key)"
        for key in step_keys if kind == MessageType.TRAIN else ():
            tau = metrics.get(key)
            if isinstance(tau, bool) or not isinstance(tau, (int, float)):
                return f"metrics: no {key!r} (the local steps the strategy divides the client's update by)"
            if tau <= 0:
                return f"metrics: {key}={tau!r}, expected > 0 (the strategy divides the client's update by its steps)"
    shapes = {_canonical(k): a.shape for rec in sent.array_records.values() for k, a in rec.items()}
    dtypes = _sent_dtypes(sent)
    compressing = "config" in sent.config_records and COMPRESS_KEY in sent["config"]
    for rec in content.array_records.values():
        for k, a in rec.items():
            if a.stype in COMPRESSED_STYPES and not compressing:  # an update where the strategy reads a model:
                # Flower's numpy conversion raised out of the round, tilestack's strategies took it for a model
                return (f"malformed: {k} is sent compressed ({a.stype}), expected the model's array as numpy (the "
                        "server asked for no compression: no Compressed strategy)")  # fmt: skip
            want_shape = shapes.get(_canonical(k))
            if want_shape is not None and tuple(a.shape) != tuple(want_shape):
                return f"shape: {k} is {tuple(a.shape)}, expected {tuple(want_shape)}"
            try:  # a client's bytes: a malformed array must cost that client its reply, not the server its run
                value = codec.decode(a)
            except Exception as ex:  # noqa: BLE001 - numpy and Flower raise several kinds on bad bytes
                return f"malformed: {k} cannot be decoded ({type(ex).__name__}: {str(ex)[:REASON_CHARS]})"
            if tuple(value.shape) != tuple(a.shape):
                return f"malformed: {k} decodes to shape {tuple(value.shape)}, declared {tuple(a.shape)}"
            if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
                return f"malformed: {k} has dtype {value.dtype}, expected real numbers"
            want_dtype = dtypes.get(_canonical(k))
            if want_dtype is not None and want_dtype.kind == "f" and value.dtype.kind != "f":
                return f"dtype: {k} is {value.dtype}, expected floating point (the server sent {want_dtype})"
            if want_dtype is not None and want_dtype.kind == "f" and value.dtype != want_dtype:
                with np.errstate(over="ignore"):  # as the server will store it: 1e39 is inf in f32
                    value = value.astype(want_dtype)
            if not np.all(np.isfinite(value)):
                return f"non-finite: {k}"
    for rec in content.metric_records.values():
        for k, v in rec.items():
            if not np.all(np.isfinite(np.asarray(v, np.float64))):
                return f"non-finite metric: {k}"
    return ""


def _config(msg: Message) -> ConfigRecord:
    """The round config a message carries (empty where it has none)."""
    config = msg.content.config_records.get("config")
    return config if config is not None else ConfigRecord()


SAMPLING_HOOKS = ("configure_train", "configure_evaluate")
SAMPLING_DEPTH = 8  # frames between a strategy's configure_* and the grid (wrappers, Flower's sample_nodes)


def _sampling_round(frame) -> int | None:
    """The round a strategy samples nodes for, when ``get_node_ids`` is called from within its ``configure_train`` /
    ``configure_evaluate`` (read from that call's ``server_round``), else None. Under Flower's own ``Strategy.start``
    the grid learned the round only from the messages, after sampling: each round was sampled from the clients online
    in the round before (an availability pattern of rounds {0, 1}, {2, 3} trained 0 and 1 in round 1, nobody in round
    2, and 2 and 3 alone in round 3, when all four were online)."""
    for _ in range(SAMPLING_DEPTH):
        if frame is None:
            return None
        found = frame.f_locals.get("server_round") if frame.f_code.co_name in SAMPLING_HOOKS else None
        if isinstance(found, numbers.Integral) and not isinstance(found, bool):
            return int(found)
        frame = frame.f_back
    return None


def _sent_dtypes(sent: RecordDict) -> dict[str, np.dtype]:
    return {_canonical(k): np.dtype(a.dtype) for rec in sent.array_records.values() for k, a in rec.items()}


AGGREGATION_DTYPE = np.dtype(np.float64)  # float16, float32 and float64 values all widen to it exactly


def _sent_order(sent: RecordDict) -> dict[str, int]:
    """Each array name a reply may carry -> its place in the order the server sent the model (SCAFFOLD's
    ``scaffold.dc.*`` changes after the model, in the order of ``scaffold-c``)."""
    order: dict[str, int] = {}
    for name, rec in sent.array_records.items():
        for k in rec:
            key = SCAFFOLD_DC_PREFIX + k if name == SCAFFOLD_C else k.rpartition(CLUSTER_SEP)[2]
            order.setdefault(key, len(order))
    return order


def for_aggregation(sent: RecordDict, reply: Message) -> Message:
    """``reply`` with each plain floating-point array that the server sent as floating point in float64, so that
    the strategy's sums are exact to float64 whatever the clients' dtypes (compressed arrays are updates the
    strategy's wrapper expands, left as they are), and its arrays in the order the server sent them. An ArrayRecord
    is a mapping by name, but Flower's FedAvgM, Krum / MultiKrum, QFedAvg and its DP wrappers pair a reply's arrays
    with the global model's by position (``to_numpy_ndarrays``): a client that sent its arrays in another order
    (fc.bias before fc.weight, as a dict sorted by name) made FedAvgM's fc.bias the (3, 3) difference of a weight and
    a bias, and server-side DP clipping took norms of such differences, without a word."""
    dtypes = _sent_dtypes(sent)
    order = _sent_order(sent)

    def differs(k: str, a) -> bool:
        want = dtypes.get(_canonical(k))
        return (a.stype == codec.NUMPY_STYPE and want is not None and want.kind == "f"
                and np.dtype(a.dtype) != AGGREGATION_DTYPE)  # fmt: skip

    def ordered(rec: ArrayRecord) -> list[str]:
        return sorted(rec, key=lambda k: order.get(k, len(order)))  # (stable: names never sent keep their order)

    if not any(differs(k, a) for rec in reply.content.array_records.values() for k, a in rec.items()) and all(
        list(rec) == ordered(rec) for rec in reply.content.array_records.values()
    ):
        return reply
    content = RecordDict()
    for name, rec in reply.content.items():
        if isinstance(rec, ArrayRecord):
            rec = ArrayRecord({k: codec.encode(codec.decode(rec[k]).astype(AGGREGATION_DTYPE)) if differs(k, rec[k])
                               else rec[k] for k in ordered(rec)})  # fmt: skip
        content[name] = rec
    return Message(content=content, metadata=reply.metadata)


def _plain_metric(value) -> int | float | list:
    """A client's metric as JSON holds it: an int stays one, a float or a list of numbers becomes float."""
    if isinstance(value, list):
        return [float(v) for v in value]
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _metric_keys(reply: Message) -> frozenset[str]:
    return frozenset(next(iter(reply.content.metric_records.values())).keys())


def _metric_layout(reply: Message) -> tuple[tuple[str, int | None], ...]:
    """Each metric's name and its list length (None for a single number): Flower's metric mean adds every reply's
    value to the first one's, element by element for a list, and raised TypeError (a list and a number) or
    ValueError (lists of two lengths) out of the aggregation: one client's odd metric ended the run."""
    metrics = next(iter(reply.content.metric_records.values()))
    return tuple(sorted((k, len(v) if isinstance(v, list) else None) for k, v in metrics.items()))


def _layout_text(size: int | None) -> str:
    return "a single number" if size is None else f"a list of {size} value{'s' * (size != 1)}"


def check_straggler_policy(where: str, system: SystemModel | None, task: Task, stragglers, staleness_exponent,
                           max_staleness) -> None:  # fmt: skip
    """The grid's system arguments, named as ``where`` calls them, before any work."""
    if stragglers not in STRAGGLER_POLICIES:
        raise ValueError(f"{where}: stragglers={stragglers!r}; expected one of {STRAGGLER_POLICIES}")
    if system is not None and system.num_clients != task.num_clients:
        raise ValueError(
            f"{where}: system.num_clients={system.num_clients}; expected task.num_clients={task.num_clients}"
        )
    ok = isinstance(staleness_exponent, numbers.Real) and not isinstance(staleness_exponent, bool)
    if not ok or not 0 <= staleness_exponent < math.inf:
        raise ValueError(
            f"{where}: staleness_exponent={staleness_exponent!r}; expected a finite number >= 0 (a late update's "
            "weight is multiplied by (1 + rounds late) ** -staleness_exponent)"
        )
    require_int(where, "max_staleness", max_staleness, low=1)
    least = staleness_weight(max_staleness, staleness_exponent)
    if stragglers == "stale" and least < sys.float_info.min:
        # (an update max_staleness rounds late weighed 0 or a subnormal: it counted for nothing, and a round whose
        # replies were all late divided by their zero total weight, a ZeroDivisionError that ended the run)
        raise ValueError(
            f"{where}: staleness_exponent={staleness_exponent!r} with max_staleness={max_staleness}; an update "
            f"{max_staleness} rounds late would weigh (1 + {max_staleness}) ** -{staleness_exponent!r} = {least:.3g}, "
            f"below float64's smallest normal number; expected staleness_exponent <= "
            f"{math.floor(100 * math.log(1 / sys.float_info.min) / math.log(1 + max_staleness)) / 100:g} (or a "
            "smaller max_staleness)"
        )
    if stragglers == "stale" and (system is None or system.deadline is None):
        raise ValueError(
            f"{where}: stragglers='stale' with system={'None' if system is None else 'a SystemModel without deadline'}"
            "; expected a SystemModel with a deadline (a late update is one that misses it)"
        )


class ManagedGrid(Grid):
    """Wrap ``inner`` with ordering, a system model, fault checks and accounting (see module doc)."""

    def __init__(
        self,
        inner: Grid,
        task: Task,
        *,
        system: SystemModel | None = None,
        stragglers: str = "partial",
        staleness_exponent: float = 0.5,
        max_staleness: int = 4,
    ):
        # (None as either ran until the roll call or the first round raised AttributeError on it)
        if not isinstance(inner, Grid):
            raise TypeError(f"ManagedGrid: inner is a {type(inner).__name__}; expected a flwr Grid (InProcessGrid, or "
                            "the grid Flower hands a ServerApp)")  # fmt: skip
        if not isinstance(task, Task):
            raise TypeError(f"ManagedGrid: task is a {type(task).__name__}; expected a tilestack.federated.Task")
        check_straggler_policy("ManagedGrid", system, task, stragglers, staleness_exponent, max_staleness)
        self.inner, self.task, self.system, self.stragglers = inner, task, system, stragglers
        self.staleness_exponent, self.max_staleness = float(staleness_exponent), max_staleness
        self.late: dict[int, LateReply] = {}  # partition id -> its reply in flight (stragglers="stale")
        self.server_round = 0
        self.weight_keys: frozenset[str] = frozenset()  # the strategy's weighted_by_key (run_rounds sets it)
        self.loss_keys: frozenset[str] = frozenset()  # the loss the strategy reads (QFedAvg's; run_rounds sets it)
        self.step_keys: frozenset[str] = frozenset()  # the steps the strategy divides by (FedNova's; run_rounds too)
        self.reply_checks: tuple = ()  # the strategy's own checks of a training reply's metrics (IFCA's; run_rounds)
        self.last_strategy = None  # weakref to the strategy of the last run on this grid (run_state._fresh_clients)
        self._order: list[int] | None = None
        self._dtypes: dict[str, np.dtype] = {}  # array name -> the run's model dtype (see _as_sent)
        self._sent_tasks: dict[tuple, Task] = {}  # (task JSON, config overrides) a message carried -> the task
        self.partition_of: dict[int, int] = {}
        self._log = self._empty_log()

    # ---- ordering -----------------------------------------------------------------------------------
    def _roll_call(self) -> None:
        known = getattr(self.inner, "partitions", None)
        if known is not None:
            self.partition_of = dict(known)
        else:
            deadline = time.monotonic() + ROLL_CALL_TIMEOUT
            while len(ids := list(self.inner.get_node_ids())) < self.task.num_clients:  # nodes still connecting
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ManagedGrid: {len(ids)} nodes connected after {ROLL_CALL_TIMEOUT} s; "
                        f"expected task.num_clients={self.task.num_clients}"
                    )
                time.sleep(NODE_POLL_INTERVAL)
            msgs = [Message(RecordDict({"config": ConfigRecord()}), nid, MessageType.QUERY) for nid in ids]
            for reply in self.inner.send_and_receive(msgs, timeout=ROLL_CALL_TIMEOUT):
                if not reply.has_error():
                    self.partition_of[reply.metadata.src_node_id] = int(reply.content["metrics"][PARTITION_METRIC])
            if len(self.partition_of) != len(ids):
                raise RuntimeError(f"ManagedGrid: {len(self.partition_of)} of {len(ids)} nodes answered the roll call")
        pids = sorted(self.partition_of.values())
        if pids != list(range(self.task.num_clients)):
            shown = f"{pids[:8]}{'...' if len(pids) > 8 else ''}"
            raise ValueError(
                f"ManagedGrid: the grid's {len(pids)} nodes hold partition ids {shown}; expected each of "
                f"0..{self.task.num_clients - 1} once (task.num_clients={self.task.num_clients})"
            )
        self._order = sorted(self.partition_of, key=self.partition_of.__getitem__)

    def get_node_ids(self) -> Iterable[int]:
        """The nodes online in the current round, in partition order: all of them, unless the system model has an
        availability pattern (before round 1, at the roll call and the run's checks, every node)."""
        if self._order is None:
            self._roll_call()
        assert self._order is not None
        if (sampling := _sampling_round(sys._getframe(1))) is not None:
            self._enter_round(sampling)
        # a client is busy from the round its late work starts in (its evaluation there too) until its update is in
        busy = {p for p, late in self.late.items() if late.started <= self.server_round <= late.due}
        if (self.system is None or self.system.availability is None) and not busy:
            nodes = list(self._order)
        else:
            online = self.system.online(self.server_round) if self.system is not None else None
            pids = [(nid, self.partition_of[nid]) for nid in self._order]
            nodes = [nid for nid, pid in pids if pid not in busy and (online is None or online[pid])]
        self._refuse_endless_wait(len(nodes), sys._getframe(1))
        return nodes

    def _enter_round(self, server_round: int) -> None:
        """Take ``server_round`` as the current round (Flower's own loop tells it only through the strategy's calls)."""
        if server_round < self.server_round:  # Flower's loop started over on this grid: another run, its own model
            self._dtypes = {}
        self.server_round = server_round

    def _refuse_endless_wait(self, listed: int, caller) -> None:
        """Flower's ``sample_nodes`` (the ``caller`` frame) polls ``get_node_ids`` every second until its
        ``min_available_nodes`` (at least the sample size) are listed. This grid never lists more than the task's
        clients, and which of them are online changes only with the round, which cannot move while a strategy samples:
        under Flower's own ``Strategy.start`` a strategy asking for more (``FedAvg(min_available_nodes=10)`` over 4
        clients) waited forever (``run_rounds`` refuses or skips such rounds before sampling). Refused instead."""
        if caller is None or caller.f_code is not strategy_utils.sample_nodes.__code__:
            return
        want = caller.f_locals.get("min_available_nodes")
        if isinstance(want, numbers.Integral) and want > listed:
            online = " online this round" if listed < self.population else ""
            raise FederatedError(
                f"ManagedGrid: the strategy waits for min_available_nodes={want} nodes (at least its sample size) and "
                f"this grid lists {listed}{online} of the run's {self.population} (task.num_clients); no node joins "
                f"while Flower's sampling waits, so it would wait forever; expected min_available_nodes and the sample "
                f"size <= {listed} (run_rounds skips a round with too few nodes online, saying so)"
            )

    @property
    def population(self) -> int:
        """Every node of the run, online or not (SCAFFOLD's N)."""
        if self._order is None:
            self._roll_call()
        assert self._order is not None
        return len(self._order)

    # ---- pass-through -------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # ---- the managed round trip ---------------------------------------------------------------------
    @staticmethod
    def _empty_log() -> dict:
        return {
            "selected": 0, "aggregated": 0, "steps_done": 0, "steps_full": 0, "bytes_down": 0, "bytes_up": 0,
            "sim_time": 0.0, "excluded": {}, "eval_excluded": {}, "client_metrics": [], "client_train": {},
            "client_eval": {}, "stale": {},
        }  # fmt: skip

    def take_late_replies(self, arrays: ArrayRecord) -> list[Message]:
        """The late updates due in this round (``stragglers="stale"``), moved onto the global model ``arrays`` and
        weighted down by their staleness (``staleness.rebased``), in partition order; accounted as replies of
        this round (``RoundMetrics.stale`` says how late each was)."""
        ready = sorted(p for p, late in self.late.items() if late.due <= self.server_round)
        if not ready:
            return []
        online = self.system.online(self.server_round) if self.system is not None else None
        current = codec.to_numpy(arrays)
        out = []
        for pid in ready:
            late = self.late[pid]
            if online is not None and not online[pid]:  # offline when its work is done: it uploads once back
                if late.staleness + 1 > self.max_staleness:
                    del self.late[pid]
                    self._exclude(pid, f"late: its update from round {late.started} is lost, offline until past "
                                       f"max_staleness={self.max_staleness}")  # fmt: skip
                else:
                    late.due += 1
                continue
            del self.late[pid]
            reply = rebased(late, current, self.weight_keys, self.staleness_exponent)
            self._log["aggregated"] += 1
            self._log["steps_done"] += late.steps
            self._log["bytes_up"] += late.bytes_up
            self._log["stale"][str(pid)] = late.staleness
            metrics = next(iter(late.reply.content.metric_records.values()))
            self._log["client_train"][str(pid)] = {k: _plain_metric(v) for k, v in metrics.items()
                                                   if k != PARTITION_METRIC}  # fmt: skip
            out.append(reply)
        return out

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this grid: the late updates in flight."""
        return {"late": dict(self.late)}

    def load_state_dict(self, state: dict) -> None:
        self.late = dict(state.get("late", {}))
        self._dtypes = {}  # a run starting (or resuming) learns its model's dtypes from its first message
        # and records only its own rounds: a round that raised (its aggregation, a hook) before the driver took its
        # log left its clients' selection, steps, bytes and time here, and a run resumed on this grid added them to
        # its first round's record (num_selected 8 of 4 clients, twice the bytes)
        self._log = self._empty_log()

    def _as_sent(self, msg: Message) -> Message:
        """A TRAIN or EVALUATE message as its client must get it, also under Flower's own ``Strategy.start``
        (``run_rounds`` sends both already): with the grid's task in its config where the config has none (every
        client failed on the missing task, and the run ended with an empty model), and its floating-point arrays in
        the dtypes of the run's model, those of its first message (the replies reach the strategy in float64, and
        a float32 model came back float64 from Flower's loop, its clients training in float64 from round 2)."""
        if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            return msg
        if not self._dtypes:
            self._dtypes = _sent_dtypes(msg.content)
        config = _config(msg)
        changed = TASK_KEY not in config
        records = {}
        for name, rec in msg.content.items():
            if isinstance(rec, ArrayRecord):
                arrays = {k: a for k, a in rec.items()}
                for k, a in rec.items():
                    want, got = self._dtypes.get(_canonical(k)), np.dtype(a.dtype)
                    floats = want is not None and want.kind == got.kind == "f"
                    if a.stype == codec.NUMPY_STYPE and floats and got != want:
                        with np.errstate(over="ignore"):  # as run_rounds stores an aggregate: rounded once
                            arrays[k] = codec.encode(codec.decode(a).astype(want))
                        changed = True
                rec = ArrayRecord(arrays)
            records[name] = rec
        if not changed:
            return msg
        records["config"] = ConfigRecord({TASK_KEY: self.task.to_json(), **config})
        return Message(RecordDict(records), msg.metadata.dst_node_id, msg.metadata.message_type,
                       group_id=msg.metadata.group_id)  # fmt: skip

    def take_round_log(self) -> dict:
        """What happened since the last call (the driver calls it once per round)."""
        out, self._log = self._log, self._empty_log()
        return out

    def _exclude(self, pid: int, reason: str, *, evaluating: bool = False) -> None:
        """Record why client ``pid`` was left out. An evaluation reply left out is also kept in ``eval_excluded``;
        where the client's training reply was left out this round too, that reason stays first in ``excluded`` (the
        evaluation's is appended): before, it was overwritten, and the record of a lost update read as an
        evaluation failure."""
        key = str(pid)
        if evaluating:
            self._log["eval_excluded"][key] = reason
            if key in self._log["excluded"]:
                self._log["excluded"][key] += f"; in evaluation: {reason}"
            else:
                self._log["excluded"][key] = reason
        else:
            self._log["excluded"][key] = reason
        log.info("round %d: client %d left out%s: %s", self.server_round, pid, " of evaluation" * evaluating, reason)

    def _task_sent(self, content: RecordDict) -> Task:
        """The task a TRAIN message carries, with the local training settings its config sets (``lr``,
        ``local-epochs``, ...: ``client.task_from_config``), which the client trains by (a strategy may give each
        client its own local work), or the grid's task when it carries none: a client's full work is planned from
        it."""
        config = content.config_records.get("config")
        text = config.get(TASK_KEY) if config is not None else None
        if not isinstance(text, str):
            return self.task
        key = (text, *((k, repr(config[k])) for k in CONFIG_OVERRIDES if k in config))
        if key not in self._sent_tasks:
            try:
                sent = task_from_config(config)
            except (ValueError, TypeError, KeyError):  # not a task the client could read either: it will fail
                sent = self.task
            # another population's task (other client count) is not this grid's to plan by
            self._sent_tasks[key] = sent if sent.num_clients == self.task.num_clients else self.task
        return self._sent_tasks[key]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if self._order is None:
            self._roll_call()
        messages = list(messages)
        # Flower's own Strategy.start never tells the grid the round (run_rounds does): it is the messages' own
        rounds = [int(r) for m in messages if isinstance(r := _config(m).get("server-round"), numbers.Integral)]
        if rounds:
            self._enter_round(max(rounds))
        messages = [self._as_sent(m) for m in messages]
        out: list[Message] = []
        sent: dict[int, tuple[RecordDict, int, int | None]] = {}  # node id -> (content, steps planned, full work)
        durations: list[float] = []
        is_train = False
        due: dict[int, int] = {}  # node id -> the round its late update joins (stragglers="stale")
        online = self.system.online(self.server_round) if self.system is not None else None
        for msg in messages:
            nid = msg.metadata.dst_node_id
            pid = self.partition_of[nid]
            if online is not None and not online[pid]:  # a strategy that messaged a node it did not sample from
                training = msg.metadata.message_type == MessageType.TRAIN
                is_train |= training
                self._log["selected"] += int(training)
                self._exclude(pid, f"offline: not online in round {self.server_round} (the system's availability)",
                              evaluating=not training)  # fmt: skip
                continue
            down = payload_bytes(msg.content)
            steps, full = 0, None
            if msg.metadata.message_type == MessageType.TRAIN:
                is_train = True
                self._log["selected"] += 1
                full = self._task_sent(msg.content).steps_for(pid)
                self._log["steps_full"] += full
                if self.system is not None:
                    plan = self.system.plan(self.server_round, pid, full, down)
                    if self.stragglers == "stale" and plan.reason in ("deadline", "timeout"):
                        # its whole work, due in the round it ends in (or left out past max_staleness)
                        assert self.system.deadline is not None
                        tau = rounds_late(self.system.duration(pid, steps=full, bytes_down=down, bytes_up=down),
                                          self.system.deadline)  # fmt: skip
                        durations.append(self.system.deadline)  # the round ends at the deadline without it
                        if tau > self.max_staleness:
                            late = f"{tau}" if tau < LATE_CAP else f"at least {LATE_CAP:.0e}"
                            self._exclude(pid, f"deadline: its update would arrive {late} rounds late, past "
                                               f"max_staleness={self.max_staleness}")  # fmt: skip
                            continue
                        due[nid] = self.server_round + tau
                        plan = ClientPlan(pid, 1.0, full)
                    if plan.work == 0.0 or (plan.reason and self.stragglers == "drop"):
                        self._exclude(pid, plan.reason)
                        # the server waited for it until the deadline; a client that cannot do one step before it
                        # ('timeout') is waited for as long (left out here, a round of such clients took 0 s)
                        if plan.reason in ("straggler", "deadline", "timeout") and self.system.deadline is not None:
                            durations.append(self.system.deadline)
                        continue
                    if plan.work < 1.0:
                        config = ConfigRecord(dict(msg.content["config"]))
                        config[WORK_KEY] = plan.work
                        content = RecordDict({**msg.content, "config": config})
                        msg = Message(content, nid, msg.metadata.message_type, group_id=msg.metadata.group_id)
                    steps = plan.steps
                else:
                    steps = full
            self._log["bytes_down"] += down
            sent[nid] = (msg.content, steps, full)
            out.append(msg)
        replies = list(self.inner.send_and_receive(out, timeout=timeout))
        # in partition order, whatever order they came in (Flower's engine: as its workers finish), so that what the
        # round records (who was left out or held back, and in which order) is the same on every engine
        replies.sort(key=lambda r: self.partition_of.get(r.metadata.src_node_id, -1))
        answered = {r.metadata.src_node_id for r in replies}
        for nid in sent:
            if nid not in answered:
                # (with no timeout, a grid that gives up on a node that left the run: "within None s" said nothing)
                why = "timeout: no reply (the node left the run)" if timeout is None else \
                    f"timeout: no reply within {timeout} s"
                self._exclude(self.partition_of[nid], why, evaluating=not is_train)
                if self.system is not None and self.system.deadline is not None:  # the server waited for it until
                    # the deadline, as for a client planned to time out (a node gone mid-round made the round as
                    # short as its fastest clients)
                    durations.append(self.system.deadline)
        checked = []  # (reply, partition id, content sent, steps) of replies that passed check_reply
        for reply in replies:
            nid = reply.metadata.src_node_id
            pid = self.partition_of[nid]
            content, steps, full = sent[nid]
            why = check_reply(content, reply, self.weight_keys, self.loss_keys, self.step_keys, max_steps=full)
            # a reply speaks for its own client: the partition it names is what IFCA, CFL and Oort file it under (a
            # client naming another moved itself into that client's cluster, or wrote over its record)
            claimed = None if why else next(iter(reply.content.metric_records.values())).get(PARTITION_METRIC)
            if claimed is not None and claimed != pid:
                why = f"partition: the reply says {PARTITION_METRIC}={claimed!r}, from the node of partition {pid}"
            for check in self.reply_checks if is_train and not why else ():
                why = why or check(next(iter(reply.content.metric_records.values())))
            if why:
                self._exclude(pid, why, evaluating=not is_train)
            else:
                checked.append((reply, pid, content, steps))
        # Flower aggregates only when every reply's MetricRecord has the same keys, each a number in every reply or a
        # list of one length in every reply: the odd ones out go.
        common = Counter(_metric_keys(r) for r, *_ in checked).most_common(1)
        layout = Counter(_metric_layout(r) for r, *_ in checked if _metric_keys(r) == common[0][0]).most_common(1)
        kept = []
        for reply, pid, content, steps in checked:
            if _metric_keys(reply) != common[0][0]:
                diff = sorted(_metric_keys(reply) ^ common[0][0])
                self._exclude(pid, f"metrics: keys {diff[:5]} differ from the other replies'", evaluating=not is_train)
                continue
            if _metric_layout(reply) != layout[0][0]:
                key, size, want = next((k, n, m) for (k, n), (_, m) in zip(_metric_layout(reply), layout[0][0],
                                                                           strict=True) if n != m)  # fmt: skip
                self._exclude(pid, f"metrics: {key} is {_layout_text(size)} where the other replies send "
                                   f"{_layout_text(want)}", evaluating=not is_train)  # fmt: skip
                continue
            up = payload_bytes(reply.content)  # as the client sent it
            if reply.metadata.message_type == MessageType.TRAIN:
                steps = int(next(iter(reply.content.metric_records.values())).get("num-steps", steps))
                reply = for_aggregation(content, reply)
                nid = reply.metadata.src_node_id
                if nid in due:  # held back until the round its work ends in
                    sent_model = {k: codec.decode(a).astype(np.float64) for rec in content.array_records.values()
                                  for k, a in rec.items()}  # fmt: skip
                    self.late[pid] = LateReply(pid, self.server_round, due[nid], reply, sent_model, steps, up)
                    self._exclude(pid, f"late: its update arrives in round {due[nid]} "
                                       f"(staleness {due[nid] - self.server_round})")  # fmt: skip
                    continue
            self._log["bytes_up"] += up
            if is_train:
                self._log["aggregated"] += 1
                self._log["steps_done"] += steps
            if self.system is not None:
                down = payload_bytes(content)
                durations.append(float(self.system.duration(pid, steps=steps, bytes_down=down, bytes_up=up)))
            kept.append(reply)
        if durations:
            t = max(durations)
            if self.system is not None and self.system.deadline is not None:
                t = min(t, self.system.deadline)
            self._log["sim_time"] += float(t)
        kept.sort(key=lambda r: self.partition_of[r.metadata.src_node_id])
        for reply in kept:  # each kept reply's own metrics, by partition id (the strategy sees only their mean)
            metrics = next(iter(reply.content.metric_records.values()))
            plain = {k: metrics[k] for k in metrics}
            pid = str(self.partition_of[reply.metadata.src_node_id])
            own = {k: _plain_metric(v) for k, v in plain.items() if k != PARTITION_METRIC}
            self._log["client_train" if is_train else "client_eval"][pid] = own
            if not is_train:
                self._log["client_metrics"].append(plain)
        return kept
