"""Model-step cases of ``tilestack bench``: one whole training step (forward, backward, AdamW) of a GPT-2- and a
Llama-shaped model on tilestack's kernels, beside the same step on torch's (SDPA, F.layer_norm, ...), with the
same weights and batch.

    for case in step_cases("cuda"): ...      # GPT-2 small at 4 sizes, Llama-1B at 2 (tilestack.bench.models)
    for case in step_cases("cpu"): ...       # one-layer tiny models, one ragged size (Triton's interpreter)

The step's FLOPs are counted from the model's shapes (:func:`step_cost`); its bytes are the parameter traffic only
(weights read by the forward and the backward, gradients written, AdamW's reads and writes of the parameters and
both moments), a lower bound: activations are left out. The correctness check runs the tiny model at a ragged
length through tilestack's Triton kernels and through the reference executor, against torch's step in float64:
loss and every gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tilestack import config as ts_config
from tilestack.bench.cases import BACKEND, Case
from tilestack.perf import formulas

STEP_DTYPE = "bf16"
STEP_TOL = 1e-2              # relative error of the loss and all gradients together, bf16 against float64 (~2e-3)
CHECK_BATCH = (1, 37)        # (B, N) of the correctness check: N ragged against every tile size
GPU_SIZES = {                # model -> [(B, N)], the sizes of issue 8: GPT-2 small, Llama-style 1B with GQA
    "gpt2": [(16, 512), (8, 1024), (4, 2048), (1, 8192)],
    "llama": [(4, 2048), (1, 8192)],
}
CPU_SIZES = {"gpt2": [CHECK_BATCH], "llama": [CHECK_BATCH]}
WEIGHT_READS = 2             # the forward and the backward each read every weight once
GRAD_WRITES = 1              # the backward writes every gradient once
ADAMW_STREAMS = (4, 3)       # AdamW reads parameter, gradient and both moments; writes parameter and moments


def _models():
    """name -> (model class, full config, tiny config): imported here so the kernel cases never need them."""
    from tilestack.bench import models as m

    # the CPU runs one layer: Triton's interpreter takes seconds per kernel launch
    return {"gpt2": (m.GPT, m.GPT2_SMALL, dataclasses.replace(m.GPT2_TINY, n_layer=1)),
            "llama": (m.Llama, m.LLAMA_1B, dataclasses.replace(m.LLAMA_TINY, n_layer=1))}


def _heads(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a GPT or Llama config."""
    kv = getattr(cfg, "n_kv_head", cfg.n_head)
    return cfg.n_head, kv, getattr(cfg, "head_dim", None) or cfg.d // cfg.n_head


def step_cost(model, B: int, N: int, dtype: str = STEP_DTYPE) -> formulas.Cost:
    """FLOPs and (parameter) bytes of one training step of ``model`` on a (B, N) batch.

    FLOPs: every nn.Linear 2*T*in*out forward and twice that backward (T = B*N tokens), the LM head likewise
    (GPT-2 ties it to the token embedding, so it is no nn.Linear there), causal attention per layer forward and
    backward (:func:`tilestack.perf.formulas.attention`). Norms, activations and the loss's softmax are left out
    (a few percent). Bytes: the parameter traffic of the step (see the module docstring)."""
    from torch import nn

    cfg = model.cfg
    T = B * N
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        linear += cfg.d * cfg.vocab                       # the tied LM head: x @ wte.T
    flops = 3 * formulas.FLOPS_PER_MAC * T * linear       # forward 2*T*in*out, backward twice that
    H, Hkv, D = _heads(cfg)
    for backward in (False, True):
        flops += cfg.n_layer * formulas.attention(B, H, N, N, D, dtype, causal=True, kv_heads=Hkv,
                                                  backward=backward).flops
    params = sum(p.numel() for p in model.parameters()) * formulas.dtype_bytes(dtype)
    reads, writes = ADAMW_STREAMS
    return formulas.Cost(flops, (WEIGHT_READS + reads) * params, (GRAD_WRITES + writes) * params)


def _rel(got: list, want: list) -> float:
    """Relative error of a list of tensors against another, as one vector (inf if any is not finite)."""
    import math

    import torch

    a = torch.cat([t.detach().double().flatten().cpu() for t in got])
    b = torch.cat([t.detach().double().flatten().cpu() for t in want])
    if not bool(a.isfinite().all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_and_grads(model, batch, backend: str | None) -> list:
    """[loss, *gradients] of one forward and backward (no optimizer step), run by ``backend``'s kernels."""
    with ts_config.override(backend=backend or "auto"):
        loss = model(*batch)
        loss.backward()
    out = [loss.detach().reshape(1)] + [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _check(cls, cfg, dev: str) -> dict:
    """tilestack's step (Triton, then the reference executor) and torch's bf16 step against torch's in float64."""
    import torch

    from tilestack.bench.models import make_batch

    batch = make_batch(cfg, *CHECK_BATCH, seed=1, device=dev)
    want = _loss_and_grads(cls(cfg, impl="torch", seed=0).to(dev, torch.float64), batch, None)
    ours_model = cls(cfg, impl="tilestack", seed=0).to(dev, torch.bfloat16)
    ours = _loss_and_grads(ours_model, batch, BACKEND)
    reference = _loss_and_grads(ours_model, batch, "reference")
    torch_bf16 = _loss_and_grads(cls(cfg, impl="torch", seed=0).to(dev, torch.bfloat16), batch, None)
    return {"vs_float64": _rel(ours, want), "vs_reference": _rel(ours, reference),
            "reference_vs_float64": _rel(reference, want), "baseline_vs_float64": _rel(torch_bf16, want),
            "tol": STEP_TOL}


def step_case(device: str, name: str, B: int, N: int, *, tiny: bool) -> Case:
    """The training step of model ``name`` ("gpt2" or "llama") at (B, N), tilestack's kernels against torch's."""
    import torch

    from tilestack.bench.models import make_batch, make_optimizer, train_step

    cls, full, small = _models()[name]
    cfg = small if tiny else full

    def make(dev) -> dict[str, Any]:
        model = cls(cfg, impl="torch", seed=0).to(dev, torch.bfloat16)
        return {"model": model, "opt": make_optimizer(model), "batch": make_batch(cfg, B, N, seed=1, device=dev)}

    def ours(x):
        with ts_config.override(backend=BACKEND):       # Triton on the GPU, its interpreter on a CPU
            return train_step(x["model"].set_impl("tilestack"), x["batch"], x["opt"])

    def baseline(x):
        return train_step(x["model"].set_impl("torch"), x["batch"], x["opt"])

    return Case(
        f"{name}_step", f"B={B} N={N} layers={cfg.n_layer} d={cfg.d} bf16", make,
        ours=ours, ours_cost=lambda x: step_cost(x["model"], B, N),
        baseline_name=f"{name} step on torch (SDPA)", baseline=baseline, baseline_cost=None,
        check=lambda dev: _check(cls, small, dev), items=B * N, item_name="tokens",
        config={"model": name, "B": B, "N": N, "layers": cfg.n_layer, "d": cfg.d}, rotate=False)


def step_cases(device: str, full: bool = True) -> list[Case]:
    """The model steps: GPU sizes on a GPU (with ``full``), else the tiny models at the check's size."""
    sizes = GPU_SIZES if device == "cuda" and full else CPU_SIZES
    tiny = sizes is CPU_SIZES
    return [step_case(device, name, B, N, tiny=tiny) for name, bn in sizes.items() for B, N in bn]
