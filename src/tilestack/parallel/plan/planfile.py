"""The plan file: what ``tilestack plan`` writes and ``tilestack train --plan`` runs.

    write_plan(prediction, desc, "plan.json", device="cpu")
    spec = read_plan("plan.json")          # {"nproc", "parallel", "model", "batch", "seq", "dtype", ...}
    ParallelConfig(**spec["parallel"])     # the degrees, schedule, micro-batches, recompute, ZeRO of the plan

JSON, one object: ``format`` (PLAN_FORMAT), ``nproc`` (the world size), ``parallel`` (ParallelConfig keywords),
``model`` (ModelConfig keywords of tilestack's GPT; null for a model ``tilestack train`` cannot build),
``batch`` (global, sequences), ``seq``, ``dtype``, ``bounds`` (layer index of each stage's start; informative, the
Trainer splits evenly), and ``predicted`` (step seconds, peak bytes per rank, the terms, the bound, MFU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilestack.parallel.plan.describe import ModelDesc, PlanError
from tilestack.parallel.plan.predict import Prediction

PLAN_FORMAT = "tilestack-plan/1"
REQUIRED = ("nproc", "parallel", "model", "batch", "seq", "dtype")


def plan_dict(pred: Prediction, desc: ModelDesc, *, device: str, peak_flops: float | None = None) -> dict[str, Any]:
    plan = pred.plan
    return {
        "format": PLAN_FORMAT,
        "label": plan.label(),
        "nproc": plan.world_size,
        "parallel": plan.parallel_kwargs(),
        "model": desc.config,
        "model_name": desc.name,
        "batch": plan.batch,
        "seq": desc.seq,
        "dtype": {2: "bfloat16", 4: "float32"}.get(desc.dtype_bytes, "float32"),
        "bounds": list(plan.stage_bounds(desc)),
        "device": device,
        "runnable": pred.runnable,
        "predicted": {"step_s": pred.step_s, "memory_bytes": pred.memory_bytes, "terms": pred.terms,
                      "bound": pred.bound, "memory_per_rank": pred.memory, "mfu": pred.mfu(peak_flops)},
    }


def write_plan(pred: Prediction, desc: ModelDesc, path: str | Path, *, device: str = "cpu",
               peak_flops: float | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan_dict(pred, desc, device=device, peak_flops=peak_flops), indent=1))
    return path


def read_plan(path: str | Path) -> dict[str, Any]:
    """The plan file's object, checked: PlanError naming the file and the missing or wrong field."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} does not exist; expected a file written by `tilestack plan --out`")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"plan file {str(path)!r} is not JSON ({e}); expected a file written by `tilestack plan`"
                        ) from None
    if not isinstance(spec, dict) or spec.get("format") != PLAN_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise PlanError(f"plan file {str(path)!r}: format={got!r}; expected {PLAN_FORMAT!r}")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise PlanError(f"plan file {str(path)!r} lacks {missing}; expected the fields {list(REQUIRED)}")
    if spec["model"] is None:
        raise PlanError(f"plan file {str(path)!r} plans model {spec.get('model_name')!r}, which is not tilestack's "
                        "parallel GPT; `tilestack train` can only run plans of that model (model=null in the file)")
    return spec
