"""The Gluon launcher's direct path: after the first launch, calls go straight to the compiled kernel's C launcher
(the Triton backend's ``_DirectLaunch``) instead of Gluon's JIT, which costs 60-85 us of Python per call (three
descriptor objects, argument binding, three encodings). Checked on the CPU: the kernel is the real one compiled
for sm_90a through Gluon's JIT (a stand-in driver answers "sm_90"), with its real signature and descriptor
metadata; only the C launcher at the end records what it is given instead of launching."""

import types

import pytest
import torch
import triton.backends.nvidia.driver as nvidia_driver

import tilestack.backends.triton.launch as triton_launch
from tilestack.backends import get_backend
from tilestack.backends.gluon import aot
from tilestack.backends.gluon.launch import Binding
from tilestack.quant.gemm import qgemm_act_kernel

STREAM, FUNCTION, PACKED = 77, 1234, (8, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def _ptxas():
    try:
        aot.tool("ptxas")
    except aot.ToolMissing as e:
        pytest.skip(str(e))


def fake_encode(desc, meta):
    """make_tensordesc_arg without a driver: the 'descriptor' names the address, box and swizzle."""
    return [("tma", desc.base.data_ptr(), tuple(desc.block_shape), meta["swizzle"]), *desc.shape, *desc.strides]


def _fp8_args(m=256, k=128, n=512):
    x = torch.randn(m, k).bfloat16()
    q = torch.randn(n, k).to(torch.float8_e4m3fn)
    s = torch.rand(n)
    return x, q, s, s, s, torch.empty(m, n, dtype=torch.bfloat16), 0.5, 2.0


def test_direct_launch_passes_what_gluons_jit_would(hopper_jit, monkeypatch):
    monkeypatch.setattr(nvidia_driver, "make_tensordesc_arg", fake_encode)
    args = _fp8_args()
    traced = qgemm_act_kernel.trace(*args)
    be = get_backend("gluon")
    art = be.compile(traced, be.options(traced.constants, {**qgemm_act_kernel.options, "persistent": True}), True)
    binding = Binding(traced, args, art.lowered)
    assert len(binding.descriptors) == 3 and binding.pointers     # X, W, Y by the copy engine; S by pointer
    k = art.fn.run(*binding(args), grid=(1,), warmup=True, num_warps=art.lowered.num_warps)   # sm_90a, no launch
    meta = k.metadata.tensordesc_meta
    assert meta and len(meta) == len(binding.descriptors)          # else the direct path declines on a GPU

    calls: list = []
    run = types.SimpleNamespace(global_scratch_size=0, profile_scratch_size=0, launch_cooperative_grid=False,
                                launch_pdl=False,
                                launch=nvidia_driver.wrap_handle_tensordesc(lambda *a: calls.append(a),
                                                                            k.src.signature, meta))
    compiled = types.SimpleNamespace(run=run, function=FUNCTION, packed_metadata=PACKED, metadata=k.metadata)
    binding.label = "tilestack:qgemm_act_kernel"
    direct = triton_launch._DirectLaunch(binding, compiled, 0)
    assert direct is not None
    direct.stream = lambda device: STREAM
    direct.nvtx = (lambda label: None, lambda: None, "x")

    grid = (2, 1, 1)
    for _ in range(2):   # the second call takes the encoded descriptors from the cache
        direct(grid, args)
        # Gluon's JIT way: CompiledKernel.run -> CudaLauncher -> the descriptor wrapper -> the C launcher
        run.launch(*grid, STREAM, FUNCTION, False, False, None, None, PACKED, None, None, None, *binding(args))
        ours, theirs = calls[-2], calls[-1]
        # a tensor goes to the C launcher as its address (Gluon's launcher would call data_ptr() on it)
        assert ours == tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in theirs)
    assert all(len(cache) == 1 for *_, cache in direct.tma)


def test_persistent_fp8_gemm_keeps_one_wgmma_in_flight():
    # the Gluon fp8-act kernel's mainloop is not what makes it slow: ptxas keeps a QGMMA in flight (no C7515
    # serialization, unlike the Triton backend's fp8 kernels at BN=128/256: docs/inference.md)
    import re
    args = _fp8_args()
    be = get_backend("gluon")
    traced = qgemm_act_kernel.trace(*args)
    k = be.aot(traced, be.options(traced.constants, {**qgemm_act_kernel.options, "persistent": True}))
    res, sass = aot.resources(k), aot.sass(k)
    assert res["spill_stores"] == res["spill_loads"] == 0 and "bytes spill stores" in res["report"]
    assert "C7515" not in res["report"]                              # ptxas: wgmma not serialized
    assert "QGMMA.64x256x32.F32.E4M3.E4M3" in sass
    waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x\d)", sass)
    assert "0x1" in waits                                            # one wgmma left in flight in the loop
