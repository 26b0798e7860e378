"""Two-process DDP check of ``space="lora_merged"``, launched by tests/test_lora_merged_ddp.py with
``torchrun --standalone --nproc_per_node 2 tests/ddp_lora_train.py --use_cpu --output_dir DIR ...``.

Rank 0 writes ``DIR/ddp_result.json``: world size, whether ranks drew different merged-space noise, whether
every parameter is bit-identical across ranks, and whether the frozen base weights are untouched.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TinyClassifier, make_classification_data
from replica_checks import replica_facts, write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = get_peft_model(
        TinyClassifier(dim=6, hidden=32, dropout=0.1), LoraConfig(r=4, target_modules=["fc1", "fc2"])
    )
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = SmoothOutTrainer(model, args, train_dataset=make_classification_data(n=256))
    first_noisy: list[torch.Tensor] = []
    space = trainer.smoothout.merged_space
    layer = space.layers[0]

    def record(module, _inputs):
        if space.is_armed and not first_noisy:  # the cosine ramp draws nothing at step 0
            first_noisy.append(space.noisy_weights()[layer.name] - layer.weight.detach())

    layer.base.register_forward_pre_hook(record)
    trainer.train()

    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    facts = replica_facts(first_noisy[0].flatten(), params)
    named = dict(model.named_parameters())
    result = {
        "world_size": dist.get_world_size(),
        "args_world_size": args.world_size,
        **facts,
        "merged_layers": trainer.smoothout.merged_layer_names,
        "base_unchanged": all(torch.equal(named[n].detach(), t) for n, t in base.items()),
        "adapters_changed": all(not torch.equal(named[n].detach(), t) for n, t in adapters.items()),
        "steps": trainer.state.global_step,
    }
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "ddp_result.json"), result)


if __name__ == "__main__":
    main()
