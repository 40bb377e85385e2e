"""The named pattern passes: each scans a Dynamo-captured FX graph (torch-level ops, modules inlined) and
returns the rewrites it can make and, for what it recognised but cannot take, why.

    matches, declined = PASSES["sdpa"](gm)      # list[Match], list[(node, reason)]

A ``Match`` names the original nodes a rewrite replaces (``outputs``, in order) and removes (``nodes``), and
the function of ``tilestack.compile.ops`` that computes the outputs from ``inputs`` and constants. Applying
and checking matches is ``tilestack.compile.rewrite``'s job, so every pass is only a matcher.

A match that an in-place op would change (``s.masked_fill_(m, -inf)`` between the scores and their softmax) is
declined by the backend (``rewrite.written_in_place``).

Passes, in the order they run (a module each, named after its pass family):
- ``sdpa``: ``F.scaled_dot_product_attention`` calls -> ``tilestack::attention_fwd``.
- ``explicit_attention``: ``softmax(q @ k.transpose(-2, -1) * s [+ mask | .masked_fill(cond, -inf) |
  torch.where(keep, ., -inf)]) @ v``; also through casts (the softmax in f32, then back), with a constant 0-d
  tensor as the scale (or the fill: ``torch.tensor(finfo.min)``), or one computed from constants alone
  (``torch.sqrt(torch.tensor(hd))``: ``match.constant_tensor``), the scores scaled in place (``s /= c``), the key
  as ``k.mT`` / ``swapaxes`` / ``permute``, ``scores += mask``, q and k cast up to f32 before their product (Phi-2),
  and in ``torch.einsum``.
- ``add_norm``: ``h = a + b`` followed by LayerNorm / RMSNorm of h -> one fused add + norm kernel.
- ``norm``: the remaining LayerNorm and RMSNorm (without affine parameters too), and RMSNorm written out
  (``x * rsqrt(mean(x^2) + eps) * w``: ``hand_norms``).
- ``linear_epilogue``: ``act(F.linear(x, w, b)) [+ r]`` (or ``x @ W + b``, aten's addmm / mm; act relu, gelu,
  silu) in inference graphs -> one GEMM with the bias, activation and residual add fused into its epilogue.
- ``fp8_chain``: ``tilestack.quantize(..., "fp8-act")`` layers that read the norm or the layer before them ->
  the producer writes their fp8 activations (no quantizing pass of their own).
- ``softmax``: the remaining softmax over the last dim (with no dtype=, or the input's own).
- ``linear_cross_entropy``: ``F.cross_entropy(F.linear(x, w), labels)`` (or ``F.nll_loss(F.log_softmax(...), labels)``)
  in training graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import tilestack.quant.linear  # noqa: F401 - registers tilestack::quant_linear, a head of linear_epilogue
from tilestack.compile.patterns.attention import explicit_attention, sdpa
from tilestack.compile.patterns.cross_entropy import linear_cross_entropy
from tilestack.compile.patterns.epilogue import linear_epilogue
from tilestack.compile.patterns.fp8_chain import FP8_CHAIN_TOLERANCE, fp8_chain
from tilestack.compile.patterns.match import Match, Node, kind, op_name, runs_here, value
from tilestack.compile.patterns.norms import add_norm, norm
from tilestack.compile.patterns.softmax import softmax

__all__ = ["FP8_CHAIN_TOLERANCE", "LEFT_REASONS", "LEFT_UNMATCHED", "PASSES", "Match", "Node", "add_norm",
           "explicit_attention", "fp8_chain", "kind", "linear_cross_entropy", "linear_epilogue", "norm", "op_name",
           "runs_here", "sdpa", "softmax", "value"]

PASSES: dict[str, Callable] = {
    "sdpa": sdpa,
    "explicit_attention": explicit_attention,
    "add_norm": add_norm,
    "norm": norm,
    "linear_epilogue": linear_epilogue,
    "fp8_chain": fp8_chain,
    "softmax": softmax,
    "linear_cross_entropy": linear_cross_entropy,
}

# Why the ops no pass takes stay with Inductor, by op family (the report's "left" section)
LEFT_REASONS = {
    "linear": "no activation or residual add after it to fuse (a lone Linear is cuBLAS's addmm, its bias fused "
              "already), or one the linear_epilogue pass declined (listed above): left to Inductor",
    "matmul": "a plain matrix product: left to Inductor (cuBLAS or its templates)",
    # torch.addmm(bias, x2d, w) (Hugging Face GPT-2's Conv1D) is a Linear written out; a lone one was reported as
    # "no tilestack kernel for it"
    "addmm": "a matrix product with its bias (a Linear written out: GPT-2's Conv1D): no activation or residual add "
             "after it to fuse, or one the linear_epilogue pass declined (listed above): left to Inductor",
    # a tilestack.quantize'd layer with nothing after it to fuse was reported as "no tilestack kernel for it", where
    # the op is tilestack's own quantized GEMM and runs as it is
    "quant_linear": "tilestack's quantized GEMM already (a tilestack.quantize layer): it runs as it is; no activation "
                    "or residual add after it to fuse into its epilogue, or one the linear_epilogue pass declined "
                    "(listed above)",
    # attention written over (B * H, N, hd) with torch.bmm / torch.baddbmm (Megatron, BLOOM, CLIP) was reported as
    # "no tilestack kernel for it", as if there were no attention kernel: the reason is its 3-D form
    "bmm": "a batched matrix product: left to Inductor (cuBLAS); an attention written with bmm / baddbmm over "
           "(B * H, N, hd) is 3-D, and tilestack's attention kernel takes 4-D (B, H, N, D) q, k, v",
    "baddbmm": "a batched matrix product with an add: left to Inductor (cuBLAS); an attention written with bmm / "
               "baddbmm over (B * H, N, hd) is 3-D, and tilestack's attention kernel takes 4-D (B, H, N, D) q, k, v",
    # torch's own attention modules, which Dynamo records as one call without tracing into them
    "multi_head_attention_forward": "nn.MultiheadAttention's forward, which Dynamo keeps whole (not traced into): "
                                    "its attention is not seen by the passes",
    "_native_multi_head_attention": "nn.MultiheadAttention's fused inference path, one torch op: not seen by the "
                                    "passes",
    "_transformer_encoder_layer_fwd": "nn.TransformerEncoderLayer's fused inference path (eval, no grad), one torch "
                                      "op: its attention and norms are not seen by the passes",
    # a convolution (Whisper's front end, a Conv1d over time, ViT's patches) was "no tilestack kernel for it", with no
    # word of where it goes; tilestack.quantize names the same layers as left in float
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
                    "a convolution: tilestack has no convolution kernel (its passes take attention, norms, softmax and "
                    "Linear epilogues), left to Inductor (cuDNN on a GPU)"),
    # a block under torch.utils.checkpoint (Hugging Face's gradient_checkpointing) is one higher-order op whose body
    # is a subgraph of its own; it was reported as "no tilestack kernel for it", silent on the attention inside
    "tag_activation_checkpoint": "a torch.utils.checkpoint region (recomputed in the backward): Dynamo keeps its body "
                                 "as a subgraph the passes do not look into, so its attention, norms and softmax are "
                                 "left to Inductor; without checkpointing they are swapped",
}

# Why an op that no pass matched at all is left, where its family is one the passes fuse elsewhere (after
# LEFT_REASONS and a declined match's own reason): an activation or a log_softmax was "no tilestack kernel for it",
# as if nothing could ever take it, where the GEMM epilogue or the fused cross-entropy takes the same op in another
# place
_EPILOGUE_ACTIVATION = ("an activation the GEMM epilogue takes (relu, gelu, gelu_tanh, silu), but here not applied to "
                        "a 16-bit Linear's output that nothing else reads (after an add or a norm, on an f32 Linear, "
                        "in a graph that needs gradients, or of a Linear declined above): left to Inductor")
_OTHER_ACTIVATION = ("an activation the GEMM epilogue does not have (it fuses relu, gelu, gelu_tanh and silu): left to "
                     "Inductor, which fuses it with its neighbours")
LEFT_UNMATCHED = {
    **dict.fromkeys(("relu", "gelu", "silu"), _EPILOGUE_ACTIVATION),
    **dict.fromkeys(("mish", "hardswish", "hardsigmoid", "hardtanh", "relu6", "elu", "selu", "celu", "leaky_relu",
                     "softplus", "logsigmoid", "tanh", "sigmoid", "Tensor.tanh", "Tensor.sigmoid"), _OTHER_ACTIVATION),
    "log_softmax": "a log_softmax that is not the fused cross-entropy's (linear_cross_entropy takes nll_loss("
                   "log_softmax(a bias-free Linear's logits over the last dim), class-index labels) in training "
                   "graphs; soft targets or a loss written out are not it): left to Inductor",
}
