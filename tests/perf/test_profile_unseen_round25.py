"""Twenty-fifth held-out round for the model profiler: seven models written for this round (``perf_models_round25``),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written out
by hand from the layer shapes.

The models: a neural cellular automaton (a fixed identity/Sobel depthwise perception, a 1x1 convolution MLP, a random
update mask, an alive mask by a max pool, stepped twice); a ViT cutting its patches by Tensor.unfold; a batched
Kalman filter in float64 (a shared matrix broadcast against a batch, gains by torch.linalg.solve, torch.logdet); a
Student-t mixture density network in float64 (lgamma, log1p, log_softmax, logsumexp); an MLP-Mixer held in bfloat16;
a gated scan (cummax, cumprod, logcumsumexp, diff); an RBF head on L1 distances (cdist p=1) scaled by their median
(torch.quantile). This round's fixes and the public API's refusals are in test_profile_unseen_round25_more.py.

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts the product alone, its bias
add not); a convolution by ``profile_support.conv``; element-wise ops one per output element; a reduction one per
element folded in; softmax, LayerNorm and logsumexp by their ``formulas`` constants; attention 4 B H Nq Nkv D; a sort
n ceil(log2 n) compares per row; a scan one combine per element; an LU 2n^3/3 and a solve's two triangles 2 n^2 k.
Bytes are the distinct tensors an op reads and writes (fp64: 8 bytes, fp32: 4, bf16: 2, int64: 8, bool: 1).

The float64 models are profiled under ceilings that hold an fp64 roof (``CEIL64``), so that each counted row is
placed on a side of the ridge; the synthetic ceilings the other rounds use have none (their fp64 rows read unknown).
"""

import math
import sys
from pathlib import Path

import pytest
from torch.utils.flop_counter import sdpa_backward_flop_count

from tilestack.perf import device, formulas, profile
from tilestack.perf.profile_state import same_draws, same_state

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round25 as pm  # noqa: E402
from _profile_helpers import FILTERS, check_every_row, one_row  # noqa: E402
from profile_support import by_op, cases, conv, flops_of, rows_of, torch_by_op  # noqa: E402

pytestmark = FILTERS
F64, F32, BF16, I64, BOOL = 8, 4, 2, 8, 1
SOFTMAX = formulas.SOFTMAX_FLOPS_PER_ELEMENT
LAYERNORM = formulas.LAYERNORM_FLOPS_PER_ELEMENT
LOGSUMEXP = formulas.LOGSUMEXP_FLOPS_PER_ELEMENT
CDIST = formulas.CDIST_FLOPS_PER_TERM
# the synthetic ceilings of the other rounds (ridge at 10 FLOP/B), with an fp64 roof beside the others
CEIL64 = device.Ceilings("cpu", 2e10, {"fp32": 2e11, "bf16": 2e11, "fp16": 2e11, "fp64": 2e11}, "now")

CASES, IDS = cases(pm.MODELS)
_cache: dict = {}


def profiled(name: str, train: bool):
    """(profile under CEIL64, our counts of one more step, torch's counts of that step), once per case: the counted
    step runs as the profile's do (after warm-up, the same random draws, from the state the warm-up left)."""
    if (name, train) not in _cache:
        model, inputs = pm.MODELS[name][0]()
        p = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL64, device="cpu", train=train,
                                  name=name)
        step = same_draws(profile._without_fastpath(profile.make_step(model, inputs, train=train)), model)
        step()
        step = same_state(step, model, inputs)
        _cache[name, train] = (p, profile.count_ops(step), torch_by_op(step))
    return _cache[name, train]


DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::_to_copy", "aten::rand", "aten::zeros",
    "aten::new_zeros", "aten::zeros_like", "aten::ones_like", "aten::full_like", "aten::eye", "aten::diag_embed",
    "aten::gather", "aten::scatter", "aten::scatter_", "aten::flip", "aten::masked_fill", "aten::masked_fill_",
    "aten::select_backward", "aten::slice_backward", "aten::scalar_tensor", "aten::fill_",
    "aten::_linalg_check_errors",
}


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step; nothing that computes is uncounted or counted free; torch's formulas agreed
    with (but its convolutions'); each counted row placed by its intensity; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- neural cellular automaton -------------------------------------------------------------------------------------
NC_PIX = pm.NC_S * pm.NC_S
NC_X = pm.NC_B * pm.NC_C * NC_PIX  # elements of the state
NC_CELLS = pm.NC_B * NC_PIX  # elements of a (B, 1, S, S) mask
NC_SEE = conv(pm.NC_B, pm.NC_C, 3 * pm.NC_C, NC_PIX, 9, groups=pm.NC_C, bias=False)  # identity, Sobel x and y
NC_FC1 = conv(pm.NC_B, 3 * pm.NC_C, pm.NC_HID, NC_PIX, 1)
NC_FC2 = conv(pm.NC_B, pm.NC_HID, pm.NC_C, NC_PIX, 1, bias=False)
NC_POOL_TAPS = 9


def test_cellular_automaton_by_hand():
    """Each of the 2 steps: the perception (C groups of 1 -> 3, 9 taps, no bias), the 1x1 MLP with its ReLU, the fire
    compare, dx * fire, x + ..., the alive pool (9 compares a cell), its compare, x * alive: 112752."""
    p, counts, _ = profiled("nca", False)
    step = (NC_SEE + NC_FC1 + pm.NC_B * pm.NC_HID * NC_PIX + NC_FC2 + NC_CELLS + 3 * NC_X
            + NC_CELLS * NC_POOL_TAPS + NC_CELLS)
    assert p.flops == pm.NC_STEPS * step == 112752
    see = one_row(counts, "aten::convolution", ((pm.NC_B, pm.NC_C, pm.NC_S, pm.NC_S), (3 * pm.NC_C, 1, 3, 3)))
    assert (see.calls, see.flops) == (pm.NC_STEPS, pm.NC_STEPS * NC_SEE)
    assert see.bytes_read == pm.NC_STEPS * (NC_X + 3 * pm.NC_C * 9) * F32  # x and the buffer of filters
    assert see.bytes_written == pm.NC_STEPS * 3 * NC_X * F32
    draw = one_row(counts, "aten::rand")  # the update mask: a draw, written, no FLOPs
    assert (draw.flops, draw.bytes_read, draw.bytes_written) == (0, 0, pm.NC_STEPS * NC_CELLS * F32)
    pool = one_row(counts, "aten::max_pool2d_with_indices")  # values and int64 indices of one channel
    assert pool.bytes_read == pm.NC_STEPS * NC_CELLS * F32
    assert pool.bytes_written == pm.NC_STEPS * NC_CELLS * (F32 + I64)
    masked = one_row(counts, "aten::mul")  # dx * fire and x * alive: a float state times a bool mask
    assert masked.calls == 2 * pm.NC_STEPS and masked.flops == 2 * pm.NC_STEPS * NC_X
    assert masked.bytes_read == 2 * pm.NC_STEPS * (NC_X * F32 + NC_CELLS * BOOL)


def test_cellular_automaton_trained_perceives_the_first_step_without_gradients():
    """The first step's perception sees the input and a buffer: no gradient, no backward. The second's sees a state
    that needs one: its backward forms the input gradient alone (the filters are a buffer), C groups kept; the
    first 1x1 convolution's backward forms no input gradient in step one (its input needs none), one in step two."""
    _, counts, _ = profiled("nca", True)
    back = one_row(counts, "aten::convolution_backward",
                   ((pm.NC_B, 3 * pm.NC_C, pm.NC_S, pm.NC_S), (pm.NC_B, pm.NC_C, pm.NC_S, pm.NC_S),
                    (3 * pm.NC_C, 1, 3, 3)))
    assert (back.calls, back.flops, back.bytes_written) == (1, NC_SEE, NC_X * F32)
    fc1 = one_row(counts, "aten::convolution_backward",
                  ((pm.NC_B, pm.NC_HID, pm.NC_S, pm.NC_S), (pm.NC_B, 3 * pm.NC_C, pm.NC_S, pm.NC_S),
                   (pm.NC_HID, 3 * pm.NC_C, 1, 1)))
    weight_and_bias = NC_FC1  # dw: 2 N positions numel(w); db: one add per dy element
    data = NC_FC1 - pm.NC_B * pm.NC_HID * NC_PIX  # dx: the product alone
    assert fc1.calls == pm.NC_STEPS and fc1.flops == pm.NC_STEPS * weight_and_bias + data


# --- ViT cut into patches by Tensor.unfold -------------------------------------------------------------------------
VT_ROWS = pm.VT_B * pm.VT_T
VT_X = VT_ROWS * pm.VT_D
VT_IMG = pm.VT_B * pm.VT_C * pm.VT_S * pm.VT_S
VT_EMBED = 2 * pm.VT_B * pm.VT_N * pm.VT_PD * pm.VT_D
VT_QKV, VT_PROJ = 2 * VT_ROWS * pm.VT_D * 3 * pm.VT_D, 2 * VT_ROWS * pm.VT_D * pm.VT_D
VT_MLP = 2 * VT_ROWS * pm.VT_D * pm.VT_MLP  # each of up and down
VT_ATTN = 4 * pm.VT_B * pm.VT_H * pm.VT_T * pm.VT_T * (pm.VT_D // pm.VT_H)
VT_HEAD = 2 * pm.VT_B * pm.VT_D * pm.VT_CLS


def test_vit_unfold_by_hand():
    """The unfolds are views (no bytes); the permuted reshape copies the image once, read and written whole; the
    embedding over B*N patches of C*P*P; + pos; two LayerNorms over the tokens and one over the class tokens; qkv,
    SDPA, proj, two residuals, up, GELU, down, the head: 60384."""
    p, counts, _ = profiled("vit_unfold", False)
    for row in rows_of(counts, "aten::unfold"):
        assert (row.flops, row.bytes_read, row.bytes_written) == (0, 0, 0)
    patches = one_row(counts, "aten::clone")
    assert (patches.flops, patches.bytes_read, patches.bytes_written) == (0, VT_IMG * F32, VT_IMG * F32)
    assert one_row(counts, "aten::addmm", ((pm.VT_D,), (pm.VT_B * pm.VT_N, pm.VT_PD), (pm.VT_PD, pm.VT_D))).flops \
        == VT_EMBED
    assert by_op(counts)["aten::_scaled_dot_product_flash_attention_for_cpu"] == VT_ATTN
    norms = LAYERNORM * (2 * VT_X + pm.VT_B * pm.VT_D)
    assert by_op(counts)["aten::native_layer_norm"] == norms
    total = VT_EMBED + VT_X + norms + VT_QKV + VT_ATTN + VT_PROJ + 2 * VT_X + 2 * VT_MLP + VT_ROWS * pm.VT_MLP \
        + VT_HEAD
    assert p.flops == total == 60384
    cls = one_row(counts, "aten::cat")  # the class token is read as held (D), not as expanded over the batch
    assert cls.bytes_read == (pm.VT_D + pm.VT_B * pm.VT_N * pm.VT_D) * F32 and cls.bytes_written == VT_X * F32


def test_vit_unfold_trained():
    """Trained: SDPA's backward as torch counts it; every linear's two gradient products (the patch embedding's
    input gradient too: the patches need none, so it is left out); the image's copy made once, not differentiated;
    the class token's gradient summed over the batch (B*D adds)."""
    _, counts, _ = profiled("vit_unfold", True)
    q = (pm.VT_B, pm.VT_H, pm.VT_T, pm.VT_D // pm.VT_H)
    assert by_op(counts)["aten::_scaled_dot_product_flash_attention_for_cpu_backward"] == \
        sdpa_backward_flop_count(q, q, q, q) == formulas.ATTENTION_BWD_OVER_FWD * VT_ATTN
    weight_grads = VT_EMBED + VT_QKV + VT_PROJ + 2 * VT_MLP + VT_HEAD
    input_grads = VT_QKV + VT_PROJ + 2 * VT_MLP + VT_HEAD
    assert flops_of(counts, "aten::mm") == weight_grads + input_grads
    assert one_row(counts, "aten::clone", ((pm.VT_B, 2, 2, pm.VT_C, pm.VT_P, pm.VT_P),)).calls == 1
    assert one_row(counts, "aten::sum", ((pm.VT_B, 1, pm.VT_D),)).flops == pm.VT_B * pm.VT_D


# --- Kalman filter in float64 --------------------------------------------------------------------------------------
B, N, M = pm.KF_B, pm.KF_N, pm.KF_M


def _lu(n: int) -> float:
    return 2 * n ** 3 / 3


def _solve(n: int, k: int) -> float:  # LU, then the two triangles of each right-hand side
    return _lu(n) + 2 * n * n * k


def test_kalman_filter_by_hand():
    """Per step: predict x (B x N by N x N), A P A^T as two products of (B*N) x N by N x N (the shared A broadcast:
    P is transposed so that A P folds into one mm) + Q; H P twice (in S and as HP), S = H P H^T + R; the innovation;
    the gain by an LU solve of N right-hand sides; x += K r, P -= K HP; the Mahalanobis term by a solve of 1; the
    log-determinant by an LU (logdet checks its sign: a compare and a select); the NLL's adds. Once: the two exps and
    the mean: 5877."""
    p, counts, theirs = profiled("kalman", False)
    step = (2 * B * N * N  # x A^T
            + 2 * 2 * B * N * N * N + B * N * N  # A P A^T + Q
            + 2 * 2 * B * N * N * M + 2 * B * M * N * M + B * M * M  # H P (twice), (H P) H^T + R
            + 2 * B * N * M + B * M  # r = y - x H^T
            + B * _solve(M, N)  # K^T = S^-1 H P
            + 2 * B * N * M + B * N  # x + K r
            + 2 * B * N * M * N + B * N * N  # P - K H P
            + B * _solve(M, 1) + 2 * B * M  # r^T S^-1 r
            + B * _lu(M) + 2 * B  # logdet, its sign check
            + 4 * B)  # logdet + m, + M log 2 pi, * 0.5, nll +
    assert p.flops == pytest.approx(pm.KF_T * step + N + M + B, rel=1e-12) and p.flops == pytest.approx(5877)
    assert theirs["aten::mm"] + theirs["aten::bmm"] == flops_of(counts, {"aten::mm", "aten::bmm"})
    solve = one_row(counts, "aten::_linalg_solve_ex", ((B, M, M), (B, M, N)))
    assert solve.flops == pytest.approx(pm.KF_T * B * _solve(M, N))
    pivots_info = B * M * 4 + B * 4  # int32 pivots and info
    assert solve.bytes_read == pm.KF_T * B * (M * M + M * N) * F64
    assert solve.bytes_written == pm.KF_T * (B * (M * N + M * M) * F64 + pivots_info)
    assert {o.m.dtype for o in p.ops if o.counted and o.m.flops} == {"fp64"}


def test_kalman_filter_reads_the_expanded_identity_as_held():
    """The first step's P is eye(N) expanded over the batch: A P transposes and copies it, reading the N*N elements
    the identity holds, not B*N*N; the other copies of P read all of theirs."""
    _, counts, _ = profiled("kalman", False)
    copies = one_row(counts, "aten::clone", ((B, N, N),))
    per_step = 4  # P^T for A P, A P's result for (A P) A^T; P^T for each of the two H P
    assert copies.calls == pm.KF_T * per_step
    assert copies.bytes_read == (N * N + (pm.KF_T * per_step - 1) * B * N * N) * F64
    assert copies.bytes_written == pm.KF_T * per_step * B * N * N * F64


def test_kalman_filter_trained_backs_through_the_solves_by_lu_solves():
    """Trained: each solve's backward solves S^T against its output gradient with the saved LU factors
    (linalg_lu_solve, 2 n^2 k a system): the gain's for the two steps whose gain reaches the loss (the last step's
    gain updates an x and P nobody reads), the Mahalanobis solve's (k = 1) for all three, and logdet's gradient
    S^-T by one more (k = M) each step."""
    _, counts, _ = profiled("kalman", True)
    gain = one_row(counts, "aten::linalg_lu_solve", ((B, M, M), (B, M), (B, M, N)))
    assert (gain.calls, gain.flops) == (pm.KF_T - 1, (pm.KF_T - 1) * B * 2 * M * M * N)
    mahalanobis = one_row(counts, "aten::linalg_lu_solve", ((B, M, M), (B, M), (B, M, 1)))
    assert (mahalanobis.calls, mahalanobis.flops) == (pm.KF_T, pm.KF_T * B * 2 * M * M)
    logdet = one_row(counts, "aten::linalg_lu_solve", ((B, M, M), (B, M), (B, M, M)))
    assert (logdet.calls, logdet.flops) == (pm.KF_T, pm.KF_T * B * 2 * M * M * M)


# --- Student-t mixture density network in float64 ------------------------------------------------------------------
MD_E = pm.MD_B * pm.MD_K  # elements of each (B, K) tensor
MD_ELEMENTWISE = 22  # (5,3) ops: z (3), the log-density's 18, log_softmax + log_t


def test_student_mixture_by_hand():
    """The body and head; z = (y - mu) / exp(log_s); the Student-t log-density by lgamma twice, log, log1p and the
    arithmetic between them, one FLOP an element each; log_softmax 5 an element, logsumexp 4; the mean and the
    negation: 1471. Every lgamma and log1p row a (B, K) fp64 row, read and written once."""
    p, counts, _ = profiled("mdn", False)
    linears = 2 * pm.MD_B * pm.MD_IN * pm.MD_HID + 2 * pm.MD_B * pm.MD_HID * 3 * pm.MD_K
    assert flops_of(counts, "aten::addmm") == linears
    assert by_op(counts)["aten::lgamma"] == 2 * MD_E and by_op(counts)["aten::log1p"] == MD_E
    assert by_op(counts)["aten::_log_softmax"] == SOFTMAX * MD_E
    assert by_op(counts)["aten::logsumexp"] == LOGSUMEXP * MD_E
    total = linears + pm.MD_B * pm.MD_HID + MD_ELEMENTWISE * MD_E + SOFTMAX * MD_E + LOGSUMEXP * MD_E + pm.MD_B + 1
    assert p.flops == total == 1471
    lgamma = one_row(counts, "aten::lgamma")
    assert (lgamma.bytes_read, lgamma.bytes_written) == (2 * MD_E * F64, 2 * MD_E * F64)
    lse = one_row(counts, "aten::logsumexp")
    assert (lse.bytes_read, lse.bytes_written) == (MD_E * F64, pm.MD_B * F64)
    assert {c.dtype for c in counts.values() if c.flops} == {"fp64"}


def test_student_mixture_trained():
    """Trained: log_softmax's backward 4 an element; the head's and the body's two gradient products each but the
    body's input gradient (x needs none); the constant nu carries no gradient: lgamma's backward (digamma) never
    runs, as lgamma(nu) needs none."""
    _, counts, _ = profiled("mdn", True)
    assert by_op(counts)["aten::_log_softmax_backward_data"] == formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT * MD_E
    assert flops_of(counts, "aten::mm") == 2 * (2 * pm.MD_B * pm.MD_HID * 3 * pm.MD_K) + \
        2 * pm.MD_B * pm.MD_IN * pm.MD_HID
    assert "aten::digamma" not in by_op(counts)


# --- MLP-Mixer in bfloat16 -----------------------------------------------------------------------------------------
MX_X = pm.MX_B * pm.MX_N * pm.MX_D
MX_TOKEN = 2 * pm.MX_B * pm.MX_D * pm.MX_N * pm.MX_TH  # each of the two token-mixing products
MX_CHANNEL = 2 * pm.MX_B * pm.MX_N * pm.MX_D * pm.MX_CH  # each of the two channel-mixing products


def test_mixer_in_bf16_by_hand():
    """Two LayerNorms; token mixing on the transposed tokens (copied once: a 3-d non-contiguous input, its first
    product an mm and its bias a separate add of B*D*TH), GELU, the second product with its bias; channel mixing;
    two residuals; the token mean; the head: 7264. Every counted row is bf16, 2 bytes an element."""
    p, counts, theirs = profiled("mixer_bf16", False)
    hidden_t, hidden_c = pm.MX_B * pm.MX_D * pm.MX_TH, pm.MX_B * pm.MX_N * pm.MX_CH
    total = (2 * LAYERNORM * MX_X + 2 * MX_TOKEN + hidden_t + hidden_t + 2 * MX_CHANNEL + hidden_c + 2 * MX_X
             + MX_X + 2 * pm.MX_B * pm.MX_D * pm.MX_CLS)
    assert p.flops == total == 7264
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == sum(theirs.values())
    assert {o.m.dtype for o in p.ops if o.counted and o.m.flops} == {"bf16"}
    up = one_row(counts, "aten::addmm", ((pm.MX_CH,), (pm.MX_B * pm.MX_N, pm.MX_D), (pm.MX_D, pm.MX_CH)))
    assert up.bytes_read == (pm.MX_B * pm.MX_N * pm.MX_D + pm.MX_CH * pm.MX_D + pm.MX_CH) * BF16
    assert up.bytes_written == pm.MX_B * pm.MX_N * pm.MX_CH * BF16
    copy = one_row(counts, "aten::clone")
    assert (copy.bytes_read, copy.bytes_written) == (MX_X * BF16, MX_X * BF16)


def test_mixer_in_bf16_trained():
    """Trained: every weight's gradient product and every input gradient but the first LayerNorm's input (x needs
    none: the token-mixing product's input gradient is still formed, the norm's output needs it); two LayerNorm
    backwards; the gradients added into bf16 .grad tensors."""
    _, counts, theirs = profiled("mixer_bf16", True)
    head = 2 * pm.MX_B * pm.MX_D * pm.MX_CLS
    assert flops_of(counts, "aten::mm") == theirs["aten::mm"] == 2 * (2 * MX_TOKEN + 2 * MX_CHANNEL + head) \
        + MX_TOKEN  # the forward's first token product is an mm too
    assert one_row(counts, "aten::native_layer_norm_backward").calls == 2
    assert all(c.dtype == "bf16" for (op, _), c in counts.items() if op == "aten::add_")


# --- gated scan ----------------------------------------------------------------------------------------------------
SC_E = pm.SC_B * pm.SC_T * pm.SC_D
SC_DIFF = pm.SC_B * (pm.SC_T - 1) * pm.SC_D


def test_gated_scan_by_hand():
    """in (2 B T D 2D); cummax, sigmoid, cumprod, the product, logcumsumexp, the add: one an element each; diff's
    subtract, the square and the mean over (B, T-1, D); out: 1560. cummax writes values and int64 indices."""
    p, counts, _ = profiled("scan", False)
    rows = pm.SC_B * pm.SC_T
    linears = 2 * rows * pm.SC_D * 2 * pm.SC_D + 2 * rows * pm.SC_D * pm.SC_D
    for op in ("aten::cummax", "aten::cumprod", "aten::logcumsumexp"):
        assert by_op(counts)[op] == SC_E, op
    assert p.flops == linears + 6 * SC_E + 3 * SC_DIFF == 1560
    cummax = one_row(counts, "aten::cummax")
    assert (cummax.bytes_read, cummax.bytes_written) == (SC_E * F32, SC_E * (F32 + I64))


def test_gated_scan_trained():
    """Trained: cummax's backward scatters the gradient back to the running maxima's sources (scatter_add: an add per
    element, reading its int64 indices); logcumsumexp's and cumprod's backwards are counted, nothing uncounted."""
    p, counts, _ = profiled("scan", True)
    scatter = one_row(counts, "aten::scatter_add")
    assert scatter.flops == SC_E
    assert scatter.bytes_read == SC_E * (F32 + I64 + F32)  # the zeros it adds into, the indices, the gradient
    assert p.unsupported == ()


# --- RBF head on L1 distances --------------------------------------------------------------------------------------
RB_D = pm.RB_B * pm.RB_K


def test_rbf_head_by_hand():
    """cdist p=1: 3 an input feature of each pair; the median by torch.quantile: a sort of each row (K ceil(log2 K)
    compares), a NaN check, the interpolation of two gathered neighbours; -d, / scale, exp; the head: 799."""
    p, counts, _ = profiled("rbf", False)
    assert one_row(counts, "aten::_cdist_forward").flops == CDIST * RB_D * pm.RB_IN
    sort = one_row(counts, "aten::sort")
    assert sort.flops == RB_D * math.ceil(math.log2(pm.RB_K))
    assert sort.bytes_written == RB_D * (F32 + I64)
    quantile = (1 + RB_D * math.ceil(math.log2(pm.RB_K)) + 2 * RB_D  # the rank, the sort, isnan and any
                + 3 * pm.RB_B)  # below's ceil, the weight, the lerp of the two neighbours
    total = CDIST * RB_D * pm.RB_IN + quantile + 3 * RB_D + 2 * pm.RB_B * pm.RB_K * pm.RB_OUT
    assert p.flops == total == 799
    taken = one_row(counts, "aten::gather")  # the two neighbours: a value and an int64 rank per row each
    assert (taken.calls, taken.bytes_read, taken.bytes_written) == (2, 2 * pm.RB_B * (F32 + I64), 2 * pm.RB_B * F32)


def test_rbf_head_trained_differentiates_the_l1_distance():
    """Trained: cdist's backward (p=1: the sign of each difference) counted as its forward, 3 a term, and the centres'
    gradient added into .grad; the sort's backward scatters the gradient back (data movement, no FLOPs)."""
    _, counts, _ = profiled("rbf", True)
    assert one_row(counts, "aten::_cdist_backward").flops == CDIST * RB_D * pm.RB_IN
    assert one_row(counts, "aten::add_", ((pm.RB_K, pm.RB_IN), (pm.RB_K, pm.RB_IN))).flops == pm.RB_K * pm.RB_IN
    back = one_row(counts, "aten::scatter")
    assert back.flops == 0 and back.bytes_written == RB_D * F32
