"""Two-process DDP check, launched by tests/test_ddp.py with
``torchrun --standalone --nproc_per_node 2 tests/ddp_train.py --use_cpu --output_dir DIR ...``.

Rank 0 writes ``DIR/ddp_result.json``: world size, whether ranks drew different noise, and
whether all parameters are bit-identical across ranks after training.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TinyClassifier, make_classification_data
from golden_hashes import fingerprint
from replica_checks import replica_facts, write_result_and_shut_down

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
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SmoothOutTrainer(model, args, train_dataset=make_classification_data(n=256))
    trainer.train()

    facts = replica_facts((first_noisy[0] - clean_start).flatten(), flat_params(model))
    result = {
        "world_size": dist.get_world_size(),
        "args_world_size": args.world_size,
        **facts,
        "params_changed": not torch.equal(model.fc1.weight.detach(), clean_start),
        "steps": trainer.state.global_step,
        "logged_strength": [h.get("smoothout_strength") for h in trainer.state.log_history if "loss" in h],
        "golden": {  # rank 0's first noisy weight and the final weights (tests/golden/noise.json)
            "first_noise": fingerprint({"fc1.weight": first_noisy[0]}, {"fc1.weight": clean_start}),
            "final": fingerprint(dict(model.named_parameters()), start),
        },
    }
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "ddp_result.json"), result)


if __name__ == "__main__":
    main()
