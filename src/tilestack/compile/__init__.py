"""A torch.compile backend that swaps recognised patterns for tilestack's kernels and hands the rest to Inductor.

    import tilestack.compile                                   # registers backend="tilestack"
    model = torch.compile(model, backend="tilestack")
    model = tilestack.optimize(model, check=True)              # the same; every rewrite tested on random inputs
    model(x)
    print(tilestack.compile.last_report())                     # what was swapped, what was left and why

The passes (``tilestack.compile.patterns.PASSES``): ``sdpa``, ``explicit_attention``, ``add_norm``, ``norm``,
``linear_epilogue`` (Linear + bias + activation (+ residual add) as one GEMM with a fused epilogue, in inference
graphs), ``softmax``, ``linear_cross_entropy`` (training graphs). A Linear with nothing to fuse stays with
Inductor (the report says why for each). A rewrite is made only where it pays at the graph's static shapes:
row-wise ops with at least ``policy.MIN_ROWS`` rows, attention with at least ``policy.MIN_QUERY_ROWS`` query rows
per head (``tilestack.compile.policy``; a decode step stays with Inductor). See docs/inference.md.

``torch.compile(model, backend="tilestack")`` also works without importing tilestack first: the package
declares the backend in the ``torch_dynamo_backends`` entry-point group (pyproject.toml), which Dynamo reads.
"""

from tilestack.compile import policy
from tilestack.compile.backend import last_report, optimize, register, reports, run_passes, tilestack_backend
from tilestack.compile.patterns import PASSES
from tilestack.compile.report import Report

register()

__all__ = ["PASSES", "Report", "last_report", "optimize", "policy", "register", "reports", "run_passes",
           "tilestack_backend"]
