"""Names of kernel launches for profilers (NVTX ranges), shared by the backends and ``tilestack.perf.nvtx``.

    range_name("attention_fwd", {"BM": 128, "BN": 64})   # "attention_fwd[BM=128,BN=64]"
    PREFIX + range_name(...)                             # what a launch's NVTX range is called
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tilestack.errors import LaunchTypeError

PREFIX = "tilestack:"  # every range tilestack opens starts with this, to tell them from torch's own ranges


def range_name(kernel: str, config: Mapping[str, Any] | None = None) -> str:
    """``"kernel[k=v,...]"`` with keys sorted; ``/`` replaced since NVTX filters use it to nest ranges."""
    # (kernel=None failed in .replace, "'NoneType' object has no attribute 'replace'"; config="BM" with "string
    # indices must be integers"; keys of mixed types in sorted())
    if not isinstance(kernel, str):
        raise LaunchTypeError(f"range_name: kernel={kernel!r:.60} ({type(kernel).__name__}); expected the kernel's "
                              "name, a str")
    if config is not None and not (isinstance(config, Mapping) and all(isinstance(k, str) for k in config)):
        raise LaunchTypeError(f"range_name: config={config!r:.60} ({type(config).__name__}); expected None or a "
                              "dict of constants by name ({'BM': 128})")
    body = ",".join(f"{k}={config[k]}" for k in sorted(config)) if config else ""
    name = f"{kernel}[{body}]" if body else kernel
    return name.replace("/", "|")
