"""Two-process FSDP2 resume check, launched by tests/test_fsdp.py with
``torchrun --standalone --nproc_per_node 2 tests/fsdp_resume_train.py --use_cpu --output_dir DIR --save_only_model
true --save_strategy steps --save_steps K --max_steps N ...``.

A tiny BERT (dropout on) is loaded sharded (``DistributedConfig(fsdp_size=2)``) and trained N steps with SmoothOut,
checkpointing every K steps; a second, freshly loaded copy resumes from ``checkpoint-K`` and trains to N. Rank 0
writes ``DIR/fsdp_resume_result.json``: whether the resumed weights equal the uninterrupted ones bit for bit.

``FSDP_TEST_ROUTE=accelerate``: the model is loaded whole and accelerate's FSDP plugin shards it (pass ``--fsdp
full_shard --fsdp_config ...``); the checkpoints are the Trainer's own FSDP ones (no ``--save_only_model``).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(__file__))
from deepspeed_train import token_data
from fsdp_train import build, emulate_accelerate_fsdp_on_cpu, full_weights, load
from replica_checks import write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.adapters.sharded_checkpoint import has_sharded_state
from hf_smoothout.sharded_resume import ShardedResumeMixin

ROUTE = os.environ.get("FSDP_TEST_ROUTE", "transformers")


class ResumableTrainer(ShardedResumeMixin, SmoothOutTrainer):
    """The opt-in sharded resume (DistributedConfig)."""


def train(args: SmoothOutTrainingArguments, path: str, out: str, resume: str | None = None):
    model = load(path, ROUTE, 2)
    model.accepts_loss_kwargs = False
    run_args = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, out))
    assert run_args.world_size == 2  # new arguments set the process state up afresh
    if ROUTE == "accelerate":
        emulate_accelerate_fsdp_on_cpu()
    trainer = ResumableTrainer(model, run_args, train_dataset=token_data())
    assert trainer.is_fsdp_enabled == (ROUTE == "accelerate")
    trainer.train(resume_from_checkpoint=resume)
    return full_weights(trainer.model), trainer.smoothout.state_dict()["draws"], trainer.state.global_step


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    assert args.world_size == 2 and args.save_only_model == (ROUTE == "transformers")
    path = os.path.join(args.output_dir, "tiny_bert")
    if dist.get_rank() == 0:
        build("bert").save_pretrained(path)
    dist.barrier()
    initial = full_weights(load(path, ROUTE, 2))
    full, full_draws, full_steps = train(args, path, "full")
    checkpoint = os.path.join(args.output_dir, "full", f"checkpoint-{args.save_steps:g}")
    resumed, resumed_draws, resumed_steps = train(args, path, "resumed", resume=checkpoint)
    result = {
        "world_size": dist.get_world_size(),
        "sharded_state_saved": has_sharded_state(checkpoint),
        "checkpoint_files": sorted(os.listdir(checkpoint)),
        "steps": [full_steps, resumed_steps],
        "draws": [full_draws, resumed_draws],
        "trained": any(not torch.equal(full[n], initial[n]) for n in full),
        "resumed_equals_uninterrupted": all(torch.equal(full[n], resumed[n]) for n in full),
        "max_difference": max(float((full[n] - resumed[n]).abs().max()) for n in full),
    }
    write_result_and_shut_down(os.path.join(args.output_dir, "fsdp_resume_result.json"), result)


if __name__ == "__main__":
    main()
