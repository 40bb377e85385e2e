"""PyTorch 2 integration: tile kernels as ``torch.library`` custom ops with fake implementations and autograd,
so ``loss.backward()`` works and ``torch.compile`` keeps them in the graph.

    import tilestack
    o = tilestack.attention(q, k, v, causal=True)      # (B, H, N, D), like F.scaled_dot_product_attention
"""

from tilestack.torch.attention import attention

__all__ = ["attention"]
