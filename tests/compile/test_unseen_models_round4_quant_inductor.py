"""Round 4's unseen models (unseen_blocks_round4.py) quantized by ``tilestack.quantize`` (int8 and fp8 weights,
fp8 weights and activations) and compiled through the backend: the compiled outputs are the quantized model's
eager ones, which stay near the float model's. Then through Inductor, run with CI=1 as the project's CI runs it
(Inductor refuses an implicit fallback for an op with a decomposition there): a KV-cache decoder mutating its
buffers, training, ``numerics="exact"`` bit-equal to eager in bf16, Inductor's modes on the CPU, and a model
that opens a torch.autocast region itself."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: autouse
from unseen_blocks_round4 import (
    BertSdpaLayer,
    GPTNeoXLayer,
    IndexCopyCachedDecoder,
    NormSpellings,
    Qwen2Layer,
    WhisperEncoder,
    seeded,
)

import tilestack
import tilestack.compile as tc

BF16 = torch.bfloat16


def _rel(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _example(name: str):
    torch.manual_seed(1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return {"neox": (GPTNeoXLayer, (torch.randn(2, 10, 32, dtype=BF16), mask)),
            "qwen": (Qwen2Layer, (torch.randn(2, 10, 32, dtype=BF16),)),
            "whisper": (WhisperEncoder, (torch.randn(2, 8, 24, dtype=BF16),)),
            "bert": (BertSdpaLayer, (torch.randn(2, 10, 32, dtype=BF16), mask)),
            "norms": (NormSpellings, (torch.randn(2, 10, 32, dtype=BF16),))}[name]


# ---- tilestack.quantize on the round's models --------------------------------------------------------------------
@pytest.mark.parametrize("name,mode,fused", [("neox", "int8", 3), ("qwen", "fp8", 3), ("whisper", "int8", 2),
                                             ("bert", "fp8-act", 1), ("norms", "fp8-act", 8)])
def test_quantized_model(name, mode, fused):
    """The quantized layers' activations and residual adds fused into tilestack::quant_linear's GEMMs (fp8-act:
    the norms write the next layer's fp8 activations, fp8_chain); the compiled output within 2e-2 of the quantized
    model's eager one (fp8's steps are 6 %: a norm's f32 result and eager's bf16 one round to neighbouring steps
    here and there), and both within 3e-2 of the float model's."""
    cls, args = _example(name)
    model = seeded(cls, dtype=BF16)
    float_model = copy.deepcopy(model)
    qmodel = tilestack.quantize(model, mode, calibration=[args] if mode == "fp8-act" else None)
    with torch.no_grad():
        want, exact = qmodel(*args), float_model(*args)
        got = tilestack.optimize(qmodel, check=True, inner="aot_eager")(*args)
    report = tc.last_report()
    _consistent(report)
    epilogues = [s.what for s in report.swaps if s.pattern == "linear_epilogue"]
    assert len(epilogues) == fused and all("quant_linear_epilogue" in w for w in epilogues), str(report)
    assert _rel(got, want) < 2e-2, _rel(got, want)
    assert _rel(want, exact) < 3e-2 and _rel(got, exact) < 3e-2, (_rel(want, exact), _rel(got, exact))


# ---- through Inductor, under CI=1 -----------------------------------------------------------------------------
@pytest.fixture
def ci(monkeypatch):
    monkeypatch.setenv("CI", "1")


def test_index_copy_cached_decoder_through_inductor(ci):
    """The caches written by index_copy_ in the compiled graph (Inductor functionalizes and copies back), the
    tilestack attention ops extern calls: outputs and caches as eager's in bf16."""
    eager, model = seeded(IndexCopyCachedDecoder, dtype=BF16), seeded(IndexCopyCachedDecoder, dtype=BF16)
    compiled = tilestack.optimize(model)
    torch.manual_seed(1)
    enc = torch.randn(2, 7, 32, dtype=BF16)
    with torch.no_grad():
        for start, n in ((0, 6), (6, 1)):
            x, positions = torch.randn(2, n, 32, dtype=BF16), torch.arange(start, start + n)
            _close(compiled(x, enc, positions), eager(x, enc, positions), BF16, f"step at {start}")
            _close(model.cache_k, eager.cache_k, BF16, f"cache_k after the step at {start}")
    assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())


def test_whisper_encoder_exact_in_bf16_under_reduce_overhead_is_eagers_bits(ci):
    """numerics="exact" with mode="reduce-overhead" on the CPU (no CUDA graphs to capture): the conv front end, the
    LayerNorms (eager's kernels as extern calls), the attention and the GELU MLPs give eager's bits; nothing swapped.
    (max-autotune-no-cudagraphs gives the same bits, after 13 s of benchmarking GEMM choices: not run here.)"""
    model = seeded(WhisperEncoder, dtype=BF16)
    torch.manual_seed(1)
    mel = torch.randn(2, 8, 24, dtype=BF16)
    with torch.no_grad():
        got = tilestack.optimize(model, numerics="exact", mode="reduce-overhead")(mel)
        assert torch.equal(got, model(mel))
    assert not tc.last_report().swaps, str(tc.last_report())


class AutocastWhisper(torch.nn.Module):
    """An f32 Whisper encoder whose forward opens a bf16 autocast region around the whole encoder."""

    def __init__(self):
        super().__init__()
        self.encoder = WhisperEncoder()

    def forward(self, mel):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.encoder(mel)


def test_an_autocast_region_the_model_opens():
    """The convs and Linears run in bf16 inside the region: both attentions (q, k, v autocast's bf16 products) and
    the norms are swapped, the output bf16 as eager's; the Linears' epilogues are declined with the reason (their
    weights stay f32 in the graph, autocast casts them inside the call)."""
    model = seeded(AutocastWhisper)
    mel = torch.randn(2, 8, 24)
    since = len(tc.reports())
    with torch.no_grad():
        _, swaps = _run(model, mel, dtype=BF16)
    assert swaps.get("explicit_attention") == 2 and swaps.get("add_norm") == 4 and swaps.get("norm") == 1, swaps
    declined = [why for r in tc.reports()[since:] for p, _, why in r.declined if p == "linear_epilogue"]
    assert declined and all("the weight torch.float32" in why for why in declined), declined
