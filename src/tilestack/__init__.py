"""tilestack: a tile language, a kernel library, and the tools to make AI workloads fast.

    import tilestack
    import tilestack.lang as ts                       # the tile language
    o = tilestack.attention(q, k, v, causal=True)     # a library kernel as a differentiable PyTorch op
    loss = tilestack.fused_linear_cross_entropy(h, lm_head.weight, labels)   # also rms_norm, rotary, swiglu...
    c = tilestack.kernels.gemm(a, b)
    print(tilestack.kernels.gemm_kernel.trace(a, b, c).source())   # what it became
"""

from tilestack import errors
from tilestack.config import knobs

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch-backed parts load on first use, so `import tilestack` (and the CLI) stays light
    if name in ("attention", "scaled_dot_product_attention", "patch"):
        import tilestack.torch
        return getattr(tilestack.torch, name)
    if name in ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "rotary", "swiglu",
                "fused_linear_cross_entropy"):
        import tilestack.torch.ops
        return getattr(tilestack.torch.ops, name)
    if name == "optimize":
        import tilestack.compile
        return tilestack.compile.optimize
    if name == "quantize":
        import tilestack.quant
        return tilestack.quant.quantize
    if name in ("kernels", "lang", "perf", "bench", "ir", "backends", "compile", "quant", "tune", "parallel",
                "federated", "testing"):
        import importlib
        return importlib.import_module(f"tilestack.{name}")
    raise AttributeError(f"module 'tilestack' has no attribute {name!r}")


__all__ = ["add_layer_norm", "add_rms_norm", "attention", "errors", "fused_linear_cross_entropy", "knobs",
           "layer_norm", "optimize", "patch", "quantize", "rms_norm", "rotary", "scaled_dot_product_attention",
           "swiglu"]
