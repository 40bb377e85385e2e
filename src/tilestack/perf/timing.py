"""Time a callable the way kernels are timed: warm up, repeat many times, take the median.

    from tilestack.perf import timing
    sets = timing.rotating_sets(lambda: (torch.randn(n, device="cuda"),), bytes_per_set=4 * n, device=dev)
    t = timing.time_fn(lambda x: x * 2, args_sets=sets)          # CUDA events on a GPU, perf_counter on a CPU
    t.median_s, t.p10_s, t.p90_s, t.repeats, t.method
    t.rel_ci, t.converged                                        # how well the median is known
    timing.time_fn(fn, args_sets=sets, graph=True)               # CUDA-graph replay: no launch overhead
    timing.time_fn(fn, args_sets=sets, budget_s=3.0)             # a slow fn: stop after 3 s, spread reported

Repeat ``i`` calls ``fn(*args_sets[i % len(args_sets)])``: with enough sets that together they exceed the L2
cache, no repeat finds its inputs still cached from the one before (``rotating_sets`` makes enough).
On a GPU each repeat is bracketed by two CUDA events and the host synchronises once at the end, so the host's
launch loop runs ahead and what is measured is the GPU's time. With ``graph=True`` the calls are captured into
one CUDA graph of ``GRAPH_CALLS`` launches and each replay is divided by that count, which removes launch
overhead from kernels of a few microseconds. On a CPU the same interface times each call with
``time.perf_counter`` (torch CPU ops are synchronous).

Repeat until the spread is known: with ``repeats`` None, the calls run for ``window_s`` (at least
``MIN_REPEATS``), then in ever larger rounds until the 95% confidence interval of the median is within
``target_rel_ci`` of it, or ``budget_s`` seconds of timed calls have passed (at least ``MIN_BUDGET_REPEATS``
even then). The interval comes from order statistics, so it needs no assumption about the distribution of
the times (a CPU's are far from normal: a descheduled call takes 1000x longer). ``t.rel_ci`` is its half-width
over the median, ``t.converged`` says whether it met the target; both go into every Measurement and report.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tilestack.errors import TilestackError

DEFAULT_WARMUP_S = 0.025  # as triton.testing.do_bench: long enough for clocks and caches to settle
DEFAULT_WINDOW_S = 0.1  # total time spent in timed repeats, when the caller does not fix ``repeats``
MIN_REPEATS = 10  # a median of fewer is noise
MAX_REPEATS = 100_000  # fast calls stop at the confidence target or the budget long before this
DEFAULT_TARGET_REL_CI = 0.02  # the median known to +-2% (95% confidence)
DEFAULT_BUDGET_S = 2.0  # timed seconds after which repeating stops, known or not
MIN_BUDGET_REPEATS = 3  # a call slower than the budget still runs this many times
CI_Z = 1.96  # two-sided 95% normal quantile, for the order-statistic ranks of the median's interval
MIN_CI_SAMPLES = 6  # (min, max) of 6 samples covers the median with 97% confidence; of 5, only 94%
LOOSE_REL_CI = 0.1  # a median known worse than +-10% is not known (fixed-repeat timings, cached ceilings)
MAX_WARMUP_CALLS = 100
MIN_WARMUP_CALLS = 5
GRAPH_CALLS = 20  # launches captured in one CUDA graph; a replay's time is divided by this
L2_ROTATION_FACTOR = 2  # rotate through at least twice the L2's worth of inputs
MAX_ROTATING_SETS = 64
DEFAULT_L2_BYTES = 64 << 20  # used where the device table does not know the L2 size
PERCENTILE_LOW, PERCENTILE_HIGH = 10, 90


class TimingError(TilestackError, ValueError):
    """A timing that cannot be taken or makes no sense (no repeats, a zero-length window, no inputs)."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call seconds of every timed repeat, and the statistics read off them."""

    times_s: tuple[float, ...]
    method: str  # "cuda-events" | "cuda-graph" | "cpu-perf-counter" | "torch-profiler"
    warmup_calls: int
    n_sets: int
    target_rel_ci: float | None = None  # what the repeats aimed for; None: a fixed number of repeats

    def __post_init__(self) -> None:
        # checked when made (profiler round 24): a Timing of negative, NaN or infinite times was taken, and
        # compute_metrics(timing=...) stored a negative p10, NaN percentiles or an infinite spread in the row; one of
        # no times failed there with a bare IndexError
        _check_times(self.times_s, "Timing: times_s")
        for arg, value, least in (("warmup_calls", self.warmup_calls, 0), ("n_sets", self.n_sets, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise TimingError(f"Timing: {arg}={value!r:.60} ({type(value).__name__}); expected an int >= {least}")
        if self.target_rel_ci is not None and not (_is_real(self.target_rel_ci) and self.target_rel_ci > 0):
            raise TimingError(f"Timing: target_rel_ci={self.target_rel_ci!r:.60}; expected a positive relative "
                              "half-width, or None")

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def p10_s(self) -> float:
        return _percentile(self.times_s, PERCENTILE_LOW)

    @property
    def p90_s(self) -> float:
        return _percentile(self.times_s, PERCENTILE_HIGH)

    @property
    def total_s(self) -> float:
        """Sum of the timed calls: the length of the timing window."""
        return math.fsum(self.times_s)

    @property
    def ci_s(self) -> tuple[float, float]:
        """The 95% confidence interval of the median (:func:`median_ci`)."""
        return median_ci(self.times_s)

    @property
    def rel_ci(self) -> float:
        """Half-width of the median's 95% confidence interval over the median: 0.02 means +-2%."""
        return rel_ci(self.times_s)

    @property
    def rel_spread(self) -> float:
        """(p90 - p10) / median: how much single calls vary (not how well the median is known)."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else math.inf

    @property
    def converged(self) -> bool:
        """Whether the median is known to ``target_rel_ci`` (with a fixed ``repeats``: to within +-10%), from
        at least ``MIN_CI_SAMPLES`` calls: fewer give no 95% interval at all."""
        target = self.target_rel_ci if self.target_rel_ci is not None else LOOSE_REL_CI
        return self.repeats >= MIN_CI_SAMPLES and self.rel_ci <= target


def median_ci(xs: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median of ``xs``, from order statistics.

    The interval runs between the sorted samples of ranks n/2 -+ z*sqrt(n)/2 (the normal approximation to the
    binomial count of samples below the median); with too few samples for that, it is (min, max), which below
    ``MIN_CI_SAMPLES`` samples is narrower than a 95% interval (:attr:`Timing.converged` is then False).
    """
    _check_times(xs, "median_ci")
    s = sorted(xs)
    n = len(s)
    half = CI_Z * math.sqrt(n) / 2
    lo = math.floor(n / 2 - half)  # 1-based ranks; below 1 or above n means the sample cannot bound it
    hi = math.ceil(n / 2 + half) + 1
    return s[max(lo, 1) - 1], s[min(hi, n) - 1]


def rel_ci(xs: Sequence[float]) -> float:
    """Half-width of :func:`median_ci` over the median (inf for a zero median)."""
    lo, hi = median_ci(xs)
    med = statistics.median(xs)
    return (hi - lo) / (2 * med) if med > 0 else math.inf


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_times(xs: Any, where: str) -> None:
    """``xs`` holds at least one time, each a finite number of seconds >= 0 (a NaN sorted anywhere and moved the
    median's interval: median_ci([1, nan, 2]) gave (1, 2))."""
    if isinstance(xs, str | bytes) or not isinstance(xs, Sequence):
        raise TimingError(f"{where}={xs!r:.60} ({type(xs).__name__}); expected a sequence of times in seconds")
    if not xs:
        raise TimingError(f"{where} of no samples; expected at least one time")
    for i, x in enumerate(xs):
        if not (_is_real(x) and 0 <= x < math.inf):
            raise TimingError(f"{where}[{i}]={x!r:.60} ({type(x).__name__}); expected a finite time in seconds >= 0")


def _check_device(device: Any) -> None:
    """None, a perf Device (anything with a ``kind``), or "cpu" / "cuda" / "cuda:N" (a str or torch.device):
    any other name would be timed on the CPU's clock without a word."""
    if device is None or getattr(device, "kind", None) in ("cuda", "cpu"):
        return
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", str(device)):  # torch.device("cpu", 0) reads "cpu:0", as detect takes it
        raise TimingError(f"device={device!r}; expected None, a perf.Device, 'cpu', 'cuda' or 'cuda:N'")


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    kind = getattr(device, "kind", None)
    return (kind or str(device)).startswith("cuda")


def _infer_cuda(args_sets: Sequence[tuple]) -> bool:
    for args in args_sets[:1]:
        for a in args:
            if getattr(getattr(a, "device", None), "type", None) == "cuda":
                return True
    return False


def rotating_sets(
    make_args: Callable[[], tuple],
    *,
    bytes_per_set: float,
    l2_bytes: int | None = None,
    device: Any = None,
    max_sets: int = MAX_ROTATING_SETS,
) -> list[tuple]:
    """Enough fresh input sets (each from ``make_args()``) that together they exceed twice the L2.

    On a CPU one set is returned: its caches are not flushed this way, and CPU timings want warm inputs.
    """
    # (make_args=3 failed "'int' object is not callable" where it was called, l2_bytes='x' in a bare division,
    # max_sets=np.int64(3) was refused as no int)
    if not callable(make_args):
        raise TimingError(f"make_args={make_args!r:.60} ({type(make_args).__name__}); expected a function making "
                          "one fresh input set (a tuple of arguments)")
    if not _is_real(bytes_per_set) or not 0 < bytes_per_set < math.inf:     # NaN too
        raise TimingError(f"bytes_per_set={bytes_per_set!r}; expected the positive size of one input set")
    if isinstance(max_sets, bool) or not isinstance(max_sets, numbers.Integral) or max_sets < 1:
        raise TimingError(f"max_sets={max_sets!r}; expected an int >= 1")
    if l2_bytes is not None and (not _is_real(l2_bytes) or not 0 <= l2_bytes < math.inf):
        raise TimingError(f"l2_bytes={l2_bytes!r:.60} ({type(l2_bytes).__name__}); expected None (the device's) or "
                          "the L2 cache's size in bytes, a finite number >= 0")
    _check_device(device)
    if device is not None and not _is_cuda(device):
        return [make_args()]
    l2 = l2_bytes or getattr(device, "l2_bytes", None) or DEFAULT_L2_BYTES
    n = min(int(max_sets), max(1, math.ceil(L2_ROTATION_FACTOR * l2 / bytes_per_set)))
    return [make_args() for _ in range(n)]


def _check(
    fn: Callable,
    args_sets: Sequence[tuple] | None,
    repeats: int | None,
    window_s: float,
    budget_s: float,
    target_rel_ci: float | None,
) -> list[tuple]:
    if not callable(fn):
        raise TimingError(f"fn={fn!r}; expected a callable")
    if isinstance(args_sets, str | bytes) or not (args_sets is None or isinstance(args_sets, Iterable)):
        raise TimingError(f"args_sets={args_sets!r:.80}; expected a list of tuples of arguments, or None")
    sets = [()] if args_sets is None else list(args_sets)
    for i, a in enumerate(sets):
        # fn(*a) of a tensor would call fn with its rows: another call than meant, timed without a word
        if not isinstance(a, tuple | list):
            raise TimingError(f"args_sets[{i}] is a {type(a).__name__}; expected a tuple of fn's arguments "
                              "(one argument x: (x,))")
    sets = [tuple(a) for a in sets]
    if not sets:
        raise TimingError("args_sets=[]; expected at least one tuple of arguments (or None for no arguments)")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        raise TimingError(f"repeats={repeats!r}; expected at least 1 timed repeat (an int)")
    # A str or list failed in the comparison (inside measure: reported as fn's own error), an infinite budget in
    # int() once a noisy fn had not converged after the first round (OverflowError), an infinite window likewise.
    for arg, value, what in (("window_s", window_s, "timing window"), ("budget_s", budget_s, "time budget")):
        if not _is_real(value) or not 0 < value < math.inf:
            raise TimingError(f"{arg}={value!r:.60} ({type(value).__name__}); expected a positive, finite {what} "
                              "in seconds")
    if target_rel_ci is not None and not (_is_real(target_rel_ci) and target_rel_ci > 0):
        raise TimingError(f"target_rel_ci={target_rel_ci!r}; expected a positive relative half-width, or None")
    return sets


def _plan(per_call_s: float, repeats: int | None, window_s: float, budget_s: float) -> int:
    """The first round: ``repeats``, else the window's worth (at least MIN_REPEATS) within the budget."""
    if repeats is not None:
        return repeats
    per_call_s = max(per_call_s, 1e-9)
    n = min(MAX_REPEATS, max(MIN_REPEATS, window_s / per_call_s), budget_s / per_call_s)
    return int(max(MIN_BUDGET_REPEATS, n))


def _repeat(
    chunk: Callable[[int, int, float], list[float]],
    per_call_s: float,
    repeats: int | None,
    window_s: float,
    budget_s: float,
    target_rel_ci: float | None,
) -> list[float]:
    """Times of the planned round, then of rounds as long as all before, until the median's interval is within
    ``target_rel_ci`` or the budget is spent. ``chunk(start, n, deadline)`` times calls ``start .. start + n - 1``,
    stopping early (after one call at least) where it can see the clock pass ``deadline``: the warm-up's
    estimate of a call can be far off on a busy machine."""
    t0 = time.perf_counter()
    if repeats is not None:
        return chunk(0, repeats, math.inf)
    deadline = t0 + budget_s
    times = chunk(0, _plan(per_call_s, repeats, window_s, budget_s), deadline)
    if target_rel_ci is None:
        return times
    while len(times) < MIN_CI_SAMPLES or rel_ci(times) > target_rel_ci:
        spent = time.perf_counter() - t0
        per_entry = spent / len(times)  # wall time, host overhead and graph replays included
        n = min(len(times), MAX_REPEATS - len(times), int((budget_s - spent) / max(per_entry, 1e-9)))
        if n < 1:
            break
        times += chunk(len(times), n, deadline)
    return times


def time_fn(
    fn: Callable[..., Any],
    *,
    args_sets: Sequence[tuple] | None = None,
    device: Any = None,
    warmup_s: float = DEFAULT_WARMUP_S,
    repeats: int | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    graph: bool = False,
    target_rel_ci: float | None = DEFAULT_TARGET_REL_CI,
    budget_s: float = DEFAULT_BUDGET_S,
) -> Timing:
    """Per-call times of ``fn(*args_sets[i % len(args_sets)])``: see the module docstring.

    ``device`` (a :class:`~tilestack.perf.device.Device`, ``"cuda"``, ``"cpu"``) picks the clock; None infers
    it from the arguments. ``repeats`` fixes the number of timed calls; None times ``window_s`` seconds of
    calls (at least ``MIN_REPEATS``), then repeats until the median's 95% interval is within ``target_rel_ci``
    (None: do not) or ``budget_s`` seconds have gone (see the module docstring).
    """
    sets = _check(fn, args_sets, repeats, window_s, budget_s, target_rel_ci)
    if not _is_real(warmup_s) or not 0 <= warmup_s < math.inf:
        raise TimingError(f"warmup_s={warmup_s!r}; expected a finite warm-up time in seconds >= 0")
    _check_device(device)
    plan = (repeats, window_s, budget_s, target_rel_ci)
    cuda = _is_cuda(device) if device is not None else _infer_cuda(sets)
    if graph and not cuda:
        raise TimingError("graph=True; expected a CUDA device (CUDA-graph replay has no CPU counterpart)")
    if cuda:
        return _time_graph(fn, sets, warmup_s, plan) if graph else _time_cuda(fn, sets, warmup_s, plan)
    return _time_cpu(fn, sets, warmup_s, plan)


Plan = tuple[int | None, float, float, float | None]  # repeats, window_s, budget_s, target_rel_ci


def _timing(times: list[float], method: str, warm: int, sets: list[tuple], plan: Plan) -> Timing:
    repeats, _, _, target = plan
    return Timing(tuple(times), method, warm, len(sets), target if repeats is None else None)


def _warm(fn: Callable, sets: list[tuple], warmup_s: float, clock: Callable[[], float]) -> tuple[int, float]:
    """Call until ``warmup_s`` has passed (at least once per set, at least ``MIN_WARMUP_CALLS`` times).

    Returns the calls made and the median seconds per call: the median, because the first calls (lazy
    initialisation, compilation) and a busy host's descheduled ones would make a mean plan far too few repeats.
    """
    calls, start, per_call = 0, clock(), []
    while True:
        t0 = clock()
        fn(*sets[calls % len(sets)])
        t1 = clock()
        per_call.append(t1 - t0)
        calls += 1
        enough = calls >= max(len(sets), MIN_WARMUP_CALLS) and t1 - start >= warmup_s
        if enough or calls >= max(MAX_WARMUP_CALLS, len(sets)):
            return calls, statistics.median(per_call)


def _time_cpu(fn: Callable, sets: list[tuple], warmup_s: float, plan: Plan) -> Timing:
    warm, per_call = _warm(fn, sets, warmup_s, time.perf_counter)

    def chunk(start: int, n: int, deadline: float) -> list[float]:
        times = []
        for i in range(start, start + n):
            args = sets[i % len(sets)]
            t0 = time.perf_counter()
            fn(*args)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if t1 > deadline and len(times) + start >= MIN_BUDGET_REPEATS:
                break
        return times

    return _timing(_repeat(chunk, per_call, *plan), "cpu-perf-counter", warm, sets, plan)


def _cuda_clock() -> Callable[[], float]:
    import torch

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return clock


def _event_times(launch: Callable[[int], None], start: int, n: int, per_event: int = 1) -> list[float]:
    """Seconds of ``launch(i)`` for i in start .. start + n - 1, each between two CUDA events, one sync."""
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda.synchronize()
    for j in range(n):
        starts[j].record()
        launch(start + j)
        ends[j].record()
    torch.cuda.synchronize()
    ms_to_s = 1e-3
    return [s.elapsed_time(e) * ms_to_s / per_event for s, e in zip(starts, ends, strict=True)]


def _time_cuda(fn: Callable, sets: list[tuple], warmup_s: float, plan: Plan) -> Timing:
    warm, per_call = _warm(fn, sets, warmup_s, _cuda_clock())

    def chunk(start: int, n: int, deadline: float) -> list[float]:  # the GPU's clock is read only at the end
        return _event_times(lambda i: fn(*sets[i % len(sets)]), start, n)

    return _timing(_repeat(chunk, per_call, *plan), "cuda-events", warm, sets, plan)


def capture_graph(
    fn: Callable[..., Any],
    args_sets: Sequence[tuple] | None,
    *,
    warmup_s: float = DEFAULT_WARMUP_S,
    calls: int = GRAPH_CALLS,
) -> tuple[Callable[[], None], int]:
    """Capture ``calls`` calls of ``fn`` (cycling through ``args_sets``) into one CUDA graph.

    Returns ``(replay, warm-up calls)``; one ``replay()`` runs all ``calls`` launches with no launch overhead.
    """
    import torch

    if not torch.cuda.is_available():
        raise TimingError("capture_graph: torch sees no CUDA device; expected one (CUDA graphs are GPU-only)")
    sets = [()] if args_sets is None else [tuple(a) for a in args_sets]
    # Warm up on a side stream before capture (as torch.cuda.graphs recommends), so lazy initialisation
    # (cuBLAS handles, Triton compilation) happens outside the graph.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm, _ = _warm(fn, sets, warmup_s, _cuda_clock())
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(*sets[i % len(sets)])
    except Exception as e:  # capture forbids host syncs, allocations on some paths, CPU tensors...
        raise TimingError(
            f"graph=True: {type(e).__name__} while capturing fn into a CUDA graph ({e}); "
            "expected a capturable fn (no host synchronisation), or use graph=False"
        ) from e
    return g.replay, warm


def _time_graph(fn: Callable, sets: list[tuple], warmup_s: float, plan: Plan) -> Timing:
    import torch

    replay, warm = capture_graph(fn, sets, warmup_s=warmup_s)
    replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    replay()
    torch.cuda.synchronize()
    per_replay = time.perf_counter() - t0

    def chunk(start: int, n: int, deadline: float) -> list[float]:
        return _event_times(lambda i: replay(), start, n, per_event=GRAPH_CALLS)

    return _timing(_repeat(chunk, per_replay, *plan), "cuda-graph", warm, sets, plan)
