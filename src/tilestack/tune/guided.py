"""Model-guided tuning sessions: ``tilestack tune --model`` times only the configs the cost model ranks best.

    model = pretrained_model(["docs/results/tune_ground_truth_h200.jsonl"])
    session = ModelSession(device_key(0), budget_s=300, model=model, top_k=8)
    session.run(library_problems())

Each problem's candidates are the configs its constrained space keeps (``tune.constraints``: the IR's and the
device's limits). A tuned config in use (this device's table, else the nearest device's) and the kernel's
default are timed first, so a tuned entry is never slower than what the library did. Where no table gives one,
the config in use is the kernel's untuned default, and it goes first only if the pre-trained model ranks no
candidate more than ``tune.cost_model.TRUST`` faster (``first_seeds``); else the model's pick goes first and the
default is timed only if the model's order reaches it, so what is written can be slower than the default where
the model is wrong (on the H200 ground truth, one measurement of rms_norm 32768x2048 finds 0.983 of the best;
its default is the best). Then ``top_k`` more, in the cost model's active order (``active_order``: expected
improvement under the pre-trained model, refitted with each measurement), each checked against the reference
before it is timed. Spaces of other backends than Triton's (whose lowering the constraints model) are searched
as the plain session does.

The config in use (a table's entry, whatever its device or size) is always measured first, outside the ``top_k``
budget, so a written entry is never slower than what the launch path did. Winners of other sizes found earlier in
the same session are priors (``cost_model.active_order``'s ``priors``): measured first only where the model does
not rank its own pick clearly faster, as the offline evaluation (``scripts/tune/evaluate_cost_model.py``) treats
another GPU's entry for another size; the evaluation counts that entry inside its budget, the CLI times it in
addition.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tilestack.tune.features import vector
from tilestack.tune.session import Session

TOP_K = 8


def pretrained_model(paths: Iterable[Path | str], n_trees: int | None = None):
    """A cost model fitted on every measurement in these ground-truth files (JSON lines)."""
    from tilestack.errors import TunableError
    from tilestack.tune.cost_model import N_TREES, CostModel, Dataset

    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if not paths or missing:
        raise TunableError(f"tune --model: ground-truth data {missing or '(none given)'} not found; give "
                           "--model-data <file.jsonl> (written by scripts/tune/collect_ground_truth.py)")
    X, y = Dataset.load(paths).training(aot=False)      # it ranks configs before any compile
    if not X:
        raise TunableError(f"tune --model: no measured config in {[str(p) for p in paths]}")
    return CostModel(n_trees or N_TREES).fit(X, y)


class ModelSession(Session):
    """A Session whose candidates are the constrained space's kept configs, searched in the cost model's active
    order: the config in use (an untuned default only where the model ranks nothing clearly faster), then
    ``top_k`` more: the other seeds (the kernel's default, winners elsewhere), then each the candidate of
    largest expected improvement under the model refitted with what was measured."""

    def __init__(self, *args, model, top_k: int = TOP_K, **kwargs):
        from tilestack.tune.features import device_peaks

        super().__init__(*args, **kwargs)
        self.model, self.top_k = model, top_k
        self.spaces: dict[tuple, tuple] = {}       # -> (ConstrainedSpace, kept configs in the model's order)
        self.peaks = device_peaks(self.device.name)    # (matrix FLOP/s, bytes/s) of the roofline feature

    def _space(self, space, args):
        from tilestack.tune.constraints import ConstrainedSpace

        kinds = tuple((str(a.dtype), tuple(a.shape)) if hasattr(a, "dtype") else type(a).__name__ for a in args)
        k = (space.kernel.name, repr(sorted(space.fixed.items())), repr(sorted(space.restrict.items())), kinds)
        if k not in self.spaces:
            cs = ConstrainedSpace(space.kernel, args, space.fixed, space.domains(), self.device)
            kept = cs.kept()
            X = [vector(self._features(cs, c), aot=False) for c in kept]
            mean, _ = self.model.predict(np.asarray(X)) if kept else ([], None)
            self.spaces[k] = (cs, [kept[i] for i in np.argsort(mean, kind="stable")])
        return self.spaces[k]

    def _features(self, cs, cfg: dict) -> dict[str, float]:
        from tilestack.tune.features import config_features

        return config_features(cs.estimate(cfg), sms=self.device.sms, shared_per_block=self.device.shared_bytes,
                               peak_flops=self.peaks[0], bandwidth=self.peaks[1])

    def _candidates(self, space, args) -> list[dict]:
        if getattr(space, "backend", "triton") != "triton":     # the constraints model Triton's lowering
            return super()._candidates(space, args)
        return self._space(space, args)[1]

    def _strategy(self, space, args, untuned: dict | None = None, priors: list[dict] = ()):
        if getattr(space, "backend", "triton") != "triton":
            return super()._strategy(space, args, untuned, priors)
        cs, _ = self._space(space, args)
        return lambda candidates, seeds: self._active(cs, candidates, seeds, untuned, priors)

    def _active(self, cs, candidates: list[dict], seeds: list[dict], untuned: dict | None = None,
                priors: list[dict] = ()):
        """``tune.search`` strategy: yields configs, is sent each Trial; the first (the config in use, or the
        model's pick where that is the ``untuned`` default and the model ranks a candidate clearly faster) and
        ``top_k`` more: the other seeds among the candidates (winners elsewhere), then the cost model's active
        order."""
        from tilestack.tune.cost_model import active_order, target

        features = [self._features(cs, c) for c in candidates]
        first = list(dict.fromkeys(candidates.index(s) for s in seeds
                                   if s in candidates and s != untuned and s not in priors))
        later = [candidates.index(s) for s in priors if s in candidates and s != untuned]
        default = candidates.index(untuned) if untuned in candidates else None
        order = active_order([vector(f, aot=False) for f in features], base=self.model, seeds=first,
                             priors=later, default=default)
        i, picked = next(order), -1           # the first (the config in use, or what the model puts before it)
        while True:
            trial = yield candidates[i]
            picked += 1
            if picked >= self.top_k:
                return
            y = None if trial.seconds is None else target(trial.seconds * 1e6, features[i])
            try:
                i = order.send(y)
            except StopIteration:
                return
