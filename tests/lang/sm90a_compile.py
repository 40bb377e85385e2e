"""Compiling held-out kernels for sm_90a on this CPU (no GPU): the checks the held-out test files share."""

import pytest


def check_triton_sm90a(kernel, args, consts) -> None:
    """Through the Triton backend's ahead-of-time path: compiles, fits 255 registers, spills nothing."""
    from tilestack.tune import aot
    reason = aot.missing_tools()
    if reason:
        pytest.skip(reason)
    # launch options (num_warps, num_stages) go to the backend, the rest are the kernel's constants
    options = {k: v for k, v in consts.items() if k in ("num_warps", "num_stages")}
    fixed = {k: v for k, v in consts.items() if k not in options}
    r = aot.resources(kernel, args, fixed, options, cache=False, timeout_s=None)
    assert r.ok, r.error
    assert r.spills == 0 and r.registers <= 255, r


def compile_gluon_sm90a(kernel, args, consts):
    """Through the Gluon backend: the compiled kernel, after checking it spills nothing."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    compiled = be.aot(kernel.trace(*args, **consts), be.Options())
    res = gaot.resources(compiled)
    assert res["spill_stores"] == res["spill_loads"] == 0, res["report"]
    return compiled
