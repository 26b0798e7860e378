"""Two-process FSDP2 check of ``space="lora_merged"``, launched by tests/test_fsdp_lora.py with
``torchrun --standalone --nproc_per_node 2 tests/fsdp_lora_train.py --use_cpu --output_dir DIR --fsdp full_shard
--fsdp_config '{"version": 2, ...}' --smoothout_space lora_merged ...``.

A tiny BERT classifier with PEFT LoRA adapters (``init_lora_weights=False``: ``B != 0``, so the merged weight
differs from the base) is sharded by accelerate's FSDP2 plugin inside ``train``, as users run it (TRL's
``SFTTrainer`` + PEFT + FSDP2 take the same route). Checks:

- the frozen base weights are bit-identical to the start on every rank, after every step;
- the adapter gradients of the first step equal the hand gradient: each rank replays its micro-batch on an unsharded
  copy whose base weights are set to the noisy ``W + tau`` its forward computed with (minus ``s*B*A``), the gradients
  are averaged over the ranks (what FSDP2's reduce-scatter does) and compared with FSDP2's gathered gradients;
- the noise per layer has the law (``adapt="filter"``: row norms ``a * ||W'_row||``) and, with the default
  ``independent_ranks=True``, differs between the ranks (each rank's forward computes at its own ``W' + tau``; the
  base is frozen, so nothing can diverge).

Rank 0 writes ``DIR/fsdp_lora_result.json``.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from deepspeed_train import token_data
from fsdp_train import emulate_accelerate_fsdp_on_cpu, full
from golden_hashes import fingerprint
from replica_checks import write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments

TARGETS = ["query", "value", "intermediate.dense"]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                      task_type="SEQ_CLS")  # fmt: skip
    return get_peft_model(BertForSequenceClassification(config), lora)


def full_named(model: torch.nn.Module, word: str) -> dict[str, torch.Tensor]:
    return {n: full(p).detach().clone() for n, p in model.named_parameters() if word in n}


class BaseUnchanged(TrainerCallback):
    """Before every optimizer step: are the frozen base weights bit-identical to the start (gathered)?"""

    def __init__(self, start: dict[str, torch.Tensor]) -> None:
        self.start, self.equal = start, []
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        now = full_named(model, "base_layer")
        self.equal.append(all(torch.equal(now[n], self.start[n]) for n in self.start))
        if not self.grads:  # the first step's adapter gradients, gathered from the shards
            self.grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def trained_in_place(name: str, param: torch.nn.Parameter) -> bool:
    """A trainable weight that is no adapter: SmoothOut perturbs it in place (its FSDP2 shards)."""
    return param.requires_grad and "lora_" not in name


def gradient_error(replica: torch.nn.Module, inputs: dict, fsdp_grads: dict[str, torch.Tensor]) -> float:
    """Largest relative difference between FSDP2's adapter gradients and ``replica``'s on this rank's ``inputs``,
    averaged over the ranks (as FSDP2's reduce-scatter averages them)."""
    replica.train()
    replica(**inputs).loss.backward()
    error = 0.0
    for name, p in replica.named_parameters():
        if name not in fsdp_grads or p.grad is None or not bool(fsdp_grads[name].any()):
            continue  # lora_A of a layer whose B starts at zero: no gradient either way
        grad = p.grad.detach().clone()
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
        error = max(error, float((fsdp_grads[name] - grad).abs().max() / grad.abs().max()))
    return error


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    assert args.world_size == 2 and args.gradient_accumulation_steps == 1
    model = build()
    replica = copy.deepcopy(model)  # unsharded, for the hand gradient
    clean_replica = copy.deepcopy(model)  # ... and at the clean weights, to show the noise matters
    start_base = full_named(model, "base_layer")
    start_adapters = full_named(model, "lora_")
    emulate_accelerate_fsdp_on_cpu()
    model.accepts_loss_kwargs = False  # the mean loss of the micro-batch, as the replica computes it
    trainer = SmoothOutTrainer(model, args, train_dataset=token_data())
    module_trainer = [trainer]  # for the hooks (the engine is rebuilt on the shards inside train)
    assert trainer.is_fsdp_enabled
    first_inputs: list[dict] = []
    noisy: dict[str, torch.Tensor] = {}  # the first micro-batch's W + tau per LoRA layer, as its forward built it

    def record_inputs(module, _args, kwargs):
        if module.training and not first_inputs:
            first_inputs.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            # the other trainable weights (the classifier PEFT keeps trainable) take their noise in place, as shards
            noisy.update({n: full(p).detach().clone() for n, p in module.named_parameters() if trained_in_place(n, p)})

    def record_noisy(name):
        def hook(module, _inputs):
            engine = module_trainer[0].smoothout
            space = engine.merged_space if engine is not None else None
            if module.training and space is not None and space.is_armed and name not in noisy:
                layer = next(layer for layer in space.layers if layer.name == name)
                noisy[name] = space.noisy_weight(layer, space._armed)[0].detach().clone()

        return hook

    model.register_forward_pre_hook(record_inputs, with_kwargs=True)
    lora_names = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for name in lora_names:
        model.get_submodule(name).register_forward_pre_hook(record_noisy(name))
    check = BaseUnchanged(start_base)
    trainer.add_callback(check)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    space = trainer.smoothout.merged_space
    assert space is not None and sorted(layer.name for layer in space.layers) == sorted(lora_names)
    end_adapters = full_named(trainer.model, "lora_")
    end_base = full_named(trainer.model, "base_layer")
    result = {
        "world_size": dist.get_world_size(),
        "layers": len(lora_names),
        "steps": trainer.state.global_step,
        "draws": trainer.smoothout.state_dict()["draws"],
        "base_unchanged_each_step": check.equal,
        "base_unchanged_at_end": all(torch.equal(end_base[n], start_base[n]) for n in start_base),
        "adapters_changed": any(not torch.equal(end_adapters[n], start_adapters[n]) for n in start_adapters),
        "final_adapters": fingerprint(end_adapters, start_adapters)["sha256"],
        "engine_on_shards": trainer.smoothout.describe()["placement"],
    }
    if args.resume_from_checkpoint is None:  # the replica holds the starting adapters: the first step only
        result.update(hand_gradient_checks(trainer, replica, clean_replica, lora_names, noisy, first_inputs, check))
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "fsdp_lora_result.json"), result)


def hand_gradient_checks(trainer, replica, clean_replica, lora_names, noisy, first_inputs, check) -> dict:
    """The first step's noise law and adapter gradients against an unsharded replica at ``W + tau`` (its adapters
    as at the start), on this rank's first micro-batch."""
    strength = trainer.smoothout.config.strength  # the constant schedule: the first step's strength
    row_errors, same_noise = [], []
    for name in lora_names:
        lora_layer = replica.get_submodule(name)
        base = lora_layer.base_layer
        delta = lora_layer.get_delta_weight("default")  # s * B @ A, the adapters' share of W'
        merged = base.weight.detach() + delta.detach()
        tau = noisy[name] - base.weight.detach()
        row_errors.append(float(((tau.norm(dim=1) - strength * merged.norm(dim=1)).abs() / merged.norm(dim=1)).max()))
        gathered = [torch.empty_like(tau) for _ in range(2)]
        dist.all_gather(gathered, tau.contiguous())
        same_noise.append(torch.equal(gathered[0], gathered[1]))
        with torch.no_grad():
            base.weight.copy_(noisy[name])
    with torch.no_grad():
        for n, p in replica.named_parameters():
            if trained_in_place(n, p):
                p.copy_(noisy[n])
    hand_error, clean_error = (gradient_error(m, first_inputs[0], check.grads) for m in (replica, clean_replica))
    return {
        "max_relative_row_norm_error": max(row_errors),
        "noise_differs_across_ranks": not any(same_noise),
        "hand_gradient_max_relative_error": hand_error,
        "clean_gradient_max_relative_error": clean_error,
    }


if __name__ == "__main__":
    main()
