"""The differentiable ``tilestack::*`` ops a compiled graph calls, registered through ``torch.library.Library``
(``tilestack.torch._library.autograd_op``) rather than ``torch.library.custom_op``, whose Python layers cost a
compiled graph microseconds per call (docs/inference.md, session 14): torch's own checks of each op, the paths of
its Autograd kernel (direct for plain tensors, below autograd for fake ones), and a training step through a
compiled graph giving eager's gradients. On the CPU, kernels through the reference executor at tiny sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses import FakeTensorMode

import tilestack
import tilestack.compile as tc
from tilestack import config
from tilestack.compile import ops as compile_ops
from tilestack.errors import LaunchError
from tilestack.kernels import rotary_tables
from tilestack.torch import _library

DIFFERENTIABLE = ("attention_fwd", "layer_norm_fwd", "add_layer_norm_fwd", "rms_norm_fwd", "add_rms_norm_fwd",
                  "rotary", "swiglu_fwd", "fused_linear_cross_entropy", "softmax")
BACKWARD = ("attention_bwd", "layer_norm_bwd", "rms_norm_bwd", "swiglu_bwd")


@pytest.fixture(autouse=True)
def _reference():
    torch._dynamo.reset()
    with config.override(backend="reference"), tc.policy.override(min_rows=0, min_query_rows=0):
        yield
    torch._dynamo.reset()


def _r(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _opchecks() -> dict:
    """name -> (op, args): small CPU inputs; the forward ops' float inputs require grad (opcheck then checks the
    autograd registration), the backward ops' do not (their gradients are refused, not computed)."""
    t = torch.ops.tilestack
    q, k, v = _r(1, 2, 5, 16), _r(1, 1, 7, 16, seed=1), _r(1, 1, 7, 16, seed=2)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    with torch.no_grad():
        o, lse, _ = t.attention_fwd(qd, kd, vd, None, True, 0.25, "bottom_right")
        _, mean, rstd = t.layer_norm_fwd(_r(3, 32, grad=False), _r(32, grad=False), _r(32, grad=False), 1e-5)
    cos, sin = rotary_tables(3, 16)
    return {
        "attention_fwd": (t.attention_fwd.default, (q, k, v, None, True, 0.25, "bottom_right")),
        "attention_fwd_mask": (t.attention_fwd.default, (q, k, v, torch.rand(1, 1, 5, 7) > 0.3, False, 0.25,
                                                          "top_left")),
        "attention_bwd": (t.attention_bwd.default, (qd, kd, vd, o, lse, _r(1, 2, 5, 16, grad=False), None, True,
                                                    0.25, "bottom_right")),
        "layer_norm_fwd": (t.layer_norm_fwd.default, (_r(3, 4, 32), _r(32), _r(32, seed=1), 1e-5)),
        "add_layer_norm_fwd": (t.add_layer_norm_fwd.default, (_r(3, 4, 32), _r(3, 4, 32, seed=1), _r(32),
                                                              _r(32, seed=1), 1e-5)),
        "layer_norm_bwd": (t.layer_norm_bwd.default, (_r(3, 32, grad=False), _r(3, 32, grad=False),
                                                      _r(32, grad=False), mean, rstd, _r(3, 32, grad=False))),
        "rms_norm_fwd": (t.rms_norm_fwd.default, (_r(3, 4, 32), _r(32), 1e-6)),
        "add_rms_norm_fwd": (t.add_rms_norm_fwd.default, (_r(3, 4, 32), _r(3, 4, 32, seed=1), _r(32), 1e-6)),
        "rms_norm_bwd": (t.rms_norm_bwd.default, (_r(3, 32, grad=False), _r(3, 32, grad=False),
                                                  _r(32, grad=False), rstd, None)),
        "rotary": (t.rotary.default, (_r(1, 3, 2, 16), _r(1, 3, 1, 16), cos, sin, False)),
        "swiglu_fwd": (t.swiglu_fwd.default, (_r(3, 4, 32),)),
        "swiglu_bwd": (t.swiglu_bwd.default, (_r(3, 4, 16, grad=False), _r(3, 4, 32, grad=False))),
        "fused_linear_cross_entropy": (t.fused_linear_cross_entropy.default,
                                       (_r(6, 16), _r(21, 16), torch.tensor([0, 5, -100, 20, 3, 3]), -100)),
        "softmax": (t.softmax.default, (_r(2, 3, 33),)),
    }


OPCHECKS = ("attention_fwd", "attention_fwd_mask", "attention_bwd", "layer_norm_fwd", "add_layer_norm_fwd",
            "layer_norm_bwd", "rms_norm_fwd", "add_rms_norm_fwd", "rms_norm_bwd", "rotary", "swiglu_fwd", "swiglu_bwd",
            "fused_linear_cross_entropy", "softmax")


def test_every_op_has_an_opcheck_case():
    assert set(_opchecks()) == set(OPCHECKS) and set(DIFFERENTIABLE + BACKWARD) <= set(OPCHECKS)


@pytest.mark.parametrize("name", OPCHECKS)
def test_opcheck(name):
    """torch's schema, fake-tensor, autograd-registration and AOT-dispatch checks of each op."""
    op, args = _opchecks()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", DIFFERENTIABLE + BACKWARD)
def test_the_op_is_a_library_op_with_its_own_autograd_kernel(name):
    """No custom_op wrapper on the call path (a custom_op registers its own Autograd kernel and backend wrapper):
    the op is not in custom_op's registry, and its Autograd and CompositeExplicitAutograd kernels are tilestack's."""
    op = getattr(torch.ops.tilestack, name).default
    assert not _library.is_custom_op(op), f"{name} is still a torch.library.custom_op"
    qualname = f"tilestack::{name}"
    for key in ("Autograd", "CompositeExplicitAutograd", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (name, key)
    assert torch.Tag.pt2_compliant_tag in op.tags
    dump = torch._C._dispatch_dump(qualname)          # where each kernel was registered
    assert "tilestack/torch/_library.py" in dump and "custom_ops.py" not in dump, dump


def test_the_compile_ops_softmax_is_the_registered_op():
    assert compile_ops.softmax_op is torch.ops.tilestack.softmax.default


def test_direct_path_gives_the_kernel_below_autograds_values():
    """Under no_grad a plain CPU tensor takes the function directly; the same call redispatched to the CPU kernel
    (what a fake or functional tensor's path reaches) gives the same values."""
    op, args = _opchecks()["add_layer_norm_fwd"]
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        direct = op(*args)
        below = op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
    for a, b in zip(direct, below, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fake_and_meta_tensors_take_the_fake_kernel():
    with FakeTensorMode():
        q = torch.empty(2, 4, 9, 16, dtype=torch.bfloat16)
        kv = torch.empty(2, 2, 11, 16, dtype=torch.bfloat16)
        o, lse, _ = torch.ops.tilestack.attention_fwd(q, kv, kv, None, False, 0.25, "top_left")
        y, mean, rstd = torch.ops.tilestack.layer_norm_fwd(torch.empty(3, 5, 8), torch.empty(8), torch.empty(8), 1e-5)
    assert o.shape == q.shape and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert y.shape == (3, 5, 8) and mean.shape == rstd.shape == (15,)
    x = torch.empty(4, 6, device="meta", requires_grad=True)
    s = torch.ops.tilestack.softmax(x)
    assert s.device.type == "meta" and s.shape == (4, 6) and s.requires_grad


def test_defaults_left_out_reach_the_backward():
    """The dispatcher drops trailing arguments equal to their defaults (dropout_p, rng, precision): the backward
    still gets them, and gives SDPA's gradients."""
    q, k, v = _r(1, 2, 6, 16), _r(1, 2, 6, 16, seed=1), _r(1, 2, 6, 16, seed=2)
    o, *_ = torch.ops.tilestack.attention_fwd(q, k, v, None, True, 0.25, "top_left")
    got = torch.autograd.grad(o.square().sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=0.25).square().sum(),
                               (qd, kd, vd))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,fwd", [("layer_norm", "layer_norm_fwd"), ("attention", "attention_fwd")])
def test_double_backward_through_the_op_is_refused_by_name(name, fwd):
    op, args = _opchecks()[fwd]
    y = op(*args)[0]
    first = torch.autograd.grad((y * y).sum(), args[0], create_graph=True)[0]
    with pytest.raises(LaunchError, match=f"{name}: double backward is not supported"):
        first.square().sum().backward()


class Block(nn.Module):
    """What the backend's passes swap in training graphs: a layer norm, attention through SDPA, a softmax, an add +
    RMS norm, and the LM head's cross-entropy."""

    def __init__(self, d: int = 32, heads: int = 2, vocab: int = 37):
        super().__init__()
        self.heads = heads
        self.ln, self.rms = nn.LayerNorm(d), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.proj, self.gate = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x, labels):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        a = a * torch.softmax(self.gate(a), dim=-1)
        h = self.rms(x + self.proj(a))
        return F.cross_entropy(self.head(h.view(b * n, d)), labels.view(-1))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_training_through_a_compiled_graph_gives_eagers_gradients(inner):
    """Forward and backward through the compiled graph: every op above swapped, no graph break, and the loss and
    every gradient (parameters and input) as eager's in float32."""
    torch.manual_seed(0)
    model = Block()
    x, labels = torch.randn(2, 8, 32), torch.randint(0, 37, (2, 8))
    explained = torch._dynamo.explain(model)(x, labels)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()

    xe = x.clone().requires_grad_()
    loss = model(xe, labels)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()} | {"x": xe.grad}
    model.zero_grad()

    xc = x.clone().requires_grad_()
    compiled = tilestack.optimize(model, inner=inner, fullgraph=True)
    loss_c = compiled(xc, labels)
    loss_c.backward()
    report = tc.last_report()
    assert report.swapped == {"norm": 1, "sdpa": 1, "softmax": 1, "add_norm": 1, "linear_cross_entropy": 1}, \
        str(report)
    got = {n: p.grad for n, p in model.named_parameters()} | {"x": xc.grad}
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5, msg=n)
