"""tilestack.bench.models: the GPT-2 and Llama benchmark models on torch's kernels and on tilestack's, tiny
configs on the CPU: one state_dict for both, the same losses and gradients, training steps that agree, and
scripts/bench_model_step.py's quick mode (the CPU check the GPU run builds on)."""

import importlib.util
import json
import pathlib

import pytest
import torch

from tilestack import config
from tilestack.bench.models import GPT, GPT2_TINY, IMPLS, LLAMA_TINY, Llama, make_batch, make_optimizer, train_step

MODELS = [(GPT, GPT2_TINY), (Llama, LLAMA_TINY)]
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_model_step.py"


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("cls,cfg", MODELS, ids=["gpt2", "llama"])
def test_one_state_dict_for_both_implementations(cls, cfg):
    a, b = cls(cfg, impl="torch", seed=3), cls(cfg, impl="tilestack", seed=4)
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="impl='triton'"):
        a.set_impl("triton")


@pytest.mark.parametrize("cls,cfg", MODELS, ids=["gpt2", "llama"])
def test_loss_and_gradients_agree_between_implementations(cls, cfg):
    model = cls(cfg, seed=0).bfloat16()
    idx, targets = make_batch(cfg, 2, 24, seed=1)
    grads = {}
    losses = {}
    for impl in IMPLS:
        model.set_impl(impl)
        model.zero_grad(set_to_none=True)
        with config.override(backend="reference"):
            loss = model(idx, targets)
            loss.backward()
        losses[impl] = float(loss.detach())
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert abs(losses["torch"] - losses["tilestack"]) <= 1e-3
    assert abs(losses["torch"] - torch.log(torch.tensor(float(cfg.vocab)))) <= 0.5    # near-uniform at init
    for name, g in grads["torch"].items():
        assert rel(grads["tilestack"][name], g) <= 3e-2, name


@pytest.mark.parametrize("cls,cfg", MODELS, ids=["gpt2", "llama"])
def test_training_steps_agree_and_learn(cls, cfg):
    model = cls(cfg, seed=0).bfloat16()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(cfg, 2, 16, seed=2)
    losses = {}
    for impl in IMPLS:
        model.load_state_dict(init)
        model.set_impl(impl)
        opt = make_optimizer(model, lr=3e-3)
        with config.override(backend="reference"):
            losses[impl] = [float(train_step(model, batch, opt)) for _ in range(3)]
    assert losses["torch"][-1] < losses["torch"][0] - 0.05     # it trains on the repeated batch
    for a, b in zip(losses["torch"], losses["tilestack"], strict=True):
        assert abs(a - b) <= 2e-3


def test_logits_without_targets_and_f32_rotary_tables():
    model = Llama(LLAMA_TINY).bfloat16()
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.shape == (LLAMA_TINY.max_seq, 8)
    idx, _ = make_batch(LLAMA_TINY, 1, 8)
    with torch.no_grad(), config.override(backend="reference"):
        logits = model.set_impl("tilestack")(idx)
    assert logits.shape == (1, 8, LLAMA_TINY.vocab)
    with pytest.raises(ValueError, match="longer than the model's max_seq"):
        make_batch(LLAMA_TINY, 1, LLAMA_TINY.max_seq + 1)


def _script():
    spec = importlib.util.spec_from_file_location("bench_model_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_names_fall_in_the_issue_categories():
    category = _script().category
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert category("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NNT") == "GEMM"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert category("attention_fwd_kernel_kernel") == "attention"
    assert category("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>") == "cross-entropy"
    assert category("ce_grad_kernel_kernel") == "cross-entropy"
    assert category("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>") == "norms"
    assert category("norm_bwd_kernel_kernel") == "norms" and category("partial_sum_kernel_kernel") == "norms"
    assert category("norm_fwd_kernel_kernel") == "norms" and category("rms_norm_kernel_kernel") == "norms"
    assert category("swiglu_bwd_kernel_kernel") == "elementwise/copies"
    assert category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer"
    assert category("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "elementwise/copies"


def test_bench_script_quick_mode_runs(tmp_path):
    out = tmp_path / "steps.json"
    rc = _script().main(["--quick", "--models", "gpt2,llama", "--sizes", "1x16", "--steps", "1", "--warmup", "1",
                         "--no-profile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [(r["model"], r["B"], r["N"], r["mode"]) for r in rows] == [
        ("gpt2", 1, 16, "eager"), ("llama", 1, 16, "eager")]
    for r in rows:
        assert r["loss_diff_max"] < 1e-3 and r["torch"]["median_ms"] > 0 and r["tilestack"]["median_ms"] > 0
        assert len(r["torch"]["losses"]) == 2


def test_bench_script_kernels_mode_runs(tmp_path):
    out = tmp_path / "kernels.json"
    assert _script().main(["--quick", "--kernels", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["kernels"]
    assert len(rows) == 6 and all(r["max_rel_err"] < 2e-2 for r in rows)
