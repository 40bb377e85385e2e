"""What ptxas makes of the Triton backend's fp8 GEMMs for sm_90a, compiled on the CPU (no GPU). A K loop that may
run zero times has its wgmma chain serialized (ptxas C7515, a ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after every QGMMA):
the zero-trip path writes the accumulator with plain moves, which reach the wgmma wait after the loop. The quant
kernels bound the trip count below by 1 (``ts.smax(ts.cdiv(K, BK), 1)``; at K = 0 the one trip loads zeros), and
keep a wgmma in flight; the same source without the bound is serialized again.
docs/inference.md, "fp8 GEMM: what the SASS shows", has the numbers."""

import os
import re
import subprocess
import tempfile

import pytest
import torch

from tilestack.tune import aot

M, K, N = 8192, 768, 2304                  # GPT-2's c_attn at B x N = 8 x 1024 rows


@pytest.fixture(scope="module", autouse=True)
def _tools():
    reason = aot.missing_tools()
    if reason:
        pytest.skip(reason)


def compile_sm90a(kernel, args, edit=lambda source: source) -> tuple[str, str]:
    """(ptxas's report, SASS) of ``kernel`` launched on ``args`` (meta tensors) with its default config, the
    generated Triton source passed through ``edit`` first."""
    import triton
    from triton.backends.compiler import GPUTarget

    from tilestack.backends.triton import BACKEND, codegen

    traced = kernel.trace(*args)
    opts = BACKEND.options(traced.constants, kernel.options).launch_kwargs()
    low = codegen.generate(traced.ir, interpret=False, tma=True, index64=frozenset())
    sig, attrs, constants = aot._signature(low, traced.ir, args, aot._arg_names(low.source, low.fn_name))
    src = triton.compiler.ASTSource(fn=aot._jit(edit(low.source), low.fn_name), signature=sig,
                                    constexprs=constants, attrs=attrs)
    k = triton.compile(src, target=GPUTarget(*aot.SM90A), options=opts)
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        report = subprocess.run([str(aot.tools_dir() / "ptxas"), "--gpu-name=sm_90a", "-v", ptx, "-o",
                                 os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(aot.tools_dir() / "cuobjdump"), "--dump-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
    return report, sass


def _act_args():
    meta = dict(device="meta")
    s = torch.empty(N, **meta)
    return (torch.empty(M, K, dtype=torch.bfloat16, **meta), torch.empty(N, K, dtype=torch.float8_e4m3fn, **meta),
            s, s, s, torch.empty(M, N, dtype=torch.bfloat16, **meta), 1.0, 1.0)


def _zero_trips_allowed(source: str) -> str:
    """The K loop's trip count without its lower bound of 1 (the only edit)."""
    edited, n = re.subn(r"(v\d+) = tl\.maximum\((v\d+), 1\)", r"\1 = \2", source)
    assert n == 1, "the generated source no longer spells the bounded trip count this way"
    return edited


def _waits(sass: str) -> list[str]:
    return re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x\d)", sass)


def _qgemm_fp8_args():
    meta = dict(device="meta")
    s = torch.empty(N, **meta)
    return (torch.empty(M, K, dtype=torch.float8_e4m3fn, **meta), torch.empty(N, K, dtype=torch.float8_e4m3fn, **meta),
            s, s, s, torch.empty(M, N, dtype=torch.bfloat16, **meta), 1.0)


def _in_flight(report: str, sass: str) -> bool:
    return "C7515" not in report and "0x1" in _waits(sass)


def test_triton_fp8_act_gemm_keeps_a_wgmma_in_flight_without_spills():
    from tilestack.quant.gemm import qgemm_act_kernel
    report, sass = compile_sm90a(qgemm_act_kernel, _act_args())
    assert sass.count("QGMMA.64x256x32.F32.E4M3.E4M3") == 2 and _in_flight(report, sass)
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report)


def test_triton_fp8_gemm_of_prequantized_activations_keeps_a_wgmma_in_flight():
    from tilestack.quant.gemm import qgemm_kernel
    report, sass = compile_sm90a(qgemm_kernel, _qgemm_fp8_args())
    assert "QGMMA" in sass and _in_flight(report, sass)


def test_without_the_bound_on_the_trip_count_ptxas_serializes_the_fp8_gemm():
    """Why the quant kernels' K loops say smax(cdiv(K, BK), 1): the same source without it is serialized."""
    from tilestack.quant.gemm import qgemm_act_kernel
    report, sass = compile_sm90a(qgemm_act_kernel, _act_args(), _zero_trips_allowed)
    assert "QGMMA.64x256x32.F32.E4M3.E4M3" in sass and not _in_flight(report, sass)


def test_persistent_fp8_gemm_flattens_its_tile_loop_and_keeps_a_wgmma_in_flight():
    """qgemm_persistent_kernel: the tile loop reaches Triton as a flattened ``tl.range`` (its K loop inside), and
    the flattened pipeline still keeps a wgmma in flight without spills."""
    from tilestack.backends.triton import codegen
    from tilestack.quant.gemm import qgemm_persistent_kernel
    args = _qgemm_fp8_args()
    source = codegen.generate(qgemm_persistent_kernel.trace(*args).ir, interpret=False, tma=True,
                              index64=frozenset()).source
    assert re.search(r"in tl\.range\([^)]*flatten=True\)", source)
    report, sass = compile_sm90a(qgemm_persistent_kernel, args)
    assert "QGMMA" in sass and _in_flight(report, sass)
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report)
