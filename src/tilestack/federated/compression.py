"""Update compression for the uplink: top-k sparsification with error feedback, and 8-bit quantisation.

    from tilestack.federated.compression import Compressed
    strategy = Compressed(FedAvg(fraction_train=0.5, fraction_evaluate=0.0), method="topk", ratio=0.01)
    result = simulate(strategy, task, rounds=50)
    sum(result.history.column("bytes_up"))        # what the clients really sent

The server wrapper puts ``tilestack.compress`` (``"topk:0.01"`` or ``"int8"``) in the round config; the
ClientApp then sends, for every model array, its update ``trained - start`` compressed (an ``Array`` of
stype ``tilestack.topk`` or ``tilestack.int8``, see ``codec``) instead of the model, keeping what the
compression dropped in its ``Context.state`` and adding it to the next round's update (error feedback,
Stich et al. 2018, Karimireddy et al. 2019), so nothing is lost for good. The bytes counted by the grid are
the compressed ones (SCAFFOLD's control-variate changes are compressed too). Before the wrapped strategy
aggregates, the wrapper turns each reply back into a model, global + decoded update, so any strategy that
averages models (FedAvg, FedProx, FedAdam, SCAFFOLD, the robust rules, DP) runs unchanged. The downlink (the
global model) is not compressed.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from tilestack.federated import codec
from tilestack.federated.models import train_dtype

COMPRESS_KEY = "tilestack.compress"
RESIDUAL_STATE = "tilestack.ef-residual"
METHODS = ("topk", "int8")
COMPRESSED_STYPES = (codec.TOPK_STYPE, codec.INT8_STYPE)
# strategies that send clients other arrays than the one global model (cluster models, sub-models) or rebuild it
# themselves: CFL's replies ended a compressed run after round 1's training with a KeyError
NOT_ONE_MODEL = ("IFCA", "CFL", "HeteroFL", "FedDF")
DEFAULT_TOPK_RATIO = 0.01
# ratios Compressed accepts with int8: none, parse("int8")'s 0.0, or every entry (what int8 sends anyway)
INT8_NO_RATIO = (None, 0.0, 1.0)


def parse(spec: str) -> tuple[str, float]:
    """``"topk:0.01"`` -> ("topk", 0.01); ``"int8"`` -> ("int8", 0.0)."""
    method, _, ratio = spec.partition(":")
    if method not in METHODS:
        raise ValueError(f"compression: method={method!r}; expected one of {METHODS}")
    if method == "topk":
        try:
            r = float(ratio)
        except ValueError:
            r = -1.0
        if not 0.0 < r <= 1.0:
            raise ValueError(f"compression: topk ratio={ratio!r}; expected a number in (0, 1]")
        return method, r
    if ratio:  # int8 keeps every entry: "int8:0.05" (top-k's ratio given to int8) ran int8 without a word
        raise ValueError(f"compression: {spec!r}; int8 sends every entry and takes no ratio; expected 'int8', or "
                         f"'topk:{ratio}' to keep that share of the entries")  # fmt: skip
    return method, 0.0


def compress_update(
    spec: str, start: dict[str, np.ndarray], trained: dict[str, np.ndarray], context: Context
) -> dict[str, Array]:
    """Client side: the compressed update of each model array, with error feedback kept in ``context``."""
    method, ratio = parse(spec)
    residual = codec.to_numpy(context.state[RESIDUAL_STATE]) if RESIDUAL_STATE in context.state else {}
    out, left = {}, {}
    for k, w in trained.items():
        # this round's update, in the precision the client trained in: a float64 model's update cut to float32 lost
        # its low bits for good (neither sent nor carried), and top-k of every entry was not the uncompressed run
        dtype = train_dtype(start[k])
        delta = (w - start[k]).astype(dtype)
        if k in residual and residual[k].shape == delta.shape:
            delta += residual[k]  # what earlier rounds did not send
        a = codec.encode_topk(delta, int(np.ceil(ratio * delta.size))) if method == "topk" else codec.encode_int8(delta)
        out[k] = a
        with np.errstate(invalid="ignore"):
            rest = delta - codec.decode(a)
        # a non-finite update is sent (the server leaves it out) but not carried: one bad round must not
        # poison every later update of this client through the residual
        left[k] = np.where(np.isfinite(rest), rest, 0.0).astype(dtype)
    context.state[RESIDUAL_STATE] = codec.to_record(left)
    return out


class Compressed(Strategy):
    """``inner`` trained on compressed client updates (see module doc)."""

    def __init__(self, inner: Strategy, method: str = "topk", ratio: float | None = None):
        if not isinstance(inner, Strategy):  # (None or a name ran until round 1 raised AttributeError on it)
            raise TypeError(f"Compressed: inner is a {type(inner).__name__}; expected a flwr Strategy to wrap")
        if method == "topk":
            if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)):
                # (a str was formatted into the spec and taken: ratio="0.1" ran as 0.1, "1e-1x" failed naming the spec)
                raise ValueError(f"compression: topk ratio={ratio!r} is a {type(ratio).__name__}; expected a number in "
                                 "(0, 1]")  # fmt: skip
            self.spec = f"topk:{DEFAULT_TOPK_RATIO if ratio is None else ratio}"
        elif method == "int8" and (isinstance(ratio, bool) or ratio not in INT8_NO_RATIO):  # (True == 1.0)
            # int8 sends every entry: Compressed(s, "int8", ratio=0.05) ran plain int8, the ratio dropped without a word
            raise ValueError(f"Compressed: ratio={ratio!r} with method='int8'; int8 sends every entry and takes no "
                             "ratio; expected ratio=None (or 0.0 / 1.0), or method='topk' to keep that share")
        else:  # int8, or an unknown method that parse names
            self.spec = method
        parse(self.spec)  # checks method and ratio
        level = inner
        while isinstance(level, Strategy):  # the strategy and those it wraps (Selected's inner, a DP wrapper's)
            if type(level).__name__ in NOT_ONE_MODEL:
                raise ValueError(
                    f"Compressed: inner={type(level).__name__}; expected a strategy that sends every client the "
                    "same single model (the server rebuilds models as global + update)"
                )
            level = vars(level).get("inner", vars(level).get("strategy"))
        self.inner = inner
        self._global: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = codec.to_numpy(arrays)
        config[COMPRESS_KEY] = self.spec
        return self.inner.configure_train(server_round, arrays, config, grid)

    def _decompressed(self, msg: Message) -> Message:
        if msg.has_error():
            return msg
        content = RecordDict()
        for name, rec in msg.content.items():
            if isinstance(rec, ArrayRecord):
                # in float64, as the grid hands plain replies to strategies (grid.for_aggregation)
                rec = codec.to_record({k: self._base(k) + codec.decode(a).astype(np.float64)
                                       if a.stype in COMPRESSED_STYPES else codec.decode(a) for k, a in rec.items()})
            content[name] = rec
        return Message(content=content, metadata=msg.metadata)

    def _base(self, key: str) -> np.ndarray | float:
        """What a compressed array is an update of: the global model's array, or zero for SCAFFOLD's changes."""
        from tilestack.federated.client import SCAFFOLD_DC_PREFIX  # here: the client module imports this one

        return 0.0 if key.startswith(SCAFFOLD_DC_PREFIX) else self._global[key]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, [self._decompressed(m) for m in replies])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
