"""Eighteenth held-out round for the model profiler, continued (models: tests/perf/perf_models_round18.py): the round's
fixes op by op (an EmbeddingBag(mode='mean') divides each non-empty bag by its size; a pool's or a reflection /
replication pad's backward reads dy and the indices, not the input it is handed for its shape), nn.MultiheadAttention's
and nn.TransformerEncoderLayer's fused fast path (``fastpath=True`` in eval under no_grad) against the slow path the
profiler runs by default and against a trained step, and the ``tilestack profile`` command on a ``path.py:attr`` and
a ``module:attr`` target (its table, its --out files). The counts of the round's models, and what the round found,
are in tests/perf/test_profile_unseen_round18.py.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from tilestack.cli import _register, app
from tilestack.perf import device, formulas, profile

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round18 as pm  # noqa: E402
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import rendered  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8
MODELS_PY = Path(__file__).parent / "perf_models_round18.py"
_register()


# --- the round's fixes, op by op --------------------------------------------------------------------------------
def test_mean_bag_divides_each_non_empty_bag():
    """9 entries in 3 bags of 4 columns: sum 36 adds; mean 36 adds and 12 divides; max 36 compares. With
    padding_idx 0 and an empty bag ([0, 3], [], [4, 0, 5], [6, 7, 0, 9]): 6 real entries, 3 non-empty bags: 24 + 12;
    2-d bags (3 of 3 entries) likewise 36 + 12."""
    w = torch.randn(20, 4)
    idx, off = torch.tensor([0, 3, 5, 2, 9, 11, 19, 4, 8]), torch.tensor([0, 4, 6])
    for mode, flops in (("sum", 36), ("mean", 48), ("max", 36)):
        row = one_row(profile.count_ops(lambda m=mode: F.embedding_bag(idx, w, off, mode=m)),
                      "aten::_embedding_bag_forward_only")
        assert row.flops == flops, mode
    padded, empty = torch.tensor([0, 3, 4, 0, 5, 6, 7, 0, 9]), torch.tensor([0, 2, 2, 5])
    row = one_row(profile.count_ops(lambda: F.embedding_bag(padded, w, empty, mode="mean", padding_idx=0)),
                  "aten::_embedding_bag_forward_only")
    assert row.flops == 6 * 4 + 3 * 4
    row = one_row(profile.count_ops(lambda: F.embedding_bag(idx.view(3, 3), w, mode="mean")),
                  "aten::_embedding_bag_forward_only")
    assert row.flops == 36 + 12


@pytest.mark.parametrize("pool,dy_shape,reads_indices", [
    (lambda x: F.max_pool2d(x, 2), (2, 4, 4, 4), True),
    (lambda x: F.avg_pool2d(x, 2), (2, 4, 4, 4), False),
    (lambda x: F.adaptive_avg_pool2d(x, 3), (2, 4, 3, 3), False),
    (lambda x: F.adaptive_max_pool2d(x, 3), (2, 4, 3, 3), True),
    (lambda x: F.max_pool3d(x.unsqueeze(2), (1, 2, 2)), (2, 4, 1, 4, 4), True),
    (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), (2, 4, 10, 10), False),
    (lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate"), (2, 4, 10, 10), False),
], ids=["max", "avg", "adaptive_avg", "adaptive_max", "max3d", "reflect", "replicate"])
def test_pool_and_pad_backward_read_dy_and_indices_not_the_input(pool, dy_shape, reads_indices):
    """The backward of a pool or pad over a (2, 4, 8, 8) input reads a materialised dy (and the int64 indices of a
    max pool: one per dy element) and writes the (2, 4, 8, 8) input gradient; the input, handed to it for its shape,
    is not read (it was: 2048 bytes more each)."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    dy = torch.randn(dy_shape)
    counts = profile.count_ops(lambda: pool(x).backward(dy.view(pool(x.detach()).shape)))
    (row,) = [c for (op, _), c in counts.items() if op.endswith("_backward")]
    n = dy.numel()
    assert row.bytes_read == n * F32 + (n * I64 if reads_indices else 0)
    assert row.bytes_written == x.numel() * F32


# --- the fused fast path against the slow path ------------------------------------------------------------------
def _encoder_matmuls(b, t, d, ff, layers):
    return layers * (2 * b * t * d * 3 * d + 2 * b * t * d * d + 4 * b * t * d * ff)


def test_encoder_fast_path_is_reported_uncounted_never_free():
    """In eval under no_grad with fastpath=True each pre-norm layer runs aten::_transformer_encoder_layer_fwd, whose
    matmuls no dispatch mode sees: the op is named uncounted (its row 'unknown', not 0 FLOPs and memory-bound) and the
    table says so. The default (fastpath off) runs the slow path: every matmul and the masked attention counted."""
    model, inputs = pm.prenorm_encoder()
    b, t, d, ff, layers = pm.EN_BATCH, pm.EN_T, pm.EN_DIM, pm.EN_FF, pm.EN_LAYERS
    fast = profile_cpu(model, inputs, fastpath=True)
    assert "aten::_transformer_encoder_layer_fwd" in fast.unsupported
    (row,) = [o for o in fast.ops if o.op == "aten::_transformer_encoder_layer_fwd"]
    assert row.calls == layers and not row.flops_known and row.bound == "unknown"
    assert "no FLOP formula for" in rendered(fast)
    slow = profile_cpu(model, inputs)
    assert slow.unsupported == ()
    mm = sum(o.m.flops * o.calls for o in slow.ops if o.op in ("aten::mm", "aten::addmm"))
    assert mm == _encoder_matmuls(b, t, d, ff, layers)
    assert fast.flops < mm < slow.flops


def test_encoder_nested_fast_path_under_a_padding_mask():
    """A post-norm encoder (enable_nested_tensor) under a padding mask takes the nested-tensor fast path in eval: the
    mask becomes a nested tensor and each layer runs fused; every fused and nested op is named uncounted, and the
    slow path's count is the hand count of the padded batch."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval()
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    inputs = {"src": torch.randn(2, 5, 8), "src_key_padding_mask": pad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "The PyTorch API of nested tensors is in prototype stage"
        fast = profile_cpu(enc, inputs, fastpath=True)
    assert {"aten::_transformer_encoder_layer_fwd", "aten::_nested_tensor_from_mask"} <= set(fast.unsupported)
    slow = profile_cpu(enc, inputs)
    assert slow.unsupported == ()
    assert sum(o.m.flops * o.calls for o in slow.ops if o.op in ("aten::mm", "aten::addmm")) == _encoder_matmuls(
        2, 5, 8, 16, 2)
    sdpa = [o for o in slow.ops if o.op == "aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert sum(o.m.flops * o.calls for o in sdpa) == 2 * 4 * 2 * 2 * 5 * 5 * 4  # two layers, not halved


def test_mha_fast_path_and_a_trained_step():
    """A bare nn.MultiheadAttention in eval: with fastpath=True, under no_grad, aten::_native_multi_head_attention
    (uncounted); trained with fastpath=True the slow path runs (gradients are on) and the counts are the default's:
    the packed in-projection, the out projection, the attention and its backward."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    fast = profile_cpu(mha, {"query": x, "key": x, "value": x, "need_weights": False}, fastpath=True)
    assert "aten::_native_multi_head_attention" in fast.unsupported
    trained = {}
    for fp in (False, True):
        p = profile_cpu(mha, {"query": x, "key": x, "value": x, "need_weights": False}, fastpath=fp, train=True)
        assert p.unsupported == ()
        trained[fp] = {o.label: o.m.flops * o.calls for o in p.ops}
    assert trained[True] == trained[False]
    attn = 4 * 2 * 2 * 5 * 5 * 4
    assert trained[True]["aten::_scaled_dot_product_flash_attention_for_cpu (2x2x5x4, 2x2x5x4, 2x2x5x4)"] == attn
    assert sum(v for k, v in trained[True].items() if k.startswith(
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward")) == formulas.ATTENTION_BWD_OVER_FWD * attn


def test_batch_norm_train_and_eval_of_one_net():
    """The same ResNet in train mode and in eval mode: only the BatchNorms (8 against 4 FLOPs an element) and the six
    num_batches_tracked adds differ, and the caller's running statistics are put back after the train-mode profile
    (its forward updated them every step)."""
    model, inputs = pm.resnet_train()
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in bn]
    train = step_counts(model, inputs)
    assert all(torch.equal(m.running_mean, a) and torch.equal(m.running_var, v) and int(m.num_batches_tracked) == n
               for m, (a, v, n) in zip(bn, before, strict=True))
    p = profile_cpu(model, inputs)
    assert all(torch.equal(m.running_mean, a) and int(m.num_batches_tracked) == n
               for m, (a, _, n) in zip(bn, before, strict=True))
    evaluated = step_counts(model.eval(), inputs)
    elements = sum(c.flops for (op, _), c in evaluated.items() if op == "aten::native_batch_norm") / 4
    assert elements == 2 * 4 * 256 + 2 * 2 * 4 * 64 + 3 * 2 * 8 * 16
    assert sum(c.flops for c in train.values()) - sum(c.flops for c in evaluated.values()) == 4 * elements + 6
    assert p.flops == sum(c.flops for c in train.values())


# --- the command on module:attr targets ---------------------------------------------------------------------------
@pytest.fixture
def small_ceilings(cache_dir):
    """Cached CPU ceilings, so the command does not measure full-size ones."""
    return device.ceilings(device.detect("cpu"), copy_bytes=1 << 20, matmul_n=64, dtypes=("fp32", "bf16"))


def _row(table: str, op: str, shapes: str) -> list[str]:
    """The cells of the row of a markdown table for ``op`` at ``shapes``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [op, shapes]:
            return cells
    raise AssertionError(f"no row {op} {shapes} in\n{table}")


@pytest.mark.parametrize("target", [f"{MODELS_PY}:convnext", "perf_models_round18:convnext"], ids=["path", "module"])
def test_profile_command_on_a_module_attr_target(tmp_path, small_ceilings, target):
    """`tilestack profile <target> --train --steps 1 --warmup 1 --device cpu --out DIR --no-store` on the ConvNeXt
    block: the table names the depthwise convolution, its backward and the linears; profile.md holds one row per op
    and shapes, the depthwise row's FLOPs/step the hand count (50.7 kFLOP), its calls 1; profile.html and
    profile.png written; nothing stored."""
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["profile", target, "--train", "--steps", "1", "--warmup", "1", "--device", "cpu",
                                 "--out", str(out), "--no-store", "--top", "100"])
    assert r.exit_code == 0, r.output
    for op in ("aten::convolution", "aten::convolution_backward", "aten::addmm", "aten::native_layer_norm"):
        assert op in r.output
    for f in ("profile.html", "profile.png", "profile.md"):
        assert (out / f).stat().st_size > 0
    table = (out / "profile.md").read_text()
    header = [c.strip() for c in table.splitlines()[0].strip().strip("|").split("|")]
    conv = dict(zip(header, _row(table, "aten::convolution", "2x4x8x8, 4x1x7x7, 4"), strict=True))
    assert conv["calls/step"] == "1" and conv["FLOPs/step"] == "50.7 kFLOP"  # 2*2*64*4*49 + 2*4*64
    assert conv["bytes/step"] == "4.9 kB"  # (512 + 196 + 4 + 512) * 4: input, weight, bias, output
    # the backward: the weight and bias gradients (x needs none), the same 50.7 kFLOP
    back = dict(zip(header, _row(table, "aten::convolution_backward", "2x4x8x8, 2x4x8x8, 4x1x7x7"), strict=True))
    assert back["FLOPs/step"] == "50.7 kFLOP"
    assert float(conv["FLOP/B"]) == pytest.approx(50688 / 4896, rel=5e-3)
    assert "stored as run" not in r.output


def test_profile_command_refuses_a_missing_attr(tmp_path, small_ceilings):
    """A target naming no function of the module fails with exit 1 naming the target, before any profiling."""
    r = CliRunner().invoke(app, ["profile", f"{MODELS_PY}:no_such_model", "--no-store"])
    assert r.exit_code == 1 and "no_such_model" in r.output
