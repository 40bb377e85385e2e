"""Activation recompute keeps what Korthikanti et al. count: measured bytes saved for backward per layer (the
difference between a 2- and a 1-layer model) against the no-dropout formulas, fp32."""

import pytest
import torch

from tilestack.parallel import GPT, ModelConfig, apply_recompute, lm_loss, make_batch
from tilestack.parallel.memory import korthikanti_bytes, saved_activation_bytes

S, B, H, A = 64, 2, 64, 4


def _saved(n_layer: int, policy: str) -> int:
    cfg = ModelConfig(n_layer=n_layer, d=H, n_head=A, vocab=64, max_seq=S)
    model = GPT(cfg, seed=0)
    apply_recompute(model, policy)
    idx, targets = make_batch(cfg, B, S)
    return saved_activation_bytes(lambda: lm_loss(model(idx), targets), list(model.parameters()))


@pytest.mark.parametrize("policy, rel", [("none", 0.02), ("selective", 0.02), ("full", 0.0)])
def test_bytes_per_layer_match_korthikanti(policy, rel):
    per_layer = _saved(2, policy) - _saved(1, policy)
    expect = korthikanti_bytes(s=S, b=B, h=H, a=A, policy=policy, dropout=False, bytes_per_element=4)
    assert abs(per_layer - expect) <= rel * expect, f"{policy}: {per_layer} bytes per layer, formula {expect}"


def test_recompute_gives_the_same_gradients():
    cfg = ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=S)
    idx, targets = make_batch(cfg, B, 16)
    grads = {}
    for policy in ("none", "selective", "full"):
        model = GPT(cfg, seed=0)
        apply_recompute(model, policy)
        lm_loss(model(idx), targets).backward()
        grads[policy] = [p.grad for p in model.parameters()]
    for policy in ("selective", "full"):
        for g, r in zip(grads[policy], grads["none"], strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_tilestack_attention_core_matches_math():
    """The model on tilestack's attention kernels (Triton's interpreter here) against the explicit scores."""
    import dataclasses
    cfg = ModelConfig(n_layer=1, d=32, n_head=2, vocab=64, max_seq=16)
    idx, targets = make_batch(cfg, 1, 16)
    out = {}
    for attention in ("math", "tilestack"):
        model = GPT(dataclasses.replace(cfg, attention=attention), seed=0)
        loss = lm_loss(model(idx), targets)
        loss.backward()
        out[attention] = (loss.detach(), [p.grad for p in model.parameters()])
    torch.testing.assert_close(out["tilestack"][0], out["math"][0], rtol=1e-5, atol=1e-6)
    for g, r in zip(out["tilestack"][1], out["math"][1], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
