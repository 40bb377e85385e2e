"""Triton's interpreter works whatever was imported first (the README's main job once failed on a fresh
CPU-only clone because ``perf.device.versions()`` imported Triton before the first kernel).

Each test runs a fresh Python with ``triton`` imported FIRST and TRITON_INTERPRET unset, as a user's
script or the ``tilestack`` command would, then runs kernels under the interpreter on CPU tensors. Where a GPU
is present the interpreter is asked for explicitly (``config.override(triton_interpret=True)``), since CPU
tensors there are otherwise refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import triton                                   # first, with TRITON_INTERPRET unset
import triton.language as tl
assert not triton.knobs.runtime.interpret and type(tl.max).__name__ == "JITFunction"
import contextlib
import torch
from tilestack import config
interpreter = (contextlib.nullcontext() if not torch.cuda.is_available()
               else config.override(triton_interpret=True))
"""


def run_python(body: str, tmp_path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TILESTACK_CACHE_DIR"] = str(tmp_path / "cache")
    script = tmp_path / "child.py"               # a file: @triton.jit reads its function's source
    script.write_text(PRELUDE + textwrap.dedent(body))
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_kernels_calling_tritons_library_run_after_triton_was_imported_first(tmp_path):
    # softmax's generated Triton calls tl.max / tl.sum (jitted helpers of Triton's library); attention
    # calls more of them. Both are compared with float64 here, in the child.
    out = run_python("""
        from tilestack.kernels import attention_fwd, softmax
        x = torch.randn(37, 300)                                    # ragged rows and columns
        with interpreter:
            y = softmax(x, out=torch.full_like(x, float("nan")), backend="triton", BM=4, BN=128, num_warps=4,
                        num_stages=1)
        want = torch.softmax(x.double(), -1)
        assert y.isfinite().all() and float((y.double() - want).abs().max()) < 1e-6
        q, k, v = (torch.randn(1, 2, 45, 64) for _ in range(3))
        with interpreter:
            o = attention_fwd.attention_forward(q, k, v, True, backend="triton", BM=32, BN=32, num_warps=4,
                                                num_stages=1)[0]
        ref = attention_fwd.reference(q.double(), k.double(), v.double(), True)[0]
        assert float((o.double() - ref).abs().max()) < 1e-4
        print("interpreted ok")
    """, tmp_path)
    assert "interpreted ok" in out


def test_gpu_compile_is_unchanged_after_interpreting(tmp_path):
    # the same process interprets a kernel, then compiles one for a Hopper GPU down to PTX (no GPU needed):
    # Triton's language is left unpatched and its helpers still compile
    out = run_python("""
        from triton.backends.compiler import GPUTarget
        from tilestack.kernels import softmax
        x = torch.randn(8, 64)
        with interpreter:
            softmax(x, backend="triton", BM=4, BN=128, num_warps=4, num_stages=1)
        assert getattr(tl.core.maximum, "__triton_builtin__", False), "tl.core.maximum left patched"

        @triton.jit
        def row_softmax(X, Y, N: tl.constexpr):
            offs = tl.arange(0, N)
            x = tl.load(X + offs)
            e = tl.exp(x - x.max(0))                                # a helper called as a tensor member
            tl.store(Y + offs, e / tl.sum(e, 0))

        src = triton.compiler.ASTSource(fn=row_softmax, signature={"X": "*fp32", "Y": "*fp32", "N": "constexpr"},
                                        constexprs={"N": 64})
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        except RuntimeError as e:                                   # no ptxas in this Triton install
            print("skip:", e)
        else:
            assert ".entry row_softmax" in ptx
            print("compiled ok")
    """, tmp_path)
    if "skip:" in out:
        pytest.skip(out.split("skip:", 1)[1].strip()[:200])
    assert "compiled ok" in out


@pytest.mark.skipif(sys.platform != "linux", reason="the README's main job is documented for Linux")
def test_bench_small_mode_runs_after_triton_was_imported_first(tmp_path):
    # what `tilestack bench` does on a CPU, one kernel, through the CLI's entry point
    out = run_python(f"""
        import sys
        from tilestack.cli import main
        sys.argv = ["tilestack", "bench", "--small", "-k", "softmax", "--no-store", "--out", {str(tmp_path / "out")!r}]
        with interpreter:
            try:
                main()
            except SystemExit as e:
                assert not e.code, f"tilestack bench exited {{e.code}}"
    """, tmp_path)
    assert "softmax" in out and "FAIL" not in out and "ok" in out
