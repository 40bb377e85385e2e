"""The kernel library, written in the tile language. Each module holds a kernel's tile source, a plain
PyTorch reference, its tunable domain, and the public function that checks arguments and launches it.

    from tilestack.kernels import gemm, softmax, layer_norm, attention_forward
"""

from tilestack.kernels.attention_fwd import attention_forward, attention_fwd_kernel
from tilestack.kernels.cross_entropy import ce_grad_kernel, fused_linear_cross_entropy
from tilestack.kernels.gemm import gemm, gemm_kernel
from tilestack.kernels.layernorm import layer_norm, layer_norm_kernel
from tilestack.kernels.layernorm_bwd import layer_norm_backward, norm_bwd_kernel
from tilestack.kernels.rmsnorm import (
    add_layer_norm,
    add_rms_norm,
    norm_fwd_kernel,
    rms_norm,
    rms_norm_backward,
    rms_norm_kernel,
)
from tilestack.kernels.rotary import rotary, rotary_kernel, rotary_tables
from tilestack.kernels.softmax import softmax, softmax_kernel
from tilestack.kernels.swiglu import swiglu, swiglu_backward, swiglu_bwd_kernel, swiglu_fwd_kernel

__all__ = ["attention_forward", "attention_fwd_kernel", "gemm", "gemm_kernel", "layer_norm",
           "layer_norm_kernel", "softmax", "softmax_kernel",
           "add_layer_norm", "add_rms_norm", "ce_grad_kernel", "fused_linear_cross_entropy", "layer_norm_backward",
           "norm_bwd_kernel", "norm_fwd_kernel", "rms_norm", "rms_norm_backward", "rms_norm_kernel", "rotary",
           "rotary_kernel", "rotary_tables", "swiglu", "swiglu_backward", "swiglu_bwd_kernel", "swiglu_fwd_kernel"]
