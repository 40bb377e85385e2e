"""tilestack.kernels.layer_norm_backward (the shared norm backward, centred) on both backends against float64
PyTorch autograd and the reference executor, from the forward's saved mean and 1/std: one-tile and multi-pass
rows, every float dtype, rows far from zero mean, and the argument checks."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import layer_norm, layer_norm_backward

bwd_module = importlib.import_module("tilestack.kernels.layernorm_bwd")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
CASES = [((13, 300), dict(BM=2, BN=512, ONE_TILE=True)), ((6, 64), dict(BM=4, BN=64, ONE_TILE=True)),
         ((9, 300), dict(BM=2, BN=128)), ((3, 257), dict(BM=1, BN=64))]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def f64_grads(x, w, b, dy, eps):
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    y = torch.nn.functional.layer_norm(xd, x.shape[-1:], wd, bd, eps)
    return torch.autograd.grad(y, (xd, wd, bd), dy.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cfg", CASES, ids=str)
def test_layer_norm_backward_matches_float64_and_reference(backend, dtype, shape, cfg, rng, poison_empty):
    x = torch.from_numpy(rng.normal(3.0, 2.0, shape)).to(dtype)     # mean far from 0: the centring matters
    w = torch.from_numpy(rng.normal(1.0, 0.5, shape[1:])).to(dtype)
    b = torch.from_numpy(rng.normal(0.0, 0.5, shape[1:])).to(dtype)
    dy = torch.from_numpy(rng.normal(0.0, 1.0, shape)).to(dtype)
    eps = 1e-5
    _, mean, rstd = layer_norm(x, w, b, eps, backend="reference")
    dx64, dw64, db64 = f64_grads(x, w, b, dy, eps)

    dx, dw, db = layer_norm_backward(dy, x, w, mean, rstd, backend=backend, **cfg)
    rdx, rdw, rdb = layer_norm_backward(dy, x, w, mean, rstd, backend="reference", **cfg)
    assert dx.shape == shape and dx.dtype == dtype and dw.dtype == db.dtype == dtype
    tol = TOL[dtype]
    for got, ref, want in ((dx, rdx, dx64), (dw, rdw, dw64), (db, rdb, db64)):
        assert rel(got, want) <= tol and rel(got, ref) <= tol


def test_layer_norm_backward_of_constant_rows_is_finite():
    """A constant row has variance 0: rstd = 1/sqrt(eps), xhat = 0, and dx = rstd * (g - mean(g)) is finite."""
    x = torch.full((3, 50), 7.0)
    w, b = torch.ones(50), torch.zeros(50)
    dy = torch.linspace(-1, 1, 150).view(3, 50)
    _, mean, rstd = layer_norm(x, w, b, 1e-5, backend="reference")
    dx, dw, db = layer_norm_backward(dy, x, w, mean, rstd, backend="triton", BM=1, BN=64, ONE_TILE=True)
    dx64, dw64, db64 = f64_grads(x, w, b, dy, 1e-5)
    assert rel(dx, dx64) <= 1e-4 and float(dw.abs().max()) <= 1e-6 and rel(db, db64) <= 1e-6


@pytest.mark.parametrize("call,match", [
    (lambda: layer_norm_backward(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.ones(2)[None],
                                 torch.ones(2)), "mean must have rank 1"),
    (lambda: layer_norm_backward(torch.ones(2, 4).half(), torch.ones(2, 4), torch.ones(4), torch.ones(2),
                                 torch.ones(2)), "dy has dtype float16; expected one of float32"),
    (lambda: layer_norm_backward(torch.ones(2, 4), torch.ones(2, 4), torch.ones(3), torch.ones(2),
                                 torch.ones(2)), "weight has 3 elements"),
], ids=["mean-rank", "dy-dtype", "weight-size"])
def test_layer_norm_backward_bad_arguments_refused_before_launch(call, match, no_launch):
    no_launch(bwd_module, "norm_bwd_kernel", "partial_sum_kernel")
    with pytest.raises(LaunchError, match=match):
        call()


def add_norm_f64(h, w, b, dy, dh, eps, centered):
    """(dx + dh, dw[, db]) of layer norm (``centered``) or RMS norm of h in float64 autograd."""
    hd, wd, bd = (t.double().requires_grad_() for t in (h, w, b))
    y = (torch.nn.functional.layer_norm(hd, h.shape[-1:], wd, bd, eps) if centered
         else hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * wd)
    grads = torch.autograd.grad(y, (hd, wd, bd) if centered else (hd, wd), dy.double())
    return (grads[0] + (0 if dh is None else dh.double()), *grads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("with_dh", [True, False], ids=["dh", "no-dh"])
@pytest.mark.parametrize("shape,cfg", [((37, 96), dict(BM=2, BN=128, ONE_TILE=True)),
                                       ((11, 300), dict(BM=2, BN=128))], ids=["one-tile", "wide"])
def test_norm_backward_over_many_rounds(backend, dtype, centered, with_dh, shape, cfg, rng, poison_empty):
    """Each of the 4 programs walks several row blocks (37 rows in blocks of 2: 19 blocks, 5 rounds for some),
    the next round's tiles loaded before this one's arithmetic, the last block ragged and the row narrower than
    its tile; the partial sums start from NaN-poisoned memory (the kernel writes or zeroes every element)."""
    from tilestack.kernels import add_layer_norm, add_rms_norm, rms_norm_backward

    def t(loc=0.0, std=1.0, s=shape):
        return torch.from_numpy(rng.normal(loc, std, s)).to(dtype)

    x, r, dy = t(2.0, 2.0), t(), t()
    dh = t() if with_dh else None
    w, b = t(1.0, 0.5, shape[1:]), t(0.0, 0.5, shape[1:])
    if centered:
        _, h, mean, rstd = add_layer_norm(x, r, w, b, 1e-5, backend="reference")
        got = layer_norm_backward(dy, h, w, mean, rstd, dh=dh, backend=backend, **cfg)
    else:
        _, h, rstd = add_rms_norm(x, r, w, 1e-5, backend="reference")
        got = rms_norm_backward(dy, h, w, rstd, dh=dh, backend=backend, **cfg)
    want = add_norm_f64(h, w, b, dy, dh, 1e-5, centered)
    for g, ref in zip(got, want, strict=True):
        assert rel(g, ref) <= TOL[dtype]


def test_norm_backward_plans_once_and_repeats_exactly(rng):
    """A launch signature is planned once (config, programs, launchers); a second call with new tensors of the
    same signature takes the plan and, with the same values, gives the same bits (a fixed summation order)."""
    from tilestack.kernels.layernorm_bwd import _planned_backward, norm_backward

    x, dy, dh = (torch.from_numpy(rng.normal(0.0, 1.0, (9, 40))).float() for _ in range(3))
    w = torch.from_numpy(rng.normal(1.0, 0.1, 40)).float()
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    first = norm_backward(dy, x, w, None, rstd, dh=dh, centered=False, backend="triton", config={})
    plans = len(_planned_backward.plans)
    second = norm_backward(dy.clone(), x.clone(), w.clone(), None, rstd.clone(), dh=dh.clone(), centered=False,
                           backend="triton", config={})
    assert len(_planned_backward.plans) == plans
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_programs_fill_the_gpu_in_one_wave():
    """The persistent grid is as many programs as are resident at once under the register budget (an H200:
    132 SMs of 64K registers), never more than row blocks; off a GPU a few, so rounds are exercised."""
    h200 = 65536
    assert bwd_module.programs_per_sm(8, h200) == 2 and bwd_module.programs_per_sm(4, h200) == 4
    assert bwd_module.programs_per_sm(16, h200) == 1 and bwd_module.programs_per_sm(32, h200) == 1
    cfg = bwd_module.bwd_config(768, "cuda", {})
    assert 132 * bwd_module.programs_per_sm(cfg["num_warps"], h200) == 264
    assert bwd_module.programs(8192, torch.device("cpu"), cfg) == bwd_module.CPU_PROGRAMS
    assert bwd_module.programs(3, torch.device("cpu"), cfg) == 2          # 3 rows in blocks of 2


@pytest.mark.parametrize("n", [128, 768, 2048, 4096, 8192, 40000])
def test_gpu_default_config_rounds(n):
    """On a GPU: the row in one tile up to MAX_ONE_TILE, rounds of >= 2048 elements, 8 (16 from 8192 on) f32
    elements a thread per tile; wider rows in 2 x 2048 tiles."""
    cfg = bwd_module.bwd_config(n, "cuda", {})
    if n > bwd_module.MAX_ONE_TILE:
        assert cfg == dict(BM=2, BN=2048, num_warps=8, ONE_TILE=False)
        return
    assert cfg["ONE_TILE"] and cfg["BN"] >= n and cfg["BM"] * cfg["BN"] >= 2048
    assert cfg["BM"] * cfg["BN"] // (32 * cfg["num_warps"]) == (16 if n >= 8192 else 8)


@pytest.mark.slow
@pytest.mark.parametrize("n,centered,with_dh", [(768, True, True), (768, False, False), (2048, False, True),
                                                (8192, True, True), (40000, True, True)])
def test_gpu_default_configs_fit_the_register_budget(n, centered, with_dh):
    """The default configs, compiled for sm_90 as Triton's JIT specializes a launch (unit strides constant),
    need at most REGISTER_BUDGET registers a thread and spill nothing: the programs ``programs`` launches are
    all resident at once (a config over the budget would leave a second wave of programs running alone)."""
    from tilestack.tune import aot

    if aot.missing_tools():
        pytest.skip(f"AOT compiles: {aot.missing_tools()}")
    m = 8192
    x = torch.empty(m, n, dtype=torch.bfloat16, device="meta")
    w = torch.empty(n, dtype=torch.bfloat16, device="meta")
    stat = torch.empty(m, dtype=torch.float32, device="meta")
    parts = torch.empty(2, 264, n, dtype=torch.float32, device="meta")
    args = (x, w, x, x, stat, stat, x, parts[0], parts[1])
    cfg = bwd_module.bwd_config(n, "cuda", {})
    r = aot.resources(bwd_module.norm_bwd_kernel, args, dict(CENTERED=centered, ADD_DH=with_dh), cfg, tma=False)
    if r.registers is None:
        pytest.skip(f"no register count: {r.error or 'no cuobjdump'}")
    registers, spills = r.registers, r.spills
    assert spills == 0 and registers <= bwd_module.REGISTER_BUDGET, (cfg, registers, spills)


@pytest.mark.slow
def test_gpu_timing_script_runs_in_quick_mode(tmp_path):
    """scripts/gpu/check_norm_backward.py (the H200 timing of this backward against torch's) runs end to end
    at tiny shapes here, so a GPU session is not spent on a script that breaks; its numbers agree with torch."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "check_norm_backward.py"
    spec = importlib.util.spec_from_file_location("check_norm_backward", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "norm_backward.json"
    assert script.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == [c[0] for c in script.QUICK_CASES]
    for r in rows:
        assert r["tilestack_plan"]["launches"] == 2 and r["kernel_ms_tilestack"] > 0 and r["fwd_bwd_ms_torch"] > 0
    assert rows[0]["rel_err_dx"] <= 1.5e-2           # bf16 layer norm + dh against torch's kernel
