"""FLOP rules of convolutions (their groups, forward and backward; ``conv_tbc``) and the CPU LSTM kernel."""

from __future__ import annotations

from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules.common import Rule, _argument, _numel, _tensors


def _conv_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.convolution / aten._convolution: x (N, C_in, *S), w, bias -> y, counted by formulas.convolution."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, w, b = arg("input"), arg("weight"), arg("bias")
    groups, transposed = int(arg("groups")), bool(arg("transposed"))
    if 0 in (_numel(x), _numel(w)):
        # nothing to multiply: torch gives x (N, 0, *S) by w (C_out, 0, *K) an output of 0 channels, which the
        # formula's shape check refused mid-profile (profiler round 25); a bias would be added to each output element
        return float(_numel(out)) if b is not None else 0.0
    cost = formulas.convolution(x.shape, w.shape, out.shape, groups=groups, transposed=transposed, bias=b is not None)
    return float(cost.flops)


def _conv_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.convolution_backward: (dy, x, w, ..., output_mask) -> (dx, dw, db), by formulas.convolution_backward.

    torch's own formula counts the weight gradient as if groups were 1 (groups times too many FLOPs).
    """
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    dx, dw, db = arg("output_mask")
    if 0 in (_numel(arg("input")), _numel(arg("weight"))):  # no products (see above)
        return float(_numel(arg("grad_output"))) if db else 0.0
    return float(
        formulas.convolution_backward(
            arg("grad_output").shape,
            arg("input").shape,
            arg("weight").shape,
            groups=int(arg("groups")),
            transposed=bool(arg("transposed")),
            input_grad=bool(dx),
            weight_grad=bool(dw),
            bias_grad=bool(db),
        ).flops
    )


def _rnn_layer_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.mkldnn_rnn_layer (CPU LSTM): one direction of one layer over the whole sequence.

    Each step multiplies the input by ``weight0`` (G*H, I) and the hidden state by ``weight1`` (G*H, H), G the
    gates (4 for an LSTM): ``2 * steps * batch * (numel(weight0) + numel(weight1))``, the matmuls that the
    unfused (packed) path runs as ``addmm``/``mm``; the gates' element-wise work is left out, as there.
    """
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, w_ih, w_hh = arg("input"), arg("weight0"), arg("weight1")
    rows = x.numel() // x.shape[-1]  # steps x batch
    return float(formulas.FLOPS_PER_MAC * rows * (w_ih.numel() + w_hh.numel()))


def _rnn_layer_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.mkldnn_rnn_layer_backward: the input and the weight gradients, each the forward's matmuls."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    x, w_ih, w_hh = arg("input"), arg("weight1"), arg("weight2")
    rows = x.numel() // x.shape[-1]
    return float(formulas.MATMUL_BWD_OVER_FWD * formulas.FLOPS_PER_MAC * rows * (w_ih.numel() + w_hh.numel()))


def _cudnn_rnn_products(func: Any, args: tuple, kwargs: dict) -> float:
    """The matmuls of aten._cudnn_rnn (a GPU's LSTM, GRU or RNN: every layer and direction in one call): each step
    multiplies its layer's input and hidden state by the gate matrices (and an LSTM with proj_size its hidden state
    by the projection), 2 * rows * (the elements of every weight matrix), rows the steps x batch (a packed sequence's
    total length) as in the CPU kernel's count; the biases and the gates' element-wise work left out, as there."""
    x = _argument(func, args, kwargs, "input")
    rows = _numel(x) // max(x.shape[-1], 1)
    matrices = [w for w in _tensors(_argument(func, args, kwargs, "weight")) if w.dim() == 2]
    return float(formulas.FLOPS_PER_MAC * rows * sum(_numel(w) for w in matrices))


def _cudnn_rnn_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten._cudnn_rnn (profiler round 24: reported uncounted, so a GPU profile of any recurrent net had its
    recurrent layers without FLOPs): :func:`_cudnn_rnn_products`."""
    return _cudnn_rnn_products(func, args, kwargs)


def _cudnn_rnn_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten._cudnn_rnn_backward: the data gradients through every step (always run: the weight gradient needs them
    too), each the forward's matmuls, and the weight gradient's as many again where ``output_mask[3]`` asks for it."""
    weight_grad = bool(list(_argument(func, args, kwargs, "output_mask"))[3])
    return (1 + weight_grad) * _cudnn_rnn_products(func, args, kwargs)


def _fused_cell_flops(per_hidden: int, gates: int, *, backward: bool) -> Rule:
    """_thnn_fused_lstm_cell / _thnn_fused_gru_cell and their backwards (LSTMCell / GRUCell on a GPU: profiler round 24,
    reported uncounted): ``per_hidden`` FLOPs per element of the (B, H) state (``formulas.FUSED_*_CELL_*``), and one
    add per gate element (B, gates * H) for each bias given, or for each bias gradient formed (``has_bias``)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        if backward:
            state = _numel(arg("cx") if arg("cx") is not None else arg("grad_hy"))
            biases = 2 * bool(arg("has_bias")) if gates == 3 else bool(arg("has_bias"))  # GRU: input's and hidden's
        else:
            state = _numel(arg("cx") if arg("cx") is not None else arg("hx"))
            biases = (arg("input_bias") is not None) + (arg("hidden_bias") is not None)
        return float(per_hidden * state + biases * gates * state)

    return count


def _conv_tbc_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """conv_tbc: x (T, B, C_in) * w (K, C_in, C_out) -> y (T', B, C_out): a multiply-add per weight element per
    output position and batch entry, plus the bias's add per output element."""
    w, y = _argument(func, args, kwargs, "weight"), _tensors(out)[0]
    positions = _numel(y) // max(y.shape[-1], 1)  # T' x B
    return float(formulas.FLOPS_PER_MAC * positions * _numel(w) + _numel(y))


CONV_RNN_FLOPS: dict[str, Rule] = {
    "aten.convolution": _conv_flops,
    "aten._convolution": _conv_flops,
    "aten.convolution_backward": _conv_backward_flops,
    "aten.mkldnn_rnn_layer": _rnn_layer_flops,
    "aten.mkldnn_rnn_layer_backward": _rnn_layer_backward_flops,
    "aten._cudnn_rnn": _cudnn_rnn_flops,
    "aten._cudnn_rnn_backward": _cudnn_rnn_backward_flops,
    "aten.miopen_rnn": _cudnn_rnn_flops,  # an AMD GPU's (tagged a random draw for its dropout: was counted 0)
    "aten.miopen_rnn_backward": _cudnn_rnn_backward_flops,
    "aten._thnn_fused_lstm_cell": _fused_cell_flops(formulas.FUSED_LSTM_CELL_FLOPS_PER_HIDDEN, 4, backward=False),
    "aten._thnn_fused_lstm_cell_backward_impl": _fused_cell_flops(formulas.FUSED_LSTM_CELL_BWD_FLOPS_PER_HIDDEN, 4,
                                                                  backward=True),
    "aten._thnn_fused_gru_cell": _fused_cell_flops(formulas.FUSED_GRU_CELL_FLOPS_PER_HIDDEN, 3, backward=False),
    "aten._thnn_fused_gru_cell_backward": _fused_cell_flops(formulas.FUSED_GRU_CELL_BWD_FLOPS_PER_HIDDEN, 3,
                                                            backward=True),
    "aten.conv_tbc": _conv_tbc_flops,
}
