"""Automatic parallelization: predict a training step's time and memory under a plan, and search plans.

    from tilestack.parallel.model import ModelConfig
    from tilestack.parallel.plan import MeasuredCompute, choose, describe_gpt, load_comm, measure_gloo, search
    from tilestack.parallel.plan import write_plan

    desc = describe_gpt(ModelConfig(n_layer=4, d=128, n_head=4, vocab=256, max_seq=64), seq=64)
    compute = MeasuredCompute.for_gpt(desc)              # per-layer times measured here (or RooflineCompute)
    comm = load_comm("gloo-cpu") or measure_gloo()       # alpha-beta fits of gloo collectives (or h200_nccl())
    ranked = search(desc, compute, comm, world_size=4, batch=16, memory_limit=2**30)
    write_plan(choose(ranked).prediction, desc, "plan.json")     # tilestack train --plan plan.json

``tilestack plan`` is the command-line face (src/tilestack/cli/plan.py); docs/planner.md the whole story.
Modules: describe (the model as layers), compute (per-layer times), comm (collectives), schedule (pipeline
simulator), predict (one plan's time and memory), search (enumeration and Alpa's DP), planfile (the plan file),
pictures (matplotlib figures), goodput (gradient noise scale, Pollux's statistical efficiency), measure (run
plans for real and compare).
"""

from tilestack.parallel.plan.comm import ClusterComm, CommModel, h200_nccl, load_comm, measure_gloo
from tilestack.parallel.plan.compute import ComputeModel, MeasuredCompute, RooflineCompute
from tilestack.parallel.plan.describe import (
    LayerDesc,
    ModelDesc,
    PlanError,
    SharedParam,
    describe_gpt,
    describe_module,
    describe_transformer,
)
from tilestack.parallel.plan.goodput import (
    AdaptiveBatch,
    GoodputController,
    GradientNoiseScale,
    accumulate_and_observe,
    efficiency,
)
from tilestack.parallel.plan.planfile import read_plan, write_plan
from tilestack.parallel.plan.predict import Plan, Prediction, predict
from tilestack.parallel.plan.schedule import simulate
from tilestack.parallel.plan.search import alpa_stages, brute_force_stages, choose, enumerate_plans, search

__all__ = [
    "AdaptiveBatch", "ClusterComm", "CommModel", "ComputeModel", "GoodputController", "GradientNoiseScale",
    "LayerDesc", "MeasuredCompute", "ModelDesc", "Plan", "PlanError", "Prediction", "RooflineCompute", "SharedParam",
    "accumulate_and_observe", "alpa_stages", "brute_force_stages", "choose", "describe_gpt", "describe_module",
    "describe_transformer", "efficiency", "enumerate_plans", "h200_nccl", "load_comm", "measure_gloo", "predict",
    "read_plan", "search", "simulate", "write_plan",
]
