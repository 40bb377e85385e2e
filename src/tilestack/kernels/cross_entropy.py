"""Linear layer + cross-entropy fused so that the (T, V) logits never exist whole in memory, with the
gradients made in the forward pass (Liger Kernel's scheme).

    loss, dx, dw = tilestack.kernels.fused_linear_cross_entropy(x, weight, labels)
    # x: (T, d) hidden states, weight: (V, d) (the LM head), labels: (T,) int64, ignore_index = -100
    # loss = mean over the labelled rows of CE(x @ weight.T, labels); dx, dw: its gradients

The rows are taken ``chunk`` at a time: the chunk's logits (chunk, V) come from one GEMM, the tile kernel
``ce_grad_kernel`` turns them in place into d loss / d logits and writes each row's loss, and two more GEMMs
give the chunk's rows of dx and add its share of dw. So memory holds one chunk of logits, and the logits are
read twice and written once by the kernel (online logsumexp, then the gradient) instead of the several
full-size passes of a log_softmax, its f32 copy and their backward.

The kernel, per block of BM rows, visits the vocabulary in BN-wide tiles twice:
  pass 1: running max m and sum l of exp(x - m) over a row's logits x (as exp2);
  pass 2: p = exp(x - m) / l, g = (p - onehot(label)) * scale, written over the logits, and the label's
          logit picked out with the same one-hot; then loss = m + log l - x[label] on a labelled row, 0 on an
          ignored one (the host divides their sum by the count: 0/0, NaN, where no row is labelled, as torch).
scale is 1/(number of labelled rows) for a labelled row and 0 for an ignored one. Without a gradient
(GRAD=False: no_grad, an evaluation loop) pass 2 only picks out the label's logit, and the two GEMMs after it are
skipped. The one-hot is built from column numbers without a gather: relu(1 - |col - label|) is 1 at the label's
column and 0 elsewhere (exact: both are integers below 2^24), and an ignored label (-100) matches no column.
"""

from __future__ import annotations

import functools
import math
import numbers

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_same_device, check_tensor, refuse_derived
from tilestack.kernels._plan import checked_once, forward_only, planned
from tilestack.tune.lookup import launch_config

LOG2E = math.log2(math.e)
FLT_MAX = 3.4028234663852886e38
IGNORE_INDEX = -100
MAX_EXACT_VOCAB = 1 << 24      # column numbers and labels are exact in f32 below this


@ts.kernel(grid=lambda L, BM: (ts.cdiv(L.shape[0], BM),), options=dict(num_warps=8, num_stages=1))
def ce_grad_kernel(L, Labels, Scale, Cols, Loss, *,
                   BM: int = ts.tunable(1, (1, 2, 4, 8, 16)),
                   BN: int = ts.tunable(4096, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)),
                   GRAD: bool = True):
    # L: (C, V) logits, overwritten with d loss / d logits (GRAD; left as they are without); Labels: (C,) int;
    # Scale: (C,) f32, > 0 on a labelled row; Cols: (BN,) f32 = 0, 1, ..., BN-1; Loss: (C,) f32, each labelled
    # row's loss, unscaled, and 0 on an ignored row (not 0 times its loss: a NaN or inf there stays out)
    i = ts.block_id(0)
    V = L.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    z = ts.RegTile[ts.f32, BM, BN]()
    hot = ts.RegTile[ts.f32, BM, BN]()
    cols = ts.RegTile[ts.f32, BM, BN]()          # column number within the tile, every row
    g = ts.RegTile[L.dtype, BM, BN]()
    col = ts.RegVec[ts.f32, BN]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()
    label = ts.RegVec[ts.f32, BM]()
    label_j = ts.RegVec[ts.f32, BM]()            # the label's column within tile j
    scale = ts.RegVec[ts.f32, BM]()
    coef = ts.RegVec[ts.f32, BM]()
    target = ts.RegVec[ts.f32, BM]()
    loss = ts.RegVec[ts.f32, BM]()
    labelled = ts.RegVec[ts.bool_, BM]()
    ts.fill(m, -FLT_MAX)                         # finite: a tile of -inf logits leaves m - m_new = 0, not NaN
    ts.zero(l)
    for j in ts.range(ts.cdiv(V, BN)):          # pass 1: online max and sum
        ts.load(x, L, at=(i, j))                 # (BM, BN)
        ts.right_fill(x, x, V - j * BN, -math.inf)
        ts.row_max(m_new, x, m)
        ts.sub(alpha, m, m_new)
        ts.mul(alpha, alpha, LOG2E)
        ts.exp2(alpha, alpha)
        ts.mul(l, l, alpha)
        ts.sub_row(z, x, m_new)                  # subtract, then scale: x * log2(e) could overflow
        ts.mul(z, z, LOG2E)
        ts.exp2(z, z)
        ts.row_sum(l, z, l)
        ts.copy(m, m_new)
    ts.load(label, Labels, at=(i,))
    ts.load(scale, Scale, at=(i,))
    ts.div(coef, scale, l)                       # softmax's 1/l and the mean's scale in one factor
    ts.load(col, Cols, at=(0,))
    ts.zero(cols)
    ts.add_col(cols, cols, col)
    ts.zero(target)
    for j in ts.range(ts.cdiv(V, BN)):          # pass 2: the gradient, over the logits
        ts.load(x, L, at=(i, j))
        ts.sub(label_j, label, (j * BN) * 1.0)
        ts.sub_row(hot, cols, label_j)           # col - label: 0 at the label's column
        ts.abs(hot, hot)
        ts.neg(hot, hot)
        ts.add(hot, hot, 1.0)
        ts.relu(hot, hot)                        # one-hot of the label
        ts.max(z, x, -FLT_MAX)                   # a -inf logit times a 0 of the one-hot must not be NaN
        ts.mul(z, z, hot)
        ts.row_sum(target, z, target)
        if GRAD:
            ts.sub_row(z, x, m)
            ts.mul(z, z, LOG2E)
            ts.exp2(z, z)
            ts.mul_row(z, z, coef)               # p * scale
            ts.mul_row(hot, hot, scale)
            ts.sub(z, z, hot)
            ts.copy(g, z)
            ts.store(L, g, at=(i, j))            # columns past V are dropped
    ts.log(loss, l)
    ts.add(loss, loss, m)                        # logsumexp
    ts.sub(loss, loss, target)
    ts.gt(labelled, scale, 0.0)
    ts.where(loss, labelled, loss, 0.0)
    ts.store(Loss, loss, at=(i,))


def reference(x, weight, labels, ignore_index: int = IGNORE_INDEX):
    """(loss, dx, dw) with plain PyTorch: the whole logits in f32, autograd; in the inputs' dtypes."""
    import torch

    xf, wf = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = torch.nn.functional.cross_entropy(xf @ wf.T, labels, ignore_index=ignore_index)
    dx, dw = torch.autograd.grad(loss, (xf, wf))
    return loss.detach(), dx.to(x.dtype), dw.to(weight.dtype)


@checked_once
def check_ce_args(fn: str, x, weight, labels, ignore_index) -> None:
    """Every check on the arguments, before any work (once per signature: shapes, dtypes, devices)."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor(fn, "x", x, rank=2, dtypes=floats)
    check_tensor(fn, "weight", weight, rank=2, dtypes=(x.dtype,))
    check_tensor(fn, "labels", labels, rank=1, dtypes=(torch.int64, torch.int32))
    if weight.shape[1] != x.shape[1]:
        raise LaunchError(f"{fn}: weight is {tuple(weight.shape)} and x is {tuple(x.shape)}; expected weight "
                          f"(V, d) with d = x.shape[1] = {x.shape[1]}")
    if labels.shape[0] != x.shape[0]:
        raise LaunchError(f"{fn}: labels has {labels.shape[0]} elements; expected x.shape[0] = {x.shape[0]}")
    if not 0 < weight.shape[0] < MAX_EXACT_VOCAB:
        raise LaunchError(f"{fn}: the vocabulary weight.shape[0] = {weight.shape[0]}; expected 1 .. "
                          f"{MAX_EXACT_VOCAB - 1}")
    # Any int the labels can hold, a class among them (as torch: rows of that label are left out of the mean,
    # a scale of 0 in the kernel); one past the labels' range would wrap in their comparison
    bits = torch.iinfo(labels.dtype)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral) or \
            not bits.min <= ignore_index <= bits.max:
        raise LaunchError(f"{fn}: ignore_index must be an int within the labels' {labels.dtype} range, got "
                          f"{ignore_index!r} (expected {bits.min}..{bits.max})")
    check_same_device(fn, x=x, weight=weight, labels=labels)


def check_labels(fn: str, labels, v: int, ignore_index: int) -> None:
    """Every label a class in 0..v-1 or ``ignore_index`` (torch's cross_entropy raises for any other; the
    kernel's one-hot would match no column and give a wrong loss without a word). The values are data, so this
    runs every call: on the CPU one min/max pass, and a second only to name a bad label; on a GPU an
    asynchronous device assert (no host sync, as torch's own check), on meta nothing."""
    import torch

    if labels.numel() == 0 or labels.device.type == "meta":
        return
    if labels.device.type != "cpu":
        ok = ((labels >= 0) & (labels < v)) | (labels == ignore_index)
        torch._assert_async(ok.all(), f"{fn}: a label outside 0..{v - 1} that is not ignore_index={ignore_index}")
        return
    lo, hi = torch.aminmax(labels)
    if lo.item() >= 0 and hi.item() < v:      # (.item(): a third of a 0-d comparison's host cost)
        return
    bad = labels[((labels < 0) | (labels >= v)) & (labels != ignore_index)]
    if bad.numel():
        raise LaunchError(f"{fn}: labels holds {int(bad[0])} (at index {int(torch.nonzero(labels == bad[0])[0])}); "
                          f"expected classes 0..V-1 = 0..{v - 1} or ignore_index={ignore_index}")


ROW_ALIGN = 64             # logits rows padded to a multiple of this many elements (GPT-2's 50257 is odd)
CHUNK_BYTES = 1 << 28      # logits of one chunk: 256 MiB (GPT-2's 50257 columns: 2048 rows in bf16)
SPLIT_MIN_LOGITS = 1 << 22 # a chunk of this many logits or more has its GEMMs split at a multiple of ROW_ALIGN


def chunk_rows(t: int, v: int, itemsize: int) -> int:
    """Rows per chunk: the logits of one chunk within CHUNK_BYTES, a power of two (whole GEMM tiles)."""
    rows = max(1, CHUNK_BYTES // max(1, v * itemsize))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(t, rows))


def default_config(v: int, device_type: str) -> dict:
    if device_type != "cuda":
        return {}
    bn = 4096 if v >= 4096 else max(128, 1 << (v - 1).bit_length())
    return dict(BM=1, BN=bn, num_warps=8 if bn >= 2048 else 4)


@functools.cache
def _cols(bn: int, device) -> object:
    import torch

    return torch.arange(bn, dtype=torch.float32, device=device)


def fused_linear_cross_entropy(x, weight, labels, *, ignore_index: int = IGNORE_INDEX, chunk: int | None = None,
                               grad: bool = True, backend: str | None = None, **config):
    """(loss, dx, dw): mean cross-entropy of ``x @ weight.T`` against ``labels`` over the rows whose label is
    not ``ignore_index`` (nan if none, as torch; the gradients are then zero), and its gradients in x's and
    weight's dtypes; ``grad=False`` gives (loss, None, None), with a third of the GEMM work. ``chunk`` rows at a
    time (default: the logits of a chunk within 256 MiB). Planned once per signature (``kernels._plan``): the
    checks, the config, the chunking and the kernel's launchers; a call checks the labels (data) and runs."""
    return _flce_plan(x, weight, labels, ignore_index=ignore_index, chunk=chunk, grad=grad, backend=backend,
                      **config)


@planned(name="fused_linear_cross_entropy")    # a refusal names the public function
@forward_only("fused_linear_cross_entropy")     # its gradients are results: a backward through the loss raises
def _flce_plan(x, weight, labels, *, ignore_index: int = IGNORE_INDEX, chunk: int | None = None, grad: bool = True,
               backend: str | None = None, **config):
    import torch

    check_ce_args("fused_linear_cross_entropy", x, weight, labels, ignore_index)
    # a NumPy int is the int it is (ignore_index took one; chunk=np.int64(2) was refused as "no positive int")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
        raise LaunchError(f"fused_linear_cross_entropy: chunk must be a positive int, got {chunk!r}")
    chunk = None if chunk is None else int(chunk)
    if not isinstance(grad, bool):
        raise LaunchError(f"fused_linear_cross_entropy: grad must be a bool, got {grad!r}")
    refuse_derived("fused_linear_cross_entropy", config, {"GRAD": "its grad argument"})
    t, v = x.shape[0], weight.shape[0]
    cfg = launch_config("cross_entropy", str(x.dtype).removeprefix("torch."), x.device, v,
                        default_config(v, x.device.type)) | config
    step = chunk or chunk_rows(t, v, x.element_size())
    padded = -(-v // ROW_ALIGN) * ROW_ALIGN          # rows start 16-byte aligned: vector loads, aligned GEMMs
    # Large chunks' GEMMs run over the first `va` vocabulary entries, a multiple of ROW_ALIGN, and the last few
    # apart: with an odd V (GPT-2's 50257) as a GEMM dimension cuBLAS falls back to sm75-era kernels, 1.5-7x
    # slower on the H200 (docs/performance.md). Small ones are host-bound: three GEMM calls, not six.
    va = v - v % ROW_ALIGN if min(step, t) * v >= SPLIT_MIN_LOGITS else v
    parts = [(0, va), (va, v)] if 0 < va < v else [(0, v)]
    chunks = [(lo, min(t, lo + step)) for lo in range(0, t, step)]
    # (rows of a chunk, 16-byte alignment of its slices of labels, scale and loss) -> (the kernel's launcher, its
    # column numbers): a launcher is specialized for its pointers' alignment, and a chunk of a size that is no
    # multiple of 4 (chunk=5) starts the next chunk's slices off 16 bytes
    launchers: dict = {}

    def launcher(rows, labels_c, scale_c, loss_c):
        key = (rows.shape[0], labels_c.data_ptr() % 16, scale_c.data_ptr() % 16, loss_c.data_ptr() % 16)
        found = launchers.get(key)
        if found is None:       # made on first use: a plan refusing its arguments has touched no kernel
            cols = _cols(cfg.get("BN", ce_grad_kernel.constants["BN"].default), rows.device)
            found = launchers[key] = (ce_grad_kernel.launcher_for(
                (rows, labels_c, scale_c, cols, loss_c), backend, GRAD=grad, **cfg), cols)
        found[0]((rows, labels_c, scale_c, found[1], loss_c))

    def run(x, weight, labels, **_):
        check_labels("fused_linear_cross_entropy", labels, v, ignore_index)
        valid = labels != ignore_index
        count = valid.sum()
        scale = valid / count.clamp(min=1)           # (T,) f32: 1/n on labelled rows, 0 on ignored ones
        row_loss = x.new_empty(t, dtype=torch.float32)
        dx = dw = None
        if grad:
            dx = torch.empty_like(x)
            dw = torch.zeros_like(weight) if t == 0 else torch.empty_like(weight)
        for lo, hi in chunks:
            xc = x[lo:hi]                            # (c, d)
            rows = x.new_empty(hi - lo, padded)
            logits = rows[:, :v]                     # (c, V), row stride padded
            if padded > v:
                # The kernel runs over the padded rows (whole 64-wide tiles: 2x the bytes/s of a ragged V on the
                # H200), the padding as -inf logits, which it turns into zero gradients; the GEMMs after it read
                # zeros there (torch 2.13's CPU bf16 mm reads a strided row past K).
                rows[:, v:].fill_(-math.inf)
            for a, b in parts:
                torch.mm(xc, weight[a:b].T, out=logits[:, a:b])      # x's dtype, f32 accumulation
            launcher(rows, labels[lo:hi], scale[lo:hi], row_loss[lo:hi])
            if not grad:
                continue
            for n, (a, b) in enumerate(parts):
                if n == 0:
                    torch.mm(logits[:, a:b], weight[a:b], out=dx[lo:hi])     # (c, d) = (c, V) @ (V, d)
                else:
                    dx[lo:hi].addmm_(logits[:, a:b], weight[a:b])
                if lo == 0:
                    torch.mm(logits[:, a:b].T, xc, out=dw[a:b])              # (V, d) = (V, c) @ (c, d)
                else:
                    dw[a:b].addmm_(logits[:, a:b].T, xc)
        # an ignored row's loss is 0 (the kernel leaves its value out), so no labelled row gives 0 / 0 = NaN
        return row_loss.sum() / count, dx, dw
    return run
