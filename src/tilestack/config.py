"""Environment knobs, read in one place.

    from tilestack import config
    config.knobs.backend            # "auto" | "reference" | "triton"
    with config.override(backend="reference"):
        ...                         # scoped, for tests

Library code reads ``config.knobs``; it never calls ``os.getenv`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path

from tilestack.backends import NAMES as _BACKEND_NAMES

BACKENDS = ("auto", *_BACKEND_NAMES)   # the knob's choices: "auto" or a registered backend
SDPA_DROPOUT = ("auto", "fused", "torch")


@dataclasses.dataclass
class Knobs:
    backend: str = "auto"
    """Default backend for kernels: ``auto`` picks Triton on a GPU and the reference executor elsewhere."""
    cache_dir: Path = Path.home() / ".cache" / "tilestack"
    """Where tuned configs, measured device ceilings and result stores live."""
    triton_interpret: bool = False
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    sdpa_dropout: str = "auto"
    """Where the SDPA drop-in sends ``dropout_p > 0``: ``fused`` (tilestack's dropout kernels), ``torch`` (torch's
    own SDPA), or ``auto``: torch's on a GPU, where the fused kernels were measured slower (docs/performance.md),
    the fused kernels elsewhere. ``tilestack.attention(dropout_p=...)`` always runs the fused kernels."""

    @classmethod
    def from_env(cls) -> Knobs:
        env = os.environ
        backend = env.get("TILESTACK_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"TILESTACK_BACKEND={backend!r}; expected one of {BACKENDS}")
        # expanduser: a "~" the shell did not expand (a quoted value, an env file of docker or systemd) made a folder
        # named "~" in whatever folder a run started in
        if "TILESTACK_CACHE_DIR" in env and not env["TILESTACK_CACHE_DIR"].strip():
            # (Path("") is ".": tuned tables, ceilings and result stores written to whatever folder a run starts in)
            raise ValueError(f"TILESTACK_CACHE_DIR={env['TILESTACK_CACHE_DIR']!r}; expected a folder path (unset it "
                             f"for the default {cls.cache_dir})")
        try:
            cache = Path(env["TILESTACK_CACHE_DIR"]).expanduser() if "TILESTACK_CACHE_DIR" in env else cls.cache_dir
        except RuntimeError as e:   # "~nobody/x": pathlib's bare RuntimeError, naming neither the variable nor why
            raise ValueError(f"TILESTACK_CACHE_DIR={env['TILESTACK_CACHE_DIR']!r}: its '~' names no home folder "
                             f"here ({e}); expected a folder path") from None
        dropout = env.get("TILESTACK_SDPA_DROPOUT", "auto")
        if dropout not in SDPA_DROPOUT:
            raise ValueError(f"TILESTACK_SDPA_DROPOUT={dropout!r}; expected one of {SDPA_DROPOUT}")
        return cls(backend=backend, cache_dir=cache, triton_interpret=_triton_interpret(env), sdpa_dropout=dropout)


# What Triton itself takes as TRITON_INTERPRET on (its knobs read the variable case-insensitively as one of these).
# Only "1" counted here: TRITON_INTERPRET=true made Triton interpret while tilestack's launches compiled for the
# GPU (and refused CPU tensors with "set TRITON_INTERPRET=1"), each reading the one variable its own way.
_TRITON_TRUE = ("1", "true", "yes", "on", "y")


def _triton_interpret(env) -> bool:
    return env.get("TRITON_INTERPRET", "0").lower() in _TRITON_TRUE


def _is_the_command() -> bool:
    """Whether this process is the ``tilestack`` command (its console script, or ``python -m tilestack.cli``)."""
    import sys

    argv = list(getattr(sys, "orig_argv", sys.argv))
    if Path(sys.argv[0]).name == "tilestack":
        return True
    return any(a == "-m" and b in ("tilestack.cli", "tilestack.cli.__main__")
               for a, b in zip(argv, argv[1:], strict=False))


def _knobs_or_exit() -> Knobs:
    """The knobs of this process's environment. A bad TILESTACK_* value is a ValueError naming the variable at
    ``import tilestack``; for the ``tilestack`` command the same message, as a usage error (exit 2): the command
    imports this module before any of its own code runs, so the error came out as a Python traceback."""
    try:
        return Knobs.from_env()
    except ValueError as e:
        if not _is_the_command():
            raise
        import sys

        sys.stderr.write(f"Error: {e}\n")
        raise SystemExit(2) from None


knobs = _knobs_or_exit()


@contextlib.contextmanager
def override(**changes) -> Iterator[Knobs]:
    """Change knobs for the duration of a ``with`` block (tests, benchmarks)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Knobs)}
    if unknown:
        raise TypeError(f"override: unknown knobs {sorted(unknown)}")
    old = {k: getattr(knobs, k) for k in changes}
    for k, v in changes.items():
        setattr(knobs, k, v)
    try:
        yield knobs
    finally:
        for k, v in old.items():
            setattr(knobs, k, v)


def use_triton_interpreter() -> None:
    """Let Triton's interpreter run tilestack's kernels in this process, whether or not Triton was imported first.

    The Triton backend decides per launch whether a kernel runs compiled (CUDA tensors) or under Triton's
    interpreter (CPU tensors with no GPU present, or ``TRITON_INTERPRET=1``), compiles the kernel for that mode
    itself, and calls this first. What Triton fixes when it is imported is its own library: ``tl.max``,
    ``tl.sum``, ``tl.cdiv`` and the other helpers written with ``@triton.jit`` can be interpreted only if
    ``TRITON_INTERPRET=1`` was set before ``import triton``; otherwise an interpreted kernel that calls one
    fails ("Cannot call @triton.jit'd outside of the scope of a kernel"). Here each such helper learns to run
    under the interpreter too. The compiler never calls a jitted function (it reads its source), so compiling
    for a GPU in the same process is unchanged. Cheap after the first call.
    """
    import sys

    import triton.language  # noqa: F401  (loads Triton's library)

    helper = _interpretable_jit_class()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for value in list(vars(module).values()):
            if type(value) is helper.__base__:
                value.__class__ = helper   # the same object: every reference to it (tl.max, tensor.max) follows


_INTERPRETABLE_JIT: type | None = None


def _interpretable_jit_class() -> type:
    """A subclass of Triton's ``JITFunction`` that, when called (only the interpreter calls one), runs the
    function under the interpreter; built once, on first use, so ``import tilestack`` never imports Triton."""
    global _INTERPRETABLE_JIT
    if _INTERPRETABLE_JIT is not None:
        return _INTERPRETABLE_JIT
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    class InterpretableJITFunction(JITFunction):
        def __call__(self, *args, **kwargs):
            # what the interpreter does for a device function, with Triton's language patched for the call
            # only: a GPU compile later in this process sees the language unpatched
            rewritten = self.__dict__.get("_interpreted")
            if rewritten is None:
                rewritten = self.__dict__["_interpreted"] = interpreter.InterpretedFunction(self.fn).rewrite()
            scope = interpreter._patch_lang(self.fn)
            try:
                return rewritten(*args, **kwargs)
            finally:
                scope.restore()

        def __get__(self, obj, objtype=None):
            # ``x.max(0)`` on an interpreted tensor: bind x as the first argument, as Triton's interpreter
            # does for its own helpers. The compiler reads the unbound function (its tensors hold IR values).
            if obj is not None and isinstance(getattr(obj, "handle", None), interpreter.TensorHandle):
                return functools.partial(self.__call__, obj)
            return self

    _INTERPRETABLE_JIT = InterpretableJITFunction
    return InterpretableJITFunction
