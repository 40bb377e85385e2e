"""tilestack.attention as a PyTorch op: forward and backward against F.scaled_dot_product_attention in
float64, the custom ops through torch.library.opcheck, torch.compile without a graph break, and the fake
implementations on meta and fake tensors. The op picks its backend from the knob, so both are run through
``config.override(backend=...)``."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import tilestack
import tilestack.torch  # noqa: F401 - registers the tilestack:: ops that opcheck looks up
from tilestack import config
from tilestack.errors import LaunchError

BACKENDS = ("reference", "triton")
DTYPES = (torch.bfloat16, torch.float16)
# o to ~1e-2 in bf16; gradients pass through bf16 P and dS, which Triton's interpreter truncates (one ulp)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_TOL = {("reference", torch.bfloat16): 1e-2, ("triton", torch.bfloat16): 2.5e-2,
            ("reference", torch.float16): 2e-3, ("triton", torch.float16): 2e-3}

# (B, H, Hkv, Nq, Nk, D, scale)
SHAPES = {
    "mha": (1, 2, 2, 24, 24, 16, None),
    "gqa-nq<nk": (2, 4, 2, 19, 37, 32, None),
    "mqa-nq>nk-scale": (1, 3, 1, 33, 20, 16, 0.3),
}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def randn(rng, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def make(rng, shape, dtype, requires_grad=True):
    B, H, Hkv, Nq, Nk, D, scale = shape
    q = randn(rng, (B, H, Nq, D), dtype).requires_grad_(requires_grad)
    k = randn(rng, (B, Hkv, Nk, D), dtype).requires_grad_(requires_grad)
    v = randn(rng, (B, Hkv, Nk, D), dtype).requires_grad_(requires_grad)
    return q, k, v, scale


def sdpa64(q, k, v, do, causal, scale):
    """F.scaled_dot_product_attention in float64 (K/V heads repeated for GQA): o and (dq, dk, dv)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q64, k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1),
                                       is_causal=causal, scale=scale)
    o.backward(do.double())
    return o.detach(), (q64.grad, k64.grad, v64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_op_matches_sdpa_float64(backend, dtype, causal, shape, rng):
    q, k, v, scale = make(rng, SHAPES[shape], dtype)
    do = randn(rng, tuple(q.shape), dtype)
    with config.override(backend=backend):
        o = tilestack.attention(q, k, v, causal=causal, scale=scale)
        o.backward(do)
    assert o.shape == q.shape and o.dtype == dtype and o.requires_grad
    o64, grads64 = sdpa64(q, k, v, do, causal, scale)
    assert rel(o, o64) <= TOL[dtype]
    for name, t, g64 in zip(("dq", "dk", "dv"), (q, k, v), grads64, strict=True):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, name
        assert rel(t.grad, g64) <= GRAD_TOL[backend, dtype], name


def test_only_inputs_that_need_grad_get_one(rng):
    q, k, v, _ = make(rng, SHAPES["gqa-nq<nk"], torch.bfloat16, requires_grad=False)
    q.requires_grad_()
    tilestack.attention(q, k, v, causal=True).float().sum().backward()
    assert q.grad is not None and bool(q.grad.isfinite().all())
    assert k.grad is None and v.grad is None


def test_lse_is_not_differentiable(rng):
    q, k, v, _ = make(rng, SHAPES["mha"], torch.float16)
    o, lse, _ = torch.ops.tilestack.attention_fwd(q, k, v, None, False, 0.25, "top_left")
    assert o.requires_grad and not lse.requires_grad and lse.dtype == torch.float32


# ---- torch.library.opcheck --------------------------------------------------------------------------------------
# opcheck's test_aot_dispatch_dynamic runs the forward and, the inputs requiring grad, the backward, eager and traced,
# each under Triton's interpreter, whose cost grows with the programs (B * H * query tiles): gqa-nq<nk's 16 programs
# cost ~100 s a test. This shape keeps what the opcheck needs (two batches, two query heads per K/V head, Nq < Nk so
# top_left and bottom_right differ, Nq and Nk ragged against every tile size) at 4 programs.
OPCHECK_SHAPE = (2, 2, 1, 9, 37, 32, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_opcheck_forward(backend, causal, rng):
    q, k, v, _ = make(rng, OPCHECK_SHAPE, torch.bfloat16)
    with config.override(backend=backend):
        torch.library.opcheck(torch.ops.tilestack.attention_fwd.default, (q, k, v, None, causal, 0.2, "top_left"))
        mask = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2]) > 0.3
        torch.library.opcheck(torch.ops.tilestack.attention_fwd.default,
                              (q, k, v, mask, False, 0.2, "top_left"))
        torch.library.opcheck(torch.ops.tilestack.attention_fwd.default, (q, k, v, None, causal, 0.2, "bottom_right"))
        # q as a projection's (B, N, H, D) output seen as (B, H, N, D): o keeps that layout, and the fake must too
        qt = q.transpose(1, 2).contiguous().transpose(1, 2)
        torch.library.opcheck(torch.ops.tilestack.attention_fwd.default, (qt, k, v, None, causal, 0.2, "top_left"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_opcheck_backward(backend, causal, rng):
    q, k, v, _ = make(rng, SHAPES["gqa-nq<nk"], torch.float16, requires_grad=False)
    o, lse, _ = torch.ops.tilestack.attention_fwd(q, k, v, None, causal, 0.2, "top_left")
    do = randn(rng, tuple(q.shape), torch.float16)
    with config.override(backend=backend):
        torch.library.opcheck(torch.ops.tilestack.attention_bwd.default,
                              (q, k, v, o, lse, do, None, causal, 0.2, "top_left"))


def test_opcheck_backward_gqa_split_per_query_head(rng, monkeypatch):
    """The backward's GQA path that runs dK/dV per query head (forced here; a GPU takes it for small grids) keeps
    the fake kernel's layouts, also for k and v seen from a (B, N, Hkv, D) projection."""
    import tilestack.kernels.attention_bwd as bwd
    monkeypatch.setattr(bwd, "DKDV_PROGRAMS_PER_SM", 10**9)
    bwd.attention_backward.plans.clear()
    q, k, v, _ = make(rng, SHAPES["gqa-nq<nk"], torch.float16, requires_grad=False)
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    o, lse, _ = torch.ops.tilestack.attention_fwd(q, k, v, None, True, 0.2, "top_left")
    do = randn(rng, tuple(q.shape), torch.float16)
    torch.library.opcheck(torch.ops.tilestack.attention_bwd.default, (q, k, v, o, lse, do, None, True, 0.2, "top_left"))
    bwd.attention_backward.plans.clear()


# ---- torch.compile --------------------------------------------------------------------------------------------
class Block(torch.nn.Module):
    """Projections around tilestack.attention (GQA: 4 query heads, 2 K/V heads of dim 16)."""

    def __init__(self, dim=64, heads=4, kv_heads=2, causal=True):
        super().__init__()
        self.heads, self.kv_heads, self.causal, self.hd = heads, kv_heads, causal, dim // heads
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = tilestack.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_compile_fullgraph_matches_eager(causal, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = Block(causal=causal).to(torch.bfloat16)
    x = randn(rng, (2, 21, 64), torch.bfloat16)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_out = model(xe)
    eager_out.float().square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()] + [xe.grad]
    model.zero_grad()
    compiled_out = compiled(xc)
    compiled_out.float().square().sum().backward()
    compiled_grads = [p.grad for p in model.parameters()] + [xc.grad]

    assert len(graphs) == 1, "graph break: more than one graph was compiled"
    assert "tilestack.attention_fwd" in str(graphs[0].graph), "the custom op is not in the compiled graph"
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    for g, ge in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-2, atol=1e-2)


# ---- fake and meta tensors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
def test_meta_tensors_through_the_fake_impl(shape):
    B, H, Hkv, Nq, Nk, D, scale = SHAPES[shape]
    q = torch.empty(B, H, Nq, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
    k = torch.empty(B, Hkv, Nk, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
    v = torch.empty(B, Hkv, Nk, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
    o = tilestack.attention(q, k, v, causal=True, scale=scale)
    assert o.device.type == "meta" and o.shape == (B, H, Nq, D) and o.dtype == torch.bfloat16
    o_, lse, _ = torch.ops.tilestack.attention_fwd(q, k, v, None, True, 0.5, "top_left")
    assert lse.device.type == "meta" and lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.tilestack.attention_bwd(q, k, v, o_, lse, torch.empty_like(q), None, True, 0.5,
                                                   "top_left")
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in (dq, dk, dv))
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_fake_tensor_mode_gives_shapes():
    with FakeTensorMode():
        q = torch.empty(2, 8, 40, 64, dtype=torch.float16)
        k = torch.empty(2, 2, 50, 64, dtype=torch.float16)
        v = torch.empty(2, 2, 50, 64, dtype=torch.float16)
        o, lse, _ = torch.ops.tilestack.attention_fwd(q, k, v, None, False, 0.125, "top_left")
        dq, dk, dv = torch.ops.tilestack.attention_bwd(q, k, v, o, lse, torch.empty_like(o), None, False,
                                                       0.125, "top_left")
        o2 = tilestack.attention(q, k, v)
    assert o.shape == o2.shape == (2, 8, 40, 64) and o.dtype == torch.float16
    assert lse.shape == (2, 8, 40) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == dv.shape == (2, 2, 50, 64)


def test_fake_path_still_checks_arguments():
    """Bad shapes are refused while tracing (meta tensors), not only when the kernel would run."""
    q = torch.empty(1, 3, 8, 16, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 2, 8, 16, dtype=torch.bfloat16, device="meta")
    with pytest.raises(LaunchError, match=r"attention: q has H=3 heads"):
        tilestack.attention(q, k, k)
    with pytest.raises(LaunchError, match=r"attention: scale must be a positive number"):
        tilestack.attention(k, k, k, scale=-1.0)
    with pytest.raises(LaunchError, match=r"attention: q has dtype float64"):
        tilestack.attention(k.double(), k.double(), k.double())
