"""How predict charges the flat-buffer paths: ZeRO's AdamW steps one flat tensor (not one per parameter), and
the Trainer's own gradient reduction (pipelines with dp) costs its copies ("reduce", overhead.py), scaled by the
share of the parameters the rank holds."""

import pytest

from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import CommModel, Plan, describe_gpt, predict
from tilestack.parallel.plan.compute import ComputeModel

CFG = ModelConfig(n_layer=4, d=64, n_head=4, vocab=128, max_seq=32)
COMM = CommModel(fits={k: {2: (1e-4, 1e-9), 4: (2e-4, 2e-9)} for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                                       "p2p")}, source="test")
PER_TENSOR = 1e-3


class Unit(ComputeModel):
    """Every layer 1 ms forward, 2 ms backward; AdamW PER_TENSOR a tensor; the given wrapper overheads."""

    def __init__(self, desc, overheads=None):
        self.desc, self.source = desc, "unit"
        self.overheads = overheads or {}

    def overhead(self, name):
        return self.overheads.get(name, 0.0)

    def _times(self, layer, index, micro_batch, tp):
        return 1e-3, 2e-3

    def optimizer_s(self, params, tensors):
        return tensors * PER_TENSOR


def test_zero_steps_one_flat_tensor():
    desc = describe_gpt(CFG, 32)
    plain = predict(Plan(batch=8, dp=2), desc, Unit(desc), COMM)
    zero = predict(Plan(batch=8, dp=2, zero=1), desc, Unit(desc), COMM)
    tensors = sum(layer.tensors for layer in desc.layers)
    assert plain.terms["optimizer"] == pytest.approx(tensors * PER_TENSOR)
    assert zero.terms["optimizer"] == pytest.approx(PER_TENSOR)


def test_trainer_reduction_is_charged_where_the_trainer_reduces_by_the_share_held():
    desc = describe_gpt(CFG, 32)
    oh = {"reduce": 4e-3, "ddp": 1e-3}

    def dp_comm(plan, overheads):
        return predict(plan, desc, Unit(desc, overheads), COMM).terms["dp comm"]

    pp_dp = Plan(batch=8, pp=2, dp=2, microbatches=2, schedule="gpipe")
    extra = dp_comm(pp_dp, oh) - dp_comm(pp_dp, {})
    # each pipeline rank holds about half of the parameters (embedding and head on different stages), and the
    # reduction runs once a step, not per micro-batch
    assert 0.3 * 4e-3 < extra < 0.8 * 4e-3
    # DDP reduces plain dp's gradients: its overhead, not the Trainer's
    assert dp_comm(Plan(batch=8, dp=2), oh) - dp_comm(Plan(batch=8, dp=2), {}) == pytest.approx(1e-3)
    # ZeRO reduces its own: neither
    z = Plan(batch=8, dp=2, zero=1)
    assert dp_comm(z, oh) == pytest.approx(dp_comm(z, {}))
    # one data-parallel rank: nothing to reduce
    p = Plan(batch=8, pp=2, microbatches=2, schedule="gpipe")
    assert dp_comm(p, oh) == pytest.approx(dp_comm(p, {}))


def test_zero_overhead_scales_with_the_share_held():
    desc = describe_gpt(CFG, 32)
    oh = {"zero": 4e-3}

    def opt(plan, overheads):
        return predict(plan, desc, Unit(desc, overheads), COMM).terms["optimizer"]

    whole = Plan(batch=8, dp=2, zero=1)
    assert opt(whole, oh) - opt(whole, {}) == pytest.approx(4e-3)
    staged = Plan(batch=8, pp=2, dp=2, zero=1, microbatches=2, schedule="gpipe")
    assert 0.3 * 4e-3 < opt(staged, oh) - opt(staged, {}) < 0.8 * 4e-3
