import json

import pytest
from typer.testing import CliRunner

from tilestack.cli import _register, app
from tilestack.perf import device
from tilestack.perf.store import Store

_register()
runner = CliRunner()
TINY = """
import torch
from torch import nn

def build():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval(), (torch.randn(2, 16, 32),)

def raising():
    class Bad(nn.Module):
        def forward(self, x):
            raise RuntimeError("no such layer")
    return Bad(), (torch.randn(2),)
"""


@pytest.fixture
def small_ceilings(cache_dir):
    """Cached CPU ceilings, so the commands do not measure full-size ones."""
    dev = device.detect("cpu")
    return device.ceilings(dev, copy_bytes=1 << 20, matmul_n=64, dtypes=("fp32", "bf16"))


@pytest.fixture
def filled_store(cache_dir, measurements, h100, h100_ceilings):
    import dataclasses

    with Store() as st:
        a = st.start_run(device=h100, ceilings=h100_ceilings, label="base", versions={"torch": "2.11"})
        for m in measurements:
            st.append(a, m)
        b = st.start_run(device=h100, ceilings=h100_ceilings, label="new", versions={"torch": "2.11"})
        for m in measurements:
            st.append(b, dataclasses.replace(m, latency_s=m.latency_s / 2))
    return a, b


def test_device_json(small_ceilings):
    r = runner.invoke(app, ["device", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["device"]["kind"] == "cpu" and data["ceilings"]["matmul"]["fp32"] > 0


def test_device_table_and_bad_device(small_ceilings):
    r = runner.invoke(app, ["device", "--device", "cpu"])
    assert r.exit_code == 0 and "memory bandwidth" in r.output and "matmul fp32" in r.output
    r = runner.invoke(app, ["device", "--device", "tpu"])
    assert r.exit_code == 1 and "device='tpu'" in r.output


def test_profile_command_writes_reports_and_stores(tmp_path, small_ceilings):
    (tmp_path / "tiny.py").write_text(TINY)
    r = runner.invoke(app, ["profile", str(tmp_path / "tiny.py"), "--steps", "1", "--warmup", "1",
                            "--device", "cpu", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "hot spots" in r.output and "aten::addmm" in r.output
    assert r.output.index("hot spots") < r.output.index("calls/step")  # hot spots and tips first
    for f in ("profile.html", "profile.png", "profile.md"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    with Store() as st:
        assert st.runs()[0].label.startswith("profile ") and st.runs()[0].n_results > 0


def test_profile_of_a_raising_model_fails_cleanly(tmp_path, small_ceilings):
    (tmp_path / "tiny.py").write_text(TINY)
    r = runner.invoke(app, ["profile", f"{tmp_path / 'tiny.py'}:raising", "--no-store"])
    assert r.exit_code == 1 and "raised RuntimeError" in r.output and "no such layer" in r.output


def test_runs_report_compare(tmp_path, filled_store):
    a, b = filled_store
    r = runner.invoke(app, ["runs"])
    assert r.exit_code == 0 and a in r.output and b in r.output
    r = runner.invoke(app, ["report", "base", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "gemm" in r.output and (tmp_path / "rep" / "roofline.png").read_bytes().startswith(b"\x89PNG")
    assert "rmsnorm" in (tmp_path / "rep" / "report.html").read_text()
    assert (tmp_path / "rep" / "report.md").read_text().startswith("| kernel |")
    r = runner.invoke(app, ["compare", "base", "new"])
    assert r.exit_code == 0 and "2.00x" in r.output
    r = runner.invoke(app, ["compare", "base", "nope"])
    assert r.exit_code == 1 and "run='nope'" in r.output


def test_ncu_without_ncu(monkeypatch):
    from tilestack.perf import ncu

    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    r = runner.invoke(app, ["ncu", "--kernel", "x", "--", "run.py"])
    assert r.exit_code == 1 and "not on PATH" in r.output


def test_ncu_needs_a_target_or_a_case():
    r = runner.invoke(app, ["ncu"])
    assert r.exit_code == 1 and "expected exactly one" in r.output


def test_ncu_case_selects_by_nvtx_range(monkeypatch):
    from tilestack.perf import ncu

    seen = {}

    def fake_run(argv, **kw):
        seen.update(kw, argv=argv, script=open(argv[1]).read())
        raise ncu.NcuPermissionError(ncu.PERMISSION_HELP)

    monkeypatch.setattr(ncu, "run", fake_run)
    r = runner.invoke(app, ["ncu", "--case", "attention_fwd#1"])
    assert r.exit_code == 1 and "ERR_NVGPUCTRPERM" in r.output
    assert seen["argv"][-1] == "attention_fwd#1" and seen["nvtx_include"] == "tilestack:ncu_case/"
    assert 'range_push("tilestack:ncu_case")' in seen["script"]
