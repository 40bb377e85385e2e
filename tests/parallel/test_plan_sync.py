"""The delay a shared CPU adds to each synchronisation (ComputeModel.sync_delay, read by the lockstep probe's
fine variant), counted per plan by how often the plan's ranks meet: each collective on its critical path, and
each pipeline send that a stage waits for."""

import pytest

from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import CommModel, Plan, describe_gpt, predict
from tilestack.parallel.plan.compute import ComputeModel, LockstepProbe

DELAY = 1e-3
CFG = ModelConfig(n_layer=4, d=64, n_head=4, vocab=128, max_seq=32)
COMM = CommModel(fits={k: {2: (1e-4, 1e-9), 4: (2e-4, 2e-9)} for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                                       "p2p")}, source="test")


class Unit(ComputeModel):
    """Every layer 1 ms forward, 2 ms backward; the optimizer free; no CPU sharing (cores None)."""

    def __init__(self, desc, sync_delay=0.0):
        self.desc, self.source, self.sync_delay = desc, "unit", sync_delay

    def _times(self, layer, index, micro_batch, tp):
        return 1e-3, 2e-3

    def optimizer_s(self, params, tensors):
        return 0.0


def added(plan: Plan) -> float:
    """How much the delay adds to the plan's predicted step, in delays."""
    desc = describe_gpt(CFG, 32)
    slow, idle = (predict(plan, desc, Unit(desc, d), COMM).step_s for d in (DELAY, 0.0))
    return (slow - idle) / DELAY


def test_data_parallel_meets_twice():
    """The gradient all-reduce and the loss's."""
    assert added(Plan(batch=8, dp=2)) == pytest.approx(2)
    assert added(Plan(batch=8, dp=2, zero=1)) == pytest.approx(3)          # ZeRO-1: the parameters' all-gather too


def test_tensor_parallelism_meets_per_block():
    """Megatron's 2 + 2 all-reduces per block and micro-batch (no loss all-reduce: one data-parallel rank)."""
    assert added(Plan(batch=8, tp=2)) == pytest.approx(4 * CFG.n_layer)
    assert added(Plan(batch=8, tp=2, recompute="full")) == pytest.approx(6 * CFG.n_layer)


def test_pipelines_meet_per_send_on_the_critical_path():
    """GPipe: the first forward's send and the last backward's lie on the critical path, and the loss's
    all-reduce. 1F1B's ranks alternate a forward and a backward, each waiting for the other rank's last one: more
    of its sends are on the critical path. Interleaving sends more, but some land where a rank is busy anyway:
    the simulator counts only those waited for (never more than every send of the step)."""
    assert added(Plan(batch=8, pp=2, microbatches=4, schedule="gpipe")) == pytest.approx(3)
    assert added(Plan(batch=8, pp=2, microbatches=4, schedule="1f1b")) == pytest.approx(5)
    sends = 2 * 4 * 3                            # both ways, 4 micro-batches, 3 stage edges crossing ranks
    assert 3 <= added(Plan(batch=8, pp=2, microbatches=4, schedule="interleaved-1f1b", stages_per_rank=2)) <= sends + 1


def test_single_rank_never_waits():
    assert added(Plan(batch=8)) == 0


def test_probe_reading_splits_the_work_and_the_delay():
    """On a one-rank group nothing waits for another rank: the delay is ~0 and the work is the calibrated work
    (within the noise of a shared machine: the slowdown at least 1, the delay under a tenth of the work)."""
    from tilestack.parallel.launch import run_local
    probe = LockstepProbe.calibrated()
    assert probe.matmuls % probe.syncs == 0
    (readings,) = run_local(_readings, 1, (probe,))
    work, delay = min(readings)
    assert probe.slowdown(work, delay) >= 1.0
    assert 0.0 <= delay < 0.1 * work


def _readings(rank, world_size, probe):
    return [probe.reading() for _ in range(5)]
