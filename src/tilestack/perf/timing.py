"""Time a callable the way kernels are timed: warm up, repeat many times, take the median.

    from tilestack.perf import timing
    sets = timing.rotating_sets(lambda: (torch.randn(n, device="cuda"),), bytes_per_set=4 * n, device=dev)
    t = timing.time_fn(lambda x: x * 2, args_sets=sets)          # CUDA events on a GPU, perf_counter on a CPU
    t.median_s, t.p10_s, t.p90_s, t.repeats, t.method
    timing.time_fn(fn, args_sets=sets, graph=True)               # CUDA-graph replay: no launch overhead

Repeat ``i`` calls ``fn(*args_sets[i % len(args_sets)])``: with enough sets that together they exceed the L2
cache, no repeat finds its inputs still cached from the one before (``rotating_sets`` makes enough).
On a GPU each repeat is bracketed by two CUDA events and the host synchronises once at the end, so the host's
launch loop runs ahead and what is measured is the GPU's time. With ``graph=True`` the calls are captured into
one CUDA graph of ``GRAPH_CALLS`` launches and each replay is divided by that count, which removes launch
overhead from kernels of a few microseconds. On a CPU the same interface times each call with
``time.perf_counter`` (torch CPU ops are synchronous).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from tilestack.errors import TilestackError

DEFAULT_WARMUP_S = 0.025  # as triton.testing.do_bench: long enough for clocks and caches to settle
DEFAULT_WINDOW_S = 0.1  # total time spent in timed repeats, when the caller does not fix ``repeats``
MIN_REPEATS = 10  # a median of fewer is noise
MAX_REPEATS = 1000
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
    method: str  # "cuda-events" | "cuda-graph" | "cpu-perf-counter"
    warmup_calls: int
    n_sets: int

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


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


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
    if bytes_per_set <= 0:
        raise TimingError(f"bytes_per_set={bytes_per_set!r}; expected the positive size of one input set")
    if device is not None and not _is_cuda(device):
        return [make_args()]
    l2 = l2_bytes or getattr(device, "l2_bytes", None) or DEFAULT_L2_BYTES
    n = min(max_sets, max(1, math.ceil(L2_ROTATION_FACTOR * l2 / bytes_per_set)))
    return [make_args() for _ in range(n)]


def _check(fn: Callable, args_sets: Sequence[tuple] | None, repeats: int | None, window_s: float) -> list[tuple]:
    if not callable(fn):
        raise TimingError(f"fn={fn!r}; expected a callable")
    sets = [()] if args_sets is None else [tuple(a) for a in args_sets]
    if not sets:
        raise TimingError("args_sets=[]; expected at least one tuple of arguments (or None for no arguments)")
    if repeats is not None and repeats < 1:
        raise TimingError(f"repeats={repeats!r}; expected at least 1 timed repeat")
    if not window_s > 0:
        raise TimingError(f"window_s={window_s!r}; expected a positive timing window in seconds")
    return sets


def _plan(per_call_s: float, repeats: int | None, window_s: float) -> int:
    if repeats is not None:
        return repeats
    return int(min(MAX_REPEATS, max(MIN_REPEATS, window_s / max(per_call_s, 1e-9))))


def time_fn(
    fn: Callable[..., Any],
    *,
    args_sets: Sequence[tuple] | None = None,
    device: Any = None,
    warmup_s: float = DEFAULT_WARMUP_S,
    repeats: int | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    graph: bool = False,
) -> Timing:
    """Per-call times of ``fn(*args_sets[i % len(args_sets)])``: see the module docstring.

    ``device`` (a :class:`~tilestack.perf.device.Device`, ``"cuda"``, ``"cpu"``) picks the clock; None infers
    it from the arguments. ``repeats`` None repeats until ``window_s`` seconds of calls are timed (between
    ``MIN_REPEATS`` and ``MAX_REPEATS``).
    """
    sets = _check(fn, args_sets, repeats, window_s)
    cuda = _is_cuda(device) if device is not None else _infer_cuda(sets)
    if graph and not cuda:
        raise TimingError("graph=True; expected a CUDA device (CUDA-graph replay has no CPU counterpart)")
    if cuda:
        return (
            _time_graph(fn, sets, warmup_s, repeats, window_s)
            if graph
            else _time_cuda(fn, sets, warmup_s, repeats, window_s)
        )
    return _time_cpu(fn, sets, warmup_s, repeats, window_s)


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


def _time_cpu(fn: Callable, sets: list[tuple], warmup_s: float, repeats: int | None, window_s: float) -> Timing:
    warm, per_call = _warm(fn, sets, warmup_s, time.perf_counter)
    n = _plan(per_call, repeats, window_s)
    times = []
    for i in range(n):
        args = sets[i % len(sets)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times), "cpu-perf-counter", warm, len(sets))


def _cuda_clock() -> Callable[[], float]:
    import torch

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return clock


def _time_cuda(fn: Callable, sets: list[tuple], warmup_s: float, repeats: int | None, window_s: float) -> Timing:
    import torch

    warm, per_call = _warm(fn, sets, warmup_s, _cuda_clock())
    n = _plan(per_call, repeats, window_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda.synchronize()
    for i in range(n):
        starts[i].record()
        fn(*sets[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    ms_to_s = 1e-3
    return Timing(
        tuple(s.elapsed_time(e) * ms_to_s for s, e in zip(starts, ends, strict=True)),
        "cuda-events",
        warm,
        len(sets),
    )


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


def _time_graph(fn: Callable, sets: list[tuple], warmup_s: float, repeats: int | None, window_s: float) -> Timing:
    import torch

    replay, warm = capture_graph(fn, sets, warmup_s=warmup_s)
    replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    replay()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / GRAPH_CALLS
    n = _plan(per_call * GRAPH_CALLS, repeats, window_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        replay()
        ends[i].record()
    torch.cuda.synchronize()
    ms_to_s = 1e-3
    return Timing(
        tuple(s.elapsed_time(e) * ms_to_s / GRAPH_CALLS for s, e in zip(starts, ends, strict=True)),
        "cuda-graph",
        warm,
        len(sets),
    )
