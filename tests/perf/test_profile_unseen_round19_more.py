"""Nineteenth held-out round for the model profiler, continued (models: tests/perf/perf_models_round19.py): the
round's fixes op by op (rand_like / randn_like / randint_like read none of their argument; NLL's forward reads one
log-probability per target, its backward none; a language model's loss over a 1000-word vocabulary; advanced
indexing and the copies of views read the elements they return, a router's x[idx] in a profile), a tied embedding /
head by hand, every row's metrics against its own counts and the synthetic ceilings (FLOP/s, bytes/s, utilisation,
the roofline fraction, no energy on a CPU), a batch of 0 through the Conformer, and bad arguments: steps or warmup
past profile_args.MAX_STEPS (steps=2**40 ran with no end: the round's fix), inputs that do not fit forward,
arguments of the wrong type, each refused before the model runs, naming the argument; zeros_like's unwritten bytes
as a strict xfail (fixed in round 25), and a non-affine LayerNorm's affine FLOPs (an xfail here, fixed in round 24).
The counts of the round's models, and what the round found, are in tests/perf/test_profile_unseen_round19.py.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import formulas, profile
from tilestack.perf.profile import ProfileError
from tilestack.perf.profile_args import MAX_STEPS

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round19 as pm  # noqa: E402
from _profile_helpers import FILTERS, RIDGE, one_row, profile_cpu, step_counts  # noqa: E402
from profile_support import CEIL  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8


@pytest.mark.parametrize("op", ["rand_like", "randn_like", "randint_like"])
def test_like_draws_read_nothing(op):
    """A draw shaped like its argument writes the draw and reads none of the argument's elements (the round's fix:
    randn_like(std) was charged reading std, as new_zeros had been before round 14); a strided argument alike."""
    std = torch.rand(6, 10)[:, ::2]  # (6, 5), strided
    fn = getattr(torch, op)
    counts = profile.count_ops(lambda: fn(std, 7) if op == "randint_like" else fn(std))
    row = one_row(counts, f"aten::{op}")
    assert (row.flops, row.bytes_read, row.bytes_written, row.unsupported) == (0, 0, 30 * F32, False)


@pytest.mark.parametrize("weighted", [False, True])
def test_nll_forward_reads_the_picked_log_probabilities(weighted):
    """nll_loss over (N, C) log-probabilities: one per target (a gather: N elements, the round's fix; it read N*C),
    the int64 targets and the class weights where given; it writes the loss and the total weight. One FLOP per target
    (formulas.NLL_FLOPS_PER_TARGET)."""
    n, c = 5, 7
    logp = torch.randn(n, c).log_softmax(-1)
    target = torch.tensor([1, 2, 3, 0, 6])
    weight = torch.rand(c) if weighted else None
    row = one_row(profile.count_ops(lambda: F.nll_loss(logp, target, weight=weight)), "aten::nll_loss_forward")
    assert row.flops == formulas.NLL_FLOPS_PER_TARGET * n
    assert row.bytes_read == n * F32 + n * I64 + (c * F32 if weighted else 0)
    assert row.bytes_written == 2 * F32


def test_nll_2d_forward_and_backward_bytes():
    """Cross-entropy over (N, C, H, W) logits: NLL reads one log-probability per pixel; its backward reads dy, the
    targets, the weights and the total weight, and writes the (N, C, H, W) gradient, never reading the
    log-probabilities it is handed for their shape (the round's fix: both read all C of each pixel)."""
    n, c, h, w = 2, 5, 3, 4
    x = torch.randn(n, c, h, w, requires_grad=True)
    t = torch.randint(0, c, (n, h, w))
    weight = torch.rand(c)
    counts = profile.count_ops(lambda: F.cross_entropy(x, t, weight=weight).backward())
    fwd, back = one_row(counts, "aten::nll_loss2d_forward"), one_row(counts, "aten::nll_loss2d_backward")
    pixels = n * h * w
    assert (fwd.flops, fwd.bytes_read, fwd.bytes_written) == (pixels, pixels * (F32 + I64) + c * F32, 2 * F32)
    assert (back.flops, back.bytes_read) == (pixels, F32 + pixels * I64 + c * F32 + F32)
    assert back.bytes_written == n * c * h * w * F32
    softmax = one_row(counts, "aten::_log_softmax")  # the log-softmax still reads and writes all of them
    assert (softmax.bytes_read, softmax.bytes_written) == (n * c * h * w * F32,) * 2


def test_language_model_loss_reads_one_log_probability_per_token():
    """A 1000-word vocabulary, 12 tokens: NLL reads 12 log-probabilities (48 bytes) and 12 int64 targets, not the
    (12, 1000) matrix (48000 bytes; the round's fix); its intensity in the profile is its FLOPs over those bytes,
    on the memory side of the ridge."""
    vocab, tokens = 1000, 12
    model = nn.Linear(8, vocab)

    def lm_loss(x, y):
        return F.cross_entropy(model(x), y)

    inputs = (torch.randn(tokens, 8), torch.randint(0, vocab, (tokens,)))
    p = profile_cpu(lm_loss, inputs, name="lm_loss")
    (o,) = [o for o in p.ops if o.op == "aten::nll_loss_forward"]
    assert o.m.bytes_read == tokens * (F32 + I64) and o.m.bytes_written == 2 * F32
    assert o.m.intensity == pytest.approx(tokens / (tokens * (F32 + I64) + 2 * F32))
    assert o.bound == "memory"


def test_every_row_metrics_follow_from_its_counts_and_the_ceilings():
    """For every row of the trained Conformer: FLOP/s and bytes/s are its counts over its latency; utilisation is
    those over the synthetic ceilings' fp32 peak and copy bandwidth; the roof fraction is bytes/s over the bandwidth
    below the ridge and FLOP/s over the peak above it; a CPU has no energy meter, so no joules, power or FLOP/J;
    the step's FLOPs and bytes are its rows' plus the untimed ops'."""
    model, inputs = pm.conformer()
    p = profile_cpu(model, inputs, train=True, name="conformer")
    peak, bandwidth = CEIL.matmul["fp32"], CEIL.copy_bytes_per_s
    for o in p.ops:
        m = o.m
        assert m.latency_s > 0 and math.isfinite(m.latency_s), o.label
        assert m.flops_per_s == pytest.approx(m.flops / m.latency_s, rel=1e-12)
        assert m.bytes_per_s == pytest.approx((m.bytes_read + m.bytes_written) / m.latency_s, rel=1e-12)
        # the (other) row, time no op accounts for, has no calls: its latency is its time per step
        assert o.total_s == pytest.approx(m.latency_s * o.calls if o.calls else m.latency_s, rel=1e-9)
        assert (m.joules_per_call, m.avg_power_w, m.flops_per_joule) == (None, None, None)
        if not (o.counted and m.flops > 0):
            continue
        assert m.dtype == "fp32"
        assert m.compute_util_measured == pytest.approx(m.flops_per_s / peak, rel=1e-12)
        assert m.memory_util_measured == pytest.approx(m.bytes_per_s / bandwidth, rel=1e-12)
        below = m.flops / m.bytes < RIDGE
        assert o.bound == ("memory" if below else "compute")
        assert o.roof_fraction == pytest.approx(m.bytes_per_s / bandwidth if below else m.flops_per_s / peak)
    assert p.flops == pytest.approx(math.fsum(o.m.flops * o.calls for o in p.ops) + sum(u.flops for u in p.untimed))
    assert p.bytes == pytest.approx(math.fsum(o.m.bytes * o.calls for o in p.ops) + sum(
        u.bytes_read + u.bytes_written for u in p.untimed))


def test_conformer_on_an_empty_batch():
    """A batch of 0 sequences: every op runs on empty tensors; the weights are still read, and the only FLOPs are
    the three scalar ops (0-dim: the scale) SDPA's math path runs for an empty batch; finite numbers in every row and
    nothing reported uncounted."""
    model, _ = pm.conformer()
    p = profile_cpu(model, (torch.randn(0, pm.CF_T, pm.CF_DIM),), name="conformer_empty")
    assert p.bytes > 0 and p.unsupported == ()
    assert sorted((o.op, o.shapes, o.calls * o.m.flops) for o in p.ops if o.m.flops) == [
        ("aten::add", (), 2), ("aten::mul", (), 1)]
    for o in p.ops:
        for v in (o.m.flops, o.m.bytes, o.m.latency_s, o.m.flops_per_s, o.m.bytes_per_s):
            assert math.isfinite(v) and v >= 0, o.label


def test_shared_block_is_counted_at_every_call_of_an_unrolled_step():
    """The Perceiver's latent block called twice in one step: its qkv projection's row counts 2 calls, each the
    same FLOPs (2 * 8 * 8 * 24), in the counting pass alone as in the profile's rows."""
    model, inputs = pm.perceiver()
    counts = step_counts(model, inputs)
    row = one_row(counts, "aten::addmm", ((24,), (8, 8), (8, 24)))
    assert (row.calls, row.flops) == (2, 2 * 2 * 8 * 8 * 24)
    p = profile_cpu(model, inputs, name="perceiver")
    (o,) = [o for o in p.ops if o.op == "aten::addmm" and o.shapes == ((24,), (8, 8), (8, 24))]
    assert (o.calls, o.m.flops) == (2, 2 * 8 * 8 * 24)


class _Calls(nn.Module):
    """A linear that counts its forward calls: an argument refused before any work leaves it at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 3), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


X = torch.randn(2, 4)
BAD = [
    ({"steps": 2**40}, r"steps=1099511627776 \(int\); expected an int >= 1 and <= 100000"),
    ({"steps": MAX_STEPS + 1}, r"steps=100001 \(int\); expected an int >= 1"),
    ({"warmup": 2**40}, r"warmup=1099511627776 \(int\); expected an int >= 0 and <= 100000"),
    ({"steps": "3"}, r"steps='3' \(str\); expected an int >= 1"),
    ({"steps": np.int64(2)}, r"steps=.*2.* \(int64\); expected an int >= 1"),
    ({"warmup": None}, r"warmup=None \(NoneType\); expected an int >= 0"),
    ({"train": "yes"}, r"train='yes' \(str\); expected True or False"),
    ({"fastpath": 1}, r"fastpath=1 \(int\); expected True or False"),
    ({"name": 5}, r"name=5 \(int\); expected a str"),
    ({"budget_s": math.nan, "steps": None}, r"budget_s=nan \(float\); expected a positive, finite time budget"),
    ({"budget_s": True}, r"budget_s=True \(bool\); expected a positive, finite"),
    ({"ceilings": "x"}, r"ceilings='x' \(str\); expected a perf.Ceilings"),
    ({"device": 1.0}, r"device=1.0 \(float\); expected 'cpu', 'cuda'"),
    ({"inputs": ()}, r"inputs=\(\) do not fit _Calls.forward\(x\): missing a required argument: 'x'"),
    ({"inputs": {"y": X}}, r"inputs=\{'y': tensor 2x4 float32\} do not fit _Calls.forward\(x\)"),
    ({"inputs": (X, X)}, r"do not fit _Calls.forward\(x\): too many positional arguments"),
    ({"inputs": None}, r"inputs=None \(NoneType\); expected a tensor, a tuple or list"),
    ({"inputs": "x"}, r"inputs='x' \(str\); expected a tensor, a tuple or list"),
    ({"inputs": (np.zeros((2, 4), np.float32),)}, r"inputs\[0\]=a numpy array of shape \(2, 4\) \(float32\)"),
    ({"inputs": {X}}, r"inputs=set object \(set\); expected a tuple or list"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    """Each bad argument is a ProfileError naming it, what was given and what was expected, raised before the model
    runs once (the round's fix: steps=2**40 and warmup=2**40 were taken, and the profile never ended)."""
    model = _Calls()
    kwargs = {"inputs": (X,), **kwargs}
    with pytest.raises(ProfileError, match=message):
        profile.profile_model(model, kwargs.pop("inputs"), **{"steps": 1, "warmup": 1, "ceilings": CEIL,
                                                               "device": "cpu", **kwargs})
    assert model.calls == 0


def test_wrong_shape_and_dtype_name_the_model_phase_and_inputs():
    """Inputs of the right count but the wrong shape or dtype are only found by the model itself: the error names
    the model, the phase (the warm-up) and the inputs, with torch's reason."""
    for bad, said in ((torch.randn(2, 5), r"tensor 2x5 float32"), (torch.ones(2, 4, dtype=torch.int64),
                                                                    r"tensor 2x4 int64")):
        with pytest.raises(ProfileError, match=rf"model 'Linear' raised RuntimeError during the warm-up: .*\(inputs="
                                               rf"\({said},\)\)"):
            profile_cpu(nn.Linear(4, 3), (bad,))


class _TiedLM(nn.Module):
    """Embedding (50 x 8), a tanh mixing layer, a head tied to the embedding (F.linear by its weight), the
    cross-entropy of next tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(50, 8), nn.Linear(8, 8)

    def forward(self, ids, targets):
        logits = F.linear(torch.tanh(self.mix(self.emb(ids))), self.emb.weight)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_tied_embedding_head_by_hand():
    """Forward: the lookup (0 FLOPs; its 10 rows and ids read), the mixing addmm, tanh, the tied head's mm
    (2 * 10 * 8 * 50), log-softmax 5 an element, NLL one per token (reading 10 log-probabilities, not 500).
    Trained: the head's two matmuls (dh and its weight's gradient), the mixer's two and its bias sum, the lookup's
    backward (an add per looked-up element, writing the whole table's gradient), the two gradients of the tied
    weight summed (400 adds), then every gradient added into the one the warm-up left (400 + 64 + 8)."""
    torch.manual_seed(0)
    model, b, t, v, d = _TiedLM(), 2, 5, 50, 8
    inputs = (torch.randint(0, v, (b, t)), torch.randint(0, v, (b, t)))
    n = b * t
    forward = 2 * n * d * d + n * d + 2 * n * d * v + formulas.SOFTMAX_FLOPS_PER_ELEMENT * n * v + n
    counts = step_counts(model, inputs)
    assert sum(c.flops for c in counts.values()) == forward == 11870
    nll = one_row(counts, "aten::nll_loss_forward")
    assert nll.bytes_read == n * (F32 + I64)
    lookup = one_row(counts, "aten::embedding")
    assert (lookup.bytes_read, lookup.bytes_written) == (n * d * F32 + n * I64, n * d * F32)
    counts = step_counts(model, inputs, train=True, warm=True)
    backward = (2 * 2 * n * d * v + 2 * 2 * n * d * d + n * d  # head, mixer, bias gradient
                + formulas.SOFTMAX_BWD_FLOPS_PER_ELEMENT * n * v + n + n * d + n * d  # softmax, NLL, tanh, lookup
                + v * d + (v * d + d * d + d)  # the tied weight's two gradients summed; into .grad
                + 2)  # the loss's sum and its add to 0
    assert sum(c.flops for c in counts.values()) == forward + backward
    tied = one_row(counts, "aten::add", ((v, d), (v, d)))
    assert tied.flops == v * d
    table = one_row(counts, "aten::embedding_dense_backward")
    assert (table.flops, table.bytes_read, table.bytes_written) == (n * d, n * d * F32 + n * I64, v * d * F32)


def test_zeros_like_writes_its_bytes_as_new_zeros_does():
    """A strict xfail of round 19 (zeros_like / ones_like / full_like were counted as allocations, 0 bytes written),
    fixed in round 25."""
    z = torch.randn(4, 6)
    counts = profile.count_ops(lambda: (torch.zeros_like(z), z.new_zeros(4, 6)))
    assert one_row(counts, "aten::new_zeros").bytes_written == 24 * F32
    assert one_row(counts, "aten::zeros_like").bytes_written == 24 * F32


@pytest.mark.parametrize("how", ["rows", "mask", "columns", "expanded", "masked_select"])
def test_advanced_indexing_reads_what_it_takes(how):
    """x[idx] (aten::index) reads one element of x per element it returns (at most what x holds) and its index
    tensors, as torch.gather and index_select do (the round's fix: 5 rows of a (1000, 8) table were charged all
    32000 bytes of it); a boolean mask is read whole (torch.masked_select alike); a source expanded 3 times is
    charged its output, never more than it holds."""
    x = torch.randn(1000, 8)
    idx = torch.tensor([3, 7, 9, 500, 2])
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:4] = True
    fn, taken, index_bytes = {
        "rows": (lambda: x[idx], 5 * 8, 5 * I64),
        "mask": (lambda: x[mask], 4 * 8, 1000),
        "columns": (lambda: x[:, idx[:2]], 1000 * 2, 2 * I64),
        "expanded": (lambda: x.expand(3, 1000, 8)[:, idx], 3 * 5 * 8, 5 * I64),
        "masked_select": (lambda: torch.masked_select(x, mask[:, None]), 4 * 8, 1000),  # x[mask] by another name
    }[how]
    row = one_row(profile.count_ops(fn), "aten::masked_select" if how == "masked_select" else "aten::index")
    assert (row.flops, row.bytes_read, row.bytes_written) == (0, taken * F32 + index_bytes, taken * F32)


def test_token_selection_by_index_in_a_profile():
    """A router keeping the 4 best of 64 tokens by topk and x[idx], then a linear on them: the index row reads the 4
    kept (16-wide) rows and the 4 int64 indices, not the (64, 16) activation, and sits on the memory side."""
    torch.manual_seed(0)

    class Route(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score, self.proj = nn.Linear(16, 1), nn.Linear(16, 16)

        def forward(self, x):  # (64, 16)
            keep = self.score(x).squeeze(-1).topk(4).indices
            return self.proj(x[keep])

    p = profile_cpu(Route(), (torch.randn(64, 16),), name="route")
    (o,) = [o for o in p.ops if o.op == "aten::index"]
    assert (o.m.bytes_read, o.m.bytes_written) == (4 * 16 * F32 + 4 * I64, 4 * 16 * F32)
    assert o.m.flops == 0 and o.counted


def test_copies_of_views_read_the_view_alone():
    """The copy variants of views (tagged view_copy: narrow_copy, select_copy, slice_copy, diagonal_copy,
    expand_copy; what a functionalized graph runs) read the view's elements, not their whole source (the round's fix:
    narrow_copy of 5 rows of a (1000, 8) table read all 32000 bytes), at most what the source holds (an expand_copy
    reads its one row); a permute_copy reads all of it."""
    x = torch.randn(1000, 8)
    counts = profile.count_ops(lambda: (x.narrow_copy(0, 0, 5), torch.select_copy(x, 0, 3), torch.diagonal_copy(x),
                                        torch.expand_copy(x[:1], (4, 8)), torch.permute_copy(x, (1, 0))))
    expected = {"narrow_copy": (40, 40), "select_copy": (8, 8), "diagonal_copy": (8, 8), "expand_copy": (8, 32),
                "permute_copy": (8000, 8000)}
    for op, (read, written) in expected.items():
        row = one_row(counts, f"aten::{op}")
        assert (row.flops, row.bytes_read, row.bytes_written) == (0, read * F32, written * F32), op


def test_layer_norm_without_affine_has_no_affine_flops():
    """A LayerNorm without an affine (elementwise_affine=False, F.layer_norm(x, shape): DiT's adaLN, final norms) has
    no weight to multiply nor bias to add: 6 an element, not 8 (an xfail of round 19, fixed in round 24)."""
    x = torch.randn(4, 8)
    counts = profile.count_ops(lambda: F.layer_norm(x, (8,)))
    assert one_row(counts, "aten::native_layer_norm").flops == (formulas.LAYERNORM_FLOPS_PER_ELEMENT - 2) * 32
