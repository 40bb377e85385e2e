"""FLOPs and global-memory bytes of the baselines (torch ops), from their shapes.

    from tilestack.perf import formulas
    c = formulas.attention(batch=4, heads=16, n_q=4096, n_kv=4096, head_dim=128, dtype="bf16", causal=True)
    c.flops, c.bytes_read, c.bytes_written, c.bytes, c.intensity

Tile kernels get the same three numbers from their IR (``kernel.cost(**sizes)``); these formulas are for the
ops tilestack is compared against, so both sides of a comparison are counted the same way.

Conventions (those of the field, so numbers compare with published ones):
- a multiply-add is 2 FLOPs; a matmul (M, K) @ (K, N) is 2*M*N*K;
- attention forward is 4*B*H*Nq*Nkv*D (QK^T and PV), halved when causal; its backward is 2.5x the forward
  (the FlashAttention papers' convention: five matmuls instead of two);
- a convolution is 2 FLOPs per weight element per batch entry per output position (padded taps included,
  as the kernels compute them); its backward is that once for the input gradient and once for the weight
  gradient. Groups are in the weight's shape (C_out, C_in / groups, *kernel), so a depthwise convolution
  costs C_in times less than a dense one of the same channel counts, forward and backward alike;
- transcendental functions (exp, rsqrt) count as 1 FLOP each;
- bytes are the minimum traffic to global memory: every input read once, every output written once.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from tilestack.errors import LaunchError
from tilestack.ir.cost import Cost  # noqa: F401  (the one cost record; formulas fill flops and bytes)

# Bytes per element of every dtype tilestack names, by short name. torch dtypes map onto these names.
DTYPE_BYTES: dict[str, int] = {
    "fp64": 8,
    "fp32": 4,
    "tf32": 4,
    "bf16": 2,
    "fp16": 2,
    "fp8": 1,
    "int8": 1,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
_TORCH_NAMES: dict[str, str] = {
    "float64": "fp64",
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "int8": "int8",
    "uint8": "int8",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}

FLOPS_PER_MAC = 2
# FLOPs are real operations: a complex multiply-add is 4 real multiplies and 4 adds (zgemm's count), and an
# element-wise op on complex values works on both parts.
COMPLEX_MAC_OVER_REAL = 4
COMPLEX_ELEMENT_OVER_REAL = 2
COMPLEX_MUL_FLOPS = 6  # (a + bi)(c + di): four multiplies, two adds
COMPLEX_DIV_FLOPS = 11  # c^2 + d^2 (3), the numerator's product (6), two divides
COMPLEX_ABS_FLOPS = 4  # sqrt(a^2 + b^2): two multiplies, an add, a square root
MATMUL_BWD_OVER_FWD = 2  # the input gradient and the weight gradient, each a matmul as large as the forward's
ATTENTION_MATMULS_FWD = 2  # S = Q K^T and O = P V
ATTENTION_BWD_OVER_FWD = 2.5  # dV, dP, dQ, dK (+ recompute of S): five matmuls for the forward's two
CAUSAL_FRACTION = 0.5  # a causal mask keeps (about) half of the N x N scores (causal_fraction: Nq != Nkv)
LSE_BYTES = 4  # the forward also writes one fp32 log-sum-exp per query row, read again by the backward
LAYERNORM_FLOPS_PER_ELEMENT = 8  # mean (1), variance (3), normalise (2), affine (2)
RMSNORM_FLOPS_PER_ELEMENT = 4  # square-accumulate (2), scale (1), weight (1)
SOFTMAX_FLOPS_PER_ELEMENT = 5  # max (1), subtract + exp (2), sum (1), divide (1)
SOFTMAX_BWD_FLOPS_PER_ELEMENT = 4  # dx = y * (dy - sum(dy * y)): multiply, sum, subtract, multiply
BATCHNORM_TRAIN_FLOPS_PER_ELEMENT = LAYERNORM_FLOPS_PER_ELEMENT  # batch statistics, normalise, affine
BATCHNORM_EVAL_FLOPS_PER_ELEMENT = 4  # normalise by the running statistics (2), affine (2)
# the affine part of LAYERNORM / RMSNORM / BATCHNORM_*: a multiply by the weight, an add of the bias, each per element
# and each only where the norm has it (profiler round 24: a norm without weight or bias was counted its affine's)
NORM_AFFINE_FLOPS_PER_ELEMENT = 1
# Backward of a norm (layer, batch, group, RMS), per element of dy, by the gradients asked for:
NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT = 2  # x_hat = (x - mean) * rstd, again (any gradient but the bias's)
NORM_BWD_INPUT_FLOPS_PER_ELEMENT = 8  # g = dy * w, sum(g), sum(g * x_hat) (2), rstd * (g - mean - x_hat * mean) (4)
NORM_BWD_FROZEN_INPUT_FLOPS_PER_ELEMENT = 2  # statistics not from the batch (eval batch norm): dy * w * rstd
NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT = 2  # dw += dy * x_hat
NORM_BWD_BIAS_FLOPS_PER_ELEMENT = 1  # db += dy
# Interpolation: each output element is a weighted sum of its taps, a multiply-add per tap (the backward
# spreads each element of dy over the same taps).
INTERPOLATION_TAPS = {"linear1d": 2, "bilinear2d": 4, "trilinear3d": 8, "bicubic2d": 16}
# grid_sample's taps by (spatial dims, interpolation_mode: 0 bilinear, 1 nearest, 2 bicubic); nearest is a gather.
GRID_SAMPLE_TAPS = {(2, 0): 4, (2, 1): 0, (2, 2): 16, (3, 0): 8, (3, 1): 0}
# Losses, per element of the input, as their element-wise formula counts them:
MSE_FLOPS_PER_ELEMENT = 3  # subtract, square, sum
MSE_BWD_FLOPS_PER_ELEMENT = 3  # 2 * (x - y) * dy / n: subtract, two multiplies
SMOOTH_L1_FLOPS_PER_ELEMENT = 5  # subtract, abs, compare, square or shift, sum (Huber alike)
SMOOTH_L1_BWD_FLOPS_PER_ELEMENT = 4  # subtract, compare, clamp or scale, multiply by dy
BCE_FLOPS_PER_ELEMENT = 8  # -(y log x + (1 - y) log(1 - x)): two logs, two subtracts, two multiplies, add, sum
BCE_BWD_FLOPS_PER_ELEMENT = 5  # dy * (x - y) / (x * (1 - x)): two subtracts, two multiplies, a divide
BCE_LOGITS_FLOPS_PER_ELEMENT = 7  # (1 - y) x + log(1 + exp(-x)): subtract, multiply, exp, add, log, add, sum
BCE_LOGITS_POS_WEIGHT_FLOPS_PER_ELEMENT = 3  # the log-sigmoid scaled by 1 + (p - 1) y: multiply, add, multiply
NLL_FLOPS_PER_TARGET = 1  # the picked log-probability added into the sum (the backward writes one per target)
# Weight norm w = g * v / ||v|| per element of v: square-accumulate (2), scale (1); its backward
# dv = g / ||v|| * (dw - w_hat * sum(dw * w_hat)): multiply-accumulate (2), multiply, subtract, multiply.
WEIGHT_NORM_FLOPS_PER_ELEMENT = 3
WEIGHT_NORM_BWD_FLOPS_PER_ELEMENT = 5
CROSS_FLOPS_PER_ELEMENT = 3  # each component of a x b: two multiplies and a subtract
RENORM_FLOPS_PER_ELEMENT = 3  # the slice's norm (square-accumulate: 2) and the rescale (1)
CDIST_FLOPS_PER_TERM = 3  # ||x_i - y_j||_p: subtract, power (abs), accumulate per feature of each pair
# Statistics per element folded in: a variance is the mean (1) and the squared deviations (3), as layer norm's;
# a log-sum-exp a softmax without its divide (max, subtract + exp, sum); a vector norm a square (abs for 1, inf
# and 0) and an accumulate, with a power too for any other order.
VARIANCE_FLOPS_PER_ELEMENT = 4
LOGSUMEXP_FLOPS_PER_ELEMENT = 4
NORM_FLOPS_PER_ELEMENT = 2
NORM_POWER_FLOPS_PER_ELEMENT = 3  # |x|^p for an order p other than 0, 1, 2, inf: abs, power, accumulate
NORM_CHEAP_ORDERS = (0, 1, 2, float("inf"), float("-inf"))
POLAR_FLOPS_PER_ELEMENT = 4  # r cos(theta) + i r sin(theta): a cosine, a sine, two multiplies
# torch.allclose(a, b): isclose per element, |a - b| (2) <= atol + rtol * |b| (3) and its compare (1), then the
# all() that folds the answers (1)
ALLCLOSE_FLOPS_PER_ELEMENT = 7
# Margin losses, per element of the input (N, C): margin - x[y] + x[i] (2), the hinge (1), the sum (1); the
# backward compares, scales dy and adds into x[y]'s gradient. A multi-label margin loss does that per pair of a
# target and a non-target class of each row.
MARGIN_FLOPS_PER_TERM = 4
MARGIN_BWD_FLOPS_PER_TERM = 3
SOFT_MARGIN_FLOPS_PER_ELEMENT = 5  # log(1 + exp(-y x)): multiply, exp, add, log, sum
SOFT_MARGIN_BWD_FLOPS_PER_ELEMENT = 5  # -y sigmoid(-y x) dy / n: multiply, exp, add, divide, multiply
# CTC: each state (time step, position in the blank-extended target) of the alpha recursion is a log-sum-exp of
# up to three predecessors plus the emission (2 compares, 3 subtracts, 3 exps, 2 adds, a log, 2 adds); the
# backward runs the beta recursion alike, combines alpha and beta into each state's class (5: an add and a
# log-add-exp), and turns each log-probability into its gradient (exp, exp, subtract, multiply by dy).
CTC_FLOPS_PER_STATE = 13
CTC_BWD_FLOPS_PER_STATE = CTC_FLOPS_PER_STATE + 5
CTC_BWD_FLOPS_PER_LOG_PROB = 4
# Fused optimizer steps (torch.optim's fused=True: aten._fused_adam_, _fused_adamw_, _fused_sgd_, _fused_adagrad_),
# per element of the parameters: the pointwise ops of the same optimizer's foreach path, one FLOP each, so a fused
# and an unfused step count alike. Adam: exp_avg lerp (1), exp_avg_sq scale and addcmul (2), the denominator's sqrt,
# bias-correction divide and eps add (3), the addcdiv into the parameter (1); weight decay one more (Adam adds it
# into the gradient, AdamW scales the parameter), amsgrad's running maximum one, maximize's negation one.
ADAM_FLOPS_PER_ELEMENT = 7
# SGD: the update's add (1); with momentum the buffer's scale and add (2, none on the first step: it is the
# gradient's copy), nesterov's look-ahead add (1), weight decay's add (1), maximize's negation (1).
SGD_FLOPS_PER_ELEMENT = 1
# Adagrad: the squared-gradient sum's addcmul (1), sqrt and eps add (2), the gradient scaled by the decayed lr (1),
# the addcdiv into the parameter (1).
ADAGRAD_FLOPS_PER_ELEMENT = 5
# A grad scaler's (torch.amp.GradScaler) unscale of the gradients: a multiply by 1/scale and a finiteness check per
# element; its scale update: found_inf's test, the growth tracker's increment and its compare with the interval,
# the scale's multiply.
AMP_UNSCALE_FLOPS_PER_ELEMENT = 2
AMP_UPDATE_SCALE_FLOPS = 4
# Recurrent gates per cell kind: the rows of its input and hidden weights (gates x hidden size).
RNN_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# A GPU's fused recurrent cells (LSTMCell / GRUCell on CUDA: the gate matmuls are mm's of their own, the rest one
# kernel), per hidden element: LSTM forward the 4 gate sums, 3 sigmoids, 2 tanh, f*c + i*g (3), o*tanh(c) (13); its
# backward tanh(c) again, the output and cell gradients and the four gates' (23); GRU forward the r and z sums, 2
# sigmoids, r*h_n and its add, tanh, n + z*(h - n) (10); its backward the gates' gradients (16). Each bias given adds
# one add per gate element forward, and its gradient one add per gate element (a sum over the batch) backward.
FUSED_LSTM_CELL_FLOPS_PER_HIDDEN = 13
FUSED_LSTM_CELL_BWD_FLOPS_PER_HIDDEN = 23
FUSED_GRU_CELL_FLOPS_PER_HIDDEN = 10
FUSED_GRU_CELL_BWD_FLOPS_PER_HIDDEN = 16
# FFTs: 5 N log2 N real FLOPs per complex transform of N points (the radix-2 Cooley-Tukey count, the convention FFTW
# and the field quote for every N, power of two or not), half that for a transform of real input or output (r2c,
# c2r); a multi-dimensional transform over N = n1 * n2 * ... points is that of N. A normalised transform (an
# inverse's 1/N, "ortho"'s 1/sqrt(N)) adds a multiply per real value of its output.
FFT_FLOPS_PER_POINT_LOG2 = 5
ROUND_DECIMALS_FLOPS_PER_ELEMENT = 3  # torch.round(x, decimals=d): x * 10^d, round, / 10^d
DROPOUT_FLOPS_PER_ELEMENT = 2  # x * mask * 1/(1-p): the unfused path's mask.div_(1 - p) and x * mask
# Fake quantization (quantization-aware training), per element: quantize (scale, round, clamp) and dequantize, each
# counted as one element-wise op as quantize_per_tensor and dequantize are; a fused observer's min-max pass one
# compare per element (as aminmax, the unfused observer's op, is counted). A learnable fake quantizer's backward
# forms the input's gradient (a masked multiply: 1), the scale's ((round(x/s) - x/s) dy, accumulated: 5) and the
# zero point's (-s dy where clamped, accumulated: 2).
FAKE_QUANT_FLOPS_PER_ELEMENT = 2
OBSERVER_FLOPS_PER_ELEMENT = 1
FAKE_QUANT_LEARNABLE_BWD_FLOPS_PER_ELEMENT = 8
# torch.segment_reduce's backward, per element of its data, by reduction (see counting_rules)
SEGMENT_BWD_FLOPS_PER_ELEMENT = {"sum": 0, "mean": 1, "max": 1, "min": 1, "prod": 2}


def dtype_name(dtype: Any) -> str:
    """The short name (``"bf16"``) of a short name, a torch dtype or a numpy dtype.

    dtype_name(torch.bfloat16) == "bf16"; dtype_name("fp32") == "fp32"
    """
    if isinstance(dtype, str) and dtype in DTYPE_BYTES:
        return dtype
    if isinstance(getattr(dtype, "spec", None), str) and dtype.spec in DTYPE_BYTES:   # a tile dtype (ir.types)
        return dtype.spec
    text = str(dtype).removeprefix("torch.")
    if text in _TORCH_NAMES:
        return _TORCH_NAMES[text]
    raise LaunchError(
        f"dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)} or a torch/numpy dtype of them"
    )


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element: ``dtype_bytes("bf16") == 2``; accepts what :func:`dtype_name` accepts."""
    return DTYPE_BYTES[dtype_name(dtype)]


def _plain(value: float) -> float:
    """A NumPy integer as a Python int: NumPy's int64 products wrap past 2**63 (a RuntimeWarning, not an error), and
    matmul(np.int64(2**31), 2**31, 2**31) counted 0 FLOPs."""
    return int(value) if isinstance(value, numbers.Integral) else value


def _positive(**sizes: float) -> list[float]:
    """The sizes, in order, as Python numbers; a LaunchError names one that is no positive whole size."""
    for name, value in sizes.items():
        whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < 1:
            raise LaunchError(f"{name}={value!r} ({type(value).__name__}); expected a positive whole size")
    return [_plain(v) for v in sizes.values()]


def _whole(**sizes: float) -> list[float]:
    """Counts that may be 0 (no points, an empty matrix, no right-hand sides), but not negative nor fractional; as
    ``_positive``, returned in order as Python numbers."""
    for name, value in sizes.items():
        whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < 0:
            raise LaunchError(f"{name}={value!r} ({type(value).__name__}); expected a whole count >= 0")
    return [_plain(v) for v in sizes.values()]


def _flags(**flags: Any) -> None:
    """Switches must be bools: "no" is truthy, and would halve a count or add a bias nobody asked for."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise LaunchError(f"{name}={value!r} ({type(value).__name__}); expected True or False")


def matmul(
    m: int, n: int, k: int, dtype: Any = "bf16", *, batch: int = 1, out_dtype: Any = None, bias: bool = False
) -> Cost:
    """(batch, M, K) @ (batch, K, N) -> (batch, M, N): 2*M*N*K FLOPs per batch entry (+ M*N for a bias)."""
    m, n, k, batch = _positive(m=m, n=n, k=k, batch=batch)
    _flags(bias=bias)
    e, eo = dtype_bytes(dtype), dtype_bytes(out_dtype or dtype)
    flops = batch * (FLOPS_PER_MAC * m * n * k + (m * n if bias else 0))
    read = batch * (m * k + k * n) * e + (n * e if bias else 0)
    return Cost(flops, read, batch * m * n * eo)


def attention(
    batch: int,
    heads: int,
    n_q: int,
    n_kv: int,
    head_dim: int,
    dtype: Any = "bf16",
    *,
    causal: bool = False,
    kv_heads: int | None = None,
    backward: bool = False,
    head_dim_v: int | None = None,
) -> Cost:
    """Attention, Q (B, H, Nq, D), K (B, Hkv, Nkv, D), V (B, Hkv, Nkv, Dv) -> O (B, H, Nq, Dv).

    Forward FLOPs 2*B*H*Nq*Nkv*(D + Dv) (= 4*B*H*Nq*Nkv*D), times :func:`causal_fraction` when causal (a half
    when Nq == Nkv; torch's is_causal alignment, top-left, otherwise); backward 2.5x that.
    Bytes: the forward reads Q, K, V once and writes O and the fp32 log-sum-exp; the backward reads
    Q, K, V, O, dO and the log-sum-exp and writes dQ, dK, dV. The N x N scores never touch global memory
    (flash attention); the unfused baselines move more, so their achieved bytes/s is a lower bound.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    dv = head_dim if head_dim_v is None else head_dim_v
    batch, heads, n_q, n_kv, head_dim, kv_heads, dv = _positive(
        batch=batch, heads=heads, n_q=n_q, n_kv=n_kv, head_dim=head_dim, kv_heads=kv_heads, head_dim_v=dv
    )
    if heads % kv_heads:
        raise LaunchError(f"kv_heads={kv_heads}; expected a divisor of heads={heads}")
    for name, flag in (("causal", causal), ("backward", backward)):   # causal="no" would halve the FLOPs
        if not isinstance(flag, bool):
            raise LaunchError(f"{name}={flag!r} ({type(flag).__name__}); expected True or False")
    e = dtype_bytes(dtype)
    flops = FLOPS_PER_MAC * batch * heads * n_q * n_kv * (head_dim + dv)
    if causal:
        flops *= causal_fraction(n_q, n_kv)
    q = batch * heads * n_q * head_dim * e
    k = batch * kv_heads * n_kv * head_dim * e
    v = batch * kv_heads * n_kv * dv * e
    o = batch * heads * n_q * dv * e
    lse = batch * heads * n_q * LSE_BYTES
    if not backward:
        return Cost(flops, q + k + v, o + lse)
    return Cost(flops * ATTENTION_BWD_OVER_FWD, q + k + v + o + o + lse, q + k + v)


def causal_fraction(n_q: int, n_kv: int, *, lower_right: bool = False) -> float:
    """The share of the n_q x n_kv attention scores a causal mask keeps, as the area under its diagonal (so a half,
    ``CAUSAL_FRACTION``, when n_q == n_kv, as tilestack counts square causal attention).

    Top-left aligned (torch's ``is_causal``: query i sees keys 0..i) keeps n_q / (2 n_kv) of them when
    n_q <= n_kv (the first queries of a longer sequence), else 1 - n_kv / (2 n_q) (queries past the last key see
    every key). Lower-right aligned (flash attention's kernels, ``torch.nn.attention.bias.causal_lower_right``: the
    last query sees every key) keeps 1 - n_q / (2 n_kv) (new queries against a cache), else n_kv / (2 n_q).
    """
    n_q, n_kv = _positive(n_q=n_q, n_kv=n_kv)
    _flags(lower_right=lower_right)
    short, long = min(n_q, n_kv), max(n_q, n_kv)
    triangle = short / (2 * long)  # the kept share where the mask cuts a triangle off the long side
    return triangle if (n_q <= n_kv) != lower_right else 1 - triangle


def layernorm(rows: int, cols: int, dtype: Any = "bf16", *, affine: bool = True) -> Cost:
    """LayerNorm over the last dim of a (rows, cols) input: read x (+ weight, bias), write y; without the affine
    its multiply and add are not done."""
    rows, cols = _positive(rows=rows, cols=cols)
    _flags(affine=affine)
    e = dtype_bytes(dtype)
    affine_left_out = 0 if affine else 2 * NORM_AFFINE_FLOPS_PER_ELEMENT  # no weight to multiply, no bias to add
    return Cost(
        (LAYERNORM_FLOPS_PER_ELEMENT - affine_left_out) * rows * cols,
        rows * cols * e + (2 * cols * e if affine else 0),
        rows * cols * e,
    )


def rmsnorm(rows: int, cols: int, dtype: Any = "bf16") -> Cost:
    """RMSNorm over the last dim of a (rows, cols) input: read x and weight, write y."""
    rows, cols = _positive(rows=rows, cols=cols)
    e = dtype_bytes(dtype)
    return Cost(RMSNORM_FLOPS_PER_ELEMENT * rows * cols, rows * cols * e + cols * e, rows * cols * e)


def softmax(rows: int, cols: int, dtype: Any = "bf16") -> Cost:
    """Softmax over the last dim of a (rows, cols) input."""
    rows, cols = _positive(rows=rows, cols=cols)
    e = dtype_bytes(dtype)
    return Cost(SOFTMAX_FLOPS_PER_ELEMENT * rows * cols, rows * cols * e, rows * cols * e)


def elementwise(
    numel: int, dtype: Any = "bf16", *, inputs: int = 1, outputs: int = 1, flops_per_element: float = 1
) -> Cost:
    """An element-wise op over ``numel`` elements, reading ``inputs`` and writing ``outputs`` such tensors.

    ``elementwise(n, "fp32", inputs=1, outputs=1, flops_per_element=0)`` is a copy.
    """
    (numel,) = _positive(numel=numel)
    inputs, outputs = _whole(inputs=inputs, outputs=outputs)
    if isinstance(flops_per_element, bool) or not isinstance(flops_per_element, numbers.Real) or not (
            0 <= flops_per_element < math.inf):
        raise LaunchError(f"flops_per_element={flops_per_element!r} ({type(flops_per_element).__name__}); expected a "
                          "finite number >= 0 (0 for a copy)")
    e = dtype_bytes(dtype)
    return Cost(flops_per_element * numel, inputs * numel * e, outputs * numel * e)


def sdpa(q: Any, k: Any, v: Any, *, causal: bool = False, backward: bool = False) -> Cost:
    """:func:`attention` read off torch tensors ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nkv, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):  # a shape tuple, a list, None: said as given
            raise LaunchError(f"{name}={t!r} ({type(t).__name__}); expected a torch tensor of 4 dims (B, H, N, D)")
        if getattr(t, "ndim", None) != 4:
            raise LaunchError(
                f"{name} of shape {tuple(getattr(t, 'shape', ()))}; expected 4 dims (B, H, N, D)"
            )
    b, h, nq, d = q.shape
    _, hkv, nkv, _ = k.shape
    # q.k needs one head dim, and k and v one (batch, heads, keys): q (1, 2, 3, 4) against k (1, 2, 3, 5) was
    # counted as if its keys were 4 wide (profiler round 20)
    if k.shape[-1] != d or tuple(v.shape[:3]) != tuple(k.shape[:3]) or k.shape[0] != b:
        raise LaunchError(
            f"q of shape {tuple(q.shape)}, k of shape {tuple(k.shape)}, v of shape {tuple(v.shape)}; expected q "
            "(B, H, Nq, D), k (B, Hkv, Nkv, D) and v (B, Hkv, Nkv, Dv): one batch, q and k one head dim D, k and v "
            "one number of heads and of keys"
        )
    return attention(
        b, h, nq, nkv, d, q.dtype, causal=causal, kv_heads=hkv, backward=backward, head_dim_v=v.shape[-1]
    )


def transformer_train_flops_per_token(*, matmul_params: int, n_layer: int, seq: int, attention_width: int) -> float:
    """Training FLOPs per token of a decoder (forward + backward = 3x forward; PaLM's convention, what MFU is
    quoted in): 6 x the parameters that multiply activations (the blocks' matrices and the LM head, not the
    embedding lookups) plus the attention matmuls 12 x layers x seq x (heads x head dim), causal counted in
    full."""
    matmul_params, n_layer, seq, attention_width = _whole(matmul_params=matmul_params, n_layer=n_layer, seq=seq,
                                                          attention_width=attention_width)
    return 6 * matmul_params + 12 * n_layer * seq * attention_width


def _prod(xs: Any) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _conv_shapes(x_shape: Any, w_shape: Any, y_shape: Any, groups: int, transposed: bool) -> tuple:
    """Check one convolution's shapes against each other; ``(batch, channels_in, channels_out)``."""
    bad = LaunchError(
        f"x_shape={x_shape!r}, w_shape={w_shape!r}, y_shape={y_shape!r}; expected sequences of ints >= 0 "
        "(tensor.shape)"
    )
    try:
        given = [tuple(s) for s in (x_shape, w_shape, y_shape)]
        x, w, y = (tuple(int(d) for d in s) for s in given)
    except (TypeError, ValueError):
        raise bad from None
    # a size 8.7 was cut to 8, -8 gave negative counts, True counted as 1 and the str "138" as (1, 3, 8)
    if any(isinstance(s, str | bytes) for s in (x_shape, w_shape, y_shape)) or any(
            isinstance(d, bool) or d != i or i < 0
            for s, t in zip(given, (x, w, y), strict=True) for d, i in zip(s, t, strict=True)):
        raise bad
    groups = int(_positive(groups=groups)[0])   # (groups="x" failed in a bare comparison, 2.5 counted halves)
    _flags(transposed=transposed)
    if not (len(x) == len(w) == len(y) >= 3):
        raise LaunchError(
            f"x_shape={x}, w_shape={w}, y_shape={y}; expected (N, C, *spatial) tensors and a "
            "(C_out, C_in / groups, *kernel) weight of the same rank, at least 3"
        )
    # A transposed convolution's weight is (C_in, C_out / groups, *kernel).
    c_in, c_out = (w[0], w[1] * groups) if transposed else (w[1] * groups, w[0])
    if x[1] != c_in or y[1] != c_out or x[0] != y[0]:
        raise LaunchError(
            f"x_shape={x}, w_shape={w}, y_shape={y}, groups={groups}, transposed={transposed}; expected "
            f"x with {c_in} channels, y with {c_out} channels and one batch size"
        )
    return x, w, y


def _conv_macs(x: tuple, w: tuple, y: tuple, transposed: bool) -> int:
    """Multiply-adds of one convolution: each weight element meets each batch entry at each position of the
    side it slides over (the output of a convolution, the input of a transposed one, whose adjoint it is)."""
    slid = x if transposed else y
    return x[0] * _prod(w) * _prod(slid[2:])


def convolution(
    x_shape: Any,
    w_shape: Any,
    y_shape: Any,
    dtype: Any = "fp32",
    *,
    groups: int = 1,
    transposed: bool = False,
    bias: bool = False,
) -> Cost:
    """Convolution x (N, C_in, *S_in) * w -> y (N, C_out, *S_out); w is (C_out, C_in / groups, *K), or
    (C_in, C_out / groups, *K) when ``transposed``.

    FLOPs 2 * N * numel(w) * prod(S_out) (prod(S_in) when transposed), plus one add per output element for
    a bias. Reads x, w (and the bias) once, writes y once.
    """
    x, w, y = _conv_shapes(x_shape, w_shape, y_shape, groups, transposed)
    _flags(bias=bias)
    e = dtype_bytes(dtype)
    flops = FLOPS_PER_MAC * _conv_macs(x, w, y, transposed) + (_prod(y) if bias else 0)
    return Cost(flops, (_prod(x) + _prod(w) + (y[1] if bias else 0)) * e, _prod(y) * e)


def convolution_backward(
    grad_y_shape: Any,
    x_shape: Any,
    w_shape: Any,
    dtype: Any = "fp32",
    *,
    groups: int = 1,
    transposed: bool = False,
    input_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = False,
) -> Cost:
    """Backward of :func:`convolution`: dx (a transposed convolution of dy by w), dw (a correlation of x with
    dy) and db (a sum of dy over batch and positions), each only when asked for.

    dx and dw each take the forward's multiply-adds: 2 * N * numel(w) * prod(S_out) FLOPs apiece; db one add
    per element of dy. Reads dy, plus w for dx and x for dw; writes the gradients asked for.
    """
    x, w, dy = _conv_shapes(x_shape, w_shape, grad_y_shape, groups, transposed)
    _flags(input_grad=input_grad, weight_grad=weight_grad, bias_grad=bias_grad)
    e = dtype_bytes(dtype)
    macs = _conv_macs(x, w, dy, transposed)
    flops = FLOPS_PER_MAC * macs * (int(input_grad) + int(weight_grad)) + (_prod(dy) if bias_grad else 0)
    read = _prod(dy) + (_prod(w) if input_grad else 0) + (_prod(x) if weight_grad else 0)
    written = (_prod(x) if input_grad else 0) + (_prod(w) if weight_grad else 0) + (dy[1] if bias_grad else 0)
    return Cost(flops, read * e, written * e)


def householder_apply_flops(rows: int, cols: int, k: int) -> float:
    """Q (or Q^T), given as k Householder reflectors of length ``rows``, applied to a (rows, cols) matrix (ormqr):
    4 rows cols k - 2 cols k^2 (LAPACK Working Note 41's count for dormqr)."""
    rows, cols, k = _whole(rows=rows, cols=cols, k=k)
    if k > rows:  # profiler round 23: more reflectors than rows came out as negative FLOPs
        raise LaunchError(f"k={k} with rows={rows}; expected at most as many reflectors as rows (k <= rows)")
    return 4 * rows * cols * k - 2 * cols * k**2


def fft_flops(points: int, *, real: bool = False) -> float:
    """FLOPs of one FFT of ``points`` points: ``FFT_FLOPS_PER_POINT_LOG2 * N log2 N``, halved for a transform of
    real input or output (``real``); 0 for one point or none."""
    (points,) = _whole(points=points)
    _flags(real=real)
    if points <= 1:
        return 0.0
    flops = FFT_FLOPS_PER_POINT_LOG2 * points * math.log2(points)
    return flops / 2 if real else flops


def factorization_flops(kind: str, m: int, n: int, k: int = 0, *, vectors: bool = True, full: bool = False) -> float:
    """FLOPs of one dense linear-algebra routine on an (m, n) matrix (k right-hand sides for a solve): the leading
    terms LAPACK counts them by (LAPACK Working Note 41; Golub & Van Loan for the eigen- and singular-value
    drivers), as the field quotes them.

    kinds: "cholesky" n^3/3; "lu" 2n^3/3; "inverse" 2n^3; "solve" LU then both triangles, 2n^3/3 + 2n^2 k;
    "triangular_solve" n^2 k; "factored_solve" (LU or Cholesky factors given) 2n^2 k; "qr" 2mn^2 - 2n^3/3 for R
    and as much again to form Q (``vectors``); "eigh" 4n^3/3 for the values, 9n^3 with the vectors; "svd"
    4mn^2 - 4n^3/3 for the values, 14mn^2 + 8n^3 with thin U and V (4m^2 n + 8mn^2 + 9n^3 with ``full``), m >= n;
    "eig" (a general matrix: Hessenberg reduction and the shifted QR algorithm) 10n^3 for the values, 25n^3 with
    the vectors; "pinv" the thin SVD with vectors and V S^+ U^T, 14mn^2 + 8n^3 + 2mn^2 ("pinv_hermitian": eigh with
    vectors and the same product, 9n^3 + 2n^3); "lstsq" QR's R, Q^T applied to the k right-hand sides
    (4mnk - 2n^2 k) and the triangular solve (n^2 k); "householder_product" Q of m x n from k reflectors,
    4mnk - 2(m + n)k^2 + 4k^3/3 (k = n: as much as R again, as "qr" counts it); "ldl" n^3/3, as Cholesky;
    "cholesky_inverse" (the factor given) the triangle's inverse and its product with its transpose, 2n^3/3. A
    rectangular "lu" (m >= n, or its transpose) is mn^2 - n^3/3.
    """
    m, n, k = _whole(m=m, n=n, k=k)
    _flags(vectors=vectors, full=full)
    if kind == "householder_product" and k > min(m, n):  # round 23: more reflectors gave negative FLOPs
        raise LaunchError(f"k={k} with m={m}, n={n}; expected at most min(m, n) reflectors for householder_product")
    m, n = max(m, n), min(m, n)  # a wide matrix is factored as its transpose
    if kind == "cholesky":
        return n**3 / 3
    if kind == "lu":  # getrf of m x n, m >= n: mn^2 - n^3/3 (round 23: a rectangular LU was counted as n x n)
        return (m - n) * n**2 + 2 * n**3 / 3
    if kind == "inverse":
        return 2 * n**3
    if kind == "solve":
        return 2 * n**3 / 3 + 2 * n**2 * k
    if kind == "triangular_solve":
        return n**2 * k
    if kind == "factored_solve":
        return 2 * n**2 * k
    if kind == "qr":
        r = 2 * m * n**2 - 2 * n**3 / 3
        return 2 * r if vectors else r
    if kind == "eigh":
        return 9 * n**3 if vectors else 4 * n**3 / 3
    if kind == "svd":
        if not vectors:
            return 4 * m * n**2 - 4 * n**3 / 3
        return 4 * m**2 * n + 8 * m * n**2 + 9 * n**3 if full else 14 * m * n**2 + 8 * n**3
    if kind == "eig":
        return 25 * n**3 if vectors else 10 * n**3
    if kind == "pinv":
        return 14 * m * n**2 + 8 * n**3 + 2 * m * n**2
    if kind == "pinv_hermitian":
        return 9 * n**3 + 2 * n**3
    if kind == "lstsq":
        return 2 * m * n**2 - 2 * n**3 / 3 + 4 * m * n * k - 2 * n**2 * k + n**2 * k
    if kind == "householder_product":  # k reflectors (k <= n), passed as k
        return 4 * m * n * k - 2 * (m + n) * k**2 + 4 * k**3 / 3
    if kind == "ldl":
        return n**3 / 3
    if kind == "cholesky_inverse":
        return 2 * n**3 / 3
    raise LaunchError(
        f"kind={kind!r}; expected one of cholesky, lu, inverse, solve, triangular_solve, factored_solve, qr, eigh, "
        "svd, eig, pinv, pinv_hermitian, lstsq, householder_product, ldl, cholesky_inverse"
    )
