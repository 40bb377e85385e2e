"""PyTorch 2 integration: tile kernels as ``torch.library`` custom ops with fake implementations and autograd,
so ``loss.backward()`` works and ``torch.compile`` keeps them in the graph.

    import tilestack
    o = tilestack.attention(q, k, v, causal=True)      # (B, H, N, D), like F.scaled_dot_product_attention
    o = tilestack.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=None,
                                               enable_gqa=False)  # torch's signature: the last two by keyword
    tilestack.patch(model)                             # F.scaled_dot_product_attention -> tilestack
"""

from tilestack.torch.attention import attention
from tilestack.torch.sdpa import patch, scaled_dot_product_attention

__all__ = ["attention", "patch", "scaled_dot_product_attention"]
