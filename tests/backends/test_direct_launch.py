"""The Triton launcher's direct path (``_DirectLaunch``) hands the compiled kernel's C launcher exactly the
arguments Triton's own ``CompiledKernel.run`` would, on a stand-in for Triton 3.6's launcher built from Triton's
real descriptor-expanding wrapper. (On a GPU the path runs for real: scripts/bench_host_cost.py checks results
against SDPA after thousands of direct launches.)"""

import types

import pytest
import torch
import triton.backends.nvidia.driver as nvidia_driver

import tilestack.backends.triton.launch as launch
from tilestack.kernels.gemm import gemm_kernel


def fake_encode(desc, meta):
    """make_tensordesc_arg without a driver: the 'descriptor' names the address, block and swizzle."""
    return [("tma", desc.base.data_ptr(), tuple(desc.block_shape), meta["swizzle"]), *desc.shape, *desc.strides]


def stand_in_compiled(launcher, calls):
    """A CompiledKernel-like object whose C launcher records what it is given."""
    signature, n_desc = {}, 0
    for pos, value in enumerate(launcher.template):
        if any(p == pos for p, *_ in launcher.descriptors):
            signature[pos] = "tensordesc<bf16[64,64]>"
            n_desc += 1
        else:
            signature[pos] = "*bf16" if value is None else "i32"
    meta = [{"swizzle": 128 + i} for i in range(n_desc)]
    raw = lambda *args: calls.append(args)  # noqa: E731
    run = types.SimpleNamespace(global_scratch_size=0, profile_scratch_size=0, launch_cooperative_grid=False,
                                launch_pdl=False, launch=nvidia_driver.wrap_handle_tensordesc(raw, signature, meta))
    return types.SimpleNamespace(run=run, function=1234, packed_metadata=(4, 1, 1),
                                 metadata=types.SimpleNamespace(tensordesc_meta=meta))


def test_direct_launch_passes_what_triton_would(monkeypatch):
    monkeypatch.setattr(nvidia_driver, "make_tensordesc_arg", fake_encode)
    a = torch.randn(96, 64, dtype=torch.bfloat16)
    b = torch.randn(64, 80, dtype=torch.bfloat16)
    c = torch.empty(96, 80, dtype=torch.bfloat16)
    traced = gemm_kernel.trace(a, b, c, BM=32, BN=32, BK=32)
    launcher = launch.prepare(traced, (a, b, c))
    assert launcher.descriptors, "the interpreter's launcher uses TMA descriptors for whole tiles"
    launcher.label = "tilestack:gemm"
    calls: list = []
    compiled = stand_in_compiled(launcher, calls)
    direct = launch._DirectLaunch(launcher, compiled, 0)
    assert direct is not None
    direct.stream = lambda device: 77
    direct.nvtx = (lambda label: None, lambda: None, "x")

    for _ in range(2):   # the second call takes the encoded descriptors from the cache
        direct(launcher.grid, (a, b, c))
        # Triton's way: CompiledKernel.run -> CudaLauncher.__call__ -> the wrapper -> the C launcher
        compiled.run.launch(*launcher.grid, 77, 1234, False, False, None, None, (4, 1, 1), None, None, None,
                            *launcher.flat((a, b, c)))
        ours, theirs = calls[-2], calls[-1]
        # a tensor goes to the C launcher as its address (Triton's launcher would call data_ptr() on it)
        assert ours == tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in theirs)
        assert not any(isinstance(a, torch.Tensor) for a in ours)
    assert all(len(cache) == 1 for *_, cache in direct.tma)


def test_direct_launch_declines_what_it_was_not_written_for():
    a = torch.randn(32, 32, dtype=torch.bfloat16)
    launcher = launch.prepare(gemm_kernel.trace(a, a, a, BM=32, BN=32, BK=32), (a, a, a))
    launcher.label = "x"
    scratch = stand_in_compiled(launcher, [])
    scratch.run.global_scratch_size = 1024   # scratch memory: Triton's own path must allocate it
    assert launch._DirectLaunch(launcher, scratch, 0) is None


@pytest.mark.parametrize("hooked", (False, True))
def test_profiler_hooks_send_launches_through_triton(hooked, monkeypatch):
    import triton

    rt = triton.knobs.runtime
    hook = lambda metadata: None  # noqa: E731
    if hooked:
        rt.launch_enter_hook.add(hook)
    try:
        assert launch._hooks() is hooked
    finally:
        rt.launch_enter_hook.remove(hook)
