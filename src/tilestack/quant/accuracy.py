"""What quantization costs in accuracy: the quantized model's outputs against the float model's, and the test
accuracy of a classifier trained here on a small real dataset (scikit-learn's 8x8 digits, shipped with it).

    qmodel = tilestack.quantize(copy.deepcopy(model), "int8")
    accuracy_cost(model, qmodel, batches)   # {"max_rel_err": ..., "mean_rel_err": ..., "top1_agree": ...}
    model, (x_test, y_test) = digits_classifier()
    top1(model, x_test, y_test)             # test accuracy in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from tilestack.errors import LaunchError
from tilestack.quant.linear import _batch_problem, evaluating

DIGITS_TEST_FRACTION = 0.2
DIGITS_PIXEL_MAX = 16.0            # the digits set's pixels are 0..16


def _outputs(model: nn.Module, batch) -> torch.Tensor:
    """model's output on ``batch`` (a tensor, a tuple of arguments or a dict of keyword arguments), as at
    inference: no gradients, every module in eval mode."""
    with evaluating(model), torch.no_grad():
        if isinstance(batch, torch.Tensor):
            return model(batch)
        return model(**batch) if isinstance(batch, dict) else model(*batch)


def accuracy_cost(model: nn.Module, qmodel: nn.Module, batches) -> dict[str, float]:
    """The quantized model's outputs against the float model's over ``batches`` (inputs as for ``model``):
    the largest and the mean of |yq - y| / max|y| per batch, and the fraction of rows whose argmax over the
    last dim agrees (top-1 for logits)."""
    for name, m in (("model", model), ("qmodel", qmodel)):
        if not isinstance(m, nn.Module):
            raise LaunchError(f"accuracy_cost: {name} must be a torch.nn.Module, got {type(m).__name__}")
    if model is qmodel:     # quantize changes its model in place: the float model is gone, and the error would be 0
        raise LaunchError("accuracy_cost: model and qmodel are the same module (tilestack.quantize changes the model "
                          "in place and returns it); expected the float model and its quantized copy: "
                          "qmodel = tilestack.quantize(copy.deepcopy(model), ...)")
    if isinstance(batches, (torch.Tensor, str, bytes, dict)) or not isinstance(batches, Iterable):
        raise LaunchError(f"accuracy_cost: batches must be an iterable of sample batches (e.g. [x1, x2]), got "
                          f"{type(batches).__name__}")
    worst, total, agree, rows, n = 0.0, 0.0, 0, 0, 0
    for i, batch in enumerate(batches):
        problem = _batch_problem(batch)
        if problem is not None:    # (None failed inside the call, its message holding the model's whole repr)
            raise LaunchError(f"accuracy_cost: batch {i} is {problem}; expected a tensor, a tuple or list of the "
                              "model's positional arguments or a dict of its keyword arguments")
        try:
            y, yq = _outputs(model, batch), _outputs(qmodel, batch)
        except Exception as e:   # the model's own error, said as which batch
            got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise LaunchError(f"accuracy_cost: batch {i} ({got}) failed in the model: {type(e).__name__}: {e}") from e
        # a model returning a dict or a tuple (Hugging Face's ModelOutput, (logits, loss)) was reported as failing
        # in the model ("'dict' object has no attribute 'float'"): it ran; its output is what cannot be compared
        for name, out in (("model", y), ("qmodel", yq)):
            if not isinstance(out, torch.Tensor):
                raise LaunchError(f"accuracy_cost: {name} returned a {type(out).__name__} on batch {i}, not a tensor; "
                                  "expected models that return the one tensor to compare (wrap them in a module "
                                  "whose forward returns it, e.g. the logits of a dict or tuple)")
        y, yq = y.float(), yq.float()
        if y.shape != yq.shape or y.dim() == 0:
            raise LaunchError(f"accuracy_cost: batch {i} gave outputs {tuple(y.shape)} (model) and "
                              f"{tuple(yq.shape)} (qmodel); expected one shape with a last dim to compare over")
        if y.numel() == 0:       # nothing to compare in an empty batch
            continue
        rel = float((yq - y).abs().max() / y.abs().max().clamp_min(1e-30))
        # NaN kept (max(worst, nan) would keep worst: a NaN output would read as no error)
        worst, total, n = rel if math.isnan(rel) else max(worst, rel), total + rel, n + 1
        agree += int((yq.argmax(-1) == y.argmax(-1)).sum())
        rows += y.numel() // y.shape[-1]
    if n == 0:
        raise LaunchError("accuracy_cost: batches gave no non-empty batch; expected sample inputs to compare the "
                          "models on (an error of 0 from none would say nothing)")
    return {"max_rel_err": worst, "mean_rel_err": total / max(n, 1), "top1_agree": agree / max(rows, 1)}


def digits_data(seed: int = 0):
    """((x_train, y_train), (x_test, y_test)): the digits set, pixels scaled to [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / DIGITS_PIXEL_MAX       # (1797, 64)
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def digits_classifier(hidden: int = 128, steps: int = 300, seed: int = 0):
    """(model, (x_test, y_test)): a two-hidden-layer MLP trained on the digits training split with full-batch
    Adam (a few seconds on a CPU)."""
    (x, y), test = digits_data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), test


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
