"""The tilestack backend registers every tilestack custom op as an Inductor fallback before Inductor lowers a graph
(compile/backend.explicit_fallbacks): Inductor's implicit path formats the op's arguments for a log line, which took
minutes on the fp8-act GPT-2 prefill under torch 2.11."""

from __future__ import annotations

import torch
from torch._inductor.lowering import lowerings

import tilestack
import tilestack.compile as tc
from tilestack import config


def test_every_tilestack_op_is_a_fallback_after_an_inductor_compile():
    torch._dynamo.reset()
    x, w, b = torch.randn(6, 40), torch.randn(40), torch.randn(40)
    with config.override(backend="reference"), tc.policy.override(min_rows=0), torch.no_grad():
        got = tilestack.optimize(lambda x: torch.nn.functional.layer_norm(x, (40,), w, b))(x)
    torch._dynamo.reset()
    assert tc.last_report().swapped == {"norm": 1}
    torch.testing.assert_close(got, torch.nn.functional.layer_norm(x, (40,), w, b), rtol=1e-5, atol=1e-5)
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tilestack::")]
    assert "layer_norm_fwd" in names and "norm_fp8" in names
    missing = [n for n in names if getattr(torch.ops.tilestack, n).default not in lowerings]
    assert not missing, missing
