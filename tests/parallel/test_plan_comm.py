"""The communication model: line fits, the ring fallback for unmeasured group sizes, ANCHORS.md's H200 NCCL
figures reproduced, and a cluster's groups told apart by their stride (within a node, or across)."""

import pytest

from tilestack.parallel.cost import ring_allreduce_time
from tilestack.parallel.plan import ClusterComm, CommModel, PlanError, h200_nccl
from tilestack.parallel.plan.comm import H200_NCCL_BUSBW, MIB, fit_line


def test_fit_line_recovers_latency_and_slope():
    sizes = [2.0**k for k in range(10, 24, 2)]
    a, b = fit_line(sizes, [3e-4 + 2e-9 * s for s in sizes])
    assert a == pytest.approx(3e-4, rel=1e-6) and b == pytest.approx(2e-9, rel=1e-6)
    with pytest.raises(PlanError, match="two distinct sizes"):
        fit_line([8, 8], [1.0, 1.0])


def test_unmeasured_group_size_uses_the_ring_model():
    alpha, bw = 20e-6, 10e9
    # a 2-rank all-reduce measured exactly on the ring model: t = 2 alpha + S / B
    cm = CommModel(fits={"all_reduce": {2: (2 * alpha, 1 / bw)}}, source="ring")
    for n in (4, 8):
        assert cm.time("all_reduce", 1 << 24, n) == pytest.approx(ring_allreduce_time(1 << 24, n, alpha, bw))
    assert cm.time("all_gather", 1 << 24, 4) == pytest.approx(ring_allreduce_time(1 << 24, 4, alpha, bw) / 2)
    assert cm.time("all_reduce", 1 << 24, 1) == 0.0
    with pytest.raises(PlanError, match="kind='broadcast'"):
        cm.time("broadcast", 8, 2)


@pytest.mark.parametrize("n", [2, 4])
def test_h200_fit_reproduces_the_measured_bus_bandwidth(n):
    cm = h200_nccl()
    for mib, busbw in H200_NCCL_BUSBW[n].items():
        if mib < 8:
            continue     # 1 MiB: the 4-GPU point (12 GB/s) is far off any line through the others
        t = cm.time("all_reduce", mib * MIB, n)
        got = mib * MIB * 2 * (n - 1) / n / t / 1e9
        # two parameters through five points: within 25% from 8 MiB up (the worst, 4 GPUs at 8 MiB: -23%)
        assert got == pytest.approx(busbw, rel=0.25), f"{mib} MiB"


def test_cluster_tells_groups_within_a_node_from_groups_across():
    intra = CommModel(fits={"all_reduce": {2: (1e-5, 1 / 200e9), 8: (1e-5, 1 / 200e9)}}, source="nvlink")
    cl = ClusterComm(fits={}, source="cluster", intra=intra, gpus_per_node=8, inter_alpha=1e-5,
                     inter_bytes_per_s=25e9)
    S = 1 << 30
    assert cl.time("all_reduce", S, 8, stride=1) == intra.time("all_reduce", S, 8)          # tp = 8: one node
    assert cl.time("all_reduce", S, 2, stride=4) == intra.time("all_reduce", S, 2)          # within the node
    across = cl.time("all_reduce", S, 4, stride=8)                                          # dp over 4 nodes
    assert across == pytest.approx(ring_allreduce_time(S, 4, 1e-5, 25e9))
    assert cl.time("p2p", S, 2, stride=8) == pytest.approx(1e-5 + S / 25e9)                # next node's stage
