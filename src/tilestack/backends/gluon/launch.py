"""Launch generated Gluon kernels on a Hopper GPU (sm_90): CUDA tensors only (Gluon has no CPU interpreter).

    launcher = Launcher(traced, args, options)   # once per launch signature: compile, grid, descriptor plan
    launcher(args)                               # every call: fill in pointers and TMA descriptors, launch

TMA descriptors are Gluon's host ``TensorDescriptor`` with the NVMMA shared layout the device code allocates
its buffers in (``NVMMASharedLayout.get_default_for(box, dtype)``, the same rule ``codegen.signature`` uses).

The first launch goes through Gluon's JIT (it compiles and specializes); later ones go straight to the compiled
kernel's C launcher with each TMA descriptor encoded once per address, the Triton backend's ``_DirectLaunch``
(Gluon kernels compile to the same ``CompiledKernel``). Through the JIT a call costs three descriptor objects,
Gluon's argument binding and three descriptor encodings: 60-85 us of Python on a CPU, more than these kernels'
GPU time at GPT-2's sizes (docs/inference.md, "fp8 GEMM: what the SASS shows").
"""

from __future__ import annotations

from tilestack.backends.triton.launch import TMA_ALIGN, _descriptor_factory, _DirectLaunch, _hooks, tma_ok
from tilestack.backends.triton.launch import compile_source as _compile_module
from tilestack.errors import LaunchError
from tilestack.ir.ops import Op

HOPPER = 9   # the compute capability major of the GPUs the generated code targets (wgmma, setmaxnreg)


def compile_source(low):
    """The @gluon.jit kernel of a lowered source (written to the cache folder and imported, as Triton's)."""
    return _compile_module(low.source, low.fn_name, False)


def _gl_dtype(torch_dtype):
    from triton.experimental.gluon import language as gl
    name = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
            "float8_e4m3fn": "float8e4nv", "int32": "int32", "int64": "int64", "int8": "int8", "uint8": "uint8"}
    return getattr(gl, name[str(torch_dtype).removeprefix("torch.")])


class Binding:
    """The kernel's flat argument list for one launch signature: sizes and strides fixed, pointers and TMA
    descriptors filled in per call (a descriptor holds its tensor: made per launch, never cached).
    ``pointers`` [(position, argument)] and ``descriptors`` [(position, argument, shape, strides, box)] are the
    same plan in the form the direct launch (``_DirectLaunch``) reads."""

    def __init__(self, traced, args, low):
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        self.TensorDescriptor = TensorDescriptor
        self.template: list = []
        self.fill: list[tuple[int, int, list | None, object]] = []   # (position, argument, box, layout)
        self.pointers: list[tuple[int, int]] = []
        self.tensor_slots: set[int] = set()     # positions among the pointers that take a tensor (not a scalar)
        self.descriptors: list[tuple[int, int, list, list, list]] = []
        for how in low.binding:
            kind, i = how[0], how[1]
            pos = len(self.template)
            if kind in ("ptr", "scalar"):
                self.fill.append((pos, i, None, None))
                self.pointers.append((pos, i))
                if kind == "ptr":
                    self.tensor_slots.add(pos)
                self.template.append(None)
            elif kind == "dim":
                self.template.append(int(args[i].shape[how[2]]))
            elif kind == "stride":
                self.template.append(int(args[i].stride(how[2])))
            else:
                t = args[i]
                if not tma_ok(t):
                    raise LaunchError(
                        f"gluon backend: {traced.ir.params[i].name} (shape {tuple(t.shape)}, strides "
                        f"{tuple(t.stride())}) is read or written by the copy engine, which needs the last axis "
                        f"contiguous, the other strides and the address {TMA_ALIGN}-byte aligned and each size "
                        "under 2**31")
                box = list(how[2])
                layout = gl.NVMMASharedLayout.get_default_for(box, _gl_dtype(t.dtype))
                self.fill.append((pos, i, box, layout))
                self.descriptors.append((pos, i, list(t.shape), list(t.stride()), box))
                self.template.append(None)
        # for the direct launch: encoding reads a descriptor's base, shape, strides and padding (the swizzle comes
        # from the compiled kernel's metadata), so Triton's plain descriptor object serves
        self.make_descriptor = _descriptor_factory() if self.descriptors else None
        self.label: str | None = None

    def __call__(self, args) -> list:
        flat = self.template.copy()
        for pos, i, box, layout in self.fill:
            t = args[i]
            flat[pos] = t if box is None else self.TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout)
        return flat


class Launcher:
    def __init__(self, traced, args, options):
        import torch

        from tilestack.backends.gluon import BACKEND
        from tilestack.backends.triton.codegen import wide_globals

        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if devices != {"cuda"}:
            raise LaunchError(f"gluon backend: runs on CUDA tensors of a Hopper GPU; got tensors on "
                              f"{sorted(devices)} (use backend='triton' or 'reference' elsewhere)")
        cap = torch.cuda.get_device_capability(next(a.device for a in args if isinstance(a, torch.Tensor)))
        if cap[0] != HOPPER:
            raise LaunchError(f"gluon backend: generates sm_90a code (H100/H200); this GPU is sm_{cap[0]}{cap[1]}")
        self.traced = traced
        # the copy engine where every tiled tensor allows it (16-byte aligned rows): else pointers, unpipelined
        tma = all(tma_ok(args[i]) for i in traced.tile_globals)
        if not tma and any(ins.op is Op.ASYNC_LOAD for ins in traced.ir.walk()):
            bad = [traced.ir.params[i].name for i in traced.tile_globals if not tma_ok(args[i])]
            raise LaunchError(f"gluon backend: {traced.name}'s async loads go through the copy engine, which needs "
                              f"{bad} contiguous in the last axis, the other strides and the address "
                              f"{TMA_ALIGN}-byte aligned (pad the last axis), each size under 2**31")
        # element offsets in 32 bits for the tensors whose sizes allow it (the launch key holds shapes and strides)
        art = BACKEND.compile(traced, options, tma, wide_globals(traced.ir, args))
        self.fn, low = art.fn, art.lowered
        self.num_warps = low.num_warps
        self.grid = None if traced._grid_scalars else self._grid(args)
        self.binding = Binding(traced, args, low)
        # a persistent kernel loops over its tiles: at most one program per SM
        self.programs = torch.cuda.get_device_properties(args[0].device).multi_processor_count \
            if low.persistent else None
        self.compiled = None     # Triton's CompiledKernel, once launched: registers, spills, PTX, cubin
        self.fast = None         # a _DirectLaunch after the first launch (None where it does not apply)
        self.device = next(a.device for a in args if isinstance(a, torch.Tensor))

    def _grid(self, args) -> tuple[int, int, int]:
        return _grid3(self.traced.grid(*args))        # (TracedKernel.grid refuses what CUDA cannot launch)

    def __call__(self, args) -> None:
        grid = self.grid or self._grid(args)
        if 0 in grid:
            return
        if self.programs is not None:
            grid = (min(grid[0], self.programs), 1, 1)
        fast = self.fast
        if fast is not None and not _hooks():
            fast(grid, args)
            return
        compiled = self.fn[grid](*self.binding(args), num_warps=self.num_warps)
        if self.compiled is None:
            self._first_launch(compiled)

    def _first_launch(self, compiled) -> None:
        """Keep the compiled kernel (resources, SASS) and build the direct path to its C launcher."""
        import torch

        from tilestack.backends.gluon import BACKEND
        from tilestack.backends.labels import PREFIX, range_name

        self.compiled = BACKEND.cache(self.traced)["binary"] = compiled
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if index == torch.cuda.current_device():    # the C launcher runs on the current device
            self.binding.label = PREFIX + range_name(self.traced.name, {**self.traced.constants,
                                                                         "num_warps": self.num_warps})
            self.fast = _DirectLaunch(self.binding, compiled, index)

    def resources(self) -> dict:
        """What ptxas gave this launcher's kernel (after its first launch): registers, spills, shared memory."""
        if self.compiled is None:
            raise LaunchError("gluon backend: launch once before asking for the kernel's resources")
        return kernel_report(self.compiled)


def kernel_report(k) -> dict:
    """Registers, spills, shared memory and warps of a loaded Triton CompiledKernel."""
    return {"registers": k.n_regs, "spills": k.n_spills, "shared_bytes": k.metadata.shared,
            "num_warps": k.metadata.num_warps}


def _grid3(grid):
    return (*grid, *(1,) * (3 - len(grid)))
