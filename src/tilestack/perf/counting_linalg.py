"""The FLOP rules of the counting pass (``tilestack.perf.counting``) for products and linear algebra: matmuls torch's
flop counter leaves out (in-place and summed batch products, matrix-vector products, the int8 matmul, grouped
GEMMs), packed quantized linears and recurrent layers, nn.Bilinear, pairwise distances, dense factorisations and
solves, FFTs, and complex numbers built from polar form; the table ``LINALG_FLOPS`` names the ATen ops each counts.
Also the matmul of nested tensors (``UNDECOMPOSED_FLOPS``) and the vectors a dispatch mode makes eigen- and
singular-value routines form (``VALUES_ONLY_CALLERS``).

    rule = LINALG_FLOPS["aten.addbmm"]
    rule(func, args, kwargs, out)          # FLOPs of one call, from its arguments and result

A multiply-add is 2 FLOPs (8 for complex operands, ``formulas.COMPLEX_MAC_OVER_REAL``); factorisations count
LAPACK's leading terms (``formulas.factorization_flops``); an FFT 5 N log2 N per complex transform of N points, half
that for a real one (``formulas.fft_flops``).
"""

from __future__ import annotations

import math
from typing import Any

from tilestack.perf import formulas
from tilestack.perf.counting_rules import Rule, _argument, _numel, _tensors


def _trilinear_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten._trilinear (nn.Bilinear and its backward): sum over ``sumdim`` of i1 * i2 * i3, each input
    unsqueezed at its ``expand`` dims; a multiply-add per element of the full broadcast product."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    full: list[int] = []
    for i in (1, 2, 3):
        shape = list(arg(f"i{i}").shape)
        for d in sorted(int(e) for e in arg(f"expand{i}")):
            shape.insert(d, 1)
        full = [max(a, b) for a, b in zip(full, shape, strict=True)] if full else shape
    return float(formulas.FLOPS_PER_MAC * math.prod(full))


# Attention ops whose is_causal means the lower-right alignment (flash attention's kernels: the last query sees
# every key), and those laid out (B, N, H, D) rather than (B, H, N, D).
LOWER_RIGHT_CAUSAL = frozenset({
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_backward",
    "aten._flash_attention_forward", "aten._flash_attention_backward",
})
SEQUENCE_FIRST_ATTENTION = frozenset({
    "aten._flash_attention_forward", "aten._flash_attention_backward", "aten._efficient_attention_forward",
    "aten._efficient_attention_backward",
})
CUSTOM_MASK_LOWER_RIGHT = 2  # _efficient_attention_*'s custom_mask_type: 0 none, 1 causal top-left, 2 lower-right


def causal_fraction(func: Any, args: tuple, kwargs: dict) -> float:
    """The share of an attention op's scores its causal mask keeps (1 when it has none): ``is_causal``, or an
    efficient-attention ``custom_mask_type`` of 1 or 2, scaled by ``formulas.causal_fraction`` of its query and key
    lengths, so the first queries of a sequence against all its keys, or new queries against a cache, are not
    counted as half of their scores. Packed variable-length inputs (3 dims) keep the square case's half."""
    mask_type = _argument(func, args, kwargs, "custom_mask_type")
    if not (_argument(func, args, kwargs, "is_causal") or mask_type in (1, CUSTOM_MASK_LOWER_RIGHT)):
        return 1.0
    name = str(func._overloadpacket)
    q, k = _argument(func, args, kwargs, "query"), _argument(func, args, kwargs, "key")
    if getattr(q, "ndim", None) != 4 or getattr(k, "ndim", None) != 4:
        return formulas.CAUSAL_FRACTION
    seq = 1 if name in SEQUENCE_FIRST_ATTENTION else 2
    if not q.shape[seq] or not k.shape[seq]:
        return formulas.CAUSAL_FRACTION  # no scores to keep: the count is 0 whatever the share
    lower_right = name in LOWER_RIGHT_CAUSAL or mask_type == CUSTOM_MASK_LOWER_RIGHT
    return formulas.causal_fraction(q.shape[seq], k.shape[seq], lower_right=lower_right)


def _raw_attention_flops(*, backward: bool) -> Rule:
    """_flash_attention_* / _efficient_attention_* (the kernels SDPA's GPU backends run, and that
    ``causal_lower_right`` calls directly): their dense inputs are laid out (B, N, H, D), which torch's flop counter
    reads as (B, H, N, D), taking the sequence lengths for the heads (wrong wherever they differ, and an error where
    the query length is no multiple of the key length). Counted as torch counts (B, H, N, D) attention on the
    transposed shapes, times the share of scores a causal mask keeps; packed variable-length inputs (cumulative
    sequence lengths given) by torch's formula, which unpacks them."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        q, k, v = arg("query"), arg("key"), arg("value")
        packed = arg("cum_seq_q") if arg("cum_seq_q") is not None else arg("cu_seqlens_q")
        if q.ndim != 4 or (packed is not None and _numel(packed) > 0):
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        else:
            heads_first = lambda t: (t.shape[0], t.shape[2], t.shape[1], t.shape[3])  # noqa: E731
            if backward:
                dy = arg("grad_out") if arg("grad_out") is not None else arg("grad_out_")
                flops = sdpa_backward_flop_count(heads_first(dy), heads_first(q), heads_first(k), heads_first(v))
            else:
                flops = sdpa_flop_count(heads_first(q), heads_first(k), heads_first(v))
        return float(flops) * causal_fraction(func, args, kwargs)

    return count


def _matrix_vector_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """mv / addmv (M, N) @ (N,), dot / vdot (N,) . (N,), addr (M,) x (N,): a multiply-add per element of the
    matrix (the outer product's), as torch counts mm and addmm (a bias's add left out); 4 times that for complex
    operands, as a complex mm (profiler round 20: a complex mv or vdot was counted as a real one)."""
    tensors = _tensors((args, kwargs))
    mac = formulas.FLOPS_PER_MAC * (formulas.COMPLEX_MAC_OVER_REAL if any(t.is_complex() for t in tensors) else 1)
    matrix = max((t for t in tensors if t.dim() == 2), key=_numel, default=None)
    if matrix is not None:
        return float(mac * _numel(matrix))
    if str(func._overloadpacket) == "aten.addr":  # no matrix given? the product is vec1 x vec2
        v1, v2 = _argument(func, args, kwargs, "vec1"), _argument(func, args, kwargs, "vec2")
        return float(mac * _numel(v1) * _numel(v2))
    return float(mac * _numel(_tensors(args)[0]))  # dot: a multiply-add per element


def _trace_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """trace: the diagonal's elements added (both parts of a complex one)."""
    x = _argument(func, args, kwargs, "self")
    return float(min(x.shape, default=0) * (formulas.COMPLEX_ELEMENT_OVER_REAL if x.is_complex() else 1))


def _complex_mac_factor(*operands: Any) -> int:
    """``formulas.COMPLEX_MAC_OVER_REAL`` where any of ``operands`` (tensors or None) is complex, else 1: a complex
    multiply-add is four real multiplies and four adds."""
    return formulas.COMPLEX_MAC_OVER_REAL if any(t is not None and t.is_complex() for t in operands) else 1


def _right_hand_sides(a: Any, b: Any, *, left: bool = True) -> tuple[int, int]:
    """(systems, k) of a solve with the matrices ``a`` (..., m, n) and right-hand sides ``b``: how many systems the
    two batches broadcast to, and the columns of each. ``b`` is (..., rows, k) ((..., k, rows) with ``left`` False:
    X A = B), or a vector (rows,) or a batch of vectors shaped a's batch and rows, as torch reads it (profiler round
    23: b's elements were divided by a's batch, so a batch of matrices against one unbatched b, or a single matrix
    against a batch of b, counted 0 or a fraction of a column per system)."""
    import torch

    vector = b.dim() == 1 or (b.dim() == a.dim() - 1 and tuple(b.shape) == tuple(a.shape[:-1]))
    if vector:
        k, b_batch = 1, tuple(b.shape[:-1])
    elif b.dim() >= 2:
        k, b_batch = int(b.shape[-1] if left else b.shape[-2]), tuple(b.shape[:-2])
    else:  # a 0-dim right-hand side: one column
        k, b_batch = 1, ()
    try:
        systems = math.prod(torch.broadcast_shapes(tuple(a.shape[:-2]), b_batch))
    except RuntimeError:  # batches that do not broadcast: the op refused them; a's own batch
        systems = _numel(a) // max(a.shape[-2] * a.shape[-1], 1)
    return systems, k


def _factorization(kind: str, matrix: str, rhs: str | None = None, *, vectors: bool | None = None) -> Rule:
    """A dense linear-algebra routine on each matrix of the batch ``matrix`` (..., m, n), with the right-hand sides
    ``rhs`` (..., n, k) or (..., n) where it solves ((..., m, k) for least squares; batches broadcast:
    ``_right_hand_sides``):
    ``formulas.factorization_flops``, times ``formulas.COMPLEX_MAC_OVER_REAL`` for a complex matrix or right-hand
    side, as LAPACK's complex routines count their multiply-adds (profiler round 23: a complex Cholesky, solve, QR,
    eigh or SVD was counted as the real one of its size, a quarter of its work). ``vectors`` None reads whether it
    forms vectors (Q, U and V) off the call."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        a = arg(matrix)
        if a is None or a.dim() < 2:
            return 0.0
        m, n = a.shape[-2:]
        batch = _numel(a) // max(m * n, 1)
        k, b, systems = 0, None, batch
        if rhs is not None and arg(rhs) is not None:
            b = arg(rhs)
            systems, k = _right_hand_sides(a, b, left=arg("left") is not False)
        mode = arg("mode")  # linalg_qr: "r" forms no Q
        forms_vectors = vectors if vectors is not None else bool(
            arg("compute_v") if arg("compute_v") is not None else arg("compute_uv")
            if arg("compute_uv") is not None else mode != "r")
        full = bool(arg("full_matrices")) or mode == "complete"
        flops = systems * formulas.factorization_flops(kind, m, n, k, vectors=forms_vectors, full=full)
        if systems != batch:  # right-hand sides broadcast over more matrices than a holds: a factored once each
            flops -= (systems - batch) * formulas.factorization_flops(kind, m, n, 0, vectors=forms_vectors, full=full)
        return float(flops * _complex_mac_factor(a, b))

    return count


def _pinv_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """linalg_pinv: by the thin SVD (by eigh where ``hermitian``), then V S^+ U^T: ``formulas.factorization_flops``
    "pinv" / "pinv_hermitian", per matrix of the batch."""
    hermitian = bool(_argument(func, args, kwargs, "hermitian"))
    return _factorization("pinv_hermitian" if hermitian else "pinv", "self")(func, args, kwargs, out)


def _householder_product_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """linalg_householder_product (orgqr): Q (..., m, n) formed from the k reflectors of ``tau`` (..., k)."""
    a, tau = _argument(func, args, kwargs, "input"), _argument(func, args, kwargs, "tau")
    if a is None or a.dim() < 2 or tau is None:
        return 0.0
    m, n = a.shape[-2:]
    batch = _numel(a) // max(m * n, 1)
    k = tau.shape[-1] if tau.dim() else 0
    return float(batch * formulas.factorization_flops("householder_product", m, n, k) * _complex_mac_factor(a))


def _ormqr_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """ormqr(reflectors, tau (..., k), C (..., m, n), left): Q from k reflectors applied to C from the left (they
    act along C's rows, m) or the right (along its columns, n): ``formulas.householder_apply_flops``."""
    arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
    tau, c = arg("input2"), arg("input3")
    if c is None or c.dim() < 2 or tau is None:
        return 0.0
    m, n = c.shape[-2:]
    batch = _numel(c) // max(m * n, 1)
    k = tau.shape[-1] if tau.dim() else 0
    left = arg("left") is not False
    flops = batch * formulas.householder_apply_flops(m if left else n, n if left else m, k)
    return float(flops * _complex_mac_factor(arg("self"), c))


def _euclidean_dist_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_euclidean_dist (cdist's matmul path, p=2 with more than 25 rows a side): x1 (..., P, M), x2 (..., R, M);
    ||x||^2 and ||y||^2 (a multiply-add per element), -2 x y^T (2 P R M), then per pair the two norms added, a
    clamp at 0 and a square root (3)."""
    x1, x2 = _argument(func, args, kwargs, "x1"), _argument(func, args, kwargs, "x2")
    width = x1.shape[-1] if x1.dim() else 0
    rows1, rows2 = _numel(x1) // max(width, 1), _numel(x2) // max(width, 1)  # batch x P, batch x R
    pairs = rows1 * (x2.shape[-2] if x2.dim() > 1 else 1)
    return float(formulas.FLOPS_PER_MAC * (pairs * width + (rows1 + rows2) * width) + 3 * pairs)


def _fft_flops(kind: str) -> Rule:
    """_fft_c2c, _fft_r2c, _fft_c2r: ``formulas.fft_flops`` of the N points its ``dim`` span (the complex side's
    for c2c, the real side's for r2c and c2r: the input's and the output's), once per transform (the elements of
    the real side over N), and a multiply per real output value where ``normalization`` is not 0 (none)."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        x = _argument(func, args, kwargs, "self")
        y = _tensors(out)[0]
        side = y if kind == "c2r" else x  # where the whole length lies (r2c's output is one-sided)
        dims = [int(d) % max(side.dim(), 1) for d in _argument(func, args, kwargs, "dim")]
        points = math.prod(side.shape[d] for d in dims)
        transforms = _numel(side) // max(points, 1)
        flops = transforms * formulas.fft_flops(points, real=kind != "c2c")
        if int(_argument(func, args, kwargs, "normalization") or 0):
            flops += _numel(y) * (formulas.COMPLEX_ELEMENT_OVER_REAL if y.is_complex() else 1)
        return float(flops)

    return count


def _packed_linear_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """quantized::linear* (dynamic or static int8, fp16): X (..., K) times the packed weight (N, K), 2*rows*N*K."""
    x, packed = _argument(func, args, kwargs, "X"), _argument(func, args, kwargs, "W_prepack")
    try:
        weight = packed.unpack()[0]
    except (AttributeError, RuntimeError):  # a packing this torch cannot unpack: the FLOPs are unknown
        return 0.0
    rows = _numel(x) // max(x.shape[-1], 1) if x.dim() else 0
    return float(formulas.FLOPS_PER_MAC * rows * weight.numel())


def _distance_flops_per_term(func: Any, args: tuple, kwargs: dict) -> int:
    """A p-norm distance's FLOPs per feature of a pair: subtract, square or abs, accumulate
    (``formulas.CDIST_FLOPS_PER_TERM``), and a power |d|^p for an order other than 0, 1, 2 or inf, as a vector norm
    is counted (profiler round 22: cdist and pdist with p=3 were counted as p=2, though torch.norm of the same
    differences was charged its powers)."""
    p = _argument(func, args, kwargs, "p")
    p = 2.0 if p is None else float(p)
    return formulas.CDIST_FLOPS_PER_TERM + (p not in formulas.NORM_CHEAP_ORDERS)


def _cdist_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_cdist_forward / _cdist_backward: x1 (B, P, M), x2 (B, R, M): each of the B*P*R pairs over M features."""
    x1, x2 = _argument(func, args, kwargs, "x1"), _argument(func, args, kwargs, "x2")
    pairs = _numel(x1) // max(x1.shape[-1], 1) * x2.shape[-2]
    return float(_distance_flops_per_term(func, args, kwargs) * pairs * x1.shape[-1])


def _product_flops(left: str, right: str, *, right_rows: bool = False) -> Rule:
    """A matmul torch's counter has no formula for: ``left`` (..., M, K) times ``right`` (..., K, N) (or (N, K) with
    ``right_rows``), batches included: addbmm's summed batch, in-place addmm_ and baddbmm_, _int_mm,
    _addmm_activation, _weight_int8pack_mm. 2 * numel(left) * N, times 4 for complex operands."""

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        a, b = _argument(func, args, kwargs, left), _argument(func, args, kwargs, right)
        if a is None or b is None or b.dim() == 0:
            return 0.0
        n = b.shape[0] if right_rows else b.shape[-1]
        complex_factor = formulas.COMPLEX_MAC_OVER_REAL if a.is_complex() or b.is_complex() else 1
        return float(formulas.FLOPS_PER_MAC * _numel(a) * n * complex_factor)

    return count


def _grouped_mm_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_grouped_mm / _scaled_grouped_mm (F.grouped_mm: a mixture of experts' GEMMs, one per group): 2 * M * K * N
    summed over the groups, plus one add per output element for a bias. Both operands 3-d: the groups are the
    batch. Otherwise ``offs`` (the int32 ends of the groups) cuts the 2-d operand's jagged dim, and only its
    first offs[-1] elements are multiplied: rows (2-d @ 3-d, the forward), columns (3-d @ 2-d) or the summed dim
    (2-d @ 2-d, a weight gradient, one (M, N) product per group)."""
    a, b = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "mat2")
    offs = _argument(func, args, kwargs, "offs")
    jagged = int(offs[-1]) if offs is not None and _numel(offs) else 0
    groups = _numel(offs) if offs is not None else 0
    if a.dim() == 3 and b.dim() == 3:
        macs, outputs = _numel(a) * b.shape[-1], a.shape[0] * a.shape[1] * b.shape[-1]
    elif a.dim() == 2 and b.dim() == 3:
        macs, outputs = jagged * a.shape[-1] * b.shape[-1], jagged * b.shape[-1]
    elif a.dim() == 3 and b.dim() == 2:
        macs, outputs = a.shape[-2] * a.shape[-1] * jagged, a.shape[-2] * jagged
    else:
        macs, outputs = a.shape[0] * b.shape[-1] * jagged, groups * a.shape[0] * b.shape[-1]
    bias = _argument(func, args, kwargs, "bias")
    return float(formulas.FLOPS_PER_MAC * macs + (outputs if bias is not None else 0))


def _recurrent_weights_flops(kind: str) -> Rule:
    """aten.quantized_lstm / quantized_gru (dynamically quantized nn.LSTM, nn.GRU: packed weights, no tensor
    argument): per layer and direction, each step multiplies the layer's input by W_ih (G*H, I_l) and the hidden
    state by W_hh (G*H, H): 2 * rows * G * H * (I_l + H), I_l the input's width for the first layer and H times
    the directions after it. The gates' element-wise work is left out, as for the CPU LSTM kernel."""
    gates = formulas.RNN_GATES[kind]

    def count(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        arg = lambda name: _argument(func, args, kwargs, name)  # noqa: E731
        x = arg("input") if arg("input") is not None else arg("data")
        hidden = _tensors(arg("hx"))[0]  # (layers * directions, B, H)
        directions = 2 if arg("bidirectional") else 1
        h, width = hidden.shape[-1], x.shape[-1]
        rows = _numel(x) // max(width, 1)  # steps x batch (a packed sequence's total length)
        per_direction = sum(width if layer == 0 else h * directions for layer in range(int(arg("num_layers"))))
        total_inputs = per_direction + int(arg("num_layers")) * h  # sum over layers of I_l + H
        return float(formulas.FLOPS_PER_MAC * rows * directions * gates * h * total_inputs)

    return count


def _packed_cell_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """quantized::quantized_{lstm,gru,rnn_tanh,rnn_relu}_cell_dynamic: one step, x @ W_ih^T + h @ W_hh^T with the
    packed weights unpacked for their sizes: 2 * rows * (numel(W_ih) + numel(W_hh))."""
    x = _argument(func, args, kwargs, "input")
    try:
        weights = [_argument(func, args, kwargs, name).unpack()[0] for name in ("w_ih", "w_hh")]
    except (AttributeError, RuntimeError):  # a packing this torch cannot unpack: the FLOPs are unknown
        return 0.0
    rows = _numel(x) // max(x.shape[-1], 1) if x.dim() else 1
    return float(formulas.FLOPS_PER_MAC * rows * sum(w.numel() for w in weights))


def _pdist_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """_pdist_forward / _pdist_backward: x (N, M), each of the N (N - 1) / 2 pairs over M features."""
    x = _argument(func, args, kwargs, "self")
    n = x.shape[0] if x.dim() else 0
    return float(_distance_flops_per_term(func, args, kwargs) * n * (n - 1) // 2 * (x.shape[-1] if x.dim() else 0))


def _polar_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """polar(abs, angle): a cosine, a sine and two multiplies per complex element."""
    return float(formulas.POLAR_FLOPS_PER_ELEMENT * sum(_numel(t) for t in _tensors(out)))


# Ops counted here: products torch's flop counter has no formula for, and linear algebra it leaves out.
LINALG_FLOPS: dict[str, Rule] = {
    **{f"aten.{op}": _matrix_vector_flops for op in ("mv", "addmv", "addmv_", "dot", "vdot", "addr", "addr_")},
    "aten.trace": _trace_flops,
    **{f"aten._{kernel}_attention_forward": _raw_attention_flops(backward=False) for kernel in ("flash", "efficient")},
    **{f"aten._{kernel}_attention_backward": _raw_attention_flops(backward=True) for kernel in ("flash", "efficient")},
    **{f"quantized.{op}": _packed_linear_flops for op in (
        "linear", "linear_relu", "linear_dynamic", "linear_relu_dynamic", "linear_dynamic_fp16",
    )},
    "aten.linalg_cholesky_ex": _factorization("cholesky", "self"),
    "aten.linalg_lu_factor_ex": _factorization("lu", "A"),
    "aten._linalg_slogdet": _factorization("lu", "A"),
    "aten._linalg_det": _factorization("lu", "A"),
    "aten.linalg_inv_ex": _factorization("inverse", "A"),
    "aten._linalg_solve_ex": _factorization("solve", "A", "B"),
    "aten.linalg_solve_triangular": _factorization("triangular_solve", "self", "B"),
    "aten.cholesky_solve": _factorization("factored_solve", "input2", "self"),
    "aten.linalg_lu_solve": _factorization("factored_solve", "LU", "B"),
    "aten.linalg_ldl_solve": _factorization("factored_solve", "LD", "B"),  # L, then D (n k: left out), then L^T
    "aten.linalg_qr": _factorization("qr", "A"),
    "aten._linalg_eigh": _factorization("eigh", "A"),
    "aten._linalg_svd": _factorization("svd", "A"),
    "aten.linalg_eig": _factorization("eig", "self"),
    "aten.linalg_pinv": _pinv_flops,
    "aten.linalg_lstsq": _factorization("lstsq", "self", "b"),
    "aten.geqrf": _factorization("qr", "self", vectors=False),
    "aten.linalg_householder_product": _householder_product_flops,
    "aten.linalg_lu": _factorization("lu", "A"),
    "aten.linalg_ldl_factor_ex": _factorization("ldl", "self"),
    "aten.triangular_solve": _factorization("triangular_solve", "A", "self"),
    "aten.cholesky_inverse": _factorization("cholesky_inverse", "self"),
    "aten.ormqr": _ormqr_flops,
    "aten._euclidean_dist": _euclidean_dist_flops,
    **{f"aten._fft_{kind}": _fft_flops(kind) for kind in ("c2c", "r2c", "c2r")},
    "aten._trilinear": _trilinear_flops,
    "aten._cdist_forward": _cdist_flops,
    "aten._cdist_backward": _cdist_flops,
    **{f"aten.{op}": _product_flops("mat1", "mat2") for op in ("addmm_", "_addmm_activation")},
    **{f"aten.{op}": _product_flops("batch1", "batch2") for op in ("baddbmm_", "addbmm", "addbmm_")},
    "aten._int_mm": _product_flops("self", "mat2"),
    **{f"aten.{op}": _grouped_mm_flops for op in ("_grouped_mm", "_scaled_grouped_mm")},
    "aten._weight_int8pack_mm": _product_flops("self", "mat2", right_rows=True),
    "aten.quantized_lstm": _recurrent_weights_flops("lstm"),
    "aten.quantized_gru": _recurrent_weights_flops("gru"),
    **{f"quantized.quantized_{cell}_cell_dynamic": _packed_cell_flops for cell in ("lstm", "gru", "rnn_tanh",
                                                                                  "rnn_relu")},
    "aten._pdist_forward": _pdist_flops,
    "aten._pdist_backward": _pdist_flops,
    "aten.polar": _polar_flops,
}


def _nested_matmul_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.matmul of nested tensors (..., m_i, k) @ (..., k, n_i): each component's product, 2 * numel(a_i) * n_i."""
    a, b = _argument(func, args, kwargs, "self"), _argument(func, args, kwargs, "other")
    left = a.unbind() if a.is_nested else [a] * (b.size(0) if b.is_nested else 1)
    right = b.unbind() if b.is_nested else [b] * len(left)
    return float(sum(formulas.FLOPS_PER_MAC * x.numel() * y.shape[-1] for x, y in zip(left, right, strict=True)))


def _nested_matmul_backward_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """aten.matmul_backward (nested operands): each gradient ``mask`` asks for is a product as large as the
    forward's."""
    mask = [bool(m) for m in _argument(func, args, kwargs, "mask")]
    return sum(mask) * _nested_matmul_flops(func, args, kwargs, out)


# Ops of nested operands counted whole: matmul, which Python decompositions cannot split over ragged dims
# (decomposed everywhere else), and its nested-only backward.
UNDECOMPOSED_FLOPS: dict[str, Rule] = {
    "aten.matmul": _nested_matmul_flops, "aten.matmul_backward": _nested_matmul_backward_flops,
}


# Eigen- and singular-value routines that a values-only function calls (svdvals, eigvalsh, eigvals, and through
# them matrix norms, ranks, conditions): it asks for vectors only where a gradient may need them, and torch takes
# any dispatch mode for such a case, so under the counting pass they are formed, in the timed eager run not.
# Routine -> (the function that wants values only, the FLOPs rule with and without vectors).
VALUES_ONLY_CALLERS: dict[str, tuple[str, Rule, Rule]] = {
    "aten._linalg_svd": ("aten::linalg_svdvals", _factorization("svd", "A"),
                         _factorization("svd", "A", vectors=False)),
    "aten._linalg_eigh": ("aten::linalg_eigvalsh", _factorization("eigh", "A"),
                          _factorization("eigh", "A", vectors=False)),
    "aten.linalg_eig": ("aten::linalg_eigvals", _factorization("eig", "self"),
                        _factorization("eig", "self", vectors=False)),
}


def vectors_for_the_mode(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs of the vectors a VALUES_ONLY_CALLERS routine forms that an eager call from its values-only function
    would not: all of them, unless a gradient may need them (grad mode on and an input that requires grad)."""
    import torch

    if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors((args, kwargs))):
        return 0.0
    _, with_vectors, values_only = VALUES_ONLY_CALLERS[str(func._overloadpacket)]
    return max(with_vectors(func, args, kwargs, out) - values_only(func, args, kwargs, out), 0.0)
