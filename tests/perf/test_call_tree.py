"""perf.call_tree builds the CPU call tree from the profiler's raw events: the same events, names, shapes, parents,
children and self times as ``prof.events()`` (torch's own tree), for a training step with an optimizer, a redispatched
op (``aten::sum`` inside ``aten::sum``), composite ops (``max_pool1d``, ``linalg_svdvals``) and profiler steps."""

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from tilestack.parallel import GPT, ModelConfig, lm_loss, make_batch
from tilestack.perf import call_tree


def _signature(e) -> tuple:
    p = e.cpu_parent
    return (e.name, str(e.input_shapes), p.name if p else None, str(p.input_shapes) if p else None,
            sorted(c.name for c in e.cpu_children), round(e.self_cpu_time_total, 3), round(e.time_range.start, 3),
            round(e.time_range.end, 3))


def test_the_tree_is_torchs_own():
    cfg = ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=32)
    model = GPT(cfg, seed=0)
    idx, targets = make_batch(cfg, 4, 16)
    opt = torch.optim.AdamW(model.parameters())

    def step():
        lm_loss(model(idx), targets).backward()
        opt.step()
        opt.zero_grad()
        torch.linalg.svdvals(torch.randn(5, 5))
        torch.nn.functional.max_pool1d(torch.randn(2, 3, 8), 2)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 schedule=schedule(wait=0, warmup=1, active=2, repeat=1)) as prof:
        for _ in range(3):
            step()
            prof.step()
    want = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    got = call_tree.cpu_events(prof)
    assert len(want) > 1000
    assert sorted(map(_signature, got)) == sorted(map(_signature, want))
    # the redispatch torch removes is removed here too, and the steps are named as torch names them
    assert not any(e.cpu_parent is not None and e.cpu_parent.name == e.name and len(e.cpu_parent.cpu_children) == 1
                   for e in got)
    assert sum(e.name == "ProfilerStep*" for e in got) == 2
