"""Two-process DeepSpeed ZeRO-3 check, launched by tests/test_zero3.py with
``torchrun --standalone --nproc_per_node 2 tests/zero3_train.py --deepspeed CONFIG --output_dir DIR ...``
(``DS_ACCELERATOR=cpu``).

A tiny BERT classifier (built plainly; DeepSpeed partitions it inside ``train``) trains with SmoothOut under ZeRO-3,
with an evaluation before and between steps (it leaves every weight gathered, the stale copies SmoothOut must
release). The watched weight (``intermediate.dense``, 75 x 32: its 2,400 elements split at element 1,200, in the
middle of row 37) is recorded as the forward gathers it. Rank 0 writes ``DIR/zero3_result.json``:

- per step: whether every rank's slices equal DeepSpeed's fp32 master (cast), and whether no gathered copy is left;
- the first gathered noise's per-row law error, and its difference from a replay on one unsharded copy (the same
  rank-free element blocks and the law applied to whole rows);
- whether every training forward saw noise, and whether the weights moved (or, at learning rate 0, are
  bit-identical to the start);
- whether ``save_model`` (16-bit weights gathered on save) wrote the clean weights, and a hash of the final weights
  (a run resumed from a checkpoint, ``--resume_from_checkpoint``, must end at the same one).
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from deepspeed_train import token_data
from golden_hashes import fingerprint
from replica_checks import write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.laws import get_noise_law
from hf_smoothout.seeding import DrawKey, draw_row_blocks_

WATCHED = "bert.encoder.layer.0.intermediate.dense"


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable weight, whole, from DeepSpeed's fp32 master (collective)."""
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Zero3Checks(TrainerCallback):
    def __init__(self) -> None:
        self.trainer = None
        self.master_equal: list[bool] = []
        self.released: list[bool] = []
        self.clean_watched: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        weight = self.trainer.model_wrapped.module.get_submodule(WATCHED).weight
        self.clean_watched.append(safe_get_full_fp32_param(weight).detach().clone())

    def on_step_end(self, args, state, control, **kwargs):
        module = self.trainer.model_wrapped.module
        trained = [p for p in module.parameters() if p.requires_grad]
        self.master_equal.append(
            all(torch.equal(p.ds_tensor, safe_get_local_fp32_param(p).to(p.ds_tensor.dtype)) for p in trained)
        )
        self.released.append(all(p.ds_status.name != "AVAILABLE" or getattr(p, "ds_persist", False) for p in trained))


def replay_first_noise(engine, clean: torch.Tensor, strength: float) -> torch.Tensor:
    """The first draw's noise of the watched weight computed on one whole copy: the rank-free element blocks, and
    the law over whole rows."""
    index = engine.parameter_names.index(f"{WATCHED}.weight")
    key = DrawKey(engine.base_seed, 0, 0, engine.config.distribution)
    u = torch.empty(clean.numel(), dtype=clean.dtype)
    span = (clean.numel(), 0, clean.numel())
    draw_row_blocks_(u, span, (clean.numel(),), key.row_block_seed(index), key.distribution, torch.empty)
    noisy = torch.empty_like(clean)
    law = get_noise_law(engine.config.adapt)
    buffers = tuple(torch.empty(clean.shape[0], 1) for _ in range(2)) if law.row_scaled else None
    law.apply_(noisy, clean, u.view_as(clean), strength, row_axis=0, buffers=buffers)
    return noisy - clean


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    assert args.world_size == 2
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=75, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    model.accepts_loss_kwargs = False
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    seen: list[torch.Tensor] = []

    def record(module, _inputs):  # registered after DeepSpeed's hooks: the weight is gathered here
        if module.training:
            seen.append(module.weight.detach().float().clone())

    trainer = SmoothOutTrainer(model, args, train_dataset=token_data(), eval_dataset=token_data(16))
    check = Zero3Checks()
    check.trainer = trainer
    trainer.add_callback(check)
    hooked: list[bool] = []

    class HookAfterPrepare(TrainerCallback):  # DeepSpeed's gather hooks exist once train() prepared the model
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not hooked:
                check.trainer.model_wrapped.module.get_submodule(WATCHED).register_forward_pre_hook(record)
                hooked.append(True)

    trainer.add_callback(HookAfterPrepare())
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    engine = trainer.smoothout
    assert deepspeed.comm.get_world_size() == 2
    steps = trainer.state.global_step
    accumulation = args.gradient_accumulation_steps
    resumed_at = int(args.resume_from_checkpoint.rstrip("/").rsplit("-", 1)[1]) if args.resume_from_checkpoint else 0
    assert len(seen) == (steps - resumed_at) * accumulation, (len(seen), steps, accumulation)
    dtype = trainer.model_wrapped.module.get_submodule(WATCHED).weight.ds_tensor.dtype
    clean = check.clean_watched[0].to(dtype).float()  # the slices hold the master cast to their dtype
    noise = seen[0] - clean
    strength = args.smoothout_strength
    rows = clean.norm(dim=1)
    row_error = float(((noise.norm(dim=1) - strength * rows).abs() / rows).max())
    replay = replay_first_noise(engine, check.clean_watched[0], strength)
    replay_error = float((noise - replay).abs().max() / replay.abs().max())
    firsts = zip(seen[::accumulation], check.clean_watched, strict=True)  # each step's first micro-batch
    noisy_each = [not torch.equal(s, c.to(dtype).float()) for s, c in firsts]
    end = full_weights(trainer.model_wrapped.module)
    saved = os.path.join(args.output_dir, "saved")
    trainer.save_model(saved)  # stage3_gather_16bit_weights_on_model_save: gathered from the slices (collective)
    saved_clean = None
    if dist.get_rank() == 0:
        from safetensors.torch import load_file

        state = load_file(os.path.join(saved, "model.safetensors"))
        saved_clean = set(end) <= set(state) and all(
            torch.equal(state[n], end[n].to(state[n].dtype)) for n in end
        )  # the clean weights: the fp32 master cast to the saved dtype
    result = {
        "world_size": dist.get_world_size(),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "placement": engine.describe()["placement"],
        "restore": engine.restore_mode,
        "dtype": str(dtype),
        "steps": steps,
        "evaluated": any("eval_loss" in entry for entry in trainer.state.log_history),
        "master_equal_each_step": check.master_equal,
        "no_gathered_copy_after_step": check.released,
        "forward_saw_noise_each_step": noisy_each,
        "max_relative_row_norm_error": row_error,
        "replay_max_relative_error": replay_error,
        # (bf16: DeepSpeed's fp32 master starts from the bf16 weights)
        "weights_bit_identical_to_start": all(torch.equal(end[n], start[n].to(dtype).float()) for n in end),
        "draws": engine.state_dict()["draws"],
        "saved_weights_are_the_clean_master": saved_clean,
        "final_weights": fingerprint(end, start)["sha256"],
    }
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "zero3_result.json"), result)


if __name__ == "__main__":
    main()
