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
    """Whether two tensors may touch the same bytes: the same storage and intersecting byte ranges."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1


def check_not_aliased(fn: str, name: str, out, **inputs) -> None:
    """LaunchError when ``out`` shares memory with any of the named ``inputs`` (None inputs are skipped)."""
    for iname, t in inputs.items():
        if t is not None and shares_memory(out, t):
            raise LaunchError(f"{fn}: {name} shares memory with {iname}; the kernel would read {iname} after "
                              f"overwriting it; pass a separate {name} tensor")
