"""Norms that write the next fp8 linear layer's activations: the quantize folded into the op before the GEMM,
as TensorRT fuses it, so the fp8 GEMM reads fp8 from memory and nothing makes a pass of its own over x.

    y8, h = norm_fp8(x, weight, bias, eps, x_scale, residual=r)   # y8 (M, N) float8_e4m3fn, h = x + r (or None)
    y = quantized_linear(y8, q, s, b, x_scale=x_scale)            # the fp8 x fp8 GEMM

y8 = fp8(norm(x [+ r]) / x_scale), rounded to nearest even and saturated to +-448 (NaN stays NaN): layer norm
with a ``bias``, RMS norm without. The library's norm kernels do it as they are: their weight and bias are read
as f32, so weight / x_scale and bias / x_scale (f32, made once per weight version) scale the output, and a
float8_e4m3fn Y makes their store the saturating cast. x is (M, N) rows of f32/bf16/f16; h in x's dtype.
"""

from __future__ import annotations

from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_tensor, finite_real, nothing_to_launch, refuse_derived
from tilestack.kernels._plan import planned
from tilestack.kernels.layernorm import layer_norm_kernel
from tilestack.kernels.rmsnorm import check_norm_args, norm_fwd_kernel, rms_norm_kernel
from tilestack.kernels.softmax import resolve_row_config
from tilestack.quant.gemm import MAX_SCALE, MIN_SCALE, inverse_scale

_scaled: dict = {}     # (id of the weight, its version, inverse scale) -> (weight, the f32 weight / x_scale)


def _over_scale(t, inv: float):
    """t as f32 times inv, remade when t changes in place (its ``_version``) or is another tensor."""
    import torch

    if t is None:
        return None
    key = (t.data_ptr(), t.device, t.shape, t._version, inv)
    hit = _scaled.get(key)
    if hit is None or hit[0] is not t:
        if len(_scaled) > 4096:       # weights of models no longer used
            _scaled.clear()
        with torch.no_grad():
            hit = _scaled[key] = (t, t.detach().float() * inv)
    return hit[1]


def norm_fp8(x, weight, bias, eps: float, x_scale: float, *, residual=None, backend: str | None = None, **config):
    """(y8, h): y8 = fp8(norm(x + residual) / x_scale) and h = x + residual in x's dtype (None without a
    residual); layer norm with ``bias``, RMS norm without (module docstring)."""
    eps = float(eps) if finite_real(eps) else eps            # NumPy's numbers too; others: refused below
    x_scale = float(x_scale) if finite_real(x_scale) else x_scale
    return _planned_norm_fp8(x, weight, bias, eps, x_scale, residual=residual, backend=backend, **config)


@planned(name="norm_fp8")
def _planned_norm_fp8(x, weight, bias, eps, x_scale, *, residual=None, backend=None, **config):
    import torch

    fn = ("add_" if residual is not None else "") + ("layer_norm" if bias is not None else "rms_norm") + "_fp8"
    check_norm_args(fn, x, weight, eps, bias=bias, residual=residual)
    if not finite_real(x_scale) or not MIN_SCALE <= x_scale <= MAX_SCALE:
        raise LaunchError(f"{fn}: x_scale must be a finite number > 0, got {x_scale!r} (at least {MIN_SCALE:.4g} and "
                          f"at most {MAX_SCALE:.4g}: its inverse, f32 in the kernels, must be finite)")
    check_tensor(fn, "x", x, rank=2)
    refuse_derived(fn, config, {"CENTERED": "whether it is a layer norm (the bias)"})
    inv = inverse_scale(x_scale)
    m, n = x.shape
    fp8 = torch.float8_e4m3fn

    def outputs(x):
        y = torch.empty(x.shape, dtype=fp8, device=x.device)
        stat = torch.empty(m, dtype=torch.float32, device=x.device)
        return y, (torch.empty_like(x) if residual is not None else None), stat, torch.empty_like(stat)

    if nothing_to_launch(x):
        def empty(x, weight, bias, eps, x_scale, *, residual=None, **_):
            y, h, _, _ = outputs(x)
            return y, (None if residual is None else (x + residual if x.device.type != "meta" else h))
        return empty
    centered = bias is not None
    name = ("add_" if residual is not None else "") + ("layer_norm" if centered else "rms_norm")
    cfg = resolve_row_config(name, n, x.device.type, dict(config), x=x)
    w8, b8 = _over_scale(weight, inv), _over_scale(bias, inv)
    y, h, mean, rstd = outputs(x)
    if residual is not None:      # h = x + r, then the norm of h (norm_fwd_kernel: layer or RMS by CENTERED)
        launch = norm_fwd_kernel.launcher_for(
            (x, residual, w8, b8 if centered else w8, y, h, mean, rstd, eps), backend, CENTERED=centered, **cfg)

        def run_add(x, weight, bias, eps, x_scale, *, residual=None, **_):
            y, h, mean, rstd = outputs(x)
            w8, b8 = _over_scale(weight, inv), _over_scale(bias, inv)
            launch((x, residual, w8, b8 if centered else w8, y, h, mean, rstd, eps))
            return y, h
        return run_add
    if centered:
        launch = layer_norm_kernel.launcher_for((x, w8, b8, y, mean, rstd, eps), backend, **cfg)

        def run_ln(x, weight, bias, eps, x_scale, **_):
            y, _, mean, rstd = outputs(x)
            launch((x, _over_scale(weight, inv), _over_scale(bias, inv), y, mean, rstd, eps))
            return y, None
        return run_ln
    launch = rms_norm_kernel.launcher_for((x, w8, y, rstd, eps), backend, **cfg)

    def run_rms(x, weight, bias, eps, x_scale, **_):
        y, _, _, rstd = outputs(x)
        launch((x, _over_scale(weight, inv), y, rstd, eps))
        return y, None
    return run_rms
