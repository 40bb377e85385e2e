import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.perf import formulas


def test_matmul_counts_two_flops_per_mac():
    c = formulas.matmul(128, 256, 64, "bf16")
    assert c.flops == 2 * 128 * 256 * 64
    assert c.bytes_read == (128 * 64 + 64 * 256) * 2
    assert c.bytes_written == 128 * 256 * 2
    assert c.intensity == pytest.approx(c.flops / (c.bytes_read + c.bytes_written))


def test_attention_forward_backward_causal_and_gqa():
    b, h, n, d = 2, 8, 1024, 128
    fwd = formulas.attention(b, h, n, n, d, "bf16")
    assert fwd.flops == 4 * b * h * n * n * d
    assert formulas.attention(b, h, n, n, d, "bf16", causal=True).flops == fwd.flops / 2
    assert formulas.attention(b, h, n, n, d, "bf16", backward=True).flops == 2.5 * fwd.flops
    gqa = formulas.attention(b, h, n, n, d, "bf16", kv_heads=2)
    assert gqa.flops == fwd.flops and gqa.bytes_read < fwd.bytes_read
    with pytest.raises(LaunchError, match="kv_heads=3"):
        formulas.attention(b, h, n, n, d, kv_heads=3)


def test_sdpa_reads_shapes_off_tensors():
    q = torch.empty(1, 4, 64, 32, dtype=torch.float16, device="meta")
    k = v = torch.empty(1, 2, 128, 32, dtype=torch.float16, device="meta")
    assert formulas.sdpa(q, k, v) == formulas.attention(1, 4, 64, 128, 32, "fp16", kv_heads=2)
    with pytest.raises(LaunchError, match="expected 4 dims"):
        formulas.sdpa(q[0], k, v)


def test_norms_softmax_elementwise():
    assert formulas.layernorm(4, 8, "fp32").flops == 8 * 32
    assert formulas.rmsnorm(4, 8, "fp32").bytes_written == 4 * 8 * 4
    assert formulas.softmax(2, 3, "bf16").bytes == 2 * 2 * 3 * 2
    copy = formulas.elementwise(1000, "fp32", flops_per_element=0)
    assert copy.flops == 0 and copy.bytes == 8000 and copy.intensity == 0
    assert (copy + copy).bytes == 16000 and copy.scaled(3).bytes_read == 12000


@pytest.mark.parametrize("dtype,name,size", [(torch.bfloat16, "bf16", 2), ("fp32", "fp32", 4),
                                              (torch.float8_e4m3fn, "fp8", 1), ("float64", "fp64", 8)])
def test_dtype_names(dtype, name, size):
    assert formulas.dtype_name(dtype) == name and formulas.dtype_bytes(dtype) == size


def test_bad_sizes_and_dtypes_name_the_argument():
    with pytest.raises(LaunchError, match="m=0"):
        formulas.matmul(0, 1, 1)
    with pytest.raises(LaunchError, match="dtype='fp7'"):
        formulas.dtype_bytes("fp7")
