"""TRL's preference and RL trainers with SmoothOut: reference passes and rollouts see the clean policy.

``DPOTrainer`` with a PEFT model and no ``ref_model`` computes the reference log-probs inside ``compute_loss`` with
the adapters disabled; ``GRPOTrainer`` generates and scores completions in ``_prepare_inputs``, inside
``training_step``. Only the policy loss's forward and backward passes may see noise, in both noise spaces.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_lora_merged import word_level_tokenizer

from hf_smoothout import SmoothOutConfig, SmoothOutMixin

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

VOCAB = 64
pytestmark = pytest.mark.slow


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=1
    )
    return transformers.GPT2LMHeadModel(config)


def lora_config():
    return peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM", fan_in_fan_out=True)


def words(g: torch.Generator, n: int) -> str:
    return " ".join(f"t{int(i)}" for i in torch.randint(4, VOCAB, (n,), generator=g))


class LayerProbe:
    """Forward hooks on every PEFT LoRA layer and on the model: a pass with the adapters disabled (a reference
    pass) must compute exactly the clean base layer; a pass without gradient (generation, scoring, reference)
    must find the engine's weights clean unless it is inside the loss; the policy loss must see noise."""

    def __init__(self, model: torch.nn.Module, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref
        self.reference_layer_calls = 0
        self.reference_mismatch = 0.0
        self.no_grad_noisy_outside_loss = 0
        self.no_grad_calls = 0
        self.policy_noisy_calls = 0
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.register_forward_hook(self._layer)
        model.register_forward_pre_hook(self._model)

    def _engine(self):
        return self.trainer_ref[0].smoothout

    def _layer(self, module, args, output):
        reference = module.disable_adapters or "ref" in module.active_adapters  # TRL's two reference routes
        if not reference:
            return
        self.reference_layer_calls += 1
        base = module.get_base_layer()
        x = args[0]
        weight = base.weight.detach()
        expected = F.linear(x, weight.t() if getattr(module, "fan_in_fan_out", False) else weight, base.bias)
        if not module.disable_adapters:  # the "ref" adapter: a frozen copy, added cleanly
            for name in module.active_adapters:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                expected = expected + module.scaling[name] * (x @ a.t() @ b.t())
        self.reference_mismatch = max(self.reference_mismatch, float((output - expected).abs().max()))

    def _model(self, module, args):
        engine = self._engine()
        noisy = engine is not None and engine.is_noisy
        trainer = self.trainer_ref[0]
        if torch.is_grad_enabled():
            self.policy_noisy_calls += int(noisy)
            return
        self.no_grad_calls += 1
        if noisy and not trainer._smoothout_opened:
            self.no_grad_noisy_outside_loss += 1


def dpo_rows(n: int = 8) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt": words(g, 4), "chosen": words(g, 3), "rejected": words(g, 3)} for _ in range(n)]


class SmoothOutDPOTrainer(SmoothOutMixin, trl.DPOTrainer):
    pass


class SmoothOutGRPOTrainer(SmoothOutMixin, trl.GRPOTrainer):
    pass


def common_args(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
        logging_steps=1,
    )


@pytest.mark.parametrize("route", ["peft_config", "peft_model"])
@pytest.mark.parametrize("space", ["trainable", "lora_merged"])
def test_dpo_reference_log_probs_come_from_the_clean_base(tmp_path, space, route):
    model = tiny_gpt2()
    kwargs = {"peft_config": lora_config()} if route == "peft_config" else {}
    if route == "peft_model":
        model = peft.get_peft_model(model, lora_config())
    args = trl.DPOConfig(**common_args(tmp_path), max_length=16, beta=0.1)
    trainer = SmoothOutDPOTrainer(
        model=model,
        args=args,
        processing_class=word_level_tokenizer(VOCAB),
        train_dataset=datasets.Dataset.from_list(dpo_rows()),
        smoothout_config=SmoothOutConfig(strength=0.05, space=space, seed=0),
        **kwargs,
    )
    ref = [trainer]
    probe = LayerProbe(trainer.model, ref)
    trainer.train()
    assert trainer.ref_model is None and probe.reference_layer_calls > 0  # the reference pass ran, adapters off
    assert probe.reference_mismatch == 0.0
    assert probe.policy_noisy_calls > 0
    assert not trainer.smoothout.is_perturbed


@pytest.mark.parametrize("space", ["trainable", "lora_merged"])
def test_grpo_rollouts_and_their_scores_come_from_the_clean_policy(tmp_path, space):
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt": words(g, 3)} for _ in range(8)]
    generated: list[bool] = []

    def reward_length(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    args = trl.GRPOConfig(
        **common_args(tmp_path),
        num_generations=2,
        max_completion_length=4,
        generation_batch_size=4,
        beta=0.04,  # a reference pass (adapters disabled) as well
    )
    trainer = SmoothOutGRPOTrainer(
        model=tiny_gpt2(),
        reward_funcs=reward_length,
        args=args,
        processing_class=word_level_tokenizer(VOCAB),
        train_dataset=datasets.Dataset.from_list(prompts),
        peft_config=lora_config(),
        smoothout_config=SmoothOutConfig(strength=0.05, space=space, seed=0),
    )
    ref = [trainer]
    probe = LayerProbe(trainer.model, ref)
    generate = trainer.model.generate

    def watched_generate(*a, **k):
        generated.append(trainer.smoothout is not None and trainer.smoothout.is_noisy)
        return generate(*a, **k)

    trainer.model.generate = watched_generate
    trainer.train()
    assert generated and not any(generated)  # rollouts at the clean policy
    assert probe.no_grad_calls > 0 and probe.no_grad_noisy_outside_loss == 0
    assert probe.reference_layer_calls > 0 and probe.reference_mismatch == 0.0
    assert probe.policy_noisy_calls > 0
