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

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

from tilestack.files import write_atomic
from tilestack.parallel.plan.describe import ModelDesc, PlanError
from tilestack.parallel.plan.predict import Prediction

PLAN_FORMAT = "tilestack-plan/1"
DTYPES = {2: "bfloat16", 4: "float32"}      # bytes per element: the dtypes tilestack train runs
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
        "dtype": DTYPES.get(desc.dtype_bytes, f"{desc.dtype_bytes}-byte"),
        "bounds": list(plan.stage_bounds(desc)),
        "device": device,
        "runnable": pred.runnable,
        "predicted": {"step_s": pred.step_s, "memory_bytes": pred.memory_bytes, "terms": pred.terms,
                      "bound": pred.bound, "memory_per_rank": pred.memory, "mfu": pred.mfu(peak_flops),
                      "peak_moment": pred.at_peak()[0], "memory_at_peak": pred.at_peak()[1]},
    }


def write_plan(pred: Prediction, desc: ModelDesc, path: str | Path, *, device: str = "cpu",
               peak_flops: float | None = None) -> Path:
    if not isinstance(pred, Prediction) or not isinstance(desc, ModelDesc):
        raise PlanError(f"write_plan: pred={type(pred).__name__}, desc={type(desc).__name__}; expected a Prediction "
                        "(search's ranked[i].prediction) and the ModelDesc it predicts")
    pred.plan.check(desc)                     # the description the prediction was made for
    if not isinstance(device, str) or not device:
        raise PlanError(f"write_plan: device={device!r}; expected the device name the plan was made for")
    if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, numbers.Real)
                                   or not 0 < peak_flops < math.inf):
        raise PlanError(f"write_plan: peak_flops={peak_flops!r}; expected None or a positive, finite FLOP/s")
    peak_flops = None if peak_flops is None else float(peak_flops)     # (an np.float32 peak was refused)
    if not isinstance(path, str | Path) or not str(path) or Path(path).is_dir():
        raise PlanError(f"write_plan: path={path!r}; expected a file path (not a directory)")
    # numpy scalars as Python numbers: a compute model of np.float32 times made every term one, and the file was a
    # TypeError ("Object of type float32 is not JSON serializable") after the whole search
    text = json.dumps(plan_dict(pred, desc, device=device, peak_flops=peak_flops), indent=1, default=_plain)
    # whole or not at all: a write cut short (a full disk, a kill) left half a file in place of the previous plan
    return write_atomic(path, text)


def _plain(v: Any) -> int | float:
    """A numpy number (or any numbers.Real) as JSON's number; anything else is json's TypeError, as without it."""
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"Object of type {type(v).__name__} is not JSON serializable")


def read_plan(path: str | Path) -> dict[str, Any]:
    """The plan file's object, checked: PlanError naming the file and the missing or wrong field."""
    if not isinstance(path, str | Path) or not str(path):
        raise PlanError(f"read_plan: path={path!r}; expected the path of a file written by `tilestack plan --out`")
    path = Path(path)
    try:
        if path.is_dir():   # (was "does not exist": a folder there is, and the user is sent looking for a file)
            raise PlanError(f"plan file {str(path)!r} is a folder; expected a file written by `tilestack plan --out`")
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist; expected a file written by `tilestack plan "
                            "--out`")
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"plan file {str(path)!r} is not JSON ({e}); expected a file written by `tilestack plan`"
                        ) from None
    except OSError as e:    # (unreadable, a folder on its way this user cannot enter, a name too long: a traceback)
        raise PlanError(f"plan file {str(path)!r} cannot be read ({e.strerror or e}); expected a file written by "
                        "`tilestack plan --out` that this user can read") from None
    if not isinstance(spec, dict) or spec.get("format") != PLAN_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise PlanError(f"plan file {str(path)!r}: format={got!r}; expected {PLAN_FORMAT!r}")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise PlanError(f"plan file {str(path)!r} lacks {missing}; expected the fields {list(REQUIRED)}")
    if spec["model"] is None:
        raise PlanError(f"plan file {str(path)!r} plans model {spec.get('model_name')!r}, which is not tilestack's "
                        "parallel GPT; `tilestack train` can only run plans of that model (model=null in the file)")
    _check_fields(spec, f"plan file {str(path)!r}")
    return spec


def _check_fields(spec: dict[str, Any], where: str) -> None:
    """Every field ``tilestack train`` reads, checked as it will be used: PlanError naming the field, what the file
    holds and what was expected (a file edited by hand, or truncated, fails here, not in nproc spawned ranks)."""
    from tilestack.parallel.config import ParallelConfig, ParallelConfigError
    from tilestack.parallel.model import ModelConfig, ModelConfigError

    def positive_int(field: str, v: Any) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"{where}: {field}={v!r}; expected a positive int")

    for field in ("nproc", "batch", "seq"):
        positive_int(field, spec[field])
    if spec["dtype"] not in DTYPES.values():
        raise PlanError(f"{where}: dtype={spec['dtype']!r}; expected one of {sorted(DTYPES.values())}")
    model, parallel = spec["model"], spec["parallel"]
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if not isinstance(model, dict) or set(model) - set(fields):
        got = sorted(set(model) - set(fields)) if isinstance(model, dict) else type(model).__name__
        raise PlanError(f"{where}: model has {got}; expected ModelConfig's fields {sorted(fields)}")
    for field in ("n_layer", "d", "n_head", "vocab", "max_seq"):
        if field in model:
            positive_int(f"model.{field}", model[field])
    try:
        cfg = ModelConfig(**model)
    except ModelConfigError as e:      # named as the file names it: its "model" entry's field
        raise PlanError(f"{where}: " + str(e).replace("ModelConfig.", "model.", 1)) from None
    # (ModelConfig refuses the rest when made: whole heads, eps, attention)
    known = {f.name for f in dataclasses.fields(ParallelConfig)}
    if not isinstance(parallel, dict) or set(parallel) - known:
        got = sorted(set(parallel) - known) if isinstance(parallel, dict) else type(parallel).__name__
        raise PlanError(f"{where}: parallel has {got}; expected ParallelConfig's fields {sorted(known)}")
    try:
        pc = ParallelConfig(**parallel)
        # the file's own field named: a hand-edited nproc was refused as "expected the world size 3" (of what?)
        world = pc.pp * pc.dp * pc.dp_shard * pc.tp
        if all(isinstance(v, int) for v in (pc.pp, pc.dp, pc.dp_shard, pc.tp)) and world != spec["nproc"]:
            raise PlanError(f"{where}: nproc={spec['nproc']!r} where parallel's pp*dp*dp_shard*tp = {pc.pp}*{pc.dp}*"
                            f"{pc.dp_shard}*{pc.tp} = {world}; expected the world size {spec['nproc']} to be what "
                            f"those degrees make (nproc={world} for them)")
        pc.validate(spec["nproc"], model=cfg, batch=spec["batch"], seq=spec["seq"])
    except ParallelConfigError as e:
        raise PlanError(f"{where}: {e}") from None
    # the Trainer splits the layers evenly: a plan of other stages (Alpa's DP, bounds given by hand; written with
    # runnable=false) was read as valid and trained on the even split, another plan than the one predicted
    if "bounds" in spec:
        from tilestack.parallel.plan.describe import describe_gpt
        from tilestack.parallel.plan.predict import even_bounds
        even = list(even_bounds(describe_gpt(cfg, spec["seq"]), pc.n_stages))
        if spec["bounds"] != even:
            raise PlanError(f"{where}: bounds={spec['bounds']!r:.120}; tilestack train splits the layers evenly, "
                            f"expected {even} for {pc.n_stages} stages (a plan of uneven stages is predicted, not "
                            "runnable)")
