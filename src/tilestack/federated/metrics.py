"""Per-round metrics of a federated run, and the fairness summary of a distribution over clients.

    from tilestack.federated.metrics import History, fairness
    history.rounds[-1].test_acc, history.rounds[-1].bytes_down, history.rounds[-1].sim_time
    fairness([0.9, 0.7, 0.95])     # {"mean": ..., "std": ..., "p10": ..., "worst": ..., "jain": ...}
    history.to_json("run.json")    # every round, every field

One ``RoundMetrics`` per completed round: the global model's loss and accuracy (server-side, on the
pooled test data and on the pooled training data), the distribution of client accuracies from federated
evaluation (fairness), the training and evaluation metrics the strategy aggregated (weighted by examples),
bytes sent each way, simulated and real wall time, and which clients were left out of the round and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def fairness(values: list[float]) -> dict[str, float]:
    """Summary of per-client values (accuracies): mean, std, variance, 10th/25th/50th percentiles, the mean
    of the worst 10% (at least one client), worst, Jain's index."""
    # (a float failed in len(), a str in float(), NaN in numpy's sort, an array in `if not values`; None or 0 gave
    # {} as if no client had reported)
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray) or (
            isinstance(values, np.ndarray) and values.ndim != 1):
        raise ValueError(f"fairness: values={values!r:.60} ({type(values).__name__}); expected a list of per-client "
                         "numbers")
    bad = [x for x in values if not (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x))]
    if bad:
        raise ValueError(f"fairness: values holds {bad[0]!r} ({type(bad[0]).__name__}); expected finite numbers, one "
                         "per client")
    if len(values) == 0:
        return {}
    v = np.asarray(values, np.float64)
    jain = float(v.sum() ** 2 / (len(v) * (v**2).sum())) if (v**2).sum() > 0 else 1.0
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "var": float(v.var()),
        "worst10": float(np.sort(v)[: max(1, len(v) // 10)].mean()),
        "p10": float(np.percentile(v, 10)),
        "p25": float(np.percentile(v, 25)),
        "median": float(np.median(v)),
        "worst": float(v.min()),
        "jain": jain,
    }


@dataclasses.dataclass
class RoundMetrics:
    """What happened in one round (see module doc)."""

    round: int
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    train_loss: float = float("nan")
    client_acc: dict[str, float] = dataclasses.field(default_factory=dict)
    """fairness() of the per-client accuracies from federated evaluation."""
    num_online: int = 0
    """Clients online and idle when the round began, which the strategy sampled from (all of them unless the system
    model's ``availability`` takes some offline, or late work under ``stragglers='stale'`` keeps some busy)."""
    num_selected: int = 0
    num_aggregated: int = 0
    steps_done: int = 0
    steps_full: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    sim_time: float = 0.0
    wall_time: float = 0.0
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    """partition id -> reason the client was left out (dropout, timeout, crash, nan, shape, keys, metrics,
    straggler), in training or, for a client whose training reply was kept, in evaluation; a client left out of
    both has its training reason first, then ``; in evaluation: ...``."""
    eval_excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    """partition id -> reason the client's evaluation reply was left out (its update may still be aggregated)."""
    client_train: dict[str, dict[str, float | list[float]]] = dataclasses.field(default_factory=dict)
    """partition id -> the metrics of that client's training reply as it sent them (``train-loss``, ``num-steps``,
    ``num-examples``, ...), for every reply the grid passed on to the strategy."""
    client_eval: dict[str, dict[str, float | list[float]]] = dataclasses.field(default_factory=dict)
    """partition id -> the metrics of that client's evaluation reply (``eval-acc``, ``eval-loss``, ``num-examples``):
    each client's own score, of which ``eval_metrics`` is the weighted mean and ``client_acc`` the distribution."""
    stale: dict[str, int] = dataclasses.field(default_factory=dict)
    """partition id -> rounds late, of the late updates that joined this round (``stragglers="stale"``)."""
    skipped: str = ""
    """Why the round aggregated nothing and kept the global model ('' when it aggregated)."""
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    """Strategy-specific numbers (epsilon of DP, cluster purity, ...)."""
    train_metrics: dict[str, float | list[float]] = dataclasses.field(default_factory=dict)
    """The clients' training metrics as the strategy aggregated them (Flower's: each weighted by the client's
    ``weighted_by_key``, training examples by default): ``train-loss``, ``num-steps``, ..."""
    eval_metrics: dict[str, float | list[float]] = dataclasses.field(default_factory=dict)
    """Federated evaluation's metrics as the strategy aggregated them (Flower's: weighted by the clients' test
    examples): ``eval-loss``, ``eval-acc``; empty without federated evaluation."""


@dataclasses.dataclass
class History:
    """All completed rounds of a run, in order."""

    rounds: list[RoundMetrics] = dataclasses.field(default_factory=list)

    def column(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.rounds]

    def to_dict(self) -> dict:
        return {"rounds": [dataclasses.asdict(r) for r in self.rounds]}

    def to_json(self, path: str | Path) -> None:
        """Write the history to ``path`` whole or not at all (a temporary file renamed over it): a write cut short
        (Ctrl-C, a full disk) left half a JSON file where the previous history was."""
        from tilestack.files import write_atomic
        # its folder made as the plot's and the checkpoint's are (`fl run --out new/run.json` ran every round, then
        # failed on the temporary with FileNotFoundError)
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls([RoundMetrics(**r) for r in data["rounds"]])
