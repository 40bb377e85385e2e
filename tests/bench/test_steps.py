"""Model-step cases of the bench: the step's FLOP count against torch's own counter, and the correctness check
catching a wrong model. The check runs through the reference executor here (seconds); `.ci/run` runs the whole
step through Triton's interpreter as the README's main job."""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tilestack.bench import models, steps
from tilestack.perf import formulas


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_step_flops_are_the_matmuls_torch_counts_plus_causal_attention(name):
    cls, _, tiny = steps._models()[name]
    cfg = dataclasses.replace(tiny, n_layer=2)
    B, N = 2, 24
    model = cls(cfg, impl="torch")
    with FlopCounterMode(display=False) as counter:
        model(*models.make_batch(cfg, B, N, seed=1)).backward()
    matmuls = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    H, Hkv, D = steps._heads(cfg)
    attention = sum(formulas.attention(B, H, N, N, D, causal=True, kv_heads=Hkv, backward=bw).flops
                    for bw in (False, True)) * cfg.n_layer
    cost = steps.step_cost(model, B, N)
    assert cost.flops == pytest.approx(matmuls + attention, rel=1e-12)
    params = sum(p.numel() for p in model.parameters()) * 2      # bf16
    assert (cost.bytes_read, cost.bytes_written) == (6 * params, 4 * params)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_step_check_passes_and_catches_a_wrong_attention(name, monkeypatch):
    monkeypatch.setattr(steps, "BACKEND", "reference")
    cls, _, tiny = steps._models()[name]
    ok = steps._check(cls, tiny, "cpu")
    assert ok["vs_float64"] < ok["tol"] and ok["vs_reference"] < ok["tol"], ok
    assert ok["vs_float64"] < 3 * ok["baseline_vs_float64"], ok        # about as close as torch's own bf16 step

    def forgets_the_mask(impl, q, k, v):        # tilestack's side attends to the future
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])

    original = models._causal_attention
    monkeypatch.setattr(models, "_causal_attention",
                        lambda impl, q, k, v: (forgets_the_mask if impl == "tilestack" else original)(impl, q, k, v))
    bad = steps._check(cls, tiny, "cpu")
    assert bad["vs_float64"] > bad["tol"], bad


def test_step_cases_gpu_sizes_are_issue_8s():
    gpu = {(c.name, c.config["B"], c.config["N"]) for c in steps.step_cases("cuda")}
    assert gpu == {("gpt2_step", 16, 512), ("gpt2_step", 8, 1024), ("gpt2_step", 4, 2048), ("gpt2_step", 1, 8192),
                   ("llama_step", 4, 2048), ("llama_step", 1, 8192)}
    cpu = steps.step_cases("cpu")
    assert {c.config["layers"] for c in cpu} == {1} and all(not c.rotate for c in cpu)
