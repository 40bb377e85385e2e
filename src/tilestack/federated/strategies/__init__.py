"""tilestack's strategies: Flower ``Strategy`` subclasses and wrappers, plus Flower's own by name.

    from tilestack.federated.strategies import make_strategy, Scaffold, FedNova, IFCA, Selected
    strategy = make_strategy("fedprox", clients_per_round=10, num_clients=30, proximal_mu=1.0)

``make_strategy`` builds Flower's FedAvg, FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum,
MultiKrum, Bulyan and its DP wrapper, q-FedAvg (fed each client's loss at the global model), or
tilestack's SCAFFOLD, FedNova, FedBN, IFCA, CFL, by name (``Ditto`` and the others are classes here), sampling
``clients_per_round`` of ``num_clients`` per round (evaluation on ``eval_fraction`` of them).
"""

from __future__ import annotations

import itertools
import math
import numbers

from flwr.serverapp import strategy as fl

from tilestack.federated.checks import SERVER_STEP_LIMIT, require_int
from tilestack.federated.client import UNIT_WEIGHT
from tilestack.federated.strategies.cfl import CFL
from tilestack.federated.strategies.ditto import Ditto
from tilestack.federated.strategies.dp import ClientSideAdaptiveClipping, ServerSideAdaptiveClipping
from tilestack.federated.strategies.fedbn import FedBN
from tilestack.federated.strategies.feddf import FedDF
from tilestack.federated.strategies.fednova import FedNova
from tilestack.federated.strategies.heterofl import HeteroFL, sub_model
from tilestack.federated.strategies.ifca import IFCA, adjusted_rand_index
from tilestack.federated.strategies.qffl import QFFL
from tilestack.federated.strategies.scaffold import Scaffold
from tilestack.federated.strategies.selection import OortSelector, RandomSelector, Selected, SubsetGrid

NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmedmean", "krum", "multikrum", "bulyan",
    "dp-fedavg", "scaffold", "fednova", "fedbn", "ifca", "qfedavg", "cfl",
)  # fmt: skip


# A strategy's own knob: its default and the strategies that read it. Given to any other strategy it was taken without
# a word (make_strategy("fedavg", proximal_mu=1.0) ran plain FedAvg); make_strategy and `fl run` refuse it through
# `misplaced_setting`. (client_lr, num_malicious and num_clusters are left out: `fl run` passes them to every strategy.)
STRATEGY_SETTINGS: dict[str, tuple[object, tuple[str, ...]]] = {
    "proximal_mu": (0.0, ("fedprox",)),
    "server_lr": (0.1, ("fedadam", "fedyogi")),
    "q": (1.0, ("qfedavg",)),
    "noise_multiplier": (1.0, ("dp-fedavg",)),
    "clipping_norm": (1.0, ("dp-fedavg",)),
    "accountant": (None, ("dp-fedavg",)),
}


def misplaced_setting(name: str, settings: dict[str, object]) -> tuple[str, object, tuple[str, ...]] | None:
    """The first of ``settings`` (argument -> value) set away from its default although strategy ``name`` does not
    read it, as (argument, value, the strategies that do), or None."""
    for arg, value in settings.items():
        default, users = STRATEGY_SETTINGS[arg]
        changed = value is not None if default is None else value != default
        if changed and name not in users:
            return arg, value, users
    return None


def _trim_beta(clients_per_round: int, num_malicious: int) -> float:
    return min(0.49, max(0.1, num_malicious / clients_per_round + 0.05))


def _trimmed(clients_per_round: int, num_malicious: int) -> int:
    """Replies Flower's trimmed mean cuts from each end: int(beta x n)."""
    return int(_trim_beta(clients_per_round, num_malicious) * clients_per_round)


def make_strategy(
    name: str,
    *,
    clients_per_round: int,
    num_clients: int,
    eval_fraction: float = 0.0,
    proximal_mu: float = 0.0,
    server_lr: float = 0.1,
    num_malicious: int = 0,
    num_clusters: int | None = None,
    noise_multiplier: float = 1.0,
    clipping_norm: float = 1.0,
    accountant=None,
    q: float = 1.0,
    client_lr: float = 0.01,
) -> fl.Strategy:
    """A strategy by name (see ``NAMES``); a ``ValueError`` names the argument when it does not fit."""
    if name not in NAMES:
        raise ValueError(f"make_strategy: name={name!r}; expected one of {NAMES}")
    require_int("make_strategy", "num_clients", num_clients, low=1)
    require_int("make_strategy", "clients_per_round", clients_per_round, low=1, high=num_clients)
    require_int("make_strategy", "num_malicious", num_malicious, low=0)
    if num_clusters is None:     # IFCA's default: two cluster models, or one per client where fewer clients
        num_clusters = min(2, num_clients)
    require_int("make_strategy", "num_clusters", num_clusters, low=1)
    for arg, value, ok, expected in (
        ("eval_fraction", eval_fraction, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        ("proximal_mu", proximal_mu, lambda v: v >= 0.0, ">= 0"),
        ("server_lr", server_lr, lambda v: 0.0 < v < SERVER_STEP_LIMIT, f"> 0 and < 2**23 = {SERVER_STEP_LIMIT:.0f}"),
        ("noise_multiplier", noise_multiplier, lambda v: v >= 0.0, ">= 0"),
        ("clipping_norm", clipping_norm, lambda v: v > 0.0, "> 0"),
        ("q", q, lambda v: v >= 0.0, ">= 0"),
        ("client_lr", client_lr, lambda v: v > 0.0, "> 0"),
    ):
        number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not ok(value):
            raise ValueError(f"make_strategy: {arg}={value!r}; expected a number {expected}")
    misplaced = misplaced_setting(name, dict(proximal_mu=proximal_mu, server_lr=server_lr, q=q,
                                             noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                                             accountant=accountant))  # fmt: skip
    if misplaced is not None:
        arg, value, users = misplaced
        raise ValueError(f"make_strategy: {arg}={value!r} is a setting of {' or '.join(users)}; got name={name!r}, "
                         f"which does not use it")  # fmt: skip
    common = dict(
        fraction_train=clients_per_round / num_clients,
        fraction_evaluate=eval_fraction,
        min_train_nodes=clients_per_round,
        min_evaluate_nodes=max(1, int(eval_fraction * num_clients)) if eval_fraction else 0,
        min_available_nodes=num_clients,
    )
    if name == "fedavg":
        return fl.FedAvg(**common)
    if name == "fedprox":
        return fl.FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedadam":
        return fl.FedAdam(**common, eta=server_lr)
    if name == "fedyogi":
        return fl.FedYogi(**common, eta=server_lr)
    if name == "fedmedian":
        return fl.FedMedian(**common)
    if name == "trimmedmean":
        trimmed = _trimmed(clients_per_round, num_malicious)
        if trimmed < num_malicious:
            least = next(n for n in itertools.count(clients_per_round) if _trimmed(n, num_malicious) >= num_malicious)
            raise ValueError(
                f"make_strategy: clients_per_round={clients_per_round} with num_malicious={num_malicious}; the trimmed "
                f"mean cuts {trimmed} replies from each end, fewer than the attackers; expected clients_per_round >= "
                f"{least}"
            )
        # beta 0 where too few clients are sampled to trim one (and none is malicious): the plain mean it was anyway
        return fl.FedTrimmedAvg(**common, beta=_trim_beta(clients_per_round, num_malicious) if trimmed else 0.0)
    if name == "krum":
        return fl.Krum(**common, num_malicious_nodes=num_malicious)
    if name == "multikrum":
        return fl.MultiKrum(**common, num_malicious_nodes=num_malicious,
                            num_nodes_to_select=max(1, clients_per_round - num_malicious))  # fmt: skip
    if name == "bulyan":
        if clients_per_round < 4 * num_malicious + 3:
            raise ValueError(
                f"make_strategy: clients_per_round={clients_per_round} with num_malicious={num_malicious}; "
                f"Bulyan expects clients_per_round >= 4 * num_malicious + 3 = {4 * num_malicious + 3}"
            )
        return fl.Bulyan(**common, num_malicious_nodes=num_malicious)
    if name == "dp-fedavg":
        # Flower's wrapper refuses these in its own words, naming no argument ("The noise multiplier must be positive
        # when accounting is enabled": `fl run --strategy dp-fedavg --noise 0`, which always accounts)
        if accountant is not None and noise_multiplier == 0:
            raise ValueError(f"make_strategy: noise_multiplier={noise_multiplier!r} with an accountant; expected a "
                             "number > 0 (no epsilon bounds a release without noise), or accountant=None")  # fmt: skip
        inner = fl.FedAvg(**common, weighted_by_key=UNIT_WEIGHT)
        try:
            return fl.DifferentialPrivacyServerSideFixedClipping(
                inner, noise_multiplier, clipping_norm, clients_per_round, accountant=accountant
            )
        except (ValueError, AttributeError) as ex:  # an accountant Flower's accounted path does not take
            raise ValueError(f"make_strategy: accountant={accountant!r}: {ex}") from ex
    if name == "scaffold":
        return Scaffold(**common)
    if name == "fednova":
        return FedNova(**common)
    if name == "fedbn":
        return FedBN(**common)
    if name == "qfedavg":
        return QFFL(q=q, client_learning_rate=client_lr, **common)
    if name == "cfl":
        return CFL(**common)
    return IFCA(num_clusters=num_clusters, **common)


__all__ = [
    "NAMES", "STRATEGY_SETTINGS", "make_strategy", "misplaced_setting",
    "Scaffold", "FedNova", "FedBN", "FedDF", "HeteroFL", "sub_model", "IFCA", "Ditto",
    "adjusted_rand_index", "QFFL", "CFL", "Selected", "RandomSelector", "OortSelector", "SubsetGrid",
    "ServerSideAdaptiveClipping", "ClientSideAdaptiveClipping",
]  # fmt: skip
