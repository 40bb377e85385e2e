"""A federated run's state beyond the model: the strategy's state across runs of one strategy object (a new run
starts afresh, ``_start_afresh``; a rejected aggregate rolls back, ``_snapshot``), the clients' state across runs on one
grid (``_fresh_clients``), and the checkpoint a run is resumed from (``save_checkpoint`` / ``load_checkpoint``, what of
the strategy it keeps, ``_strategy_state`` / ``_restore_strategy``). ``driver.run_rounds`` calls each."""

from __future__ import annotations

import copy
import importlib
import io
import logging
import pickle
import types
import weakref
from pathlib import Path

from flwr.app import RecordDict
from flwr.serverapp.strategy import Strategy

from tilestack.errors import FederatedError
from tilestack.federated.checks import strategy_levels
from tilestack.federated.grid import ManagedGrid

log = logging.getLogger("tilestack.federated")


def _snapshot(strategy: Strategy) -> dict | None:
    """A copy of the strategy's state, to go back to when its aggregate is rejected (None if it cannot be copied)."""
    try:
        return copy.deepcopy(vars(strategy))
    except Exception:  # noqa: BLE001 - modules (Flower's accountant) do not deep-copy, but they pickle by name
        pass
    try:
        buf = io.BytesIO()
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(vars(strategy))
        return pickle.loads(buf.getvalue())
    except Exception:  # noqa: BLE001 - a strategy holding something neither copies nor pickles: no roll-back
        log.debug("the state of %s cannot be copied; it is not rolled back after a rejected aggregate", strategy)
        return None


class _Pickler(pickle.Pickler):
    """Pickles a module by its name (Flower's RDP accountant keeps the modules it computes with)."""

    def reducer_override(self, obj):
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        return NotImplemented


def _picklable(value) -> bool:
    try:
        _Pickler(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except Exception:  # noqa: BLE001 - pickle raises PicklingError, AttributeError or TypeError on local objects
        return False
    return True


# strategy object -> (its state before its first run, the state its last completed round left), each attribute of each
# level pickled: see _start_afresh
_RUN_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_bytes(strategy: Strategy) -> dict[tuple[int, str], bytes]:
    """Each attribute of each level of ``strategy`` (the wrapped strategies themselves apart), pickled; one that does
    not pickle (a lambda as HeteroFL's ``width_of``) is a setting of the caller's, left out."""
    out = {}
    for i, s in enumerate(strategy_levels(strategy)):
        for k, v in vars(s).items():
            if isinstance(v, Strategy):
                continue
            buf = io.BytesIO()
            try:
                _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(v)
            except Exception:  # noqa: BLE001 - pickle raises several kinds on local objects
                continue
            out[(i, k)] = buf.getvalue()
    return out


def _start_afresh(strategy: Strategy) -> None:
    """A strategy object that ran before starts a new run (not one resumed from a checkpoint) from the state it had
    before its first run: every attribute still as the last run left it and changed by that run goes back (FedAvgM's
    model and momentum, FedAdam's moments, SCAFFOLD's c, a selector's statistics), settings the caller changed since
    stay. Before, a notebook that ran ``simulate(s, ...)`` twice with one FedAvgM got a second model pulled towards
    the first run's last one (FedAvgM kept it as its current model), without a word."""
    runs = _RUN_STATES.get(strategy)
    if runs is None:
        _RUN_STATES[strategy] = (_state_bytes(strategy), None)
        return
    pristine, left = runs
    if left is None:
        return
    now, levels, reset = _state_bytes(strategy), strategy_levels(strategy), []
    for (i, k), value in left.items():
        if now.get((i, k)) != value or pristine.get((i, k)) == value or i >= len(levels):
            continue  # the caller's change since, or no state of the run's
        if (i, k) in pristine:
            levels[i].__dict__[k] = pickle.loads(pristine[(i, k)])
        else:
            levels[i].__dict__.pop(k, None)
        reset.append(f"{type(levels[i]).__name__}.{k}")
    if reset:
        log.info("run_rounds: the strategy ran before; a new run starts %s afresh", ", ".join(reset))


def _fresh_clients(grid: ManagedGrid, strategy: Strategy) -> None:
    """A run whose strategy object is not the one of the grid's last run starts its clients from empty
    ``Context.state``, as Flower gives each run its own node contexts. Before, a second experiment on one
    InProcessGrid (FedAvg, then SCAFFOLD; a new SCAFFOLD after another) inherited the first one's client control
    variates, error-feedback residuals and Ditto models while its strategy started from zero. The same strategy object
    run again (num_rounds=1 calls in a loop) continues its clients' state, as error feedback over chained calls
    needs. Grids whose client state lives elsewhere (a deployment's SuperNodes) keep it: only a grid with
    ``state_dict`` / ``load_state_dict`` is touched, and a resumed run then loads its checkpoint's."""
    last = grid.last_strategy() if grid.last_strategy is not None else None
    new_run = grid.last_strategy is not None and last is not strategy
    grid.last_strategy = weakref.ref(strategy)
    if new_run and hasattr(grid.inner, "state_dict") and hasattr(grid.inner, "load_state_dict"):
        cleared = {nid: RecordDict() for nid, state in grid.inner.state_dict().items() if len(state)}
        if cleared:
            grid.inner.load_state_dict(cleared)
            log.info("run_rounds: a new run on this grid; %d clients start from empty state", len(cleared))


def _ran_round(strategy: Strategy) -> None:
    """Record the state a completed round leaves (``_start_afresh``)."""
    pristine = _RUN_STATES[strategy][0] if strategy in _RUN_STATES else _state_bytes(strategy)
    _RUN_STATES[strategy] = (pristine, _state_bytes(strategy))


def _strategy_state(strategy: Strategy) -> Strategy:
    """What a checkpoint keeps of ``strategy`` when it does not pickle whole: a copy without the attributes that do
    not pickle (a lambda or local function given as a setting, HeteroFL's ``width_of``), at every level of wrapping.
    They are the caller's settings, which the resuming call passes again; the state (moments, control variates,
    clusters, selector statistics) is kept. Before, the run failed after its first round's work."""
    copy_ = object.__new__(type(strategy))
    for k, v in vars(strategy).items():
        if isinstance(v, Strategy):
            copy_.__dict__[k] = _strategy_state(v)
        elif _picklable(v):
            copy_.__dict__[k] = v
        else:
            log.info("checkpoint: %s.%s (%s) is not saved; a resumed run uses its own", type(strategy).__name__, k,
                     type(v).__name__)  # fmt: skip
    return copy_


def _restore_strategy(strategy: Strategy, saved: Strategy) -> None:
    """Put the checkpoint's state into ``strategy`` (wrapped strategies level by level), keeping what it lacks and the
    functions the caller passed (settings, not state: HeteroFL's ``width_of``, Flower's metric aggregations). A
    function the checkpoint held replaced the caller's where it pickled (``width_of=widths.__getitem__``), while a
    lambda, which does not pickle, was the caller's: a run resumed with other widths trained by the old ones or the
    new ones depending on how the function was written, without a word either way."""
    for k, v in vars(saved).items():
        mine = vars(strategy).get(k)
        if isinstance(v, Strategy) and type(mine) is type(v):
            _restore_strategy(mine, v)
        elif callable(v) and not isinstance(v, Strategy) and callable(mine):
            continue  # the caller's own function
        else:
            strategy.__dict__[k] = v


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` so that ``path`` always holds a complete checkpoint (temporary file, fsync, rename)."""
    from tilestack.files import write_atomic

    # pickled whole first: an unpicklable state fails before any file is touched; then a temporary of this
    # writer's own (with one shared "<name>.tmp", two processes saving one path truncated each other's mid-write)
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    """The state ``save_checkpoint`` wrote; a file that is not one (cut short, another format) is refused."""
    if Path(path).is_dir():   # (open() raised a bare IsADirectoryError; run_rounds checks, a direct caller did not)
        raise FederatedError(f"checkpoint={str(path)!r} is a folder; expected a checkpoint file written by run_rounds")
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as ex:
        raise FederatedError(
            f"checkpoint={str(path)!r} cannot be read ({type(ex).__name__}: {ex}); expected a checkpoint written "
            "by run_rounds (delete the file to start afresh)"
        ) from ex
    if not isinstance(state, dict) or not {"round", "arrays", "strategy", "history"} <= set(state):
        raise FederatedError(
            f"checkpoint={str(path)!r} holds a {type(state).__name__}; expected a run_rounds checkpoint"
        )
    return state
