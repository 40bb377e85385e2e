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
import os
from collections.abc import Iterator
from pathlib import Path

BACKENDS = ("auto", "reference", "triton")


@dataclasses.dataclass
class Knobs:
    backend: str = "auto"
    """Default backend for kernels: ``auto`` picks Triton on a GPU and the reference executor elsewhere."""
    cache_dir: Path = Path.home() / ".cache" / "tilestack"
    """Where tuned configs, measured device ceilings and result stores live."""
    triton_interpret: bool = False
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""

    @classmethod
    def from_env(cls) -> Knobs:
        env = os.environ
        backend = env.get("TILESTACK_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"TILESTACK_BACKEND={backend!r}; expected one of {BACKENDS}")
        cache = Path(env["TILESTACK_CACHE_DIR"]) if "TILESTACK_CACHE_DIR" in env else cls.cache_dir
        return cls(backend=backend, cache_dir=cache, triton_interpret=env.get("TRITON_INTERPRET") == "1")


knobs = Knobs.from_env()


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
    """Make Triton run kernels on the CPU through its interpreter.

    Triton decides at import time (its own library functions are jitted then), so this must run before the
    first ``import triton``; afterwards it only checks that Triton was imported that way.
    """
    import sys

    from tilestack.errors import BackendError

    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        knobs.triton_interpret = True
        return
    import triton

    if not triton.knobs.runtime.interpret:
        raise BackendError("Triton was imported before tilestack could turn on its interpreter, and this machine "
                           "has no GPU; set TRITON_INTERPRET=1 in the environment before starting Python")
