"""What the round-12 fuzz tests share (tests/test_fuzz_round12*.py): seeded case draws, input values with outliers,
memory layouts, autograd runs against float64 torch, and the comparison (NaN where torch's float64 answer is NaN
and nowhere else, overflow to inf where the output dtype overflows, else within a bound).

Every case has its own generator, ``np.random.default_rng([SEED, op number, case index])``, so one case replays
alone; a failure's message starts with ``replay:`` and names the seed, op, case index, shape, dtype and backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tilestack import config

SEED = 1200
OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "softmax", "swiglu", "attention", "rotary",
       "cross_entropy", "gemm", "quantized_linear")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# widths not a multiple of any tile, primes, powers of two +- 1
WIDTHS = (1, 3, 17, 33, 127, 129, 255, 257, 1000, 4099)
ODD = (2, 5, 7, 11, 13, 31, 61, 7, 9, 15, 63, 65, 16, 64)
# tolerance per element, relative to the bound's scale, by the dtype the op rounds to
TOL = {torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
U32 = 2.0 ** -24
# every TRITON_EVERY-th case runs on the Triton interpreter (slower), the others on the reference executor
TRITON_EVERY = 8


def rng_for(op: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, OPS.index(op), index])


def backend_for(index: int) -> str:
    return "triton" if index % TRITON_EVERY == TRITON_EVERY - 1 else "reference"


class Replay:
    """The one line that replays a case: ``replay: seed=1200 op=rms_norm case=17 shape=(3, 129) dtype=bfloat16
    backend=reference ...``; more fields are added as the case is drawn."""

    def __init__(self, op: str, index: int):
        self.op, self.index, self.fields = op, index, {"backend": backend_for(index)}

    def __setitem__(self, key, value):
        self.fields[key] = value

    def __str__(self):
        more = " ".join(f"{k}={_short(v)}" for k, v in self.fields.items())
        return (f"replay: seed={SEED} op={self.op} case={self.index} {more} (pytest "
                f"'tests/test_fuzz_round12*.py' -k '{self.op} and {self.index}]')")


def _short(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return str(v).replace(" ", "")


def run_on_backend(replay: Replay):
    return config.override(backend=replay.fields["backend"])


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def width(rng, zero: float = 0.03) -> int:
    if rng.random() < zero:
        return 0
    return int(pick(rng, WIDTHS if rng.random() < 0.6 else ODD))


def leading(rng, max_rank: int, budget: int, zero: float = 0.06) -> tuple[int, ...]:
    """0..max_rank leading dims, of sizes 1, primes, powers of two +- 1 (a 0 now and then), product <= budget."""
    rank = int(rng.integers(0, max_rank + 1))
    dims = [int(pick(rng, (1, 1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17))) for _ in range(rank)]
    if dims and rng.random() < zero:
        dims[int(rng.integers(rank))] = 0
    while math.prod(dims) > budget:
        dims[dims.index(max(dims))] //= 2
    return tuple(dims)


STYLES = ("normal", "normal", "wide", "tiny", "outlier_rows", "equal_rows", "zero_rows", "nan")


def values(rng, shape, style: str = "normal") -> torch.Tensor:
    """float64 values of ``shape`` drawn in ``style``: N(0, 1); scaled 30 or 1e-3; some rows (last dim) scaled by
    1e4; some rows all one value; some rows zero; one NaN element."""
    shape = tuple(shape)
    v = rng.standard_normal(shape)
    if style == "wide":
        v *= 30.0
    elif style == "tiny":
        v *= 1e-3
    rows = v.reshape(-1, shape[-1]) if v.size and len(shape) else None
    if rows is not None and style in ("outlier_rows", "equal_rows", "zero_rows"):
        chosen = rng.random(rows.shape[0]) < 0.3
        chosen[int(rng.integers(rows.shape[0]))] = True
        if style == "outlier_rows":
            rows[chosen] *= 1e4
        elif style == "equal_rows":
            rows[chosen] = rng.standard_normal((int(chosen.sum()), 1)) * pick(rng, (1.0, 1e3))
        else:
            rows[chosen] = 0.0
    if style == "nan" and v.size:
        v.reshape(-1)[int(rng.integers(v.size))] = math.nan
    return torch.from_numpy(v)


LAYOUTS = ("contiguous", "permuted", "stepped", "expanded")


def placed(t: torch.Tensor, kind: str, rng):
    """(leaf, make, kind): the op's input is ``make(leaf)``, equal to ``t`` in the layout ``kind``, except that
    ``expanded`` makes it (and the values) a stride-0 broadcast of t's first slice along a dim (the leaf is that
    slice; its gradient is the sum over the broadcast). ``permuted``: dims stored in a random order (a transpose,
    channels_last-like); ``stepped``: every 2nd/3rd element of a larger buffer, at an element offset."""
    shape = tuple(t.shape)
    if kind == "expanded":
        dims = [d for d, n in enumerate(shape) if n > 1]
        if not dims:
            kind = "contiguous"
        else:
            d = int(pick(rng, dims))
            leaf = t.narrow(d, 0, 1).clone()
            return leaf, (lambda x: x.expand(shape)), f"expanded{d}"
    if kind == "permuted" and t.dim() >= 2:
        perm = [int(i) for i in rng.permutation(t.dim())]
        if perm == sorted(perm):
            perm = perm[::-1]
        inv = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inv), (lambda x: x), f"permuted{perm}"
    if kind in ("stepped", "permuted") and t.dim() >= 1:
        steps = [int(pick(rng, (1, 2, 3))) for _ in shape]
        steps[-1] = max(steps[-1], 2)
        off = int(rng.integers(1, 4))
        buf = torch.zeros(math.prod(n * s for n, s in zip(shape, steps, strict=True)) + off + 4, dtype=t.dtype)
        big = buf[off:off + math.prod(n * s for n, s in zip(shape, steps, strict=True))].view(
            [n * s for n, s in zip(shape, steps, strict=True)])
        out = big[tuple(slice(None, None, s) for s in steps)]
        out.copy_(t)
        return out, (lambda x: x), f"stepped{steps}+{off}"
    return t.clone(), (lambda x: x), "contiguous"


def inputs(rng, tensors, dtypes, rep: Replay, names, layouts=LAYOUTS):
    """Leaves (in their dtypes, each in a random layout, requires_grad drawn) and the functions making the op's
    inputs from them; each input's layout and requires_grad recorded in the replay line."""
    leaves, makes, desc = [], [], []
    for t, dt, name in zip(tensors, dtypes, names, strict=True):
        leaf, make, kind = placed(t.to(dt), pick(rng, layouts), rng)
        leaves.append(leaf)
        makes.append(make)
        desc.append(f"{name}:{kind}")
    rep["layouts"] = ",".join(desc)
    return leaves, makes


def grad_flags(rng, n: int, rep: Replay) -> list[bool]:
    """Which inputs require grad: none (forward only) now and then, else each with probability 0.6, at least one."""
    if rng.random() < 0.15:
        flags = [False] * n
    else:
        flags = [bool(rng.random() < 0.6) for _ in range(n)]
        if not any(flags):
            flags[int(rng.integers(n))] = True
    rep["grad"] = "".join("1" if f else "0" for f in flags)
    return flags


def run(fn, leaves, makes, flags, out_grads, *, no_grad: bool = False):
    """(outputs of fn(*inputs), the leaves' gradients, the inputs' own gradients) for the output gradients
    ``out_grads`` (a function of the outputs, so both runs get the same values); None where none flows. An
    expanded input's own gradient is the one before autograd sums it into its leaf."""
    # detached views of the leaves keep their layouts (strides, offsets); the float64 run passes float64 copies
    leaves = [t.detach().requires_grad_(f) for t, f in zip(leaves, flags, strict=True)]
    with torch.set_grad_enabled(not no_grad):
        ins = [make(t) for make, t in zip(makes, leaves, strict=True)]
        for x, t in zip(ins, leaves, strict=True):
            if x is not t and x.requires_grad:
                x.retain_grad()
        outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    live = [(o, g) for o, g in zip(outs, out_grads(outs), strict=True)
            if g is not None and o.requires_grad and o.numel()]
    if live:
        torch.autograd.backward([o for o, _ in live], [g.to(o.dtype) for o, g in live])
    return [o.detach() for o in outs], [t.grad for t in leaves], [x.grad for x in ins]


def row_bound(tol: float, want: torch.Tensor) -> torch.Tensor:
    """tol times (|want| + the largest |want| of its row): an element's rounding, and the sums over its row."""
    return tol * (want.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0) + rowmax(want))


def fuzz_case(rep: Replay, ours, theirs, leaves, makes, flags, out_grads, dtype, *, no_grad: bool = False,
              out_bound=None, grad_bound=None, names=(), out_dtypes=None) -> None:
    """ours(*inputs) on the case's backend against theirs(*float64 inputs), outputs and the gradients of the
    leaves that require grad. ``out_bound(k, want64, ins64)`` and ``grad_bound(i, input_grad64, ins64)`` give a
    per-element bound (default ``row_bound`` with the dtype's tolerance); an expanded input's bound is its
    elements' bounds summed over the broadcast (each rounded on its own, then summed by autograd)."""
    with run_on_backend(rep):
        outs, grads, _ = run(ours, leaves, makes, flags, out_grads, no_grad=no_grad)
    leaves64 = [t.double() if t.is_floating_point() else t for t in leaves]
    ins64 = [make(t) for make, t in zip(makes, leaves64, strict=True)]
    outs64, grads64, in_grads64 = run(theirs, leaves64, makes, flags, out_grads, no_grad=no_grad)
    tol = TOL[dtype]
    for k, (o, w) in enumerate(zip(outs, outs64, strict=True)):
        bound = out_bound(k, w, ins64) if out_bound else row_bound(tol, w)
        check(o, w, bound, f"output {k}", rep, dtype=None if out_dtypes is None else out_dtypes[k])
    for i, (g, w, gin, leaf) in enumerate(zip(grads, grads64, in_grads64, leaves, strict=True)):
        name = names[i] if names else f"input {i}"
        if not flags[i] or no_grad:
            assert g is None, f"{rep}\n  {name}: a gradient where none was asked for"
            continue
        if w is None:                      # no path from the outputs used: torch gives None, zeros are as good
            assert g is None or not g.abs().sum() > 0, f"{rep}\n  {name}: a gradient where torch has none"
            continue
        gin = w if gin is None else gin
        per = grad_bound(i, gin, ins64) if grad_bound else row_bound(max(tol, TOL[leaf.dtype]), gin)
        per = per.expand_as(gin)
        if tuple(per.shape) != tuple(w.shape):        # each element rounded (a subnormal step at least), then summed
            finfo = torch.finfo(leaf.dtype)
            per = (per + finfo.smallest_normal * finfo.eps).sum_to_size(w.shape)
        check(g, w, per, f"gradient of {name}", rep, dtype=leaf.dtype)


def out_grad(rng, layouts: bool = True):
    """A function making an output's gradient: N(0, 1) values fixed by a seed drawn here, laid out as autograd may
    hand them over (contiguous, transposed in memory, or all one value expanded)."""
    seed, style = int(rng.integers(1 << 30)), pick(rng, ("plain", "plain", "transposed", "expanded"))

    def make(o: torch.Tensor) -> torch.Tensor:
        g = torch.from_numpy(np.random.default_rng(seed).standard_normal(tuple(o.shape)))
        if not layouts or o.dim() < 2 or o.numel() == 0 or style == "plain":
            return g
        if style == "transposed":
            return g.transpose(-1, -2).contiguous().transpose(-1, -2)
        return torch.full((), float(g.reshape(-1)[0]), dtype=g.dtype).expand(o.shape)
    return make


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    """t rounded to ``dtype`` (values), its gradient passed through unrounded (float64 autograd stays exact)."""
    return t + (t.to(dtype).double() - t).detach()


def rowmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| over the last dim, kept (0 for NaN)."""
    if t.dim() == 0 or t.shape[-1] == 0:
        return t.abs().nan_to_num(0.0)
    return t.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).amax(-1, keepdim=True)


def check(got, want, bound, what: str, rep: Replay, dtype=None) -> None:
    """``got`` against float64 ``want``: same shape (and dtype ``dtype`` if given); NaN exactly where want is NaN;
    where want overflows ``got``'s dtype, the same infinity; elsewhere finite and within ``bound`` (a tensor
    broadcast to want's shape, or a number)."""
    head = f"{rep}\n  {what}:"
    assert got is not None, f"{head} no result (no gradient where float64 torch has one)"
    assert tuple(got.shape) == tuple(want.shape), f"{head} shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if dtype is not None:
        assert got.dtype == dtype, f"{head} dtype {got.dtype}, expected {dtype}"
    if got.numel() == 0:
        return
    g, w = got.double(), want.double()
    nan_g, nan_w = g.isnan(), w.isnan()
    if not torch.equal(nan_g, nan_w):
        where = (nan_g != nan_w).nonzero()[0].tolist()
        raise AssertionError(f"{head} NaN at {int((nan_g & ~nan_w).sum())} places torch has none, none at "
                             f"{int((nan_w & ~nan_g).sum())} of torch's; first {where}: got "
                             f"{g[tuple(where)].item()}, want {w[tuple(where)].item()}")
    big = torch.finfo(got.dtype).max if got.dtype.is_floating_point else math.inf
    over = w.abs() >= big * (1 + torch.finfo(got.dtype).eps / 2) if got.dtype.is_floating_point else \
        torch.zeros_like(nan_w)
    # plus one step of the dtype's subnormals: a result that underflows rounds to a multiple of it
    finfo = torch.finfo(got.dtype) if got.dtype.is_floating_point else None
    floor = finfo.smallest_normal * finfo.eps if finfo else 0.0
    bound = torch.as_tensor(bound, dtype=torch.float64).nan_to_num(0.0, posinf=math.inf).expand_as(w) + floor
    # past the dtype's largest value: the same infinity (within the tolerance of the edge: the largest value too)
    edge = 4 * TOL.get(got.dtype, 1e-6)
    ok_over = ~over | (g == w.sign() * math.inf) | ((w.abs() <= big * (1 + edge)) & (g.abs() >= big * (1 - edge))
                                                    & (g.sign() == w.sign()))
    near = ~over & (w.abs() > big * (1 - edge))       # at the edge: inf allowed
    finite_ok = over | nan_w | (g.isfinite() & ((g - w).abs() <= bound)) | (near & (g.abs() == math.inf)
                                                                            & (g.sign() == w.sign()))
    bad = ~(ok_over & finite_ok)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        err = ((g - w).abs() / bound).masked_fill(~bad | ~w.isfinite(), 0)
        j = tuple((err == err.max()).nonzero()[0].tolist()) if err.max() > 0 else i
        raise AssertionError(f"{head} {int(bad.sum())} of {w.numel()} elements off; first {i}: got "
                             f"{g[i].item():.7g}, want {w[i].item():.7g}, bound {bound[i].item():.3g}; worst {j}: got "
                             f"{g[j].item():.7g}, want {w[j].item():.7g}, bound {bound[j].item():.3g}")


def float64_refused(fn, what: str) -> None:
    """A float64 input is refused before any work by a LaunchError naming the dtype (the kernels take
    f32/bf16/f16): never a wrong answer or a crash in a backend."""
    from tilestack.errors import LaunchError

    with pytest.raises(LaunchError, match="float64") as e:
        fn()
    assert "expected" in str(e.value), (what, str(e.value))
