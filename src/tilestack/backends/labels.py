"""Names of kernel launches for profilers (NVTX ranges), shared by the backends and ``tilestack.perf.nvtx``.

    range_name("attention_fwd", {"BM": 128, "BN": 64})   # "attention_fwd[BM=128,BN=64]"
    PREFIX + range_name(...)                             # what a launch's NVTX range is called
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "tilestack:"  # every range tilestack opens starts with this, to tell them from torch's own ranges


def range_name(kernel: str, config: Mapping[str, Any] | None = None) -> str:
    """``"kernel[k=v,...]"`` with keys sorted; ``/`` replaced since NVTX filters use it to nest ranges."""
    body = ",".join(f"{k}={config[k]}" for k in sorted(config)) if config else ""
    name = f"{kernel}[{body}]" if body else kernel
    return name.replace("/", "|")
