"""What the suite holds on each device: every library kernel's case, issue 8's GEMM sizes and dtypes, attention
through the public op, the model steps; and the CLI's help names every case."""

from __future__ import annotations

import importlib

from typer.testing import CliRunner

from tilestack.cli import _register, app

cases_module = importlib.import_module("tilestack.bench.cases")


def test_gpu_suite(monkeypatch):
    # the tuned-config lookups need a GPU: the defaults stand in for them here
    monkeypatch.setattr(cases_module, "gemm_config", lambda *a: {})
    monkeypatch.setattr(cases_module, "launch_config", lambda kernel, sig, device, n, default: dict(default))
    monkeypatch.setattr(cases_module, "row_config", lambda n, device: {})
    suite = cases_module.cases("cuda")
    keys = [(c.name, c.shape) for c in suite]
    assert len(keys) == len(set(keys)), "two cases share a name and shape: compare could not tell them apart"
    gemms = {(c.shape, c.dtype) for c in suite if c.name == "gemm"}
    assert gemms == {(f"{n}x{n}x{n} {dt}", dt) for n in (4096, 8192) for dt in ("bf16", "fp16")}
    names = [c.name for c in suite]
    assert names.count("attention_fwd") == 3 and names.count("attention_train") == 2
    assert names.count("gpt2_step") == 4 and names.count("llama_step") == 2
    assert {"softmax", "layer_norm"} <= set(names)
    assert not any(c.name in ("gpt2_step", "llama_step") for c in cases_module.cases("cuda", models=False))


def test_cpu_suite_and_help_names_every_case():
    names = {c.name for c in cases_module.cases("cpu")}
    assert names == {"gemm", "softmax", "layer_norm", "attention_fwd", "attention_train", "gpt2_step", "llama_step"}
    _register()
    help_text = " ".join(CliRunner().invoke(app, ["bench", "--help"], terminal_width=200).output.split())
    for name in names:
        assert name in help_text, name
