"""fp16 launches use the bf16 table (same tile sizes) and back; other signatures do not borrow."""

from unittest import mock

from tilestack.tune import lookup

H100 = "NVIDIA H100 80GB HBM3"


def test_fp16_borrows_the_bf16_table():
    with mock.patch.object(lookup, "device_name", lambda d: H100):
        bf16 = lookup.launch_config("attention_bwd_dkdv", "bfloat16-D128-full", "cuda", 4096, {"sentinel": 1})
        fp16 = lookup.launch_config("attention_bwd_dkdv", "float16-D128-full", "cuda", 4096, {"sentinel": 1})
        gemm16 = lookup.launch_config("gemm", "float16", "cuda", 4096, {})
    assert bf16 == fp16 and "BM" in fp16 and fp16["sentinel"] == 1
    assert gemm16["BN"] == 256                                   # the bf16 GEMM table, no suffix


def test_an_unknown_signature_gets_the_default():
    with mock.patch.object(lookup, "device_name", lambda d: H100):
        assert lookup.launch_config("attention_fwd", "float32-D128-full", "cuda", 4096, {"d": 1}) == {"d": 1}
    assert lookup.launch_config("attention_fwd", "bfloat16-D128-full", "cpu", 4096, {"d": 2}) == {"d": 2}
