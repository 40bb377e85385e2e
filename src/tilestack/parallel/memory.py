"""Activation memory: what autograd keeps for backward, measured, beside Korthikanti et al.'s formulas.

    nbytes = saved_activation_bytes(lambda: lm_loss(model(idx), targets))   # bytes held for backward
    korthikanti_bytes(s=N, b=B, h=d, a=heads, policy="selective")           # the paper's count per layer

``saved_activation_bytes`` counts every tensor saved for backward while ``fn`` runs, once per storage (a view of a
saved tensor costs nothing more), parameters excluded. Tensors saved inside a checkpointed region are not held
(checkpoint's own hooks take them), so it sees what recompute saves.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), one layer, 16-bit
activations, with dropout: s b h (34 + 5 a s / h) bytes; selective recompute (attention scores, softmax, its
dropout recomputed) 34 s b h; full recompute 2 s b h (the layer's input). Without dropout (this model has none)
the two s b h dropout masks, the a s^2 b score mask and the 2 a s^2 b dropout output go: s b h (32 + 2 a s / h)
(2 a s^2 b: the softmax output, kept by the product with V), and 32 s b h with selective recompute. Measured on
this model the difference is LayerNorm's per-row mean and 1/std and the (s, s) causal mask: under 1 %.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

POLICIES = ("none", "selective", "full")


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params: list[torch.Tensor] | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (parameters excluded);
    runs the backward of ``fn()``'s result afterwards so that nothing is left hanging."""
    skip = {p.untyped_storage().data_ptr() for p in (params or [])}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip and st.data_ptr() != 0:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(seen.values())


def korthikanti_bytes(*, s: int, b: int, h: int, a: int, policy: str = "none", dropout: bool = True,
                      bytes_per_element: int = 2) -> float:
    """Activation bytes per transformer layer from Korthikanti et al. (see the module docstring); 16-bit
    activations by default, ``bytes_per_element=4`` scales it to fp32."""
    if policy not in POLICIES:
        raise ValueError(f"korthikanti_bytes: policy={policy!r}; expected one of {POLICIES}")
    scale = bytes_per_element / 2
    if policy == "full":
        return 2 * s * b * h * scale
    linear, scores = (34, 5) if dropout else (32, 2)
    per = s * b * h * linear + (0 if policy == "selective" else scores * a * s * s * b)
    return per * scale
