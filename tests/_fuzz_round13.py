"""What the round-13 fuzz tests share (tests/test_fuzz_round13*.py): seeded case draws, sizes straddling tile
boundaries, inputs that are views of a leaf tensor (permuted storage as channels_last is, stepped slices at a
storage offset, stride-0 broadcasts of a smaller leaf, a bare offset into a larger buffer), upstream gradients of
extreme magnitude and layout (zeros, 1e4, 1e-4; transposed, stepped, stride 0, offset), and the autograd run of
an op against float64 torch with a gradient bound mapped back to the leaf.

What rounds 8 and 12 drew is left to them: their value styles (outlier rows, NaN) and their N(0, 1) output
gradients. This round's cases draw the *upstream gradient* (its scale and its memory layout), sizes of the form
tile - 1, tile, tile + 1 and primes, inputs made as views of a leaf in the ways above, and mixed dtypes.

Every case has its own generator, ``np.random.default_rng([SEED, group number, case index])``; a failure's message
starts with ``replay: seed=1300 group=... case=...`` and the pytest line that reruns that case alone.

Tolerances by the dtype results are rounded to (``TOL``): an element's rounding (f32: a few ulp, bf16: 2**-8,
f16: 2**-11, each with a factor for the f32 sums behind it) times the size of the terms it sums (given per op by
the tests), plus ``(n + 2) * U32`` times those terms for a sum of n f32 terms.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from _fuzz_round12 import check as _check12
from tilestack import config

SEED = 1300
GROUPS = ("norm", "swiglu", "rotary", "cross_entropy", "attention", "sdpa", "chain", "chain_gemm", "out", "mix",
          "dropout")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# per-element tolerance relative to the terms summed, by the dtype a result is rounded to
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
U32 = 2.0 ** -24
# tile - 1, tile, tile + 1 for the tiles the kernels use, and primes
TILE_EDGES = tuple(n for t in (16, 32, 64, 128, 256) for n in (t - 1, t, t + 1))
PRIMES = (2, 3, 5, 7, 11, 13, 37, 53, 97, 101, 193, 251, 509)
# every TRITON_EVERY-th case runs on the Triton interpreter (slower), the others on the reference executor
TRITON_EVERY = 6
GRAD_SCALES = (1.0, 1.0, 1e4, 1e-4, 0.0)
GRAD_LAYOUTS = ("contiguous", "transposed", "stepped", "expanded", "offset")
VIEWS = ("contiguous", "permuted", "stepped", "broadcast", "offset")


def rng_for(group: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, GROUPS.index(group), index])


def backend_for(index: int, every: int = TRITON_EVERY) -> str:
    return "triton" if index % every == every - 1 else "reference"


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def size(rng, cap: int) -> int:
    """A tile edge (t - 1, t, t + 1) or a prime, at most ``cap`` (1 if none fits)."""
    pool = [n for n in (*TILE_EDGES, *PRIMES) if n <= cap]
    return int(pick(rng, pool)) if pool else 1


class Replay:
    """``replay: seed=1300 group=norm case=17 backend=reference ... (pytest 'tests/...::test_norm[rms_norm-17]')``:
    the line that reruns one case, and what was
    drawn for it, on every failure. A later round subclasses it with its own ``seed`` and ``every``."""

    seed, every = SEED, TRITON_EVERY

    def __init__(self, group: str, index: int, request, every: int | None = None):
        # the test's node id: "tests/test_fuzz_round13.py::test_norm[rms_norm-3]"
        self.group, self.index, self.node = group, index, request.node.nodeid
        self.fields = {"backend": backend_for(index, every or self.every)}

    def __setitem__(self, key, value):
        self.fields[key] = value

    def __str__(self):
        more = " ".join(f"{k}={_short(v)}" for k, v in self.fields.items())
        return (f"replay: seed={self.seed} group={self.group} case={self.index} {more} "
                f"(.venv/bin/python -m pytest '{self.node}' -p no:cacheprovider -n 0)")

    def backend(self):
        return config.override(backend=self.fields["backend"])


def _short(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return str(v).replace(" ", "")


# ---- inputs as views of a leaf -------------------------------------------------------------------------------
class View:
    """How an op's input is made from the leaf the gradient lands in: ``make(leaf)`` (the same function makes
    the float64 run's input from a float64 copy of the leaf). ``leaf_of(t)`` builds the leaf holding ``t``'s
    values (``broadcast``: ``t``'s values are replaced by a broadcast of a smaller leaf's)."""

    def __init__(self, rng, shape: tuple[int, ...], kind: str):
        self.shape, self.kind = tuple(shape), kind
        dims = [d for d, n in enumerate(self.shape) if n > 1]
        if kind in ("permuted", "broadcast") and not dims:
            self.kind = kind = "offset"
        if kind == "permuted":
            # dims stored in a random order (channels_last for 4-D (B, C, H, W) is (0, 2, 3, 1)); the last dim
            # moved off the inner position at least half the time
            if len(shape) == 4 and rng.random() < 0.4:
                self.perm = [0, 2, 3, 1]
            else:
                self.perm = [int(i) for i in rng.permutation(len(shape))]
                if self.perm == sorted(self.perm):
                    self.perm = self.perm[::-1]
            self.detail = f"permuted{self.perm}"
        elif kind == "stepped":
            self.steps = [int(pick(rng, (1, 2, 3))) for _ in shape]
            self.steps[int(pick(rng, dims)) if dims else -1] = int(pick(rng, (2, 3)))
            self.off = int(rng.integers(1, 5))
            self.detail = f"stepped{self.steps}+{self.off}"
        elif kind == "broadcast":
            # a leaf of size 1 along one or more dims, expanded (stride 0 there)
            chosen = [d for d in dims if rng.random() < 0.5] or [int(pick(rng, dims))]
            self.leaf_shape = tuple(1 if d in chosen else n for d, n in enumerate(self.shape))
            self.detail = f"broadcast{chosen}"
        elif kind == "offset":
            self.off = int(rng.integers(1, 8))
            self.detail = f"offset+{self.off}"
        else:
            self.detail = "contiguous"

    def leaf_of(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "permuted":
            return t.permute(self.perm).contiguous()
        if self.kind == "stepped":
            big = [n * s for n, s in zip(self.shape, self.steps, strict=True)]
            buf = torch.full((math.prod(big) + self.off + 3,), math.nan, dtype=t.dtype)
            self.make(buf).copy_(t)
            return buf
        if self.kind == "broadcast":
            return t[tuple(slice(0, 1) if n == 1 else slice(None) for n in self.leaf_shape)].clone()
        if self.kind == "offset":
            buf = torch.full((t.numel() + self.off + 2,), math.nan, dtype=t.dtype)
            self.make(buf).copy_(t)
            return buf
        return t.clone()

    def make(self, leaf: torch.Tensor) -> torch.Tensor:
        if self.kind == "permuted":
            return leaf.permute([self.perm.index(i) for i in range(len(self.perm))])
        if self.kind == "stepped":
            big = [n * s for n, s in zip(self.shape, self.steps, strict=True)]
            return leaf[self.off:self.off + math.prod(big)].view(big)[tuple(slice(None, None, s) for s in self.steps)]
        if self.kind == "broadcast":
            return leaf.expand(self.shape)
        if self.kind == "offset":
            return leaf[self.off:self.off + math.prod(self.shape)].view(self.shape)
        return leaf


def leaves_for(rng, tensors, dtypes, names, rep: Replay, views=VIEWS):
    """(leaves in their dtypes, View per input), each input's view recorded in the replay line. The leaves of
    stepped and offset views are whole buffers: positions outside the view hold NaN (never read by a right
    kernel) and get a zero gradient."""
    leaves, vs, desc = [], [], []
    for t, dt, name in zip(tensors, dtypes, names, strict=True):
        v = View(rng, tuple(t.shape), pick(rng, views) if t.numel() else "contiguous")
        leaves.append(v.leaf_of(t.to(dt)))
        vs.append(v)
        desc.append(f"{name}:{v.detail}")
    rep["views"] = ",".join(desc)
    return leaves, vs


# ---- upstream gradients ----------------------------------------------------------------------------------------
class UpstreamGrad:
    """An output's gradient as autograd may hand it to a backward: N(0, 1) times a scale (1, 1e4, 1e-4 or 0),
    in the output's dtype, laid out contiguous, transposed in memory (last two dims), stepped (every other
    element of a wider buffer at an offset), all one value expanded (stride 0), or at a storage offset."""

    def __init__(self, rng):
        self.seed = int(rng.integers(1 << 30))
        self.scale = float(pick(rng, GRAD_SCALES))
        self.layout = pick(rng, GRAD_LAYOUTS)

    def __str__(self):
        return f"{self.scale:g}:{self.layout}"

    def values(self, shape, dtype) -> torch.Tensor:
        """The gradient's values, rounded to ``dtype`` (float64 holds them exactly), contiguous."""
        g = torch.from_numpy(np.asarray(np.random.default_rng(self.seed).standard_normal(tuple(shape)) * self.scale))
        if self.layout == "expanded" and g.numel():
            g = torch.full_like(g, float(g.reshape(-1)[0]) if self.scale else 0.0)
        return g.to(dtype).double()

    def laid_out(self, shape, dtype) -> torch.Tensor:
        """The same values, in ``dtype`` and in this gradient's layout."""
        g = self.values(shape, dtype).to(dtype)
        if g.numel() == 0 or g.dim() == 0:
            return g
        if self.layout == "transposed" and g.dim() >= 2:
            return g.transpose(-1, -2).contiguous().transpose(-1, -2)
        if self.layout == "stepped":
            wide = torch.full((*g.shape[:-1], 2 * g.shape[-1] + 1), math.nan, dtype=dtype)
            out = wide[..., 1::2]
            out.copy_(g)
            return out
        if self.layout == "expanded":
            return g.reshape(-1)[:1].reshape([1] * g.dim()).expand(g.shape)
        if self.layout == "offset":
            buf = torch.full((g.numel() + 3,), math.nan, dtype=dtype)
            out = buf[3:].view(g.shape)
            out.copy_(g)
            return out
        return g


# ---- one autograd run against float64 ---------------------------------------------------------------------------
def run_grads(fn, leaves, views, flags, grads, dtype_of_grad):
    """(outputs, leaf gradients) of fn(*[view.make(leaf)]) backpropagating ``grads`` (an UpstreamGrad or None per
    output); each gradient in ``dtype_of_grad(output)`` and its layout (float64 runs: the same values)."""
    leaves = [t.detach().requires_grad_(f) for t, f in zip(leaves, flags, strict=True)]
    outs = fn(*[v.make(t) for v, t in zip(views, leaves, strict=True)])
    outs = outs if isinstance(outs, tuple) else (outs,)
    live = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
    if live:
        torch.autograd.backward([o for o, _ in live], [g.laid_out(o.shape, dtype_of_grad(o)) for o, g in live])
    return [o.detach() for o in outs], [t.grad for t in leaves]


def leaf_bound(view: View, leaf: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """A bound on the op's input gradient carried to its leaf: the adjoint of ``view.make`` applied to it (summed
    over a broadcast, scattered into a buffer, 0 where the view does not reach)."""
    b = torch.zeros(leaf.shape, dtype=torch.float64, requires_grad=True)
    made = view.make(b)
    if made.numel():
        made.backward(bound.nan_to_num(0.0, posinf=0.0).expand(made.shape).double())
    return b.grad if b.grad is not None else torch.zeros(leaf.shape, dtype=torch.float64)


def check(got, want, bound, what: str, rep: Replay, dtype=None) -> None:
    """``got`` against float64 ``want`` (round 12's comparison: shapes, NaN exactly where float64 has NaN, the
    same infinity past the dtype's range, else within ``bound``); NaN never passes where want is finite."""
    _check12(got, want, bound, what, rep, dtype=dtype)


def fuzz_grads(rep: Replay, ours, theirs, leaves, views, flags, grads, *, names, out_bound, grad_bound,
               out_dtypes=None, dtype_of_grad=lambda o: o.dtype) -> None:
    """ours(*inputs) on the case's backend against theirs(*float64 inputs): each output within
    ``out_bound(k, want, ins64)``, each leaf gradient within ``grad_bound(i, input_grad64, ins64)`` (a bound on
    the op's input gradient, mapped to the leaf by ``leaf_bound``); no gradient where none was asked."""
    with rep.backend():
        outs, lgrads = run_grads(ours, leaves, views, flags, grads, dtype_of_grad)
    # float64: the leaves' gradients, and the op's input gradients (before autograd maps them to the leaves)
    leaves64 = [t.double().requires_grad_(f) for t, f in zip(leaves, flags, strict=True)]
    ins64 = [v.make(t) for v, t in zip(views, leaves64, strict=True)]
    for x in ins64:
        if x.requires_grad and not x.is_leaf:
            x.retain_grad()
    outs64 = theirs(*ins64)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    # the same gradient values as ours got (rounded to our outputs' dtypes)
    live = [(o, g, mine) for o, g, mine in zip(outs64, grads, outs, strict=True)
            if g is not None and o.requires_grad]
    if live:
        torch.autograd.backward([o for o, _, _ in live], [g.laid_out(o.shape, dtype_of_grad(mine)).double()
                                                          for o, g, mine in live])
    lgrads64 = [t.grad for t in leaves64]
    outs64 = [o.detach() for o in outs64]
    ins_d = [t.detach() for t in ins64]
    for k, (o, w) in enumerate(zip(outs, outs64, strict=True)):
        check(o, w, out_bound(k, w, ins_d), f"output {k}", rep, dtype=None if out_dtypes is None else out_dtypes[k])
    for i, (g, w, x, leaf) in enumerate(zip(lgrads, lgrads64, ins64, leaves, strict=True)):
        if not flags[i]:
            assert g is None, f"{rep}\n  {names[i]}: a gradient where none was asked for"
            continue
        if w is None:
            assert g is None or not g.abs().sum() > 0, f"{rep}\n  {names[i]}: a gradient where torch has none"
            continue
        gin = x.grad if x.grad is not None else w
        per = grad_bound(i, gin, ins_d)
        check(g, w, leaf_bound(views[i], leaf, per.expand_as(gin)), f"gradient of {names[i]}", rep,
              dtype=leaf.dtype)


def rowmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| over the last dim, kept (0 for NaN/inf; 0 for an empty row)."""
    a = t.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    if t.dim() == 0:
        return a
    if t.shape[-1] == 0:
        return a.sum(-1, keepdim=True)
    return a.amax(-1, keepdim=True)


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    """t rounded to ``dtype`` (values), its gradient passed through unrounded."""
    return t + (t.to(dtype).double() - t).detach()


def grad_flags(rng, n: int, rep: Replay) -> list[bool]:
    """Each input requires grad with probability 0.7, at least one."""
    flags = [bool(rng.random() < 0.7) for _ in range(n)]
    if not any(flags):
        flags[int(rng.integers(n))] = True
    rep["grad"] = "".join("1" if f else "0" for f in flags)
    return flags


def poisoned(shape, dtype, rng, rep: Replay, name: str):
    """(out, whole): an out= tensor of ``shape`` filled with NaN, as a view of a larger NaN buffer ``whole``
    (contiguous at an offset, stepped, or transposed), so a write outside it or a skipped element shows."""
    kind = pick(rng, ("contiguous", "offset", "stepped", "transposed"))
    rep[f"{name}_out"] = kind
    n = math.prod(shape)
    if kind == "stepped" and len(shape):
        whole = torch.full((*shape[:-1], 2 * shape[-1] + 1), math.nan, dtype=dtype)
        return whole[..., 1::2], whole
    if kind == "transposed" and len(shape) >= 2:
        whole = torch.full((*shape[:-2], shape[-1], shape[-2]), math.nan, dtype=dtype)
        return whole.transpose(-1, -2), whole
    off = 5 if kind == "offset" else 0
    whole = torch.full((n + off + 3,), math.nan, dtype=dtype)
    return whole[off:off + n].view(shape), whole


def untouched_outside(out: torch.Tensor, whole: torch.Tensor, rep: Replay, name: str) -> None:
    """Every element of ``whole`` outside the view ``out`` still NaN (the op wrote only into ``out``)."""
    mark = torch.zeros(whole.shape, dtype=torch.bool)
    inside = mark.as_strided(out.shape, out.stride(), out.storage_offset() - whole.storage_offset())
    inside.fill_(True)
    assert whole[~mark].isnan().all(), f"{rep}\n  {name}: the op wrote outside its out= view"
