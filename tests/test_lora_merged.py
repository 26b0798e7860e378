"""``space="lora_merged"``: noise on the merged weight ``W + s*B*A`` of PEFT LoRA layers, exact, with no base copy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ListDataset, assert_params_equal, clone_params
from torch import nn
from torch.profiler import ProfilerActivity, profile

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from test_trainer import training_args  # noqa: E402

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer  # noqa: E402
from hf_smoothout.lora_merged import find_lora_layers  # noqa: E402


class Stack(nn.Module):
    """``depth`` square Linear layers with GELU between them and a classifier head, cross-entropy loss."""

    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        for layer in self.layers:
            x = nn.functional.gelu(layer(x))
        logits = self.head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def lora_stack(
    dim: int = 16, depth: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0, head: bool = True, **lora
) -> nn.Module:
    """A PEFT LoRA model of `Stack` with non-zero B (so W' differs from W) and, optionally, a trainable head."""
    torch.manual_seed(seed)
    base = Stack(dim, depth).to(dtype)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"layers\.\d+",
        modules_to_save=["head"] if head else None,
        **lora,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def merged_reference(layer) -> torch.Tensor:
    """``W + s*B*A`` as PEFT itself merges it (``get_delta_weight``), in float32, in the base weight's layout."""
    module = layer.module
    delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
    return layer.weight.detach().float() + delta


def batch(n: int = 32, dim: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, dim, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def dataset(n: int = 64, dim: int = 16) -> ListDataset:
    data = batch(n, dim, seed=2)
    return ListDataset([{"x": data["x"][i], "labels": data["labels"][i]} for i in range(n)])


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapt", ["filter", "filter_std", "none", "weight"])
def test_base_weights_bit_identical_after_training_steps(dtype, adapt):
    model = lora_stack(dtype=dtype)
    clean = base_weights(model)
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, space="lora_merged", seed=0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(6):
        data = batch(seed=step)
        with engine.perturbed(step):
            model(x=data["x"].to(dtype), labels=data["labels"])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, p in model.named_parameters():
            if "base_layer" in name:
                assert torch.equal(p.detach(), clean[name]), f"{name} changed at step {step}"
    assert all(not torch.equal(p.detach(), adapters_before[n]) for n, p in model.named_parameters() if "lora_" in n), (
        "the adapters should train"
    )


@pytest.mark.parametrize("adapt", ["filter", "filter_std", "none", "weight"])
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_adapter_gradient_equals_hand_gradient_at_the_perturbed_merged_weight(adapt, distribution):
    """Every adapter (and head) gradient equals the gradient of the same model with each base weight replaced by
    the noisy merged weight's base part, ``W + tau``: the noise reaches the input gradients of earlier layers too."""
    model = lora_stack(depth=3)
    engine = SmoothOut(
        model, SmoothOutConfig(strength=0.1, adapt=adapt, distribution=distribution, space="lora_merged", seed=4)
    )
    data = batch()
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()
        head_noisy = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
        model(**data)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    hand = hand_gradients(model, noisy, head_noisy, data)
    assert set(grads) == set(hand)
    assert any("lora_A" in n for n in grads) and any("modules_to_save" in n for n in grads)
    for name, grad in hand.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def hand_gradients(
    model: nn.Module, noisy: dict[str, torch.Tensor], head_noisy: dict[str, torch.Tensor], data: dict
) -> dict[str, torch.Tensor]:
    """The gradients of a copy of ``model`` whose LoRA base weights hold ``W + tau`` (``noisy``) and whose head
    holds its noisy values, computed by plain autograd with no engine (the copy's forward is the plain one)."""
    hand = copy.deepcopy(model)
    hand.zero_grad()
    with torch.no_grad():
        for layer in find_lora_layers(hand):
            layer.weight.copy_(noisy[layer.name])
        for name, p in hand.named_parameters():
            if name in head_noisy:
                p.copy_(head_noisy[name])
    hand(**data)["loss"].backward()
    return {n: p.grad for n, p in hand.named_parameters() if p.grad is not None}


def test_noise_is_real_and_changes_every_draw():
    model = lora_stack()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))
    data = batch()
    clean = model(**data)["logits"].detach()
    with engine.perturbed():
        first = model(**data)["logits"].detach()
        again = model(**data)["logits"].detach()  # same draw: same noise (gradient checkpointing relies on it)
    with engine.perturbed():
        second = model(**data)["logits"].detach()
    assert not torch.equal(first, clean) and not torch.equal(first, second)
    assert torch.equal(first, again)
    assert torch.equal(model(**data)["logits"].detach(), clean)  # disarmed: the plain LoRA forward again


# ---------------------------------------------------------------------------------------------------- noise laws
def test_filter_law_against_the_merged_row_norm():
    """Each row of tau has L2 norm a * ||W'_row|| with W' = W + s*B*A as PEFT merges it (not W's norm)."""
    model = lora_stack(dim=64, depth=2)
    a = 0.07
    engine = SmoothOut(model, SmoothOutConfig(strength=a, space="lora_merged", seed=1))
    layers = find_lora_layers(model)
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()
    for layer in layers:
        merged = merged_reference(layer)
        tau = noisy[layer.name].double() - layer.weight.double()
        torch.testing.assert_close(tau.norm(dim=1), a * merged.double().norm(dim=1), rtol=1e-4, atol=1e-7)
        base_norm = layer.weight.double().norm(dim=1)
        assert not torch.allclose(tau.norm(dim=1), a * base_norm, rtol=1e-2), "scaled by W, not W'"


def test_filter_std_gaussian_is_flat_loras_law():
    """filter_std + gaussian: tau_ij ~ N(0, (a * ||W'_i|| / sqrt(n))^2), as Flat-LoRA draws it."""
    model = lora_stack(dim=256, depth=1, head=False)
    a = 0.1
    engine = SmoothOut(
        model, SmoothOutConfig(strength=a, adapt="filter_std", distribution="gaussian", space="lora_merged", seed=2)
    )
    (layer,) = find_lora_layers(model)
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()[layer.name]
    std = a * merged_reference(layer).double().norm(dim=1, keepdim=True) / math.sqrt(256)
    z = (noisy.double() - layer.weight.detach().double()) / std
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01  # 65,536 samples: 4-5 sigma bounds
    row_ratio = (noisy.double() - layer.weight.double()).norm(dim=1) / (std.squeeze(1) * math.sqrt(256))
    assert float(row_ratio.min()) > 0.85 and float(row_ratio.max()) < 1.15 and float(row_ratio.std()) > 1e-3


def test_uniform_none_law_is_a_box():
    model = lora_stack(dim=64, depth=1, head=False)
    a = 0.003
    engine = SmoothOut(model, SmoothOutConfig(strength=a, adapt="none", space="lora_merged", seed=3))
    (layer,) = find_lora_layers(model)
    with engine.perturbed():
        tau = engine.merged_space.noisy_weights()[layer.name] - layer.weight
    assert float(tau.abs().max()) <= a * (1 + 1e-4) and float(tau.abs().max()) > 0.9 * a
    assert abs(float(tau.mean())) < 0.05 * a


def test_gpt2_conv1d_rows_are_output_columns():
    """GPT-2's Conv1D stores [in, out] (peft: fan_in_fan_out): rows of the law are columns of the stored weight."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = get_peft_model(
        transformers.GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    a = 0.05
    engine = SmoothOut(model, SmoothOutConfig(strength=a, space="lora_merged", seed=0))
    (layer,) = find_lora_layers(model)
    assert layer.row_axis == 1
    ids = torch.randint(0, 50, (2, 8))
    clean_base = layer.weight.detach().clone()
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()[layer.name]
        model(input_ids=ids, labels=ids).loss.backward()
    tau = noisy.double() - layer.weight.double()
    torch.testing.assert_close(tau.norm(dim=0), a * merged_reference(layer).double().norm(dim=0), rtol=1e-4, atol=0)
    assert torch.equal(layer.weight, clean_base)
    assert model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight.grad is not None


# ---------------------------------------------------------------------------------------------------- memory
def peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated by ``fn`` above what was allocated when it started (torch's CPU allocator
    events, as the profiler records them)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def test_peak_extra_memory_is_about_one_layer_not_the_base_model():
    dim, depth = 256, 12
    model = lora_stack(dim=dim, depth=depth, head=False)
    data = batch(n=8, dim=dim)
    layer_bytes = dim * dim * 4
    base_bytes = depth * layer_bytes

    def step() -> None:
        model(**data)["loss"].backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazily allocated gradients and caches on both sides
    plain = peak_cpu_bytes(step)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))

    def noisy_step() -> None:
        with engine.perturbed():
            step()

    first = peak_cpu_bytes(noisy_step)  # includes allocating the scratch buffers
    extra = first - plain
    # Scratch: the float32 merged weight (reused for W + tau) and the draw (2 layers), plus per-row vectors.
    assert extra <= 2.25 * layer_bytes, f"extra peak {extra} B vs one layer {layer_bytes} B"
    assert extra < base_bytes / 4, f"extra peak {extra} B vs base weights {base_bytes} B"
    assert engine.buffer_bytes == 2 * layer_bytes


def test_bf16_base_uses_three_layer_buffers():
    model = lora_stack(dim=64, depth=4, dtype=torch.bfloat16, head=False)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))
    data = batch(dim=64)
    with engine.perturbed():
        model(x=data["x"].bfloat16(), labels=data["labels"])["loss"].backward()
    assert engine.buffer_bytes == 64 * 64 * (4 + 4 + 2)  # merged f32, draw f32, W + tau in bf16


# ---------------------------------------------------------------------------------------------------- refusals
def test_refusals_say_what_to_do():
    with pytest.raises(ValueError, match="no PEFT LoRA Linear layer"):
        SmoothOut(Stack(), SmoothOutConfig(space="lora_merged"))
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    model = get_peft_model(emb, LoraConfig(r=2, target_modules=["0", "1"]))
    with pytest.raises(ValueError, match=r"supports LoRA on Linear layers.*Embedding"):
        SmoothOut(model, SmoothOutConfig(space="lora_merged"))
    dora = get_peft_model(Stack(), LoraConfig(r=2, target_modules=r"layers\.\d+", use_dora=True))
    with pytest.raises(ValueError, match="LoRA variant"):
        SmoothOut(dora, SmoothOutConfig(space="lora_merged"))
    with pytest.raises(ValueError, match="denoise=True"):
        SmoothOutConfig(space="lora_merged", denoise=False)
    with pytest.raises(ValueError, match="space"):
        SmoothOutConfig(space="merged")


def test_a_quantized_base_other_than_bitsandbytes_is_refused():
    model = lora_stack(head=False)
    layer = find_lora_layers(model)[0]
    layer.base.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit or 8-bit weight"):
        SmoothOut(model, SmoothOutConfig(space="lora_merged"))


def test_include_exclude_apply_to_merged_layers_and_the_head_follows_the_parameter_rules():
    model = lora_stack(depth=3)
    engine = SmoothOut(model, SmoothOutConfig(space="lora_merged", exclude=[r"layers\.1\."]))
    assert engine.merged_layer_names == ["base_model.model.layers.0", "base_model.model.layers.2"]
    assert all("lora_" not in n for n in engine.parameter_names)
    assert any("modules_to_save" in n for n in engine.parameter_names)
    clean_head = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
    with engine.perturbed():
        assert any(not torch.equal(p, clean_head[n]) for n, p in model.named_parameters() if n in clean_head)
    assert all(torch.equal(p, clean_head[n]) for n, p in model.named_parameters() if n in clean_head)


def test_detach_restores_the_plain_forward_and_a_newer_engine_takes_over():
    model = lora_stack()
    data = batch()
    clean = model(**data)["logits"].detach()
    old = SmoothOut(model, SmoothOutConfig(space="lora_merged", seed=0))
    new = SmoothOut(model, SmoothOutConfig(space="lora_merged", seed=1))
    with pytest.raises(RuntimeError, match="newer engine"):
        old.perturb()
    assert not old.is_perturbed
    with new.perturbed():
        assert not torch.equal(model(**data)["logits"].detach(), clean)
    new.detach()
    head = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
    with pytest.raises(RuntimeError, match="removed"):
        new.perturb()
    assert not new.is_perturbed
    assert all(torch.equal(p, head[n]) for n, p in model.named_parameters() if n in head)
    assert torch.equal(model(**data)["logits"].detach(), clean)
    assert all("forward" not in layer.base.__dict__ for layer in find_lora_layers(model))


# ---------------------------------------------------------------------------------------------------- Trainer
def test_trainer_trains_adapters_and_never_writes_the_base(tmp_path):
    model = lora_stack()
    clean = base_weights(model)
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps")
    trainer = SmoothOutTrainer(
        model,
        args,
        train_dataset=dataset(),
        eval_dataset=dataset(16),
        smoothout_config=SmoothOutConfig(strength=0.05, space="lora_merged", seed=0),
    )
    trainer.train()
    assert_params_equal_subset(model, clean)
    assert trainer.smoothout.merged_layer_names
    assert not trainer.smoothout.merged_space.is_armed


def assert_params_equal_subset(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for name, tensor in reference.items():
        assert torch.equal(named[name].detach(), tensor), f"{name} differs"


def capture_noisy(monkeypatch) -> list[torch.Tensor]:
    """Record the W + tau of the first LoRA layer at every armed forward."""
    from hf_smoothout import lora_merged

    seen: list[torch.Tensor] = []
    original = lora_merged._NoisyBase.forward

    def forward(ctx, x, bias, space, layer, armed):
        if layer.index == 0:
            seen.append(space.noisy_weight(layer, armed)[0].clone())
        return original(ctx, x, bias, space, layer, armed)

    monkeypatch.setattr(lora_merged._NoisyBase, "forward", staticmethod(forward))
    return seen


@pytest.mark.parametrize("noise_every", ["micro_batch", "step"])
def test_noise_per_micro_batch_or_once_per_step(tmp_path, monkeypatch, noise_every):
    seen = capture_noisy(monkeypatch)
    model = lora_stack()
    args = training_args(tmp_path, max_steps=2, gradient_accumulation_steps=3, per_device_train_batch_size=4)
    cfg = SmoothOutConfig(strength=0.05, space="lora_merged", noise_every=noise_every, seed=0)
    SmoothOutTrainer(model, args, train_dataset=dataset(), smoothout_config=cfg).train()
    assert len(seen) == 6
    for window in (seen[:3], seen[3:]):
        same = [torch.equal(window[0], w) for w in window[1:]]
        assert all(same) if noise_every == "step" else not any(same)
    assert not torch.equal(seen[0], seen[3])


def test_resume_is_bit_identical(tmp_path):
    cfg = SmoothOutConfig(strength=0.05, space="lora_merged", schedule="cosine", seed=3)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full_model = lora_stack()
    SmoothOutTrainer(
        full_model, training_args(tmp_path / "full", **common), train_dataset=dataset(), smoothout_config=cfg
    ).train()
    resumed_model = lora_stack()
    SmoothOutTrainer(
        resumed_model, training_args(tmp_path / "resumed", **common), train_dataset=dataset(), smoothout_config=cfg
    ).train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert_params_equal(resumed_model, clone_params(full_model))


def tiny_bert_lora(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "dense"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert_lora()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        engine = SmoothOut(model, SmoothOutConfig(strength=0.1, space="lora_merged", seed=0))
        with engine.perturbed():
            model(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def word_level_tokenizer(vocab_size: int):
    """A tokenizer built in code (no Hub): tokens ``t0 ... t{n-1}``, with pad/eos/bos/unk among them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {name: i for i, name in enumerate(specials + [f"t{i}" for i in range(len(specials), vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def test_mixin_composes_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    from hf_smoothout import SmoothOutMixin

    class SmoothOutSFTTrainer(SmoothOutMixin, trl.SFTTrainer):
        pass

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 64, (16,), generator=g).tolist()} for _ in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataset_text_field=None,
        bf16=False,
    )
    trainer = SmoothOutSFTTrainer(
        model=model,
        args=args,
        processing_class=word_level_tokenizer(64),
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        smoothout_config=SmoothOutConfig(strength=0.05, space="lora_merged", schedule="cosine", seed=0),
    )
    calls = []
    trainer.smoothout_engine()  # built on the PEFT model SFTTrainer made
    for layer in find_lora_layers(trainer.model):
        layer.base.register_forward_hook(lambda *_: calls.append(trainer.smoothout.is_perturbed))
    trainer.train()
    assert len(trainer.smoothout.merged_layer_names) == 4
    assert any(calls), "LoRA layers ran with merged-space noise armed"
    for name, p in trainer.model.named_parameters():
        if "base_layer" in name:
            original = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), clean[original]), name


@pytest.mark.multiprocess
def test_two_process_ddp_draws_per_rank_and_keeps_replicas_identical(tmp_path):
    import json
    import sys
    from pathlib import Path

    from conftest import run_launcher

    steps = 12
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).with_name("ddp_lora_train.py")), "--use_cpu", "--output_dir", str(tmp_path)]
    cmd += ["--max_steps", str(steps), "--per_device_train_batch_size", "8", "--learning_rate", "0.05"]
    cmd += ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "3"]
    cmd += ["--smoothout_strength", "0.1", "--smoothout_space", "lora_merged", "--smoothout_schedule", "cosine"]
    run_launcher(cmd)
    result = json.loads((tmp_path / "ddp_result.json").read_text())
    assert result["world_size"] == 2 and result["args_world_size"] == 2
    assert result["steps"] == steps
    assert result["merged_layers"] == ["base_model.model.fc1", "base_model.model.fc2"]
    assert result["noise_differs_across_ranks"]
    assert result["params_identical_across_ranks"]
    assert result["base_unchanged"] and result["adapters_changed"]
