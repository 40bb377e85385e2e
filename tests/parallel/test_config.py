"""ParallelConfig's checks: every bad degree is refused before any process group exists, naming the argument."""

import pytest

from tilestack.errors import TilestackError
from tilestack.parallel import TINY, ModelConfig, ParallelConfig, ParallelConfigError


def test_defaults_are_one_process():
    pc = ParallelConfig()
    assert pc.world_size == 1 and pc.dp_total == 1 and pc.n_stages == 1
    assert pc.validate(1, model=TINY, batch=3, seq=7) is pc


def test_degrees_multiply_to_the_world_size():
    pc = ParallelConfig(pp=2, dp=2, dp_shard=2, tp=2, sp=2, microbatches=2)
    assert pc.world_size == 16 and pc.dp_total == 4
    pc.validate(16)
    with pytest.raises(ParallelConfigError, match=r"pp\*dp\*dp_shard\*tp = 2\*2\*2\*2 = 16; expected the world size 8"):
        pc.validate(8)


@pytest.mark.parametrize("kw, match", [
    (dict(dp=0), r"dp=0; expected a positive int"),
    (dict(tp=2.0), r"tp=2.0; expected a positive int"),
    (dict(pp=True), r"pp=True; expected a positive int"),
    (dict(tp=4, sp=2), r"sp=2 with tp=4; expected sp=1 \(off\) or sp=tp"),
    (dict(pp_schedule="zb"), r"pp_schedule='zb'; expected one of"),
    (dict(recompute="some"), r"recompute='some'; expected one of"),
    (dict(zero=3, dp=2), r"zero=3; expected one of \(0, 1, 2\) \(ZeRO-3 is dp_shard > 1: FSDP2\)"),
    (dict(zero=1), r"zero=1 shards over the dp group; expected dp > 1"),
    (dict(zero=2, dp=2, dp_shard=2), r"zero=2 with dp_shard=2"),
    (dict(dp_comm="tree"), r"dp_comm='tree'; expected one of"),
    (dict(pp=2, pp_schedule="interleaved-1f1b", microbatches=2), r"expected stages_per_rank >= 2"),
    (dict(pp=2, stages_per_rank=2, microbatches=2), r"stages_per_rank=2 needs pp > 1 and pp_schedule='interleaved"),
    (dict(microbatches=4), r"microbatches=4 without a pipeline \(pp=1\)"),
    (dict(pp=4, microbatches=2), r"microbatches=2 < pp=4; the 1f1b schedule needs"),
    (dict(pp=2, pp_schedule="interleaved-1f1b", stages_per_rank=2, microbatches=3),
     r"microbatches=3 with pp=2; interleaved-1f1b expects microbatches divisible by pp"),
])
def test_bad_degrees(kw, match):
    with pytest.raises(ParallelConfigError, match=match) as e:
        ParallelConfig(**kw)
    assert isinstance(e.value, TilestackError) and isinstance(e.value, ValueError)


def test_gpipe_takes_fewer_microbatches_than_stages():
    assert ParallelConfig(pp=4, pp_schedule="gpipe", microbatches=1).world_size == 4


@pytest.mark.parametrize("pc, kw, match", [
    (ParallelConfig(tp=3), dict(model=ModelConfig(n_head=4, d=48, vocab=48, max_seq=48)),
     r"tp=3 does not divide the model's attention heads n_head=4"),
    (ParallelConfig(tp=2), dict(model=ModelConfig(n_head=4, d=32, vocab=63)),
     r"tp=2 does not divide the model's vocabulary vocab=63"),
    (ParallelConfig(pp=3, microbatches=3), dict(model=TINY), r"3 pipeline stages do not divide the model's n_layer=4"),
    (ParallelConfig(pp=2, pp_schedule="interleaved-1f1b", stages_per_rank=4, microbatches=2),
     dict(model=TINY), r"8 pipeline stages do not divide the model's n_layer=4"),
    (ParallelConfig(dp=2, dp_shard=2), dict(batch=6), r"batch=6 is not divisible by dp\*dp_shard=4"),
    (ParallelConfig(pp=2, dp=2, microbatches=2), dict(batch=6), r"per-rank batch 3 .* not divisible by microbatches=2"),
    (ParallelConfig(tp=2, sp=2), dict(seq=15), r"seq=15 is not divisible by sp=2"),
    (ParallelConfig(), dict(model=TINY, seq=TINY.max_seq + 1), r"seq=65 is longer than the model's max_seq=64"),
])
def test_degrees_against_the_model_and_batch(pc, kw, match):
    with pytest.raises(ParallelConfigError, match=match):
        pc.validate(pc.world_size, **kw)


def test_tp_without_sp_takes_any_sequence_length():
    ParallelConfig(tp=2).validate(2, model=TINY, batch=2, seq=15)


def test_build_mesh_needs_a_process_group():
    with pytest.raises(ParallelConfigError, match="no process group"):
        ParallelConfig().build_mesh("cpu")


@pytest.mark.parametrize("kw, match", [
    (dict(eps=float("nan")), r"ModelConfig.eps=nan; expected a float in \(0, 1\)"),
    (dict(eps=0.0), r"ModelConfig.eps=0.0; expected"),
    (dict(eps=True), r"ModelConfig.eps=True; expected"),
    (dict(n_layer=-1), r"ModelConfig.n_layer=-1; expected an int >= 0"),
    (dict(max_seq=0), r"ModelConfig.max_seq=0; expected a positive int"),
    (dict(d=32.0), r"ModelConfig.d=32.0; expected a positive int"),
    (dict(vocab=True), r"ModelConfig.vocab=True; expected a positive int"),
    (dict(d=30, n_head=4), r"ModelConfig.d=30 with n_head=4; expected d a multiple of n_head \(whole heads\)"),
    (dict(attention="flash"), r"ModelConfig.attention='flash'; expected one of"),
])
def test_model_config_refuses_each_bad_field_when_made(kw, match):
    """eps=nan was taken by the planner and trained to NaN losses; every field is checked when the config is
    made, before a model, a plan or a process group is built from it."""
    from tilestack.parallel.model import ModelConfigError
    with pytest.raises(ModelConfigError, match=match):
        ModelConfig(**kw)
    with pytest.raises(ValueError):         # a ValueError, as the GPT's own checks were
        ModelConfig(**kw)
