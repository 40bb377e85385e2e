"""Unseen round 1 of tilestack.parallel, the rest: the ring all-reduce on 3 ranks over odd sizes and every common
dtype; checkpoints saved under one world size and resumed under another (f64: the resumed run must end where the
uninterrupted one does, to rounding); a save that dies keeps the previous checkpoint; bad configurations refused,
naming the argument, before any process starts."""

import re

import par_workers_unseen_round1 as W
import pytest
import torch
from typer.testing import CliRunner

from tilestack.parallel import ParallelConfig, ParallelConfigError, run_local

# ---- ring all-reduce ---------------------------------------------------------------------------------------------


def test_ring_all_reduce_odd_sizes_and_dtypes_on_three_ranks():
    """Sizes 0, 1, 2, 4, 7, 10, (3, 0), (5, 7), (2, 3, 5) in f64, f32, bf16, f16, int64, int32, uint8, int8 against
    dist.all_reduce; a parameter (a leaf requiring grad: failed in the ring's in-place add); then bad inputs, each
    refused on every rank before any message, the group still working after each."""
    per_rank = run_local(W.ring_cases, 3, timeout_s=300)
    assert per_rank[0] == per_rank[1] == per_rank[2]
    checked, said = per_rank[0]
    assert len(checked) == 8 * 9 + 1 and "leaf requiring grad" in checked
    strides, listed, zero_chunks, float_chunks = said
    assert "not contiguous" in strides, strides
    assert "tensor is list" in listed, listed
    assert "chunks=0" in zero_chunks and "chunks=1.5" in float_chunks, (zero_chunks, float_chunks)


# ---- checkpoints -------------------------------------------------------------------------------------------------

STEPS, CUT = 5, 2


def test_checkpoint_resumes_under_another_world_size(tmp_path):
    """Saved at step 2 under FSDP2 on 2 ranks; resumed under FSDP2 on 3 ranks (ragged shards: 50 vocabulary rows,
    36-wide matrices over 3): the resumed run's losses and final parameters are the uninterrupted run's
    (test_checkpoint.py resumes under other layouts of the same world size)."""
    path = str(tmp_path / "ckpt")
    saved = run_local(W.checkpoint_reshard, 2, (path, dict(dp_shard=2), STEPS, CUT), timeout_s=300)
    ref = W.reference("even", STEPS)
    for r in saved:
        torch.testing.assert_close(torch.tensor(r["cont"]), torch.tensor(ref["losses"][CUT:]), rtol=1e-10, atol=0)
    for r in run_local(W.checkpoint_resume, 3, (path, dict(dp_shard=3), STEPS), timeout_s=300):
        assert r["start"] == CUT, r["start"]
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(ref["losses"][CUT:]), rtol=1e-10, atol=0)
        assert set(r["params"]) == set(ref["params"])
        for name, p in r["params"].items():
            torch.testing.assert_close(p, ref["params"][name], rtol=1e-9, atol=1e-10)


def test_a_save_that_dies_keeps_the_previous_checkpoint_and_zero_is_refused(tmp_path):
    """A second save raising inside torch.distributed.checkpoint (nothing written, or everything written but not
    swapped in) leaves the first one loadable: the 2-step parameters, bit for bit (the written-but-not-swapped one
    with a warning). A save under ZeRO-1 is refused on every rank, naming zero, and writes nothing."""
    for rank, r in enumerate(run_local(W.interrupted_saves, 2, (str(tmp_path),), timeout_s=300)):
        for when in ("before", "after"):
            got = r[when]
            assert "disk full (simulated)" in got["died"], got
            assert got["start"] == 2 and got["same"], (when, got)
        if rank == 0:                    # (rank 0 settles the folder and says so)
            assert any("cut short" in w for w in r["after"]["warned"]), r["after"]["warned"]
        said, wrote = r["zero"]
        assert "zero=1" in said and "expected zero=0" in said, said
        assert not wrote


# ---- bad configurations, refused before any process ---------------------------------------------------------------


@pytest.mark.parametrize("kw, names", [
    (dict(dp=0), "dp=0"),
    (dict(tp=-2), "tp=-2"),
    (dict(pp=2, microbatches=0), "microbatches=0"),
    (dict(dp_shard=2.0), "dp_shard=2.0"),
    (dict(pp=True), "pp=True"),
    (dict(pp=2, pp_schedule="zero-bubble", microbatches=2), "pp_schedule='zero-bubble'"),
    (dict(pp=2, pp_schedule="1F1B", microbatches=2), "pp_schedule='1F1B'"),
    (dict(recompute="selectve"), "recompute='selectve'"),
    (dict(recompute="Full"), "recompute='Full'"),
    (dict(recompute=None), "recompute=None"),
    (dict(dp=2, dp_comm="tree"), "dp_comm='tree'"),
    (dict(dp=2, zero=3), "zero=3"),
    (dict(dp=2, zero=True), "zero=True"),
    (dict(dp=2, zero=1.0), "zero=1.0"),
    (dict(dp=2, zero=-1), "zero=-1"),
    (dict(tp=2, sp=3), "sp=3"),
    (dict(pp=2, microbatches=1), "microbatches=1"),
    (dict(pp=2, stages_per_rank=2, microbatches=2), "stages_per_rank=2"),
])
def test_bad_parallel_config_names_the_argument(kw, names):
    with pytest.raises(ParallelConfigError, match=re.escape(names)):
        ParallelConfig(**kw)


def test_unknown_config_field_is_named():
    with pytest.raises(TypeError, match="ddp"):
        ParallelConfig(ddp=2)


@pytest.mark.parametrize("pc, kw, names", [
    (dict(dp=2, tp=2), dict(world_size=2), "expected the world size 2"),
    (dict(dp=2), dict(world_size=3), "= 2; expected the world size 3"),
    (dict(pp=2, microbatches=2), dict(world_size=2, model=W.ODD), "n_layer=3"),           # 3 layers, 2 stages
    (dict(tp=2), dict(world_size=2, model=W.ODD), "vocab=37"),
    (dict(tp=3), dict(world_size=3, model=W.EVEN), "vocab=50"),
    (dict(dp=2), dict(world_size=2, batch=7), "batch=7"),
    (dict(dp=3), dict(world_size=3, batch=4), "batch=4"),
    (dict(pp=2, microbatches=8, pp_schedule="gpipe"), dict(world_size=2, batch=4), "microbatches=8"),
    (dict(dp=2, pp=2, microbatches=4), dict(world_size=4, batch=4), "microbatches=4"),
    (dict(tp=2, sp=2), dict(world_size=2, seq=7), "seq=7"),
    (dict(), dict(world_size=1, batch=0), "batch=0"),
    (dict(), dict(world_size=1, batch=-4), "batch=-4"),
    (dict(dp=2), dict(world_size=2, batch=-4), "batch=-4"),
    (dict(), dict(world_size=1, seq=0), "seq=0"),
    (dict(), dict(world_size=1, batch=2.0), "batch=2.0"),
    (dict(), dict(world_size=0), "world_size=0"),
    (dict(), dict(world_size=True), "world_size=True"),
])
def test_validate_names_the_argument(pc, kw, names):
    with pytest.raises(ParallelConfigError, match=re.escape(names)):
        ParallelConfig(**pc).validate(**kw)


def _said(res, text: str) -> bool:
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


@pytest.mark.parametrize("argv, names", [
    (["--nproc", "3", "--dp", "2"], "expected the world size 3"),
    (["--nproc", "2", "--pp", "2", "--microbatches", "16", "--batch", "8", "--schedule", "gpipe"], "microbatches=16"),
    (["--nproc", "2", "--recompute", "selectiv"], "--recompute"),
    (["--nproc", "2", "--pp", "2", "--schedule", "zb-v", "--microbatches", "2"], "--schedule"),
    (["--nproc", "2", "--dp", "2", "--zero", "3"], "--zero"),
    (["--nproc", "2", "--dp", "2", "--dp-comm", "butterfly"], "--dp-comm"),
    (["--nproc", "2", "--dp", "2", "--batch", "5"], "batch=5"),
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "2", "--dp", "0"], "--dp"),
    (["--nproc", "3", "--pp", "3", "--microbatches", "3"], "n_layer=4"),
    (["--nproc", "2", "--dp", "2", "--sp"], "--tp 1"),
])
def test_cli_train_refuses_before_spawning(argv, names, monkeypatch):
    """Every refusal comes before a process starts: run_local is replaced by one that fails the test."""
    import tilestack.parallel as par
    from tilestack.cli import _register, app
    _register()

    def no_spawn(*a, **k):
        raise AssertionError("a process was started")
    monkeypatch.setattr(par, "run_local", no_spawn)
    res = CliRunner().invoke(app, ["train", "--no-store", *argv])
    assert res.exit_code != 0
    assert _said(res, names) or names in str(res.exception), (res.output, res.exception)
    assert "a process was started" not in str(res.exception)



# ---- the parameter server ----------------------------------------------------------------------------------------


def test_parameter_server_refuses_bad_arguments_before_ray_starts():
    from tilestack.parallel.ps import ParameterServer
    cases = [(dict(batches=W.mixer_batch_8, n_workers=3), "n_workers=3"),      # 8 rows over 3 workers
             (dict(batches=W.mixer_batch, n_workers=10), "n_workers=10"),      # more workers than rows
             (dict(batches=W.mixer_batch, lr=float("nan")), "lr=nan"),
             (dict(batches=W.mixer_batch, lr=-0.1), "lr=-0.1"),
             (dict(batches=W.mixer_batch, n_workers=True), "n_workers=True"),
             (dict(batches=W.mixer_batch, staleness=1.5), "staleness=1.5"),
             (dict(batches=[1, 2]), "batches is list")]
    for kw, names in cases:
        kw = dict(dict(model_fn=W.TinyMixer, loss_fn=W.mixer_loss, n_workers=3), **kw)
        with pytest.raises(ParallelConfigError, match=re.escape(names)):
            ParameterServer(**kw)


@pytest.mark.slow
def test_parameter_server_sync_trains_a_mixer_like_sgd():
    """3 workers, 4 servers over a 204-element model that splits unevenly, one parameter frozen, f64: the sync
    parameter server is SGD on the whole batch (1e-12), the frozen parameter untouched."""
    import os
    import pathlib

    ray = pytest.importorskip("ray")
    from tilestack.parallel.ps import ParameterServer
    here = str(pathlib.Path(__file__).parent)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    try:
        ps = ParameterServer(W.TinyMixer, W.mixer_batch, n_workers=3, n_servers=4, lr=0.2, mode="sync",
                             loss_fn=W.mixer_loss)
        try:
            losses = ps.train(4)
            state = ps.state_dict()
            with pytest.raises(ParallelConfigError, match="steps=-1"):
                ps.train(-1)
        finally:
            ps.shutdown()
    finally:
        if started:
            ray.shutdown()
    ref_losses, ref_params = W.mixer_sgd(4, 0.2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)
    assert "token.bias" not in state
    for name, p in state.items():
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, ref_params[name], rtol=1e-12, atol=1e-13)
    assert not torch.equal(ref_params["head.weight"], W.TinyMixer().head.weight)


# ---- run_local's arguments ---------------------------------------------------------------------------------------


def _nested_holder():
    def inner(rank, world_size):
        return rank
    return inner


@pytest.mark.parametrize("fn, kw, names", [
    (lambda rank, world_size: rank, {}, "<lambda>"),
    (_nested_holder(), {}, "inner"),
    ("W.ring_cases", {}, "fn is str"),
    (W.ring_cases, dict(args="abc"), "args is str"),
    (W.ring_cases, dict(args={"a": 1}), "args is dict"),
    (W.ring_cases, dict(timeout_s=0), "timeout_s=0"),
    (W.ring_cases, dict(timeout_s=float("nan")), "timeout_s=nan"),
    (W.ring_cases, dict(retries=True), "retries=True"),
])
def test_run_local_refuses_what_the_ranks_would_fail_on(fn, kw, names, monkeypatch):
    """Refused before any process starts (a process start fails the test)."""
    import torch.multiprocessing as mp

    from tilestack.errors import LaunchError

    def no_context(*a, **k):
        raise AssertionError("a process was started")
    monkeypatch.setattr(mp, "get_context", no_context)
    with pytest.raises(LaunchError, match=re.escape(names)):
        run_local(fn, 2, **kw)
