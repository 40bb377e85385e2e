"""Round 9 of held-out kernels, continued (see test_heldout_round9.py's docstring): calling kernels as Python functions
are called. A fused residual add + RMSNorm whose runtime scalars have defaults (`eps: float = 1e-6`, `rows: int =
-1`), given by position, by keyword in any order, or left out.

Bugs these found, fixed in the compiler, each kept here as its regression test:
- launch: a runtime scalar's default was ignored ("takes 3 arguments (X, Y, eps); got 2") and a runtime argument given
  by keyword was refused as an "unknown constant"; a kernel's call binds its runtime arguments as Python does now
  (by position, by keyword, or to their defaults; given twice or missing, named), and launcher_for, which takes its
  arguments as one tuple, names a runtime argument given among the constants (lang.kernel.Kernel.bind):
  test_runtime_arguments_by_keyword_and_default, test_binding_mistakes_are_named; a default on a tensor parameter
  (which would have been ignored too) is refused when the kernel is made, naming it;
- launch: a ts.range step from a runtime argument that is 0 or negative was refused by the reference when it ran, but
  Triton's interpreter ran no trips (-1) or failed inside Triton (0), and on a GPU a step of 0 never ends; such a
  step is computed on the host at every launch now and refused, naming the loop (lang.kernel._runtime_steps,
  TracedKernel.check_steps): test_a_runtime_loop_step_that_is_not_positive_is_named_at_launch.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import LaunchError, TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def add_rmsnorm(X, R, W, Y, eps: float = 1e-6, scale: float = 1.0, rows: int = -1, *, BM: int = 8, BN: int = 16):
    """h = X + R (R updated in place to h); Y = h rsqrt(mean(h^2) + eps) W scale over rows of width N; rows >= 0
    writes only the first ``rows`` rows of Y (the rest untouched), -1 all. Pass 1 reads, pass 2 writes."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    r = ts.RegTile[ts.f32, BM, BN]()
    w = ts.RegVec[ts.f32, BN]()
    ss = ts.RegVec[ts.f32, BM]()
    rpos = ts.RegVec[ts.i32, BM]()
    lim = ts.RegVec[ts.i32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    every = ts.RegVec[ts.bool_, BM]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    old = ts.RegTile[Y.dtype, BM, BN]()
    hr = ts.RegTile[R.dtype, BM, BN]()
    ts.zero(ss)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.load(r, R, at=(i, j))
        ts.add(x, x, r)
        ts.mul(x, x, x)
        ts.row_sum(ss, x, ss)
    ts.div(ss, ss, n)
    ts.add(ss, ss, eps)
    ts.rsqrt(ss, ss)
    ts.mul(ss, ss, scale)
    ts.arange(rpos, i * BM)
    ts.zero(lim)
    ts.add(lim, lim, rows)
    ts.lt(live, rpos, lim)
    ts.lt(every, lim, 0)                             # rows < 0: every row
    ts.logical_or(live, live, every)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.load(r, R, at=(i, j))
        ts.add(x, x, r)
        ts.copy(hr, x)
        ts.store(R, hr, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.mul(x, x, ts.per_row(ss))
        ts.mul(x, x, ts.per_col(w))
        ts.copy(y, x)
        ts.load(old, Y, at=(i, j))
        ts.where(y, ts.per_row(live), y, old)
        ts.store(Y, y, at=(i, j))


def add_rmsnorm_ref(x, r, w, eps, scale):
    h = x.double() + r.double()
    return h, h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + eps) * w.double() * scale


CALLS = {   # how the runtime arguments after (X, R, W, Y) are given -> (eps, scale, rows) they mean
    "defaults": ((), {}, (1e-6, 1.0, -1)),
    "eps by keyword": ((), dict(eps=0.5), (0.5, 1.0, -1)),
    "rows by keyword, eps by default": ((), dict(rows=3), (1e-6, 1.0, 3)),
    "eps by position, scale by keyword": ((1e-2,), dict(scale=2.0), (1e-2, 2.0, -1)),
    "all by position": ((1e-3, 0.5, 5), {}, (1e-3, 0.5, 5)),
    "all by keyword, out of order": ((), dict(rows=2, scale=3.0, eps=1.0), (1.0, 3.0, 2)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("call", CALLS)
def test_runtime_arguments_by_keyword_and_default(backend, dtype, call, rng):
    """Each way of giving (eps, scale, rows) means the values it names; a large eps (0.5, 1.0) makes it visible."""
    pos, kw, (eps, scale, rows) = CALLS[call]
    M, N = 13, 37
    x, r, w = randn(rng, M, N, dtype=dtype), randn(rng, M, N, dtype=dtype), randn(rng, N, dtype=dtype)
    y = torch.full((M, N), math.nan, dtype=dtype)
    r_k = r.clone()
    launch(add_rmsnorm, backend, x, r_k, w, y, *pos, **kw)
    h, want = add_rmsnorm_ref(x, r, w, eps, scale)
    close(r_k, h.to(dtype))
    upto = M if rows < 0 else rows
    close(y[:upto], want[:upto].to(dtype), scale=8)
    assert y[upto:].isnan().all()


def test_keyword_arguments_and_the_launch_cache():
    """A launch by position and then one by keyword of another value: the second is not served the first's
    value from the launch cache (keys are made after binding)."""
    x, r, w = torch.ones(4, 16), torch.zeros(4, 16), torch.ones(16)
    y1, y2, y3 = torch.zeros(4, 16), torch.zeros(4, 16), torch.zeros(4, 16)
    add_rmsnorm(x, r.clone(), w, y1, 1e-6, 2.0, backend="reference")
    add_rmsnorm(x, r.clone(), w, y2, scale=3.0, backend="reference")
    add_rmsnorm(x, r.clone(), w, y3, backend="reference")
    close(y1, torch.full((4, 16), 2.0), scale=10)
    close(y2, torch.full((4, 16), 3.0), scale=10)
    close(y3, torch.full((4, 16), 1.0), scale=10)


def test_binding_mistakes_are_named():
    x, w = torch.ones(4, 16), torch.ones(16)
    y = torch.full((4, 16), 7.0)
    with pytest.raises(LaunchError, match=r"add_rmsnorm: argument\(s\) \['eps'\] given both by position and by "
                                          r"keyword"):
        add_rmsnorm(x, x.clone(), w, y, 1e-5, eps=1e-3, backend="reference")
    with pytest.raises(LaunchError, match=r"add_rmsnorm takes 7 arguments \(X, R, W, Y, eps, scale, rows\); got 2, "
                                          r"missing \['W'\]"):
        add_rmsnorm(x, x.clone(), Y=y, backend="reference")
    with pytest.raises(LaunchError, match=r"add_rmsnorm takes 7 arguments .*; got 8"):
        add_rmsnorm(x, x.clone(), w, y, 1e-5, 1.0, 2, 3, backend="reference")
    with pytest.raises(LaunchError, match=r"\['eps'\] name runtime arguments, not constants; give them in the "
                                          r"argument tuple, in the order \(X, R, W, Y, eps, scale, rows\)"):
        add_rmsnorm.launcher_for((x, x.clone(), w, y, 1.0, 1.0, -1), "reference", eps=1e-3)
    with pytest.raises(LaunchError, match=r"unknown constant\(s\) \['EPS'\]; its constants are \['BM', 'BN'\]"):
        add_rmsnorm(x, x.clone(), w, y, EPS=1e-3, backend="reference")
    with pytest.raises(LaunchError, match=r"argument eps is a runtime float; got str"):
        add_rmsnorm(x, x.clone(), w, y, eps="small", backend="reference")
    assert (y == 7.0).all()


def test_a_tensor_parameter_with_a_default_is_refused_naming_it():
    with pytest.raises(TraceError, match=r"kernel bias_add: tensor parameter B has a default \(None\); a tensor "
                                         r"argument is always given"):
        @ts.kernel(grid=lambda X: (1,))
        def bias_add(X, Y, B=None, *, BN: int = 16):
            pass


@ts.kernel(grid=lambda X, reps: (reps,))
def repeat_row(X, Y, reps: int = 3, *, BN: int = 16):
    """Y[r] = X for r < reps: the grid from a runtime int with a default."""
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    ts.store(Y, x, at=(ts.block_id(0),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grid_from_a_defaulted_argument_and_a_traced_kernels_run_and_cost(backend):
    """The default reaches the grid; a TracedKernel's run and cost bind as the kernel's call does, and name a
    constant given to them (fixed at trace time)."""
    x = torch.ones(16)
    for kw, n in (({}, 3), (dict(reps=2), 2)):
        y = torch.zeros(64)
        launch(repeat_row, backend, x, y, **kw)
        assert y.view(4, 16)[:, 0].tolist() == [1.0] * n + [0.0] * (4 - n)
    t = repeat_row.trace(x, torch.zeros(64))
    y = torch.zeros(64)
    t.run(x, y, reps=1, backend=backend)
    assert y.view(4, 16)[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert t.cost(x, y).programs == 3 and t.cost(x, y, reps=4).programs == 4
    with pytest.raises(LaunchError, match=r"repeat_row: \['BN'\] are not runtime arguments of this trace"):
        t.run(x, y, BN=32, backend=backend)


@ts.kernel(grid=lambda X: (1,))
def strided_tile_sum(X, Y, step: int, *, BN: int = 16, DOUBLE: bool = False):
    """Y = the sum of X's BN-wide tiles 0, step, 2 step, ... (DOUBLE: the step is 2 step - 1, an expression)."""
    x = ts.RegVec[ts.f32, BN]()
    acc = ts.RegVec[ts.f32, BN]()
    ts.zero(acc)
    for t in ts.range(0, ts.cdiv(X.shape[0], BN), 2 * step - 1 if DOUBLE else step):
        ts.load(x, X, at=(t,))
        ts.add(acc, acc, x)
    ts.store(Y, acc, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double", [False, True])
def test_a_runtime_loop_step_that_is_not_positive_is_named_at_launch(backend, double):
    """A step of 0 or below from the arguments: the reference refused it when it ran, Triton's interpreter ran no
    trips (-1) or failed inside Triton (0), and a GPU never ends a loop of step 0. Refused at launch on every
    backend, naming the loop's line, before anything is written; positive steps (the same launch key) run."""
    x = torch.arange(160, dtype=torch.float32)
    for step in (1, 3, 2):
        y = torch.zeros(16)
        launch(strided_tile_sum, backend, x, y, step, DOUBLE=double)
        s = 2 * step - 1 if double else step
        assert torch.equal(y, x.view(10, 16)[::s].sum(0))
    for step in ((0, -3) if double else (0, -1, -16)):
        y = torch.full((16,), 7.0)
        with pytest.raises(LaunchError, match=rf"strided_tile_sum: the ts.range loop at test_heldout_round9_api.py:"
                                              rf"\d+ has step {2 * step - 1 if double else step} for these arguments; "
                                              r"a runtime step must be positive"):
            launch(strided_tile_sum, backend, x, y, step, DOUBLE=double)
        assert (y == 7.0).all()
