"""Kernels: a Python function of tiles, traced once per signature into IR and run by a backend.

    @ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
    def gemm(A, B, C, *, BM: int = ts.tunable(128, (64, 128)), BN: int = ts.tunable(128, (64, 128)), ...):
        ...

    gemm(a, b, c, BM=64)                          # trace (cached) and run on the default backend
    gemm(a, b, c, BM=64, num_warps=8)             # a backend's launch option, given at launch
    t = gemm.trace(a, b, c, BM=64)                # a TracedKernel: t.ir, t.source(), t.cost(a, b, c)
    t.run(a, b, c, backend="reference")

Positional parameters are global tensors (unannotated, or annotated ``Global``) or runtime scalars
(annotated ``float`` or ``int``); keyword-only parameters are compile-time constants, tunable ones
declared with ``tunable(default, domain)``. The signature a kernel is traced for is the dtypes and ranks of
its tensors and the values of its constants; sizes and strides stay symbolic.

A kernel declares only what is its own: tile sizes and algorithmic variants. How a backend runs it (Triton's
``num_warps`` and ``num_stages``: ``backends.triton.TritonOptions``) are launch options, given at launch, chosen
by the tuner, or defaulted per kernel with ``@ts.kernel(grid=..., options=dict(num_warps=8))``. A kernel that
still declares ``num_warps``/``num_stages`` among its constants keeps working: the backend takes them from there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tilestack.backends.base import check_cuda_grid
from tilestack.config import knobs
from tilestack.errors import LaunchError, TilestackError, TraceError, TunableError
from tilestack.ir.cost import Cost, ScalarMachine, grid_of, grid_plan, kernel_cost
from tilestack.ir.nodes import KernelIR, Param
from tilestack.ir.ops import Op
from tilestack.ir.types import FLOAT, INDEX, TORCH_NAMES, DType, GlobalType, dtype_of_torch
from tilestack.ir.verify import verify
from tilestack.lang.launch import refuse_grad_output, refuse_inference_output
from tilestack.lang.tiles import GlobalTensor, Scalar, as_scalar
from tilestack.lang.trace import Tracer, current_or_none, set_current, user_line

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep   # src/tilestack/

MAX_LAUNCHERS = 4096   # launch signatures remembered per kernel


def launch_key(args: Sequence) -> tuple:
    """What a launch is specialized for: per tensor its dtype, shape, strides, device and whether its address is
    16-byte aligned (Triton specializes on that) and its negative bit (refused by the checks); per number its type
    and, for ints, what Triton specializes on (== 1, divisible by 16, fits in 32 bits). Everything a launch checks
    or derives is a function of this."""
    return tuple((a.dtype, a.shape, a.stride(), a.device, a.data_ptr() % 16 == 0, a.is_neg())
                 if isinstance(a, torch.Tensor)
                 else (int, a == 1, a % 16 == 0, -_I32 <= a < _I32) if type(a) is int
                 else type(a) for a in args)


_I32 = 2**31


def plain_numbers(args: Sequence) -> tuple:
    """``args`` with NumPy scalars (np.float32(0.5), np.int64(3)) as the Python numbers they hold: a runtime scalar
    may be given either way, and is launched (and specialized) as the Python number."""
    return tuple(a.item() if isinstance(a, np.generic) else a for a in args)


def _has_numpy_scalar(args: Sequence) -> bool:
    return any(isinstance(a, np.generic) for a in args)


_CONSTANT_KINDS = {int: "int", float: "float", bool: "bool", str: "str", "int": "int", "float": "float",
                   "bool": "bool", "str": "str"}


def _fits_kind(kind: str, value) -> bool:
    """Whether ``value`` can be a constant annotated ``kind``: an int for int, any real number for float, a bool
    (or 0 / 1) for bool, a str for str."""
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float)
    if kind == "bool":
        return isinstance(value, int) and value in (0, 1)
    return isinstance(value, str)


def remember(cache: dict, key, value):
    """``cache[key] = value``, emptying the cache first when it is full; returns ``value``."""
    if len(cache) >= MAX_LAUNCHERS:   # shapes that never repeat must not grow it forever
        cache.clear()
    cache[key] = value
    return value


class Global:
    """Annotation for a global tensor parameter (the default for unannotated positional parameters)."""


def _refuse_scalar_annotation(kernel: str, p: inspect.Parameter, where: str) -> None:
    """TraceError where positional parameter ``p`` is annotated as a scalar of a kind runtime arguments are not
    (bool, str, complex, a dtype such as ts.f32 or torch.float32, a NumPy scalar type, ``float | None``): it would
    have been taken for a global tensor, and a number passed for it refused at launch as "must be a torch.Tensor"."""
    a = p.annotation
    names = {"bool", "str", "complex"}
    scalar = a in (bool, str, complex) or a in names or isinstance(a, DType | torch.dtype) or \
        isinstance(a, type) and issubclass(a, np.generic) or \
        getattr(a, "__args__", None) is not None and any(t in (float, int) for t in a.__args__)
    if not scalar:
        return
    shown = getattr(a, "__name__", None) if isinstance(a, type) else None
    raise TraceError(f"kernel {kernel}: parameter {p.name} is annotated {shown or a}; a positional parameter is a "
                     f"global tensor (unannotated or Global) or a runtime scalar annotated float or int (its "
                     f"precision is the work's: f32, or f64 in f64 work); a bool, str or other constant is "
                     f"keyword-only, after *: `*, {p.name}: bool = False`", where)


@dataclasses.dataclass(frozen=True)
class Tunable:
    """A compile-time constant a tuner may choose, from ``domain``."""
    default: Any
    domain: tuple


def tunable(default, domain: Sequence) -> Any:
    """Declare a tunable constant: ``BM: int = tunable(128, (64, 128, 256))``."""
    if isinstance(domain, str | bytes) or not isinstance(domain, Iterable):   # (a str was split into characters)
        raise TunableError(f"tunable domain {domain!r} ({type(domain).__name__}); expected a sequence of the "
                           "values a tuner may choose, e.g. (64, 128, 256)", user_line())
    plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731  (as resolve() reads them)
    default, domain = plain(default), tuple(plain(v) for v in domain)
    twice = [v for i, v in enumerate(domain) if v in domain[:i]]
    if twice:   # (each config holding it was searched, timed and cached twice)
        raise TunableError(f"tunable domain {domain!r} holds {twice[0]!r} twice; expected each value once",
                           user_line())
    if default not in domain:
        raise TunableError(f"tunable default {default!r} is not in its domain {domain!r}", user_line())
    return Tunable(default, domain)


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """A global argument known only by dtype and rank: enough to trace without tensors."""
    dtype: DType
    rank: int


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _ParamDecl:
    name: str
    kind: str   # "global" | "float" | "int"


class Kernel:
    """A tile-language kernel (see the module docstring)."""

    def __init__(self, fn: Callable, grid: Callable, options: dict[str, Any] | None = None):
        self.fn = fn
        self.name = fn.__name__
        self.grid_fn = grid
        self.where = f"{os.path.basename(fn.__code__.co_filename)}:{fn.__code__.co_firstlineno}"
        self.params: list[_ParamDecl] = []
        self.param_defaults: dict[str, Any] = {}   # runtime scalar -> its default (`eps: float = 1e-5`)
        self.constants: dict[str, Any] = {}
        self.constant_kinds: dict[str, str] = {}   # constant -> "int" | "float" | "bool" | "str", as annotated
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                _refuse_scalar_annotation(self.name, p, self.where)
                kind = {float: "float", int: "int", "float": "float", "int": "int"}.get(p.annotation, "global")
                self.params.append(_ParamDecl(p.name, kind))
                if p.default is not p.empty:
                    if kind == "global":
                        raise TraceError(f"kernel {self.name}: tensor parameter {p.name} has a default "
                                         f"({p.default!r}); a tensor argument is always given (a runtime float or "
                                         "int parameter, annotated so, may have a default)", self.where)
                    self.param_defaults[p.name] = p.default
            elif p.kind is p.KEYWORD_ONLY:
                self.constants[p.name] = _REQUIRED if p.default is p.empty else p.default
                kind = _CONSTANT_KINDS.get(p.annotation)
                if kind is not None and p.default is not None:     # (`X: int = None`: None is its value too)
                    self.constant_kinds[p.name] = kind
            else:
                raise TraceError(f"kernel {self.name}: *args/**kwargs are not kernel parameters", self.where)
        self._param_names = frozenset(p.name for p in self.params)
        for name, decl in self.tunables.items():
            kind = self.constant_kinds.get(name)
            wrong = [v for v in decl.domain if kind is not None and not _fits_kind(kind, v)]
            if wrong:   # (found only when a tuner chose that config: "constant BM is declared int; got str '32'")
                raise TunableError(f"kernel {self.name}: tunable {name} is declared {kind}, but its domain "
                                   f"{decl.domain!r} holds {wrong[0]!r} ({type(wrong[0]).__name__}); expected "
                                   f"{kind} values only", self.where)
        # default launch options (backend options such as num_warps), under those given at launch
        self.options: dict[str, Any] = dict(options or {})
        clash = sorted(set(self.options) & set(self.constants))
        if clash:
            raise TraceError(f"kernel {self.name}: {clash} are both constants of the kernel and launch options; "
                             "declare each in one place", self.where)
        self._traced: dict[tuple, TracedKernel] = {}
        self._launchers: dict[tuple, Callable] = {}   # launch key -> prebuilt launcher (see __call__)
        functools.update_wrapper(self, fn)

    @property
    def tunables(self) -> dict[str, Tunable]:
        return {k: v for k, v in self.constants.items() if isinstance(v, Tunable)}

    def configs(self) -> list[dict[str, Any]]:
        """Every combination of the tunables' domains (a tuner filters these further)."""
        names = list(self.tunables)
        return [dict(zip(names, vals, strict=True))
                for vals in itertools.product(*(self.tunables[n].domain for n in names))]

    def resolve(self, consts: dict[str, Any]) -> dict[str, Any]:
        """Constants with defaults filled in, NumPy scalars as the Python numbers they hold (np.int64(32) is 32 to
        the tile sizes and index arithmetic alike), each checked against its annotation and a tunable's domain."""
        self._refuse_arguments_as_constants(consts)
        unknown = set(consts) - set(self.constants)
        if unknown:
            import difflib
            near = {u: difflib.get_close_matches(u, list(self.constants), n=1) for u in sorted(unknown)}
            hint = "".join(f" ({u!r}: did you mean {m[0]!r}?)" for u, m in near.items() if m)
            raise LaunchError(f"{self.name}: unknown constant(s) {sorted(unknown)}{hint}; its constants are "
                              f"{sorted(self.constants)}")
        out = {}
        for name, decl in self.constants.items():
            value = consts.get(name, decl.default if isinstance(decl, Tunable) else decl)
            if isinstance(value, np.generic):
                value = value.item()
            if value is _REQUIRED:
                raise LaunchError(f"{self.name}: constant {name}= is required")
            kind = self.constant_kinds.get(name)
            if kind is not None and not _fits_kind(kind, value):
                raise LaunchError(f"{self.name}: constant {name} is declared {kind}; got {type(value).__name__} "
                                  f"{value!r}")
            if isinstance(decl, Tunable) and value not in decl.domain:
                raise TunableError(f"{self.name}: tunable {name}={value!r} is outside its domain "
                                   f"{decl.domain!r} (declared at {self.where})", user_line())
            out[name] = value
        return out

    def _refuse_arguments_as_constants(self, consts: dict[str, Any]) -> None:
        """LaunchError where ``consts`` (of a path that takes the runtime arguments as one tuple) names some."""
        named = sorted(self._param_names.intersection(consts))
        if named:
            raise LaunchError(f"{self.name}: {named} name runtime arguments, not constants; give them in the "
                              f"argument tuple, in the order {self._arg_names()} (a call of the kernel itself "
                              "takes them by keyword too)")

    def _arg_names(self) -> str:
        return "(" + ", ".join(p.name for p in self.params) + ")"

    def bind(self, args: Sequence, consts: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """(args, consts) with the runtime arguments given by keyword (``eps=1e-5``, ``X=x``) or left to their
        defaults (``eps: float = 1e-5``) put in their places, as Python binds a call; the rest of ``consts`` are
        constants and launch options. Arguments given both ways, or missing, are named."""
        if len(args) == len(self.params) and self._param_names.isdisjoint(consts):
            return tuple(args), consts
        if len(args) > len(self.params):
            raise LaunchError(f"{self.name} takes {len(self.params)} arguments {self._arg_names()}; got {len(args)}")
        twice = [p.name for p in self.params[:len(args)] if p.name in consts]
        if twice:
            raise LaunchError(f"{self.name}: argument(s) {twice} given both by position and by keyword")
        consts, bound = dict(consts), list(args)
        for p in self.params[len(args):]:
            if p.name in consts:
                bound.append(consts.pop(p.name))
            elif p.name in self.param_defaults:
                bound.append(self.param_defaults[p.name])
            else:
                missing = [q.name for q in self.params[len(bound):] if q.name not in consts
                           and q.name not in self.param_defaults]
                more = len(bound) - len(args)
                also = f" (and {more} by keyword or default)" if more else ""
                raise LaunchError(f"{self.name} takes {len(self.params)} arguments {self._arg_names()}; got "
                                  f"{len(args)}{also}, missing {missing}")
        return tuple(bound), consts

    def signature(self, args: Sequence) -> tuple:
        if len(args) != len(self.params):
            names = ", ".join(p.name for p in self.params)
            raise LaunchError(f"{self.name} takes {len(self.params)} arguments ({names}); got {len(args)}")
        sig = []
        for p, a in zip(self.params, args, strict=True):
            if p.kind != "global":
                sig.append(p.kind)
            elif isinstance(a, ArgSpec):
                sig.append((a.dtype, a.rank))
            elif hasattr(a, "dtype") and hasattr(a, "dim"):
                dt = dtype_of_torch(a.dtype)
                if dt is None:
                    held = ", ".join(f"torch.{n}" for n in TORCH_NAMES.values())
                    raise LaunchError(f"{self.name}: argument {p.name} has dtype {a.dtype}, which tiles cannot "
                                      f"hold; expected one of {held}")
                sig.append((dt, a.dim()))
            else:
                hint = (f" (a runtime scalar parameter is annotated: `{p.name}: float` or `{p.name}: int`)"
                        if isinstance(a, int | float | np.generic) and not isinstance(a, bool) else "")
                raise LaunchError(f"{self.name}: argument {p.name} must be a torch.Tensor (or ArgSpec to trace), "
                                  f"got {type(a).__name__}{hint}")
        return tuple(sig)

    def trace(self, *args, **consts) -> TracedKernel:
        """The kernel traced for the dtypes and ranks of ``args`` and these constants (cached). Launch options
        among ``consts`` (num_warps, ...) are left out: they do not change the trace (give them at launch)."""
        args, consts = self.bind(args, consts)
        if any(k not in self.constants for k in consts):
            consts = self._launch_options(consts)[0]
        resolved = self.resolve(consts)
        sig = self.signature(args)
        key = (sig, tuple(sorted((k, repr(v)) for k, v in resolved.items())))
        if key not in self._traced:
            self._traced[key] = TracedKernel(self, sig, resolved, self._trace(sig, resolved))
        return self._traced[key]

    def __call__(self, *args, backend: str | None = None, **consts):
        """Launch on ``backend`` (default: ``tilestack.backends.pick_backend``). The hot path is one key and one
        dictionary lookup: a launch signature seen before goes straight to its prebuilt launcher, skipping the
        trace, the constant and argument checks, and the backend's preparation (all done on the first call).
        Runtime arguments may be given by keyword or left to their defaults, as in a Python call (``bind``)."""
        if current_or_none() is not None:   # (its GlobalTensor arguments were refused as "dtype f32, which tiles
            raise TraceError(               # cannot hold")
                f"{self.name} is a kernel, launched from the host; a kernel being traced cannot call it. Write "
                f"the shared code as a plain Python function of tiles and globals (def {self.name}_body(X, ...):) "
                f"and call that from both kernels", user_line())
        if len(args) != len(self.params) or consts and not self._param_names.isdisjoint(consts):
            args, consts = self.bind(args, consts)
        return self.launcher_for(args, backend, **consts)(args)

    def launcher_for(self, args: Sequence, backend: str | None = None, **consts) -> Callable:
        """The prebuilt launcher for the launch signature of ``args`` (``launcher(args)`` launches). A library
        function that launches the same signature many times can keep it and skip even the key."""
        try:
            # each constant keyed with its type: True == 1 == 1.0 in Python, and a launch with GROUP_M=True or
            # BM=32.0 (refused as "declared int" when first seen) was taken once GROUP_M=1 or BM=32 had launched
            key = (launch_key(args), tuple([(k, type(v), v) for k, v in consts.items()]) if consts else (), backend,
                   knobs.backend, knobs.triton_interpret)
            launcher = self._launchers.get(key)
        except (TypeError, RuntimeError):   # an unhashable constant or an argument no launch accepts (a sparse
            key, launcher = None, None       # tensor has no data pointer): the checked way names it
        if launcher is None:
            if _has_numpy_scalar(args):   # launched as Python numbers, under their key (off the hot path)
                return lambda a: self.launcher_for(plain_numbers(a), backend, **consts)(plain_numbers(a))
            self._refuse_arguments_as_constants(consts)
            consts, options = self._launch_options(consts)
            launcher = self.trace(*args, **consts).launcher(args, backend, options)
            if key is not None:
                remember(self._launchers, key, launcher)
        return launcher

    def _launch_options(self, consts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the kernel's constants, backend launch options): a name the kernel does not declare but a backend's
        options do (num_warps, num_stages) is a launch option, given at launch or by the tuner."""
        extra = [k for k in consts if k not in self.constants]
        if not extra:
            return consts, {}
        names = _launch_option_names()
        # a NumPy int as the int it is, as the kernel's own constants take it (num_warps=np.int64(4) was refused by
        # every backend as "no positive int" where BM=np.int64(32) was taken)
        options = {k: consts[k].item() if isinstance(consts[k], np.generic) else consts[k] for k in extra if k in names}
        from tilestack.backends import check_launch_options
        check_launch_options(self.name, options)
        return {k: v for k, v in consts.items() if k not in options}, options

    def _trace(self, sig: tuple, consts: dict[str, Any]) -> KernelIR:
        tr = Tracer()
        tr.consts = consts                  # what a bad tile size is named by (a constant BM=-3)
        old = set_current(tr)
        try:
            params, handles = [], []
            for i, (p, s) in enumerate(zip(self.params, sig, strict=True)):
                t = GlobalType(*s) if p.kind == "global" else (FLOAT if p.kind == "float" else INDEX)
                ins = tr.emit(Op.ARG, (), (t,), self.where, index=i, name=p.name, hint=p.name)
                params.append(Param(p.name, t))
                if p.kind == "global":
                    g = GlobalTensor(ins.result, p.name)
                    _ = g.shape   # sizes are defined at entry, before any loop
                    handles.append(g)
                else:
                    handles.append(Scalar(ins.result))
            named = dict(zip((p.name for p in self.params), handles, strict=True)) | consts
            try:
                grid = self._call_by_name(self.grid_fn, named)
            except Exception as e:
                if not isinstance(e, TilestackError):   # (a bare ZeroDivisionError named neither kernel nor grid)
                    e.add_note(f"(raised while computing the grid of kernel {self.name})")
                raise
            grid = grid if isinstance(grid, tuple) else (grid,)
            # a NumPy integer (a count computed with NumPy) is a number of programs too, as it is a tile size
            grid = tuple(int(g) if isinstance(g, np.integer) else g for g in grid)
            if not 1 <= len(grid) <= 3:
                raise TraceError(f"{self.name}: grid must have 1 to 3 axes, got {grid!r}", self.where)
            for k, g in enumerate(grid):
                if isinstance(g, bool) or not isinstance(g, int | Scalar) or \
                        (isinstance(g, Scalar) and g.type != INDEX):
                    what = "a float Scalar" if isinstance(g, Scalar) else f"{type(g).__name__} {g!r}"
                    raise TraceError(f"{self.name}: grid axis {k} is {what}; expected a number of programs, an int "
                                     "or index Scalar (sizes divide with // or ts.cdiv; `/` makes a float)", self.where)
            grid_values = tuple(as_scalar(g).v for g in grid)
            try:
                returned = self.fn(*handles, **consts)
            except RecursionError as e:
                # (a helper calling itself without end: Python's bare RecursionError named neither the kernel nor
                # the line that started the recursion)
                raise TraceError(f"kernel {self.name}: tracing it recursed past Python's limit ({e}); a kernel and "
                                 "the helpers it calls are traced by running them, so recursion must end on "
                                 "compile-time values (constants, shapes), never on a runtime value", self.where) from e
            except Exception as e:
                # A plain Python error from the author's code or a helper it calls (not one of tilestack's, which name
                # the line already): keep its type, but say which kernel was being traced, and from which line.
                if not isinstance(e, TilestackError):
                    e.add_note(f"(raised while tracing kernel {self.name}, at {_raising_user_line(e, self.fn)})")
                raise
            if returned is not None:
                # A kernel writes its outputs through ts.store; a returned tile or number was dropped silently, the
                # caller's output left unwritten (as a Triton @jit kernel refuses a return value, so does this).
                raise TraceError(f"kernel {self.name} returned {type(returned).__name__} {_short(returned)}; a "
                                 "kernel returns nothing: write its results into an output tensor with "
                                 "ts.store(Out, tile, at=...)", self.where)
            if tr.loops:
                raise TraceError("a ts.range loop was left early (break/return); tile loops run to the end",
                                 tr.loops[-1].where)
        finally:
            set_current(old)
        ir = KernelIR(self.name, params, tr.blocks[0], dict(consts), grid_values, self.where, roles=dict(tr.roles))
        verify(ir)
        return ir

    @staticmethod
    def _call_by_name(fn: Callable, named: dict[str, Any]):
        ps = inspect.signature(fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in ps.values()):
            return fn(**named)
        unknown = [k for k, p in ps.items() if k not in named and p.default is p.empty]
        if unknown:
            code = getattr(fn, "__code__", None)
            where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}" if code else None
            raise TraceError(f"grid: parameter(s) {', '.join(unknown)} name no argument or constant of the "
                             f"kernel; the grid may take any of {', '.join(named)}", where)
        return fn(**{k: named[k] for k in ps if k in named})

    def __getitem__(self, grid):
        """``k[grid](args)``, as Triton launches, is refused saying how a tilestack kernel takes its grid."""
        raise LaunchError(f"{self.name}[{grid!r}]: a tilestack kernel takes its grid where it is made, "
                          f"@ts.kernel(grid=...) (a function of the arguments, or fixed: grid=(4,)), and is launched "
                          f"as {self.name}(args...), with no [grid] (declared at {self.where})")

    def __repr__(self) -> str:
        return f"<tilestack kernel {self.name} at {self.where}>"


def _short(x) -> str:
    """repr of ``x`` cut to 60 characters (a returned tile's repr is its type)."""
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _raising_user_line(e: BaseException, fn: Callable) -> str:
    """``file.py:12`` of the innermost frame of ``e``'s traceback outside tilestack (the author's raising line),
    and the kernel's own line that called it when that is another (``helpers.py:3, called from k.py:20``)."""
    tb, kernel_line, inner = e.__traceback__, "", ""
    while tb is not None:
        code = tb.tb_frame.f_code
        here = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}"
        if code is getattr(fn, "__code__", None):
            kernel_line = here
        if not os.path.abspath(code.co_filename).startswith(_PKG_DIR):
            inner = here
        tb = tb.tb_next
    if not inner:
        return kernel_line or "<unknown>"
    return inner if inner == kernel_line or not kernel_line else f"{inner}, called from {kernel_line}"


def _runtime_steps(ir: KernelIR) -> list[tuple[list, Any, str]]:
    """(plan, step value, where) for each ts.range loop whose step is no constant but is computed from the
    arguments alone (the instructions of the kernel's entry that make it: its backward slice, as the grid's)."""
    entry = {ins.results[0]: ins for ins in ir.body.instrs if ins.results}
    out = []
    for loop in ir.walk():
        if loop.op is not Op.RANGE:
            continue
        step = loop.srcs[2]
        made = entry.get(step)
        if made is None or made.op is Op.CONST:
            continue
        need, stack, ok = set(), [step], True
        while stack and ok:
            v = stack.pop()
            ins = entry.get(v)
            if ins is None or ins.op in (Op.BLOCK_ID, Op.NUM_BLOCKS) or \
                    ins.op not in (Op.CONST, Op.ARG, Op.DIM, Op.SCALAR):
                ok = False
            elif ins not in need:
                need.add(ins)
                stack.extend(ins.srcs)
        if ok:
            out.append(([ins for ins in ir.body.instrs if ins in need], step, loop.where))
    return out


@functools.cache
def _launch_option_names() -> frozenset[str]:
    """Every backend's launch option names (read once: it imports every backend)."""
    from tilestack.backends import launch_option_names
    return launch_option_names()


_NO_GRID = object()


def kernel(fn: Callable | None = None, *, grid: Callable | int | tuple = _NO_GRID,
           options: dict[str, Any] | None = None) -> Any:
    """Decorator: make a tile-language kernel. ``grid`` maps the arguments (by name, globals as handles
    with symbolic ``.shape``) and constants to the number of programs on each grid axis, or is that number (an int,
    or a tuple of 1 to 3 ints) for a kernel whose grid is fixed. ``options``: the kernel's default launch options
    (``dict(num_warps=8, num_stages=3)``), under those given at launch."""
    if grid is _NO_GRID:   # `@ts.kernel` as `@triton.jit`: Python said only "missing ... argument: 'grid'"
        where = f" (kernel {fn.__name__})" if callable(fn) else ""
        raise TraceError(f"ts.kernel needs its grid{where}: a kernel computes the number of programs it runs from "
                         "its arguments, `@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))`, or takes a "
                         "fixed one, `@ts.kernel(grid=(4,))`; it is launched as k(args), with no [grid]", user_line())
    grid = _grid_function(grid)
    if options is not None and not isinstance(options, Mapping):   # (a str failed in dict(): "update sequence")
        raise TraceError(f"ts.kernel: options is {type(options).__name__} {options!r}; expected a dict of launch "
                         "options, e.g. options=dict(num_warps=8, num_stages=3)", user_line())
    if fn is None:
        return lambda f: Kernel(f, grid, options)
    return Kernel(fn, grid, options)


def _grid_function(grid) -> Callable:
    """``grid`` as a function of the arguments: a fixed int or tuple of ints as one taking none."""
    if callable(grid):
        return grid
    fixed = grid if isinstance(grid, tuple) else (grid,)
    fixed = tuple(int(g) if isinstance(g, np.integer) else g for g in fixed)
    if not 1 <= len(fixed) <= 3 or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in fixed):
        raise TraceError(f"ts.kernel: grid is {grid!r}; expected a function of the arguments and constants "
                         "returning the programs per axis, or a fixed int or tuple of 1 to 3 ints >= 0", user_line())
    return lambda: fixed


class TracedKernel:
    """One kernel traced for one signature: its IR, its cost, its generated code, and its launches."""

    def __init__(self, kernel: Kernel, signature: tuple, constants: dict[str, Any], ir: KernelIR):
        self.kernel = kernel
        self.signature = signature
        self.constants = constants
        self.ir = ir
        self._check_plan = None   # lang.launch's per-parameter checks, made on the first launch
        self._grid_plan = grid_plan(ir)
        grid_args = {ins.attrs.index for ins in self._grid_plan if ins.op is Op.ARG}
        self._grid_globals = [i for i in grid_args if isinstance(signature[i], tuple)]
        self._grid_scalars = [i for i in grid_args if not isinstance(signature[i], tuple)]
        self.written = ir.written_params()   # indices of the globals it stores to
        self._outputs = tuple(sorted(self.written))   # the same, for the per-launch requires-grad guard
        self.tile_globals = ir.tile_params()  # indices of the globals it moves 2-D tiles of
        self._step_plans = _runtime_steps(ir)   # ts.range loops whose step the host can compute per launch

    @property
    def name(self) -> str:
        return self.kernel.name

    # ---- arguments -----------------------------------------------------------------------------------------
    def _split_args(self, args: Sequence) -> tuple[dict[int, tuple[int, ...]], dict[int, float]]:
        """Sizes of the globals and values of the scalars, from tensors, shapes or numbers."""
        if len(args) != len(self.signature):
            raise LaunchError(f"{self.name} takes {len(self.signature)} arguments; got {len(args)}")
        dims, scalars = {}, {}
        for i, (s, a) in enumerate(zip(self.signature, args, strict=True)):
            if isinstance(s, tuple):
                shape = tuple(a.shape) if hasattr(a, "shape") else tuple(a)
                if len(shape) != s[1]:
                    raise LaunchError(f"{self.name}: argument {self.ir.params[i].name} has rank {len(shape)}; "
                                      f"the kernel was traced for rank {s[1]}")
                dims[i] = tuple(int(x) for x in shape)
            else:
                scalars[i] = a
        return dims, scalars

    def _bound(self, args: Sequence, kwargs: dict[str, Any]) -> tuple:
        """``args`` with runtime arguments given by keyword or left to their defaults put in place (Kernel.bind)."""
        args, rest = self.kernel.bind(args, kwargs)
        if rest:
            raise LaunchError(f"{self.name}: {sorted(rest)} are not runtime arguments of this trace (its constants "
                              f"were fixed when it was traced: {self.constants})")
        return args

    def cost(self, *args, **kwargs) -> Cost:
        """FLOPs, global bytes and footprints for these sizes (tensors, or shapes for the globals; the tensor
        itself for a global the kernel reads scalars from with ``ts.load_scalar``: its loop bounds and coordinates
        depend on the values)."""
        if kwargs or len(args) != len(self.signature):
            args = self._bound(args, kwargs)
        dims, scalars = self._split_args(args)
        data = {}
        index = {ins.result: ins.attrs.index for ins in self.ir.walk() if ins.op is Op.ARG}
        for i in sorted({index[ins.srcs[0]] for ins in self.ir.walk() if ins.op is Op.LOAD_SCALAR}):
            a = args[i]
            if not hasattr(a, "detach"):
                raise LaunchError(f"{self.name}.cost: argument {self.ir.params[i].name} is read by ts.load_scalar "
                                  f"(a loop bound or coordinate from memory); pass its tensor, not the shape "
                                  f"{tuple(a.shape) if hasattr(a, 'shape') else a!r}")
            if a.device.type == "meta":
                raise LaunchError(f"{self.name}.cost: argument {self.ir.params[i].name} is read by ts.load_scalar "
                                  f"(a loop bound or coordinate from memory); pass a tensor holding its values, not "
                                  f"a meta tensor (shape {tuple(a.shape)})")
            from tilestack.backends.reference.executor import _numpy
            data[i] = _numpy(a)     # (an expanded axis is not copied out)
        return kernel_cost(self.ir, dims, scalars, data)

    def grid(self, *args) -> tuple[int, ...]:
        """The number of programs on each grid axis for these arguments."""
        dims = {i: tuple(args[i].shape) for i in self._grid_globals}
        scalars = {i: args[i] for i in self._grid_scalars}
        grid = grid_of(self.ir, dims, scalars, self._grid_plan)
        if any(g < 0 for g in grid):   # (NumPy's ndindex, the interpreter and CUDA would each say something else)
            raise LaunchError(f"{self.name}: the grid is {grid} for these arguments; a grid axis counts programs, "
                              f"so none may be negative (clamp it with ts.smax(0, ...)) (grid at {self.kernel.where})")
        # CUDA's limits on every backend: a grid a GPU cannot launch is refused on the CPU too (the reference
        # executor ran 2**31 programs for hours, Triton's interpreter as long), not only by the GPU launchers
        check_cuda_grid(self.name, grid)
        return grid

    def check_args(self, args: Sequence) -> None:
        """Every launch-time check, before any work: count, kinds, dtypes, ranks, devices, layouts."""
        from tilestack.lang.launch import check_args
        check_args(self, args)

    # ---- code ----------------------------------------------------------------------------------------------
    def source(self, backend: str = "triton") -> str:
        """The generated source for ``backend`` (Triton: the @triton.jit function, readable)."""
        from tilestack.backends import get_backend
        return get_backend(backend).source(self)

    def passes(self, backend: str = "triton", print_after=(), **options) -> list[tuple[str, KernelIR]]:
        """Every stage of ``backend``'s pass pipeline for this trace: [("traced", ir), (pass name, ir), ...];
        ``print_after`` names passes whose output to print ("all" for every one)."""
        from tilestack.backends import get_backend
        return get_backend(backend).lower(self.ir, print_after=print_after, **options)[1]

    def ir_after(self, name: str, backend: str = "triton", **options) -> KernelIR:
        """The IR after pass ``name`` of ``backend``'s pipeline (``print(traced.ir_after("dce"))``)."""
        stages = dict(self.passes(backend, **options))
        if name not in stages:
            raise KeyError(f"{backend} has no pass {name!r}; its stages are {list(stages)}")
        return stages[name]

    def launcher(self, args: Sequence, backend: str | None = None, options: dict[str, Any] | None = None):
        """The prebuilt launcher for the launch signature of ``args``: every launch-time check runs here, once
        per signature, then the backend prepares (compiles, computes the grid and the constant arguments) with
        its launch ``options`` (over the kernel's default options; those the kernel's constants set win)."""
        from tilestack.backends import get_backend, pick_backend

        self.check_args(args)
        defaults = self.kernel.options
        if defaults:
            unknown = sorted(set(defaults) - _launch_option_names())
            if unknown:
                raise LaunchError(f"{self.name}: default launch options {unknown} are no backend's; expected "
                                  f"some of {sorted(_launch_option_names())}")
            # values too, as those given at launch are: options=dict(num_warps='4') ran on the reference backend
            # (which ignores them) and failed only on the GPU
            from tilestack.backends import check_launch_options
            check_launch_options(f"{self.name} (its default options=)", defaults)
            options = {**defaults, **(options or {})}
        # only None picks the default: backend='' (or 0, False) ran on it without a word, where 'Triton' is refused
        name = backend if backend is not None else pick_backend(args)
        launch = get_backend(name).prepare(self, args, options)
        outputs, steps = self._outputs, self._step_plans
        if not outputs and not steps:
            return launch
        from tilestack.lang.launch import overlap_guard
        overlaps = overlap_guard(self, args)   # (where a written tensor could share memory with another argument)

        # per call, as none is in the launch key: an output that requires grad, in grad mode (the kernel would
        # write it unseen by autograd), an inference tensor written outside inference mode (torch refuses such an
        # in-place update: the reference backend failed after running, Triton wrote it) and a ts.range loop's
        # runtime step. Inside inference mode (grad off there too) the outputs are not looked at.
        # After the launch, each written tensor's version counter is bumped as an in-place torch op bumps it: autograd
        # then refuses a backward through a tensor the kernel overwrote (saved by exp, say), as it does on the
        # reference backend (whose copy back is such an op), where Triton's writes went unseen and the gradients were
        # silently wrong.
        def checked(args, _launch=launch, _outputs=outputs, _grad=torch.is_grad_enabled,
                    _infer=torch.is_inference_mode_enabled, _bump=torch.autograd.graph.increment_version):
            if _outputs and not _infer():
                grad = _grad()
                for i in _outputs:
                    if grad and args[i].requires_grad:
                        refuse_grad_output(self.name, self.ir.params[i].name, args[i])
                    if args[i].is_inference():
                        refuse_inference_output(self.name, self.ir.params[i].name, args[i])
            if steps:
                self.check_steps(args)
            if overlaps is not None:
                overlaps(args)
            result = _launch(args)
            if _outputs:
                _bump([args[i] for i in _outputs])
            return result
        return checked

    def check_steps(self, args: Sequence) -> None:
        """LaunchError where a ts.range loop's runtime step, computed from these arguments, is not positive: the
        reference refuses it when it runs, Triton's interpreter ran no trips (-1) or failed inside Triton (0),
        and on a GPU a step of 0 never ends."""
        for plan, step, where in self._step_plans:
            dims = {i: tuple(args[i].shape) for i in range(len(args)) if isinstance(self.signature[i], tuple)}
            m = ScalarMachine(dims, {i: a for i, a in enumerate(args) if not isinstance(self.signature[i], tuple)})
            try:
                for ins in plan:
                    m.eval(ins)
            except ValueError:   # (it reads a block id: only the kernel knows it)
                continue
            v = int(m.values[step])
            if v <= 0:
                raise LaunchError(f"{self.name}: the ts.range loop at {where} has step {v} for these arguments; a "
                                  "runtime step must be positive (a negative step must be a compile-time int)")

    def run(self, *args, backend: str | None = None, **kwargs):
        """Launch this trace. Launchers live in the kernel's cache, under the key ``launcher_for`` gives these
        arguments and constants; a miss checks the arguments against this trace (its dtypes and ranks). Runtime
        arguments may be given by keyword or left to their defaults, as in the kernel's own call."""
        if kwargs or len(args) != len(self.signature):
            args = self._bound(args, kwargs)
        cache = self.kernel._launchers
        try:
            key = (launch_key(args), tuple(self.constants.items()), backend, knobs.backend, knobs.triton_interpret)
            launcher = cache.get(key)
        except (TypeError, RuntimeError):
            key, launcher = None, None
        if launcher is None:
            if _has_numpy_scalar(args):
                return self.run(*plain_numbers(args), backend=backend)
            launcher = self.launcher(args, backend)
            if key is not None:
                remember(cache, key, launcher)
        return launcher(args)

    __call__ = run

    def __repr__(self) -> str:
        return f"<traced {self.name} {self.signature} {self.constants}>"
