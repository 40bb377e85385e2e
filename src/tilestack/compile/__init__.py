"""A torch.compile backend that swaps recognised patterns for tilestack's kernels and hands the rest to Inductor.

    import tilestack.compile                                   # registers backend="tilestack"
    model = torch.compile(model, backend="tilestack")
    model = tilestack.optimize(model, check=True)              # the same; every rewrite tested on random inputs
    model(x)
    print(tilestack.compile.last_report())                     # what was swapped, what was left and why

The passes (``tilestack.compile.patterns.PASSES``): ``sdpa``, ``explicit_attention``, ``add_norm``, ``norm``,
``softmax``, ``linear_cross_entropy`` (training graphs). Linear layers stay with Inductor:
``tilestack.kernels.gemm`` has no epilogue yet (the report says so for each). See docs/inference.md.
"""

from tilestack.compile.backend import last_report, optimize, register, reports, run_passes, tilestack_backend
from tilestack.compile.patterns import PASSES
from tilestack.compile.report import Report

register()

__all__ = ["PASSES", "Report", "last_report", "optimize", "register", "reports", "run_passes", "tilestack_backend"]
