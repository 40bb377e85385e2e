"""The functions the rewritten graphs call: each takes tensors and constants, calls tilestack's ops
(``tilestack::*``, with fake implementations and autograd, so AOT autograd traces forward and backward
through them), and returns what the nodes it replaced returned. The differentiable ops are registered by
``tilestack.torch._library.autograd_op``, the inference-only ones by ``_inference_op`` below: both through
``torch.library.Library``, not ``torch.library.custom_op``, whose Python layers cost a compiled graph
microseconds per call (``docs/inference.md``, sessions 13 and 14). Module-level functions, so a printed graph
names them and FX code generation can refer to them.

Softmax has no op in ``tilestack.torch`` yet; ``tilestack::softmax`` here wraps ``tilestack.kernels.softmax``
with the usual backward, dx = y * (dy - sum(dy * y)), left to torch (Inductor fuses it).
``tilestack::linear_epilogue`` wraps ``tilestack.kernels.gemm`` with its fused epilogue; it has no backward (the
``linear_epilogue`` pass takes inference graphs only).
"""

from __future__ import annotations

import math

import torch

from tilestack.kernels.gemm import gemm as _gemm
from tilestack.kernels.softmax import softmax as _softmax_kernel
from tilestack.quant.gemm import quantized_linear as _quantized_linear
from tilestack.quant.producers import norm_fp8 as _norm_fp8
from tilestack.torch._library import autograd_op
from tilestack.torch.attention import attention_fwd_op
from tilestack.torch.ops import (
    add_layer_norm_fwd_op,
    add_rms_norm_fwd_op,
    fused_linear_cross_entropy_op,
    layer_norm_fwd_op,
    rms_norm_fwd_op,
)

_LIB = torch.library.Library("tilestack", "FRAGMENT")


def _inference_op(name: str, schema: str):
    """Decorator: ``fn`` registered as the op ``tilestack::<name><schema>`` for every device
    (CompositeExplicitAutograd), without autograd (an inference graph's op: the passes that make these swap
    only graphs without gradients); returns the op. Registered through ``torch.library.Library`` rather than
    ``torch.library.custom_op``: the latter's Python wrapper (its autograd layer, even under no_grad, and the
    redispatch) cost about 8 us per call on this CPU (``scripts/host_overhead_cpu.py --only linear_epilogue``:
    24.9 us per call before, 16.8 after, the GEMM under it 11 us), and a compiled graph pays that per swapped op.
    Fake implementations go through ``torch.library.register_fake`` as before."""
    def register(fn):
        try:
            _LIB.define(name + schema)
        except RuntimeError as e:          # a second import of this module in one process: already there
            if "already" not in str(e) and "multiple times" not in str(e):
                raise
        else:
            _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.tilestack, name).default
    return register


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    yf, dyf = y.float(), dy.float()
    return (yf * (dyf - (dyf * yf).sum(-1, keepdim=True))).to(y.dtype)


@autograd_op("softmax", fake=lambda x: torch.empty_like(x, memory_format=torch.contiguous_format),
             setup_context=_softmax_setup, backward=_softmax_backward)
def softmax_op(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of x (any leading dims), in x's dtype, f32 arithmetic. An empty last dim (the
    scores over no key: a cross-attention to an empty memory) gives an empty result, as torch's."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])   # (M, N); reshape(-1, 0) cannot tell M
    return _softmax_kernel(rows.contiguous()).view(x.shape)


@_inference_op("linear_epilogue", "(Tensor x, Tensor w, Tensor? bias, Tensor? residual, str? activation, "
                "bool w_is_kn) -> Tensor")
def linear_epilogue_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                       activation: str | None, w_is_kn: bool) -> torch.Tensor:
    """activation(x @ W + bias) + residual in one GEMM: x (..., K); W is w.T for a Linear's weight w (N, K), or
    w itself (K, N) with ``w_is_kn``; bias (N,), residual (..., N); the result (..., N) in x's dtype. K = 0 (a Linear
    of no input feature) is activation(bias) + residual, as torch's."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])              # (M, K); reshape(-1, 0) cannot tell M
    b = w if w_is_kn else w.t()                                          # (K, N); a weight's .t() is read as is
    n = b.shape[1]
    res = None if residual is None else residual.reshape(rows.shape[0], n)   # (M, N)
    return _gemm(rows, b, bias=bias, activation=activation, residual=res).view(*x.shape[:-1], n)


@torch.library.register_fake("tilestack::linear_epilogue")
def _(x, w, bias, residual, activation, w_is_kn):
    return x.new_empty((*x.shape[:-1], w.shape[1] if w_is_kn else w.shape[0]))


@_inference_op("quant_linear_epilogue", "(Tensor x, Tensor q, Tensor scale, Tensor? bias, Tensor? residual, "
                "float x_scale, str? activation) -> Tensor")
def quant_linear_epilogue_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                             residual: torch.Tensor | None, x_scale: float, activation: str | None) -> torch.Tensor:
    """``tilestack::quant_linear`` (x (M, K), q (N, K) 8-bit, x_scale 0: weight-only) with the epilogue: the
    activation, then residual ((M, N) in any shape of as many elements) added; (M, N) in x's dtype."""
    res = None if residual is None else residual.reshape(x.shape[0], q.shape[0])
    return _quantized_linear(x, q, scale, bias, x_scale=x_scale or None, activation=activation, residual=res)


@torch.library.register_fake("tilestack::quant_linear_epilogue")
def _(x, q, scale, bias, residual, x_scale, activation):
    return x.new_empty((x.shape[0], q.shape[0]))


@_inference_op("norm_fp8", "(Tensor x, Tensor? r, Tensor weight, Tensor? bias, float eps, float x_scale) -> "
                "(Tensor, Tensor)")
def norm_fp8_op(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                eps: float, x_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y8, h): the norm (layer norm with a bias, RMS norm without) of x [+ r] over its last dim, written as the
    next layer's fp8 activations, y8 (M, N) float8_e4m3fn = fp8(norm / x_scale); h = x + r shaped as x (empty
    without r). ``tilestack.quant.producers.norm_fp8``."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    y8, h = _norm_fp8(rows, weight, bias, eps, x_scale, residual=None if r is None else r.reshape(-1, n))
    return y8, (x.new_empty(0) if h is None else h.view(x.shape))


@torch.library.register_fake("tilestack::norm_fp8")
def _(x, r, weight, bias, eps, x_scale):
    n = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), n)        # (M, N): h is laid out like it, as the kernel makes h
    return (x.new_empty((x.numel() // max(n, 1), n), dtype=torch.float8_e4m3fn),
            x.new_empty(0) if r is None else torch.empty_like(rows).view(x.shape))


@_inference_op("quant_linear_fp8", "(Tensor x, Tensor q, Tensor scale, Tensor? bias, Tensor? residual, "
                "float x_scale, str? activation, float out_scale, ScalarType out_dtype) -> Tensor")
def quant_linear_fp8_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None, x_scale: float, activation: str | None, out_scale: float,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """An fp8 linear layer of a chain: x (M, K) in fp8 (its producer quantized it with x_scale) or float
    (quantized here); (M, N) in float8_e4m3fn quantized with ``out_scale`` (> 0: the next layer's x_scale),
    else in ``out_dtype``. The epilogue (bias, activation, residual ((M, N) in any shape)) on the accumulator."""
    res = None if residual is None else residual.reshape(x.shape[0], q.shape[0])
    fp8_x = x.dtype == torch.float8_e4m3fn
    if out_scale > 0:
        return _quantized_linear(x, q, scale, bias, x_scale=x_scale, activation=activation, residual=res,
                                 out_scale=out_scale)
    y = _quantized_linear(x, q, scale, bias, x_scale=x_scale, activation=activation, residual=res,
                          out_dtype=out_dtype if fp8_x else None)
    return y if y.dtype == out_dtype else y.to(out_dtype)


@torch.library.register_fake("tilestack::quant_linear_fp8")
def _(x, q, scale, bias, residual, x_scale, activation, out_scale, out_dtype):
    return x.new_empty((x.shape[0], q.shape[0]), dtype=torch.float8_e4m3fn if out_scale > 0 else out_dtype)


def _viewed(y, shape):
    return y if shape is None else y.view(shape)


def ts_linear_epilogue(x, w, bias, residual, activation: str | None, w_is_kn: bool, shape=None):
    """The fused Linear; ``shape``: the static view the replaced nodes ended with (None: none)."""
    return _viewed(linear_epilogue_op(x, w, bias, residual, activation, w_is_kn), shape)


def ts_quant_linear_epilogue(x, q, scale, bias, residual, x_scale: float, activation: str | None, shape=None):
    return _viewed(quant_linear_epilogue_op(x, q, scale, bias, residual, x_scale, activation), shape)


def ts_quant_linear_epilogue_of_rows(x, q, scale, bias, residual, x_scale: float, activation: str | None):
    """The fused quantized Linear of x (..., K): its rows (M, K) and the view of the result back to (..., N) made
    from x's sizes when it runs (QuantLinear's, whose sizes are symbolic under dynamic shapes)."""
    rows = x.reshape(-1, x.shape[-1])                                                   # (M, K)
    return quant_linear_epilogue_op(rows, q, scale, bias, residual, x_scale, activation).view(*x.shape[:-1],
                                                                                            q.shape[0])


def ts_attention(q, k, v, mask, mask_is_fill: bool, causal: bool, scale: float, finite_fill: bool = False,
                 added_in: torch.dtype = torch.float32, k_transposed: bool = False):
    """softmax(q @ k^T * scale + mask) @ v on (B, H, N, D) tensors. ``mask``: None, an additive or boolean
    (True = attend) mask, or, with ``mask_is_fill``, the condition of ``masked_fill(cond, low)`` (True =
    masked), which is inverted here. ``finite_fill``: the graph set masked scores to a finite lowest value
    (``finfo.min``, Hugging Face's form) rather than -inf. A row with every key masked is then a softmax over equal
    values: uniform, the mean of v, with no gradient to q or k (the fill replaced the scores) and 1/N of dO to
    each v. The kernel gives such a row 0, as for a row that sees no key, so those rows are set to the mean of v
    here, which has exactly those gradients. (With a -inf fill the graph gives NaN there and the kernel 0, as
    torch's SDPA does.) An additive mask of finfo.min over a whole row (Hugging Face's, left padding) is the same
    uniform softmax in eager, with gradients to q and k too: ``_absorbed_rows``, ``_uniform_attention``. ``added_in``:
    the dtype the graph adds an additive mask to the scores in (f32 for torch's SDPA, which adds in f32 whatever its
    inputs; the scores' dtype for an add written out), which says how large a bias swallows the scores.
    ``k_transposed``: k is given as k^T, (B, H, D, Nk) (OpenAI's Whisper permutes its keys straight to that)."""
    if k_transposed:
        k = k.transpose(-2, -1)                              # (B, H, Nk, D), a view
    keep = mask
    if mask is not None and mask_is_fill:
        keep = torch.logical_not(mask)
    absorbed = None
    # no key at all (Nk = 0: a cross-attention to an empty memory): eager's softmax over no key is empty and its
    # product with v 0, the kernel's 0; no row is absorbed, none averages v (the mean of no value is NaN), and the
    # mask's largest value over no key does not exist (amax raised)
    keyless = k.shape[-2] == 0
    if keep is not None and keep.dtype != torch.bool and not causal and not keyless:
        absorbed = _absorbed_rows(keep, added_in)
        keep = keep.masked_fill(absorbed, -math.inf)        # the kernel sees no key there (0, no gradient)
    out = attention_fwd_op(q, k, v, keep, causal, scale, "top_left")[0]
    if keep is not None and finite_fill and keep.dtype == torch.bool and not keyless:
        sees_none = torch.logical_not(keep.any(-1, keepdim=True))           # (.., Nq, 1), broadcast over D
        out = torch.where(sees_none, v.mean(-2, keepdim=True).to(out.dtype), out)
    elif absorbed is not None:
        out = torch.where(absorbed, _uniform_attention(q, k, v, scale).to(out.dtype), out)
    return out


# Attention's scores are of order 1-10: a bias that swallows every score below this in magnitude swallows a row's
ABSORBED_SCORE = 16.0


def absorbing_bias(dtype: torch.dtype) -> float:
    """The bias at or below which s + bias, added in ``dtype``, rounds to the bias for every |s| < ``ABSORBED_SCORE``
    (half the bias's ulp there): -2^28 (-2.7e8) in f32, -4096 in bf16, -32768 in f16 (whose finfo.min, -65504, is
    Hugging Face's fp16 mask value: its left-padded rows were left to the kernel, which adds in f32 and gave their
    softmax(s) where eager's f16 add gives a uniform softmax, 0.98 off)."""
    return -2.0 * ABSORBED_SCORE / torch.finfo(dtype).eps          # eps = 2^-(mantissa bits): the ulp of 1


def _absorbed_rows(bias, added_in: torch.dtype):
    """(.., Nq, 1): the query rows whose every key has one bias at or below ``absorbing_bias(added_in)`` (finfo.min:
    Hugging Face's additive masks, in a left-padded query row; the -1e9 of others, the -1e4 of older code in bf16).
    Eager's scores there all round to the bias, so its softmax is uniform. The kernel would fold the bias into its
    log2-domain f32 scores, where finfo.min overflows to -inf (a row that sees no key: 0), a finite one in f32
    leaves a log-sum-exp that has lost log(Nk) (a backward of garbage), and one from a 16-bit add is not absorbed
    at all (the row's softmax(s)). A row of -inf biases is not one (the kernel's 0; eager's NaN), nor one of unequal
    lowest biases (eager's averages its highest keys)."""
    top = bias.amax(-1, keepdim=True)
    return (top <= absorbing_bias(added_in)) & (top > -math.inf) & (top == bias.amin(-1, keepdim=True))


def _uniform_attention(q, k, v, scale: float):
    """(B, H, 1 or Nq, Dv): eager's attention at uniform probabilities, the mean of v, with its gradients: 1/Nk of dO to
    each v, and to q and k the softmax's, dS_ij = dO_i . (v_j - mean v) / Nk. Those come from terms exactly 0 in
    value, (q - q.detach()) @ K^T (V - mean V) and its k twin: products of rank D, no (Nq, Nk) matrix."""
    group = q.shape[1] // k.shape[1]                                             # query heads per key/value head
    v_mean = v.mean(-2, keepdim=True)                                            # (B, Hkv, 1, Dv)
    uniform = v_mean.repeat_interleave(group, dim=1)                             # (B, H, 1, Dv)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        centred = (v - v_mean).detach()                                          # (B, Hkv, Nk, Dv)
        k_const = k.detach()
        kv_q = (k_const.transpose(-2, -1) @ centred).repeat_interleave(group, dim=1)        # (B, H, D, Dv)
        kv_k = ((k - k_const).transpose(-2, -1) @ centred).repeat_interleave(group, dim=1)  # 0, k's gradient
        zero = ((q - q.detach()) @ kv_q + q.detach() @ kv_k) * (scale / k.shape[-2])       # (B, H, Nq, Dv)
        uniform = uniform + zero
    return uniform


def _affine(x, weight, bias=None, layer: bool = False):
    """A norm's (weight, bias) for the kernels, which take both (a layer norm) or the weight: ones and zeros of
    x's last dim where the model has none (``elementwise_affine=False``, ``bias=False``, an RMSNorm written out
    without a weight)."""
    if weight is None:
        weight = torch.ones(x.shape[-1], dtype=x.dtype if bias is None else bias.dtype, device=x.device)
    if layer and bias is None:
        bias = torch.zeros(x.shape[-1], dtype=weight.dtype, device=x.device)
    return weight, bias


def ts_layer_norm(x, weight, bias, eps: float):
    return layer_norm_fwd_op(x, *_affine(x, weight, bias, layer=True), eps)[0]


def ts_rms_norm(x, weight, eps: float):
    return rms_norm_fwd_op(x, _affine(x, weight)[0], eps)[0]


def ts_add_layer_norm(x, r, weight, bias, eps: float):
    """(h, y): h = x + r, y = layer_norm(h), in that order (the order of the nodes they replace)."""
    y, h, _, _ = add_layer_norm_fwd_op(x, r, *_affine(x, weight, bias, layer=True), eps)
    return h, y


def ts_add_rms_norm(x, r, weight, eps: float):
    """(h, y): h = x + r, y = rms_norm(h)."""
    y, h, _ = add_rms_norm_fwd_op(x, r, _affine(x, weight)[0], eps)
    return h, y


def ts_softmax(x):
    return softmax_op(x)


def ts_linear_cross_entropy(x, weight, labels, ignore_index: int):
    """Mean cross-entropy of x @ weight^T against labels: x (T, d) (or (..., d), its leading dims taken as the
    T rows: the logits flattened to rows in the loss, ``patterns.cross_entropy._rows_view``), weight (V, d),
    labels (T,)."""
    if x.dim() > 2:
        x = x.reshape(-1, x.shape[-1])
    return fused_linear_cross_entropy_op(x, weight, labels, ignore_index)[0]


def ts_fp8_chain(*args):
    """Chains of fp8 linear layers, each layer writing the next one's fp8 activations, after the norm that feeds
    their first layers (or none): ``args`` = (x, r, weight, bias) of the norm (r, weight, bias None where absent;
    x the first layer's input rows without a norm), then (q, scale, bias, residual) per layer, chain after chain,
    then ``spec`` = (norm: "layer", "rms" or None, eps, per chain ((x_scale, activation[, from_h]), ...), per
    chain the output dtype, per chain the output's static view or None); ``from_h``: the layer's residual is h = x + r,
    the norm's own sum (a pre-norm block's MLP with no norm after it: out = h + mlp(norm(h))), its residual
    tensor None. Every chain's first layer reads the one fp8 tensor the norm writes (their x_scales are equal).
    Returns h = x + r first where the norm adds a residual, then each chain's last output."""
    *tensors, spec = args
    norm, eps, chains, out_dtypes, shapes = spec
    x, r, weight, bias = tensors[:4]
    h = None
    if norm is not None:
        y8, h = norm_fp8_op(x, r, weight, bias if norm == "layer" else None, eps, chains[0][0][0])
    else:
        y8 = x
    outs, at = [], 4
    for layers, out_dtype, shape in zip(chains, out_dtypes, shapes, strict=True):
        y = y8
        for i, (x_scale, activation, *from_h) in enumerate(layers):        # from_h may be left out: False
            q, scale, lbias, residual = tensors[at: at + 4]
            residual = h if from_h and from_h[0] else residual
            at += 4
            out_scale = layers[i + 1][0] if i + 1 < len(layers) else 0.0
            y = quant_linear_fp8_op(y, q, scale, lbias, residual, x_scale, activation, out_scale, out_dtype)
        outs.append(_viewed(y, shape))
    if norm is not None and r is not None:
        outs.insert(0, h)
    return tuple(outs) if len(outs) > 1 else outs[0]
