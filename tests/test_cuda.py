"""The engine and the Trainer on a CUDA device: restore guarantees, noise laws, RNG isolation, mixed precision.

Skipped without a GPU (CI has none); run with ``python -m pytest tests/test_cuda.py`` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, assert_params_equal, clone_params, make_classification_data
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer, SmoothOutTrainingArguments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_bert(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return BertForSequenceClassification(config).to("cuda", dtype)


class MixedModel(nn.Module):
    """Linear, Conv2d and an Embedding on the GPU, with parameters large enough for many noise streams."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4000, 256)
        self.linear = nn.Linear(256, 1024)
        self.conv = nn.Conv2d(16, 32, 3)
        self.norm = nn.LayerNorm(1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapt", ["filter", "none", "weight"])
def test_copy_restore_is_bit_exact_on_cuda(dtype, adapt):
    model = MixedModel().to("cuda", dtype)
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, seed=0))
    for step in range(3):
        engine.perturb(step)
        assert not torch.equal(model.linear.weight, clean["linear.weight"])
        assert torch.equal(model.norm.weight, clean["norm.weight"])  # norm layers are never perturbed
        engine.restore()
        assert_params_equal(model, clean)


def test_auto_restore_copies_on_cuda():
    """``restore="auto"`` swaps only CPU parameters: on a GPU it runs the copy restore (bit-exact, tested above)."""
    assert SmoothOut(MixedModel().cuda(), SmoothOutConfig(strength=0.05)).restore_mode == "copy"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_restore_on_cuda_draws_what_copy_draws_and_never_writes_the_clean_tensors(dtype):
    """The evidence ``auto`` needs before it may swap on GPUs: same noisy weights as copy, clean tensors untouched,
    and an inductor-compiled forward (no CUDA graphs) reading the swapped-in buffers."""
    seen = {}
    for restore in ("copy", "swap"):
        torch._dynamo.reset()
        model = small_bert(dtype).eval()
        compiled = torch.compile(model, backend="inductor")
        clean = clone_params(model)
        tensors = {n: p.data for n, p in model.named_parameters()}
        engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0, restore=restore))
        ids = torch.randint(0, 512, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        compiled(input_ids=ids)
        draws = []
        for step in range(3):
            with engine.perturbed(step):
                draws.append(clone_params(model))
                noisy = compiled(input_ids=ids).logits.detach()
                torch.testing.assert_close(noisy, model(input_ids=ids).logits.detach(), rtol=1e-3, atol=1e-3)
                if restore == "swap":
                    assert all(torch.equal(tensors[n], clean[n]) for n in clean)
            assert_params_equal(model, clean)
        seen[restore] = draws
    for copy_draw, swap_draw in zip(seen["copy"], seen["swap"], strict=True):
        assert all(torch.equal(copy_draw[n], swap_draw[n]) for n in copy_draw)


@pytest.mark.parametrize("adapt", ["filter", "none"])
def test_regenerate_restore_drift_is_rounding_only_on_cuda(adapt):
    model = MixedModel().cuda()
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, restore="regenerate", seed=0))
    for step in range(10):
        with engine.perturbed(step):
            pass
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), clean[name], rtol=1e-6, atol=1e-6)


def test_restore_after_a_failing_backward_on_cuda():
    model = small_bert()
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, seed=0))
    ids = torch.randint(0, 512, (4, 16), device="cuda")

    def explode(_grad):
        raise RuntimeError("backward failed")

    with pytest.raises(RuntimeError, match="backward failed"), engine.perturbed():
        logits = model(input_ids=ids).logits
        logits.register_hook(explode)
        logits.sum().backward()
    assert_params_equal(model, clean)


def test_filter_rows_have_noise_norm_a_times_row_norm_on_cuda():
    model = MixedModel().cuda()
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.02, adapt="filter", distribution="gaussian", seed=0))
    engine.perturb()
    for name, dims in (("embedding.weight", (1,)), ("linear.weight", (1,)), ("conv.weight", (1, 2, 3))):
        noise = dict(model.named_parameters())[name].detach().double() - clean[name].double()
        ratio = torch.linalg.vector_norm(noise, dim=dims) / torch.linalg.vector_norm(clean[name].double(), dim=dims)
        torch.testing.assert_close(ratio, torch.full_like(ratio, 0.02), rtol=2e-4, atol=0)
    engine.restore()


def test_cuda_noise_is_seeded_and_leaves_torch_generators_alone():
    models = []
    for _ in range(3):
        torch.manual_seed(0)  # identical weights, so identical noise rounds identically
        models.append(MixedModel().cuda())
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()

    def noise_of(model: nn.Module, seed: int) -> torch.Tensor:
        clean = model.linear.weight.detach().clone()
        engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt="none", seed=seed))
        with engine.perturbed():
            return model.linear.weight.detach() - clean

    first, again, other = noise_of(models[0], 1), noise_of(models[1], 1), noise_of(models[2], 2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0.04 < first.abs().max() <= 0.05
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_inductor_compiled_model_sees_the_perturbed_weights_without_recompiling():
    torch._dynamo.reset()
    model = small_bert().eval()  # no dropout: eager and compiled outputs must agree
    compiled = torch.compile(model, backend="inductor")
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0))
    ids = torch.randint(0, 512, (4, 16), device="cuda")
    clean_logits = compiled(input_ids=ids).logits.detach()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            with engine.perturbed(step):
                noisy = compiled(input_ids=ids).logits.detach()
                eager = model(input_ids=ids).logits.detach()
            torch.testing.assert_close(noisy, eager, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(noisy, clean_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled(input_ids=ids).logits.detach(), clean_logits, rtol=0, atol=0)


def training_args(tmp_path, cls=SmoothOutTrainingArguments, **kwargs) -> TrainingArguments:
    return cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=0.05,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def test_trainer_at_strength_zero_matches_plain_trainer_on_cuda(tmp_path):
    data = make_classification_data(48)
    torch.manual_seed(0)
    plain_model = TinyClassifier()
    smooth_model = TinyClassifier()
    smooth_model.load_state_dict(plain_model.state_dict())
    Trainer(plain_model, training_args(tmp_path / "p", TrainingArguments), train_dataset=data).train()
    SmoothOutTrainer(smooth_model, training_args(tmp_path / "s", smoothout_strength=0.0), train_dataset=data).train()
    assert next(smooth_model.parameters()).is_cuda
    assert_params_equal(smooth_model, clone_params(plain_model))


class WeightsBeforeOptimizerStep(TrainerCallback):
    """Asserts that the optimizer step sees exactly the weights the training step started from."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.checked = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.start = clone_params(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        assert_params_equal(model, self.start)
        self.checked += 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_optimizer_step_sees_clean_weights_under_mixed_precision(tmp_path, precision):
    data = make_classification_data(48)
    torch.manual_seed(0)
    check = WeightsBeforeOptimizerStep()
    args = training_args(tmp_path, smoothout_strength=0.05, smoothout_adapt="filter", **{precision: True})
    trainer = SmoothOutTrainer(TinyClassifier(), args, train_dataset=data, callbacks=[check])
    trainer.train()
    assert check.checked == 6
    assert not trainer.smoothout.is_perturbed


def test_bert_trains_under_bf16_with_smoothout_on_cuda(tmp_path):
    """A transformer through the whole Trainer loop: finite losses, strength logged, weights moved."""
    model = small_bert()
    start = clone_params(model)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 512, (16,), generator=g), "labels": torch.tensor(i % 2)} for i in range(64)]
    args = training_args(tmp_path, smoothout_strength=0.01, smoothout_adapt="filter", bf16=True)
    trainer = SmoothOutTrainer(model, args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert any("smoothout_strength" in log for log in trainer.state.log_history)
    assert not torch.equal(model.classifier.weight, start["classifier.weight"])
    assert not trainer.smoothout.is_perturbed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merged_space_on_cuda_never_writes_the_base_and_matches_the_hand_gradient(dtype):
    pytest.importorskip("peft")
    from test_lora_merged import batch, hand_gradients, lora_stack

    model = lora_stack(dim=64, depth=3, dtype=dtype).cuda()
    clean = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))
    data = {k: v.cuda() for k, v in batch(dim=64).items()}
    data["x"] = data["x"].to(dtype)
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()
        head = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
        model(**data)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.equal(p.detach(), clean[n]) for n, p in model.named_parameters() if n in clean)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for name, grad in hand_gradients(model, noisy, head, data).items():
        torch.testing.assert_close(grads[name].float(), grad.float(), **tolerance, msg=name)


# ---------------------------------------------------------------------------------------------- the fused kernel
needs_triton = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="triton is not installed (the [gpu] extra)"
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("restore", ["copy", "swap"])
@pytest.mark.parametrize("adapt", ["filter", "filter_std", "none", "weight"])
def test_the_triton_kernel_restores_bit_exactly_on_cuda(dtype, restore, adapt):
    model = MixedModel().to("cuda", dtype)
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, restore=restore, seed=0, kernel="triton"))
    assert engine.describe()["kernel"] == "triton"
    for step in range(3):
        with engine.perturbed(step):
            assert not torch.equal(model.linear.weight, clean["linear.weight"])
        assert_params_equal(model, clean)


@needs_triton
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_the_triton_kernel_draws_the_filter_law_like_the_torch_path_on_cuda(distribution):
    ratios = {}
    for kernel in ("auto", "triton"):
        model = MixedModel().cuda()
        clean = clone_params(model)
        engine = SmoothOut(
            model, SmoothOutConfig(strength=0.02, adapt="filter", distribution=distribution, seed=0, kernel=kernel)
        )
        engine.perturb()
        for name, dims in (("embedding.weight", (1,)), ("linear.weight", (1,)), ("conv.weight", (1, 2, 3))):
            noise = dict(model.named_parameters())[name].detach().double() - clean[name].double()
            ratio = torch.linalg.vector_norm(noise, dim=dims) / torch.linalg.vector_norm(clean[name].double(), dim=dims)
            torch.testing.assert_close(ratio, torch.full_like(ratio, 0.02), rtol=2e-4, atol=0)
            ratios[(kernel, name)] = noise
        engine.restore()
    assert not torch.equal(ratios[("auto", "linear.weight")], ratios[("triton", "linear.weight")])  # own numbers
