"""Communication time: an alpha-beta model per collective and group size, fitted to measurements.

    cm = measure_gloo(world_sizes=(2, 4))             # times collectives on a gloo group on localhost, stores the fit
    cm = load_comm("gloo-cpu") or measure_gloo()      # the stored fit (``<cache_dir>/plan/comm-gloo-cpu.json``)
    cm = h200_nccl()                                  # ANCHORS.md's 2x / 4x H200 NCCL all-reduce bus bandwidths
    cm.time("all_reduce", nbytes, n=4)                # seconds for one all-reduce of nbytes over 4 ranks

Each (collective, n) has its own straight line t = a + b S (S: the bytes of the whole tensor each rank holds
before an all-reduce, after an all-gather, before a reduce-scatter; of the message for ``p2p``), fitted by
least squares to measured times. A group size that was not measured uses the ring model
(``tilestack.parallel.cost``: 2 (n - 1) alpha + 2 (n - 1) / n S / B for an all-reduce, half of that for an
all-gather or a reduce-scatter) with the alpha and B fitted at the nearest measured size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilestack.parallel.plan.describe import PlanError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "p2p")
DEFAULT_SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)   # bytes: latency- to bandwidth-bound on localhost
MEASURE_REPEATS = 15
MIB = 1 << 20
# ANCHORS.md: NCCL all-reduce bus bandwidth (GB/s) through torch.distributed, bf16, NVLink NV18, 2026-11-21
H200_NCCL_BUSBW = {
    2: {1: 37, 8: 180, 64: 270, 256: 302, 1024: 330},
    4: {1: 12, 8: 213, 64: 316, 256: 342, 1024: 355},
}


def _check_group(n: Any, nbytes: Any) -> None:
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
        raise PlanError(f"CommModel.time: n={n!r}; expected a positive int (ranks in the group)")
    # (a negative size was priced 0 s, as no bytes)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int | float | np.number) or not math.isfinite(nbytes) or (
            nbytes < 0):
        raise PlanError(f"CommModel.time: nbytes={nbytes!r}; expected a finite number of bytes >= 0")


def _ring_steps(kind: str, n: int) -> float:
    """How many alpha terms (and what multiple of S (n - 1) / n / B) a ring collective of n ranks costs."""
    if kind == "all_reduce":
        return 2.0 * (n - 1)
    if kind in ("all_gather", "reduce_scatter"):
        return float(n - 1)
    return 1.0                                                   # p2p: one message


@dataclasses.dataclass
class CommModel:
    """Fitted lines ``fits[kind][n] = (a s, b s/byte)``; ``source`` says where they came from."""

    fits: dict[str, dict[int, tuple[float, float]]]
    source: str
    points: dict[str, dict[int, list[tuple[float, float]]]] = dataclasses.field(default_factory=dict)

    def time(self, kind: str, nbytes: float, n: int, *, stride: int = 1) -> float:
        """Seconds for one ``kind`` collective of ``nbytes`` over ``n`` ranks (0 for n = 1 or no bytes).
        ``stride``: the rank distance between group members (the mesh is ("pp", "dp", "dp_shard", "tp"),
        outermost first); one machine's model ignores it, :class:`ClusterComm` uses it to tell the links apart."""
        if kind not in COLLECTIVES:
            raise PlanError(f"CommModel.time: kind={kind!r}; expected one of {COLLECTIVES}")
        _check_group(n, nbytes)
        if n <= 1 or nbytes <= 0:
            return 0.0
        fits = self.fits.get(kind) or self.fits.get("all_reduce")
        if not fits:
            raise PlanError(f"CommModel ({self.source}) has no fit for {kind!r}; expected one of {list(self.fits)}")
        if kind == "p2p":
            a, b = fits[min(fits)]
            return a + b * nbytes
        if n in fits and kind in self.fits:
            a, b = fits[n]
            return a + b * nbytes
        src = kind if kind in self.fits else "all_reduce"
        below, above = [k for k in fits if k < n], [k for k in fits if k > n]
        if not (below and above):
            return self._ring(kind, src, fits, n, nbytes)
        # between two measured sizes, no faster than the smaller group nor slower than the larger, as measured:
        # the ring scaled from 2 H200s put a 3-GPU all-reduce above the measured 4-GPU one at every size
        # (4.8e-5 s against 4.4e-5 at 1 kB), which priced odd groups (3, 6 GPUs) above larger ones. And no faster
        # than a smaller group in between: the nearest measured size changes halfway, so with 2 and 8 measured,
        # 5 ranks (scaled from 2) were priced above 7 (scaled from 8), a larger group faster (round 10)
        lo, hi = fits[max(below)], fits[min(above)]

        def kept(k: int) -> float:
            t = self._ring(kind, src, fits, k, nbytes)
            return min(max(t, lo[0] + lo[1] * nbytes), hi[0] + hi[1] * nbytes) if kind in self.fits else t
        return max(kept(k) for k in range(max(below) + 1, n + 1))

    @staticmethod
    def _ring(kind: str, src: str, fits: dict[int, tuple[float, float]], n: int, nbytes: float) -> float:
        """The ring model of ``n`` ranks at the nearest measured size: alpha per step, B from the per-byte slope."""
        m = min(fits, key=lambda k: (abs(k - n), k))      # a tie goes to the smaller, whatever the dict's order
        a, b = fits[m]
        alpha = a / _ring_steps(src, m)
        bw = _ring_steps(src, m) / m / b if b > 0 else float("inf")
        return _ring_steps(kind, n) * alpha + _ring_steps(kind, n) / n * nbytes / bw

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source,
                "fits": {k: {str(n): list(v) for n, v in f.items()} for k, f in self.fits.items()},
                "points": {k: {str(n): v for n, v in f.items()} for k, f in self.points.items()}}

    def __post_init__(self) -> None:
        if not isinstance(self.fits, dict) or not self.fits:
            raise PlanError(f"CommModel: fits={self.fits!r}; expected {{collective: {{group size: (a, b)}}}} for some "
                            f"of {COLLECTIVES}")
        for kind, per_n in self.fits.items():
            if kind not in COLLECTIVES or not isinstance(per_n, dict) or not per_n:
                raise PlanError(f"CommModel: fits[{kind!r}]={per_n!r}; expected a collective of {COLLECTIVES} with "
                                "lines by group size")
            for n, line in per_n.items():
                # numpy's numbers are numbers (a fit made with np.polyfit: np.float64 / np.float32 seconds, np.int64
                # group sizes were refused); kept as int / float below. A bool is neither.
                ok = isinstance(n, numbers.Integral) and not isinstance(n, bool | np.bool_) and n >= 1 and isinstance(
                    line, tuple | list) and len(line) == 2 and all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and math.isfinite(v) and v >= 0
                    for v in line)
                if not ok:
                    raise PlanError(f"CommModel: fits[{kind!r}][{n!r}]={line!r}; expected (a seconds, b seconds per "
                                    "byte), finite and >= 0, for an int group size")
        # a copy of the caller's dict, its numbers as Python's
        self.fits = {kind: {int(n): (float(a), float(b)) for n, (a, b) in per_n.items()}
                     for kind, per_n in self.fits.items()}


    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommModel:
        return cls(fits={k: {int(n): tuple(v) for n, v in f.items()} for k, f in data["fits"].items()},
                   source=data["source"],
                   points={k: {int(n): [tuple(p) for p in v] for n, v in f.items()}
                           for k, f in data.get("points", {}).items()})


def fit_line(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """(a, b) of t = a + b S by least squares weighted by 1 / t (relative errors: small and large sizes count
    alike); a and b kept non-negative."""
    try:
        s, t = np.asarray(sizes, dtype=np.float64), np.asarray(times, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlanError(f"fit_line: sizes={sizes!r}, times={times!r}; expected two sequences of numbers") from None
    if s.ndim != 1 or s.shape != t.shape:
        raise PlanError(f"fit_line: {s.size} sizes and {t.size} times; expected one time per size")
    if not (np.isfinite(s).all() and np.isfinite(t).all() and (s >= 0).all() and (t > 0).all()):
        raise PlanError(f"fit_line: sizes={s.tolist()}, times={t.tolist()}; expected finite sizes >= 0 and "
                        "positive, finite times")
    if len(set(s.tolist())) < 2:
        raise PlanError(f"fit_line: sizes={list(sizes)}; expected two distinct sizes or more")
    w = 1.0 / t
    A = np.stack([np.ones_like(s), s], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    if b <= 0:
        return float(np.median(t)), 0.0
    return max(float(a), 0.0), float(b)


def comm_path(name: str) -> Path:
    from tilestack import config
    return Path(config.knobs.cache_dir) / "plan" / f"comm-{name}.json"


def load_comm(name: str = "gloo-cpu") -> CommModel | None:
    """The stored fit called ``name``, or None."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise PlanError(f"load_comm: name={name!r}; expected the name of a stored fit, such as 'gloo-cpu'")
    path = comm_path(name)
    try:
        if not path.exists():   # (inside: a cache folder this user cannot enter raised a bare PermissionError)
            return None
        return CommModel.from_json(json.loads(path.read_text()))
    # OSError: a folder at the fit's path, or one that cannot be read, raised IsADirectoryError from deep in pathlib
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise PlanError(f"load_comm: the stored fit {str(path)!r} is not readable ({type(e).__name__}: {e}); "
                        "expected a file written by measure_gloo (delete it to measure again)") from None


def _collective(kind: str, full, part, rank: int) -> None:
    """One collective on the default group: ``full`` the whole tensor, ``part`` a rank's 1/n of it."""
    import torch.distributed as dist
    # torch 2.13 renamed the flat collectives (the old names warn); 2.11 has only the old ones
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if kind == "all_reduce":
        dist.all_reduce(full)
    elif kind == "all_gather":
        all_gather(full, part)
    elif kind == "reduce_scatter":
        reduce_scatter(part, full)
    elif rank == 0:
        dist.send(full, 1)
    elif rank == 1:
        dist.recv(full, 0)


def _time_collectives(rank: int, world_size: int, sizes: Sequence[int], repeats: int) -> dict[str, list]:
    """On every rank of a gloo group: the median time of each collective at each size (float32 tensors)."""
    import torch
    import torch.distributed as dist
    out: dict[str, list] = {k: [] for k in COLLECTIVES}
    for nbytes in sizes:
        numel = max(nbytes // 4 // world_size * world_size, world_size)
        full = torch.ones(numel)
        part = torch.ones(numel // world_size)
        for kind in COLLECTIVES:
            ts = []
            for i in range(repeats + 2):
                dist.barrier()
                t0 = time.perf_counter()
                _collective(kind, full, part, rank)
                dt = time.perf_counter() - t0
                if i >= 2:
                    ts.append(dt)
            out[kind].append((numel * 4, statistics.median(ts)))
    return out


def measure_gloo(world_sizes: Sequence[int] = (2, 4), sizes: Sequence[int] = DEFAULT_SIZES, *,
                 repeats: int = MEASURE_REPEATS, name: str = "gloo-cpu", store: bool = True) -> CommModel:
    """Time all-reduce, all-gather, reduce-scatter and a send/recv on gloo groups of each size on this machine
    (tilestack.parallel.launch.run_local), fit a line per collective and size, and store it as ``name``."""
    from tilestack.parallel.launch import run_local
    if not world_sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 2 for n in world_sizes):
        raise PlanError(f"measure_gloo: world_sizes={list(world_sizes)}; expected ints >= 2")
    if len(set(sizes)) < 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 4 for v in sizes):
        raise PlanError(f"measure_gloo: sizes={list(sizes)}; expected two or more distinct int byte counts >= 4")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise PlanError(f"measure_gloo: repeats={repeats!r}; expected a positive int")
    fits: dict[str, dict[int, tuple[float, float]]] = {k: {} for k in COLLECTIVES}
    points: dict[str, dict[int, list[tuple[float, float]]]] = {k: {} for k in COLLECTIVES}
    for n in world_sizes:
        res = run_local(_time_collectives, n, (list(sizes), repeats), retries=1)
        for kind in COLLECTIVES:
            # the slowest rank's median: a collective ends when its last rank is done
            rows = [max(r[kind][i][1] for r in res) for i in range(len(sizes))]
            pts = [(res[0][kind][i][0], rows[i]) for i in range(len(sizes))]
            points[kind][n] = pts
            fits[kind][n] = fit_line([p[0] for p in pts], [p[1] for p in pts])
    model = CommModel(fits={k: v for k, v in fits.items() if v}, source=f"gloo on this machine ({name}), measured",
                      points=points)
    if store:
        store_comm(model, comm_path(name))
    return model


def store_comm(model: CommModel, path: Path) -> bool:
    """Write ``model`` to ``path`` whole or not at all (a temporary of this process, renamed over it); whether it
    was written. A cache that cannot be written (a read-only folder, a cache dir that is a file) costs a warning:
    the fit, minutes of measurement, is still returned to the caller (before, the OSError ended measure_gloo after
    the measuring and the fit was lost)."""
    import warnings

    from tilestack.files import write_atomic
    try:            # atomic: a kill mid-write keeps the previous fit; temporaries "<stem>.<pid>.*.tmp" as before
        write_atomic(path, json.dumps(model.to_json(), indent=1), tmp_prefix=f"{path.stem}.")
    except OSError as e:
        warnings.warn(f"measure_gloo: the fit is not stored: cannot write {path} ({e}); it is returned to this "
                      "process only (set TILESTACK_CACHE_DIR to a writable folder to keep it)", stacklevel=3)
        return False
    return True


def h200_nccl() -> CommModel:
    """NCCL on H200s over NVLink, fitted to ANCHORS.md's all-reduce bus bandwidths (2 and 4 GPUs): the time of an
    all-reduce of S bytes is S x 2 (n - 1) / n / busbw. All-gather and reduce-scatter move half an all-reduce's
    bytes at the same bus bandwidth; a p2p send is taken at the 2-GPU all-reduce's bus bandwidth."""
    fits: dict[str, dict[int, tuple[float, float]]] = {k: {} for k in COLLECTIVES}
    points: dict[str, dict[int, list[tuple[float, float]]]] = {"all_reduce": {}}
    for n, table in H200_NCCL_BUSBW.items():
        pts = [(mib * MIB, mib * MIB * 2 * (n - 1) / n / (gbs * 1e9)) for mib, gbs in table.items()]
        points["all_reduce"][n] = pts
        a, b = fit_line([p[0] for p in pts], [p[1] for p in pts])
        fits["all_reduce"][n] = (a, b)
        fits["all_gather"][n] = fits["reduce_scatter"][n] = (a / 2, b / 2)
    a2, b2 = fits["all_reduce"][2]
    fits["p2p"][2] = (a2 / 2, b2)          # one message of S bytes: the 2-rank all-reduce moves S/2 each way twice
    return CommModel(fits=fits, source="NCCL on H200 NVLink (ANCHORS.md bus bandwidths)", points=points)


@dataclasses.dataclass
class ClusterComm(CommModel):
    """Nodes of ``gpus_per_node`` GPUs: a group whose ranks (``n`` of them, ``stride`` apart) fit in one node uses
    ``intra`` (a CommModel, e.g. NVLink), a group that spans nodes runs a ring whose slowest link is each GPU's
    share of the node's network: ``inter_alpha`` per step, ``inter_bytes_per_s`` per GPU. ``nodes``: how many
    there are (None: as many as a plan needs); then ``search`` plans for exactly ``nodes * gpus_per_node`` ranks
    and ``predict`` refuses a plan of more (``check_world``). ``fits`` and ``source`` need not be given (the
    cluster's own lines are ``intra``'s and the ring's)."""

    fits: dict[str, dict[int, tuple[float, float]]] = dataclasses.field(default_factory=dict)
    source: str = "cluster"
    intra: CommModel | None = None
    gpus_per_node: int = 8
    inter_alpha: float = 10e-6
    inter_bytes_per_s: float = 25e9
    nodes: int | None = None

    def __post_init__(self) -> None:
        if self.fits:
            super().__post_init__()
        if not isinstance(self.intra, CommModel):
            raise PlanError(f"ClusterComm: intra={self.intra!r}; expected the CommModel of a node's own links")
        # numpy's numbers are numbers (np.int64 nodes from a mesh's shape, an np.float32 bandwidth were refused as
        # "expected a positive int" / "a finite number", where search takes them as world sizes and limits); each is
        # kept as a Python int / float. (np.bool_ is neither numbers.Integral nor numbers.Real.)
        for arg in ("gpus_per_node", "nodes"):
            v = getattr(self, arg)
            if (v is not None or arg != "nodes") and (
                    not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1):
                raise PlanError(f"ClusterComm: {arg}={v!r}; expected a positive int"
                                f"{' (or None: as many nodes as a plan needs)' if arg == 'nodes' else ''}")
            if v is not None:
                setattr(self, arg, int(v))
        for arg in ("inter_alpha", "inter_bytes_per_s"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (
                    arg == "inter_bytes_per_s" and v == 0):
                raise PlanError(f"ClusterComm: {arg}={v!r}; expected a finite number >= 0 (bandwidth > 0)")
            setattr(self, arg, float(v))

    def check_world(self, where: str, world_size: int, *, exact: bool) -> None:
        """PlanError when ``world_size`` ranks do not fit the cluster's ``nodes`` x ``gpus_per_node`` GPUs: more
        ranks than GPUs, or (``exact``: a search of the whole cluster) another number than its GPUs. A group of
        ranks past the last node was priced as if the nodes went on."""
        if self.nodes is None:
            return
        gpus = self.nodes * self.gpus_per_node
        if world_size > gpus or (exact and world_size != gpus):
            raise PlanError(f"{where}: world_size={world_size} on ClusterComm {self.source!r} of nodes={self.nodes} x "
                            f"gpus_per_node={self.gpus_per_node} = {gpus} GPUs; expected "
                            f"{'world_size=' + str(gpus) if exact else 'at most ' + str(gpus) + ' ranks'} (or a "
                            "ClusterComm of the nodes used)")

    def time(self, kind: str, nbytes: float, n: int, *, stride: int = 1) -> float:
        if kind not in COLLECTIVES:
            raise PlanError(f"ClusterComm.time: kind={kind!r}; expected one of {COLLECTIVES}")
        _check_group(n, nbytes)
        if n <= 1 or nbytes <= 0:
            return 0.0
        if (n - 1) * stride < self.gpus_per_node and self.gpus_per_node % (n * stride) == 0:
            return self.intra.time(kind, nbytes, n, stride=stride)
        steps = _ring_steps(kind, n)
        if kind == "p2p":
            return self.inter_alpha + nbytes / self.inter_bytes_per_s
        return steps * self.inter_alpha + steps / n * nbytes / self.inter_bytes_per_s
