"""Profiler round 24, the rest: what this round found and fixed, a bf16 autocast forward and a written-out training
step checked by hand, and the public API's refusals of bad arguments.

What this round found:
- a linear dynamically quantized to fp16 (``quantize_dynamic(..., dtype=torch.float16)``: ``quantized::
  linear_dynamic_fp16``, and the gates of a dynamic fp16 LSTM) holds its weight as fp16, but its packing unpacks it
  as float32: the weight was charged 4 bytes an element, twice what the kernel reads (``counting_bytes``);
- ``perf.Ceilings`` took any rates: a negative or NaN copy bandwidth was refused only when a profile placed its rows,
  after every step had run, naming a roof field the caller never set; a matmul rate keyed "float32" (no short dtype
  name) or a list of rates was taken, and every row read "bound unknown" with no word said (``device``);
- ``perf.Timing`` took negative, NaN, infinite or no times, and ``compute_metrics(timing=...)`` stored a negative p10,
  NaN percentiles or an infinite spread (no times: a bare IndexError); ``timing.median_ci`` took a NaN, which sorted
  anywhere and moved the interval (``timing``);
- a layer, group, batch or instance norm without a weight or bias (``elementwise_affine=False``, ``affine=False``,
  ``InstanceNorm2d``'s default, ``F.layer_norm(x, shape)``, a bias-free LayerNorm) was counted the affine it does not
  apply, 2 FLOPs an element of 8 (round 19's strict xfail; ``counting_rules.norms_statistics``, ``formulas.layernorm``);
- what batch norm runs on a GPU, ``cudnn_batch_norm`` (``miopen_batch_norm``) and its backward, had no FLOP rule: every
  GPU profile of a BatchNorm net reported them uncounted (``counting_rules.norms_statistics``; found and checked on
  meta tensors, as this round had no GPU); so did ``_cudnn_rnn`` and its backward, what nn.LSTM / nn.GRU / nn.RNN run
  on an NVIDIA GPU, the fused LSTMCell / GRUCell kernels (``counting_rules.conv_rnn``), cuDNN's grid sampler
  (``counting_rules.pooling_resampling``) and CTC loss (``counting_rules.losses``); and a GPU's dropout, one
  ``native_dropout`` tagged a random draw, was counted 0 FLOPs with no word said, where the CPU's path counts 2 an
  element (``counting_rules.elementwise``).
"""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack import perf
from tilestack.errors import DeviceError
from tilestack.perf import counting, device, formulas, profile, timing

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round24 as pm  # noqa: E402
from _profile_helpers import FILTERS, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import CEIL, by_op  # noqa: E402

pytestmark = FILTERS
F32, F16, BF16, I8 = 4, 2, 2, 1


# --- fp16 dynamic quantization reads fp16 weights ------------------------------------------------------------------
QL_IN, QL_OUT, QL_ROWS = 8, 6, 3
LSTM_IN, LSTM_H, LSTM_T = QL_OUT, 4, 3
LSTM_GATES = 4


def _quantized(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(QL_IN, QL_OUT), nn.LSTM(LSTM_IN, LSTM_H))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(net, {nn.Linear, nn.LSTM}, dtype=dtype)


@pytest.mark.parametrize("dtype,weight_bytes", [(torch.float16, F16), (torch.qint8, I8)], ids=["fp16", "int8"])
def test_a_dynamically_quantized_linear_reads_its_packed_weight_at_its_width(dtype, weight_bytes):
    """The linear reads its fp32 input, its packed weight (2 bytes an element for fp16, 1 for int8) and its fp32
    bias, and writes its fp32 output; its FLOPs are the product's, 2 R I O, whatever the weight's width."""
    net = _quantized(dtype)
    x = torch.randn(QL_ROWS, 1, QL_IN)
    counts = counting.count_ops(lambda: net[0](x))
    name = "quantized::linear_dynamic_fp16" if dtype == torch.float16 else "quantized::linear_dynamic"
    row = one_row(counts, name)
    assert row.flops == 2 * QL_ROWS * QL_IN * QL_OUT
    assert row.bytes_read == QL_ROWS * QL_IN * F32 + QL_IN * QL_OUT * weight_bytes + QL_OUT * F32
    assert row.bytes_written == QL_ROWS * QL_OUT * F32


def test_a_dynamic_fp16_lstm_reads_half_width_gate_weights():
    """A dynamic LSTM's gate matrices (4H x I and 4H x H) are packed like the linear's: fp16 ones are read at 2 bytes
    an element, so the fp16 LSTM reads exactly one byte an element more than the int8 one, its FLOPs the same."""
    x = torch.randn(LSTM_T, 1, LSTM_IN)
    rows = {}
    for dtype in (torch.float16, torch.qint8):
        net = _quantized(dtype)
        rows[dtype] = one_row(counting.count_ops(lambda net=net: net[1](x)), "aten::quantized_lstm")
    gate_weights = LSTM_GATES * LSTM_H * (LSTM_IN + LSTM_H)
    assert rows[torch.float16].flops == rows[torch.qint8].flops > 0
    assert rows[torch.float16].bytes_read - rows[torch.qint8].bytes_read == gate_weights * (F16 - I8)


# --- a norm without weight or bias applies no affine ---------------------------------------------------------------
NM_SHAPE = (2, 4, 3, 3)
NM_E = math.prod(NM_SHAPE)
LN, BN_TRAIN, BN_EVAL = (formulas.LAYERNORM_FLOPS_PER_ELEMENT, formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT,
                         formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT)
AFFINE = formulas.NORM_AFFINE_FLOPS_PER_ELEMENT  # a weight multiply or a bias add, per element


@pytest.mark.parametrize("make,op,per_element", [
    (lambda: nn.LayerNorm(3), "aten::native_layer_norm", LN),
    (lambda: nn.LayerNorm(3, elementwise_affine=False), "aten::native_layer_norm", LN - 2 * AFFINE),
    (lambda: nn.LayerNorm(3, bias=False), "aten::native_layer_norm", LN - AFFINE),
    (lambda: (lambda x: F.layer_norm(x, (3, 3))), "aten::native_layer_norm", LN - 2 * AFFINE),
    (lambda: nn.GroupNorm(2, 4), "aten::native_group_norm", LN),
    (lambda: nn.GroupNorm(2, 4, affine=False), "aten::native_group_norm", LN - 2 * AFFINE),
    (lambda: nn.BatchNorm2d(4), "aten::native_batch_norm", BN_TRAIN),
    (lambda: nn.BatchNorm2d(4, affine=False), "aten::native_batch_norm", BN_TRAIN - 2 * AFFINE),
    (lambda: nn.BatchNorm2d(4).eval(), "aten::native_batch_norm", BN_EVAL),
    (lambda: nn.BatchNorm2d(4, affine=False).eval(), "aten::native_batch_norm", BN_EVAL - 2 * AFFINE),
    (lambda: nn.InstanceNorm2d(4), "aten::native_batch_norm", BN_TRAIN - 2 * AFFINE),  # no affine by default
    (lambda: nn.InstanceNorm2d(4, affine=True), "aten::native_batch_norm", BN_TRAIN),
    (lambda: (lambda x: F.batch_norm(x, None, None, torch.ones(4), None, training=True)), "aten::native_batch_norm",
     BN_TRAIN - AFFINE),
], ids=["ln", "ln-no-affine", "ln-no-bias", "F.layer_norm", "gn", "gn-no-affine", "bn", "bn-no-affine", "bn-eval",
        "bn-eval-no-affine", "instance", "instance-affine", "F.batch_norm-weight-only"])
def test_a_norm_counts_only_the_affine_it_applies(make, op, per_element):
    """Statistics and the normalisation always; a multiply per element only with a weight, an add only with a bias
    (before round 24 every norm was counted its whole affine: DiT's adaLN norms, InstanceNorm2d's default, a
    bias-free LayerNorm, a weight-only F.batch_norm)."""
    norm, x = make(), torch.randn(*NM_SHAPE)
    counts = counting.count_ops(lambda: norm(x))
    assert one_row(counts, op).flops == per_element * NM_E


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("op", ["cudnn_batch_norm", "miopen_batch_norm"])
@pytest.mark.parametrize("training,bias,per_element", [(True, True, BN_TRAIN), (False, True, BN_EVAL),
                                                       (True, False, BN_TRAIN - AFFINE)])
def test_a_gpu_batch_norm_is_counted_as_the_cpu_one(op, training, bias, per_element):
    """What BatchNorm runs on an NVIDIA (AMD) GPU, cudnn_batch_norm (miopen_batch_norm), counted as native_batch_norm:
    before round 24 it was reported uncounted, so every GPU profile of a BatchNorm net had rows without FLOPs. Counted
    on meta tensors (no GPU needed); in training it writes its running statistics besides its output."""
    x, w, b, rm, rv = _meta(*NM_SHAPE), _meta(4), _meta(4) if bias else None, _meta(4), _meta(4)
    counts = counting.count_ops(lambda: getattr(torch.ops.aten, op)(x, w, b, rm, rv, training, 0.1, 1e-5))
    row = one_row(counts, f"aten::{op}")
    assert (row.flops, row.unsupported) == (per_element * NM_E, False)
    assert row.bytes_read == (NM_E + (4 if bias else 3) * 4) * F32
    assert row.bytes_written >= (NM_E + (2 * 4 if training else 0)) * F32


@pytest.mark.parametrize("op", ["cudnn_batch_norm_backward", "miopen_batch_norm_backward"])
def test_a_gpu_batch_norm_backward_forms_all_three_gradients(op):
    """cudnn_batch_norm_backward / miopen_batch_norm_backward always form the input, weight and bias gradients from
    the batch statistics: the recompute, dx, dw and db per element of dy, as native_batch_norm_backward asked for all
    three (13 an element); before round 24, uncounted."""
    x, dy = _meta(*NM_SHAPE), _meta(*NM_SHAPE)
    w, rm, rv, mean, invstd = (_meta(4) for _ in range(5))
    extra = (_meta(0, dtype=torch.uint8),) if op.startswith("cudnn") else ()  # cudnn's reserve space
    counts = counting.count_ops(lambda: getattr(torch.ops.aten, op)(x, dy, w, rm, rv, mean, invstd, 1e-5, *extra))
    row = one_row(counts, f"aten::{op}")
    per_element = (formulas.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + formulas.NORM_BWD_INPUT_FLOPS_PER_ELEMENT
                   + formulas.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT + formulas.NORM_BWD_BIAS_FLOPS_PER_ELEMENT)
    assert (row.flops, row.unsupported) == (per_element * NM_E, False)
    x_cpu, dy_cpu = torch.randn(*NM_SHAPE), torch.randn(*NM_SHAPE)
    cpu = counting.count_ops(lambda: torch.ops.aten.native_batch_norm_backward(
        dy_cpu, x_cpu, torch.ones(4), None, None, torch.zeros(4), torch.ones(4), True, 1e-5, [True, True, True]))
    assert one_row(cpu, "aten::native_batch_norm_backward").flops == row.flops


# what nn.LSTM / nn.GRU run on an NVIDIA GPU: every layer and direction in one _cudnn_rnn call
RN_T, RN_B, RN_I, RN_H = 3, 2, 5, 4
CUDNN_LSTM, CUDNN_GRU = 2, 3  # cudnn's mode numbers


def _cudnn_args(rnn: nn.RNNBase, mode: int, x: torch.Tensor) -> tuple:
    """_cudnn_rnn's arguments for ``rnn`` over ``x`` (T, B, I), on meta tensors."""
    weights = [_meta(*w.shape) for w in rnn._flat_weights]
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    hx = _meta(layers, RN_B, RN_H)
    cx = _meta(layers, RN_B, RN_H) if mode == CUDNN_LSTM else None
    return (_meta(*x.shape), weights, len(weights) // layers, None, hx, cx, mode, RN_H, 0, rnn.num_layers, False, 0.0,
            True, rnn.bidirectional, [], None)


@pytest.mark.parametrize("make,mode", [
    (lambda: nn.LSTM(RN_I, RN_H, bidirectional=True), CUDNN_LSTM),
    (lambda: nn.GRU(RN_I, RN_H, num_layers=2), CUDNN_GRU),
], ids=["bi-lstm", "2-layer-gru"])
def test_a_gpu_recurrent_layer_counts_the_cpu_kernels_matmuls(make, mode):
    """_cudnn_rnn (reported uncounted before round 24) counts each step's products with every gate matrix, 2 T B
    (numel(w_ih) + numel(w_hh)) per layer and direction, as the CPU's per-layer kernel (mkldnn_rnn_layer) or its
    unfused path count the same module: the same FLOPs on both devices. Counted on meta tensors."""
    torch.manual_seed(0)
    rnn, x = make(), torch.randn(RN_T, RN_B, RN_I)
    with torch.no_grad():
        cpu = counting.count_ops(lambda: rnn(x))
    matmuls = sum(c.flops for (op, _), c in cpu.items() if op in ("aten::mkldnn_rnn_layer", "aten::mm",
                                                                   "aten::addmm", "aten::linear"))
    matrices = sum(w.numel() for w in rnn._flat_weights if w.dim() == 2)
    assert matmuls == 2 * RN_T * RN_B * matrices
    gpu = counting.count_ops(lambda: torch.ops.aten._cudnn_rnn(*_cudnn_args(rnn, mode, x)))
    row = one_row(gpu, "aten::_cudnn_rnn")
    assert (row.flops, row.unsupported) == (matmuls, False)


def test_an_amd_gpu_recurrent_layer_and_the_weight_flattening_are_counted():
    """miopen_rnn (an AMD GPU's nn.LSTM), tagged a random draw for its dropout, was counted 0 with no word said; it
    counts as _cudnn_rnn. _cudnn_rnn_flatten_weight (the weights copied into one buffer) and the check whether to do
    it compute nothing: 0 FLOPs, not uncounted rows of every GPU LSTM profile."""
    from tilestack.perf.counting_rules import LAYER_FLOPS

    rnn, x = nn.LSTM(RN_I, RN_H), torch.randn(RN_T, RN_B, RN_I)
    h = torch.zeros(1, RN_B, RN_H)
    args = (x, list(rnn._flat_weights), 4, h, h, CUDNN_LSTM, RN_H, 1, False, 0.0, True, False, [], None)
    forward = 2 * RN_T * RN_B * sum(w.numel() for w in rnn._flat_weights if w.dim() == 2)
    assert LAYER_FLOPS["aten.miopen_rnn"](torch.ops.aten.miopen_rnn.default, args, {}, None) == forward
    assert "aten.miopen_rnn_backward" in LAYER_FLOPS
    counts = counting.count_ops(torch.ops.aten._use_cudnn_rnn_flatten_weight)
    assert not any(c.unsupported for c in counts.values())
    for op in (torch.ops.aten._cudnn_rnn_flatten_weight.default, torch.ops.aten._use_cudnn_rnn_flatten_weight.default):
        assert counting.does_no_arithmetic(op)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_a_gpu_recurrent_backward_forms_the_data_gradients_and_the_weight_gradient_asked_for(weight_grad):
    """_cudnn_rnn_backward always runs the data gradients through every step (the forward's matmuls again) and the
    weight gradient's as many where output_mask asks for it (a frozen LSTM's input gradient alone)."""
    from tilestack.perf.counting_rules import LAYER_FLOPS

    rnn, x = nn.LSTM(RN_I, RN_H), torch.randn(RN_T, RN_B, RN_I)
    forward = 2 * RN_T * RN_B * sum(w.numel() for w in rnn._flat_weights if w.dim() == 2)
    h = torch.zeros(1, RN_B, RN_H)
    args = (x, list(rnn._flat_weights), 4, torch.empty(0), h, h, torch.zeros(RN_T, RN_B, RN_H), None, None, None,
            CUDNN_LSTM, RN_H, 0, 1, False, 0.0, True, False, [], None, torch.empty(0), [True, True, True, weight_grad])
    rule = LAYER_FLOPS["aten._cudnn_rnn_backward"]
    assert rule(torch.ops.aten._cudnn_rnn_backward.default, args, {}, None) == (2 if weight_grad else 1) * forward


CELL_B, CELL_H = 2, 3
CELL_STATE = CELL_B * CELL_H


@pytest.mark.parametrize("op,args,per_hidden,bias_adds", [
    ("_thnn_fused_lstm_cell", lambda t: (t(2, 12), t(2, 12), t(2, 3), t(12), t(12)),
     formulas.FUSED_LSTM_CELL_FLOPS_PER_HIDDEN, 2 * 4),
    ("_thnn_fused_lstm_cell", lambda t: (t(2, 12), t(2, 12), t(2, 3)), formulas.FUSED_LSTM_CELL_FLOPS_PER_HIDDEN, 0),
    ("_thnn_fused_lstm_cell_backward_impl", lambda t: (t(2, 3), t(2, 3), t(2, 3), t(2, 3), t(2, 12), True),
     formulas.FUSED_LSTM_CELL_BWD_FLOPS_PER_HIDDEN, 4),
    ("_thnn_fused_lstm_cell_backward_impl", lambda t: (None, t(2, 3), t(2, 3), t(2, 3), t(2, 12), False),
     formulas.FUSED_LSTM_CELL_BWD_FLOPS_PER_HIDDEN, 0),
    ("_thnn_fused_gru_cell", lambda t: (t(2, 9), t(2, 9), t(2, 3), t(9), t(9)),
     formulas.FUSED_GRU_CELL_FLOPS_PER_HIDDEN, 2 * 3),
    ("_thnn_fused_gru_cell_backward", lambda t: (t(2, 3), t(2, 15), True), formulas.FUSED_GRU_CELL_BWD_FLOPS_PER_HIDDEN,
     2 * 3),
    ("_thnn_fused_gru_cell_backward", lambda t: (t(2, 3), t(2, 15), False),
     formulas.FUSED_GRU_CELL_BWD_FLOPS_PER_HIDDEN, 0),
], ids=["lstm", "lstm-no-bias", "lstm-bwd", "lstm-bwd-no-bias", "gru", "gru-bwd", "gru-bwd-no-bias"])
def test_a_gpu_fused_cell_counts_its_gate_arithmetic(op, args, per_hidden, bias_adds):
    """LSTMCell / GRUCell on a GPU: the gate matmuls are mm's of their own, the element-wise rest one fused kernel
    (reported uncounted before round 24): per element of the (B, H) state, the gates' arithmetic, and an add per gate
    element for each bias given or bias gradient formed. The rule checked on CPU tensors (these kernels are CUDA's);
    the LSTM cell also counted whole on meta tensors."""
    from tilestack.perf.counting_rules import LAYER_FLOPS

    func = getattr(torch.ops.aten, op).default
    assert LAYER_FLOPS[f"aten.{op}"](func, args(torch.zeros), {}, None) == (per_hidden + bias_adds) * CELL_STATE
    if op == "_thnn_fused_lstm_cell" and bias_adds:
        row = one_row(counting.count_ops(lambda: func(*args(_meta))), f"aten::{op}")
        assert (row.flops, row.unsupported) == ((per_hidden + bias_adds) * CELL_STATE, False)


def test_a_cudnn_grid_sample_counts_as_the_cpu_bilinear_one():
    """F.grid_sample(align_corners=True, bilinear, zeros) on a GPU runs cudnn_grid_sampler (reported uncounted before
    round 24): as grid_sampler_2d's bilinear, 4 taps a multiply-add each per output element, reading at most 4 input
    elements per output and the grid; its backward both gradients. The rules checked on CPU tensors against the CPU
    op's counts (cuDNN's kernels have no CPU or meta implementation)."""
    from tilestack.perf import counting_bytes
    from tilestack.perf.counting_rules import LAYER_FLOPS

    x, grid = torch.randn(1, 2, 8, 8), torch.rand(1, 3, 3, 2) * 2 - 1
    y = F.grid_sample(x, grid, align_corners=True)
    cpu = one_row(counting.count_ops(lambda: F.grid_sample(x, grid, align_corners=True)), "aten::grid_sampler_2d")
    func = torch.ops.aten.cudnn_grid_sampler.default
    assert LAYER_FLOPS["aten.cudnn_grid_sampler"](func, (x, grid), {}, y) == cpu.flops == 2 * 4 * y.numel()
    assert counting_bytes._sampled_bytes(func, (x, grid), {}, y) == cpu.bytes_read
    back = torch.ops.aten.cudnn_grid_sampler_backward.default
    assert LAYER_FLOPS["aten.cudnn_grid_sampler_backward"](back, (x, grid, y), {}, None) == 2 * cpu.flops


def test_a_cudnn_ctc_loss_counts_the_loss_and_its_gradient():
    """F.ctc_loss on a GPU, where cuDNN takes it, runs _cudnn_ctc_loss: the loss and its gradient in one call, so the
    CPU's _ctc_loss and _ctc_loss_backward together (reported uncounted before round 24). Its rule checked on CPU
    tensors against the CPU ops' counts, lengths given as lists (default overload) or tensors (.Tensor)."""
    from tilestack.perf.counting_rules import LAYER_FLOPS

    torch.manual_seed(0)
    logp = torch.randn(6, 2, 5).log_softmax(2).requires_grad_()
    targets, lengths, target_lengths = torch.randint(1, 5, (2, 3)), [6, 5], [3, 2]
    cpu = counting.count_ops(lambda: F.ctc_loss(logp, targets, lengths, target_lengths, reduction="sum").backward())
    expected = one_row(cpu, "aten::_ctc_loss").flops + one_row(cpu, "aten::_ctc_loss_backward").flops
    assert expected == (formulas.CTC_FLOPS_PER_STATE + formulas.CTC_BWD_FLOPS_PER_STATE) * (6 * 7 + 5 * 5) \
        + formulas.CTC_BWD_FLOPS_PER_LOG_PROB * logp.numel()
    rule = LAYER_FLOPS["aten._cudnn_ctc_loss"]
    for func, lens in ((torch.ops.aten._cudnn_ctc_loss.default, (lengths, target_lengths)),
                       (torch.ops.aten._cudnn_ctc_loss.Tensor, (torch.tensor(lengths), torch.tensor(target_lengths)))):
        assert rule(func, (logp, targets.int(), *lens, 0, True, False), {}, None) == expected


DROP = (4, 8)


def test_a_fused_gpu_dropout_counts_what_the_cpu_path_counts():
    """F.dropout in training runs on a CPU as bernoulli_, the mask's scale (div_) and the multiply: 2 FLOPs an element;
    on a GPU as one native_dropout, tagged a random draw, which was counted 0 with no word said before round 24. Now
    2 an element (0 with train=False, a copy), as are the older _fused_dropout and _masked_scale; each reads x and
    writes y and the mask (bool: 1 byte an element)."""
    x = torch.randn(*DROP)
    cpu = counting.count_ops(lambda: F.dropout(x, 0.5, training=True))
    n = math.prod(DROP)
    assert sum(c.flops for c in cpu.values()) == formulas.DROPOUT_FLOPS_PER_ELEMENT * n
    for train, per_element in ((True, formulas.DROPOUT_FLOPS_PER_ELEMENT), (None, formulas.DROPOUT_FLOPS_PER_ELEMENT),
                               (False, 0)):
        counts = counting.count_ops(lambda train=train: torch.ops.aten.native_dropout(_meta(*DROP), 0.5, train))
        row = one_row(counts, "aten::native_dropout")
        assert (row.flops, row.unsupported) == (per_element * n, False)
        assert (row.bytes_read, row.bytes_written) == (n * F32, n * F32 + n * 1)
    fused = counting.count_ops(lambda: torch.ops.aten._fused_dropout(_meta(*DROP), 0.5))
    scale = counting.count_ops(lambda: torch.ops.aten._masked_scale(_meta(*DROP), _meta(*DROP, dtype=torch.uint8), 2.0))
    assert one_row(fused, "aten::_fused_dropout").flops == one_row(scale, "aten::_masked_scale").flops == 2 * n


def test_the_layernorm_formula_leaves_out_the_affine_it_is_told_is_not_there():
    assert formulas.layernorm(4, 8, "fp32").flops == LN * 32
    assert formulas.layernorm(4, 8, "fp32", affine=False).flops == (LN - 2 * AFFINE) * 32
    assert formulas.layernorm(4, 8, "fp32", affine=False).bytes_read == 32 * F32


# --- perf.Ceilings refuses what is no ceiling ----------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (("cpu", -1.0, {"fp32": 1e9}), r"copy_bytes_per_s=-1\.0 \(float\); expected a positive, finite bandwidth"),
    (("cpu", 0, {"fp32": 1e9}), r"copy_bytes_per_s=0 \(int\)"),
    (("cpu", float("nan"), {"fp32": 1e9}), r"copy_bytes_per_s=nan"),
    (("cpu", "fast", {"fp32": 1e9}), r"copy_bytes_per_s='fast' \(str\)"),
    (("cpu", True, {"fp32": 1e9}), r"copy_bytes_per_s=True \(bool\)"),
    (("cpu", 1e9, {"fp32": float("nan")}), r"matmul\['fp32'\]=nan \(float\); expected a positive, finite rate"),
    (("cpu", 1e9, {"fp32": -2e11}), r"matmul\['fp32'\]=-2"),
    (("cpu", 1e9, {"bf16": math.inf}), r"matmul\['bf16'\]=inf"),
    (("cpu", 1e9, {"float32": 1e9}), r"matmul key 'float32'; expected a dtype short name, one of \[.*'fp32'"),
    (("cpu", 1e9, [1e9]), r"matmul=\[1000000000\.0\] \(list\); expected a dict"),
    (("", 1e9, {"fp32": 1e9}), r"device='' \(str\); expected the device's name"),
    ((None, 1e9, {"fp32": 1e9}), r"device=None \(NoneType\)"),
])
def test_ceilings_refuse_what_is_no_ceiling_naming_the_field(args, fragment):
    with pytest.raises(DeviceError, match=r"Ceilings: " + fragment):
        device.Ceilings(*args, "now")


def test_ceilings_still_take_what_they_always_took():
    """Ints and floats, any short dtype name, no matmul rate at all, and the fields a measured file carries."""
    assert device.Ceilings("cpu", 2 * 10**10, {"fp32": 2 * 10**11, "bf16": 1e11, "int8": 4e11}, "now").peak("tf32")
    assert device.Ceilings("a bench rig", 1.0, {}, "now").peak("fp32") is None
    assert device.Ceilings(**CEIL.to_json()) == CEIL


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 4), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_ceilings_with_a_negative_rate_never_reach_a_profile():
    """Before this round a profile given ceilings with a negative copy rate ran every step, then failed naming
    'roof.bandwidth'; such ceilings cannot be built now, so the model is never run with them."""
    model = Counted()
    with pytest.raises(DeviceError, match="copy_bytes_per_s=-2"):
        profile.profile_model(model, (torch.randn(2, 4),), steps=1, device="cpu",
                              ceilings=device.Ceilings("cpu", -2e10, {"fp32": 2e11}, "now"))
    assert model.calls == 0


def test_a_cached_ceilings_file_with_a_negative_rate_is_measured_again(tmp_path, monkeypatch):
    """A cache file holding a negative copy bandwidth (hand-edited, or written by a broken tool) is not used: it is
    measured again, with the warning a damaged file gets, and the new file holds positive rates."""
    import json

    from tilestack import config

    monkeypatch.setattr(config.knobs, "cache_dir", str(tmp_path))
    dev = device.detect("cpu")
    small = {"copy_bytes": 1 << 16, "matmul_n": [32], "dtypes": ("fp32",), "budget_s": 0.05}
    good = device.ceilings(dev, **small)
    path = device.ceilings_path(dev)
    path.write_text(json.dumps({**good.to_json(), "copy_bytes_per_s": -1.0}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = device.ceilings(dev, **small)
    assert any("cannot be read" in str(w.message) and "copy_bytes_per_s=-1.0" in str(w.message) for w in seen)
    assert again.copy_bytes_per_s > 0 and json.loads(path.read_text())["copy_bytes_per_s"] > 0


# --- perf.Timing and median_ci refuse what is no time --------------------------------------------------------------
@pytest.mark.parametrize("times,fragment", [
    ((), r"times_s of no samples"),
    ((-1e-3, 2e-3), r"times_s\[0\]=-0\.001 \(float\); expected a finite time in seconds >= 0"),
    ((1e-3, float("nan")), r"times_s\[1\]=nan"),
    ((math.inf,), r"times_s\[0\]=inf"),
    (("1ms",), r"times_s\[0\]='1ms' \(str\)"),
    ((True, 1e-3), r"times_s\[0\]=True \(bool\)"),
    (1e-3, r"times_s=0\.001 \(float\); expected a sequence of times"),
])
def test_timing_refuses_what_is_no_time(times, fragment):
    with pytest.raises(timing.TimingError, match=r"Timing: " + fragment):
        perf.Timing(times, "cpu-perf-counter", 0, 1)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"warmup_calls": -1}, r"warmup_calls=-1 \(int\); expected an int >= 0"),
    ({"n_sets": 0}, r"n_sets=0 \(int\); expected an int >= 1"),
    ({"n_sets": 1.5}, r"n_sets=1\.5 \(float\)"),
    ({"target_rel_ci": 0.0}, r"target_rel_ci=0\.0; expected a positive relative half-width"),
    ({"target_rel_ci": float("nan")}, r"target_rel_ci=nan"),
])
def test_timing_refuses_bad_counts_and_targets(kwargs, fragment):
    with pytest.raises(timing.TimingError, match=fragment):
        perf.Timing(**{"times_s": (1e-3,), "method": "cpu-perf-counter", "warmup_calls": 0, "n_sets": 1, **kwargs})


def test_median_ci_refuses_a_nan_it_would_sort_anywhere():
    """median_ci([1, nan, 2]) gave (1, 2): a NaN compares false with everything, so sorted() left it where it was."""
    with pytest.raises(timing.TimingError, match=r"median_ci\[1\]=nan"):
        timing.median_ci([1.0, float("nan"), 2.0])
    with pytest.raises(timing.TimingError, match=r"rel_ci|median_ci\[0\]=-1"):
        timing.rel_ci([-1.0, 1.0, 2.0])
    assert timing.median_ci([3.0, 0.0, 2.0]) == (0.0, 3.0)  # a call below the clock's resolution is a time of 0


def test_a_timing_of_real_times_still_fills_the_measurement():
    """p10 and p90 by linear interpolation between ranks, the spread of the median's interval, the repeats."""
    t = perf.Timing((1e-3, 2e-3, 3e-3, 4e-3, 5e-3), "cpu-perf-counter", 2, 1)
    m = perf.compute_metrics(name="k", latency_s=t.median_s, flops=1e6, bytes_read=1e3, bytes_written=1e3, timing=t)
    assert (m.latency_p10_s, m.latency_p90_s, m.repeats) == (pytest.approx(1.4e-3), pytest.approx(4.6e-3), 5)
    assert m.latency_rel_ci == pytest.approx((5e-3 - 1e-3) / 2 / 3e-3)


# --- a bf16 autocast forward ---------------------------------------------------------------------------------------
class Autocast(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args)


def test_bf16_autocast_counts_the_fp32_work_in_bf16_rows():
    """ConvNeXt-V2 under CPU autocast to bf16: every FLOP the fp32 forward counts (the casts add none); the
    convolution and linears run and are placed in bf16, reading bf16 copies of their weights; each cast of a weight
    reads it in fp32 and writes it in bf16."""
    model, inputs = pm.convnext()
    fp32 = step_counts(model, inputs)
    half = step_counts(Autocast(model), inputs)
    assert sum(c.flops for c in half.values()) == sum(c.flops for c in fp32.values()) == 152194
    assert by_op(half)["aten::_to_copy"] == 0
    up = one_row(half, "aten::addmm", ((pm.CN_E * pm.CN_C,), (pm.CN_B * pm.CN_S * pm.CN_S, pm.CN_C),
                                       (pm.CN_C, pm.CN_E * pm.CN_C)))
    rows, k, n = pm.CN_B * pm.CN_S * pm.CN_S, pm.CN_C, pm.CN_E * pm.CN_C
    assert up.dtype == "bf16" and up.flops == 2 * rows * k * n
    assert (up.bytes_read, up.bytes_written) == ((rows * k + k * n + n) * BF16, rows * n * BF16)
    cast = one_row(half, "aten::_to_copy", ((n, k),))
    assert (cast.bytes_read, cast.bytes_written) == (n * k * F32, n * k * BF16)
    p = profile_cpu(Autocast(model), inputs)
    assert next(o for o in p.ops if o.op == "aten::convolution").m.dtype == "bf16"
    assert p.unsupported == ()


# --- a written-out training step: clip and AdamW -------------------------------------------------------------------
TS_IN, TS_HID, TS_OUT, TS_B = 8, 16, 4, 6
TS_PARAMS = TS_IN * TS_HID + TS_HID + TS_HID * TS_OUT + TS_OUT
ADAMW_PER_ELEMENT = formulas.ADAM_FLOPS_PER_ELEMENT + 1  # + the decoupled weight decay


TS_TENSORS = 4  # two weights, two biases: a step count each
CLIP_SCALARS = 4  # the coefficient max_norm / (total + eps), clamped to 1: add, reciprocal, multiply, clamp


def _training_step(*, clip_and_step: bool = True, **adamw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(TS_IN, TS_HID), nn.GELU(), nn.Linear(TS_HID, TS_OUT))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, **adamw)
    x, y = torch.randn(TS_B, TS_IN), torch.randint(0, TS_OUT, (TS_B,))

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        if clip_and_step:
            nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
            opt.step()
        return loss

    step()
    return step


@pytest.mark.parametrize("adamw", [{"foreach": False}, {"foreach": True}, {"fused": True}],
                         ids=["loop", "foreach", "fused"])
def test_a_training_step_counts_clip_and_adamw_per_parameter(adamw):
    """The step's FLOPs past its forward and backward: the clip (a vector norm of each gradient, 2 an element; the
    norm of the per-tensor norms; the coefficient; a multiply per gradient element) and AdamW's update, 8 an element
    on its loop, foreach and fused paths alike (the fused one counted as its foreach path), and a step increment per
    parameter tensor."""
    counts = counting.count_ops(_training_step(**adamw))
    base = counting.count_ops(_training_step(clip_and_step=False, **adamw))
    clip = (formulas.NORM_FLOPS_PER_ELEMENT * TS_PARAMS + formulas.NORM_FLOPS_PER_ELEMENT * TS_TENSORS + CLIP_SCALARS
            + TS_PARAMS)
    update = ADAMW_PER_ELEMENT * TS_PARAMS + TS_TENSORS
    extra = sum(c.flops for c in counts.values()) - sum(c.flops for c in base.values())
    assert extra == clip + update
    assert by_op(counts)["aten::_foreach_norm"] == formulas.NORM_FLOPS_PER_ELEMENT * TS_PARAMS
    assert not any(c.unsupported for c in counts.values())


def test_adamw_paths_agree_element_for_element():
    """One step's optimizer FLOPs, the model's work and the clip left aside: the loop, foreach and fused AdamW all
    count 8 an element and one per parameter tensor for the step count."""
    found = {}
    for label, adamw in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(TS_IN, TS_HID), nn.GELU(), nn.Linear(TS_HID, TS_OUT))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, **adamw)
        for _ in range(2):
            net(torch.randn(TS_B, TS_IN)).sum().backward()
            opt.step()
        found[label] = sum(c.flops for c in counting.count_ops(opt.step).values())
    assert found == dict.fromkeys(found, ADAMW_PER_ELEMENT * TS_PARAMS + TS_TENSORS)


def test_the_training_step_profiles_as_its_own_step():
    """profile_model of the step function: its backward and optimizer rows appear, the step reads 'own step', and
    a second profile of the same step function counts the same FLOPs (the optimizer's state was put back)."""
    step = _training_step(foreach=True)
    first = profile.profile_model(step, (), steps=1, warmup=1, ceilings=CEIL, device="cpu")
    second = profile.profile_model(step, (), steps=1, warmup=1, ceilings=CEIL, device="cpu")
    assert first.flops == second.flops > 0 and first.unsupported == ()
    assert {o.m.config["step"] for o in first.ops} == {"own step"}
    assert any(o.op == "aten::_foreach_addcdiv_" for o in first.ops)


# --- the public API names a bad argument before any work -----------------------------------------------------------
@pytest.mark.parametrize("kwargs,fragment", [
    ({"steps": 0}, r"steps=0 \(int\)"),
    ({"warmup": -1}, r"warmup=-1 \(int\)"),
    ({"train": "yes"}, r"train='yes' \(str\); expected True or False"),
    ({"name": "  "}, r"name=.*expected a str \(not empty\)"),
    ({"budget_s": float("nan")}, r"budget_s=nan"),
    ({"ceilings": {"copy_bytes_per_s": 2e10}}, r"ceilings=.*\(dict\); expected a perf.Ceilings"),
    ({"device": 1.5}, r"device=1\.5 \(float\)"),
])
def test_profile_model_names_the_bad_argument_before_running_the_model(kwargs, fragment):
    model = Counted()
    with pytest.raises(profile.ProfileError, match=fragment):
        profile.profile_model(model, (torch.randn(2, 4),), **{"steps": 1, "ceilings": CEIL, "device": "cpu", **kwargs})
    assert model.calls == 0


def test_count_ops_names_a_step_that_needs_arguments():
    model = Counted()
    with pytest.raises(profile.ProfileError, match=r"(?s)step=.*needs arguments.*lambda: model\(x\)"):
        counting.count_ops(model)
    with pytest.raises(profile.ProfileError, match=r"step=None \(NoneType\); expected a callable"):
        counting.count_ops(None)
    assert model.calls == 0
