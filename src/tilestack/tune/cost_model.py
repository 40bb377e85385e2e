"""A learned cost model: predicts a config's time from its features, with an uncertainty, and picks what to
measure next by expected improvement.

    data = Dataset.load(["docs/results/tune_ground_truth_h200.jsonl"])      # measurements, by problem
    model = CostModel().fit(*data.training(exclude_kernel="gemm"))          # pre-trained on the other kernels
    mean, std = model.predict(X)               # log2(time / roofline), centred per problem: compare, not absolute
    order = active_search(X, measure, prior=data.training(...), budget=12)  # refined on the target

The target is ``log2(time / roofline time)`` (the roofline from the IR's FLOPs and bytes and the device table:
a per-problem constant known before anything runs), so that problems of every size and kernel share one scale.
The model is a random forest (scikit-learn) over what is left of the target once the launch's idle SMs are
accounted for (``idle_sm_bound``: a launch of fewer programs than SMs runs at least SMs/programs times slower, a
bound a forest cannot extrapolate to launches smaller than it trained on): its mean over trees predicts, the
spread of the trees is the uncertainty that expected improvement trades against the mean. On the target problem
each measurement is added to the training set, weighted so that the target's own points count as much as all the
pre-training data together once there are a few of them, and the forest is refitted (a few hundred ms). Pre-training
targets are centred per problem (the model learns how the configs of one problem compare); the target's
measurements set its offset, each weighted by how sure the pre-trained forest was of that config (``_offset``).

The dataset is JSON lines, written by ``scripts/tune/collect_ground_truth.py`` as it measures (a run cut short
keeps every line written):
    {"type": "problem", "id": ..., "kernel": ..., "signature": ..., "shape": ..., "n": ..., "device": {...}}
    {"type": "config", "id": ..., "config": {...}, "group": "kept"|"hard"|"soft", "us": 12.5 | null,
     "error": null | "...", "features": {...}}
    {"type": "done", "id": ..., "complete": true}          # every kept config of the problem was measured
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilestack.errors import TunableError
from tilestack.tune.features import FEATURES, vector

N_TREES = 100
MIN_LEAF = 2
MAX_FEATURES = 0.5          # of the features tried at each split: decorrelates the trees (the uncertainty)
TARGET_WEIGHT = 1.0         # the target's points together weigh this much relative to the pre-training data
# The timing noise of one measurement, log2 units (~2%: the H200 tables' entries re-timed in another session
# differ from the ground truth by a median 0.6%, 23 of 28 within 2%): the floor of a residual's variance in
# ``_offset``, so that a config the trees agree on exactly does not outweigh every other measurement.
NOISE = 0.03
XI = 0.01                   # expected improvement's margin, in log2 units (~0.7%)
# The kernel's untuned default goes first unless the pre-trained model predicts a candidate this much faster
# (log2 units: 0.1 = 7%). A kernel's default is written by hand to be good on every shape (the 22 held-out
# H200 problems: 0.87-1.00 of the best, 0.92-1.00 on the row kernels), and the model's first pick on a
# held-out problem misses by as much (0.90-1.00 on the row kernels): only a predicted gain larger than that
# error is worth the measurement. docs/autotuning.md gives the effect of 0 to 0.2.
TRUST = 0.1


def _sklearn():
    try:
        from sklearn.ensemble import RandomForestRegressor
    except ImportError as e:
        raise TunableError("the cost model needs scikit-learn (pip install 'scikit-learn>=1.3')") from e
    return RandomForestRegressor


def target(us: float, features: dict[str, float]) -> float:
    """The model's target for a measured time: log2(time / roofline time)."""
    return math.log2(us) - features.get("log2_roofline_us", 0.0)


FILL = FEATURES.index("log2_sm_fill")


def idle_sm_bound(X: np.ndarray) -> np.ndarray:
    """(n,) log2 of how much slower than its roofline each config must run because some SMs get no program
    (``features.derived_features``): known before anything runs, and outside what a forest can extrapolate."""
    return -X[:, FILL]


def bound_slope(bound: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> float:
    """1 (the bound holds) unless ``y`` falls as ``bound`` rises (the weighted covariance is negative: times that
    do not follow a GPU's SMs, as made-up or interpreter times need not), then 0. Only the sign of the data's
    slope is read: its size is confounded (the launches that leave SMs idle are those of the largest tiles, which
    run nearest their bound: on the H200's GEMMs the pooled slope is ~0.24 though the bound itself holds)."""
    w = np.ones_like(y) if weight is None else weight
    mb, my = np.average(bound, weights=w), np.average(y, weights=w)
    return 0.0 if float(np.average((bound - mb) * (y - my), weights=w)) < 0 else 1.0


class CostModel:
    """A random forest over ``FEATURES`` vectors; ``predict`` gives (mean, std over trees). The forest learns the
    target less ``slope`` x ``idle_sm_bound``, and ``predict`` adds that back, so that a launch of fewer programs
    than any it trained on is predicted slower by what its idle SMs cost, not at the level of the fewest programs
    it has seen. ``slope`` is 1 unless the training times run against the bound (``bound_slope``), then 0."""

    def __init__(self, n_trees: int = N_TREES, seed: int = 0):
        self.n_trees, self.seed = n_trees, seed
        self.forest = None
        self.slope = 1.0
        self.data: tuple[list, list] | None = None     # what it was fitted on (X, y): the prior of a refit

    def fit(self, X: Sequence, y: Sequence[float], weight: Sequence[float] | None = None) -> CostModel:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise TunableError(f"CostModel.fit: X is {X.shape} and y {y.shape}; expected (n, features) and (n,) "
                               "with n > 0")
        forest = _sklearn()(n_estimators=self.n_trees, min_samples_leaf=MIN_LEAF, max_features=MAX_FEATURES,
                            random_state=self.seed, n_jobs=1)
        w = None if weight is None else np.asarray(weight, dtype=np.float64)
        bound = idle_sm_bound(X)
        self.slope = bound_slope(bound, y, w)
        self.forest = forest.fit(X, y - self.slope * bound, sample_weight=w)
        if weight is None:
            self.data = (X.tolist(), y.tolist())
        return self

    def predict(self, X: Sequence) -> tuple[np.ndarray, np.ndarray]:
        if self.forest is None:
            raise TunableError("CostModel.predict: fit the model first")
        X = np.asarray(X, dtype=np.float64)
        per_tree = np.stack([t.predict(X) for t in self.forest.estimators_])     # (trees, n)
        return per_tree.mean(0) + self.slope * idle_sm_bound(X), per_tree.std(0)


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float, xi: float = XI) -> np.ndarray:
    """How much below ``best`` (lower is better) each prediction is expected to land."""
    from scipy.stats import norm

    std = np.maximum(std, 1e-9)
    gain = best - mean - xi
    z = gain / std
    return gain * norm.cdf(z) + std * norm.pdf(z)


@dataclasses.dataclass
class Step:
    index: int                  # into the candidates
    y: float | None             # the measured target (None: failed)


def first_seeds(X: np.ndarray, seeds: Sequence[int], default: int | None, base: CostModel | None,
                trust: float = TRUST, priors: Sequence[int] = ()) -> list[int]:
    """What to measure before the model's own order: ``seeds`` (tuned for this problem's size: the config in use,
    another GPU's winner for this size), then each of ``priors`` (winners of other sizes) and ``default`` (the
    kernel's declared default, untuned) that the model does not rank clearly behind its own pick
    (``clearly_slower``); one that it does is a candidate like any other.

    A winner for another size is a prior, not a measurement of anything like this problem: the H100's GEMM winner
    for 4096^3 (BM=128, BN=256), the nearest entry its table has for 1024^3, launches 32 programs on 132 SMs
    there and reaches 0.54 of the H200's best. A winner for this size from another GPU of the same architecture
    is measured first: where the model knows the kernel least (none of its problems in the pre-training) it is
    the better guess (gating it too: the held-out-kernel model put its own picks before the H100's winners on
    attention D=64 causal, and found 0.958 and 0.930 of the best in 4 measurements instead of 1.000 and 0.968)."""
    first = list(seeds)
    for i in [*priors, default]:
        if i is not None and i not in first and not (base is not None and clearly_slower(base, X, i, trust)):
            first.append(i)
    return first


def clearly_slower(base: CostModel, X: np.ndarray, i: int, trust: float = TRUST) -> bool:
    """Whether the model predicts its own pick more than ``trust`` (log2) faster than candidate ``i``."""
    mean = base.predict(X)[0]
    return bool(mean[i] - mean.min() > trust)


def active_order(X: Sequence, *, base: CostModel | None = None, seeds: Sequence[int] = (),
                 priors: Sequence[int] = (), default: int | None = None, trust: float = TRUST, n_trees: int = N_TREES,
                 seed: int = 0) -> Generator[int, float | None, None]:
    """The order in which to measure the candidates ``X`` (feature vectors), as a generator: it yields the index
    of the next candidate and is sent that candidate's measured target (``target``; None if it failed, which
    counts as worse than any measured). ``seeds`` (indices: the config in use, another GPU's winner for this
    size) come first, then ``priors`` (winners of other sizes) and ``default`` (the kernel's untuned default)
    where the model does not rank its own pick clearly faster (``first_seeds``); then each next candidate is the
    one of largest expected improvement under ``base`` (a forest pre-trained on other problems, its data the
    prior; None: none, a random start) refitted with every measurement.

    The prior knows how configs of a problem compare, not how fast the target problem is: the target's
    measurements set that offset (their gap to the prior's prediction, weighted by its certainty: ``_offset``),
    and enter the refitted forest shifted by it."""
    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    prior = base.data if base is not None else None
    steps: list[Step] = []
    tried: set[int] = set()
    rng = np.random.default_rng(seed)
    for i in first_seeds(X, seeds, default, base, trust, priors):
        if i not in tried and 0 <= i < n:
            tried.add(i)
            steps.append(Step(i, (yield i)))
    while len(tried) < n:
        left = np.array([i for i in range(n) if i not in tried])
        fitted = _refit(X, steps, prior, base, n_trees, seed)
        if fitted is None:                   # no prior and nothing measured yet: a random start
            i = int(rng.choice(left))
        else:
            model, offset = fitted
            mean, std = model.predict(X[left])
            mean = mean + offset
            ok = [s.y for s in steps if s.y is not None]
            ei = expected_improvement(mean, std, min(ok)) if ok else np.zeros(len(left))
            i = int(left[np.argmax(ei)]) if ei.max() > 0 else int(left[np.argmin(mean)])
        tried.add(i)
        steps.append(Step(i, (yield i)))


def active_search(X: Sequence, measure: Callable[[int], float | None], *, budget: int,
                  prior: tuple[Sequence, Sequence] | None = None, seeds: Sequence[int] = (),
                  priors: Sequence[int] = (), default: int | None = None, trust: float = TRUST, n_trees: int = N_TREES,
                  seed: int = 0) -> list[Step]:
    """Measure ``budget`` of the candidates ``X`` in ``active_order`` (``seeds``, ``priors``, ``default``,
    ``trust`` as there), with a forest pre-trained on ``prior`` (X, y: targets centred per problem, as
    ``Dataset.training`` gives them); ``measure(i)`` returns the target of candidate i, or None if it failed."""
    base = CostModel(n_trees, seed).fit(*prior) if prior is not None and len(prior[0]) > 0 else None
    order = active_order(X, base=base, seeds=seeds, priors=priors, default=default, trust=trust,
                         n_trees=n_trees, seed=seed)
    steps: list[Step] = []
    budget = min(budget, len(X))
    if budget <= 0:
        return steps
    i = next(order)
    while True:
        steps.append(Step(i, measure(i)))
        if len(steps) >= budget:
            order.close()
            return steps
        i = order.send(steps[-1].y)


def _refit(X: np.ndarray, steps: list[Step], prior, base: CostModel | None, n_trees: int,
           seed: int) -> tuple[CostModel, float] | None:
    """(a forest, the offset to add to its predictions) from the prior and the target's measurements so far."""
    ok = [s.y for s in steps if s.y is not None]
    worst = max(ok) + 1.0 if ok else None
    done = [s for s in steps if s.y is not None or worst is not None]
    tx = [X[s.index] for s in done]
    ty = np.array([s.y if s.y is not None else worst for s in done])
    if base is None:
        return (CostModel(n_trees, seed).fit(tx, ty), 0.0) if tx else None
    if not tx:
        return base, 0.0
    offset = _offset(ty, *base.predict(np.asarray(tx)))
    px, py = list(prior[0]), list(prior[1])
    # the target's points weigh TARGET_WEIGHT x the prior's total once there are a few; never less than one each
    w_target = max(1.0, TARGET_WEIGHT * len(px) / len(tx) * min(1.0, len(tx) / 4))
    weight = [1.0] * len(px) + [w_target] * len(tx)
    return CostModel(n_trees, seed).fit(px + tx, py + list(ty - offset), weight), offset


def _offset(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """The target problem's level: how far its measured targets ``y`` lie from the pre-trained ``mean`` at those
    configs, each residual weighted by its inverse variance (the trees' spread ``std`` there, plus ``NOISE``).

    Every residual is the one unknown offset plus the model's error at that config, and the spread of the trees
    says how large that error may be: the inverse-variance weighted mean is the standard estimate of a common
    offset from measurements of unequal error, where the plain mean let a config the forest extrapolates to (a
    launch unlike any it trained on) move the level of every prediction as much as one it knows well. On the
    H200 ground truth the spreads at the measured configs are often alike (GEMM 1024^3: 0.33 at the H100's
    entry, 0.30 at the model's pick), so the change there is small (0.05 log2 after two measurements)."""
    w = 1.0 / (np.square(std) + NOISE ** 2)
    return float(np.sum(w * (y - mean)) / np.sum(w))


# ---- the dataset ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ProblemData:
    id: str
    kernel: str
    meta: dict[str, Any]
    configs: list[dict] = dataclasses.field(default_factory=list)     # every measured config, in order
    us: list[float | None] = dataclasses.field(default_factory=list)   # its time (None: failed or wrong)
    groups: list[str] = dataclasses.field(default_factory=list)        # kept / hard / soft
    features: list[dict] = dataclasses.field(default_factory=list)
    raw_index: list[int] = dataclasses.field(default_factory=list)     # position in the space's product order
    first_s: list[float | None] = dataclasses.field(default_factory=list)   # compile + first launch, seconds
    complete: bool = False

    def kept(self) -> list[int]:
        """Indices of the configs the constraints keep (the tuner's candidates)."""
        return [i for i, g in enumerate(self.groups) if g == "kept"]

    def X(self, idx: Iterable[int] | None = None, aot: bool = True) -> np.ndarray:
        idx = range(len(self.configs)) if idx is None else idx
        return np.array([vector(self.features[i], aot) for i in idx], dtype=np.float64).reshape(-1, len(FEATURES))

    def y(self, i: int) -> float | None:
        return None if self.us[i] is None else target(self.us[i], self.features[i])

    def best_us(self) -> float | None:
        ok = [self.us[i] for i in self.kept() if self.us[i] is not None]
        return min(ok) if ok else None


@dataclasses.dataclass
class Dataset:
    problems: dict[str, ProblemData]

    @classmethod
    def load(cls, paths: Iterable[Path | str]) -> Dataset:
        """Every problem in these JSON-lines files (a torn last line, from a run cut short, is skipped)."""
        problems: dict[str, ProblemData] = {}
        for path in paths:
            for line in Path(path).read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                kind, pid = r.get("type"), r.get("id")
                if kind == "problem":
                    problems[pid] = ProblemData(pid, r["kernel"], r)
                elif kind == "config" and pid in problems:
                    p = problems[pid]
                    p.configs.append(r["config"])
                    p.us.append(r.get("us"))
                    p.groups.append(r.get("group", "kept"))
                    p.features.append(r.get("features") or {})
                    p.raw_index.append(int(r.get("raw_index", len(p.raw_index))))
                    p.first_s.append(r.get("first_s"))
                elif kind == "done" and pid in problems:
                    problems[pid].complete = bool(r.get("complete"))
        return cls(problems)

    def kernels(self) -> list[str]:
        return sorted({p.kernel for p in self.problems.values()})

    def training(self, exclude_kernel: str | None = None, exclude: Iterable[str] = (), aot: bool = True,
                 center: bool = True) -> tuple[list, list]:
        """(X, y) of every measured config, leaving out one kernel's problems and the problem ids ``exclude``
        (and the compiler's report from the features unless ``aot``). ``center``: each problem's targets minus
        their mean, so that the model learns how configs of one problem compare (what ranking needs), not
        which kernels run nearer their roofline."""
        skip = set(exclude)
        X, y = [], []
        for p in self.problems.values():
            if p.kernel == exclude_kernel or p.id in skip:
                continue
            rows = [(vector(p.features[i], aot), t) for i in range(len(p.configs)) if (t := p.y(i)) is not None]
            mean = float(np.mean([t for _, t in rows])) if rows and center else 0.0
            X += [x for x, _ in rows]
            y += [t - mean for _, t in rows]
        return X, y
