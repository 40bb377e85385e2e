"""Post-training quantization onto tile-language GEMMs: weight-only int8 and fp8 (E4M3) with per-channel
scales, and fp8 weights and activations with activation scales calibrated on sample batches.

    qmodel = tilestack.quantize(model, "int8")                          # or "fp8"
    qmodel = tilestack.quantize(model, "fp8-act", calibration=batches)
    y = tilestack.quant.quantized_linear(x, q, scale, bias, x_scale=None)   # the GEMM itself
    err = tilestack.quant.accuracy_cost(model, qmodel, batches)             # what it cost
"""

from tilestack.quant.accuracy import accuracy_cost
from tilestack.quant.gemm import (
    qgemm_act_kernel,
    qgemm_fp8_out_kernel,
    qgemm_kernel,
    qgemm_wonly_kernel,
    quantize_fp8_kernel,
    quantize_weight,
    quantized_linear,
)
from tilestack.quant.linear import InputStats, QuantLinear, calibrate, quantize

__all__ = ["InputStats", "QuantLinear", "accuracy_cost", "calibrate", "qgemm_act_kernel", "qgemm_fp8_out_kernel",
           "qgemm_kernel", "qgemm_wonly_kernel", "quantize", "quantize_fp8_kernel", "quantize_weight",
           "quantized_linear"]
