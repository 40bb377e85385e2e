"""Ahead-of-time compiles of generated Gluon kernels for sm_90a on any machine (no GPU), and what they hold.

    k = BACKEND.aot(traced)               # a triton CompiledKernel: k.asm["ptx"], k.asm["cubin"]
    res = resources(k)                     # registers, spill bytes, stack, shared memory (ptxas's report)
    sass(k)                                # the SASS text (cuobjdump), e.g. to count HGMMA and USETMAXREG

Tools are the ones Triton ships (``triton/backends/nvidia/bin``: ptxas, cuobjdump). ``ToolMissing`` says which
one is absent, so tests can skip with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from tilestack.errors import BackendError


class ToolMissing(BackendError):
    pass


def tool(name: str) -> str:
    """The path of Triton's bundled CUDA tool ``name`` (ptxas, cuobjdump, nvdisasm)."""
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.access(path, os.X_OK):
        raise ToolMissing(f"{name} is not in this Triton install ({path})")
    return path


def compile_for(artifact, arch: int = 90):
    """Compile an artifact's kernel for ``sm_{arch}a`` with its signature (descriptor types included)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    tool("ptxas")
    low = artifact.lowered
    src = GluonASTSource(fn=artifact.fn, signature=low.signature)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": low.num_warps})


def resources(kernel, arch: int = 90) -> dict:
    """ptxas's resource report of the kernel's PTX: registers, spill stores and loads (bytes), stack frame
    (bytes), whether ptxas serialized the wgmma, and the shared memory Triton allocated."""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([tool("ptxas"), f"--gpu-name=sm_{arch}a", "-v", ptx, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    text = out.stderr + out.stdout

    def num(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    # C7512: ptxas found the wgmma in flight at some point more than it can keep registers for (e.g. one still in
    # flight across a loop's back edge) and made every wgmma of the kernel wait for the one before
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "wgmma_serialized": "wgmma.mma_async instructions are serialized" in text,
            "shared_bytes": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps, "report": text}


def sass(kernel) -> str:
    """The kernel's SASS (cuobjdump of its cubin)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True, check=True)
    return out.stdout
