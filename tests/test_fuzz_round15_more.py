"""Fuzz round fifteen, part two: seeded bad calls of the non-attention ops, and the bugs this round found.

The bad calls (``test_bad_call``): a good call of one of the ops (the four norms, softmax, SwiGLU, rotary, the
fused linear + cross-entropy, gemm, and the kernel functions ``swiglu``, ``swiglu_backward``, ``rotary`` into given
outputs, ``rms_norm_backward``, ``layer_norm_backward``) with one argument mutated in a way the op cannot take:
another dtype (int32, int64, bool, float64, complex64, or the float dtype another argument fixes), a rank more or
less, a size off by one where it must match, the meta device beside CPU tensors, a list, None, a stride-0 or
shifted-overlapping output, a bad scalar (eps NaN or below 0, an ignore_index that is no int, a block shape that is
no int). Each must raise a tilestack error naming that argument, before any work: a NaN-poisoned output given to
the call is left as it was. Sizes are drawn from the ragged set; every 5th call runs on the Triton interpreter.

What it found (each test below failed before its fix; the bad-call fuzz found all but the last):
- ``add_rms_norm(x, None, w)`` / ``add_layer_norm(x, None, w, b)`` returned the plain norm's y alone, so
  ``y, h = add_rms_norm(x, None, w)`` split y along its first dim into two tensors without a word;
- ``rms_norm_backward`` / ``layer_norm_backward`` with ``BM=None``, ``'4'`` or ``4.0`` failed with a bare TypeError in
  the program count (or torch.empty); ``ONE_TILE='yes'`` was taken as True;
- ``swiglu_backward`` with da or db one row past dy, a or b in one buffer gave wrong gradients on the Triton backend
  without a word, and a dy of another dtype was reported as ``a has dtype ...``;
- ``rotary`` with q_out/k_out over the memory of the cos/sin tables gave wrong rotations on the Triton backend;
  ``inverse='no'`` (any truthy value) rotated by minus the angle;
- a stride-0 ``out`` of ``swiglu``, ``da``/``db`` of ``swiglu_backward``, ``q_out``/``k_out`` of ``rotary`` were refused
  naming the kernel's parameter (``swiglu_fwd_kernel: output Y``, QO), not the caller's argument;
- ``layer_norm(eps=inf)`` was refused where ``eps=1e39`` (f32's inf in the kernel) and ``add_layer_norm(eps=inf)`` were
  answered (found by the forward fuzz's eps draws in part one, now drawn there).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import tilestack.kernels as K
from _fuzz_round15 import Replay, pick, ragged, rng_for, seeded
from tilestack.errors import LaunchError, TilestackError
from tilestack.torch import ops

BAD_CASES = 90
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
INTS = (torch.int32, torch.int64, torch.bool)
TENSOR_KINDS = ("int", "float64", "complex", "meta", "list", "none")


def _mutate(t, kind: str, rng, *, dim: int = 0, other=None):
    """``t`` changed by ``kind``: ``int`` (an int or bool tensor), ``float64``, ``complex``, ``meta`` (the meta
    device), ``list``, ``none``, ``rank+1`` (a leading dim of 1), ``rank-1`` (the first index dropped), ``size+1`` (one
    more along ``dim``), ``other`` (the float dtype ``other`` instead), ``expanded`` (stride 0 along ``dim``),
    ``zero_d`` (a 0-d tensor)."""
    if kind == "int":
        return torch.ones(t.shape, dtype=pick(rng, INTS))
    if kind == "float64":
        return t.double()
    if kind == "complex":
        return t.to(torch.complex64)
    if kind == "meta":
        return t.to("meta")
    if kind == "list":
        return t.tolist()
    if kind == "none":
        return None
    if kind == "rank+1":
        return t.unsqueeze(0)
    if kind == "rank-1":
        return t[0] if t.shape[0] else t.sum(0)
    if kind == "size+1":
        return torch.cat((t, t.narrow(dim, 0, 1) if t.shape[dim] else torch.zeros_like(t.narrow(dim, 0, 0))
                          .expand(*t.shape[:dim], 1, *t.shape[dim + 1:])), dim)
    if kind == "other":
        return t.to(other)
    if kind == "expanded":
        return t.narrow(dim, 0, 1).expand(t.shape).clone().narrow(dim, 0, 1).expand(t.shape)
    if kind == "zero_d":
        return torch.tensor(1.0, dtype=t.dtype)
    raise AssertionError(kind)


def _other(dt):
    return F16 if dt != F16 else BF16


def _norm_case(rng, op):
    residual, centered = op.startswith("add_"), op.endswith("layer_norm")
    dt, n = pick(rng, (F32, BF16, F16)), max(1, ragged(rng, zero=0))
    g = seeded(rng)
    x = torch.randn(int(pick(rng, (1, 3, 17))), n, generator=g).to(dt)
    args = {"x": x}
    if residual:
        args["r"] = torch.randn(x.shape, generator=g).to(dt)
    args["weight"] = torch.randn(n, generator=g).to(pick(rng, (dt, F32)))
    if centered:
        args["bias"] = torch.randn(n, generator=g).to(args["weight"].dtype)
    args["eps"] = 1e-5
    mutations = {"x": ("int", "float64", "complex", "list", "none", "zero_d"),
                 "weight": ("int", "float64", "meta", "list", "none", "rank+1", "size+1", "zero_d"),
                 "eps": ("nan", "negative", "str", "none", "tensor")}
    if residual:
        mutations["r"] = ("int", "float64", "meta", "list", "none", "size+1", "rank-1", "other")
    if centered:
        mutations["bias"] = ("int", "float64", "meta", "list", "rank+1", "size+1", "other")

    def call(a):
        return getattr(ops, op)(*(a[k] for k in args if k != "eps"), eps=a["eps"])
    return call, args, mutations, {"r": dt, "bias": args["weight"].dtype}


def _softmax_case(rng):
    dt, n, m = pick(rng, (F32, BF16, F16)), max(1, ragged(rng, zero=0)), int(pick(rng, (1, 3, 17)))
    x = torch.randn(m, n, generator=seeded(rng)).to(dt)
    args = {"x": x, "out": torch.full((m, n), math.nan, dtype=dt)}
    mutations = {"x": ("int", "float64", "list", "none", "rank+1", "rank-1"),
                 "out": ("other", "size+1", "meta", "list", "expanded", "alias")}
    return (lambda a: K.softmax(a["x"], out=a["out"])), args, mutations, {"out": _other(dt)}


def _swiglu_case(rng):
    dt, f = pick(rng, (F32, BF16, F16)), max(1, ragged(rng, zero=0, cap=1000))
    x = torch.randn(int(pick(rng, (1, 3))), 2 * f, generator=seeded(rng)).to(dt)
    return (lambda a: ops.swiglu(a["x"])), {"x": x}, {"x": ("int", "float64", "list", "none", "zero_d", "odd")}, {}


def _rotary_case(rng, kernel: bool):
    dt, D, N = pick(rng, (F32, BF16, F16)), int(pick(rng, (16, 32, 64))), int(pick(rng, (1, 3, 17)))
    g = seeded(rng)
    q, k = torch.randn(1, N, 2, D, generator=g).to(dt), torch.randn(1, N, 1, D, generator=g).to(dt)
    cos, sin = K.rotary_tables(N, D)
    args = {"q": q, "k": k, "cos": cos, "sin": sin}
    mutations = {"q": ("int", "float64", "list", "none", "meta", "rank-1"),
                 "k": ("other", "int", "rank-1", "size+1"),
                 "cos": ("other", "int", "size+1", "rank+1", "none", "meta"),
                 "sin": ("other", "int", "size+1", "rank+1", "none", "meta")}
    others = {"k": _other(dt), "cos": F16, "sin": BF16}
    if not kernel:
        return (lambda a: ops.rotary(a["q"], a["k"], a["cos"], a["sin"])), args, mutations, others
    args.update(q_out=torch.full(q.shape, math.nan, dtype=dt), k_out=torch.full(k.shape, math.nan, dtype=dt),
                inverse=False)
    mutations.update(q_out=("other", "size+1", "meta", "list", "expanded", "alias"),
                     k_out=("other", "size+1", "meta", "list", "expanded", "alias"),
                     inverse=("str", "none", "int"))
    others.update(q_out=_other(dt), k_out=_other(dt))
    return (lambda a: K.rotary(a["q"], a["k"], a["cos"], a["sin"], inverse=a["inverse"], q_out=a["q_out"],
                               k_out=a["k_out"])), args, mutations, others


def _ce_case(rng):
    dt, T, d, V = pick(rng, (F32, BF16, F16)), int(pick(rng, (1, 3, 17))), int(pick(rng, (3, 17))), \
        max(1, ragged(rng, zero=0, cap=1000))
    g = seeded(rng)
    args = {"x": torch.randn(T, d, generator=g).to(dt), "weight": torch.randn(V, d, generator=g).to(dt),
            "labels": torch.randint(0, V, (T,), generator=g), "ignore_index": -100}
    mutations = {"x": ("int", "float64", "list", "none", "meta", "rank+1"),
                 "weight": ("other", "int", "rank+1", "size+1"),
                 "labels": ("float", "bool", "uint8", "rank+1", "size+1", "out_of_range", "meta", "none"),
                 "ignore_index": ("float", "none", "str", "huge")}
    return (lambda a: ops.fused_linear_cross_entropy(a["x"], a["weight"], a["labels"], a["ignore_index"])), args, \
        mutations, {"weight": _other(dt)}


def _gemm_case(rng):
    dt = pick(rng, (BF16, F16))
    M, Kd, N = (max(1, ragged(rng, zero=0, cap=100)) for _ in range(3))
    g = seeded(rng)
    args = {"a": torch.randn(M, Kd, generator=g).to(dt), "b": torch.randn(Kd, N, generator=g).to(dt),
            "bias": torch.randn(N, generator=g), "residual": torch.randn(M, N, generator=g),
            "out": torch.full((M, N), math.nan, dtype=dt), "activation": pick(rng, (None, "relu", "gelu"))}
    mutations = {"a": ("other32", "int", "rank+1", "list", "none", "meta"),
                 "b": ("other", "size+1", "rank-1", "int"),
                 "bias": ("int", "rank+1", "size+1", "meta"),
                 "residual": ("int", "size+1", "rank-1", "meta"),
                 "out": ("other", "size+1", "meta", "expanded", "alias"),
                 "activation": ("str", "int")}
    return (lambda a: K.gemm(a["a"], a["b"], bias=a["bias"], residual=a["residual"], out=a["out"],
                             activation=a["activation"])), args, mutations, {"b": _other(dt), "out": F32}


def _swiglu_kernel_case(rng, backward: bool):
    dt, m, f = pick(rng, (F32, BF16, F16)), int(pick(rng, (1, 3, 17))), max(1, ragged(rng, zero=0, cap=1000))
    g = seeded(rng)
    a, b = torch.randn(m, f, generator=g).to(dt), torch.randn(m, f, generator=g).to(dt)
    if not backward:
        args = {"a": a, "b": b, "out": torch.full((m, f), math.nan, dtype=dt)}
        mutations = {"b": ("other", "size+1", "int"), "out": ("other", "size+1", "expanded", "shifted")}
        return (lambda t: K.swiglu(t["a"], t["b"], out=t["out"])), args, mutations, {"b": _other(dt),
                                                                                      "out": _other(dt)}
    args = {"dy": torch.randn(m, f, generator=g).to(dt), "a": a, "b": b,
            "da": torch.full((m, f), math.nan, dtype=dt), "db": torch.full((m, f), math.nan, dtype=dt)}
    mutations = {"dy": ("other", "size+1", "int"), "da": ("other", "size+1", "expanded", "shifted"),
                 "db": ("other", "size+1", "expanded", "shifted")}
    return (lambda t: K.swiglu_backward(t["dy"], t["a"], t["b"], da=t["da"], db=t["db"])), args, mutations, \
        {"dy": _other(dt), "da": _other(dt), "db": _other(dt)}


def _norm_backward_case(rng, centered: bool):
    dt, m, n = pick(rng, (F32, BF16, F16)), int(pick(rng, (1, 3, 17))), max(1, ragged(rng, zero=0))
    g = seeded(rng)
    x, w = torch.randn(m, n, generator=g).to(dt), torch.randn(n, generator=g)
    if centered:
        _, mean, rstd = K.layer_norm(x, w, torch.zeros_like(w))
    else:
        _, rstd = K.rms_norm(x, w)
    args = {"dy": torch.randn(m, n, generator=g).to(dt), "x": x, "weight": w}
    if centered:
        args["mean"] = mean
    args.update(rstd=rstd, dh=torch.randn(m, n, generator=g).to(dt), BM=4)
    mutations = {"dy": ("other", "size+1", "int"), "rstd": ("other16", "size+1", "rank+1", "none"),
                 "dh": ("other", "size+1"), "BM": ("none", "str", "float")}
    if centered:
        mutations["mean"] = ("other16", "size+1", "none")
    fn = K.layer_norm_backward if centered else K.rms_norm_backward
    stats = ("mean", "rstd") if centered else ("rstd",)
    return (lambda a: fn(a["dy"], a["x"], a["weight"], *(a[s] for s in stats), dh=a["dh"], BM=a["BM"])), args, \
        mutations, {"dy": _other(dt), "dh": _other(dt)}


OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "softmax", "swiglu", "rotary", "rotary_kernel",
       "cross_entropy", "gemm", "swiglu_kernel", "swiglu_backward", "rms_norm_backward", "layer_norm_backward")


def _case(op, rng):
    if op in ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"):
        return _norm_case(rng, op)
    return {"softmax": lambda: _softmax_case(rng), "swiglu": lambda: _swiglu_case(rng),
            "rotary": lambda: _rotary_case(rng, False), "rotary_kernel": lambda: _rotary_case(rng, True),
            "cross_entropy": lambda: _ce_case(rng), "gemm": lambda: _gemm_case(rng),
            "swiglu_kernel": lambda: _swiglu_kernel_case(rng, False),
            "swiglu_backward": lambda: _swiglu_kernel_case(rng, True),
            "rms_norm_backward": lambda: _norm_backward_case(rng, False),
            "layer_norm_backward": lambda: _norm_backward_case(rng, True)}[op]()


SCALARS = {"nan": math.nan, "negative": -1.0, "str": "1", "none": None, "tensor": torch.tensor(1e-5), "float": 1.5,
           "huge": 2 ** 70, "int": 2}


def _apply(args: dict, name: str, kind: str, rng, others: dict) -> dict:
    """args with ``name`` mutated by ``kind`` (a copy; tensors shared)."""
    a = dict(args)
    t = a[name]
    if not isinstance(t, torch.Tensor):                       # a scalar argument
        a[name] = SCALARS[kind]
        return a
    dims = t.dim()
    if kind in ("other", "other32", "other16"):
        a[name] = t.to({"other32": F32, "other16": F16}.get(kind, others.get(name, F16)))
    elif kind == "alias":                    # an output over an input it must not overwrite
        src = {"out": "residual" if "residual" in a else "x", "q_out": "k", "k_out": "q"}[name]
        a[name] = a[src] = a[src].clone() if a[src].shape == t.shape else t.new_zeros(a[src].shape)
        if a[name].shape != t.shape:          # (q_out over k: a view of k's storage of q's shape)
            buf = torch.zeros(max(t.numel(), a[src].numel()), dtype=t.dtype)
            a[src], a[name] = buf[:a[src].numel()].view(a[src].shape), buf[:t.numel()].view(t.shape)
    elif kind == "shifted":                  # an output one row past an input of its shape, in one buffer
        src = pick(rng, [k for k in ("a", "b", "dy") if k in a])
        buf = torch.randn(t.shape[0] + 1, *t.shape[1:]).to(t.dtype)
        a[src], a[name] = buf[:-1], buf[1:]
    elif kind == "odd":
        a[name] = t[..., :-1] if t.shape[-1] > 1 else torch.cat((t, t[..., :1]), -1)
    elif kind in ("float", "bool", "uint8"):
        a[name] = t.to({"float": F32, "bool": torch.bool, "uint8": torch.uint8}[kind])
    elif kind == "out_of_range":
        bad = t.clone()
        bad[int(rng.integers(t.numel()))] = pick(rng, (-3, a["weight"].shape[0]))
        a[name] = bad
    else:
        dim = int(rng.integers(dims)) if dims else 0
        if kind == "size+1" and name in ("b",):
            dim = 0                          # b's rows must equal a's columns; b's columns are the output's
        if kind == "size+1" and name in ("weight",) and "labels" in a:
            dim = 1
        a[name] = _mutate(t, kind, rng, dim=dim)
    return a


def _named(msg: str, name: str) -> bool:
    """Whether a message names the argument (as a word, e.g. 'r' not inside 'rank'; BM as 'BM=')."""
    return re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", msg) is not None


@pytest.mark.parametrize("index", range(BAD_CASES))
def test_bad_call(index, request):
    rng, rep = rng_for("bad", index), Replay("bad", index, request)
    op = OPS[index % len(OPS)]
    call, args, mutations, others = _case(op, rng)
    name = pick(rng, sorted(mutations))
    kind = pick(rng, mutations[name])
    rep.fields.update(op=op, arg=name, mutation=kind)
    bad = _apply(args, name, kind, rng, others)
    outs = {k: v for k, v in bad.items() if k in ("out", "q_out", "k_out", "da", "db") and isinstance(v, torch.Tensor)
            and v.device.type == "cpu" and v.is_floating_point()}
    before = {k: v.clone() for k, v in outs.items()}
    with rep.backend():
        try:
            call(bad)
        except TilestackError as e:
            msg = str(e)
        else:
            raise AssertionError(f"{rep}\n  taken without an error")
    assert _named(msg, name), f"{rep}\n  the error does not name {name}: {msg}"
    for k, v in outs.items():                    # refused before any work: the given outputs as they were
        assert torch.equal(v.isnan(), before[k].isnan()) and torch.equal(v.nan_to_num(), before[k].nan_to_num()), \
            f"{rep}\n  {k} was written by a call that was refused"


@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_the_fused_add_norms_refuse_r_none(op):
    """add_rms_norm(x, None, w) returned rms_norm's y alone, so ``y, h = add_rms_norm(x, None, w)`` split y along its
    first dim into two tensors without a word (x of 2 rows: y the first row's norm, h the second's)."""
    x, w = torch.randn(2, 8), torch.randn(8)
    extra = (torch.zeros(8),) if op == "add_layer_norm" else ()
    with pytest.raises(LaunchError, match=rf"{op}: r must be a torch.Tensor .* got None"):
        getattr(ops, op)(x, None, w, *extra)


@pytest.mark.parametrize("fn", ["rms_norm_backward", "layer_norm_backward"])
@pytest.mark.parametrize("config", [dict(BM=None), dict(BM="4"), dict(BM=4.0), dict(BN=True), dict(ONE_TILE="yes")])
def test_norm_backward_refuses_block_shapes_of_other_types(fn, config):
    """BM=None, '4' or 4.0 failed with a bare TypeError in the backward's program count (or torch.empty), and
    ONE_TILE='yes' was taken as True; each now a LaunchError naming the function and the key."""
    x, w = torch.randn(3, 8), torch.randn(8)
    if fn == "layer_norm_backward":
        _, mean, rstd = K.layer_norm(x, w, torch.zeros(8))
        stats = (mean, rstd)
    else:
        stats = (K.rms_norm(x, w)[1],)
    key = next(iter(config))
    with pytest.raises(LaunchError, match=rf"{fn}: {key}="):
        getattr(K, fn)(x, x, w, *stats, **config)
    dx, *_ = getattr(K, fn)(x, x, w, *stats, BM=2, BN=16)      # ints of the kernel's domain still taken
    assert dx.shape == x.shape and not dx.isnan().any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("out", ["da", "db"])
@pytest.mark.parametrize("role", ["dy", "a", "b"])
def test_swiglu_backward_refuses_an_output_shifted_over_an_input(backend, out, role):
    """da (or db) one row past dy, a or b in one buffer: the Triton backend stored over rows another program then
    read, and gave wrong gradients without a word; now refused by name. The same elements (da is a) stay allowed
    (each element is read before its own store) and right."""
    from tilestack import config

    g = torch.Generator().manual_seed(3)
    args = {k: torch.randn(5, 40, generator=g) for k in ("dy", "a", "b")}
    want = K.swiglu_backward(args["dy"], args["a"], args["b"])
    buf = torch.randn(6, 40, generator=g)
    buf[:5] = args[role]
    shifted = dict(args, **{role: buf[:5]})
    with config.override(backend=backend):
        with pytest.raises(LaunchError, match=rf"swiglu_backward: {out} shares memory with {role}"):
            K.swiglu_backward(shifted["dy"], shifted["a"], shifted["b"], **{out: buf[1:]})
        same = {k: v.clone() for k, v in args.items()}
        got = K.swiglu_backward(same["dy"], same["a"], same["b"], **{out: same[role]})
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_swiglu_backward_names_a_dy_of_another_dtype():
    """dy in f16 beside bf16 a and b: the error named a ("a has dtype bfloat16; expected one of float16")."""
    a = torch.randn(3, 8, dtype=BF16)
    with pytest.raises(LaunchError, match=r"swiglu_backward: dy has dtype float16; expected one of bfloat16"):
        K.swiglu_backward(a.half(), a, a)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("out", ["q_out", "k_out"])
@pytest.mark.parametrize("table", ["cos", "sin"])
def test_rotary_refuses_an_output_over_its_tables(backend, out, table):
    """q_out over the memory of cos: the Triton backend rotated later rows by the angles written there (wrong,
    without a word); now refused by name. An output elsewhere in the same buffer is taken, and right."""
    from tilestack import config

    q = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(4))
    cos, sin = K.rotary_tables(4, 16)
    want = K.rotary(q, q, cos, sin)
    buf = torch.zeros(400)
    tables = {"cos": cos, "sin": sin}
    tables[table] = buf[:32].view(4, 8)
    tables[table].copy_(cos if table == "cos" else sin)
    with config.override(backend=backend):
        with pytest.raises(LaunchError, match=rf"rotary: {out} shares memory with {table}"):
            K.rotary(q, q.clone(), tables["cos"], tables["sin"], **{out: buf[:128].view(1, 4, 2, 16)})
        got = K.rotary(q, q.clone(), tables["cos"], tables["sin"], **{out: buf[200:328].view(1, 4, 2, 16)})
    torch.testing.assert_close(got[0 if out == "q_out" else 1], want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inverse", ["no", 1, None, 0.0])
def test_rotary_refuses_an_inverse_that_is_no_bool(inverse):
    """inverse='no' rotated by minus the angle (any truthy value did)."""
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(LaunchError, match=r"rotary: inverse=.*expected a bool"):
        K.rotary(q, q, *K.rotary_tables(4, 16), inverse=inverse)


@pytest.mark.parametrize("call,name", [
    (lambda o: K.swiglu(torch.randn(3, 8), torch.randn(3, 8), out=o), "swiglu: out"),
    (lambda o: K.swiglu_backward(*torch.randn(3, 3, 8), da=o), "swiglu_backward: da"),
    (lambda o: K.swiglu_backward(*torch.randn(3, 3, 8), db=o), "swiglu_backward: db"),
])
def test_a_stride_0_output_is_named_as_the_caller_names_it(call, name):
    """The kernel's own check named its parameter (``swiglu_fwd_kernel: output Y``, DA, DB)."""
    with pytest.raises(LaunchError, match=rf"{name} has shape \(3, 8\) and strides \(0, 1\)"):
        call(torch.empty(1, 8).expand(3, 8))
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(LaunchError, match=r"rotary: q_out has shape .* stride 0"):
        K.rotary(q, q, *K.rotary_tables(4, 16), q_out=torch.empty(1, 1, 2, 16).expand(1, 4, 2, 16))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_norm_takes_eps_inf_as_the_other_norms(backend):
    """tilestack.layer_norm(eps=inf) was refused ("a finite number") where eps=1e39 (f32's inf in the kernel) and
    add_layer_norm(eps=inf) were answered; y = bias and dx = 0, as torch's in float64."""
    from tilestack import config

    x, w, b = torch.randn(4, 33), torch.randn(33), torch.randn(33)
    xr = x.clone().requires_grad_()
    with config.override(backend=backend):
        y = ops.layer_norm(xr, w, b, eps=math.inf)
        y.backward(torch.randn(4, 33))
        y2 = ops.add_layer_norm(x, torch.zeros_like(x), w, b, eps=math.inf)[0]
    want = torch.nn.functional.layer_norm(x.double(), (33,), w.double(), b.double(), eps=math.inf)
    assert torch.equal(y.detach().double(), want) and torch.equal(y2.double(), want)
    assert torch.equal(xr.grad, torch.zeros_like(x))


def test_the_fuzz_catches_a_wrong_softmax(monkeypatch, request):
    """softmax's output off by 1% of its row's largest value: the first 8 softmax cases that hold a finite result
    (4 of them: the others are empty, or NaN rows from +inf / all -inf, which stay NaN) fail, each with its replay
    line."""
    from test_fuzz_round15 import test_softmax

    real = K.softmax

    def off(x, *, out=None, **kw):
        y = real(x, out=out, **kw)
        if y.numel():
            y.add_(0.01 * y.nan_to_num(0.0).abs().amax(-1, keepdim=True).clamp(min=1e-3))
        return y

    monkeypatch.setattr(K, "softmax", off)
    failed = []
    for i in range(8):
        try:
            test_softmax(i, request)
        except AssertionError as e:
            failed.append(str(e))
    assert len(failed) >= 4 and all(m.startswith("replay: seed=1500 group=softmax") for m in failed), failed
