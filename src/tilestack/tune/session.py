"""Tune a list of problems within a time budget, writing each winner as soon as it is known.

    session = Session(device_key(0), budget_s=300, ship_dir=Path("out/tables"))
    outcomes = session.run(library_problems())        # most valuable first

Each problem in its turn gets a share of what is left of the budget, in proportion to its weight halved per
priority level (time a problem leaves unused passes to the next ones; once the budget is spent the rest are
skipped, keeping what the tables gave them). Its search is local: first the config
the launch path uses now (the shipped table's, else the default) and the kernel's default, then the winners of
the same kernel at nearby sizes and in the other dtype, then the configs nearest the best so far, each checked
against the reference before it is timed. The few best are timed again, longer, and the fastest is written at
once to the user's table (atomically: an interrupted run keeps every winner already written) and, with
``ship_dir``, to a table of the same format for ``src/tilestack/tune/tables/``.

The backend is searched too: each of ``backends`` (default, on a GPU: every one that can launch there,
``tune.lookup.gpu_backends``; on a CPU: Triton's interpreter alone) gets an equal part of the problem's time and
a search of its own options, unless it cannot launch on the device, the problem's workload cannot run on it, or
it cannot lower the kernel (judged from a few configs first). The fastest is written with ``"backend"`` and each
other backend's best under ``"others"``, which ``tune.lookup`` reads.

A problem's variants (``Problem.variants``: another kernel the launch path can run for the same entry, as the
ping-pong attention forward) are searched beside it on their backends, each with its share of the time; a
backend's best is its fastest kernel, written with the variant's ``"schedule"`` in its config.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tilestack.tune import lookup
from tilestack.tune.cache import TABLES, ConfigCache, Table, file_name, key, upgrade_entry
from tilestack.tune.devices import DeviceKey
from tilestack.tune.library import BACKEND_CHOICE, Problem
from tilestack.tune.search import tune
from tilestack.tune.space import SearchSpace

SEARCH_REP_MS = 20         # timing of each candidate: short (the search's ranking)
CONFIRM_REP_MS = 60        # the finalists and the config in use, timed again
FINALISTS = 2
LOWERING_SAMPLES = 6       # configs tried per backend before it is judged unable to lower a problem's kernel
PRIORITY_DECAY = 0.5       # a problem's share of the budget halves with each priority level
TOL = 2e-2                 # relative error against the reference (bf16 outputs: ~4e-3)
# errors after which the CUDA context is unusable: every later launch would fail too
FATAL = re.compile(r"illegal memory access|unspecified launch failure|illegal instruction|misaligned address",
                   re.IGNORECASE)


def share_weight(p: Problem) -> float:
    """A problem's claim on the budget: its weight, halved per priority level below the first, so that a short
    budget goes mostly to the most valuable problems (the rest keep what the tables gave them)."""
    return p.weight * PRIORITY_DECAY ** p.priority


def plan(problems: list[Problem], budget_s: float) -> list[float]:
    """Each problem's share of the budget in seconds, if every earlier one used all of its own."""
    total = sum(map(share_weight, problems)) or 1.0
    return [budget_s * share_weight(p) / total for p in problems]


@dataclasses.dataclass
class Outcome:
    problem: Problem
    config: dict | None = None           # the winner (None: nothing written)
    seconds: float | None = None
    before: dict | None = None           # the config the launch path used before this run
    before_seconds: float | None = None
    tried: int = 0
    failed: int = 0
    complete: bool = False               # the whole space was searched
    note: str = ""                       # why nothing was written, or what to know
    backend: str | None = None           # the winner's backend
    seconds_by_backend: dict = dataclasses.field(default_factory=dict)   # each searched backend's best

    @property
    def speedup(self) -> float | None:
        """Time before / time after (both timed in this run)."""
        if self.seconds and self.before_seconds:
            return self.before_seconds / self.seconds
        return None


class _Refused(Exception):
    """A backend cannot run this problem (the device, the install, a kernel it cannot lower): why."""


@dataclasses.dataclass
class _Found:
    """The best of one backend's search."""
    config: dict
    seconds: float
    space: SearchSpace
    before: dict                 # the config the launch path used before, in full
    before_seconds: float | None  # ... timed in this run (None: not on this backend, or it failed)
    tried: int
    failed: int
    complete: bool


def restrict_for(backend: str, kernel, restrict: dict) -> dict:
    """``restrict`` (a problem's domains, written with the Triton backend's launch options) for ``backend``: the
    kernel's tunables as they are, the launch options this backend has narrowed to the values it accepts (none
    left: its own domain), the options it lacks dropped."""
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError

    be = get_backend(backend)
    names = set(be.search_domains()) | set(be.option_defaults())
    out = {}
    for name, dom in restrict.items():
        if name in kernel.tunables:
            out[name] = dom
        elif name in names:
            ok = []
            for v in dom:
                try:
                    be.check_options({name: v})
                    ok.append(v)
                except BackendError:
                    pass
            if ok:
                out[name] = tuple(ok)
    return out


def _lowering_refusal(space: SearchSpace, p: Problem, args, configs: list[dict]) -> str | None:
    """Why ``space``'s backend cannot generate ``p``'s kernel at any of ``configs`` (None: it can at one): the
    backend's BackendError, as it reports an op, dtype or tile shape it cannot lower. Checked before a search,
    so that a backend that lowers none of a problem's configs does not try each of them in turn."""
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError

    be = get_backend(space.backend)
    first = None
    for cfg in configs:
        constants, options = space.split(cfg)
        try:
            traced = p.tile.trace(*args, **p.fixed, **constants)
            try:
                be.source(traced, be.options(traced.constants, options))   # the gluon backend: per options
            except TypeError:
                be.source(traced)
            return None
        except BackendError as e:
            first = first or f"cannot lower {p.tile.name}: {str(e)[:200]}"
    return first


def cuda_timer(fn: Callable[[], object], rep_ms: float) -> float:
    """Median seconds per call on the GPU (Triton's do_bench: L2 flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=min(5, rep_ms), rep=rep_ms, return_mode="median") / 1e3


def wall_timer(fn: Callable[[], object], rep_ms: float) -> float:
    """Median wall seconds of three calls, after one (for Triton's interpreter on a CPU)."""
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class ShipWriter:
    """Tables for ``src/tilestack/tune/tables/``: one file per kernel for this device, holding what the packaged
    file of that name holds plus this run's winners, rewritten atomically after each."""

    def __init__(self, out_dir: Path, device: DeviceKey, tables_dir: Path = TABLES):
        self.out_dir, self.device, self.tables_dir = Path(out_dir), device, tables_dir
        self.tables: dict[str, Table] = {}

    def put(self, kernel: str, signature: str, bucket: int, entry: dict) -> Path:
        name = file_name(kernel, self.device)
        if kernel not in self.tables:
            old = Table.read(self.out_dir / name) or Table.read(self.tables_dir / name)
            self.tables[kernel] = Table(self.device, old.entries if old else {})
        table = self.tables[kernel]
        table.entries[key(kernel, signature, bucket)] = upgrade_entry(entry)
        table.write(self.out_dir / name)
        return self.out_dir / name


class Session:
    """See the module docstring. ``device_str`` is where inputs live ("cuda"; "cpu" runs Triton's interpreter)."""

    def __init__(self, device: DeviceKey, *, budget_s: float, device_str: str = "cuda",
                 cache: ConfigCache | None = None, ship_dir: Path | None = None, timer=None,
                 search_rep_ms: float = SEARCH_REP_MS, confirm_rep_ms: float = CONFIRM_REP_MS,
                 clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = lambda s: None,
                 register_limit: int | None = None, backends: tuple[str, ...] | None = None,
                 seeds: dict[tuple[str, str], list[dict]] | None = None):
        _check_session_args(device, budget_s, device_str, backends)
        self.device, self.device_str, self.budget_s = device, device_str, float(budget_s)
        self.cache = cache or ConfigCache()
        self.before = copy.deepcopy(self.cache)     # the tables as they were: what the launch path used
        self.ship = ShipWriter(ship_dir, device) if ship_dir is not None else None
        self.timer = timer or (cuda_timer if device_str == "cuda" else wall_timer)
        self.search_rep_ms, self.confirm_rep_ms = search_rep_ms, confirm_rep_ms
        self.clock, self.log = clock, log
        self.register_limit = device.register_tile_bytes if register_limit is None else register_limit
        # (kernel or kernel:schedule, signature, backend) -> bucket -> the best configs
        self.winners: dict[tuple[str, str, str], dict[int, list[dict]]] = {}
        self._spaces: dict[tuple, list[dict]] = {}
        # the backends searched per problem: on a GPU every one that can launch there, on a CPU (Triton's
        # interpreter) the default alone
        if backends is None:
            backends = lookup.gpu_backends(device) if device_str == "cuda" else (lookup.DEFAULT_BACKEND,)
        self.backends = tuple(backends)
        # (kernel, or kernel:schedule for a variant, backend) -> configs to try early (measured good elsewhere)
        self.seeds = dict(seeds or {})

    def run(self, problems: list[Problem], on_start: Callable[[int, Problem], None] = lambda i, p: None,
            on_done: Callable[[Outcome], None] = lambda o: None) -> list[Outcome]:
        end = self.clock() + self.budget_s
        left = sum(map(share_weight, problems))
        outcomes = []
        try:
            for i, p in enumerate(problems):
                on_start(i, p)
                now = self.clock()
                if now >= end:
                    out = Outcome(p, note="skipped: the time budget is spent")
                else:   # this problem's share of what is left (what earlier ones left unused passes on)
                    out = self.tune_one(p, now + (end - now) * share_weight(p) / max(left, 1e-9))
                left -= share_weight(p)
                outcomes.append(out)
                on_done(out)
        finally:
            lookup.reload()       # this process launches with what was just written
        return outcomes

    def tune_one(self, p: Problem, deadline: float) -> Outcome:
        out = Outcome(p)
        try:
            work = p.make(self.device_str)
        except Exception as e:  # noqa: BLE001 - a problem that cannot be set up (out of memory) is skipped
            out.note = f"skipped: its inputs failed: {type(e).__name__}: {str(e)[:160]}"
            return out
        current = dict(lookup.resolve(p.kernel, p.signature, self.device, p.n, cache=self.before) or {})
        current_backend = current.pop("backend", lookup.DEFAULT_BACKEND)
        current_schedule = current.pop("schedule", None)     # a variant's config (Problem.variants)
        notes = []
        searches = []       # (backend, the problem or a variant of it, its workload on that backend)
        for backend in self.backends:         # those that cannot launch here, or not this workload: named, skipped
            why = None if backend == lookup.DEFAULT_BACKEND else lookup.backend_refusal(backend, self.device)
            if why is None and backend != lookup.DEFAULT_BACKEND and work.on is None:
                why = "this problem's workload launches only on the Triton backend"
            if why is None and backend != lookup.DEFAULT_BACKEND and p.kernel not in BACKEND_CHOICE:
                why = f"{p.kernel}'s launch path uses the default backend"
            if why is not None:
                notes.append(f"{backend}: {why}")
                continue
            searches.append((backend, p, work if backend == lookup.DEFAULT_BACKEND else work.on(backend)))
            for v in p.variants:
                if v.backends is not None and backend not in v.backends:
                    continue
                try:
                    w = v.make(self.device_str)
                    searches.append((backend, v, w if backend == lookup.DEFAULT_BACKEND else w.on(backend)))
                except Exception as e:  # noqa: BLE001 - as the problem's own inputs above
                    notes.append(f"{backend} ({v.schedule}): skipped: its inputs failed: {type(e).__name__}")
        found: dict[tuple[str, str | None], _Found] = {}      # (backend, schedule) -> its best
        for i, (backend, q, w) in enumerate(searches):   # each its share of what is left of the problem's time
            label = backend + (f" ({q.schedule})" if q.schedule else "")
            now = self.clock()
            if i and now >= deadline:
                notes.append(f"{label}: skipped, no time left")
                continue
            in_use = (backend, q.schedule) == (current_backend, current_schedule)
            try:
                found[(backend, q.schedule)] = self._search(q, w, backend, now + (deadline - now) / (len(searches) - i),
                                                            current if in_use else None)
            except _Refused as e:
                notes.append(f"{label}: {e}")
        out.note = "; ".join(notes)
        if not found:
            return out
        by_backend: dict[str, tuple[str | None, _Found]] = {}     # each backend's fastest schedule
        for (backend, schedule), f in found.items():
            if backend not in by_backend or f.seconds < by_backend[backend][1].seconds:
                by_backend[backend] = (schedule, f)
        won = min(by_backend, key=lambda b: by_backend[b][1].seconds)
        schedule, best = by_backend[won]
        out.config, out.seconds, out.backend = _scheduled(best.config, schedule), best.seconds, won
        out.seconds_by_backend = {b: f.seconds for b, (_, f) in by_backend.items()}
        out.tried, out.failed = sum(f.tried for f in found.values()), sum(f.failed for f in found.values())
        out.complete = all(f.complete for f in found.values()) and len(by_backend) == len(self.backends)
        before = found.get((current_backend, current_schedule))
        out.before = _scheduled(before.before, current_schedule) if before and before.before else None
        out.before_seconds = before.before_seconds if before else None
        config, options = best.space.split(best.config)   # stored apart: the kernel's tunables, backend's options
        entry = {"config": _scheduled(config, schedule), "options": options, "backend": won, "seconds": out.seconds,
                 "shared_bytes": best.space.footprint(work.args, best.config)[0], "tried": out.tried}
        others = {b: {"config": _scheduled(f.space.split(f.config)[0], s), "options": f.space.split(f.config)[1],
                      "seconds": f.seconds}
                  for b, (s, f) in by_backend.items() if b != won}
        if others:      # each other backend's best: an explicit backend= launches with its own
            entry["others"] = others
        if out.speedup:
            entry["speedup"] = round(out.speedup, 4)
        self.cache.put(p.kernel, p.signature, self.device, p.bucket, entry["config"], options=options,
                       **{k: v for k, v in entry.items() if k not in ("config", "options")})
        if self.ship is not None:
            self.ship.put(p.kernel, p.signature, p.bucket, entry)
        return out

    def _search(self, p: Problem, work, backend: str, deadline: float, current: dict | None) -> _Found:
        """The best config of ``p`` on ``backend`` (``work`` launches there) by ``deadline``; ``current``: the
        config the launch path uses now, if it uses this backend (timed again beside the finalists). Raises
        _Refused where the backend cannot lower the kernel or no config of it ran."""
        space = SearchSpace(p.tile, fixed=p.fixed, restrict=restrict_for(backend, p.tile, p.restrict),
                            device=self.device, backend=backend)
        declared = space.defaults()     # the kernel's tunables and the backend's options, as a launch defaults them

        def full(cfg: dict) -> dict:
            return {k: cfg.get(k, v) for k, v in declared.items()}

        candidates = self._candidates(space, work.args)
        if backend != lookup.DEFAULT_BACKEND:   # the default, then a few configs spread over the space
            step = max(1, len(candidates) // LOWERING_SAMPLES)
            refusal = _lowering_refusal(space, p, work.args, [full(p.default), *candidates[::step]])
            if refusal:
                raise _Refused(refusal)
        before = full({**p.default, **(current or {})})
        must = _unique([before, full(p.default)] if current is not None else [full(p.default)])
        given = [full({**p.default, **c}) for c in self.seeds.get((p.search_name, backend), ())
                 if c.keys() <= declared.keys()]
        # seeds given for this backend first (measured good elsewhere), then the launch path's configs; the winners
        # of other sizes are priors to a strategy that can weigh them (the model-guided one), seeds to the others
        related = [c for c in _unique(full(c) for c in self._related(p, backend)) if c not in given and c not in must]
        seeds = _unique([*given, *must, *related])
        candidates = _unique([*must, *candidates])
        untuned = None if current else full(p.default)     # the config in use, where no table gave one
        timed = {}

        def time_cfg(cfg):
            timed[_frozen(cfg)] = self.timer(lambda: work.run(cfg), self.search_rep_ms)
            return timed[_frozen(cfg)]

        try:
            result = tune(f"{p.name} [{backend}]", candidates, time=time_cfg, check=work.check, tol=TOL,
                          strategy=self._strategy(space, work.args, untuned, related), seeds=seeds, deadline=deadline,
                          min_trials=len(must), clock=self.clock,
                          log=self.log)
        except RuntimeError as e:
            _raise_if_fatal(p, [str(e)])
            raise _Refused(f"not tuned: {e}") from e
        _raise_if_fatal(p, [t.error for t in result.trials if t.error])
        ranked = sorted((t for t in result.trials if t.seconds is not None), key=lambda t: t.seconds)
        # the finalists and the config in use (if it ran correctly), timed again, longer, one after the other
        in_use = current is not None and _frozen(before) in timed
        finalists = _unique([t.config for t in ranked[:FINALISTS]] + [before] * in_use)
        confirm = {_frozen(c): self.timer(lambda c=c: work.run(c), self.confirm_rep_ms) for c in finalists}
        best = min(finalists, key=lambda c: confirm[_frozen(c)])
        self.winners.setdefault((p.search_name, p.signature, backend), {})[p.bucket] = \
            [t.config for t in ranked[:FINALISTS]]
        return _Found(best, confirm[_frozen(best)], space, before, confirm.get(_frozen(before)) if in_use else None,
                      len(result.trials), sum(t.seconds is None for t in result.trials), result.complete)

    def _strategy(self, space: SearchSpace, args, untuned: dict | None = None, priors: list[dict] = ()):
        """How the search orders the candidates (``tune.search.tune``'s strategy): seeds, then nearest the best.
        ``untuned``: the kernel's default where no table gave a config (None: the config in use is tuned);
        ``priors``: the seeds that are winners of other sizes. The local search measures every seed first."""
        return "local"

    def _candidates(self, space: SearchSpace, args) -> list[dict]:
        """The space's configs that fit this device, worked out once per kernel, constants and argument types."""
        kinds = tuple((str(a.dtype), a.dim()) if hasattr(a, "dtype") else type(a).__name__ for a in args)
        k = (space.kernel.name, space.backend, _frozen(space.fixed), _frozen(space.restrict), kinds)
        if k not in self._spaces:
            self._spaces[k] = space.configs(args, shared_limit=self.device.shared_bytes,
                                            register_limit=self.register_limit)   # the device's limits
        return self._spaces[k]

    def _related(self, p: Problem, backend: str = lookup.DEFAULT_BACKEND) -> list[dict]:
        """Winners of this kernel and signature on ``backend`` at other sizes (nearest first), then of the other
        dtype."""
        from tilestack.tune.lookup import SAME_SHAPE

        mine = self.winners.get((p.search_name, p.signature, backend), {})
        near = sorted(mine, key=lambda b: (abs(b.bit_length() - p.bucket.bit_length()), b))
        dtype, _, rest = p.signature.partition("-")
        twin = "-".join(filter(None, (SAME_SHAPE.get(dtype, dtype), rest)))
        other = self.winners.get((p.search_name, twin, backend), {})
        twin_near = sorted(other, key=lambda b: (abs(b.bit_length() - p.bucket.bit_length()), b))
        return [c for b in twin_near[:1] for c in other[b]] + [c for b in near for c in mine[b][:2]]


def _check_session_args(device, budget_s, device_str, backends) -> None:
    """Session's arguments, refused by name before any work: a budget of NaN passed every deadline check (each
    compares False) and one <= 0 or infinite planned nothing or forever; a device key given as its text had no
    register_tile_bytes (an AttributeError); device_str 'cuda:0' timed with the wall clock (only 'cuda' picks CUDA
    events) and 'tpu' skipped every problem; backends='triton' searched the letters 't', 'r', ... (a name no
    backend has is noted per problem: "not available in this install")."""
    import math
    import numbers

    from tilestack.backends import NAMES
    from tilestack.errors import TunableError

    if not isinstance(device, DeviceKey):
        raise TunableError(f"Session: device must be a DeviceKey (tune.device_key(0), or DeviceKey.parse(text)), got "
                           f"{type(device).__name__} {device!r}")
    if isinstance(budget_s, bool) or not isinstance(budget_s, numbers.Real) or not 0 < budget_s < math.inf:
        raise TunableError(f"Session: budget_s must be a finite number of seconds > 0, got {budget_s!r}")
    if device_str not in ("cuda", "cpu"):
        raise TunableError(f"Session: device_str={device_str!r}; expected 'cuda' (the current GPU: torch.cuda."
                           "set_device picks it) or 'cpu' (Triton's interpreter)")
    if backends is not None and (isinstance(backends, str) or not isinstance(backends, tuple | list) or
                                 not backends or not all(isinstance(b, str) for b in backends)):
        raise TunableError(f"Session: backends={backends!r}; expected None or a non-empty tuple of backend names "
                           f"(of {NAMES})")


def _scheduled(cfg: dict, schedule: str | None) -> dict:
    """A variant's config as the launch path reads it: with its ``schedule`` (the plain kernel's: as it is)."""
    return cfg if schedule is None else {**cfg, "schedule": schedule}


def _frozen(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def _unique(cfgs) -> list[dict]:
    seen, out = set(), []
    for c in cfgs:
        if _frozen(c) not in seen:
            seen.add(_frozen(c))
            out.append(c)
    return out


def _raise_if_fatal(p: Problem, errors: list[str]) -> None:
    fatal = next((e for e in errors if FATAL.search(e)), None)
    if fatal:
        raise RuntimeError(f"tune: {p.name}: a config broke the CUDA context ({fatal}); the winners so far are "
                           "written. Run again without that kernel (-k) to tune the rest.")
