"""Argument checks shared by the entry points (``simulate``, ``run_rounds``, ``run_secure``), run before any work.

    from tilestack.federated.checks import require_int, require_timeout, check_strategy
    require_int("simulate", "rounds", rounds, low=0)          # ValueError: simulate: rounds=-1; expected ...
    check_strategy(strategy, num_nodes=10)                    # FederatedError naming the strategy's argument

Every message names where, the argument, the value given and what was expected. ``check_strategy`` catches
the settings under which Flower's node sampling would wait forever (``sample_nodes`` polls once a second
until ``min_available_nodes`` nodes connect, and a fraction above 1 asks for more nodes than there are):
under :class:`~tilestack.federated.grid.ManagedGrid` every node has answered the roll call before the first
round, so no more will come.
"""

from __future__ import annotations

import math
import numbers

from flwr.serverapp.strategy import Strategy

from tilestack.errors import FederatedError

FRACTIONS = ("fraction_train", "fraction_evaluate")
# each minimum matters only when the fraction beside it samples anyone
MINIMA = {"min_train_nodes": ("fraction_train",), "min_evaluate_nodes": ("fraction_evaluate",),
          "min_available_nodes": FRACTIONS}  # fmt: skip


def require_int(where: str, name: str, value, *, low: int, high: int | None = None) -> None:
    """``value`` is an integer (not a bool) in ``[low, high]``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where}: {name}={value!r}; expected an integer {span}")


def require_timeout(where: str, value, name: str = "timeout") -> None:
    """``value`` is None (wait as long as it takes) or a finite number of seconds > 0."""
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{where}: {name}={value!r}; expected None (no limit) or a finite number of seconds > 0")


def _sampling_strategy(strategy: Strategy, num_nodes: int) -> tuple[Strategy, int, str]:
    """The innermost strategy (the one that samples), how many nodes it is shown, and why that many."""
    s, nodes, why = strategy, num_nodes, f"the {num_nodes} node{'s' if num_nodes != 1 else ''} of the run"
    while True:
        own = vars(s)  # not getattr: the wrappers forward unknown attributes to the strategy they wrap
        per_round = own.get("per_round")
        if isinstance(per_round, numbers.Integral) and per_round < nodes:  # Selected shows only its picks
            nodes, why = int(per_round), f"the per_round={per_round} nodes the selector shows it"
        inner = own.get("inner", own.get("strategy"))
        if not isinstance(inner, Strategy):
            return s, nodes, why
        s = inner


def check_strategy(strategy: Strategy, num_nodes: int) -> None:
    """Refuse sampling settings that cannot be met by ``num_nodes`` nodes (see module doc)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy is a {type(strategy).__name__}; expected a flwr.serverapp.strategy.Strategy")
    s, nodes, why = _sampling_strategy(strategy, num_nodes)
    name = type(s).__name__
    fractions = {}
    for attr in FRACTIONS:
        if not hasattr(s, attr):
            continue
        f = getattr(s, attr)
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (math.isfinite(f) and 0.0 <= f <= 1.0):
            raise FederatedError(f"{name}: {attr}={f!r}; expected a number in [0, 1] (the share of nodes sampled)")
        fractions[attr] = f
    for attr, used_by in MINIMA.items():
        if not hasattr(s, attr):
            continue
        m = getattr(s, attr)
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise FederatedError(f"{name}: {attr}={m!r}; expected an integer >= 0")
        if m > nodes and any(fractions.get(f, 1.0) > 0 for f in used_by):
            raise FederatedError(
                f"{name}: {attr}={m}; expected <= {nodes}, {why} (Flower's sampling would wait for nodes "
                "that never come)"
            )
