import math

import pytest
import torch
from torch import nn

from tilestack.perf import device, formulas, profile
from tilestack.perf.profile import ProfileError

CEIL = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "bf16": 2e11}, "now")
D, HEADS, FF, SEQ, BATCH = 64, 4, 128, 32, 2


def tiny_transformer() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=D, nhead=HEADS, dim_feedforward=FF, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    return model, (torch.randn(BATCH, SEQ, D),)  # (B, N, D)


def test_profile_of_a_small_transformer():
    model, inputs = tiny_transformer()
    p = profile.profile_model(model, inputs, steps=2, warmup=1, ceilings=CEIL, device="cpu")
    ops = {o.op: o for o in p.ops}
    # Feed-forward (2 linears), q/k/v in-projection and out-projection: as the formulas count them.
    tokens = BATCH * SEQ
    linears = [(D, FF), (FF, D), (D, 3 * D), (D, D)]
    expected = sum(formulas.matmul(tokens, n, k).flops for k, n in linears)
    matmuls = [o for o in p.ops if o.op in ("aten::addmm", "aten::mm")]
    assert math.fsum(o.m.flops * o.calls for o in matmuls) == pytest.approx(expected)
    # One row per input shapes: the four linears are four rows, each its own matmul.
    assert len(matmuls) == len(linears) and all(o.calls == 1 for o in matmuls)
    sdpa = ops["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert sdpa.m.flops == pytest.approx(4 * BATCH * HEADS * SEQ * SEQ * (D // HEADS))
    assert math.fsum(o.share for o in p.ops) == pytest.approx(1.0)
    assert [o.total_s for o in p.ops] == sorted((o.total_s for o in p.ops), reverse=True)
    # Which row is hottest is the machine's timing (linear's own Python time can top a tiny model on a busy CPU):
    # every hot spot gets a tip, counted or not, and an uncounted row shows no bound.
    assert all(o.tip for o in p.hot_spots(3))
    assert all(o.bound == "-" for o in p.ops if not o.counted)
    assert ops["aten::addmm"].bound in ("compute", "memory") and ops["aten::addmm"].roof_fraction > 0
    assert ops.get("aten::view") is None or not ops["aten::view"].counted  # views move no bytes


def test_profile_with_backward_counts_more_flops():
    model, inputs = tiny_transformer()
    fwd = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu")
    both = profile.profile_model(model.train(), inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu", train=True)
    assert both.flops > 2 * fwd.flops


def test_report_files(tmp_path):
    model, inputs = tiny_transformer()
    p = profile.profile_model(model, inputs, steps=1, warmup=0, ceilings=CEIL, device="cpu")
    html = profile.profile_html(p, tmp_path / "p.html", tmp_path / "p.png").read_text()
    assert "hot spots" in html and "aten::addmm" in html and "data:image/png;base64," in html
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


class Raises(nn.Module):
    def forward(self, x):
        raise ValueError("shapes do not match")


def test_a_model_that_raises_is_reported_with_its_name_and_phase():
    with pytest.raises(ProfileError, match="model 'Raises' raised ValueError during the warm-up: shapes do not"):
        profile.profile_model(Raises(), (torch.randn(2),), ceilings=False, device="cpu")
    with pytest.raises(ProfileError, match="steps=0"):
        profile.profile_model(Raises(), (torch.randn(2),), steps=0, ceilings=False, device="cpu")


def test_load_target_variants(tmp_path):
    (tmp_path / "with_build.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)\n"
        "def other():\n    return torch.nn.ReLU(), torch.randn(3)\n")
    (tmp_path / "with_vars.py").write_text("import torch\nmodel = torch.nn.Tanh()\ninputs = torch.randn(3)\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('bad import')\n")
    model, inputs = profile.load_target(str(tmp_path / "with_build.py"))
    assert isinstance(model, nn.Linear)
    assert isinstance(profile.load_target(f"{tmp_path / 'with_build.py'}:other")[0], nn.ReLU)
    assert isinstance(profile.load_target(str(tmp_path / "with_vars.py"))[0], nn.Tanh)
    with pytest.raises(ProfileError, match="expected a function build"):
        profile.load_target(str(tmp_path / "empty.py"))
    with pytest.raises(ProfileError, match="raised RuntimeError while loading: bad import"):
        profile.load_target(str(tmp_path / "broken.py"))
    with pytest.raises(ProfileError, match="no file"):
        profile.load_target(str(tmp_path / "missing.py"))
    with pytest.raises(ProfileError, match="cannot import module 'no_such_module_xyz'"):
        profile.load_target("no_such_module_xyz:build")
    with pytest.raises(ProfileError, match="no function 'nope'"):
        profile.load_target(f"{tmp_path / 'with_vars.py'}:nope")
