"""scripts/bench_inference.py measures what it says: its KV-cache decoder gives the full model's next-token
logits, and its GEMM case runs every variant at --quick sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tilestack.bench.models import GPT, GPT2_TINY

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inference.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decoder_matches_the_full_forward():
    bench = _script()
    torch.manual_seed(0)
    gpt = GPT(GPT2_TINY, impl="torch").eval()
    B, L = 3, 9
    idx = torch.randint(0, GPT2_TINY.vocab, (B, L))
    dec = bench.GPTDecoder(gpt, B, L)
    with torch.no_grad():
        for pos in range(L):                     # prefill the cache token by token
            got = dec(idx[:, pos:pos + 1], torch.tensor(pos))
        want = gpt(idx)[:, -1]                   # (B, V)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gemm_case_quick():
    bench = _script()
    rows = bench.run_gemm_case(quick=True)
    assert {r["variant"] for r in rows} == set(bench.GEMM_VARIANTS)
    for r in rows:   # every variant approximates the bf16 product as its format allows
        assert r["max_rel_err"] < (1e-2 if r["variant"].startswith(("bf16", "int8")) else 0.1), r


def test_output_errors_are_max_and_norm_relative():
    bench = _script()
    want = torch.tensor([10.0, 0.0, 0.0, 0.0])
    got = torch.tensor([10.0, 1.0, 0.0, 0.0])
    worst, norm = bench.output_errors(got, want)
    assert worst == 0.1 and norm == 0.1
    got = torch.tensor([10.0, 1.0, 1.0, 1.0])          # three elements off by 1: max the same, norm sqrt(3) larger
    worst, norm = bench.output_errors(got, want)
    assert worst == 0.1 and abs(norm - 3**0.5 / 10) < 1e-12


def test_bars_use_the_norm_relative_error():
    bench = _script()
    row = dict(case="gpt2-prefill", latency_ms=1.0, max_rel_err=1.2e-2)
    rows = [dict(row, variant="eager", latency_ms=2.0, max_rel_err=0.0, norm_rel_err=0.0),
            dict(row, variant="inductor", norm_rel_err=4e-3),
            dict(row, variant="tilestack", norm_rel_err=4e-3)]
    bars = "\n".join(bench.check_bars(rows))
    assert "||d||/||eager|| 4.0e-03 (ok, bar 0.01); max|d|/max|eager| 1.2e-02 (Inductor's 1.2e-02; no bar)" in bars
    rows[2]["norm_rel_err"] = 2e-2
    assert "2.0e-02 (MISSED" in "\n".join(bench.check_bars(rows))


def test_gemm_case_picks_variants_and_keeps_the_baseline():
    bench = _script()
    rows = bench.run_gemm_case(quick=True, variants=["fp8-act"])
    assert {r["variant"] for r in rows} == {"bf16-torch", "fp8-act"}
    assert all("error" not in r and r["norm_rel_err"] < 0.1 for r in rows), rows
