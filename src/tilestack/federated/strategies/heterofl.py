"""HeteroFL (Diao et al., ICLR 2021): clients train sub-models of different widths of one global model.

    from tilestack.federated.strategies import HeteroFL
    strategy = HeteroFL(width_of=lambda pid: (1.0, 0.5, 0.25)[pid % 3], hidden=64, fraction_train=0.3)

Client ``pid`` receives the first ``round(width * hidden)`` (at least one) hidden units of every layer,
trains that narrower MLP, and returns it. The hidden axes are known by name for tilestack's MLP
(``HIDDEN_AXES``: the input and output sizes are never cut, even where they equal ``hidden``); for other
arrays every axis of length ``hidden`` is cut. The server averages each element of the global model over
the clients whose sub-model holds it (weighted by examples); elements no client held this round keep
their value. Needs a grid that knows partitions (``ManagedGrid``), and a task whose model is tilestack's MLP
(``check_task``, run by ``simulate`` and ``run_rounds`` before any work): the ClientApp builds narrower models
of the MLP only, and another model would have run as plain FedAvg (nothing of logistic regression or of the
transformer is ``hidden`` wide) or failed on every narrower client (the CNN).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from tilestack.federated.checks import require_int
from tilestack.federated.strategies._util import metric, ok_replies, pid_of, to_numpy, to_record, with_content

# tilestack's models: the axes of each array that run over hidden units (MLP: fc1.weight is (D, H), fc2.weight
# (H, C), fc2.bias (C,) has none; softmax regression has no hidden layer)
HIDDEN_AXES = {
    "fc1.weight": (1,), "fc1.bias": (0,), "fc2.weight": (0,), "fc2.bias": (), "bn.weight": (0,), "bn.bias": (0,),
    "bn.running_mean": (0,), "bn.running_var": (0,), "fc.weight": (), "fc.bias": (),
}  # fmt: skip


def _hidden_axes(key: str, shape: tuple[int, ...], hidden: int) -> tuple[int, ...]:
    if key in HIDDEN_AXES:
        return tuple(a for a in HIDDEN_AXES[key] if a < len(shape) and shape[a] == hidden)
    return tuple(a for a, n in enumerate(shape) if n == hidden)


def sub_model(params: dict[str, np.ndarray], hidden: int, width: float) -> dict[str, np.ndarray]:
    """The first ``round(width * hidden)`` (at least one) units along the hidden axes (see module doc)."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"sub_model: width={width!r}; expected in (0, 1]")
    keep = max(1, int(round(width * hidden)))
    out = {}
    for k, v in params.items():
        cut = _hidden_axes(k, v.shape, hidden)
        out[k] = v[tuple(slice(0, keep) if a in cut else slice(None) for a in range(v.ndim))]
    return out


class HeteroFL(FedAvg):
    """Width-heterogeneous clients aggregated into one global MLP (see module doc)."""

    # what a training reply holds where it is not the global model's arrays (checks.check_privacy reads it)
    REPLIES_HOLD = "sub-models narrower than the global model"

    def __init__(self, *, width_of: Callable[[int], float], hidden: int, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        require_int("HeteroFL", "hidden", hidden, low=1)
        if not callable(width_of):
            raise ValueError(f"HeteroFL: width_of={width_of!r}; expected a function of the partition id giving a "
                             "width in (0, 1]")
        self.width_of, self.hidden = width_of, hidden
        self._x: dict[str, np.ndarray] = {}
        # (noise_multiplier x clipping_norm, num_sampled_clients) of a client-side DP wrapper around this strategy,
        # set by run_rounds while a round aggregates (see _dp_top_up)
        self._dp_noise: tuple[float, int] | None = None

    def check_task(self, task) -> None:
        """Refuse a task whose model HeteroFL cannot cut into narrower sub-models (see module doc)."""
        if task.model != "mlp":
            raise ValueError(
                f"HeteroFL: task.model={task.model!r}; expected 'mlp' (tilestack's clients train narrower "
                "sub-models of the MLP only)"
            )
        if task.hidden != self.hidden:
            raise ValueError(
                f"HeteroFL: hidden={self.hidden}; expected the global model's hidden width {task.hidden} (task.hidden)"
            )
        # every partition's width, before any work: configure_train asked width_of only of the clients sampled, so a
        # width that cannot be (0, NaN, 1.5, a KeyError for one partition) ended the run in the first round that
        # sampled that client, after every earlier round's training (fraction_train=0.25: round 7 of 8)
        # kept as text, a plain setting the run's checkpoint signature compares (width_of itself is a function): a run
        # resumed with other widths is refused by name instead of training by either
        self.widths = " ".join(f"{self.width(pid):g}" for pid in range(task.num_clients))

    def width(self, pid: int) -> float:
        """``width_of(pid)`` as a float in (0, 1]; a ValueError naming the partition otherwise."""
        try:
            width = self.width_of(pid)
        except Exception as ex:  # noqa: BLE001 - the caller's function: any failure is a bad setting
            raise ValueError(f"HeteroFL: width_of({pid}) raised {type(ex).__name__}: {ex}; expected a number in "
                             "(0, 1] for every partition id 0..num_clients-1") from ex  # fmt: skip
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0.0 < width <= 1.0:
            raise ValueError(f"HeteroFL: width_of({pid}) = {width!r}; expected a number in (0, 1]")
        return float(width)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._x = to_numpy(arrays)
        if "fc1.weight" in self._x and self._x["fc1.weight"].shape[1] != self.hidden:
            raise ValueError(
                f"HeteroFL: hidden={self.hidden}; expected the global model's hidden width "
                f"{self._x['fc1.weight'].shape[1]} (fc1.weight is {self._x['fc1.weight'].shape})"
            )
        out = []
        for m in super().configure_train(server_round, arrays, config, grid):
            pid = pid_of(grid, m.metadata.dst_node_id)
            width = self.width(pid)
            sub = to_record(sub_model(self._x, self.hidden, width))
            out.append(with_content(m, RecordDict({**m.content, self.arrayrecord_key: sub})))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ok_replies(replies)
        if not replies:
            return None, None
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in self._x.items()}
        weight = {k: np.zeros_like(v, dtype=np.float64) for k, v in self._x.items()}
        top = {k: np.zeros_like(v, dtype=np.float64) for k, v in self._x.items()}  # the largest weight of a holder
        for m in replies:
            w = metric(m, self.weighted_by_key)
            for k, v in to_numpy(next(iter(m.content.array_records.values()))).items():
                region = tuple(slice(0, n) for n in v.shape)
                total[k][region] += w * v
                weight[k][region] += w
                top[k][region] = np.maximum(top[k][region], w)
        x_new = {
            k: np.where(weight[k] > 0, total[k] / np.maximum(weight[k], 1e-30), self._x[k])  # float64
            for k in self._x
        }
        if self._dp_noise is not None:
            x_new = self._dp_top_up(x_new, weight, top)
        metrics = aggregate_metricrecords([m.content for m in replies], self.weighted_by_key)
        return to_record(x_new, like=self._x), metrics

    def _dp_top_up(self, x_new: dict[str, np.ndarray], weight: dict[str, np.ndarray],
                   top: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # fmt: skip
        """Under a client-side DP wrapper, the noise the wrapper adds (std sigma C / m for every element, m the
        replies) covers a client's share 1 / m of each mean; an element only wider clients hold is the mean of fewer
        replies, where one client's (clipped) update moves it by up to its weight share top / weight > 1 / m. Before,
        those units were released under-noised (a third of the clients at full width: a noise multiplier sigma / 3
        for them). The noise that makes each element's std sigma C x share is added here, drawn from NumPy's
        stream (seeded per round by run_rounds) before the wrapper's."""
        sigma_c, m = self._dp_noise
        out = {}
        for k, v in x_new.items():
            share = np.divide(top[k], weight[k], out=np.zeros_like(top[k]), where=weight[k] > 0)
            extra = sigma_c * np.sqrt(np.maximum(share**2 - 1.0 / m**2, 0.0))  # (shape of k,) std of what is missing
            out[k] = v + np.random.normal(0.0, 1.0, v.shape) * extra
        return out
