"""Bad inputs at every public entry point are refused clearly: one row per mistake a user can make, with the
error type and a fragment the message must hold (the argument's name, usually with what was given).

Entry points: tilestack.attention, kernels.attention_forward / attention_backward, kernels.gemm, softmax,
layer_norm, rms_norm, a user kernel's launch, and mistakes made while tracing a kernel. A row passes when the
call raises that tilestack error with that fragment; any other exception (a bare TypeError, an IndexError from
deep inside, a wrong result without an error) fails it. docs/reliability.md reports the count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

import tilestack
import tilestack.lang as ts
from tilestack.errors import LaunchError, MemorySpaceError, TileDTypeError, TileShapeError, TraceError, TunableError
from tilestack.kernels import attention_forward, gemm, layer_norm, softmax
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.rmsnorm import rms_norm

BF, F16 = torch.bfloat16, torch.float16


@dataclasses.dataclass(frozen=True)
class Row:
    call: Callable[[], object]
    error: type[Exception]
    fragment: str


def qkv(B=1, H=2, Hkv=1, Nq=5, Nk=7, D=16, dtype=BF):
    return (torch.zeros(B, H, Nq, D, dtype=dtype), torch.zeros(B, Hkv, Nk, D, dtype=dtype),
            torch.zeros(B, Hkv, Nk, D, dtype=dtype))


def _attention_rows(name: str, fn) -> dict[str, Row]:
    q, k, v = qkv()
    return {
        f"{name}: q not a tensor": Row(lambda: fn(q.tolist(), k, v), LaunchError, "q must be a torch.Tensor, got list"),
        f"{name}: q rank 3": Row(lambda: fn(q[0], k, v), LaunchError, "q must have rank 4"),
        f"{name}: k int32": Row(lambda: fn(q, k.int(), v), LaunchError, "k has dtype int32"),
        f"{name}: v float64": Row(lambda: fn(q, k, v.double()), LaunchError, "v has dtype float64"),
        f"{name}: dtypes differ": Row(lambda: fn(q, k.half(), v.half()), LaunchError, "q, k, v must share a dtype"),
        f"{name}: k, v lengths differ": Row(lambda: fn(q, k, v[:, :, :3]), LaunchError, "k and v"),
        f"{name}: k batch differs": Row(lambda: fn(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)),
                                        LaunchError, "k is (2, 1, 7, 16)"),
        f"{name}: k head dim differs": Row(lambda: fn(q, *qkv(D=32)[1:]), LaunchError, "D=16"),
        f"{name}: heads not a multiple": Row(lambda: fn(*qkv(H=3, Hkv=2)), LaunchError, "H must be a multiple"),
        f"{name}: head dim too large": Row(lambda: fn(*qkv(D=300)), LaunchError, "head dim D=300"),
        f"{name}: scale 0": Row(lambda: fn(q, k, v, scale=0.0), LaunchError, "scale must be a positive number"),
        f"{name}: scale nan": Row(lambda: fn(q, k, v, scale=math.nan), LaunchError, "scale must be"),
        f"{name}: scale bool": Row(lambda: fn(q, k, v, scale=True), LaunchError, "scale must be"),
        f"{name}: scale string": Row(lambda: fn(q, k, v, scale="0.1"), LaunchError, "scale must be"),
        f"{name}: k on meta": Row(lambda: fn(q, k.to("meta"), v), LaunchError, "k on meta"),
        f"{name}: causal string": Row(lambda: fn(q, k, v, "no"), LaunchError, "causal must be a bool"),
        f"{name}: causal tensor": Row(lambda: fn(q, k, v, torch.tensor(True)), LaunchError, "causal must be a bool"),
    }


def _forward_rows() -> dict[str, Row]:
    q, k, v = qkv()
    f = attention_forward
    return {
        "attention_forward: causal_align unknown": Row(lambda: f(q, k, v, True, causal_align="middle"), LaunchError,
                                                       "causal_align"),
        "attention_forward: attn_mask int": Row(lambda: f(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.int32)),
                                                LaunchError, "attn_mask has dtype int32"),
        "attention_forward: attn_mask shape": Row(lambda: f(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.bool)),
                                                  LaunchError, "attn_mask is (5, 6)"),
        "attention_forward: unknown config": Row(lambda: f(q, k, v, BX=16), LaunchError, "BX"),
        "attention_forward: tile outside its domain": Row(lambda: f(q, k, v, BM=24), TunableError, "BM=24"),
    }


def _backward_rows() -> dict[str, Row]:
    q, k, v = qkv()
    o, lse, do = torch.zeros_like(q), torch.zeros(1, 2, 5), torch.zeros_like(q)
    b = attention_backward
    return {
        "attention_backward: o shape": Row(lambda: b(q, k, v, o[:, :1], lse, do), LaunchError, "o is (1, 1, 5, 16)"),
        "attention_backward: o not a tensor": Row(lambda: b(q, k, v, None, lse, do), LaunchError,
                                                  "o must be a torch.Tensor"),
        "attention_backward: lse dtype": Row(lambda: b(q, k, v, o, lse.to(BF), do), LaunchError, "lse is"),
        "attention_backward: lse shape": Row(lambda: b(q, k, v, o, lse[..., :4], do), LaunchError, "lse is"),
        "attention_backward: do dtype": Row(lambda: b(q, k, v, o, lse, do.half()), LaunchError, "do is"),
        "attention_backward: config part": Row(lambda: b(q, k, v, o, lse, do, config={"fwd": {}}), LaunchError,
                                               "config has ['fwd']"),
        "attention_backward: q rank": Row(lambda: b(q[0], k, v, o, lse, do), LaunchError, "q must have rank 4"),
    }


def _gemm_rows() -> dict[str, Row]:
    a, b = torch.zeros(8, 8, dtype=BF), torch.zeros(8, 6, dtype=BF)
    return {
        "gemm: a rank 3": Row(lambda: gemm(a[None], b), LaunchError, "a must have rank 2"),
        "gemm: a float32": Row(lambda: gemm(a.float(), b.float()), LaunchError, "a has dtype float32"),
        "gemm: b dtype differs": Row(lambda: gemm(a, b.half()), LaunchError, "b has dtype float16"),
        "gemm: inner dims": Row(lambda: gemm(a, b[:5]), LaunchError, "a.shape[1] must equal b.shape[0]"),
        "gemm: b a list": Row(lambda: gemm(a, b.tolist()), LaunchError, "b must be a torch.Tensor"),
        "gemm: devices differ": Row(lambda: gemm(a, b.to("meta")), LaunchError, "b on meta"),
        "gemm: out shape": Row(lambda: gemm(a, b, out=torch.zeros(6, 8, dtype=BF)), LaunchError, "out is (6, 8)"),
        "gemm: out dtype": Row(lambda: gemm(a, b, out=torch.zeros(8, 6, dtype=F16)), LaunchError,
                               "out has dtype float16"),
        "gemm: out is a": Row(lambda: gemm(a, a, out=a), LaunchError, "out shares memory with a"),
        "gemm: out overlaps b": Row(lambda: gemm(a, b[:, :4], out=b[:, 2:]), LaunchError,
                                    "out shares memory with b"),
        "gemm: out strides (1, 1)": Row(lambda: gemm(a, b, out=torch.zeros(16, dtype=BF).as_strided((8, 6), (1, 1))),
                                        LaunchError, "out has shape (8, 6) and strides (1, 1)"),
        "gemm: out requires grad": Row(lambda: gemm(a, b, out=torch.zeros(8, 6, dtype=BF, requires_grad=True)),
                                       LaunchError, "out requires grad"),
        "gemm: tile outside its domain": Row(lambda: gemm(a, b, GROUP_M=3), TunableError, "GROUP_M=3"),
        "gemm: unknown config": Row(lambda: gemm(a, b, BX=3), LaunchError, "BX"),
    }


def _softmax_rows() -> dict[str, Row]:
    x = torch.zeros(4, 8)
    return {
        "softmax: x rank 1": Row(lambda: softmax(x[0]), LaunchError, "x must have rank 2"),
        "softmax: x float64": Row(lambda: softmax(x.double()), LaunchError, "x has dtype float64"),
        "softmax: x a numpy array": Row(lambda: softmax(x.numpy()), LaunchError, "x must be a torch.Tensor"),
        "softmax: out shape": Row(lambda: softmax(x, out=torch.zeros(4, 7)), LaunchError, "out is (4, 7)"),
        "softmax: out is x": Row(lambda: softmax(x, out=x), LaunchError, "out shares memory with x"),
        "softmax: out expanded": Row(lambda: softmax(x, out=torch.zeros(1, 8).expand(4, 8)), LaunchError,
                                     "out has shape (4, 8) and strides (0, 1)"),
        "softmax: x requires grad with out": Row(lambda: softmax(x.requires_grad_(), out=torch.zeros(4, 8)),
                                                 LaunchError, "x requires grad"),
        "softmax: ONE_TILE too narrow": Row(lambda: softmax(torch.zeros(2, 300), ONE_TILE=True, BN=128), LaunchError,
                                            "ONE_TILE=True needs BN >= the row width 300"),
    }


def _norm_rows() -> dict[str, Row]:
    x, w, b = torch.zeros(4, 8), torch.ones(8), torch.zeros(8)
    return {
        "layer_norm: x rank 3": Row(lambda: layer_norm(x[None], w, b), LaunchError, "x must have rank 2"),
        "layer_norm: weight length": Row(lambda: layer_norm(x, w[:7], b), LaunchError, "weight has 7 elements"),
        "layer_norm: bias float64": Row(lambda: layer_norm(x, w, b.double()), LaunchError, "bias has dtype float64"),
        "layer_norm: bias None": Row(lambda: layer_norm(x, w, None), LaunchError, "bias must be a torch.Tensor"),
        "layer_norm: eps None": Row(lambda: layer_norm(x, w, b, eps=None), LaunchError, "eps must be a finite number"),
        "layer_norm: eps negative": Row(lambda: layer_norm(x, w, b, eps=-1.0), LaunchError, "eps must be"),
        "layer_norm: weight on meta": Row(lambda: layer_norm(x, w.to("meta"), b), LaunchError, "weight on meta"),
        "rms_norm: weight length": Row(lambda: rms_norm(x, w[:3]), LaunchError, "weight has 3 elements"),
        "rms_norm: x int64": Row(lambda: rms_norm(x.long(), w), LaunchError, "x has dtype int64"),
        "rms_norm: eps None": Row(lambda: rms_norm(x, w, eps=None), LaunchError, "eps must be"),
        # the differentiable ops over (..., N) tensors
        "tilestack.layer_norm: weight length": Row(lambda: tilestack.layer_norm(x[None], w[:5], b), LaunchError,
                                                   "weight"),
        "tilestack.layer_norm: eps None": Row(lambda: tilestack.layer_norm(x, w, b, eps=None), LaunchError, "eps"),
        "tilestack.rms_norm: x int32": Row(lambda: tilestack.rms_norm(x.int(), w), LaunchError, "x has dtype int32"),
        "tilestack.rms_norm: eps string": Row(lambda: tilestack.rms_norm(x, w, eps="1e-6"), LaunchError, "eps"),
    }


# ---- a user kernel: launch and tracing ---------------------------------------------------------------------------
@ts.kernel(grid=lambda C, B: (ts.cdiv(C.shape[0], B), ts.cdiv(C.shape[1], B)))
def scale_kernel(A, C, s: float, n: int, *, B: int = ts.tunable(16, (16, 32))):
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.RegTile[ts.f32, B, B]()
    ts.load(a, A, at=(i, j))
    ts.mul(a, a, s)
    ts.store(C, a, at=(i, j))


def _launch_rows() -> dict[str, Row]:
    a, c = torch.ones(20, 20), torch.zeros(20, 20)
    k = scale_kernel
    return {
        "launch: too few arguments": Row(lambda: k(a, c, 2.0), LaunchError, "takes 4 arguments (A, C, s, n)"),
        "launch: a list for a tensor": Row(lambda: k(a.tolist(), c, 2.0, 1), LaunchError, "argument A must be"),
        "launch: a tensor for a scalar": Row(lambda: k(a, c, torch.tensor(2.0), 1), LaunchError, "argument s"),
        "launch: a float for an int": Row(lambda: k(a, c, 2.0, 1.5), LaunchError, "argument n"),
        "launch: int16 tensor": Row(lambda: k(a.to(torch.int16), c, 2.0, 1), LaunchError, "argument A has dtype"),
        "launch: unknown constant": Row(lambda: k(a, c, 2.0, 1, BX=3), LaunchError, "BX"),
        "launch: tunable outside its domain": Row(lambda: k(a, c, 2.0, 1, B=24), TunableError, "B=24"),
        "launch: devices differ": Row(lambda: k(a, c.to("meta"), 2.0, 1), LaunchError, "C on meta"),
        "launch: output stride 0": Row(lambda: k(a, torch.zeros(1, 20).expand(20, 20), 2.0, 1), LaunchError,
                                       "output C"),
        "launch: output strides (1, 1)": Row(lambda: k(a, torch.zeros(40).as_strided((20, 20), (1, 1)), 2.0, 1),
                                             LaunchError, "C"),
        "launch: unknown backend": Row(lambda: k(a, c, 2.0, 1, backend="cuda"), tilestack.errors.BackendError,
                                       "backend='cuda'"),
    }


def _trace(fn, *specs):
    return ts.kernel(fn, grid=lambda: (1,)).trace(*specs)


F32_2D = ts.ArgSpec(ts.f32, 2)


def _shape_mismatch(X):
    a, b = ts.RegTile[ts.f32, 16, 32](), ts.RegTile[ts.f32, 32, 16]()
    ts.zero(a)
    ts.zero(b)
    ts.add(a, a, b)


def _dtype_mismatch(X):
    a, b = ts.RegTile[ts.f32, 16, 16](), ts.RegTile[ts.f16, 16, 16]()
    ts.zero(a)
    ts.zero(b)
    ts.add(a, a, b)


def _exp_of_shared(X):
    a = ts.SharedTile[ts.f32, 16, 16]()
    ts.load(a, X, at=(0, 0))
    ts.exp(a, a)


def _mma_inner(X):
    acc, a, b = ts.RegTile[ts.f32, 16, 16](), ts.SharedTile[ts.f16, 16, 32](), ts.SharedTile[ts.f16, 16, 16]()
    ts.zero(acc)
    ts.mma_AB(acc, a, b, acc)


def _wrong_coordinates(X):
    a = ts.RegTile[ts.f32, 16, 16]()
    ts.load(a, X, at=(0,))


def _rank_axis(X):
    a = ts.RegTile[ts.f32, 16, 16]()
    for j in ts.range(ts.cdiv(X.shape[1], 16)):
        ts.load(a, X, at=(0, j))


def _python_if(X):
    if X.shape[0]:
        pass


def _python_compare(X):
    if X.shape[0] > 3:
        pass


def _trace_rows() -> dict[str, Row]:
    return {
        "trace: add of two shapes": Row(lambda: _trace(_shape_mismatch, F32_2D), TileShapeError, "(32, 16)"),
        "trace: add of two dtypes": Row(lambda: _trace(_dtype_mismatch, F32_2D), TileDTypeError, "f16"),
        "trace: exp of a shared tile": Row(lambda: _trace(_exp_of_shared, F32_2D), MemorySpaceError, "exp"),
        "trace: mma inner dims": Row(lambda: _trace(_mma_inner, F32_2D), TileShapeError, "mma_AB"),
        "trace: load coordinates": Row(lambda: _trace(_wrong_coordinates, F32_2D), TraceError, "at="),
        "trace: an axis the tensor lacks": Row(lambda: _trace(_rank_axis, ts.ArgSpec(ts.f32, 1)), TraceError,
                                               "X.shape[1]"),
        "trace: python if on a runtime size": Row(lambda: _trace(_python_if, F32_2D), TraceError, "`if`"),
        "trace: python comparison of a runtime size": Row(lambda: _trace(_python_compare, F32_2D), TraceError,
                                                          "X.shape[0]"),
        "trace: a tile op outside a kernel": Row(lambda: ts.zero(ts.RegTile[ts.f32, 16, 16]()), TraceError,
                                                 "inside a @ts.kernel"),
        "trace: tunable default outside its domain": Row(lambda: ts.tunable(3, (1, 2)), TunableError, "3"),
    }


ROWS: dict[str, Row] = {
    **_attention_rows("attention", tilestack.attention), **_attention_rows("attention_forward", attention_forward),
    **_forward_rows(), **_backward_rows(), **_gemm_rows(), **_softmax_rows(), **_norm_rows(), **_launch_rows(),
    **_trace_rows(),
}


# rows that fail today, each with the owner of the fix; strict, so a fix shows up as an unexpected pass
KNOWN_GAPS = {
}


@pytest.mark.parametrize("row", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[name]))
                                 if name in KNOWN_GAPS else name for name in ROWS])
def test_bad_input_is_refused_clearly(row):
    r = ROWS[row]
    with pytest.raises(Exception) as e:
        r.call()
    assert isinstance(e.value, r.error), f"{type(e.value).__name__} instead of {r.error.__name__}: {e.value}"
    assert r.fragment in str(e.value), f"{r.fragment!r} not in {str(e.value)!r}"


def test_the_table_covers_every_entry_point():
    prefixes = {name.split(":")[0] for name in ROWS}
    assert prefixes >= {"attention", "attention_forward", "attention_backward", "gemm", "softmax", "layer_norm",
                        "rms_norm", "tilestack.layer_norm", "tilestack.rms_norm", "launch", "trace"}
