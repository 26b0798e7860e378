"""TRL's ``SFTTrainer`` with `SmoothOutMixin` on two CPU processes, launched by tests/test_trl_sharded.py with
``torchrun --standalone --nproc_per_node 2 tests/trl_sharded_train.py MODE OUTPUT_DIR`` (``DS_ACCELERATOR=cpu``):

- ``zero3``: full fine-tuning of a tiny Llama under DeepSpeed ZeRO-3 (``SFTConfig(deepspeed=...)``); after every step
  every rank's slices equal DeepSpeed's fp32 master (cast), and the watched weight's forward saw noise;
- ``fsdp2_lora``: LoRA (``peft_config``) with ``space="lora_merged"`` under accelerate's FSDP2 plugin; the frozen base
  stays bit-identical on every rank and the adapters move.

Rank 0 writes ``OUTPUT_DIR/trl_<MODE>_result.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from fsdp_train import emulate_accelerate_fsdp_on_cpu, full
from replica_checks import write_result_and_shut_down
from test_deepspeed import zero_config
from test_lora_merged import word_level_tokenizer

from hf_smoothout import SmoothOutConfig, SmoothOutMixin


class SmoothOutSFTTrainer(SmoothOutMixin, trl.SFTTrainer):
    """TRL's SFT trainer with SmoothOut: the mixin first in the bases."""


ZERO3 = zero_config(3, stage3_param_persistence_threshold=100)
FSDP2 = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
WATCHED = {"zero3": "model.layers.0.mlp.up_proj", "fsdp2_lora": "model.layers.0.self_attn.q_proj"}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


class MasterEqual(TrainerCallback):
    """ZeRO-3: after each step, do every rank's slices equal DeepSpeed's fp32 master (cast)?"""

    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None
        self.equal: list[bool] = []

    def on_step_end(self, args, state, control, **kwargs):
        from deepspeed.utils import safe_get_local_fp32_param

        trained = [p for p in self.module.parameters() if p.requires_grad]
        self.equal.append(
            all(torch.equal(p.ds_tensor, safe_get_local_fp32_param(p).to(p.ds_tensor.dtype)) for p in trained)
        )


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 64, (16,), generator=g).tolist()} for _ in range(64)]
    config = trl.SFTConfig(
        output_dir=out, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, dataset_text_field=None, bf16=False,
        deepspeed=ZERO3 if mode == "zero3" else None,
        fsdp="full_shard" if mode == "fsdp2_lora" else "",
        fsdp_config=FSDP2 if mode == "fsdp2_lora" else None,
    )  # fmt: skip
    if mode == "fsdp2_lora":
        emulate_accelerate_fsdp_on_cpu()
    model = tiny_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = mode == "fsdp2_lora"
    trainer = SmoothOutSFTTrainer(
        model=model,
        args=config,
        processing_class=word_level_tokenizer(64),
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if lora else None,
        smoothout_config=SmoothOutConfig(strength=0.05, space="lora_merged" if lora else "trainable", seed=0),
    )
    seen: list[bool] = []
    master = MasterEqual()

    class Watch(TrainerCallback):  # after preparing: DeepSpeed's and FSDP2's hooks run before this one
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            module = trainer.model_wrapped.module if mode == "zero3" else trainer.model
            master.module = module
            layer = next(m for n, m in module.named_modules() if n.endswith(WATCHED[mode]))
            layer.register_forward_pre_hook(lambda m, _: seen.append(noisy_now(m)))

    def noisy_now(module) -> bool:
        """Whether this forward computes at noisy weights (the engine may have been rebuilt since preparing)."""
        engine = trainer.smoothout
        if mode == "zero3":
            return bool(module.training and engine is not None and engine.is_noisy)
        space = engine.merged_space if engine is not None else None
        return bool(space is not None and space.is_armed)

    trainer.add_callback(Watch())
    if mode == "zero3":
        trainer.add_callback(master)
    trainer.train()
    result = {
        "mode": mode,
        "world_size": dist.get_world_size(),
        "steps": trainer.state.global_step,
        "placement": trainer.smoothout.describe()["placement"],
        "draws": trainer.smoothout.state_dict()["draws"],
        "watched_forward_calls": len(seen),
        "watched_forward_noisy": all(seen) and bool(seen),
    }
    if mode == "zero3":
        result["master_equal_each_step"] = master.equal
    else:
        now = {n: full(p).detach() for n, p in trainer.model.named_parameters()}
        base = {n: t for n, t in now.items() if "base_layer" in n}
        result["merged_layers"] = len(trainer.smoothout.merged_layer_names)
        result["base_bit_identical"] = bool(base) and all(
            torch.equal(t, start[n.replace("base_model.model.", "").replace(".base_layer", "")])
            for n, t in base.items()
        )
        result["adapters_moved"] = any(
            not torch.equal(t, s) for n, t in now.items() if "lora_B" in n for s in [torch.zeros_like(t)]
        )
    trainer = model = None  # a clean gloo shutdown
    write_result_and_shut_down(os.path.join(out, f"trl_{mode}_result.json"), json.loads(json.dumps(result)))


if __name__ == "__main__":
    main()
