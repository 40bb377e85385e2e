"""A table entry's kernel as a tuned choice: ``Problem.variants`` (the ping-pong attention forward beside the plain
one) are searched on their backends beside the problem, the entry keeps the faster with its ``"schedule"``, and
``attention_forward`` launches what the entry names: the ping-pong kernel, or the plain one at the launch path's
default where a launch cannot take the ping-pong (a mask). On the CPU, with synthetic timings and the
``Recorder`` backend of tests/tune/test_backend_choice.py (the reference executor, recording what it prepares)."""

import dataclasses
import math

import pytest
import test_backend_choice as choice
import torch

from tilestack.kernels import attention_fwd as af
from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel
from tilestack.tune import lookup
from tilestack.tune.library import ATTN_FWD_PINGPONG, PINGPONG_BACKENDS, Problem, Workload, attention_fwd_problems
from tilestack.tune.session import Session

HOPPER, put = choice.HOPPER, choice.put
tables = choice.tables          # the fixture: a user table that lookups read, and the Recorder backend

B, H, N, D = 1, 2, 32, 16
KERNELS = (af.attention_fwd_kernel, af.attention_fwd_bias_kernel, attention_fwd_pingpong_kernel)


@pytest.fixture(autouse=True)
def fresh_launchers():
    """A kernel keeps its launchers by backend name: each test's Recorder must see its own prepares."""
    for k in KERNELS:
        k._launchers.clear()
    yield
    for k in KERNELS:
        k._launchers.clear()


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def attention_problem(seconds: dict, runs: list | None = None) -> Problem:
    """A plain attention_fwd problem with a ping-pong variant on the recorder backend. ``seconds[(backend,
    kernel, BN)]`` times a config (else 5 s); ``runs`` gets (backend, kernel, cfg) per launch. Nothing is
    launched: the search only needs the tile kernels and argument types to build its space."""
    q = bf16(B, H, N, D, seed=0)
    args = (q, q, q, torch.empty_like(q), torch.empty(B, H, N), 0.25)
    last = {}

    def workload(tile, backend="triton"):
        def run(cfg):
            last["key"] = (backend, tile.name, cfg["BN"])
            if runs is not None:
                runs.append((backend, tile.name, dict(cfg)))
        return Workload(args, run, lambda cfg: (run(cfg), 0.0)[1], lambda b: workload(tile, b))

    def timer(fn, rep_ms):
        fn()
        return seconds.get(last["key"], 5.0)

    plain = Problem("attention_fwd", "bfloat16-D16", N, "tiny", af.attention_fwd_kernel, dict(D=D, causal=False),
                    dict(BM=(16, 32), BN=(16, 32), num_warps=(4,), num_stages=(1,)),
                    dict(BM=16, BN=16, num_warps=4, num_stages=1), lambda device: workload(af.attention_fwd_kernel))
    plain.variants = (dataclasses.replace(
        plain, tile=attention_fwd_pingpong_kernel, restrict=dict(BM=(32,), BN=(16, 32), STAGES=(2,)),
        default=dict(BM=32, BN=16, STAGES=2), make=lambda device: workload(attention_fwd_pingpong_kernel),
        schedule="pingpong", backends=("recorder",)),)
    plain.timer = timer
    return plain


def session(cache, p):
    return Session(HOPPER, budget_s=1e9, device_str="cpu", cache=cache, timer=p.timer,
                   backends=("triton", "recorder"))


def test_a_faster_variant_is_written_with_its_schedule_and_the_others_keep_their_best(tables):
    cache, _ = tables
    runs = []
    p = attention_problem({("recorder", "attention_fwd_pingpong_kernel", 32): 1.0,
                           ("recorder", "attention_fwd_kernel", 32): 2.0,
                           ("triton", "attention_fwd_kernel", 16): 3.0}, runs)
    out = session(cache, p).run([p])[0]
    assert out.backend == "recorder" and out.seconds == 1.0
    assert out.config["schedule"] == "pingpong" and out.config["BN"] == 32 and out.config["STAGES"] == 2
    assert out.seconds_by_backend == {"recorder": 1.0, "triton": 3.0}
    # the variant ran on its backend only, with its own tunables (STAGES), never the plain kernel's options
    assert {(b, k) for b, k, _ in runs} == {("triton", "attention_fwd_kernel"), ("recorder", "attention_fwd_kernel"),
                                            ("recorder", "attention_fwd_pingpong_kernel")}
    assert all("STAGES" in c and "num_warps" not in c for b, k, c in runs if k == "attention_fwd_pingpong_kernel")
    entry = cache.user[str(HOPPER)].entries[f"attention_fwd|bfloat16-D16|{N}"]
    assert entry["backend"] == "recorder" and entry["config"] == dict(BM=32, BN=32, STAGES=2, schedule="pingpong")
    assert entry["others"]["triton"]["config"] == dict(BM=16, BN=16) and entry["others"]["triton"]["seconds"] == 3.0
    got = lookup.resolve("attention_fwd", "bfloat16-D16", HOPPER, N, cache=cache)
    assert got["backend"] == "recorder" and got["schedule"] == "pingpong"
    assert "schedule" not in lookup.resolve("attention_fwd", "bfloat16-D16", HOPPER, N, cache=cache,
                                            backend="triton")


def test_a_slower_variant_leaves_the_plain_kernel_and_no_schedule(tables):
    cache, _ = tables
    p = attention_problem({("recorder", "attention_fwd_pingpong_kernel", 32): 2.5,
                           ("recorder", "attention_fwd_kernel", 32): 2.0,
                           ("triton", "attention_fwd_kernel", 16): 3.0})
    out = session(cache, p).run([p])[0]
    assert out.backend == "recorder" and out.seconds == 2.0 and "schedule" not in out.config
    entry = cache.user[str(HOPPER)].entries[f"attention_fwd|bfloat16-D16|{N}"]
    assert "schedule" not in entry["config"] and "schedule" not in entry["others"]["triton"]["config"]


def test_the_variant_in_use_is_timed_as_the_before(tables):
    """A table that already names the ping-pong kernel: the run's "before" is that config, timed on its kernel."""
    cache, _ = tables
    put(cache, "attention_fwd", "bfloat16-D16", N, dict(BM=32, BN=16, STAGES=2, schedule="pingpong"),
        backend="recorder")
    p = attention_problem({("recorder", "attention_fwd_pingpong_kernel", 16): 4.0,
                           ("recorder", "attention_fwd_pingpong_kernel", 32): 1.0})
    out = session(cache, p).run([p])[0]
    assert out.before == dict(BM=32, BN=16, STAGES=2, schedule="pingpong") and out.before_seconds == 4.0
    assert out.speedup == 4.0


def test_the_library_offers_the_ping_pong_on_gluon_for_head_dims_up_to_128():
    problems = attention_fwd_problems("bfloat16")
    for p in problems:
        if p.fixed["D"] > 128:
            assert p.variants == ()
            continue
        (v,) = p.variants
        assert v.schedule == "pingpong" and v.backends == PINGPONG_BACKENDS == ("gluon",)
        assert v.tile is attention_fwd_pingpong_kernel and v.restrict == ATTN_FWD_PINGPONG
        assert (v.kernel, v.signature, v.n, v.fixed) == (p.kernel, p.signature, p.n, p.fixed)
        assert v.search_name == "attention_fwd:pingpong" and p.search_name == "attention_fwd"
    small = attention_fwd_problems("bfloat16", small=True)
    assert all(v.default == {} and v.restrict["BM"] == (32,) for p in small for v in p.variants)


def test_attention_forward_launches_the_kernel_the_table_names(tables, monkeypatch):
    cache, rec = tables
    q, k, v = (bf16(B, H, N, D, seed=s) for s in range(3))
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), False)
    put(cache, "attention_fwd", sig, N, dict(BM=32, BN=16, STAGES=2, schedule="pingpong"), backend="recorder",
        others={"triton": {"config": dict(BM=16, BN=16), "options": {"num_warps": 4}, "seconds": 2e-3}})
    o, lse = af.attention_forward(q, k, v)
    assert rec.prepared == ["attention_fwd_pingpong_kernel"]
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)
    # a mask: the ping-pong kernel takes none, so the plain biased kernel runs, at the entry's best of the default
    # backend ("others": the entry's STAGES is not one of the plain kernel's constants), on that backend
    mask = torch.zeros(N, N).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(5), -math.inf)
    seen = []
    real = af.attention_fwd_bias_kernel.launcher_for
    monkeypatch.setattr(af.attention_fwd_bias_kernel, "launcher_for",
                        lambda *a, **kw: (seen.append((a[1], kw["BN"])), real(*a, **kw))[1])
    o, _ = af.attention_forward(q, k, v, attn_mask=mask)
    af.attention_forward.plans.clear()
    af.attention_forward(q, k, v, attn_mask=mask, backend="recorder")     # named: its own default config
    assert seen == [(None, 16), ("recorder", af.default_config(D, False, "cpu", q.dtype)["BN"])]
    assert rec.prepared == ["attention_fwd_pingpong_kernel", "attention_fwd_bias_kernel"]
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=mask.double())
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)
    # named: the caller's schedule wins over the table's (the plain kernel, on the default backend)
    o, _ = af.attention_forward(q, k, v, schedule="plain")
    assert rec.prepared == ["attention_fwd_pingpong_kernel", "attention_fwd_bias_kernel"]
    torch.testing.assert_close(o.double(), torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double()), rtol=2e-2, atol=2e-2)


def test_a_table_schedule_that_cannot_launch_gives_way(tables, caplog):
    """The ping-pong launcher refused by the table's backend (one that cannot lower it): from the table, the
    plain kernel runs on the default backend; the schedule named by the caller runs the ping-pong kernel on the
    default backend (as any tuned kernel whose backend refuses it); named with that backend too, the refusal is
    raised."""
    from tilestack.errors import BackendError
    cache, rec = tables
    rec.refuse.add("attention_fwd_pingpong_kernel")
    q, k, v = (bf16(B, H, N, D, seed=s) for s in range(3))
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), False)
    put(cache, "attention_fwd", sig, N, dict(BM=32, BN=16, STAGES=2, schedule="pingpong"), backend="recorder")
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    o, _ = af.attention_forward(q, k, v)        # the plain kernel, on the default backend (no entry of its own)
    assert rec.prepared == []
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)
    o, _ = af.attention_forward(q, k, v, schedule="pingpong")
    assert rec.prepared == []          # not on the recorder: on Triton's backend
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(BackendError, match="cannot lower attention_fwd_pingpong_kernel"):
        af.attention_forward(q, k, v, schedule="pingpong", backend="recorder")


def test_a_named_schedule_takes_its_own_defaults_not_the_plain_entry(tables, monkeypatch):
    """A table tuned for the plain kernel (BN 16 here) says nothing about the ping-pong one: named by the caller,
    it launches at PINGPONG_DEFAULTS under the caller's own keys; a table that chose it gives its own config."""
    from tilestack.kernels import attention_fwd_pingpong as module
    cache, _ = tables
    seen = []
    real = module.attention_fwd_pingpong_kernel.launcher_for
    monkeypatch.setattr(module.attention_fwd_pingpong_kernel, "launcher_for",
                        lambda *a, **kw: (seen.append({k: kw[k] for k in ("BM", "BN", "STAGES")}), real(*a, **kw))[1])
    q, k, v = (bf16(B, H, N, D, seed=s) for s in range(3))
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), False)
    put(cache, "attention_fwd", sig, N, dict(BM=16, BN=16), backend="recorder")
    af.attention_forward(q, k, v, schedule="pingpong")
    af.attention_forward(q, k, v, schedule="pingpong", BN=32)
    assert seen == [module.PINGPONG_DEFAULTS, dict(module.PINGPONG_DEFAULTS, BN=32)]
    af.attention_forward.plans.clear()
    put(cache, "attention_fwd", sig, N, dict(BM=32, BN=16, STAGES=3, schedule="pingpong"), backend="recorder")
    lookup.reload()
    lookup._cache = cache           # (the fixture's table, as it set it)
    af.attention_forward(q, k, v)
    assert seen[-1] == dict(BM=32, BN=16, STAGES=3)
