"""``tilestack profile``'s targets in the tenth held-out round: a round's model file names its builders, its ``MODELS``
table and helpers side by side, and a target may name the wrong one. A name bound to something that is not a function
(``MODELS``, a dict) was called and refused as "'dict' object is not callable"; a helper returning a pair of tensors
((src, dst) edges) was taken as (model, inputs) and refused as a bad ``model=`` with no word of the target. Both now
name the target and what it gave. A right target loads the model and profiles it like the model passed directly.
"""

import sys
from pathlib import Path

import pytest

from tilestack.perf import profile

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import CEIL  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
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
    via_target = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu")
    import perf_models_round10 as pm

    direct_model, direct_inputs = pm.stopwords()
    direct = profile.profile_model(direct_model, direct_inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu")
    assert via_target.flops == direct.flops and not via_target.unsupported
    assert any(o.op == "aten::isin" and o.flops_known for o in via_target.ops)
