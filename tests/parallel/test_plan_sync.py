"""What a shared CPU adds to each synchronisation (from ComputeModel.collective_s and p2p_delay, read by the
lockstep probe's fine variants), counted per plan by how often the plan's ranks meet: each collective on its
critical path, and each pipeline send that a stage waits for."""

import pytest

from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import CommModel, Plan, describe_gpt, predict
from tilestack.parallel.plan.compute import ComputeModel, LockstepProbe, sync_delays

DELAY = 1e-3
CFG = ModelConfig(n_layer=4, d=64, n_head=4, vocab=128, max_seq=32)
COMM = CommModel(fits={k: {2: (1e-4, 1e-9), 4: (2e-4, 2e-9)} for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                                       "p2p")}, source="test")


class Unit(ComputeModel):
    """Every layer 1 ms forward, 2 ms backward; the optimizer free; no CPU sharing (cores None)."""

    def __init__(self, desc, collective_delay=0.0, p2p_delay=0.0):
        self.desc, self.source = desc, "unit"
        # a probe whose scalar all-reduce takes the delay beyond the 2-rank fit's
        self.collective_s = collective_delay + COMM.time("all_reduce", 4, 2) if collective_delay else 0.0
        self.p2p_delay = p2p_delay

    def _times(self, layer, index, micro_batch, tp):
        return 1e-3, 2e-3

    def optimizer_s(self, params, tensors):
        return 0.0


def added(plan: Plan, kind: str = "both") -> float:
    """How much a delay per collective, per send or both ("both") adds to the plan's predicted step, in delays."""
    desc = describe_gpt(CFG, 32)
    delays = dict(collective_delay=DELAY * (kind != "p2p"), p2p_delay=DELAY * (kind != "collective"))
    slow, idle = (predict(plan, desc, unit, COMM).step_s for unit in (Unit(desc, **delays), Unit(desc)))
    return (slow - idle) / DELAY


def test_data_parallel_meets_twice():
    """The gradient all-reduce and the loss's."""
    assert added(Plan(batch=8, dp=2)) == pytest.approx(2)
    assert added(Plan(batch=8, dp=2, zero=1)) == pytest.approx(3)          # ZeRO-1: the parameters' all-gather too
    assert added(Plan(batch=8, dp=2), "p2p") == 0


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
    assert added(Plan(batch=8, pp=2, microbatches=4, schedule="gpipe"), "p2p") == pytest.approx(2)
    assert added(Plan(batch=8, pp=2, microbatches=4, schedule="1f1b")) == pytest.approx(5)
    sends = 2 * 4 * 3                            # both ways, 4 micro-batches, 3 stage edges crossing ranks
    assert 3 <= added(Plan(batch=8, pp=2, microbatches=4, schedule="interleaved-1f1b", stages_per_rank=2)) <= sends + 1


def test_single_rank_never_waits():
    assert added(Plan(batch=8)) == 0


def test_probe_reading_on_one_rank():
    """On a one-rank group nothing waits for another rank: a synchronisation costs next to nothing beside the
    work (under a tenth of it, on a machine that others load), and the work's slowdown is at least 1."""
    from tilestack.parallel.launch import run_local
    probe = LockstepProbe.calibrated()
    assert probe.matmuls % probe.syncs == 0
    (readings,) = run_local(_readings, 1, (probe,))
    work, collective, p2p = min(readings)
    assert probe.slowdown(work, collective) >= 1.0
    assert 0.0 <= collective < 0.1 * work and 0.0 <= p2p < 0.1 * work


def test_sync_delays_are_beyond_the_idle_transfer():
    collective, p2p = sync_delays(5e-4, 3e-3, COMM, 2, message_bytes=1 << 16)
    assert collective == pytest.approx(5e-4)                              # predict subtracts per group size
    assert p2p == pytest.approx(3e-3 - (1e-4 + (1 << 16) * 1e-9))
    assert sync_delays(0.0, 0.0, COMM, 2) == (0.0, 0.0)                   # never negative


def test_a_subgroup_collective_is_charged_beyond_its_own_idle_latency():
    """A probe on 4 ranks reads 3 ms per scalar all-reduce: a dp=2 group's all-reduce among them is charged 3 ms
    beyond the 2-rank fit's latency, an all-reduce over all 4 beyond the 4-rank fit's."""
    desc = describe_gpt(CFG, 32)
    unit = Unit(desc)
    unit.collective_s = 3e-3
    two, four = (predict(Plan(batch=8, **kw), desc, unit, COMM).terms["dp comm"] -
                 predict(Plan(batch=8, **kw), desc, Unit(desc), COMM).terms["dp comm"]
                 for kw in (dict(pp=2, dp=2, microbatches=1), dict(dp=4)))
    per_pp2dp2 = 3e-3 - COMM.time("all_reduce", 4, 2)
    assert two == pytest.approx(3 * per_pp2dp2)                  # the gradients', the loss's over pp and over dp
    assert four == pytest.approx(2 * (3e-3 - COMM.time("all_reduce", 4, 4)))     # the gradients', the loss's


def _readings(rank, world_size, probe):
    return [probe.reading() for _ in range(5)]
