"""Two-process DDP check, launched by tests/test_ddp.py with
``torchrun --standalone --nproc_per_node 2 tests/ddp_train.py --use_cpu --output_dir DIR ...``.

Rank 0 writes ``DIR/ddp_result.json``: world size, whether ranks drew different noise, and
whether all parameters are bit-identical across ranks after training.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TinyClassifier, make_classification_data

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = TinyClassifier(dim=6, hidden=32, dropout=0.1)
    first_noisy: list[torch.Tensor] = []

    def record(module, _inputs):
        if module.training and not first_noisy:
            first_noisy.append(module.fc1.weight.detach().clone())

    model.register_forward_pre_hook(record)
    clean_start = model.fc1.weight.detach().clone()
    trainer = SmoothOutTrainer(model, args, train_dataset=make_classification_data(n=256))
    trainer.train()

    world = dist.get_world_size()
    noise = (first_noisy[0] - clean_start).flatten()
    noises = [torch.empty_like(noise) for _ in range(world)]
    dist.all_gather(noises, noise)
    params = flat_params(model)
    all_params = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(all_params, params)
    if dist.get_rank() == 0:
        result = {
            "world_size": world,
            "args_world_size": args.world_size,
            "noise_differs_across_ranks": not torch.equal(noises[0], noises[1]),
            "params_identical_across_ranks": all(torch.equal(all_params[0], p) for p in all_params[1:]),
            "params_changed": not torch.equal(model.fc1.weight.detach(), clean_start),
            "steps": trainer.state.global_step,
            "logged_strength": [h.get("smoothout_strength") for h in trainer.state.log_history if "loss" in h],
        }
        with open(os.path.join(args.output_dir, "ddp_result.json"), "w") as f:
            json.dump(result, f)
    del trainer, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
