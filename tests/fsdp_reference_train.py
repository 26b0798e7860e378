"""FSDP2 training equals unsharded training with the same global noise: launched by tests/test_fsdp.py with
``torchrun --standalone --nproc_per_node 2 tests/fsdp_reference_train.py --use_cpu --output_dir DIR ...``
(``gradient_accumulation_steps`` 1, dropout off).

Two ranks train a tiny BERT sharded by transformers' FSDP2 with SmoothOut; the global noise of every step
(the gathered noisy minus clean weights) and every rank's batch are recorded. Rank 0 then replays the run
on one unsharded copy: per step, add the recorded noise, backward on both ranks' batches (each loss / 2,
as data parallelism averages), restore, clip, AdamW step with the Trainer's linear schedule. It writes
``DIR/fsdp_reference_result.json``: the largest weight difference to the sharded run, and the same for a
replay without the noise (how much the noise moved the weights).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, HfArgumentParser
from transformers.distributed import DistributedConfig

sys.path.insert(0, os.path.dirname(__file__))
from deepspeed_train import token_data
from replica_checks import write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments


def replay(path: str, noises: list[list[torch.Tensor]], batches: list[list[dict]], args, scale: float) -> dict:
    """The unsharded run with ``scale`` times the recorded noise; returns its final weights by name."""
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.train()
    params = list(model.parameters())
    steps = len(noises)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (steps - step) / steps))
    for step in range(steps):
        with torch.no_grad():
            clean = [p.detach().clone() for p in params]
            for p, noise in zip(params, noises[step], strict=True):
                p.add_(noise, alpha=scale)
        for rank_batches in batches:
            (model(**rank_batches[step]).loss / len(batches)).backward()
        with torch.no_grad():
            for p, c in zip(params, clean, strict=True):
                p.copy_(c)
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    assert args.world_size == 2 and args.gradient_accumulation_steps == 1
    path = os.path.join(args.output_dir, "tiny_bert")
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        BertForSequenceClassification(config).save_pretrained(path)
    dist.barrier()
    model = AutoModelForSequenceClassification.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=2))
    model.accepts_loss_kwargs = False
    batches: list[dict] = []

    def record_batch(module, _args, kwargs):
        if module.training:
            batches.append({k: v.detach().clone() for k, v in kwargs.items()})

    model.register_forward_pre_hook(record_batch, with_kwargs=True)
    trainer = SmoothOutTrainer(model, args, train_dataset=token_data())
    engine = trainer.smoothout_engine()
    noises: list[list[torch.Tensor]] = []
    perturb = engine.perturb
    all_params = list(model.parameters())

    def perturb_and_record(*a, **k):  # the global noise: gathered noisy minus gathered clean weights
        clean = [p.full_tensor().detach().clone() for p in all_params]
        strength = perturb(*a, **k)
        noises.append([p.full_tensor().detach() - c for p, c in zip(all_params, clean, strict=True)])
        return strength

    engine.perturb = perturb_and_record
    trainer.train()
    all_batches: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_batches, batches)
    sharded = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    result = {}
    if dist.get_rank() == 0:
        for label, scale in (("with_noise", 1.0), ("without_noise", 0.0)):
            reference = replay(path, noises, all_batches, args, scale)
            result[f"max_diff_{label}"] = max(float((reference[n] - sharded[n]).abs().max()) for n in sharded)
        result["steps"] = len(noises)
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "fsdp_reference_result.json"), result)


if __name__ == "__main__":
    main()
