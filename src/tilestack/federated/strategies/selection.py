"""Client selection as a wrapper around any Flower strategy: seeded random, or Oort-style utility x speed.

    from tilestack.federated.strategies import Selected, RandomSelector, OortSelector
    strategy = Selected(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), OortSelector(system, seed=0), per_round=10)

``Selected`` picks ``per_round`` nodes with its selector and shows the wrapped strategy a grid that holds
only those nodes (so the wrapped strategy must take them all: ``fraction_train=1.0``). Replies go back to
the selector before aggregation, so it can learn from them.

``OortSelector`` follows Oort (Lai et al., OSDI 2021): a client's utility is its statistical utility
n_i * sqrt(mean loss^2) (here n_i x the training loss it reported), times (T / t_i)^alpha when its
expected round time t_i exceeds the preferred time T (a percentile of all clients' times), plus a
staleness bonus; a share ``epsilon`` of each round goes to clients never tried (exploration), and the rest
is drawn from the top utilities with probability proportional to utility.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from tilestack.federated.checks import require_int, require_real
from tilestack.federated.client import PARTITION_METRIC
from tilestack.federated.strategies._util import metric, ok_replies
from tilestack.federated.system import SystemModel


class SubsetGrid(Grid):
    """A view of ``grid`` that lists only ``node_ids``; everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._ids = grid, list(node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    @property
    def population(self) -> int:
        """How many nodes the wrapped grid holds (SCAFFOLD's N), not how many this view lists."""
        return getattr(self._grid, "population", None) or len(list(self._grid.get_node_ids()))

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class RandomSelector:
    """Uniform sampling without replacement, seeded by (seed, round)."""

    def __init__(self, seed: int = 0):
        require_int("RandomSelector", "seed", seed, low=0)
        self.seed = seed

    def select(self, server_round: int, node_ids: list[int], k: int, grid: Grid) -> list[int]:
        rng = np.random.default_rng([self.seed, server_round, 29])
        return [node_ids[i] for i in sorted(rng.choice(len(node_ids), size=k, replace=False))]

    def observe(self, server_round: int, replies: list[Message]) -> None:
        """Random selection learns nothing."""


class OortSelector:
    """Utility x speed selection in the spirit of Oort (see module doc)."""

    def __init__(
        self, system: SystemModel, *, full_steps: list[int] | None = None, alpha: float = 2.0,
        epsilon: float = 0.2, preferred_percentile: float = 50.0, seed: int = 0,
    ):  # fmt: skip
        # (a str as any of them raised "'<=' not supported between instances of 'float' and 'str'", naming nothing)
        if not isinstance(system, SystemModel):
            raise TypeError(f"OortSelector: system is a {type(system).__name__}; expected a tilestack SystemModel "
                            "(its speeds give each client's expected time)")  # fmt: skip
        require_real("OortSelector", "epsilon", epsilon, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        # NaN too: every slow client's utility became NaN
        require_real("OortSelector", "alpha", alpha, lambda v: v >= 0, "a finite number >= 0")
        require_real("OortSelector", "preferred_percentile", preferred_percentile, lambda v: 0 <= v <= 100,
                     "a number in [0, 100]")
        require_int("OortSelector", "seed", seed, low=0)
        if full_steps is not None and len(full_steps) != system.num_clients:
            raise ValueError(
                f"OortSelector: full_steps has {len(full_steps)} entries; expected one per client "
                f"(system.num_clients={system.num_clients})"
            )
        self.system, self.alpha, self.epsilon, self.seed = system, alpha, epsilon, seed
        steps = np.asarray(full_steps if full_steps is not None else [1] * system.num_clients, np.float64)
        assert system.speeds is not None
        with np.errstate(over="ignore", invalid="ignore"):  # a full work too long for a finite time is inf
            self.expected_time = steps / system.speeds  # (N,) seconds of compute for full work
            self.preferred = float(np.percentile(self.expected_time, preferred_percentile))
        self.utility: dict[int, float] = {}
        self.last_round: dict[int, int] = {}

    def _score(self, pid: int, server_round: int) -> float:
        u = self.utility[pid]
        u += u * np.sqrt(0.1 * np.log(max(server_round, 2)) / max(1, self.last_round.get(pid, 1)))  # staleness
        t = self.expected_time[pid]
        if t > self.preferred:  # (inf / inf was NaN: a client too slow for a finite time scores as the slowest do)
            u *= (self.preferred / t) ** self.alpha if math.isfinite(t) else 0.0
        return float(u)

    def select(self, server_round: int, node_ids: list[int], k: int, grid: Grid) -> list[int]:
        rng = np.random.default_rng([self.seed, server_round, 37])
        pid_of = grid.partition_of
        tried = [n for n in node_ids if pid_of[n] in self.utility]
        fresh = [n for n in node_ids if pid_of[n] not in self.utility]
        n_explore = min(len(fresh), max(k - len(tried), int(round(self.epsilon * k))))
        if n_explore:  # unexplored clients, faster ones first in expectation
            speed = np.array([1.0 / self.expected_time[pid_of[n]] for n in fresh])
            with np.errstate(invalid="ignore"):
                odds = speed / speed.sum()
            if not (np.all(np.isfinite(odds)) and np.count_nonzero(odds) >= n_explore):
                # (clients whose full work takes no finite time have odds 0: with too few others, numpy's choice
                # raised "Probabilities contain NaN" or "Fewer non-zero entries in p than size" in round 1)
                odds = np.full(len(fresh), 1.0 / len(fresh))
            pick = rng.choice(len(fresh), size=n_explore, replace=False, p=odds)
            chosen = [fresh[i] for i in pick]
        else:
            chosen = []
        n_exploit = k - len(chosen)
        if n_exploit:
            scores = np.array([self._score(pid_of[n], server_round) for n in tried])
            top = np.argsort(-scores)[: max(n_exploit, int(1.5 * n_exploit))]  # a little beyond the cut-off
            p = np.maximum(scores[top], 1e-12)
            pick = rng.choice(len(top), size=n_exploit, replace=False, p=p / p.sum())
            chosen += [tried[top[i]] for i in pick]
        return chosen

    def observe(self, server_round: int, replies: list[Message]) -> None:
        for m in replies:
            pid = int(metric(m, PARTITION_METRIC))
            self.utility[pid] = metric(m, "num-examples") * abs(metric(m, "train-loss"))
            self.last_round[pid] = server_round


class Selected(Strategy):
    """``inner`` strategy, trained on the ``per_round`` clients ``selector`` picks each round."""

    def __init__(self, inner: Strategy, selector: RandomSelector | OortSelector, per_round: int):
        require_int("Selected", "per_round", per_round, low=1)
        if not isinstance(inner, Strategy):  # (None or a name ran until round 1 raised AttributeError on it)
            raise TypeError(f"Selected: inner is a {type(inner).__name__}; expected a flwr Strategy to wrap")
        if getattr(inner, "fraction_train", 1.0) != 1.0:
            raise ValueError(
                f"Selected: inner.fraction_train={inner.fraction_train!r}; expected 1.0 (the selector picks the nodes)"
            )
        for name in ("min_train_nodes", "min_available_nodes"):
            if getattr(inner, name, 0) > per_round:
                raise ValueError(
                    f"Selected: inner.{name}={getattr(inner, name)}; expected <= per_round={per_round} "
                    "(the wrapped strategy sees only the selected nodes)"
                )
        if not all(callable(getattr(selector, hook, None)) for hook in ("select", "observe")):
            raise TypeError(
                f"Selected: selector is a {type(selector).__name__}; expected an object with select(server_round, "
                "node_ids, k, grid) and observe(server_round, replies), e.g. RandomSelector(seed) or "
                "OortSelector(system)"
            )
        self.inner, self.selector, self.per_round = inner, selector, per_round

    def check_task(self, task) -> None:
        """A selector that models the clients' system (Oort: their speeds) must model this task's clients (run by
        ``simulate`` and ``run_rounds`` before any work). Before, an OortSelector over a SystemModel of 7 clients ran
        a task of 4, ranking them against 3 clients that do not exist, and one of 3 clients ended a run of 4 with an
        IndexError in the round that first picked client 3."""
        system = getattr(self.selector, "system", None)
        if isinstance(system, SystemModel) and system.num_clients != task.num_clients:
            raise ValueError(
                f"Selected: {type(self.selector).__name__}'s system has num_clients={system.num_clients}; expected the "
                f"task's num_clients={task.num_clients}"
            )

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        ids = list(grid.get_node_ids())
        self._partition_of = dict(getattr(grid, "partition_of", None) or {})  # node -> partition, for observe
        chosen = self.selector.select(server_round, ids, min(self.per_round, len(ids)), grid)
        return self.inner.configure_train(server_round, arrays, config, SubsetGrid(grid, chosen))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.selector.observe(server_round, [self._with_partition(m) for m in ok_replies(replies)])
        return self.inner.aggregate_train(server_round, replies)

    def _with_partition(self, msg: Message) -> Message:
        """``msg`` as the selector sees it: with its client's partition id (from the grid, by the sending node) where
        the reply carries none. A ClientApp that does not report it (Flower's own apps) had every reply filed under
        partition 0 by Oort's ``metric(m, PARTITION_METRIC)``, one client's utility written over by the others'."""
        pid = vars(self).get("_partition_of", {}).get(msg.metadata.src_node_id)
        records = msg.content.metric_records
        if pid is None or len(records) != 1 or PARTITION_METRIC in next(iter(records.values())):
            return msg
        name, record = next(iter(records.items()))
        content = RecordDict({**msg.content, name: MetricRecord({**record, PARTITION_METRIC: pid})})
        return Message(content=content, metadata=msg.metadata)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
