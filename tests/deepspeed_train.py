"""Two-process DeepSpeed ZeRO check, launched by tests/test_deepspeed.py with
``torchrun --standalone --nproc_per_node 2 tests/deepspeed_train.py --deepspeed CONFIG --output_dir DIR ...``
(``DS_ACCELERATOR=cpu``).

A tiny BERT classifier (built from a config) trains with SmoothOut; after every optimizer step each rank
compares the module's weights with DeepSpeed's fp32 master partition. Rank 0 writes
``DIR/deepspeed_result.json``: world size, ZeRO stage, per-step master equality, whether ranks drew
different noise, and whether the weights are bit-identical across ranks at the end.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from conftest import ListDataset
from replica_checks import replica_facts, write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments


def token_data(n: int = 256, length: int = 16, vocab: int = 64) -> ListDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    labels = (ids[:, :4].sum(1) % 2).long()
    return ListDataset([{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
                         "labels": labels[i]} for i in range(n)])  # fmt: skip


class MasterCheck(TrainerCallback):
    """After each optimizer step: do the module's weights equal DeepSpeed's fp32 master (cast to their dtype)?"""

    def __init__(self) -> None:
        self.trainer = None
        self.equal: list[bool] = []

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = self.trainer.model_wrapped.optimizer
        rank = dist.get_rank()
        self.equal.append(
            all(
                torch.equal(bit16[rank], master.to(bit16[rank].dtype))
                for bit16, master in zip(
                    optimizer.parallel_partitioned_bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True
                )
            )
        )


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    if os.environ.get("SMOOTHOUT_TEST_RESTORE_AFTER_STEP") == "1":  # the broken order, to show the test bites
        import hf_smoothout.trainer as glue

        glue.restore_before_step = lambda engine, restore: False
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    model.accepts_loss_kwargs = False
    first_noisy: list[torch.Tensor] = []
    clean_start = model.classifier.weight.detach().clone()

    def record(module, _inputs):
        if module.training and not first_noisy:
            first_noisy.append(module.classifier.weight.detach().float().clone())

    model.register_forward_pre_hook(record)
    trainer = SmoothOutTrainer(model, args, train_dataset=token_data())
    check = MasterCheck()
    check.trainer = trainer
    trainer.add_callback(check)
    trainer.train()

    params = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    facts = replica_facts((first_noisy[0] - clean_start).flatten(), params)
    result = {
        "world_size": dist.get_world_size(),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "dtype": str(next(model.parameters()).dtype),
        "steps": trainer.state.global_step,
        "master_equal_each_step": check.equal,
        "restore_mode": trainer.smoothout.restore_mode,  # "auto" must not swap views into DeepSpeed's flat groups
        **facts,
        "params_changed": not torch.equal(model.classifier.weight.detach().float(), clean_start),
    }
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "deepspeed_result.json"), result)


if __name__ == "__main__":
    main()
