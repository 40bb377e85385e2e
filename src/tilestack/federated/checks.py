"""Argument checks shared by the entry points (``simulate``, ``run_rounds``, ``run_secure``), run before any work.

    from tilestack.federated.checks import require_int, require_timeout, check_strategy
    require_int("simulate", "rounds", rounds, low=0)          # ValueError: simulate: rounds=-1; expected ...
    check_strategy(strategy, num_nodes=10)                    # FederatedError naming the strategy's argument

Every message names where, the argument, the value given and what was expected. ``check_strategy`` catches
the settings under which Flower's node sampling would wait forever (``sample_nodes`` polls once a second
until ``min_available_nodes`` nodes connect, and a fraction above 1 asks for more nodes than there are):
under :class:`~tilestack.federated.grid.ManagedGrid` every node has answered the roll call before the first
round, so no more will come. It also checks the hyperparameters of Flower's strategies at every level of a
wrapped strategy (``HYPERPARAMETERS``), which Flower takes as given: ``FedAvgM(server_momentum=-0.5)`` or
``nan`` ran as plain FedAvg (its update tests ``momentum > 0``), ``FedProx(proximal_mu=nan)`` made every
client's model NaN, ``FedAdam(beta_1=1.0)`` divided by zero, round after round, without a word. A
strategy that fits only some tasks says so through a ``check_task(task)`` method (HeteroFL: the MLP only).
Flower's DP wrappers are checked against what they wrap (``check_privacy``): ``num_sampled_clients`` must be
the number the wrapped strategy samples (the noise is ``noise_multiplier * clipping_norm / num_sampled_clients``,
so a larger number under-noises every round; with an accountant the replies must be weighted equally, by
``UNIT_WEIGHT``), and compressed updates go through ``Compressed`` outside a
server-side DP wrapper, never with client-side clipping (error feedback sends more than was clipped). A
server-side DP wrapper clips each reply array by array against the global model, so it is refused over a
strategy whose replies hold other arrays (``REPLIES_HOLD``: HeteroFL's sub-models, IFCA's and CFL's single
cluster, FedBN without its local layers, SCAFFOLD's control-variate changes), which ended the run after round 1's
training with a numpy broadcasting or ``zip()`` error; a client-side one over SCAFFOLD (``UNCLIPPED``), whose
control-variate changes carry each client's unclipped update back to everyone. Flower's Byzantine-robust rules
are checked against the nodes they sample (``check_robust``): Krum and MultiKrum with f > 0 need 2f + 3 of them,
Bulyan 4f + 3, MultiKrum cannot keep more than it samples (Flower ran them anyway: Krum with f = 5 of 6 nodes
scored each update by its one nearest neighbour, and Bulyan skipped every round); FedTrimmedAvg must trim at least
one reply from each end (int(beta x sampled) >= 1: beta=0.1 over 5 nodes trimmed none, and ran as the plain mean
that one attacker drove to accuracy 0).
A DP wrapper is also refused over a strategy whose aggregate is no mean of the replies (``_not_a_mean``: FedDF,
FedNova, Flower's robust rules, server optimisers, q-FedAvg): its noise, sized for one client's share C / n of a mean
and added after the inner strategy's step, does not cover what one client can change in them.
A strategy must send its model and config in the records tilestack's ClientApp reads, 'arrays' and 'config'
(``check_record_keys``: Flower's ``arrayrecord_key`` / ``configrecord_key``).
FedProx is checked against the task's learning rate (``check_proximal``): a local step moves the weights by
lr * mu times their distance from the global model, so lr * mu >= 2 overshoots it by more than that distance
every step and every client's training diverges (mu = 1000 with lr 0.1 ran to accuracy 0.0, every reply finite).
"""

from __future__ import annotations

import math
import numbers
import sys
import threading
import warnings

import numpy as np
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from tilestack.errors import FederatedError
from tilestack.federated import codec
from tilestack.federated.client import CLUSTER_SEP, UNIT_WEIGHT
from tilestack.federated.models import PROXIMAL_STEP_LIMIT  # noqa: F401  (checks' name for it: driver, Ditto)

FRACTIONS = ("fraction_train", "fraction_evaluate")
# each minimum matters only when the fraction beside it samples anyone
MINIMA = {"min_train_nodes": ("fraction_train",), "min_evaluate_nodes": ("fraction_evaluate",),
          "min_available_nodes": FRACTIONS}  # fmt: skip


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _decay(v) -> bool:  # a moving average's factor: 1 would never move
    return 0 <= v < 1


def _unit(v) -> bool:
    return 0 <= v <= 1


# A server step that scales the clients' mean update (FedAvgM's server_learning_rate, SCAFFOLD's global_lr) by
# 1 / eps(float32) = 2**23 or more turns the half-ulp rounding of a float32 upload into a move as large as the weight
# itself, and FedOpt's eta (each weight moves by about eta a round) leaves a float32 weight no fraction: the run is
# rounding noise, and at 1e300 every aggregate overflowed and was rejected, round after round, the model never moving.
SERVER_STEP_LIMIT = float(1 / np.finfo(np.float32).eps)


def _server_step(v) -> bool:
    return 0 < v < SERVER_STEP_LIMIT


SERVER_STEP_EXPECTED = f"a number > 0 and < 2**23 = {SERVER_STEP_LIMIT:.0f} (past it a server step is float32 rounding)"

# q-FedAvg's Lipschitz estimate L = 1 / client_learning_rate must be a normal float64: a subnormal rate (5e-324) made
# L inf and every aggregate NaN, one past 1 / tiny made L subnormal, its h_k terms rounding noise
QFFL_LR_RANGE = (1.0 / sys.float_info.max, 1.0 / sys.float_info.min)
QFFL_LR_EXPECTED = (f"a number in [{QFFL_LR_RANGE[0]:.3g}, {QFFL_LR_RANGE[1]:.3g}] (L = 1 / client_learning_rate, "
                    "q-FedAvg's Lipschitz estimate, must be a normal float64)")


def _qffl_lr(v) -> bool:
    return QFFL_LR_RANGE[0] <= v <= QFFL_LR_RANGE[1]


# Flower strategy class -> {attribute: (test on a finite real, what was expected)}; every level of a wrapped
# strategy is checked. Flower itself checks FedTrimmedAvg's beta and (except NaN) the DP wrappers' numbers.
HYPERPARAMETERS: dict[type, dict[str, tuple]] = {
    fl.FedProx: {"proximal_mu": (_non_negative, "a number >= 0 (0: FedAvg)")},
    fl.FedAvgM: {"server_learning_rate": (_server_step, SERVER_STEP_EXPECTED),
                 "server_momentum": (_decay, "a number in [0, 1)")},
    # FedAdam, FedYogi, FedAdagrad
    FedOpt: {"eta": (_server_step, SERVER_STEP_EXPECTED), "eta_l": (_positive, "a number > 0"),
             "beta_1": (_decay, "a number in [0, 1)"), "beta_2": (_decay, "a number in [0, 1)"),
             "tau": (_positive, "a number > 0 (it keeps eta / (sqrt(v) + tau) finite)")},
    fl.QFedAvg: {"q": (_non_negative, "a number >= 0"), "client_learning_rate": (_qffl_lr, QFFL_LR_EXPECTED)},
    fl.FedTrimmedAvg: {"beta": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")},
    fl.MultiKrum: {"num_malicious_nodes": (_non_negative, "an integer >= 0"),  # Krum too
                   "num_nodes_to_select": (_positive, "an integer >= 1")},
    fl.Bulyan: {"num_malicious_nodes": (_non_negative, "an integer >= 0")},
    fl.DifferentialPrivacyServerSideFixedClipping: {"noise_multiplier": (_non_negative, "a number >= 0"),
                                                    "clipping_norm": (_positive, "a number > 0")},
    fl.DifferentialPrivacyClientSideFixedClipping: {"noise_multiplier": (_non_negative, "a number >= 0"),
                                                    "clipping_norm": (_positive, "a number > 0")},
    # clipped_count_stddev first: Flower takes NaN / inf (its check is `< 0`) and derives noise_multiplier from it
    # (NaN), and its noised clipped count made the clipping norm NaN: every round was skipped as non-finite
    fl.DifferentialPrivacyServerSideAdaptiveClipping: {
        "clipped_count_stddev": (_non_negative, "a number >= 0 (the std of the noised count of clipped updates)"),
        "noise_multiplier": (_non_negative, "a number >= 0"), "clipping_norm": (_positive, "a number > 0"),
        "target_clipped_quantile": (_unit, "a number in [0, 1]"), "clip_norm_lr": (_positive, "a number > 0")},
    fl.DifferentialPrivacyClientSideAdaptiveClipping: {
        "clipped_count_stddev": (_non_negative, "a number >= 0 (the std of the noised count of clipped updates)"),
        "noise_multiplier": (_non_negative, "a number >= 0"), "clipping_norm": (_positive, "a number > 0"),
        "target_clipped_quantile": (_unit, "a number in [0, 1]"), "clip_norm_lr": (_positive, "a number > 0")},
}  # fmt: skip
INTEGER_HYPERPARAMETERS = ("num_malicious_nodes", "num_nodes_to_select")
DP_WRAPPERS = (fl.DifferentialPrivacyServerSideFixedClipping, fl.DifferentialPrivacyClientSideFixedClipping,
               fl.DifferentialPrivacyServerSideAdaptiveClipping, fl.DifferentialPrivacyClientSideAdaptiveClipping)
CLIENT_SIDE_DP = (fl.DifferentialPrivacyClientSideFixedClipping, fl.DifferentialPrivacyClientSideAdaptiveClipping)
# Flower's strategies whose aggregate is no mean of all replies (robust rules, server optimisers, q-FedAvg): a DP
# wrapper's noise, sized for one client's share 1 / m of such a mean, does not cover what one client can change in them
# (tilestack's own say so by NOT_A_MEAN)
ROBUST_NOT_A_MEAN = {
    fl.MultiKrum: "keeps the updates nearest their neighbours and averages those alone (Krum: one client's update, "
                  "which moves by up to clipping_norm)",
    fl.Bulyan: "averages the replies nearest the coordinate-wise median of a Krum-selected subset",
    fl.FedMedian: "takes the coordinate-wise median, which one client can move by up to clipping_norm",
    fl.FedTrimmedAvg: "averages what is left after trimming, and which replies are left depends on each client",
    # Flower's wrapper adds its noise after the inner strategy's step: a server optimiser's step is then no
    # post-processing of a noised mean
    FedOpt: "steps by eta m / (sqrt(v) + tau), moments of the unnoised means, before the noise is added (one client "
            "moves it by up to eta / tau x C / n)",
    fl.QFedAvg: "weights each update by the client's loss to the power q over a sum of every update's norm",
}  # fmt: skip


def _not_a_mean(strategy: Strategy) -> str:
    """Why a DP wrapper's noise does not cover ``strategy``'s aggregate ('' when it is a plain mean of the replies)."""
    if why := getattr(type(strategy), "NOT_A_MEAN", ""):
        return why
    if isinstance(strategy, fl.FedAvgM) and (strategy.server_momentum > 0 or strategy.server_learning_rate > 1):
        return ("steps by its server learning rate along a momentum of the unnoised means of earlier rounds, before "
                "the noise is added (with server_momentum=0 and server_learning_rate <= 1 it is the mean)")
    return next((why for cls, why in ROBUST_NOT_A_MEAN.items() if isinstance(strategy, cls)), "")


def require_int(where: str, name: str, value, *, low: int, high: int | None = None) -> None:
    """``value`` is an integer (not a bool) in ``[low, high]``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where}: {name}={value!r}; expected an integer {span}")


def require_real(where: str, name: str, value, ok, expected: str) -> None:
    """``value`` is a finite real number (not a bool) for which ``ok`` holds; ``expected`` says which. A
    FederatedError (a ValueError), as ``check_hyperparameters`` raises for the numbers it checks at the run."""
    try:     # (an int past float's range overflows in float())
        number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        number = False
    if not number or not ok(value):
        raise FederatedError(f"{where}: {name}={value!r}; expected {expected}")


def require_real_arrays(where: str, name: str, arrays) -> None:
    """Every array of the ArrayRecord ``arrays`` holds finite real numbers numpy can read. A dtype it cannot hold
    (bfloat16 from torch: numpy has none without ml_dtypes) made every client fail on the model, round after round, and
    the server's evaluation raise TypeError after the first; a NaN made every reply non-finite, each round skipped."""
    for k, a in arrays.items():
        try:
            np.dtype(a.dtype)
        except TypeError:
            raise ValueError(
                f"{where}: {name}[{k!r}] has dtype {a.dtype!r}, which numpy cannot hold; expected real numbers "
                "(float16, float32 or float64: send a torch bfloat16 tensor as tensor.float())"
            ) from None
        try:
            value = codec.decode(a)
        except Exception as ex:  # noqa: BLE001 - numpy and Flower raise several kinds on bad bytes
            raise ValueError(f"{where}: {name}[{k!r}] cannot be decoded ({type(ex).__name__}: {ex})") from ex
        if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
            raise ValueError(f"{where}: {name}[{k!r}] has dtype {value.dtype}; expected real numbers")
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:  # every client's reply was NaN and left out, round after round: nothing could ever be aggregated
            raise ValueError(
                f"{where}: {name}[{k!r}] holds {bad} non-finite value{'s' * (bad > 1)} of {np.size(value)}; "
                "expected finite numbers"
            )


def require_float_model(where: str, name: str, arrays, task) -> None:
    """The arrays of ``arrays`` that ``task``'s model trains (by name; IFCA's ``cluster{j}/name`` too) are floating
    point. An integer model trained and was averaged, and every aggregate was cast back to integers: the weights
    stayed whole numbers (zeros from a zero start) and the run learned nothing, without a word."""
    trained = {k for k, v in task.initial_params().items() if np.asarray(v).dtype.kind == "f"}
    for k, a in arrays.items():
        if k.rpartition(CLUSTER_SEP)[2] in trained and np.dtype(a.dtype).kind != "f":
            raise ValueError(
                f"{where}: {name}[{k!r}] has dtype {np.dtype(a.dtype)}; expected floating point (float16, float32 or "
                "float64): every aggregate is stored in the model's dtype, and an integer model stays whole numbers"
            )


def require_timeout(where: str, value, name: str = "timeout") -> None:
    """``value`` is None (wait as long as it takes) or a finite number of seconds > 0."""
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{where}: {name}={value!r}; expected None (no limit) or a finite number of seconds > 0")
    if value > threading.TIMEOUT_MAX:  # (1e10 was taken, and round 1 ended in the wait for the first client with
        # "OverflowError: timestamp out of range for platform time_t")
        raise ValueError(f"{where}: {name}={value!r}; expected at most {threading.TIMEOUT_MAX:g} seconds (the longest "
                         "wait Python's threads take), or None for no limit")  # fmt: skip


def strategy_levels(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and the strategies it wraps (``inner`` of tilestack's wrappers, ``strategy`` of Flower's DP
    wrappers), outermost first."""
    out = [strategy]
    while isinstance(inner := vars(out[-1]).get("inner", vars(out[-1]).get("strategy")), Strategy):
        out.append(inner)
    return out


def check_hyperparameters(strategy: Strategy) -> None:
    """Refuse a Flower strategy's hyperparameter outside its meaningful range (see ``HYPERPARAMETERS``)."""
    for s in strategy_levels(strategy):
        for cls, rules in HYPERPARAMETERS.items():
            if not isinstance(s, cls):
                continue
            for attr, (ok, expected) in rules.items():
                if attr not in vars(s):
                    continue
                v = vars(s)[attr]
                kind = numbers.Integral if attr in INTEGER_HYPERPARAMETERS else numbers.Real
                number = isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)
                if not number or not ok(v):
                    raise FederatedError(f"{type(s).__name__}: {attr}={v!r}; expected {expected}")


# the records a message's model and config travel in: tilestack's ClientApp reads these names (as Flower's own apps
# do), and ManagedGrid puts a client's share of work into the config record by name
RECORD_KEYS = {"arrayrecord_key": "arrays", "configrecord_key": "config"}
METRIC_KEYS = ("weighted_by_key", "train_loss_key")  # the metrics Flower's strategies weight by / read the loss from


def check_record_keys(strategy: Strategy) -> None:
    """Refuse a Flower strategy that sends its model or config under another record name
    (``FedAvg(arrayrecord_key="model")``): every client failed on the missing 'arrays' record, round after round, and
    the run aggregated nothing. Refuse a weighting or loss metric name that is no name (``weighted_by_key=None``):
    Flower looked up the key None in every reply and skipped every round as 'inconsistent replies'."""
    for s in strategy_levels(strategy):
        for attr in METRIC_KEYS:
            if attr in vars(s) and not (isinstance(vars(s)[attr], str) and vars(s)[attr]):
                raise FederatedError(f"{type(s).__name__}: {attr}={vars(s)[attr]!r}; expected the name of a metric "
                                     "every client reply carries (a non-empty str, e.g. 'num-examples')")  # fmt: skip
        for attr, want in RECORD_KEYS.items():
            got = vars(s).get(attr, want)
            if got != want:
                raise FederatedError(
                    f"{type(s).__name__}: {attr}={got!r}; expected {want!r}, the record tilestack's ClientApp reads "
                    f"the {'model' if want == 'arrays' else 'round config'} from"
                )


METRIC_FUNCTIONS = ("train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")  # Flower's FedAvg family: fn(records, key)


def check_metric_functions(strategy: Strategy) -> None:
    """Refuse a metrics aggregation function (Flower's ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``, at
    every level) that is no function: Flower stores what it is given and calls it only once a round's replies are in,
    so ``FedAvg(evaluate_metrics_aggr_fn=3)`` ended the run with "'int' object is not callable" after round 1's clients
    had trained, the round's work lost."""
    for s in strategy_levels(strategy):
        for attr in METRIC_FUNCTIONS:
            fn = vars(s).get(attr)
            if attr in vars(s) and not callable(fn):
                raise TypeError(f"{type(s).__name__}: {attr} is a {type(fn).__name__}; expected a function "
                                "(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord, or None "
                                "for Flower's weighted mean")  # fmt: skip


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


def check_strategy(strategy: Strategy, num_nodes: int, task=None) -> None:
    """Refuse sampling settings that cannot be met by ``num_nodes`` nodes, hyperparameters out of range, and a
    ``task`` that a strategy in the chain cannot run (see module doc)."""
    if not isinstance(strategy, Strategy):
        # the class itself (FedAvg for FedAvg(...)) read "strategy is a ABCMeta"
        what = (f"the class {strategy.__name__}, not an instance" if isinstance(strategy, type)
                else f"a {type(strategy).__name__}")  # fmt: skip
        raise TypeError(f"strategy is {what}; expected a flwr.serverapp.strategy.Strategy (e.g. FedAvg(...))")
    check_hyperparameters(strategy)
    check_record_keys(strategy)
    check_metric_functions(strategy)
    if task is not None:
        for s in strategy_levels(strategy):
            if callable(check_task := getattr(type(s), "check_task", None)):
                check_task(s, task)
        check_proximal(strategy, task)
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
    for level in strategy_levels(strategy):  # a selector's pick: it picked every node, not the number asked for
        per_round = vars(level).get("per_round")
        if isinstance(per_round, numbers.Integral) and per_round > num_nodes:
            raise FederatedError(
                f"{type(level).__name__}: per_round={per_round}; expected at most the {num_nodes} node"
                f"{'s' if num_nodes != 1 else ''} of the run (it would pick all {num_nodes} each round)"
            )
    check_privacy(strategy, num_nodes)
    check_robust(strategy, num_nodes)


def nodes_short(strategy: Strategy, online: int, population: int, phase: str) -> str:
    """Why ``strategy`` cannot sample its ``phase`` ('train' or 'evaluate') from the ``online`` nodes of this round
    ('' when it can). Flower's ``sample_nodes`` polls once a second until max(min_available_nodes, the sample size)
    nodes are connected; with clients offline by the system's availability (or busy with late work) no more come
    during the round, and the run hung (a round with no client online, or one under FedAvg's default minimum of 2)."""
    sampler, nodes, _ = _sampling_strategy(strategy, online)
    own = vars(sampler)
    fraction, least = own.get(f"fraction_{phase}"), own.get(f"min_{phase}_nodes", 0)
    if not isinstance(fraction, numbers.Real) or not fraction > 0 or not isinstance(least, numbers.Integral):
        return ""  # samples nobody (or not a FedAvg-like sampler)
    available = own.get("min_available_nodes", 0)
    need = max(int(nodes * fraction), int(least), int(available) if isinstance(available, numbers.Integral) else 0)
    if nodes >= need:
        return ""
    return (f"{online} of {population} clients available (the others offline by the system's availability or busy "
            f"with late work); {type(sampler).__name__} samples its {phase} nodes from at least {need} "
            f"(min_available_nodes={available}, min_{phase}_nodes={least}), and Flower's sampling would wait for nodes "
            "that do not come this round")  # fmt: skip


def check_availability(where: str, strategy: Strategy, system) -> None:
    """Refuse a strategy whose sampling needs more training (or, where it evaluates, evaluation) nodes than the
    system's availability pattern ever has online (a client counts in a row where its chance is > 0): every round of
    the run would be skipped as short of nodes (``nodes_short``), one warning a round, and the run trained (or
    evaluated) nothing (FedAvg's default minimum of 2 with a pattern of one client a round)."""
    pattern = getattr(system, "availability", None)
    if pattern is None:
        return
    most = int(np.max(np.count_nonzero(np.asarray(pattern) > 0, axis=1)))
    for phase in ("train", "evaluate"):
        if nodes_short(strategy, most, system.num_clients, phase):
            sampler, _, _ = _sampling_strategy(strategy, most)
            own = vars(sampler)
            least = f"min_{phase}_nodes"
            raise FederatedError(
                f"{where}: {type(sampler).__name__} samples its {phase} nodes from at least min_available_nodes="
                f"{own.get('min_available_nodes')}, {least}={own.get(least)} nodes, and the system's availability has "
                f"at most {most} of {system.num_clients} clients online in any round (every round's "
                f"{'training' if phase == 'train' else 'federated evaluation'} would be skipped); expected "
                f"min_available_nodes and {least} <= {most}, or a pattern with more clients online"
            )


def check_stale(strategy: Strategy) -> None:
    """Refuse late updates (``stragglers='stale'``) under a strategy whose replies are not the global model's arrays,
    or under a DP wrapper (see ``staleness``)."""
    for s in strategy_levels(strategy):
        name = type(s).__name__
        if held := getattr(type(s), "REPLIES_HOLD", ""):
            raise FederatedError(
                f"stragglers='stale' with {name}: a late update is moved onto the current global model array by "
                f"array, and {name}'s replies hold {held}; expected stragglers='partial' or 'drop' with {name}"
            )
        if isinstance(s, DP_WRAPPERS):
            raise FederatedError(
                f"stragglers='stale' with {name}: late updates are weighted by staleness, so an on-time client's share "
                "of the mean passes the 1/n the noise is sized for; expected stragglers='partial' or 'drop' under DP"
            )


def check_proximal(strategy: Strategy, task) -> None:
    """Refuse a FedProx whose proximal step diverges at the task's learning rate (see module doc)."""
    lr = getattr(task, "lr", None)
    for s in strategy_levels(strategy):
        mu = vars(s).get("proximal_mu")
        if not isinstance(s, fl.FedProx) or not isinstance(mu, numbers.Real) or not isinstance(lr, numbers.Real):
            continue
        if lr * mu >= PROXIMAL_STEP_LIMIT:
            raise FederatedError(
                f"{type(s).__name__}: proximal_mu={mu} with the task's lr={lr}: lr * proximal_mu = {lr * mu:g} >= "
                f"{PROXIMAL_STEP_LIMIT:g} makes every local step overshoot the global model (local training "
                f"diverges); expected proximal_mu < {PROXIMAL_STEP_LIMIT:g} / lr = {PROXIMAL_STEP_LIMIT / lr:g}"
            )


def _sampled(strategy: Strategy, num_nodes: int) -> tuple[Strategy, int, str] | None:
    """The sampling strategy, how many nodes it samples each round and from what; None if it samples none."""
    sampler, nodes, why = _sampling_strategy(strategy, num_nodes)
    fraction, least = vars(sampler).get("fraction_train"), vars(sampler).get("min_train_nodes", 0)
    if not isinstance(fraction, numbers.Real) or not fraction > 0 or not isinstance(least, numbers.Integral):
        return None  # nothing sampled (or not a FedAvg-like sampler): nothing to compare against
    sampled = max(int(nodes * fraction), int(least))
    return sampler, sampled, f"fraction_train={fraction} of {why}, min_train_nodes={least}"


def check_robust(strategy: Strategy, num_nodes: int) -> None:
    """Refuse a Krum, MultiKrum or Bulyan that cannot have the replies its rule needs, and a FedTrimmedAvg that trims
    nothing (see module doc)."""
    for s in strategy_levels(strategy):
        if isinstance(s, fl.FedTrimmedAvg) and (found := _sampled(strategy, num_nodes)) is not None:
            _, sampled, how = found
            beta = vars(s).get("beta")
            if isinstance(beta, numbers.Real) and beta > 0 and int(beta * sampled) == 0:
                raise FederatedError(
                    f"FedTrimmedAvg: beta={beta} trims int(beta x {sampled}) = 0 replies from each end of the "
                    f"{sampled} nodes it samples each round ({how}): it would be the plain mean, which one Byzantine "
                    f"client moves as far as it likes; expected beta >= 1/{sampled} = {1 / sampled:.4g} (trim at "
                    "least one) or beta=0 (the plain mean, asked for)"
                )
        if not isinstance(s, (fl.MultiKrum, fl.Bulyan)) or (found := _sampled(strategy, num_nodes)) is None:
            continue
        _, sampled, how = found
        name, f = type(s).__name__, s.num_malicious_nodes
        need = 4 * f + 3 if isinstance(s, fl.Bulyan) else 2 * f + 3 if f > 0 else 1
        if sampled < need:
            most = (sampled - 3) // (4 if isinstance(s, fl.Bulyan) else 2)
            raise FederatedError(
                f"{name}: num_malicious_nodes={f}; expected at most {max(most, 0)} for the {sampled} nodes it samples "
                f"each round ({how}): {name} needs {'4f' if isinstance(s, fl.Bulyan) else '2f'} + 3 = {need} replies"
                + ("" if most >= 0 else "; sample more nodes")
            )
        keep = vars(s).get("num_nodes_to_select")
        if type(s) is fl.MultiKrum and isinstance(keep, numbers.Integral) and keep > sampled:
            raise FederatedError(
                f"{name}: num_nodes_to_select={keep}; expected at most the {sampled} nodes it samples each round "
                f"({how})"
            )


def robust_short(strategy: Strategy, num_replies: int) -> str:
    """Why a Byzantine-robust rule in ``strategy`` cannot keep its tolerance over ``num_replies`` replies ('' when
    it can): Krum and MultiKrum with f > 0 need 2f + 3 (with fewer, Flower scored each update by fewer neighbours
    than the rule assumes, and ran), FedTrimmedAvg must trim at least one reply from each end (int(beta x n) >= 1:
    with fewer replies it ran as the plain mean). The round start checks the sample; dropouts, faults and clients
    offline make rounds with fewer replies, which are skipped, the model kept, as Flower's own Bulyan skips."""
    for s in strategy_levels(strategy):
        name = type(s).__name__
        if isinstance(s, fl.MultiKrum) and (f := vars(s).get("num_malicious_nodes", 0)) > 0:
            if num_replies < 2 * f + 3:
                return (f"{name} needs 2f + 3 = {2 * f + 3} replies (num_malicious_nodes={f}) to tolerate f attackers, "
                        f"got {num_replies}; the global model is kept")  # fmt: skip
        if isinstance(s, fl.FedTrimmedAvg) and (beta := vars(s).get("beta", 0)) > 0 and int(beta * num_replies) == 0:
            return (f"FedTrimmedAvg with beta={beta} trims int(beta x {num_replies}) = 0 of {num_replies} replies (it "
                    "would be the plain mean); the global model is kept")  # fmt: skip
    return ""


def check_privacy(strategy: Strategy, num_nodes: int) -> None:
    """Refuse a Flower DP wrapper whose noise or clipping would not hold (see module doc)."""
    levels = strategy_levels(strategy)
    compressed = [i for i, s in enumerate(levels) if type(s).__name__ == "Compressed"]
    for i, s in enumerate(levels):
        if not isinstance(s, DP_WRAPPERS):
            continue
        name = type(s).__name__
        if compressed and isinstance(s, CLIENT_SIDE_DP):
            raise FederatedError(
                f"{name} with Compressed: client-side clipping bounds each round's update, but Compressed's error "
                "feedback sends what earlier rounds left out on top of it, past clipping_norm; expected "
                "Compressed(DifferentialPrivacyServerSideFixedClipping(...)) (the server clips the rebuilt models)"
            )
        weight_key = getattr(s.strategy, "weighted_by_key", None)  # the key Flower's accounted check reads
        if getattr(s, "accountant", None) is not None and weight_key not in (None, UNIT_WEIGHT):
            raise FederatedError(
                f"{name} with a privacy accountant: {type(s.strategy).__name__} weights the replies by "
                f"{weight_key!r}; expected weighted_by_key={UNIT_WEIGHT!r}, the equal weight tilestack's clients "
                "report (Flower's accounted aggregation stops the run at the first round whose weights differ)"
            )
        if getattr(s, "accountant", None) is None and weight_key not in (None, UNIT_WEIGHT):
            # no epsilon is claimed, so the run goes on; but the noise's std (noise_multiplier * clipping_norm /
            # num_sampled_clients) is sized for equal shares 1/n, and a client holding most examples weighs more
            warnings.warn(
                f"{name} over {type(s.strategy).__name__} weighted by weighted_by_key={weight_key!r}: the noise is "
                "sized for equal client shares (1 / num_sampled_clients), so a client with more examples than the "
                f"others is protected less than noise_multiplier says; expected weighted_by_key={UNIT_WEIGHT!r} for "
                "the stated guarantee",
                UserWarning,
                stacklevel=2,
            )
        for inner in levels[i + 1 :]:
            if not_a_mean := _not_a_mean(inner):
                raise FederatedError(
                    f"{name} over {type(inner).__name__}: the noise is sized for one client's share of a mean of "
                    f"clipped updates, but {type(inner).__name__} {not_a_mean}, so the privacy guarantee would not "
                    "hold; expected a strategy that averages the replies (FedAvg, FedProx, HeteroFL)"
                )
        if isinstance(s, CLIENT_SIDE_DP):
            for inner in levels[i + 1 :]:
                if unclipped := getattr(type(inner), "UNCLIPPED", ""):
                    raise FederatedError(
                        f"{name} over {type(inner).__name__}: the clients clip their model update, but "
                        f"{type(inner).__name__} also uploads its {unclipped}, so the privacy guarantee would not "
                        "hold; expected a strategy whose replies are the model alone"
                    )
        else:
            for inner in levels[i + 1 :]:
                if held := getattr(type(inner), "REPLIES_HOLD", ""):
                    unclipped = getattr(type(inner), "UNCLIPPED", "")
                    instead = (f"{name.replace('ServerSide', 'ClientSide')} (each client clips its own update)"
                               if not unclipped else "a strategy whose replies are the model alone (client-side "
                               f"clipping would leave its {unclipped} unprotected)")  # fmt: skip
                    raise FederatedError(
                        f"{name} over {type(inner).__name__}: server-side clipping takes each reply array by array "
                        f"against the global model's, and {type(inner).__name__}'s replies hold {held}; expected "
                        f"{instead}"
                    )
        if any(j > i for j in compressed):
            raise FederatedError(
                f"{name} wraps Compressed: it would clip the compressed arrays, which it cannot read; expected "
                f"Compressed({name}(...)), so that the server rebuilds the models before they are clipped"
            )
        if (found := _sampled(strategy, num_nodes)) is None:
            continue
        sampler, sampled, how = found
        if sampled == 0:  # Flower's wrappers refuse num_sampled_clients=0: no value would be right
            raise FederatedError(
                f"{name}: {type(sampler).__name__} samples no node each round ({how}); expected a fraction_train or "
                "min_train_nodes that samples at least one (the noise's std divides by num_sampled_clients)"
            )
        if s.num_sampled_clients != sampled:
            raise FederatedError(
                f"{name}: num_sampled_clients={s.num_sampled_clients!r}; expected {sampled}, the nodes "
                f"{type(sampler).__name__} samples each round ({how}): the noise's std is noise_multiplier * "
                "clipping_norm / num_sampled_clients"
            )
