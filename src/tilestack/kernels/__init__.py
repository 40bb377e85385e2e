"""The kernel library, written in the tile language. Each module holds a kernel's tile source, a plain
PyTorch reference, its tunable domain, and the public function that checks arguments and launches it.

    from tilestack.kernels import gemm, softmax, layer_norm, attention_forward
"""

from tilestack.kernels.attention_fwd import attention_forward, attention_fwd_kernel
from tilestack.kernels.gemm import gemm, gemm_kernel
from tilestack.kernels.layernorm import layer_norm, layer_norm_kernel
from tilestack.kernels.softmax import softmax, softmax_kernel

__all__ = ["attention_forward", "attention_fwd_kernel", "gemm", "gemm_kernel", "layer_norm",
           "layer_norm_kernel", "softmax", "softmax_kernel"]
