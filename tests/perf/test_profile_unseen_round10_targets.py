"""``tilestack profile``'s targets in the tenth held-out round: a round's model file names its builders, its ``MODELS``
table and helpers side by side, and a target may name the wrong one. A name bound to something that is not a function
(``MODELS``, a dict) was called and refused as "'dict' object is not callable"; a helper returning a pair of tensors
((src, dst) edges) was taken as (model, inputs) and refused as a bad ``model=`` with no word of the target. Both now
name the target and what it gave. A right target loads the model and profiles it like the model passed directly; bad
calls of the round's models are refused naming the argument, or the model and the phase it failed in.
"""

import sys
from pathlib import Path

import pytest

from tilestack.perf import profile

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402

pytestmark = FILTERS
ROUND = Path(__file__).parent / "perf_models_round10.py"


def test_a_target_naming_a_table_says_it_is_not_a_function():
    with pytest.raises(profile.ProfileError) as e:
        profile.load_target(f"{ROUND}:MODELS")
    msg = str(e.value)
    assert "perf_models_round10.py:MODELS" in msg and "MODELS is not a function (dict)" in msg
    assert "not callable" not in msg


def test_a_target_returning_two_tensors_names_the_target_and_the_pair():
    with pytest.raises(profile.ProfileError) as e:
        profile.load_target(f"{ROUND}:graph_edges")
    msg = str(e.value)
    assert "perf_models_round10.py:graph_edges" in msg and "graph_edges() returned (tensor 13 int64" in msg
    assert "model first" in msg


def test_a_target_of_a_constant_is_refused_by_its_type(tmp_path):
    script = tmp_path / "consts.py"
    script.write_text("BATCH = 2\n")
    with pytest.raises(profile.ProfileError, match=r"BATCH is not a function \(int\)"):
        profile.load_target(f"{script}:BATCH")


def test_a_builder_target_profiles_as_the_model_given_directly():
    """stopwords through its target: the same counted FLOPs as the builder's model and inputs, torch.isin counted."""
    model, inputs = profile.load_target(f"{ROUND}:stopwords")
    via_target = profile_cpu(model, inputs)
    import perf_models_round10 as pm

    direct_model, direct_inputs = pm.stopwords()
    direct = profile_cpu(direct_model, direct_inputs)
    assert via_target.flops == direct.flops and not via_target.unsupported
    assert any(o.op == "aten::isin" and o.flops_known for o in via_target.ops)


def _bad_calls():
    """(label, build the (model, inputs, keyword arguments), what the error must say) for the round's models."""
    import perf_models_round10 as pm
    import torch

    def kdim_missing_pad():
        m, (q, k, v, _) = pm.kdim_attention()
        return m, (q, k, v), {}

    def kdim_swapped_keys():
        m, (q, k, v, pad) = pm.kdim_attention()
        return m, (q, v, v, pad), {}

    def float_ids():
        m, (ids,) = pm.stopwords()
        return m, (ids.float(),), {}

    def lengths_past_the_batch():
        m, (x, _) = pm.packed_bigru()
        return m, (x, torch.tensor([3, 7, 2])), {}

    def lengths_not_summing_to_edges():
        m, (x, src, dst) = pm.segment_graph()
        return m, (x, src, dst[:-1]), {}

    def steps_zero():
        m, inputs = pm.vit_interp()
        return m, inputs, {"steps": 0}

    return [
        ("kdim_missing_pad", kdim_missing_pad, ["inputs=", "KdimAttention.forward", "required argument: 'pad'"]),
        ("kdim_swapped_keys", kdim_swapped_keys, ["model 'KdimAttention' raised", "the warm-up", "tensor 7x2x10"]),
        ("float_ids", float_ids, ["model 'StopwordClassifier' raised", "'indices'", "tensor 2x9 float32"]),
        ("lengths_past_the_batch", lengths_past_the_batch, ["model 'PackedBiGru' raised", "during the warm-up"]),
        ("lengths_not_summing", lengths_not_summing_to_edges, ["model 'SegmentGraph' raised", "segment_reduce"]),
        ("steps_zero", steps_zero, ["steps=0", "expected an int >= 1"]),
    ]


@pytest.mark.parametrize("label,build,says", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_calls_of_the_rounds_models_are_refused_naming_what_was_wrong(label, build, says):
    """Each refusal is a ProfileError naming the argument (inputs, steps) or the model and the phase it failed in,
    with the inputs described by shape and dtype; none runs a step past the one that failed."""
    model, inputs, kwargs = build()
    with pytest.raises(profile.ProfileError) as e:
        profile_cpu(model, inputs, **kwargs)
    for part in says:
        assert part in str(e.value), (label, part, str(e.value))
