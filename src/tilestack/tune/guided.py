"""Model-guided tuning sessions: ``tilestack tune --model`` times only the configs the cost model ranks best.

    model = pretrained_model(["docs/results/tune_ground_truth_h200.jsonl"])
    session = ModelSession(device_key(0), budget_s=300, model=model, top_k=8)
    session.run(library_problems())

Each problem's candidates are the configs its constrained space keeps (``tune.constraints``: the IR's and the
device's limits), ranked by the pre-trained model's predicted time (``tune.cost_model``), cut to ``top_k``; the
session then searches them as usual (the config in use and the kernel's default first, always, so a tuned entry
is never slower than what the library did), checking each against the reference before timing it. Spaces of
other backends than Triton's (whose lowering the constraints model) are searched as the plain session does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

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
    """A Session whose candidates are the constrained space's kept configs, the model's ``top_k`` best first."""

    def __init__(self, *args, model, top_k: int = TOP_K, **kwargs):
        super().__init__(*args, **kwargs)
        self.model, self.top_k = model, top_k
        self.ranked: dict[tuple, list[dict]] = {}

    def _candidates(self, space, args) -> list[dict]:
        from tilestack.tune.constraints import ConstrainedSpace
        from tilestack.tune.features import config_features, device_peaks, vector

        if getattr(space, "backend", "triton") != "triton":     # the constraints model Triton's lowering
            return super()._candidates(space, args)
        kinds = tuple((str(a.dtype), tuple(a.shape)) if hasattr(a, "dtype") else type(a).__name__ for a in args)
        k = (space.kernel.name, repr(sorted(space.fixed.items())), repr(sorted(space.restrict.items())), kinds)
        if k not in self.ranked:
            cs = ConstrainedSpace(space.kernel, args, space.fixed, space.domains(), self.device)
            kept = cs.kept()
            peak, bw = device_peaks(self.device.name)
            X = [vector(config_features(cs.estimate(c), sms=self.device.sms, shared_per_block=self.device.shared_bytes,
                                        peak_flops=peak, bandwidth=bw)) for c in kept]
            mean, _ = self.model.predict(np.asarray(X)) if kept else (np.zeros(0), None)
            self.ranked[k] = [kept[i] for i in np.argsort(mean, kind="stable")[:self.top_k]]
        return self.ranked[k]
