"""Memory-layout checks for tensors a kernel writes: no element reached twice, no memory shared with an input.

    from tilestack.lang.layout import check_writable, check_not_aliased
    check_writable("softmax", "out", out)            # LaunchError if out's strides overlap its own elements
    check_not_aliased("gemm", "out", out, a=a, b=b)  # LaunchError if out shares memory with a or b

A kernel stores each output tile once, in parallel with other programs; if two indices of the output reach one
address (``as_strided`` with strides (1, 1), ``expand``), programs race and the result depends on their order.
If the output shares memory with an input, a program may read what another has already overwritten.
Both are refused before any work, as torch refuses them for ``out=``.

The layout check is exact for every layout torch makes without ``as_strided`` (contiguous, transposed,
sliced, permuted) and conservative beyond: a layout whose axes interleave (strides not nested) is refused
even where no element happens to repeat, since proving that in general is an integer-programming problem.
"""

from __future__ import annotations

import math

from tilestack.errors import LaunchError


def overlap_reason(shape, strides) -> str | None:
    """Why a strided layout may reach one element from two indices, or None when it cannot.

    Axes of extent 1 never move; with the others sorted by stride, each stride must step past every offset
    the smaller-stride axes reach: ``stride[i] >= 1 + sum((size[j] - 1) * stride[j] for the earlier j)``.
    A layout with no elements (an extent of 0) has nothing to overlap.
    """
    if any(n == 0 for n in shape):
        return None
    axes = sorted(((st, n, ax) for ax, (n, st) in enumerate(zip(shape, strides, strict=True)) if n > 1))
    reach = 0                                  # largest offset the axes visited so far can add
    for stride, size, axis in axes:
        if stride <= reach:
            if stride == 0:
                return f"stride 0 on axis {axis} (size {size})"
            return (f"stride {stride} on axis {axis} (size {size}) does not step past the {reach + 1} elements "
                    "the smaller-stride axes span")
        reach += (size - 1) * stride
    return None


def check_writable(fn: str, name: str, t) -> None:
    """LaunchError when a tensor a kernel writes may have overlapping elements."""
    if t.is_contiguous() or t.numel() <= 1:   # the common case, decided in C
        return
    reason = overlap_reason(tuple(t.shape), tuple(t.stride()))
    if reason is not None:
        raise LaunchError(f"{fn}: {name} has shape {tuple(t.shape)} and strides {tuple(t.stride())}: {reason}, "
                          "so two of its elements share memory and stores to them race; pass a tensor with "
                          "its own storage (e.g. .contiguous())")


def byte_range(t) -> tuple[int, int]:
    """[first, last) byte addresses a non-empty tensor's elements occupy (strides are never negative in torch)."""
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
    start = t.data_ptr()
    return start, start + span * t.element_size()


def shares_memory(a, b) -> bool:
    """Whether two tensors may touch the same bytes: intersecting byte ranges on one device. The addresses decide,
    not the storage objects: two storages may hold one memory (torch.from_numpy of two overlapping NumPy views, a
    DLPack or shared-memory import)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1


def check_not_aliased(fn: str, name: str, out, **inputs) -> None:
    """LaunchError when ``out`` shares memory with any of the named ``inputs`` (None inputs are skipped)."""
    for iname, t in inputs.items():
        if t is not None and shares_memory(out, t):
            raise LaunchError(f"{fn}: {name} shares memory with {iname}; the kernel would read {iname} after "
                              f"overwriting it; pass a separate {name} tensor")


# ---- two arguments that share memory, one of them written ---------------------------------------------------------
OVERLAP_BUDGET = 100_000   # search nodes the exact test may visit before it gives up (and refuses nothing)


def _reaches(target: int, terms: list[tuple[int, int, int]], budget: list[int]) -> bool | None:
    """Whether sum(m * s) == target for whole m in [lo, hi], one per term (s, lo, hi), strides s > 0 sorted from
    the largest; None where the search ran past ``budget`` nodes. Each level keeps the digits that leave a remainder
    the smaller strides can still reach and divide (their bounds and gcd): a few per level for the layouts torch
    makes, so the search is short."""
    n = len(terms)
    lo_rest, hi_rest, g_rest = [0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        s, lo, hi = terms[k]
        lo_rest[k], hi_rest[k] = lo_rest[k + 1] + lo * s, hi_rest[k + 1] + hi * s
        g_rest[k] = math.gcd(g_rest[k + 1], s)

    def search(k: int, rem: int) -> bool | None:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        if k == n:
            return rem == 0
        s, lo, hi = terms[k]
        first = max(lo, -((hi_rest[k + 1] - rem) // s))          # rem - m s <= hi_rest: m >= ceil((rem - hi) / s)
        last = min(hi, (rem - lo_rest[k + 1]) // s)               # rem - m s >= lo_rest
        g = g_rest[k + 1]
        step = 1
        if g > 1:                                                  # rem - m s divisible by the rest's gcd
            d = math.gcd(s, g)
            if rem % d:
                return False
            step = g // d
            m0 = (rem // d) * pow(s // d, -1, step) % step if step > 1 else 0
            first += (m0 - first) % step
        undecided = False
        for m in range(first, last + 1, step):
            found = search(k + 1, rem - m * s)
            if found:
                return True
            undecided = undecided or found is None
            if budget[0] < 0:
                return None
        return None if undecided else False

    return search(0, target)


def elements_overlap(a, b) -> bool | None:
    """Whether strided tensors ``a`` and ``b`` have an element in common (a byte of one inside an element of the
    other): True or False when decided, None where the exact search gave up (after OVERLAP_BUDGET nodes)."""
    if not shares_memory(a, b):
        return False
    ia, ib = a.element_size(), b.element_size()
    # a's element at A = pa + sum_k i_k sa_k and b's at B = pb + sum_k j_k sb_k share a byte when A - B is in
    # [-(ia - 1), ib - 1]; as one bounded integer equation, sum_k i_k sa_k - sum_k j_k sb_k + e = pb - pa with the
    # byte term e = B - A in [-(ib - 1), ia - 1] (a 4-byte a inside an 8-byte b's upper half: A - B = 4)
    by_stride: dict[int, list[int]] = {}
    for t, sign in ((a, 1), (b, -1)):
        for n, st in zip(t.shape, t.stride(), strict=True):
            if n > 1 and st != 0:
                lo, hi = (0, n - 1) if sign > 0 else (-(n - 1), 0)
                r = by_stride.setdefault(st * t.element_size(), [0, 0])
                r[0] += lo
                r[1] += hi
    r = by_stride.setdefault(1, [0, 0])
    r[0] -= ib - 1
    r[1] += ia - 1
    terms = sorted(((s, lo, hi) for s, (lo, hi) in by_stride.items()), reverse=True)
    return _reaches(b.data_ptr() - a.data_ptr(), terms, [OVERLAP_BUDGET])


def aligned(a, b) -> bool:
    """Whether ``a`` and ``b`` address memory alike (same first element, element size and strides): where they
    overlap, an element is at the same index in both, as one tensor passed twice (an in-place update, or one
    reinterpreted in place through a view of another dtype of its size). Of two shapes, the larger must not reach
    one element from two indices: (4, 8) windows of stride (4, 1) read beside the (4, 4) rows they cover, written,
    hold row r + 1 of the rows at row r of the windows."""
    if not (a.data_ptr() == b.data_ptr() and a.element_size() == b.element_size() and a.stride() == b.stride()
            and a.dim() == b.dim()):
        return False
    if a.shape == b.shape:
        return True
    return overlap_reason(tuple(max(m, n) for m, n in zip(a.shape, b.shape, strict=True)), a.stride()) is None


def check_no_partial_overlap(fn: str, names: list[str], written: list[int], args) -> None:
    """LaunchError where a written tensor argument and another tensor argument have elements in common at
    different indices (X = buf[:48] read, Y = buf[16:] written): programs read what others wrote, the answer
    depends on their order (torch refuses such out= arguments). Views that share storage without sharing elements
    (q, k and v slices of one qkv; the even and odd elements of a head) and one tensor passed twice are taken."""
    for w in written:
        for i, t in enumerate(args):
            if i == w or names[i] is None or not hasattr(t, "data_ptr") or aligned(args[w], t):
                continue
            if elements_overlap(args[w], t):
                shown = [f"{names[k]} ({'written' if k in written else 'read'}, shape {tuple(args[k].shape)}, strides "
                         f"{tuple(args[k].stride())})" for k in sorted((w, i))]   # in argument order
                raise LaunchError(f"{fn}: {shown[0]} and {shown[1]} overlap: they share elements at different "
                                  f"indices ({abs(t.data_ptr() - args[w].data_ptr())} bytes apart), so programs would "
                                  "read what others wrote and the result would depend on their order; pass separate "
                                  "tensors (clone the input), or the same tensor for an in-place update")
