"""Two-process FSDP2 check, launched by tests/test_fsdp.py with
``torchrun --standalone --nproc_per_node 2 tests/fsdp_train.py --use_cpu --output_dir DIR ...``.

``FSDP_TEST_ROUTE=transformers`` (default): a tiny BERT classifier is saved and loaded sharded by transformers'
own ``DistributedConfig(fsdp_size=2)``. ``FSDP_TEST_ROUTE=accelerate``: the model stays whole and accelerate's
FSDP plugin (``--fsdp full_shard --fsdp_config '{"version": 2}'``) shards it inside ``train``, as users run it on
GPUs (see `emulate_accelerate_fsdp_on_cpu`). Either way the parameters become DTensors (``Shard(0)``) and are
trained with SmoothOut.
A forward pre-hook records the *unsharded* weight the forward pass sees; a callback checks that every rank's
shards are restored bit-exactly before each optimizer step. Rank 0 writes ``DIR/fsdp_result.json``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    HfArgumentParser,
    TrainerCallback,
)
from transformers.distributed import DistributedConfig

sys.path.insert(0, os.path.dirname(__file__))
from deepspeed_train import token_data
from golden_hashes import fingerprint
from replica_checks import write_result_and_shut_down

from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
from hf_smoothout.adapters.dtensor import fsdp_modules, is_dtensor, reshard_

# FSDP_TEST_MODEL=bert: nn.Linear weights, sharded along their rows. gpt2: Conv1D weights ([in, out]) sharded on
# dim 0, i.e. across their output rows (columns), so the row norms are all-reduced.
MODELS = {
    "bert": ("bert.encoder.layer.0.intermediate.dense", 1),
    "gpt2": ("transformer.h.0.mlp.c_fc", 0),
}


def build(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2,
                            pad_token_id=0)  # fmt: skip
        return GPT2ForSequenceClassification(config)
    vocab = int(os.environ.get("FSDP_TEST_VOCAB", "64"))  # odd: FSDP2 pads the last rank's embedding shard
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def emulate_accelerate_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin shard on CPU processes.

    accelerate turns the plugin on only for accelerator devices (for ``MULTI_CPU`` it silently falls back to
    DDP), although its FSDP2 path (``fully_shard`` over a CPU device mesh, gloo) runs on CPU. Marking the
    process state as multi-device before the Trainer builds its ``Accelerator`` takes the branch GPU users
    take; everything after it (``fsdp2_prepare_model``, the optimizer's parameter switch, the FSDP checkpoint
    functions) is accelerate's real code on CPU tensors. Elsewhere (a GPU run) it changes nothing.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        state._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def load(path: str, route: str, shards: int) -> torch.nn.Module:
    """The saved model, sharded at load time (``transformers``) or whole for accelerate's plugin to shard."""
    if route == "accelerate":
        return AutoModelForSequenceClassification.from_pretrained(path)
    return AutoModelForSequenceClassification.from_pretrained(
        path, distributed_config=DistributedConfig(fsdp_size=shards)
    )


def full(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor parameter (gathered), else the tensor itself."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole tensor: gathered from the shards, or the module's temporary full weight where an
    evaluation pass left it unsharded. Equal whole tensors on every rank <=> equal shards."""
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


class ShardRestoreCheck(TrainerCallback):
    """Weights at each step's start vs right before its optimizer step (nothing else changes them); also the
    watched module's whole clean weight at each step's start."""

    def __init__(self, watched: torch.nn.Module) -> None:
        self.watched = watched
        self.start: dict[str, torch.Tensor] = {}
        self.equal: list[bool] = []
        self.clean_at_step: list[torch.Tensor] = []
        self.engine_on_shards: list[bool] = []
        self.unsharded_at_step_begin: list[bool] = []
        self.trainer: SmoothOutTrainer | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.unsharded_at_step_begin.append(not all(is_dtensor(p) for p in model.parameters()))
        reshard_(fsdp_modules(model))  # an evaluation pass may have left temporary (under bf16: 16-bit) full weights
        self.start = full_weights(model)
        self.clean_at_step.append(full(self.watched.weight).detach().clone())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        now = full_weights(model)
        self.equal.append(all(torch.equal(now[n], self.start[n]) for n in now))
        # the engine that perturbed this step's micro-batches: bound to the shards, not to temporary full weights
        self.engine_on_shards.append(all(is_dtensor(p) for p in self.trainer.smoothout.parameters))


def main() -> None:
    (args,) = HfArgumentParser(SmoothOutTrainingArguments).parse_args_into_dataclasses()
    shards = int(os.environ.get("FSDP_TEST_SHARDS", "2"))  # 1: the one-GPU check in benchmarks/gpu_checks.sh
    assert args.world_size == shards  # sets up the process group
    kind = os.environ.get("FSDP_TEST_MODEL", "bert")
    watched_name, norm_dim = MODELS[kind]
    route = os.environ.get("FSDP_TEST_ROUTE", "transformers")
    path = os.path.join(args.output_dir, f"tiny_{kind}")
    if dist.get_rank() == 0:
        build(kind).save_pretrained(path)
    dist.barrier()
    if route == "accelerate":
        emulate_accelerate_fsdp_on_cpu()
    model = load(path, route, shards)
    model.accepts_loss_kwargs = False
    watched = model.get_submodule(watched_name)
    clean_full = full(watched.weight).detach().clone()
    start = full_weights(model)
    seen: list[torch.Tensor] = []

    def record(module, _inputs):
        if module.training:  # every training micro-batch; evaluation passes are left out
            seen.append(full(module.weight).detach().clone())

    watched.register_forward_pre_hook(record)
    evaluating = args.eval_strategy != "no" or args.eval_on_start  # evaluation passes between training steps
    trainer = SmoothOutTrainer(
        model, args, train_dataset=token_data(), eval_dataset=token_data(16) if evaluating else None
    )
    assert trainer.is_fsdp_enabled == (route == "accelerate")
    check = ShardRestoreCheck(watched)
    check.trainer = trainer
    trainer.add_callback(check)
    trainer.train()
    reshard_(fsdp_modules(trainer.model))  # the last evaluation pass may have left modules unsharded
    accumulation = args.gradient_accumulation_steps
    assert len(seen) == accumulation * trainer.state.global_step == accumulation * len(check.clean_at_step)
    last_noise = seen[-1] - check.clean_at_step[-1]  # the last micro-batch's noise (its step's clean weight)
    watched = trainer.model.get_submodule(watched_name)
    placements = str(watched.weight.placements)

    noise = seen[0] - clean_full
    strength = args.smoothout_strength
    row_norms = clean_full.norm(dim=norm_dim)  # norms over everything but the output axis
    row_norm_error = float(((noise.norm(dim=norm_dim) - strength * row_norms).abs() / row_norms).max())
    # How the noise of a row divides between the two shards (halves of dim 0). Whole-row normalization (the law)
    # splits it at random; normalizing each shard's part alone would split it exactly like the weight's norm.
    share_deviation = None
    if norm_dim == 0:  # rows run along dim 0, which is the sharded one
        half = clean_full.shape[0] // 2
        noise_share = noise[:half].norm(dim=0) / noise.norm(dim=0)
        share_deviation = float((noise_share - clean_full[:half].norm(dim=0) / row_norms).abs().max())
    gathered = [torch.empty_like(seen[0]) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, seen[0])
    if dist.get_rank() == 0:  # the gathered noise of the first and last micro-batch, to compare across set-ups
        torch.save(noise, os.path.join(args.output_dir, "first_noise.pt"))
        torch.save(last_noise, os.path.join(args.output_dir, "last_noise.pt"))
    result = {
        "model": kind,
        "world_size": dist.get_world_size(),
        "placements": placements,
        "sharded_rows": list(watched.weight.to_local().shape),
        "full_rows": list(clean_full.shape),
        "forward_saw_noise": not torch.equal(seen[0], clean_full),
        "max_relative_row_norm_error": row_norm_error,
        "noise_split_deviates_from_weight_split": share_deviation,
        "same_noisy_weight_on_all_ranks": all(torch.equal(gathered[0], g) for g in gathered[1:]),
        "shards_restored_each_step": check.equal,
        "params_changed": not torch.equal(full(watched.weight), clean_full),
        "route": route,
        "evaluated": any("eval_loss" in entry for entry in trainer.state.log_history),
        "draws": trainer.smoothout.state_dict()["draws"],
        "engine_on_shards_each_step": check.engine_on_shards,
        "unsharded_at_step_begin": check.unsharded_at_step_begin,
        "last_noise_norm": float(last_noise.norm()),
        "steps": trainer.state.global_step,
        "golden": {  # the gathered first noisy weight and the final weights (tests/golden/noise.json)
            "first_noise": fingerprint({watched_name: seen[0]}, {watched_name: clean_full}),
            "final": fingerprint(full_weights(trainer.model), start),
        },
    }
    del trainer, model
    write_result_and_shut_down(os.path.join(args.output_dir, "fsdp_result.json"), result)


if __name__ == "__main__":
    main()
