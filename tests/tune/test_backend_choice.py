"""The backend as a tuned choice: tables name the backend per kernel, signature and size bucket; the library
functions launch on it at plan time unless a backend is named; one that cannot launch here gives way to the
default (logged once, never an error). On the CPU, with synthetic tables of a fake device and a backend of the
real registry (``Recorder``: the reference executor, recording what it prepares)."""

import json
import logging
import math

import pytest
import torch

from tilestack import backends, config
from tilestack.backends.reference import ReferenceBackend
from tilestack.errors import BackendError
from tilestack.kernels import attention_bwd as ab
from tilestack.kernels import attention_fwd as af
from tilestack.kernels.gemm import gemm, gemm_kernel
from tilestack.tune import ConfigCache, lookup
from tilestack.tune.devices import DeviceKey
from tilestack.tune.library import Problem, Workload
from tilestack.tune.session import Session, restrict_for

HOPPER = DeviceKey(9, 0, 7, 99, name="Fake Hopper")       # no shipped table has this key
AMPERE = DeviceKey(8, 0, 7, 99, name="Fake Ampere")
TRITON_CFG = dict(BM=32, BN=32, BK=32, GROUP_M=8)
GLUON_CFG = dict(BM=64, BN=64, BK=64, GROUP_M=8)


class Recorder(ReferenceBackend):
    """A registered backend that runs the reference executor and records the kernels it prepares; it refuses
    (as the gluon backend does, with a BackendError) the kernels named in ``refuse``."""
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.prepared: list[str] = []
        self.refuse: set[str] = set()

    def prepare(self, traced, args, options=None):
        self.source(traced)
        self.prepared.append(traced.name)
        return super().prepare(traced, args, options)

    def source(self, traced):
        if traced.name in self.refuse:
            raise BackendError(f"recorder: cannot lower {traced.name}")
        return super().source(traced)


@pytest.fixture
def tables(monkeypatch, tmp_path):
    """(a user ConfigCache in a temp dir that lookups read, the Recorder). Lookups resolve for ``HOPPER``
    whatever the tensors' device (``lookup._resolve`` is the only CUDA-only step: tested on its own below)."""
    rec = Recorder()
    monkeypatch.setitem(backends._REGISTRY, "recorder", lambda: rec)
    cache = ConfigCache(tmp_path / "cache", tables_dir=None)
    target = {"key": HOPPER}
    monkeypatch.setattr(lookup, "_resolve", lambda kernel, sig, device, n, backend=None:
                        lookup.resolve(kernel, sig, target["key"], n, backend=backend))
    for fn in (gemm, af.attention_forward, ab.attention_backward):
        fn.plans.clear()                      # plans made by earlier tests saw other tables
    lookup.reload()
    lookup._cache = cache
    cache.target = target
    yield cache, rec
    for fn in (gemm, af.attention_forward, ab.attention_backward):
        fn.plans.clear()
    lookup.reload()


def put(cache, kernel, sig, bucket, cfg, device=HOPPER, backend=None, others=None):
    evidence = {"seconds": 1e-3}
    if backend is not None:
        evidence["backend"] = backend
    if others is not None:
        evidence["others"] = others
    cache.put(kernel, sig, device, bucket, cfg, options={"num_warps": 4}, **evidence)


def test_launch_config_carries_the_tuned_backend_only_when_none_is_named(tables):
    cache, _ = tables
    put(cache, "gemm", "bfloat16", 4096, GLUON_CFG, backend="recorder",
        others={"triton": {"config": TRITON_CFG, "options": {"num_warps": 8}, "seconds": 2e-3}})
    put(cache, "gemm", "bfloat16", 1024, TRITON_CFG)                  # a format-3 entry: no backend named
    assert lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {}, None) == \
        GLUON_CFG | {"num_warps": 4, "backend": "recorder"}
    assert lookup.launch_config("gemm", "bfloat16", "cuda", 1024, {}, None) == TRITON_CFG | {"num_warps": 4}
    # named (or left out: the default backend, as callers from before backends were tuned): its own config
    for named in ({"backend": "triton"}, {}):
        assert lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {}, **named) == \
            TRITON_CFG | {"num_warps": 8}
    assert lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {}, "recorder") == GLUON_CFG | {"num_warps": 4}
    # the TILESTACK_BACKEND knob names one too
    with config.override(backend="triton"):
        assert lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {}, None) == TRITON_CFG | {"num_warps": 8}
    cfg = lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {}, None)
    assert lookup.take_backend(cfg, None) == "recorder" and "backend" not in cfg
    assert lookup.take_backend(dict(cfg, backend="recorder"), "reference") == "reference"


def test_a_table_naming_gluon_on_hopper_chooses_it(tmp_path):
    cache = ConfigCache(tmp_path, tables_dir=None)
    cache.put("gemm", "bfloat16", HOPPER, 4096, GLUON_CFG, options={"persistent": True}, backend="gluon")
    assert lookup.resolve("gemm", "bfloat16", HOPPER, 4096, cache=cache) == \
        GLUON_CFG | {"persistent": True, "backend": "gluon"}
    assert lookup.resolve("gemm", "bfloat16", HOPPER, 4096, cache=cache, backend="gluon") == \
        GLUON_CFG | {"persistent": True}


@pytest.mark.parametrize("missing", ["gluon", "no_such_backend"])
def test_a_backend_that_cannot_launch_here_falls_back_with_one_warning(tables, caplog, missing):
    """gluon on an sm_80 device, or a backend this install lacks: the entry's other backend's config, else
    the default, each logged once per device and backend, never an error."""
    cache, _ = tables
    cache.target["key"] = AMPERE
    put(cache, "gemm", "bfloat16", 4096, GLUON_CFG, device=AMPERE, backend=missing,
        others={"triton": {"config": TRITON_CFG, "options": {}, "seconds": 2e-3}})
    put(cache, "gemm", "bfloat16", 1024, GLUON_CFG, device=AMPERE, backend=missing)
    with caplog.at_level(logging.WARNING, logger="tilestack.tune.lookup"):
        assert lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {}, None) == TRITON_CFG
        assert lookup.launch_config("gemm", "bfloat16", "cuda", 1024, {"BM": 16}, None) == {"BM": 16}
        assert lookup.launch_config("gemm", "float16", "cuda", 4096, {}, None) == TRITON_CFG   # bf16's twin
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and repr(missing) in warnings[0] and str(AMPERE) in warnings[0], warnings
    if missing == "gluon":
        assert "sm_90a" in warnings[0] and "sm_80" in warnings[0]
    assert lookup.backend_refusal("gluon", HOPPER) is None and lookup.backend_refusal("triton", AMPERE) is None
    assert lookup.gpu_backends(AMPERE) == ("triton",) and lookup.gpu_backends(HOPPER)[0] == "triton"


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_gemm_plans_on_the_backend_the_table_names_per_bucket(tables):
    cache, rec = tables
    put(cache, "gemm", "bfloat16", 64, GLUON_CFG, backend="recorder")
    put(cache, "gemm", "bfloat16", 128, TRITON_CFG, backend="triton")
    a, b = bf16(48, 40), bf16(40, 56, seed=1)
    c = gemm(a, b)
    assert rec.prepared == ["gemm_kernel"]
    torch.testing.assert_close(c.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-2)
    gemm(a, b)                                  # planned: the backend is not chosen again
    assert rec.prepared == ["gemm_kernel"]
    a2, b2 = bf16(100, 72), bf16(72, 90, seed=1)
    c2 = gemm(a2, b2)                           # bucket 128: the default backend
    assert rec.prepared == ["gemm_kernel"]
    torch.testing.assert_close(c2.float(), a2.float() @ b2.float(), rtol=2e-2, atol=2e-2)
    gemm(a, b, backend="reference")             # named: it wins over the table
    assert rec.prepared == ["gemm_kernel"]


def test_a_tuned_backend_that_refuses_a_variant_gives_way_to_the_default(tables, caplog):
    """The fused-epilogue kernel, tuned only as the plain GEMM: a backend that cannot lower it falls back,
    logged once; a backend named by the caller raises its own error."""
    cache, rec = tables
    put(cache, "gemm", "bfloat16", 64, GLUON_CFG, backend="recorder")
    rec.refuse.add("gemm_epilogue_kernel")
    a, b, bias = bf16(48, 40), bf16(40, 56, seed=1), bf16(56, seed=2)
    with caplog.at_level(logging.WARNING, logger="tilestack.tune.lookup"):
        c = gemm(a, b, bias=bias, activation="relu")
        gemm(a, b, bias=bias, activation="relu", out_dtype=torch.float32)
    torch.testing.assert_close(c.float(), torch.relu(a.float() @ b.float() + bias.float()), rtol=2e-2, atol=2e-2)
    assert rec.prepared == [] and len(caplog.records) == 1
    assert "gemm_epilogue_kernel" in caplog.records[0].getMessage()
    with pytest.raises(BackendError, match="cannot lower gemm_epilogue_kernel"):
        gemm(a, b, bias=bias, backend="recorder")


def test_on_a_cpu_the_tables_are_not_read(tables, monkeypatch):
    cache, rec = tables
    put(cache, "gemm", "bfloat16", 64, GLUON_CFG, backend="recorder")
    monkeypatch.undo()                                       # the real _resolve: CPU tensors get the defaults
    monkeypatch.setitem(backends._REGISTRY, "recorder", lambda: rec)
    gemm.plans.clear()
    lookup.reload()
    lookup._cache = cache
    gemm(bf16(48, 40), bf16(40, 56))
    assert rec.prepared == []


def test_attention_forward_and_each_backward_kernel_take_their_own_entry(tables):
    cache, rec = tables
    B, H, N, D = 1, 2, 24, 16
    q, k, v, do = (bf16(B, H, N, D, seed=s) for s in range(4))
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), True)
    put(cache, "attention_fwd", sig, 32, {}, backend="recorder")
    put(cache, "attention_bwd_dkdv", sig, 32, {}, backend="recorder")    # dq and delta: not tuned
    o, lse = af.attention_forward(q, k, v, True)
    assert rec.prepared == ["attention_fwd_kernel"]
    dq, dk, dv = ab.attention_backward(q, k, v, o, lse, do, True)
    assert rec.prepared == ["attention_fwd_kernel", "attention_bwd_dkdv_kernel"]
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=1 / math.sqrt(D))
    torch.testing.assert_close(o.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    for got, want in zip((dq, dk, dv), torch.autograd.grad(ref, (qq, kk, vv), do.double()), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)
    # named: every kernel on it
    ab.attention_backward(q, k, v, o, lse, do, True, backend="reference")
    assert rec.prepared == ["attention_fwd_kernel", "attention_bwd_dkdv_kernel"]


# ---- the tuner searches the backend -------------------------------------------------------------------------------
RESTRICT = dict(BM=(32, 64, 128), BN=(32, 64), BK=(32,), GROUP_M=(8,), num_warps=(4,), num_stages=(1,))


def two_backend_problem(seconds, runs=None):
    """A gemm problem whose workload runs on any backend; ``seconds[(backend, BM)]`` times it (else 5 s);
    ``runs`` gets (backend, BM, BN) per launch."""
    a = torch.empty(64, 64, dtype=torch.bfloat16)
    args = (a, a, torch.empty_like(a))
    last = {}

    def workload(backend):
        def run(c):
            last["key"] = (backend, c["BM"])
            if runs is not None:
                runs.append((backend, c["BM"], c["BN"]))
        return Workload(args, run, lambda c: (run(c), 0.0)[1], workload)

    def timer(fn, rep_ms):
        fn()
        return seconds.get(last["key"], 5.0)
    p = Problem("gemm", "bfloat16", 4096, "fake", gemm_kernel, {}, RESTRICT,
                dict(BM=32, BN=32, BK=32, GROUP_M=8, num_warps=4, num_stages=1),
                lambda device: workload("triton"))
    return p, timer


@pytest.mark.parametrize("faster", ["recorder", "triton"])
def test_the_session_keeps_the_fastest_backend_and_the_others_best(tables, tmp_path, faster):
    cache, _ = tables
    slow = "triton" if faster == "recorder" else "recorder"
    p, timer = two_backend_problem({(faster, 64): 1.0, (faster, 32): 3.0, (slow, 32): 2.0, (slow, 64): 4.0})
    s = Session(HOPPER, budget_s=1e9, device_str="cpu", cache=cache, timer=timer, backends=("triton", "recorder"))
    out = s.run([p])[0]
    assert out.backend == faster and out.seconds == 1.0 and out.seconds_by_backend == {faster: 1.0, slow: 2.0}
    entry = cache.user[str(HOPPER)].entries["gemm|bfloat16|4096"]
    assert entry["backend"] == faster and entry["config"]["BM"] == 64
    assert entry["others"][slow]["config"]["BM"] == 32 and entry["others"][slow]["seconds"] == 2.0
    got = lookup.resolve("gemm", "bfloat16", HOPPER, 4096, cache=cache)
    assert got.get("backend") == (None if faster == "triton" else "recorder") and got["BM"] == 64
    assert lookup.resolve("gemm", "bfloat16", HOPPER, 4096, cache=cache, backend=slow)["BM"] == 32


def test_given_seeds_are_tried_early_on_their_backend_only(tables):
    cache, _ = tables
    runs = []
    p, timer = two_backend_problem({}, runs)
    s = Session(HOPPER, budget_s=1e9, device_str="cpu", cache=cache, timer=timer, backends=("triton", "recorder"),
                seeds={("gemm", "recorder"): [dict(BM=128, BN=64)]})
    s.run([p])
    first = {b: [(bm, bn) for r, bm, bn in runs if r == b][:4:2] for b in ("triton", "recorder")}   # check, time
    assert first["recorder"] == [(128, 64), (32, 32)] and first["triton"][0] == (32, 32)
    assert first["triton"][1] in ((32, 64), (64, 32))          # one tunable from the default: no seed


def test_the_session_skips_a_backend_that_cannot_run_a_problem(tables):
    """Not on this device, not installed, or unable to lower the kernel (judged before any config is timed)."""
    cache, rec = tables
    rec.refuse.add("gemm_kernel")
    p, timer = two_backend_problem({("triton", 32): 2.0, ("triton", 64): 1.0})
    s = Session(AMPERE, budget_s=1e9, device_str="cpu", cache=cache, timer=timer,
                backends=("triton", "gluon", "no_such_backend", "recorder"))
    out = s.run([p])[0]
    assert out.backend == "triton" and out.config["BM"] == 64 and out.seconds_by_backend == {"triton": 1.0}
    assert "gluon: the gluon backend generates sm_90a" in out.note and "no_such_backend" in out.note
    assert "recorder: cannot lower gemm_kernel: recorder: cannot lower gemm_kernel" in out.note
    assert Session(HOPPER, budget_s=1, device_str="cpu", cache=cache).backends == ("triton",)   # CPU: the default


def test_restrict_for_keeps_the_option_values_a_backend_accepts():
    from tilestack.kernels.softmax import softmax_kernel
    r = dict(BM=(1, 2), num_warps=(2, 4, 8), num_stages=(1, 2))
    assert restrict_for("triton", softmax_kernel, r) == r
    assert restrict_for("gluon", softmax_kernel, r) == dict(BM=(1, 2), num_warps=(4, 8), num_stages=(1, 2))
    assert restrict_for("reference", softmax_kernel, r) == dict(BM=(1, 2))


def test_cli_backends_option(tmp_path):
    """``tilestack tune --backends``: unknown names refused before any work; a backend that cannot launch on the
    device (gluon on sm_89) skipped with its reason, the others tuned."""
    from typer.testing import CliRunner

    from tilestack.cli import _register, app
    from tilestack.tune.cache import Table

    _register()
    runner = CliRunner()
    base = ["tune", "--small", "--as-device", "sm89-128sm-99kb", "-k", "gemm", "--dtype", "bfloat16", "--size", "48",
            "--budget-s", "3", "--report", str(tmp_path / "report.json")]
    res = runner.invoke(app, [*base, "--backends", "triton,nope"])
    text = " ".join(res.output.replace("│", "").split())
    assert res.exit_code == 2 and "--backends 'triton,nope'" in text, res.output
    with config.override(cache_dir=tmp_path / "cache"):
        res = runner.invoke(app, [*base, "--backends", "triton,gluon"])
    assert res.exit_code == 0, res.output
    [entry] = Table.read(tmp_path / "cache" / "tuned" / "sm89-128sm-99kb.json").entries.values()
    assert entry["backend"] == "triton" and "others" not in entry
    [row] = json.loads((tmp_path / "report.json").read_text())["problems"]
    assert row["backend"] == "triton" and "gluon: the gluon backend generates sm_90a" in row["note"]
    assert "triton" in row["ms_by_backend"] and "gluon" not in row["ms_by_backend"]


def test_kernels_whose_launch_path_ignores_the_choice_are_tuned_on_the_default_only(tables):
    cache, _ = tables
    p, timer = two_backend_problem({("triton", 64): 1.0, ("recorder", 64): 0.5})
    p.kernel = "softmax"          # its launch path reads the default backend's config
    out = Session(HOPPER, budget_s=1e9, device_str="cpu", cache=cache, timer=timer,
                  backends=("triton", "recorder")).run([p])[0]
    assert out.backend == "triton" and "recorder: softmax's launch path uses the default backend" in out.note
