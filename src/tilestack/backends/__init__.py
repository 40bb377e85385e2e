"""Backends, one folder each, all reading the same IR, behind one protocol (``backends.base.Backend``).

    get_backend("reference").run(traced, args)    # NumPy, exact semantics, runs anywhere
    get_backend("triton").source(traced)          # the generated @triton.jit source
    get_backend("triton").lower(traced.ir)        # (lowered IR, [(pass, IR), ...])

``NAMES`` is the one list of backends (``tilestack.config`` derives its knob's choices from it). A backend's
module is imported when it is first asked for (Triton's import is slow), by the function registered here.
This module imports nothing of tilestack at its top, so ``tilestack.config`` can read ``NAMES``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _reference():
    from tilestack.backends.reference import BACKEND
    return BACKEND


def _triton():
    from tilestack.backends.triton import BACKEND
    return BACKEND


def _gluon():
    from tilestack.backends.gluon import BACKEND
    return BACKEND


_REGISTRY: dict[str, Callable] = {"reference": _reference, "triton": _triton, "gluon": _gluon}
NAMES: tuple[str, ...] = tuple(_REGISTRY)
BACKENDS = NAMES   # the former name


def get_backend(name: str):
    """The backend named ``name`` (a ``backends.base.Backend``)."""
    make = _REGISTRY.get(name) if isinstance(name, str) else None
    if make is None:
        from tilestack.errors import BackendError
        raise BackendError(f"backend={name!r}; expected one of {NAMES}")
    return make()


def launch_option_names() -> frozenset[str]:
    """Every launch option some backend takes (the fields of its ``Options``)."""
    import dataclasses
    return frozenset(f.name for name in NAMES for f in dataclasses.fields(get_backend(name).Options))


def check_launch_options(where: str, options: dict) -> None:
    """Each launch option some backend takes (num_warps=5, num_stages=0) must be one that some backend taking it
    accepts: else LaunchError, whatever backend runs (the reference ignores them, so a value no GPU backend
    accepts passed on the CPU and failed on the GPU)."""
    import dataclasses

    from tilestack.errors import BackendError, LaunchError
    for key, value in options.items():
        refusals = []
        for name in NAMES:
            Options = get_backend(name).Options
            if key not in {f.name for f in dataclasses.fields(Options)}:
                continue
            try:
                Options(**{key: value})
            except BackendError as e:
                refusals.append(str(e))
            else:
                break
        else:
            if refusals:
                raise LaunchError(f"{where}: launch option {key}={value!r} is refused by every backend that takes "
                                  f"it ({'; '.join(refusals)})")


def pick_backend(args: Sequence) -> str:
    """The backend a launch uses when none is named: the knob, else Triton for CUDA tensors, else reference."""
    from tilestack.config import knobs

    if knobs.backend != "auto":
        return knobs.backend
    on_cuda = any(getattr(getattr(a, "device", None), "type", None) == "cuda" for a in args)
    return "triton" if on_cuda else "reference"
