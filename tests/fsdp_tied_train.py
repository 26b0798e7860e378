"""Two-process FSDP2 check of a causal LM whose input embedding and output head share one weight, launched by
tests/test_fsdp.py with
``torchrun --standalone --nproc_per_node 2 tests/fsdp_tied_train.py --use_cpu --output_dir DIR ...``.

A tiny GPT-2 LM (``tie_word_embeddings``, vocabulary ``FSDP_TEST_VOCAB``, default 65; with ``FSDP_TEST_PAD=n`` the
embedding is padded to a multiple of ``n`` rows by ``resize_token_embeddings`` before saving) is saved and loaded
sharded by transformers' own ``DistributedConfig(fsdp_size=2)`` (which ties the weights after ``fully_shard``), then
trained
with SmoothOut, with evaluation passes before and between the steps when the arguments ask for them. A forward hook
on the embedding compares the gathered weight each training micro-batch used with the clean weight of its step and
counts the global rows that carried no noise. Rank 0 writes ``DIR/fsdp_tied_result.json``; when SmoothOut refuses
the set-up, every rank's error message goes there instead (``"errors"``).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, HfArgumentParser, TrainerCallback
from transformers.distributed import DistributedConfig

sys.path.insert(0, os.path.dirname(__file__))
from conftest import ListDataset
from fsdp_train import full
from replica_checks import write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.adapters.dtensor import fsdp_modules, reshard_


def lm_data(vocab: int, n: int = 64, length: int = 16) -> ListDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return ListDataset([{"input_ids": ids[i], "labels": ids[i]} for i in range(n)])


class CleanAtStep(TrainerCallback):
    """The embedding's whole clean weight at each step's start (after resharding what evaluation left whole)."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        self.embedding = embedding
        self.clean: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        reshard_(fsdp_modules(model))
        self.clean.append(full(self.embedding.weight).detach().clone())


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    assert args.world_size == 2  # sets up the process group
    vocab = int(os.environ.get("FSDP_TEST_VOCAB", "65"))
    path = os.path.join(args.output_dir, "tiny_gpt2_lm")
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)  # fmt: skip
        lm = GPT2LMHeadModel(config)
        if pad := int(os.environ.get("FSDP_TEST_PAD", "0")):
            lm.resize_token_embeddings(vocab, pad_to_multiple_of=pad)
        lm.save_pretrained(path)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=2))
    embedding = model.get_input_embeddings()
    result = {"world_size": dist.get_world_size(), "rows": int(embedding.weight.shape[0]),
              "tied": embedding.weight is model.get_output_embeddings().weight}  # fmt: skip
    parameter = embedding.weight  # the tied DTensor parameter (SmoothOut perturbs its local shards)
    used: list[torch.Tensor] = []
    intended: list[torch.Tensor] = []

    def record(module, _inputs, _output):
        if module.training:  # the gathered weight this training micro-batch's forward read, and the parameter's
            used.append(module.weight.detach().clone())
            intended.append(parameter.full_tensor().detach().clone())

    embedding.register_forward_hook(record)
    evaluating = args.eval_strategy != "no" or args.eval_on_start
    error = ""
    trainer = None
    try:
        trainer = SmoothOutTrainer(
            model, args, train_dataset=lm_data(vocab), eval_dataset=lm_data(vocab, 8) if evaluating else None
        )
        check = CleanAtStep(embedding)
        trainer.add_callback(check)
        trainer.train()
    except ValueError as exc:  # SmoothOut refused the set-up
        error = str(exc)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    result["errors"] = errors
    if not error:
        accumulation = args.gradient_accumulation_steps
        assert len(used) == accumulation * len(check.clean)
        result["rows_without_noise"] = [
            int((used[i] == check.clean[i // accumulation]).all(dim=1).sum()) for i in range(len(used))
        ]
        # rows where the forward read something else than the (noisy) parameter: stale gathered storage
        result["rows_off_the_parameter"] = [int((u != w).any(dim=1).sum()) for u, w in zip(used, intended, strict=True)]
        result["steps"] = trainer.state.global_step
        result["evaluated"] = any("eval_loss" in entry for entry in trainer.state.log_history)
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "fsdp_tied_result.json"), result)


if __name__ == "__main__":
    main()
